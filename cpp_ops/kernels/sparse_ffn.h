// SparseExpertFFN kernel core: raw pointers only, no ONNX Runtime headers, so it can be
// tested and reused alone. The math is specified in runtime/spec.py and docs/OPS.md.
//
// Layout: driver.cc (routing, top-k, grouping tokens by expert, scheduling, per-thread scratch) is plain
// C++ built for the baseline of the target architecture; the hot loops (simd_impl.h) are compiled once per
// instruction set (isa_*.cc, each with its own target flags and register tile) and reached through an
// IsaKernels table that dispatch.cc picks once from the CPU's features (or MOEFY_ISA). So one library runs on
// any CPU of its architecture, at the speed of the widest vector unit the CPU has.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <type_traits>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace moefy {

// Same order as runtime/spec.py ACTIVATIONS (checked by the ORT binding at load time).
enum class Activation : int { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };

// Element type of the expert weights W1, W2, Wg (one for all three). int8 rows carry a float scale each.
enum class WeightType : int { kFloat32 = 0, kInt8 = 1, kFloat16 = 2 };

// An IEEE binary16 number as stored (its bits): float16 experts are half the bytes of float32 ones, and the
// float32 they widen to is exact, so they compute the same sums as the float32 weights of those values.
enum class Half : uint16_t {};

// static: each translation unit keeps its own copy. The isa_*.cc units are built with wider target flags (VEX or
// EVEX encodings even for scalar code), and an inline function's copies are merged by the linker, which could hand
// the SSE2 path's packing (driver.cc) an AVX-512 build of it.
static inline float half_to_float(Half h) {
  const uint32_t x = static_cast<uint16_t>(h), sign = (x & 0x8000u) << 16, exp = (x >> 10) & 0x1fu, man = x & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | man << 13;  // inf, NaN
  } else if (exp) {
    bits = sign | (exp + 112) << 23 | man << 13;  // rebias 15 -> 127
  } else {
    const float f = static_cast<float>(man) * 5.9604644775390625e-8f;  // subnormal (or zero): man * 2^-24, exact
    std::memcpy(&bits, &f, sizeof bits);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

struct SparseFFNProblem {
  int64_t tokens = 0, d = 0, experts = 0, m = 0, top_k = 0;
  // Dynamic k: of a token's top_k experts, those after the first min_k scoring below the threshold are dropped.
  int64_t min_k = 1;
  float score_threshold = -std::numeric_limits<float>::infinity();
  WeightType weight_type = WeightType::kFloat32;
  const float* x = nullptr;               // [T, d]
  const void* w1 = nullptr;               // [E, m, d] of weight_type (float, int8_t or Half)
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

// A non-owning reference to a callable taking a work-item index: unlike std::function it never allocates,
// so a call of the kernel does no heap allocation once its scratch has grown to the call's size.
class TaskRef {
 public:
  template <typename F, typename = std::enable_if_t<!std::is_same_v<std::decay_t<F>, TaskRef>>>
  TaskRef(F& f) : obj_(&f), call_([](void* o, std::size_t i) { (*static_cast<F*>(o))(i); }) {}  // NOLINT
  void operator()(std::size_t i) const { call_(obj_, i); }
  // For C thread pools taking (void (*)(void*, size_t), void*): pass &TaskRef::invoke and the TaskRef's address.
  static void invoke(void* self, std::size_t i) { (*static_cast<const TaskRef*>(self))(i); }

 private:
  void* obj_;
  void (*call_)(void*, std::size_t);
};

// Runs fn(i) for i in [0, n), possibly in parallel. The ORT binding passes ONNX Runtime's own thread pool
// so the kernel never starts a second pool that would fight it.
class ParallelFor {
 public:
  virtual ~ParallelFor() = default;
  virtual void operator()(std::size_t n, TaskRef fn) const = 0;
};

// Serial fallback (tests, hosts without a thread pool).
class SerialFor final : public ParallelFor {
 public:
  void operator()(std::size_t n, TaskRef fn) const override {
    for (std::size_t i = 0; i < n; ++i) fn(i);
  }
};

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

// Tokens per expert block: bounds scratch memory and gives workers balanced pieces.
inline constexpr int64_t kTokenBlock = 64;

// The packed layout as the hot loops see it (plain data). Expert blocks are repacked once per session (for
// constant weights) into contiguous panels of `panel` columns (then one of the remaining columns), so both
// layers stream memory sequentially: first layer (and gate) [d x mp] with panels over neurons (mp = m rounded up to
// `lanes`, zero padded); second layer [m x dl] with panels over the first dl = lanes * floor(d / lanes) output
// columns (the rest is read from W2 directly); expert e's blocks start at w1p / wgp / w2p + e * expert_stride
// (one expert's three blocks are adjacent). Router [d x ep] over experts (ep = E rounded up to `lanes`).
// Panels keep the weights' element type (int8 panels are a quarter of the bytes); scales apply outside.
// Narrow experts (m <= IsaKernels::dot_max_m) store the first layer (and gate) instead as dot-product rows,
// [ceil(d / lanes)][m][lanes]: lanes-wide pieces of each neuron's weight row, the m neurons' pieces of one
// stretch of d side by side (zero beyond d), so the layer is one forward stream without padded neurons.
struct PackedView {
  int64_t panel = 0, lanes = 0, mp = 0, dl = 0, ep = 0, expert_stride = 0;
  bool dot = false;  // first layer (and gate) as dot-product rows (narrow experts), else panels
  int64_t prefetch_few = 0;  // bytes ahead that panel blocks of few tokens prefetch (IsaKernels::prefetch_few)
  const float* routerp = nullptr;
  const void* w1p = nullptr;  // of the problem's weight type
  const void* wgp = nullptr;
  const void* w2p = nullptr;
};

// Per-thread scratch of one expert block (driver.cc owns it; sized for kTokenBlock tokens).
struct BlockScratch {
  float* up;            // [kTokenBlock, mp]
  float* gate;          // [kTokenBlock, mp] (gated form)
  const float** a;      // [kTokenBlock] row pointers
  float** out;          // [kTokenBlock]
  float** h;            // [kTokenBlock]
  float** shifted;      // [kTokenBlock]
};

// The hot loops of one instruction set (simd_impl.h compiled per ISA).
struct IsaKernels {
  const char* name;      // as MOEFY_ISA spells it: "avx512", "avx2", "sse2", "neon", "generic"
  const char* tile;      // the register tile, for reports: e.g. "8x48"
  int64_t lanes, panel;  // floats per vector; widest panel (columns)
  // Experts of at most this many neurons compute their first layer (and gate) as dot products (PackedView::dot):
  // a panel of one or two vectors per row gives a few tokens too few accumulators to hide the FMA latency.
  int64_t dot_max_m;
  // How far ahead (bytes) blocks of fewer than 16 tokens prefetch the packed stream on the panel path (0: left to
  // the hardware prefetcher), on Intel and other CPUs, and on AMD ones (cpu_is_amd): the CPUs differ.
  int64_t prefetch_few, prefetch_few_amd;
  // Whether float16 panels are widened as they are loaded (F16C, AVX-512, NEON); without it, packing widens
  // float16 experts to float32 once (the same numbers at twice the bytes).
  bool half_loads;
  // out[tokens[r]] += expert e's output for token tokens[r] (minus its unselected_bias), r < n <= kTokenBlock.
  // next_e: the expert of the block scheduled next (or -1), whose weights the narrow path prefetches.
  void (*expert_block)(const SparseFFNProblem& p, const PackedView& pk, int64_t e, const int32_t* tokens,
                       int64_t n, float* out, const BlockScratch& s, int64_t next_e);
  // scores[r * ld + e] = router_w[e] . x[t0 + r] + router_b[e], r < n <= kTokenBlock, on the packed router.
  void (*router_scores)(const SparseFFNProblem& p, const PackedView& pk, int64_t t0, int64_t n, float* scores,
                        const BlockScratch& s);
  // Top-k's two loops over a token's scores, vectorised: u[e] = the order key of row[e] (driver.cc: order_key),
  // and how many of u[0, n) are >= t.
  void (*order_keys)(const float* row, int64_t n, uint32_t* u);
  int64_t (*count_at_least)(const uint32_t* u, int64_t n, uint32_t t);
  void (*activate)(Activation a, float* v, int64_t n);  // in place
  void (*add)(float* y, const float* x, int64_t n);    // y += x
};

// Whether the CPU is AMD's (cpuid vendor string): a few tunings differ between AMD's and Intel's prefetchers.
bool cpu_is_amd();

// Instruction-set paths: which were compiled in, which this CPU runs, which one runs by default.
struct IsaChoice {
  const IsaKernels* kernels = nullptr;  // null: error says why
  std::string error;
};
// The path for `request`: null, "" or "auto" for the best this CPU runs, else a name of IsaKernels::name.
// A path this CPU cannot run (or that was not compiled in) is an error naming the missing features and the
// paths that would run, never an illegal instruction.
IsaChoice choose_isa(const char* request);
// The default: MOEFY_ISA if set (an error if it cannot run), else the best path. Resolved once per process.
const IsaChoice& default_isa();
// {"best": ..., "paths": [{"name", "tile", "compiled", "runs", "missing"}, ...]} for tests and reports.
std::string describe_isas();

// The packed weights, owning their storage.
struct PackedWeights {
  const IsaKernels* isa = nullptr;
  PackedView view;
  WeightType weight_type = WeightType::kFloat32;  // of the panels: float16 experts widened at packing are kFloat32
  std::vector<float> widened_w2;  // float16 W2 widened (then only), for the columns the panels leave out
  // B2 + sum_e U[e]: the output every token starts from, precomputed when B2 / U were given at packing
  // (initializers); used when the call passes the same pointers.
  std::vector<float> base;
  const float *base_b2 = nullptr, *base_unselected = nullptr;
  bool has_base = false;
  HugeVector<float> routerp_storage, experts_f;
  HugeVector<int8_t> experts_q;
  HugeVector<Half> experts_h;
};
// Reads p.w1, p.wg, p.w2, p.router_w, p.b2, p.unselected_bias, E, m, d.
PackedWeights pack_weights(const SparseFFNProblem& p, const IsaKernels& isa);

// y = SparseExpertFFN(p). Shapes must already be validated; `workers` bounds the number of per-worker
// output accumulators (use the thread count of the pool behind `pfor`). Allocates only when a call needs
// more scratch than any before it on this thread.
void sparse_ffn(const SparseFFNProblem& p, const PackedWeights& packed, const ParallelFor& pfor,
                std::size_t workers);
// Same, packing the weights for this call only.
void sparse_ffn(const SparseFFNProblem& p, const IsaKernels& isa, const ParallelFor& pfor, std::size_t workers);

}  // namespace moefy
