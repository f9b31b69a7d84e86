// SparseExpertFFN kernel core. Tokens are grouped by expert so each expert's two weight blocks
// (contiguous [m, d] rows) are read once per call, not once per token; workers pull experts
// from a shared counter (heaviest first) and accumulate into their own output buffer, so no
// atomics touch the output and no token is written by two workers at once.
#include "sparse_ffn.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace moefy {
namespace {

// 8 floats through GCC/Clang vector extensions: AVX with -mavx2, two NEON registers on ARM.
typedef float v8f __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32), aligned(4)));

inline v8f load8(const float* p) { v8f v; std::memcpy(&v, p, sizeof v); return v; }
// 16 floats: one AVX-512 register, two AVX2 or four NEON registers.
typedef float v16f __attribute__((vector_size(64), aligned(4)));
inline v16f load16(const float* p) { v16f v; std::memcpy(&v, p, sizeof v); return v; }
inline void store16(float* p, v16f v) { std::memcpy(p, &v, sizeof v); }
inline v16f splat16(float s) { return v16f{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }
typedef int32_t v16i __attribute__((vector_size(64), aligned(4)));
// 16 int8 weights widened to floats: int8 panels cost a quarter of the memory traffic for two extra
// instructions per 16 weights. Intrinsics, because GCC 12 lowers a vector-extension int8 -> float
// conversion to scalar ones.
inline v16f load16(const int8_t* p) {
  v16f out;
#if defined(__AVX512F__)
  __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  std::memcpy(&out, &f, sizeof out);
#elif defined(__AVX2__)
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
  std::memcpy(&out, &lo, sizeof lo);
  std::memcpy(reinterpret_cast<char*>(&out) + sizeof lo, &hi, sizeof hi);
#else
  for (int i = 0; i < 16; ++i) out[i] = static_cast<float>(p[i]);
#endif
  return out;
}

inline float hsum(v8f v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

// exp for 16 lanes (Cephes polynomial, ~1 ulp on the clamped range).
inline v16f exp16(v16f x) {
  x = x < splat16(88.3762626647949f) ? x : splat16(88.3762626647949f);
  x = x > splat16(-87.3365478515625f) ? x : splat16(-87.3365478515625f);
  v16f fx = x * splat16(1.44269504088896341f) + splat16(0.5f);
  v16i n = __builtin_convertvector(fx, v16i);
  n += (__builtin_convertvector(n, v16f) > fx);  // truncation -> floor (true lanes are -1)
  v16f nf = __builtin_convertvector(n, v16f);
  v16f r = x - nf * splat16(0.693359375f) + nf * splat16(2.12194440e-4f);
  v16f p = splat16(1.9875691500e-4f);
  p = p * r + splat16(1.3981999507e-3f);
  p = p * r + splat16(8.3334519073e-3f);
  p = p * r + splat16(4.1665795894e-2f);
  p = p * r + splat16(1.6666665459e-1f);
  p = p * r + splat16(5.0000001201e-1f);
  p = p * r * r + r + splat16(1.f);
  v16i bits = (n + 127) << 23;
  v16f scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7).
inline v16f erf16(v16f x) {
  v16f ax = x < splat16(0.f) ? -x : x;
  v16f t = splat16(1.f) / (splat16(1.f) + splat16(0.3275911f) * ax);
  v16f poly = splat16(1.061405429f);
  poly = poly * t + splat16(-1.453152027f);
  poly = poly * t + splat16(1.421413741f);
  poly = poly * t + splat16(-0.284496736f);
  poly = poly * t + splat16(0.254829592f);
  v16f e = splat16(1.f) - poly * t * exp16(-ax * ax);
  return x < splat16(0.f) ? -e : e;
}

inline v16f activate16(Activation a, v16f z) {
  switch (a) {
    case Activation::kRelu:
      return z > splat16(0.f) ? z : splat16(0.f);
    case Activation::kGelu:
      return splat16(0.5f) * z * (splat16(1.f) + erf16(z * splat16(0.70710678118654752f)));
    case Activation::kGeluTanh: {
      v16f u = splat16(0.7978845608028654f) * (z + splat16(0.044715f) * z * z * z);
      v16f tanh_u = splat16(1.f) - splat16(2.f) / (exp16(u + u) + splat16(1.f));
      return splat16(0.5f) * z * (splat16(1.f) + tanh_u);
    }
    case Activation::kSilu:
      return z / (splat16(1.f) + exp16(-z));
  }
  return z;
}

// out[a * m + b] = bias[b] + <x[a], w[b]> for an TB x JB block (inner products along d).
// Used for router scores, where E is small and the rows are not repacked.
template <int TB, int JB>
inline void dot_block(const float* x, const float* w, const float* bias, int64_t d, float* out, int64_t m) {
  v8f acc[TB][JB] = {};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    v8f wv[JB];
    for (int b = 0; b < JB; ++b) wv[b] = load8(w + b * d + i);
    for (int a = 0; a < TB; ++a) {
      v8f xv = load8(x + a * d + i);
      for (int b = 0; b < JB; ++b) acc[a][b] += xv * wv[b];
    }
  }
  for (int a = 0; a < TB; ++a)
    for (int b = 0; b < JB; ++b) {
      float s = hsum(acc[a][b]);
      for (int64_t r = i; r < d; ++r) s += x[a * d + r] * w[b * d + r];
      out[a * m + b] = s + (bias ? bias[b] : 0.f);
    }
}

// h[n, m] = x[n, d] . w[m, d]^T + bias
void dot_rows(const float* x, int64_t n, const float* w, const float* bias, int64_t d, int64_t m, float* h) {
  for (int64_t t = 0; t < n; ++t) {
    int64_t j = 0;
    for (; j + 3 <= m; j += 3) dot_block<1, 3>(x + t * d, w + j * d, bias ? bias + j : nullptr, d, h + t * m + j, m);
    for (; j < m; ++j) dot_block<1, 1>(x + t * d, w + j * d, bias ? bias + j : nullptr, d, h + t * m + j, m);
  }
}

// Both layers are the same product on packed panels: out[t][0:w] (+)= sum_r a[t][r] * P[r][0:w], with P a
// contiguous [rows, w] panel (w = 48 or 16), a[t][r] broadcast. Layer 1: rows = d, a = x, w = a chunk of
// neurons. Layer 2: rows = m, a = h, w = a chunk of output columns. Contiguous panels stream from memory
// (no page-sized strides) and stay in cache while every token group of the expert uses them.
template <int TB, int V, typename Wt>
inline void panel_block(const float* const* a, int64_t r0, int64_t rows, const Wt* panel, float* const* out,
                        bool accumulate, const char* prefetch, int64_t prefetch_per_row) {
  v16f acc[TB][V];
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < V; ++v) acc[t][v] = accumulate ? load16(out[t] + 16 * v) : v16f{};
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t q = 0; q < prefetch_per_row; ++q) __builtin_prefetch(prefetch + (r * prefetch_per_row + q) * 64);
    v16f w[V];
    for (int v = 0; v < V; ++v) w[v] = load16(panel + r * 16 * V + 16 * v);
    for (int t = 0; t < TB; ++t) {
      v16f av = splat16(a[t][r0 + r]);
      for (int v = 0; v < V; ++v) acc[t][v] += av * w[v];
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < V; ++v) store16(out[t] + 16 * v, acc[t][v]);
}

// Rows per step. Panels stream from memory once per expert; while the token groups compute on one step's
// rows they prefetch the next step's, spread over the groups, so memory traffic overlaps the math.
constexpr int64_t kRowStep = 64;

template <int V, typename Wt>
void panel_tokens(const float* const* a, int64_t n, int64_t r0, int64_t rows, const Wt* panel,
                  float* const* out, bool accumulate, const char* next, int64_t next_lines) {
  const int64_t groups = n / 8 + (n % 8) / 4 + n % 4;
  const int64_t per_row = (next_lines + groups * rows - 1) / (groups * rows);  // cache lines per row
  int64_t t = 0, g = 0;
  auto run = [&](auto tb) {
    constexpr int TB = decltype(tb)::value;
    const int64_t first = g * rows * per_row;
    const int64_t count = first < next_lines ? per_row : 0;
    panel_block<TB, V>(a + t, r0, rows, panel, out + t, accumulate, next + first * 64, count);
    t += TB, ++g;
  };
  while (t + 8 <= n) run(std::integral_constant<int, 8>{});
  while (t + 4 <= n) run(std::integral_constant<int, 4>{});
  while (t < n) run(std::integral_constant<int, 1>{});
}

// Panel widths over `cols` columns (a multiple of 16): 48 while they fit, then 16.
inline int64_t panel_width(int64_t c, int64_t cols) { return c + 48 <= cols ? 48 : 16; }

// out[t][c] (+)= sum_r a[t][r] * packed[r][c] for c < cols; `packed` holds the panels back to back
// ([rows, w] each). `out` rows are shifted per panel through `shifted` (scratch of n pointers).
template <typename Wt>
void apply_panels(const float* const* a, int64_t n, int64_t rows, const Wt* packed, int64_t cols,
                  float* const* out, bool accumulate, std::vector<float*>& shifted) {
  shifted.resize(n);
  for (int64_t c = 0; c < cols;) {
    const int64_t w = panel_width(c, cols);
    const Wt* panel = packed + rows * c;
    for (int64_t t = 0; t < n; ++t) shifted[t] = out[t] + c;
    for (int64_t r0 = 0; r0 < rows; r0 += kRowStep) {
      const int64_t step = std::min(kRowStep, rows - r0);
      const Wt* chunk = panel + r0 * w;
      // The next bytes of the packed stream: this panel's next step, else the next panel or expert.
      const char* next = reinterpret_cast<const char*>(chunk + step * w);
      const int64_t next_lines = kRowStep * w * static_cast<int64_t>(sizeof(Wt)) / 64;
      if (w == 48)
        panel_tokens<3>(a, n, r0, step, chunk, shifted.data(), accumulate || r0 > 0, next, next_lines);
      else
        panel_tokens<1>(a, n, r0, step, chunk, shifted.data(), accumulate || r0 > 0, next, next_lines);
    }
    c += w;
  }
}

// Packs src (element (col, row) at src[col * src_col_stride + row * src_row_stride]) into panels of
// `cols` columns (zero beyond `valid_cols`) and `rows` rows.
template <typename Wt>
void pack_panels(const Wt* src, int64_t rows, int64_t cols, int64_t valid_cols, int64_t src_row_stride,
                 int64_t src_col_stride, Wt* dst) {
  for (int64_t c = 0; c < cols;) {
    const int64_t w = panel_width(c, cols);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < w; ++k)
        dst[rows * c + r * w + k] = c + k < valid_cols ? src[(c + k) * src_col_stride + r * src_row_stride] : Wt{};
    c += w;
  }
}

// NaN ranks below every number; equal scores keep the lower index (callers scan upwards).
inline bool better(float a, float b) { return std::isnan(b) ? !std::isnan(a) : a > b; }

struct Scratch {
  std::vector<float> up, gate;
  std::vector<const float*> xrows, hrows;
  std::vector<float*> rows, shifted;
};

// Tokens per expert block: bounds scratch memory and gives workers balanced pieces.
constexpr int64_t kTokenBlock = 64;

template <typename Wt>
void run_expert_block(const SparseFFNProblem& p, const PackedWeights& pk, int64_t e, const int32_t* tokens,
                      int64_t n, float* out, Scratch& s) {
  const int64_t d = p.d, m = p.m, mp = pk.mp;
  s.up.resize(n * mp), s.rows.resize(n), s.xrows.resize(n), s.hrows.resize(n);
  std::vector<float*> hout(n);
  for (int64_t r = 0; r < n; ++r) {
    s.xrows[r] = p.x + tokens[r] * d;
    s.rows[r] = out + tokens[r] * d;
    hout[r] = s.up.data() + r * mp;
    s.hrows[r] = hout[r];
  }
  // h = scale * (W x) + bias (scale: int8 row scales, else none).
  auto first_layer = [&](const void* packed, const float* scale, const float* bias, std::vector<float>& h) {
    for (int64_t r = 0; r < n; ++r) hout[r] = h.data() + r * mp;
    apply_panels(s.xrows.data(), n, d, static_cast<const Wt*>(packed) + e * d * mp, mp, hout.data(), false,
                 s.shifted);
    if (scale)
      for (int64_t r = 0; r < n; ++r)
        for (int64_t j = 0; j < m; ++j) h[r * mp + j] *= scale[e * m + j];
    if (bias)
      for (int64_t r = 0; r < n; ++r)
        for (int64_t j = 0; j < m; ++j) h[r * mp + j] += bias[j];
  };
  first_layer(pk.w1p, p.w1_scale, p.b1 ? p.b1 + e * m : nullptr, s.up);
  if (p.wg) {
    s.gate.resize(n * mp);
    first_layer(pk.wgp, p.wg_scale, p.bg ? p.bg + e * m : nullptr, s.gate);
    activate(p.activation, s.gate.data(), n * mp);
    for (int64_t i = 0; i < n * mp; ++i) s.up[i] *= s.gate[i];
  } else {
    activate(p.activation, s.up.data(), n * mp);  // padding neurons stay act(0) = 0
  }
  // Second layer: W2's row scales fold into h; packed panels over the first d16 output columns, plain
  // rows for the (< 16) rest.
  if (p.w2_scale)
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < m; ++j) s.up[r * mp + j] *= p.w2_scale[e * m + j];
  apply_panels(s.hrows.data(), n, m, static_cast<const Wt*>(pk.w2p) + e * m * pk.d16, pk.d16, s.rows.data(), true,
               s.shifted);
  const Wt* w2 = static_cast<const Wt*>(p.w2) + e * m * d;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = pk.d16; i < d; ++i) {
      float acc = s.rows[r][i];
      for (int64_t j = 0; j < m; ++j) acc += s.up[r * mp + j] * static_cast<float>(w2[j * d + i]);
      s.rows[r][i] = acc;
    }
  if (p.unselected_bias) {
    const float* u = p.unselected_bias + e * d;
    for (int64_t r = 0; r < n; ++r)
      for (int64_t i = 0; i < d; ++i) s.rows[r][i] -= u[i];
  }
}

template <typename Wt>
void pack_experts(const SparseFFNProblem& p, PackedWeights& pk, HugeVector<Wt>& w1p, HugeVector<Wt>& wgp,
                  HugeVector<Wt>& w2p) {
  const int64_t E = p.experts, m = p.m, d = p.d;
  // First layer: W[e] is [m, d]; panels run over neurons (columns), rows over d.
  auto pack_first = [&](const void* w, HugeVector<Wt>& out) {
    out.resize(E * d * pk.mp);
    for (int64_t e = 0; e < E; ++e)
      pack_panels(static_cast<const Wt*>(w) + e * m * d, d, pk.mp, m, 1, d, out.data() + e * d * pk.mp);
    return out.data();
  };
  pk.w1p = pack_first(p.w1, w1p);
  if (p.wg) pk.wgp = pack_first(p.wg, wgp);
  // Second layer: W2[e] is [m, d]; panels run over output columns, rows over m.
  w2p.resize(E * m * pk.d16);
  for (int64_t e = 0; e < E; ++e)
    pack_panels(static_cast<const Wt*>(p.w2) + e * m * d, m, pk.d16, pk.d16, d, 1, w2p.data() + e * m * pk.d16);
  pk.w2p = w2p.data();
}

}  // namespace

void serial_for(std::size_t n, const std::function<void(std::size_t)>& fn) {
  for (std::size_t i = 0; i < n; ++i) fn(i);
}

void activate(Activation a, float* v, std::size_t n) {
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) store16(v + i, activate16(a, load16(v + i)));
  if (i < n) {
    float tail[16] = {};
    std::memcpy(tail, v + i, (n - i) * sizeof(float));
    store16(tail, activate16(a, load16(tail)));
    std::memcpy(v + i, tail, (n - i) * sizeof(float));
  }
}

void select_top_k(const SparseFFNProblem& p, const PackedWeights& pk, int64_t t_begin, int64_t t_end,
                  int32_t* selected) {
  const int64_t E = p.experts, k = p.top_k, d = p.d, n = t_end - t_begin;
  if (n <= 0) return;
  // Scores for the whole token range: given, one panel GEMM on the packed router, or plain dot products.
  const int64_t ld = pk.routerp ? pk.ep : E;
  std::vector<float> scores;
  const float* s = nullptr;
  if (p.router_scores) {
    s = p.router_scores + t_begin * E;
  } else if (pk.routerp) {
    scores.resize(n * ld);
    std::vector<const float*> xs(n);
    std::vector<float*> outs(n), shifted;
    for (int64_t r = 0; r < n; ++r) xs[r] = p.x + (t_begin + r) * d, outs[r] = scores.data() + r * ld;
    apply_panels(xs.data(), n, d, pk.routerp, ld, outs.data(), false, shifted);
    if (p.router_b)
      for (int64_t r = 0; r < n; ++r)
        for (int64_t e = 0; e < E; ++e) scores[r * ld + e] += p.router_b[e];
    s = scores.data();
  } else {
    scores.resize(n * ld);
    dot_rows(p.x + t_begin * d, n, p.router_w, p.router_b, d, E, scores.data());
    s = scores.data();
  }
  std::vector<char> taken(E);
  for (int64_t r = 0; r < n; ++r) {
    const float* row = s + r * ld;
    std::fill(taken.begin(), taken.end(), 0);
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || better(row[e], row[best]))) best = e;
      taken[best] = 1;
      const bool dropped = j >= p.min_k && row[best] < p.score_threshold;
      selected[(t_begin + r) * k + j] = dropped ? -1 : static_cast<int32_t>(best);
    }
  }
}

PackedWeights pack_weights(const SparseFFNProblem& p) {
  PackedWeights pk;
  const int64_t E = p.experts, d = p.d;
  pk.mp = (p.m + 15) / 16 * 16;
  pk.d16 = d / 16 * 16;
  pk.weight_type = p.weight_type;
  if (p.weight_type == WeightType::kInt8)
    pack_experts<int8_t>(p, pk, pk.w1q, pk.wgq, pk.w2q);
  else
    pack_experts<float>(p, pk, pk.w1f, pk.wgf, pk.w2f);
  // Router: router_w [E, d] as panels over experts (columns), rows over d.
  if (p.router_w) {
    pk.ep = (E + 15) / 16 * 16;
    pk.routerp_storage.resize(d * pk.ep);
    pack_panels(p.router_w, d, pk.ep, E, 1, d, pk.routerp_storage.data());
    pk.routerp = pk.routerp_storage.data();
  }
  return pk;
}

void sparse_ffn(const SparseFFNProblem& p, const ParallelFor& pfor, std::size_t workers) {
  sparse_ffn(p, pack_weights(p), pfor, workers);
}

void sparse_ffn(const SparseFFNProblem& p, const PackedWeights& pk, const ParallelFor& pfor, std::size_t workers) {
  const int64_t T = p.tokens, d = p.d, E = p.experts, k = p.top_k;
  if (T == 0 || d == 0) return;  // Y is empty (and memcpy below must not be handed null pointers)

  // Output starts at B2 + sum_e U[e]; each selected expert then adds its output minus U[e].
  std::vector<float> base(d, 0.f);
  if (p.b2) std::memcpy(base.data(), p.b2, d * sizeof(float));
  if (p.unselected_bias)
    for (int64_t e = 0; e < E; ++e)
      for (int64_t i = 0; i < d; ++i) base[i] += p.unselected_bias[e * d + i];
  for (int64_t t = 0; t < T; ++t) std::memcpy(p.y + t * d, base.data(), d * sizeof(float));

  // Routing, parallel over token ranges (router_w · x is T x E x d work: not negligible for wide models).
  std::vector<int32_t> selected(T * k);
  const std::size_t route_parts = std::max<std::size_t>(1, std::min<std::size_t>(workers, T));
  pfor(route_parts, [&](std::size_t w) {
    select_top_k(p, pk, T * w / route_parts, T * (w + 1) / route_parts, selected.data());
  });

  // Counting sort of (token, expert) pairs by expert.
  std::vector<int64_t> start(E + 1, 0);
  for (int32_t e : selected)
    if (e >= 0) ++start[e + 1];
  std::partial_sum(start.begin(), start.end(), start.begin());
  std::vector<int32_t> tokens(T * k);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < k; ++j)
        if (const int32_t e = selected[t * k + j]; e >= 0) tokens[fill[e]++] = static_cast<int32_t>(t);
  }

  struct Block { int64_t expert, begin, count; };
  std::vector<Block> blocks;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t b = start[e]; b < start[e + 1]; b += kTokenBlock)
      blocks.push_back({e, b, std::min(kTokenBlock, start[e + 1] - b)});
  std::stable_sort(blocks.begin(), blocks.end(), [](const Block& a, const Block& b) { return a.count > b.count; });

  workers = std::max<std::size_t>(1, std::min(workers, blocks.size()));
  // Worker 0 accumulates straight into y; the others into zeroed buffers summed at the end.
  std::vector<std::vector<float>> partial(workers - 1, std::vector<float>(T * d, 0.f));
  std::atomic<std::size_t> next{0};
  pfor(workers, [&](std::size_t w) {
    float* out = w == 0 ? p.y : partial[w - 1].data();
    Scratch s;
    const auto run = pk.weight_type == WeightType::kInt8 ? run_expert_block<int8_t> : run_expert_block<float>;
    for (std::size_t b; (b = next.fetch_add(1, std::memory_order_relaxed)) < blocks.size();)
      run(p, pk, blocks[b].expert, tokens.data() + blocks[b].begin, blocks[b].count, out, s);
  });
  for (auto& buf : partial)
    for (int64_t i = 0; i < T * d; ++i) p.y[i] += buf[i];
}

}  // namespace moefy
