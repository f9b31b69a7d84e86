// Thin ONNX Runtime binding of the SparseExpertFFN kernel: reads attributes (attributes.cc), checks shapes
// with the same rules and wording as runtime/spec.py:check, and hands raw pointers to the
// kernel core. Errors become ORT statuses (never exceptions across the C ABI).
#include "sparse_expert_ffn_op.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kernels/sparse_ffn.h"
#include "moefy_spec.h"
#include "numba_host.h"

namespace moefy::ort_ops {
namespace {

using Shape = std::vector<int64_t>;

std::string fmt(const Shape* s) {
  if (!s) return "absent";
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s->size(); ++i) o << (i ? ", " : "") << (*s)[i];
  o << "]";
  return o.str();
}

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(std::string(spec::kOpType) + ": " + msg); }

// NumPy's names, as runtime/spec.py words its messages.
std::string type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    default: return "ONNX element type " + std::to_string(static_cast<int>(t));
  }
}

// The kernels' name for an expert weights' element type; false for a type the operator does not take.
bool weight_type(ONNXTensorElementDataType t, WeightType* out) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: *out = WeightType::kFloat32; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: *out = WeightType::kFloat16; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: *out = WeightType::kInt8; return true;
    default: return false;
  }
}

void widen_half(const void* src, size_t n, std::vector<float>& dst) {
  dst.resize(n);
  for (size_t j = 0; j < n; ++j) dst[j] = half_to_float(static_cast<const Half*>(src)[j]);
}

// ONNX Runtime's intra-op thread pool, as the kernels' ParallelFor.
class OrtPool final : public ParallelFor {
 public:
  explicit OrtPool(Ort::KernelContext& ctx) : ctx_(ctx) {}
  void operator()(std::size_t n, TaskRef fn) const override { ctx_.ParallelFor(&TaskRef::invoke, n, n, &fn); }

 private:
  Ort::KernelContext& ctx_;
};

}  // namespace

Kernel::Kernel(const OrtKernelInfo* info, const IsaKernels* isa)
    : isa_(isa), workers_(std::clamp<std::size_t>(std::thread::hardware_concurrency(), 1, 16)) {
  if (!isa_ && !numba_host::have_kernels())
    fail(std::string("the ") + spec::kNumbaHostDomain + " op runs Numba kernels that Python's moefy runtime installs "
         "(runtime.numba_host.register()); open the model with runtime.InferenceSession(..., backend='numba')");
  attrs_ = read_attributes(info);  // types as the spec declares them (attributes.cc)

  // Prepack once when the expert weights are constant initializers; otherwise pack per call.
  Ort::ConstKernelInfo ki(info);
  auto constant = [&](size_t i) -> Ort::ConstValue {
    int is_constant = 0;
    if (i >= ki.GetInputCount()) return Ort::ConstValue{nullptr};
    Ort::ConstValue v = ki.GetTensorConstantInput(i, &is_constant);
    return is_constant ? v : Ort::ConstValue{nullptr};
  };
  Ort::ConstValue w1 = constant(spec::kW1), w2 = constant(spec::kW2);
  const bool gated = ki.GetInputCount() > spec::kWg && !ki.GetInputName(spec::kWg).empty();
  Ort::ConstValue wg = gated ? constant(spec::kWg) : Ort::ConstValue{nullptr};
  if (!isa_) {  // the Numba kernels read the weights as given, except float16 ones (widened once, here)
    int slot = 0;
    for (const Ort::ConstValue* v : {&w1, &w2, &wg}) {
      if (*v != nullptr && v->GetTensorTypeAndShapeInfo().GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
        widened_from_[slot] = v->GetTensorRawData();
        widen_half(widened_from_[slot], v->GetTensorTypeAndShapeInfo().GetElementCount(), widened_[slot]);
      }
      ++slot;
    }
    return;
  }
  if (w1 != nullptr && w2 != nullptr && (!gated || wg != nullptr)) {
    Shape s = w1.GetTensorTypeAndShapeInfo().GetShape();
    // Mis-shaped weights are left unpacked: Compute reports them with the spec's message.
    const auto type = w1.GetTensorTypeAndShapeInfo().GetElementType();
    auto same = [&](const Ort::ConstValue& v) {
      auto info = v.GetTensorTypeAndShapeInfo();
      return info.GetShape() == s && info.GetElementType() == type;
    };
    WeightType wt;
    if (s.size() == 3 && weight_type(type, &wt) && same(w2) && (!gated || same(wg))) {
      SparseFFNProblem p;
      p.experts = s[0], p.m = s[1], p.d = s[2];
      p.weight_type = wt;
      p.w1 = w1.GetTensorRawData(), p.w2 = w2.GetTensorRawData();
      p.wg = gated ? wg.GetTensorRawData() : nullptr;
      Ort::ConstValue rw = constant(spec::krouter_w);
      if (rw != nullptr && rw.GetTensorTypeAndShapeInfo().GetShape() == Shape{s[0], s[2]})
        p.router_w = rw.GetTensorData<float>();
      // B2 + sum_e U[e], the output every token starts from, precomputed when both are constant (or absent).
      Ort::ConstValue b2 = constant(spec::kB2), ub = constant(spec::kunselected_bias);
      const bool b2_absent = ki.GetInputCount() <= spec::kB2 || ki.GetInputName(spec::kB2).empty();
      const bool ub_absent = ki.GetInputCount() <= spec::kunselected_bias ||
                             ki.GetInputName(spec::kunselected_bias).empty();
      if ((b2_absent || b2 != nullptr) && (ub_absent || ub != nullptr) &&
          (b2 == nullptr || b2.GetTensorTypeAndShapeInfo().GetShape() == Shape{s[2]}) &&
          (ub == nullptr || ub.GetTensorTypeAndShapeInfo().GetShape() == Shape{s[0], s[2]})) {
        p.b2 = b2 != nullptr ? b2.GetTensorData<float>() : nullptr;
        p.unselected_bias = ub != nullptr ? ub.GetTensorData<float>() : nullptr;
      }
      packed_ = std::make_unique<PackedWeights>(pack_weights(p, *isa_));
      packed_shape_ = s;
      packed_type_ = p.weight_type;
    }
  }
}

OrtStatusPtr Kernel::ComputeV2(OrtKernelContext* context) {
  try {
    Compute(context);
    return nullptr;
  } catch (const std::invalid_argument& e) {
    return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
}

void Kernel::Compute(OrtKernelContext* context) {
  Ort::KernelContext ctx(context);
  const size_t n_in = ctx.GetInputCount();
  Shape shapes[spec::kNumInputs];
  bool present[spec::kNumInputs] = {};
  const void* raw[spec::kNumInputs] = {};
  ONNXTensorElementDataType types[spec::kNumInputs] = {};
  for (size_t i = 0; i < spec::kNumInputs && i < n_in; ++i) {
    Ort::ConstValue v = ctx.GetInput(i);
    if (v == nullptr) continue;
    present[i] = true;
    auto info = v.GetTensorTypeAndShapeInfo();
    shapes[i] = info.GetShape();
    types[i] = info.GetElementType();
    raw[i] = v.GetTensorRawData();
  }
  // Element types, with runtime/spec.py:check_types's rules and words (before any data is read).
  constexpr auto kFloat = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, kInt8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
  WeightType wt = WeightType::kFloat32;
  for (size_t i = 0; i < spec::kNumInputs; ++i)
    if (present[i] && types[i] != kFloat && !(spec::kInputIsExpertWeight[i] && weight_type(types[i], &wt)))
      fail(std::string(spec::kInputNames[i]) + " must be " + (spec::kInputIsExpertWeight[i] ? spec::kWeightTypes : "float32") +
           ", got " + type_name(types[i]));
  const std::pair<int, int> scaled[] = {{spec::kW1, spec::kW1_scale}, {spec::kW2, spec::kW2_scale},
                                        {spec::kWg, spec::kWg_scale}};
  for (const auto& [w, scale] : scaled) {
    const std::string wn = spec::kInputNames[w], sn = spec::kInputNames[scale];
    if (present[w] && present[spec::kW1] && types[w] != types[spec::kW1])
      fail("W1, W2 and Wg must have one element type, got W1 " + type_name(types[spec::kW1]) + " and " + wn + " " +
           type_name(types[w]));
    const bool int8 = present[w] && types[w] == kInt8;
    if (int8 && !present[scale]) fail("int8 " + wn + " needs " + sn + " (one float scale per row)");
    if (!int8 && present[scale]) fail(sn + " is only for an int8 " + wn);
  }
  auto data = [&](int i) { return static_cast<const float*>(raw[i]); };
  auto shape = [&](int i) -> const Shape* { return present[i] ? &shapes[i] : nullptr; };
  for (int i : {spec::kX, spec::kW1, spec::kW2})
    if (!present[i]) fail(std::string("input ") + spec::kInputNames[i] + " is required");
  const Shape& x = shapes[spec::kX];
  const Shape& w1 = shapes[spec::kW1];
  if (x.empty()) fail("X must have rank >= 1, got shape " + fmt(&x));
  if (w1.size() != 3) fail("W1 must be [E, m, d], got " + fmt(&w1));
  const int64_t E = w1[0], m = w1[1], d = w1[2];
  if (x.back() != d)
    fail("last dim of X " + fmt(&x) + " must equal d=" + std::to_string(d) + " of W1 " + fmt(&w1));
  Shape scores_shape(x.begin(), x.end() - 1);
  scores_shape.push_back(E);
  const std::pair<int, Shape> expect[] = {
      {spec::kW2, {E, m, d}}, {spec::kB1, {E, m}},  {spec::kB2, {d}},         {spec::krouter_w, {E, d}},
      {spec::krouter_b, {E}}, {spec::kWg, {E, m, d}}, {spec::kBg, {E, m}},      {spec::kunselected_bias, {E, d}},
      {spec::krouter_scores, scores_shape}, {spec::kW1_scale, {E, m}}, {spec::kW2_scale, {E, m}},
      {spec::kWg_scale, {E, m}}};
  for (const auto& [i, want] : expect)
    if (present[i] && shapes[i] != want)
      fail(std::string(spec::kInputNames[i]) + " must have shape " + fmt(&want) + " (from X " + fmt(&x) +
           ", W1 " + fmt(&w1) + "), got " + fmt(shape(i)));
  const bool has_w = present[spec::krouter_w], has_s = present[spec::krouter_scores];
  if (has_w == has_s)
    fail(std::string("give exactly one of router_w and router_scores (got ") + (has_w ? "both" : "neither") + ")");
  if (present[spec::krouter_b] && !has_w) fail("router_b needs router_w");
  if (present[spec::kBg] && !present[spec::kWg]) fail("Bg needs Wg");
  if (E < 1 || m < 1) fail("W1 " + fmt(&w1) + " must have at least one expert and one neuron");
  if (d < 1) fail("d (the last dim of X and W1) must be >= 1, got X " + fmt(&x) + ", W1 " + fmt(&w1));
  check_ranges(attrs_, E);

  int64_t tokens = 1;
  for (size_t i = 0; i + 1 < x.size(); ++i) tokens *= x[i];
  Ort::UnownedValue out = ctx.GetOutput(0, x);

  SparseFFNProblem p;
  p.tokens = tokens, p.d = d, p.experts = E, p.m = m, p.top_k = attrs_.top_k;
  p.min_k = attrs_.min_k, p.score_threshold = attrs_.score_threshold;
  weight_type(types[spec::kW1], &p.weight_type);
  p.x = data(spec::kX), p.w1 = raw[spec::kW1], p.b1 = data(spec::kB1), p.w2 = raw[spec::kW2];
  p.b2 = data(spec::kB2), p.router_w = data(spec::krouter_w), p.router_b = data(spec::krouter_b);
  p.router_scores = data(spec::krouter_scores), p.wg = raw[spec::kWg], p.bg = data(spec::kBg);
  p.unselected_bias = data(spec::kunselected_bias);
  p.w1_scale = data(spec::kW1_scale), p.w2_scale = data(spec::kW2_scale), p.wg_scale = data(spec::kWg_scale);
  p.activation = static_cast<Activation>(attrs_.activation);
  p.y = out.GetTensorMutableData<float>();

  const OrtPool ort_pool(ctx);
  if (!isa_ && p.weight_type == WeightType::kFloat16) {
    // The Numba kernels take float32 or int8: float16 experts as widened at session creation (constants), else
    // per call (exact either way; the halved bytes pay only on the C++ kernels).
    thread_local std::vector<float> per_call[3];
    const void* given[spec::kNumInputs];
    std::copy(raw, raw + spec::kNumInputs, given);
    int slot = 0;
    for (int i : {spec::kW1, spec::kW2, spec::kWg}) {
      if (present[i]) {
        if (raw[i] != widened_from_[slot]) widen_half(raw[i], static_cast<size_t>(E * m * d), per_call[slot]);
        given[i] = (raw[i] == widened_from_[slot] ? widened_[slot] : per_call[slot]).data();
      }
      ++slot;
    }
    p.weight_type = WeightType::kFloat32;
    numba_host::run(p, given, ort_pool, workers_);
  } else if (!isa_)
    numba_host::run(p, raw, ort_pool, workers_);
  else if (packed_ && packed_shape_ == w1 && packed_type_ == p.weight_type)
    sparse_ffn(p, *packed_, ort_pool, workers_);
  else
    sparse_ffn(p, *isa_, ort_pool, workers_);
}

OrtStatusPtr Op::CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
  try {
    *kernel = new Kernel(info, isa_);
    return nullptr;
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  }
}

OrtCustomOpInputOutputCharacteristic Op::GetInputCharacteristic(size_t i) const {
  return spec::kInputOptional[i] ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}

}  // namespace moefy::ort_ops
