// SparseExpertFFN kernel core: raw pointers only, no ONNX Runtime headers, so it can be
// tested and reused alone. The math is specified in runtime/spec.py and docs/OPS.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <new>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace moefy {

// Same order as runtime/spec.py ACTIVATIONS (checked by the ORT binding at load time).
enum class Activation : int { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };

// Element type of the expert weights W1, W2, Wg (one for all three). int8 rows carry a float scale each.
enum class WeightType : int { kFloat32 = 0, kInt8 = 1 };

struct SparseFFNProblem {
  int64_t tokens = 0, d = 0, experts = 0, m = 0, top_k = 0;
  // Dynamic k: of a token's top_k experts, those after the first min_k scoring below the threshold are dropped.
  int64_t min_k = 1;
  float score_threshold = -std::numeric_limits<float>::infinity();
  WeightType weight_type = WeightType::kFloat32;
  const float* x = nullptr;               // [T, d]
  const void* w1 = nullptr;               // [E, m, d] of weight_type
  const float* b1 = nullptr;              // [E, m] or null
  const void* w2 = nullptr;               // [E, m, d] of weight_type
  const float* b2 = nullptr;              // [d] or null
  const float* router_w = nullptr;        // [E, d] or null (then router_scores)
  const float* router_b = nullptr;        // [E] or null
  const float* router_scores = nullptr;   // [T, E] or null
  const void* wg = nullptr;               // [E, m, d] of weight_type or null (plain form)
  const float* bg = nullptr;              // [E, m] or null
  const float* unselected_bias = nullptr; // [E, d] or null
  const float* w1_scale = nullptr;        // [E, m] row scales, int8 weights only
  const float* w2_scale = nullptr;
  const float* wg_scale = nullptr;
  Activation activation = Activation::kGelu;
  float* y = nullptr;                     // [T, d]
};

// Runs fn(i) for i in [0, n), possibly in parallel. The ORT binding passes ONNX Runtime's
// own thread pool so the kernel never starts a second pool that would fight it.
using ParallelFor = std::function<void(std::size_t n, const std::function<void(std::size_t)>& fn)>;

// Serial fallback (tests, hosts without a thread pool).
void serial_for(std::size_t n, const std::function<void(std::size_t)>& fn);


// Storage of the packed weights: large buffers are 2 MiB aligned and asked to be backed by transparent huge
// pages (Linux, THP "madvise" mode), so streaming tens of MB of weights per call misses the TLB 512x less often.
template <typename T>
struct HugePageAllocator {
  using value_type = T;
  static constexpr std::size_t kHuge = std::size_t{2} << 20;
  HugePageAllocator() = default;
  template <typename U>
  HugePageAllocator(const HugePageAllocator<U>&) {}
  T* allocate(std::size_t n) {
    const std::size_t bytes = n * sizeof(T);
    if (bytes < kHuge) {
      if (void* p = std::malloc(bytes ? bytes : 1)) return static_cast<T*>(p);
      throw std::bad_alloc();
    }
    const std::size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = std::aligned_alloc(kHuge, rounded);
    if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, rounded, MADV_HUGEPAGE);  // advisory: without THP the buffer is simply 4 KiB pages
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { std::free(p); }
  template <typename U>
  bool operator==(const HugePageAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const HugePageAllocator<U>&) const { return false; }
};
template <typename T>
using HugeVector = std::vector<T, HugePageAllocator<T>>;

// Expert blocks repacked once per session (for constant weights) into contiguous panels of 48 or 16
// columns, so both layers stream memory sequentially: first layer (and gate) [E][d x mp] with panels
// over neurons (mp = m rounded up to 16, zero padded); second layer [E][m x d16] with panels over the
// first d16 = 16 * floor(d / 16) output columns (the rest is read from W2 directly). Panels keep the
// weights' element type (int8 panels are a quarter of the bytes); scales apply outside the panels.
struct PackedWeights {
  int64_t mp = 0, d16 = 0, ep = 0;  // ep: experts rounded up to 16 (router panels)
  WeightType weight_type = WeightType::kFloat32;
  const float* routerp = nullptr;
  const void* w1p = nullptr;  // of weight_type
  const void* wgp = nullptr;
  const void* w2p = nullptr;
  HugeVector<float> routerp_storage, w1f, wgf, w2f;
  HugeVector<int8_t> w1q, wgq, w2q;
};
PackedWeights pack_weights(const SparseFFNProblem& p);  // reads p.w1, p.wg, p.w2, p.router_w, E, m, d

// Top-k expert indices of tokens [t_begin, t_end) into selected[t * k ...]: larger score first, ties to
// the lower index, NaN ranks below every number; -1 for experts dynamic k drops. Uses the packed router
// when `packed` has one.
void select_top_k(const SparseFFNProblem& p, const PackedWeights& packed, int64_t t_begin, int64_t t_end,
                  int32_t* selected);

// y = SparseExpertFFN(p). Shapes must already be validated; `workers` bounds the number of
// per-worker output accumulators (use the thread count of the pool behind `pfor`).
void sparse_ffn(const SparseFFNProblem& p, const PackedWeights& packed, const ParallelFor& pfor,
                std::size_t workers);
// Same, packing the weights for this call only.
void sparse_ffn(const SparseFFNProblem& p, const ParallelFor& pfor, std::size_t workers);

// Applies the activation in place to n floats.
void activate(Activation a, float* v, std::size_t n);

}  // namespace moefy
