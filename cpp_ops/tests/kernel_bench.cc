// Times the kernel core alone, one thread, no ONNX Runtime or Python in the process: the harness to profile
// the hot loops under `perf record` (built with MOEFY_KERNEL_CHECK=ON, beside kernel_check).
//   kernel_bench ISA EXPERTS M D TOKENS TOP_K [SECONDS] [gated] [int8|f16]
// Random weights and inputs (8 inputs taken in turn, so the chosen experts change call to call); prints the
// median and minimum microseconds per call.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels/sparse_ffn.h"
#include "tests/rng.h"


int main(int argc, char** argv) {
  if (argc < 7) {
    std::fprintf(stderr, "usage: %s ISA EXPERTS M D TOKENS TOP_K [SECONDS] [gated] [int8|f16]\n", argv[0]);
    return 2;
  }
  const moefy::IsaChoice isa = moefy::choose_isa(argv[1]);
  if (!isa.kernels) {
    std::fprintf(stderr, "%s\n", isa.error.c_str());
    return 2;
  }
  const int64_t E = std::atol(argv[2]), m = std::atol(argv[3]), d = std::atol(argv[4]), T = std::atol(argv[5]),
                k = std::atol(argv[6]);
  const double seconds = argc > 7 ? std::atof(argv[7]) : 2.0;
  if (E < 1 || m < 1 || d < 1 || T < 1 || k < 1 || k > E || !(seconds > 0)) {
    std::fprintf(stderr, "need EXPERTS, M, D, TOKENS >= 1, 1 <= TOP_K <= EXPERTS and SECONDS > 0\n");
    return 2;
  }
  bool gated = false, int8 = false, half = false;
  for (int i = 8; i < argc; ++i)
    gated |= !std::strcmp(argv[i], "gated"), int8 |= !std::strcmp(argv[i], "int8"), half |= !std::strcmp(argv[i], "f16");
  moefy_test::Rng rng{42};
  const float s1 = 1.f / std::sqrt(static_cast<float>(d)), s2 = 1.f / std::sqrt(static_cast<float>(E * m));
  std::vector<float> w1 = rng.vec(E * m * d, s1), w2 = rng.vec(E * m * d, s2), wg = rng.vec(E * m * d, s1),
                     b1 = rng.vec(E * m, 0.1f), b2 = rng.vec(d, 0.1f), rw = rng.vec(E * d, s1), y(T * d);
  std::vector<int8_t> q1(E * m * d), q2(E * m * d), qg(E * m * d);
  std::vector<moefy::Half> h1(E * m * d), h2(E * m * d), hg(E * m * d);
  std::vector<float> sc1(E * m), sc2(E * m), scg(E * m);
  auto quantize = [&](const std::vector<float>& w, std::vector<int8_t>& q, std::vector<float>& sc) {
    for (int64_t r = 0; r < E * m; ++r) {
      float mx = 1e-12f;
      for (int64_t i = 0; i < d; ++i) mx = std::max(mx, std::fabs(w[r * d + i]));
      sc[r] = mx / 127.f;
      for (int64_t i = 0; i < d; ++i) q[r * d + i] = static_cast<int8_t>(std::lround(w[r * d + i] / sc[r]));
    }
  };
  std::vector<std::vector<float>> xs;
  for (int i = 0; i < 8; ++i) xs.push_back(rng.vec(T * d, 1.f));
  moefy::SparseFFNProblem p;
  p.tokens = T, p.d = d, p.experts = E, p.m = m, p.top_k = k;
  p.b1 = b1.data(), p.b2 = b2.data(), p.router_w = rw.data(), p.y = y.data();
  p.activation = gated ? moefy::Activation::kSilu : moefy::Activation::kGelu;
  if (int8) {
    quantize(w1, q1, sc1), quantize(w2, q2, sc2), quantize(wg, qg, scg);
    p.weight_type = moefy::WeightType::kInt8;
    p.w1 = q1.data(), p.w2 = q2.data(), p.w1_scale = sc1.data(), p.w2_scale = sc2.data();
    if (gated) p.wg = qg.data(), p.wg_scale = scg.data();
  } else if (half) {
    for (int64_t i = 0; i < E * m * d; ++i)
      h1[i] = moefy::Half(moefy_test::float_to_half(w1[i])), h2[i] = moefy::Half(moefy_test::float_to_half(w2[i])),
      hg[i] = moefy::Half(moefy_test::float_to_half(wg[i]));
    p.weight_type = moefy::WeightType::kFloat16;
    p.w1 = h1.data(), p.w2 = h2.data();
    if (gated) p.wg = hg.data();
  } else {
    p.w1 = w1.data(), p.w2 = w2.data();
    if (gated) p.wg = wg.data();
  }
  const moefy::PackedWeights packed = moefy::pack_weights(p, *isa.kernels);
  moefy::SerialFor serial;
  std::vector<double> us;
  using clock = std::chrono::steady_clock;
  const auto end = clock::now() + std::chrono::duration<double>(seconds);
  for (int64_t i = 0; i < 20 || clock::now() < end; ++i) {
    p.x = xs[i % 8].data();
    const auto t0 = clock::now();
    moefy::sparse_ffn(p, packed, serial, 1);
    const double t = std::chrono::duration<double, std::micro>(clock::now() - t0).count();
    if (i >= 20) us.push_back(t);
  }
  std::sort(us.begin(), us.end());
  std::printf("%s E=%ld m=%ld d=%ld T=%ld k=%ld%s%s: median %.1f us, min %.1f us, %zu calls\n", argv[1],
              static_cast<long>(E), static_cast<long>(m), static_cast<long>(d), static_cast<long>(T),
              static_cast<long>(k), gated ? " gated" : "", int8 ? " int8" : half ? " f16" : "", us[us.size() / 2], us[0], us.size());
  return 0;
}
