// The library's only entry points: RegisterCustomOps (ONNX Runtime's convention), moefy_describe_ops,
// which reports what was registered so tests can hold it to runtime/spec.py, moefy_describe_isas, and
// moefy_set_numba_kernels.
#include <memory>
#include <mutex>
#include <string>

#include "numba_host.h"
#include "sparse_expert_ffn_op.h"

namespace {

// Session option naming the instruction-set path of that session's kernels ("auto", "avx2", ...); absent:
// MOEFY_ISA, else the best path this CPU runs. Read when the library is registered with the options.
constexpr const char* kIsaConfigKey = "moefy.isa";

// Ops and domains must outlive every session that uses them, so they are created once per process: one
// ai.moefy domain per instruction-set path (a session gets the one its options name) and the ai.moefy.numba
// domain, the same op computed by Numba callbacks (numba_host.h) for the Python runtime's numba backend.
struct IsaDomain {
  moefy::ort_ops::Op op;
  Ort::CustomOpDomain domain{moefy::spec::kDomain};
  explicit IsaDomain(const moefy::IsaKernels* isa) : op(isa) { domain.Add(&op); }
};

Ort::CustomOpDomain& domain_for(const moefy::IsaKernels* isa) {
  static std::mutex mu;
  static std::unique_ptr<IsaDomain> domains[8];
  static const moefy::IsaKernels* keys[8] = {};
  std::lock_guard<std::mutex> lock(mu);
  int i = 0;
  while (keys[i] && keys[i] != isa) ++i;  // at most 5 paths exist
  if (!keys[i]) keys[i] = isa, domains[i] = std::make_unique<IsaDomain>(isa);
  return domains[i]->domain;
}

moefy::ort_ops::Op& numba_hosted() {
  static moefy::ort_ops::Op op(/*isa=*/nullptr);
  return op;
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
    Ort::UnownedSessionOptions so(options);
    const moefy::IsaChoice* choice = &moefy::default_isa();
    moefy::IsaChoice asked;
    if (so.HasConfigEntry(kIsaConfigKey)) {
      const std::string name = so.GetConfigEntry(kIsaConfigKey);
      asked = moefy::choose_isa(name.c_str());
      if (!asked.kernels) asked.error = std::string("session option ") + kIsaConfigKey + "=" + name + ": " +
                                        asked.error.substr(7);  // drops the "moefy: " prefix
      choice = &asked;
    }
    if (!choice->kernels) return api->CreateStatus(ORT_INVALID_ARGUMENT, choice->error.c_str());
    so.Add(domain_for(choice->kernels));
    so.Add(numba_domain());
    return nullptr;
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}

// Installs the Numba callbacks of the ai.moefy.numba op; returns an error message or null.
__attribute__((visibility("default"))) const char* moefy_set_numba_kernels(const moefy::numba_host::Kernels* k) {
  return moefy::numba_host::set_kernels(k);
}

// JSON of the instruction-set paths: {"best", "default", "default_error", "paths": [...]} (dispatch.cc).
__attribute__((visibility("default"))) const char* moefy_describe_isas() {
  thread_local std::string json;
  const moefy::IsaChoice& d = moefy::default_isa();
  std::string err;
  for (char ch : d.error) err += ch == '"' || ch == '\\' ? std::string("\\") + ch : std::string(1, ch);
  json = moefy::describe_isas();
  json.insert(json.size() - 1, std::string(",\"default\":\"") + (d.kernels ? d.kernels->name : "") +
                                   "\",\"default_error\":\"" + err + "\"");
  return json.c_str();
}

// JSON of the registered op, read back through the OrtCustomOp callbacks ONNX Runtime uses.
__attribute__((visibility("default"))) const char* moefy_describe_ops() {
  static std::string json;
  static std::once_flag once;
  std::call_once(once, [] {
    const OrtCustomOp& op = numba_hosted();  // every Op object describes the same schema
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
