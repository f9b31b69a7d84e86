// The C++ kernel core against a plain double-precision implementation of runtime/spec.py's math, with no
// ONNX Runtime involved, for every instruction-set path the CPU runs (or the one MOEFY_ISA forces), so that
// the paths a test machine lacks can be checked under qemu (tests/test_isa_paths.py).
//   kernel_check            every path this CPU runs, then the dispatcher's default
//   kernel_check --describe the dispatcher's view of this CPU (JSON)
// Prints "ok <path> N cases" per path and one line per failing case; exit code 1 on a failure, 2 when the
// forced path cannot run here (its message on stderr).
#include <algorithm>
#include <atomic>
#include <new>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <limits>
#include <vector>

#include "kernels/sparse_ffn.h"
#include "tests/rng.h"

// Every operator new of the process, to check that a call of the kernel allocates nothing once its scratch
// has grown (the kernel's std::vectors; packed weights use malloc directly, once per session).
static std::atomic<long> g_allocations{0};
void* operator new(std::size_t n) {
  ++g_allocations;
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

using moefy::Activation;
using moefy::SparseFFNProblem;
using moefy::WeightType;

namespace {

using moefy_test::Rng;

double act(Activation a, double z) {
  switch (a) {
    case Activation::kRelu: return z > 0 ? z : 0;
    case Activation::kGelu: return 0.5 * z * (1 + std::erf(z / std::sqrt(2.0)));
    case Activation::kGeluTanh: return 0.5 * z * (1 + std::tanh(std::sqrt(2 / M_PI) * (z + 0.044715 * z * z * z)));
    case Activation::kSilu: return z / (1 + std::exp(-z));
  }
  return z;
}

struct Case {
  int64_t T, d, E, m, k, min_k = 1;
  float threshold = -std::numeric_limits<float>::infinity();
  Activation a = Activation::kGelu;
  bool gated = false, int8 = false, scores_given = false, unselected = false, half = false;
};

// Row-scaled int8 copy of w ([rows, d]): q and one scale per row.
void quantize(const std::vector<float>& w, int64_t rows, int64_t d, std::vector<int8_t>& q, std::vector<float>& scale) {
  q.resize(w.size()), scale.resize(rows);
  for (int64_t r = 0; r < rows; ++r) {
    float mx = 0;
    for (int64_t i = 0; i < d; ++i) mx = std::max(mx, std::fabs(w[r * d + i]));
    scale[r] = mx > 0 ? mx / 127 : 1;
    for (int64_t i = 0; i < d; ++i) q[r * d + i] = static_cast<int8_t>(std::lround(w[r * d + i] / scale[r]));
  }
}

bool run(const Case& c, uint64_t seed, const moefy::IsaKernels& isa) {
  Rng rng{seed};
  const int64_t T = c.T, d = c.d, E = c.E, m = c.m, k = c.k;
  auto x = rng.vec(T * d, 1), w1 = rng.vec(E * m * d, 1 / std::sqrt(float(d))),
       w2 = rng.vec(E * m * d, 1 / std::sqrt(float(m))), b1 = rng.vec(E * m, 0.1f), b2 = rng.vec(d, 0.1f),
       rw = rng.vec(E * d, 1), rb = rng.vec(E, 0.1f), rs = rng.vec(T * E, 1), wg = rng.vec(E * m * d, 0.2f),
       bg = rng.vec(E * m, 0.1f), ub = rng.vec(E * d, 0.1f);
  std::vector<int8_t> w1q, w2q, wgq;
  std::vector<float> s1, s2, sg;
  if (c.int8) {  // the reference then uses the dequantized weights, as the spec defines them
    quantize(w1, E * m, d, w1q, s1), quantize(w2, E * m, d, w2q, s2), quantize(wg, E * m, d, wgq, sg);
    for (int64_t i = 0; i < E * m * d; ++i)
      w1[i] = w1q[i] * s1[i / d], w2[i] = w2q[i] * s2[i / d], wg[i] = wgq[i] * sg[i / d];
  }
  std::vector<moefy::Half> w1h, w2h, wgh;
  if (c.half) {  // the reference then uses the float16 values (exact in float32)
    auto to_half = [](std::vector<float>& w, std::vector<moefy::Half>& h) {
      h.resize(w.size());
      for (std::size_t i = 0; i < w.size(); ++i)
        h[i] = moefy::Half(moefy_test::float_to_half(w[i])), w[i] = moefy::half_to_float(h[i]);
    };
    to_half(w1, w1h), to_half(w2, w2h), to_half(wg, wgh);
  }
  auto weights = [&](const std::vector<float>& f, const std::vector<int8_t>& q, const std::vector<moefy::Half>& h) {
    return c.int8 ? static_cast<const void*>(q.data()) : c.half ? static_cast<const void*>(h.data()) : f.data();
  };
  SparseFFNProblem p;
  p.tokens = T, p.d = d, p.experts = E, p.m = m, p.top_k = k, p.min_k = c.min_k, p.score_threshold = c.threshold;
  p.weight_type = c.int8 ? WeightType::kInt8 : c.half ? WeightType::kFloat16 : WeightType::kFloat32;
  p.x = x.data(), p.b1 = b1.data(), p.b2 = b2.data(), p.activation = c.a;
  p.w1 = weights(w1, w1q, w1h), p.w2 = weights(w2, w2q, w2h);
  if (c.int8) p.w1_scale = s1.data(), p.w2_scale = s2.data();
  if (c.gated) {
    p.wg = weights(wg, wgq, wgh), p.bg = bg.data();
    if (c.int8) p.wg_scale = sg.data();
  }
  if (c.scores_given) p.router_scores = rs.data();
  else p.router_w = rw.data(), p.router_b = rb.data();
  if (c.unselected) p.unselected_bias = ub.data();
  std::vector<float> y(T * d);
  p.y = y.data();
  // 3 workers on one thread: the per-worker sums are exercised. The first call grows the scratch; the
  // second, on weights packed once as a session does, must allocate nothing.
  const moefy::PackedWeights packed = moefy::pack_weights(p, isa);
  moefy::sparse_ffn(p, packed, moefy::SerialFor(), 3);
  const long before = g_allocations.load();
  moefy::sparse_ffn(p, packed, moefy::SerialFor(), 3);
  const long allocated = g_allocations.load() - before;

  double worst = 0, scale = 0;
  int skipped = 0;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> s(E);
    for (int64_t e = 0; e < E; ++e) {
      if (c.scores_given) { s[e] = rs[t * E + e]; continue; }
      double acc = rb[e];
      for (int64_t i = 0; i < d; ++i) acc += double(x[t * d + i]) * rw[e * d + i];
      s[e] = acc;
    }
    std::vector<int64_t> order(E);
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return s[a] > s[b]; });
    // Float rounding may legitimately flip a near tie (or a score at the threshold): leave such tokens out.
    bool tie = k < E && std::fabs(s[order[k - 1]] - s[order[k]]) < 1e-4;
    for (int64_t e = 0; e < E; ++e) tie |= std::fabs(s[e] - c.threshold) < 1e-4;
    if (tie) { ++skipped; continue; }
    std::vector<bool> on(E, false);
    for (int64_t j = 0; j < k; ++j) on[order[j]] = j < c.min_k || !(s[order[j]] < c.threshold);
    std::vector<double> out(b2.begin(), b2.end());
    for (int64_t e = 0; e < E; ++e) {
      if (!on[e]) {
        for (int64_t i = 0; i < d && c.unselected; ++i) out[i] += ub[e * d + i];
        continue;
      }
      for (int64_t j = 0; j < m; ++j) {
        const int64_t row = (e * m + j) * d;
        double u = b1[e * m + j], g = bg[e * m + j];
        for (int64_t q = 0; q < d; ++q) u += double(w1[row + q]) * x[t * d + q];
        if (c.gated)
          for (int64_t q = 0; q < d; ++q) g += double(wg[row + q]) * x[t * d + q];
        const double h = c.gated ? act(c.a, g) * u : act(c.a, u);
        for (int64_t i = 0; i < d; ++i) out[i] += h * w2[row + i];
      }
    }
    for (int64_t i = 0; i < d; ++i) {
      worst = std::max(worst, std::fabs(out[i] - y[t * d + i]));
      scale = std::max(scale, std::fabs(out[i]));
    }
  }
  const bool ok = worst <= 2e-5 * scale + 1e-6 && (skipped < T || T == 0) && allocated == 0;
  if (!ok)
    std::printf("FAIL %s T=%lld d=%lld E=%lld m=%lld k=%lld min_k=%lld act=%d gated=%d int8=%d half=%d: max err %.3g (scale %.3g, "
                "%d tokens skipped, %ld allocations in a repeated call)\n", isa.name, (long long)T, (long long)d, (long long)E, (long long)m, (long long)k,
                (long long)c.min_k, int(c.a), c.gated, c.int8, c.half, worst, scale, skipped, allocated);
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--describe") {
    std::printf("%s\n", moefy::describe_isas().c_str());
    return 0;
  }
  std::vector<Case> cases;
  for (int a = 0; a < 4; ++a)
    for (bool gated : {false, true})
      for (bool int8 : {false, true}) cases.push_back({19, 40, 8, 7, 3, 1, -INFINITY, Activation(a), gated, int8});
  cases.push_back({1, 33, 5, 17, 5});                                  // one token, k = E, vector tails
  cases.push_back({0, 24, 4, 8, 2});                                   // no tokens
  cases.push_back({130, 64, 8, 16, 8, 1, -INFINITY, Activation::kGelu, false, false, false, true});  // 3 blocks
  cases.push_back({70, 384, 32, 48, 8, 1, -INFINITY, Activation::kGelu, false, false, false, true});  // MiniLM
  cases.push_back({70, 384, 32, 48, 8, 1, -INFINITY, Activation::kGelu, false, true, false, true});   // int8
  cases.push_back({3, 576, 32, 48, 8, 1, -INFINITY, Activation::kSilu, true, false});                 // SmolLM2
  cases.push_back({1, 576, 32, 48, 8, 1, -INFINITY, Activation::kSilu, true, true});                  // decode int8
  cases.push_back({40, 48, 16, 8, 6, 2, 0.3f, Activation::kGelu, false, false, true, true});         // dynamic k
  cases.push_back({40, 48, 16, 8, 6, 1, 0.0f, Activation::kSilu, true, true, false, true});          // dynamic, int8
  // Narrow experts (dot-product first layer, one-loop second layer, prefetch of the next expert): MiniLM's 128 x 12
  // over many blocks; tails of d (33, 44: not a multiple of 8 or 16); odd m; m = 24 (AVX-512 only); one token.
  cases.push_back({70, 384, 128, 12, 28, 1, -INFINITY, Activation::kGelu, false, false, false, true});
  cases.push_back({70, 384, 128, 12, 28, 1, -INFINITY, Activation::kGelu, false, true, false, true});  // int8
  cases.push_back({9, 576, 64, 24, 16, 1, -INFINITY, Activation::kSilu, true, false});
  cases.push_back({1, 576, 64, 24, 16, 1, -INFINITY, Activation::kSilu, true, true});
  // float16 experts: plain and gated, wide and narrow, one token, d tails (33: columns no panel covers).
  for (bool gated : {false, true}) {
    cases.push_back({70, 384, 32, 48, 8, 1, -INFINITY, Activation::kGelu, gated, false, false, true, true});
    cases.push_back({70, 384, 256, 6, 64, 1, -INFINITY, Activation::kGelu, gated, false, false, true, true});
    cases.push_back({1, 576, 64, 24, 16, 1, -INFINITY, Activation::kSilu, gated, false, false, false, true});
    cases.push_back({13, 33, 12, 11, 5, 1, -INFINITY, Activation::kGelu, gated, false, false, true, true});
  }
  for (int64_t d : {33, 44})
    for (bool gated : {false, true}) cases.push_back({13, d, 12, 11, 5, 1, -INFINITY, Activation::kGelu, gated, d == 44});
  std::vector<const moefy::IsaKernels*> paths;
  if (const char* forced = std::getenv("MOEFY_ISA"); forced && *forced) {
    const moefy::IsaChoice& c = moefy::default_isa();
    if (!c.kernels) {
      std::fprintf(stderr, "%s\n", c.error.c_str());
      return 2;
    }
    paths.push_back(c.kernels);
  } else {
    for (const char* name : {"avx512", "avx2", "sse41", "sse2", "neon", "generic"})
      if (const moefy::IsaChoice c = moefy::choose_isa(name); c.kernels) paths.push_back(c.kernels);
  }
  int failed = 0;
  for (const moefy::IsaKernels* isa : paths) {
    uint64_t seed = 1;
    int path_failed = 0;
    for (const Case& c : cases) path_failed += !run(c, seed++, *isa);
    if (!path_failed) std::printf("ok %s %zu cases\n", isa->name, cases.size());
    failed += path_failed;
  }
  std::printf("default %s\n", moefy::default_isa().kernels ? moefy::default_isa().kernels->name : "none");
  return failed ? 1 : 0;
}
