// The library's only entry points: RegisterCustomOps (ONNX Runtime's convention), moefy_describe_ops,
// which reports what was registered so tests can hold it to runtime/spec.py, and moefy_set_numba_kernels.
#include <mutex>
#include <string>

#include "numba_host.h"
#include "sparse_expert_ffn_op.h"

namespace {

moefy::ort_ops::Op& sparse_expert_ffn() {
  static moefy::ort_ops::Op op;
  return op;
}

// The same op computed by Numba callbacks (numba_host.h), for the Python runtime's numba backend.
moefy::ort_ops::Op& numba_hosted() {
  static moefy::ort_ops::Op op(/*numba_host=*/true);
  return op;
}

// Domains must outlive every session that uses them, so they are created once per process.
Ort::CustomOpDomain& domain() {
  static Ort::CustomOpDomain d{moefy::spec::kDomain};
  static std::once_flag once;
  std::call_once(once, [] { d.Add(&sparse_expert_ffn()); });
  return d;
}

Ort::CustomOpDomain& numba_domain() {
  static Ort::CustomOpDomain d{moefy::spec::kNumbaHostDomain};
  static std::once_flag once;
  std::call_once(once, [] { d.Add(&numba_hosted()); });
  return d;
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                              const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) return nullptr;  // cannot even report: ORT older than our headers
  Ort::InitApi(api);
  try {
    Ort::UnownedSessionOptions(options).Add(domain());
    Ort::UnownedSessionOptions(options).Add(numba_domain());
    return nullptr;
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}

// Installs the Numba callbacks of the ai.moefy.numba op; returns an error message or null.
__attribute__((visibility("default"))) const char* moefy_set_numba_kernels(const moefy::numba_host::Kernels* k) {
  return moefy::numba_host::set_kernels(k);
}

// JSON of the registered op, read back through the OrtCustomOp callbacks ONNX Runtime uses.
__attribute__((visibility("default"))) const char* moefy_describe_ops() {
  static std::string json;
  static std::once_flag once;
  std::call_once(once, [] {
    const OrtCustomOp& op = sparse_expert_ffn();
    std::string inputs, attrs;
    for (size_t i = 0; i < op.GetInputTypeCount(&op); ++i) {
      bool optional = op.GetInputCharacteristic(&op, i) == INPUT_OUTPUT_OPTIONAL;
      inputs += std::string(i ? "," : "") + "{\"name\":\"" + moefy::spec::kInputNames[i] +
                "\",\"optional\":" + (optional ? "true" : "false") + ",\"type\":" +
                std::to_string(op.GetInputType(&op, i)) + "}";
    }
    for (size_t i = 0; i < sizeof(moefy::spec::kAttributeNames) / sizeof(char*); ++i)
      attrs += std::string(i ? "," : "") + "\"" + moefy::spec::kAttributeNames[i] + "\"";
    json = std::string("[{\"domain\":\"") + moefy::spec::kDomain + "\",\"op_type\":\"" + op.GetName(&op) +
           "\",\"since_version\":" + std::to_string(op.GetStartVersion(&op)) +
           ",\"end_version\":" + std::to_string(op.GetEndVersion(&op)) + ",\"inputs\":[" + inputs +
           "],\"num_outputs\":" + std::to_string(op.GetOutputTypeCount(&op)) + ",\"attributes\":[" + attrs +
           "],\"activations\":[" + [] {
             std::string a;
             for (size_t i = 0; i < moefy::spec::kNumActivations; ++i)
               a += std::string(i ? "," : "") + "\"" + moefy::spec::kActivations[i] + "\"";
             return a;
           }() + "]}]";
  });
  return json.c_str();
}

}  // extern "C"
