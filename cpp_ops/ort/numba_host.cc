#include "numba_host.h"

#include <atomic>
#include <cstring>
#include <vector>

#include "moefy_spec.h"

namespace moefy::numba_host {
namespace {
std::atomic<const Kernels*> g_kernels{nullptr};
constexpr int64_t kCallLen = spec::kNumHostFields + static_cast<int64_t>(spec::kNumInputs);
static_assert(sizeof(void*) == sizeof(int64_t), "the host ABI passes addresses as int64");
}  // namespace

const char* set_kernels(const Kernels* k) {
  if (!k || !k->scratch_bytes || !k->route || !k->plan || !k->experts || !k->reduce) return "incomplete kernel table";
  if (k->abi_version != spec::kNumbaHostAbiVersion || k->call_len != kCallLen)
    return "kernel table from another moefy version (ABI or call layout differs): reinstall moefy";
  g_kernels.store(k);
  return nullptr;
}

bool have_kernels() { return g_kernels.load() != nullptr; }

void run(const SparseFFNProblem& p, const void* const* inputs, const ParallelFor& pfor, std::size_t workers) {
  const Kernels* k = g_kernels.load();
  if (p.tokens == 0) return;
  int64_t call[kCallLen] = {};
  call[spec::kHost_tokens] = p.tokens, call[spec::kHost_d] = p.d, call[spec::kHost_experts] = p.experts;
  call[spec::kHost_m] = p.m, call[spec::kHost_top_k] = p.top_k, call[spec::kHost_min_k] = p.min_k;
  const double threshold = p.score_threshold;  // passed as the bits of a float64
  std::memcpy(&call[spec::kHost_score_threshold], &threshold, sizeof threshold);
  call[spec::kHost_activation] = static_cast<int64_t>(p.activation);
  call[spec::kHost_workers] = static_cast<int64_t>(workers);
  call[spec::kHost_weight_int8] = p.weight_type == WeightType::kInt8;
  call[spec::kHost_y] = reinterpret_cast<int64_t>(p.y);
  for (std::size_t i = 0; i < spec::kNumInputs; ++i)
    call[spec::kNumHostFields + i] = reinterpret_cast<int64_t>(inputs[i]);
  // Reused per calling thread: a fresh allocation would page-fault its way in on every call.
  thread_local std::vector<std::max_align_t> scratch;
  const int64_t bytes = k->scratch_bytes(call);
  scratch.resize(static_cast<std::size_t>(bytes) / sizeof(std::max_align_t) + 1);
  call[spec::kHost_scratch] = reinterpret_cast<int64_t>(scratch.data());

  const int64_t parts = static_cast<int64_t>(workers);
  auto route = [&](std::size_t i) { k->route(call, static_cast<int64_t>(i), parts); };
  auto experts = [&](std::size_t w) { k->experts(call, static_cast<int64_t>(w)); };
  auto reduce = [&](std::size_t i) { k->reduce(call, static_cast<int64_t>(i), parts); };
  pfor(workers, TaskRef(route));
  const int64_t busy = k->plan(call);
  pfor(static_cast<std::size_t>(busy), TaskRef(experts));
  if (busy > 1) pfor(workers, TaskRef(reduce));
}

}  // namespace moefy::numba_host
