// ONNX Runtime custom op for SparseExpertFFN (domain, version, inputs: runtime/spec.py).
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <limits>
#include <memory>
#include <string_view>

#include "attributes.h"
#include "kernels/sparse_ffn.h"
#include "moefy_spec.h"

namespace moefy::ort_ops {

// The kernel's Activation enum must list the spec's activations in the spec's order.
static_assert(spec::kNumActivations == 4);
static_assert(std::string_view(spec::kActivations[static_cast<int>(Activation::kRelu)]) == "relu");
static_assert(std::string_view(spec::kActivations[static_cast<int>(Activation::kGelu)]) == "gelu");
static_assert(std::string_view(spec::kActivations[static_cast<int>(Activation::kGeluTanh)]) == "gelu_tanh");
static_assert(std::string_view(spec::kActivations[static_cast<int>(Activation::kSilu)]) == "silu");

class Kernel {
 public:
  // isa: the C++ kernels' instruction-set path; null: compute with the Numba callbacks of numba_host.h.
  Kernel(const OrtKernelInfo* info, const IsaKernels* isa);
  OrtStatusPtr ComputeV2(OrtKernelContext* context);

 private:
  void Compute(OrtKernelContext* context);
  const IsaKernels* isa_ = nullptr;
  std::size_t workers_ = 1;  // per-worker output accumulators (ONNX Runtime's pool spans the cores)
  OpAttributes attrs_;
  // First-layer (and gate) weights repacked at session creation when they are initializers.
  std::unique_ptr<PackedWeights> packed_;
  std::vector<int64_t> packed_shape_;
  WeightType packed_type_ = WeightType::kFloat32;
  // The Numba callbacks take float32 or int8: constant float16 W1, W2, Wg widened once, here, with their source.
  std::vector<float> widened_[3];
  const void* widened_from_[3] = {};
};

// One Op object per instruction-set path (and one computed by Numba callbacks: isa null); a session gets the
// one its options asked for when the library was registered.
struct Op : Ort::CustomOpBase<Op, Kernel, /*WithStatus=*/true> {
  explicit Op(const IsaKernels* isa) : isa_(isa) {
    start_ver_ = spec::kSinceVersion, end_ver_ = spec::kVersion;
  }
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return spec::kOpType; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return spec::kNumInputs; }
  // Expert weights may be float32, float16 or int8 (UNDEFINED: ORT accepts any type; Compute checks it).
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return spec::kInputIsExpertWeight[i] ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const;
  size_t GetOutputTypeCount() const { return spec::kNumOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

 private:
  const IsaKernels* isa_;
};

}  // namespace moefy::ort_ops
