#include "attributes.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace moefy::ort_ops {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(std::string(spec::kOpType) + ": " + msg); }

// What a node attribute holds. ONNX Runtime's C API has no "type of attribute" call, so each getter is tried.
enum class Found { kAbsent, kInt, kFloat, kString, kInts, kFloats, kOther };

const char* onnx_name(Found f) {
  switch (f) {
    case Found::kInt: return "INT";
    case Found::kFloat: return "FLOAT";
    case Found::kString: return "STRING";
    case Found::kInts: return "INTS";
    case Found::kFloats: return "FLOATS";
    default: return "another type (not INT, FLOAT, STRING or a non-empty INTS or FLOATS)";
  }
}

Found expected(spec::AttributeType t) {
  switch (t) {
    case spec::AttributeType::kInt: return Found::kInt;
    case spec::AttributeType::kFloat: return Found::kFloat;
    default: return Found::kString;
  }
}

// True if the call succeeded; the status is released either way (its message kept in *message).
bool ok(OrtStatus* status, std::string* message = nullptr) {
  if (!status) return true;
  if (message) *message = Ort::GetApi().GetErrorMessage(status);
  Ort::GetApi().ReleaseStatus(status);
  return false;
}

Found probe(const OrtKernelInfo* info, const char* name) {
  const OrtApi& api = Ort::GetApi();
  float f = 0;
  int64_t i = 0;
  size_t n = 0;
  std::string why;
  if (ok(api.KernelInfoGetAttribute_float(info, name, &f), &why)) return Found::kFloat;
  // ONNX Runtime words a missing attribute "No attribute with name:'...' is defined".
  if (why.find("No attribute with name") != std::string::npos) return Found::kAbsent;
  if (ok(api.KernelInfoGetAttribute_int64(info, name, &i))) return Found::kInt;
  if (ok(api.KernelInfoGetAttribute_string(info, name, nullptr, &n))) return Found::kString;
  // The list getters do not check the type (any attribute reads as its list of that kind, often empty): the
  // non-empty list tells.
  size_t ints = 0, floats = 0;
  if (ok(api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &ints)) && ints > 0) return Found::kInts;
  if (ok(api.KernelInfoGetAttributeArray_float(info, name, nullptr, &floats)) && floats > 0) return Found::kFloats;
  return Found::kOther;  // TENSOR, STRINGS, GRAPH, an empty list ...
}

template <size_t N>
int index_of(const std::string& value, const char* const (&names)[N]) {
  for (size_t i = 0; i < N; ++i)
    if (value == names[i]) return static_cast<int>(i);
  return -1;
}

template <size_t N>
std::string join(const char* const (&names)[N]) {
  std::string s;
  for (size_t i = 0; i < N; ++i) s += (i ? ", " : "") + std::string(names[i]);
  return s;
}

template <size_t N>
int one_of(const char* name, const std::string& value, const char* const (&allowed)[N]) {
  const int i = index_of(value, allowed);
  if (i < 0) fail(std::string(name) + " must be one of " + join(allowed) + "; got '" + value + "'");
  return i;
}

int64_t int_value(const OpAttributes& a, size_t i) {
  switch (i) {
    case spec::kAttr_top_k: return a.top_k;
    case spec::kAttr_min_k: return a.min_k;
    default: throw std::logic_error("moefy: attributes.cc does not know the int attribute " +
                                    std::string(spec::kAttributeNames[i]) + " (runtime/spec.py changed)");
  }
}

}  // namespace

OpAttributes read_attributes(const OrtKernelInfo* info) {
  OpAttributes out;
  out.activation = index_of(spec::kDefaultActivation, spec::kActivations);
  Ort::ConstKernelInfo ki(info);
  for (size_t i = 0; i < spec::kNumAttributes; ++i) {
    const char* name = spec::kAttributeNames[i];
    const Found found = probe(info, name);
    if (found == Found::kAbsent) {
      if (spec::kAttributeRequired[i]) fail(std::string("attribute ") + name + " is required");
      continue;
    }
    if (found != expected(spec::kAttributeTypes[i]))
      fail(std::string("attribute ") + name + " must be of ONNX type " + spec::kAttributeOnnxTypes[i] + ", got " +
           onnx_name(found));
    switch (i) {
      case spec::kAttr_top_k: out.top_k = ki.GetAttribute<int64_t>(name); break;
      case spec::kAttr_min_k: out.min_k = ki.GetAttribute<int64_t>(name); break;
      case spec::kAttr_score_threshold: out.score_threshold = ki.GetAttribute<float>(name); break;
      case spec::kAttr_activation:
        out.activation = one_of(name, ki.GetAttribute<std::string>(name), spec::kActivations);
        break;
      case spec::kAttr_expert_weighting:
        out.expert_weighting = one_of(name, ki.GetAttribute<std::string>(name), spec::kExpertWeightings);
        break;
      default: throw std::logic_error(std::string("moefy: attributes.cc does not read ") + name);
    }
  }
  if (std::isnan(out.score_threshold)) fail("score_threshold must be a number (not NaN), got nan");
  return out;
}

void check_ranges(const OpAttributes& a, int64_t experts) {
  for (size_t i = 0; i < spec::kNumAttributes; ++i) {
    if (spec::kAttributeTypes[i] != spec::AttributeType::kInt) continue;
    const char* high_name = spec::kAttributeHigh[i];
    int64_t high = experts;
    if (std::strcmp(high_name, "E") != 0) {
      const int h = index_of(high_name, spec::kAttributeNames);
      if (h < 0) throw std::logic_error(std::string("moefy: unknown bound ") + high_name);
      high = int_value(a, static_cast<size_t>(h));
    }
    const int64_t v = int_value(a, i);
    if (v < spec::kAttributeLow[i] || v > high)
      fail(std::string(spec::kAttributeNames[i]) + " must be an integer in [" + std::to_string(spec::kAttributeLow[i]) +
           ", " + high_name + "=" + std::to_string(high) + "], got " + std::to_string(v));
  }
}

}  // namespace moefy::ort_ops
