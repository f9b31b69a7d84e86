// The SparseExpertFFN node's attributes, read from the table that runtime/spec.py generates (names, ONNX types,
// defaults, bounds) the way runtime/spec.py:node_attributes reads them for the Python backends: an attribute of
// another ONNX type is refused, never replaced by its default. Errors are std::invalid_argument with the spec's words.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <limits>

#include "moefy_spec.h"

namespace moefy::ort_ops {

struct OpAttributes {
  int64_t top_k = 0;
  int64_t min_k = spec::kDefaultMinK;
  float score_threshold = -std::numeric_limits<float>::infinity();
  int activation = 0;        // index into spec::kActivations
  int expert_weighting = 0;  // index into spec::kExpertWeightings
};

// Types, required attributes, allowed strings and NaN: once, at kernel creation.
OpAttributes read_attributes(const OrtKernelInfo* info);

// The integer ranges (top_k <= E, min_k <= top_k), which need E: per call, before any data is read.
void check_ranges(const OpAttributes& attrs, int64_t experts);

}  // namespace moefy::ort_ops
