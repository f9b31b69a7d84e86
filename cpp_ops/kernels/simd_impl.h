// The hot loops of SparseExpertFFN, written once and compiled once per instruction set. Each
// cpp_ops/kernels/isa_*.cc defines the vector width and the register tile, then includes this file; CMake
// compiles it with that ISA's target flags. The driver (driver.cc, baseline flags) calls these only through
// the IsaKernels table that dispatch.cc picks from the CPU's features.
//
// Rules that keep a wider-ISA build from leaking into code that runs on a narrower CPU: everything here
// is in the ISA's own namespace (internal linkage), and no standard-library template is instantiated here
// (the linker could pick this TU's copy of, say, std::vector<float>::resize for the whole library).
//
// Both layers are one product on packed panels: out[t][0:w] (+)= sum_r a[t][r] * P[r][0:w], P a contiguous
// [rows, w] panel. Layer 1: rows = d, a = x, w = a chunk of neurons. Layer 2: rows = m, a = h, w = a chunk
// of output columns. The register tile is MOEFY_TILE_TOKENS tokens x MOEFY_TILE_VECS vectors, sized to
// the ISA's register file (AVX-512 and NEON have 32 vector registers, AVX2 and SSE 16): accumulators,
// the row's weight vectors and one broadcast must fit, or the tile spills to the stack.
#if !defined(MOEFY_ISA_NS) || !defined(MOEFY_LANES) || !defined(MOEFY_TILE_TOKENS) || !defined(MOEFY_TILE_VECS) || \
    !defined(MOEFY_TILE_NAME)
#error "define MOEFY_ISA_NS, MOEFY_LANES, MOEFY_TILE_TOKENS, MOEFY_TILE_VECS, MOEFY_TILE_NAME, then include this"
#endif

#include <cstdint>

#include "sparse_ffn.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
// GCC 12 warns inside its own AVX-512 headers (an intentionally undefined pass-through operand).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace moefy {
namespace MOEFY_ISA_NS {
namespace {

constexpr int L = MOEFY_LANES;               // floats per vector
constexpr int kTB = MOEFY_TILE_TOKENS;       // token rows of the register tile
constexpr int kV = MOEFY_TILE_VECS;          // vectors per tile row
constexpr int64_t kPanel = int64_t{kV} * L;  // widest panel (columns)
static_assert(kV >= 1 && kV <= 4, "apply_panels dispatches tail panels of 1 to 3 vectors");

typedef float vf __attribute__((vector_size(L * 4)));
typedef int32_t vi __attribute__((vector_size(L * 4)));

// Unaligned loads and stores and broadcasts through the ISA's own instructions: GCC's lowering of the
// generic forms (memcpy into a vector, a vector filled lane by lane) gave lane-by-lane inserts and stack
// round trips on AVX2 builds.
#if MOEFY_LANES == 16 && defined(__AVX512F__) && !defined(MOEFY_PORTABLE)
inline vf load(const float* p) { return (vf)_mm512_loadu_ps(p); }
inline void store(float* p, vf v) { _mm512_storeu_ps(p, (__m512)v); }
inline vf splat(float s) { return (vf)_mm512_set1_ps(s); }
#elif MOEFY_LANES == 8 && defined(__AVX__) && !defined(MOEFY_PORTABLE)
inline vf load(const float* p) { return (vf)_mm256_loadu_ps(p); }
inline void store(float* p, vf v) { _mm256_storeu_ps(p, (__m256)v); }
inline vf splat(float s) { return (vf)_mm256_set1_ps(s); }
#elif MOEFY_LANES == 4 && defined(__SSE2__) && !defined(MOEFY_PORTABLE)
inline vf load(const float* p) { return (vf)_mm_loadu_ps(p); }
inline void store(float* p, vf v) { _mm_storeu_ps(p, (__m128)v); }
inline vf splat(float s) { return (vf)_mm_set1_ps(s); }
#elif MOEFY_LANES == 4 && defined(__ARM_NEON) && !defined(MOEFY_PORTABLE)
inline vf load(const float* p) { return (vf)vld1q_f32(p); }
inline void store(float* p, vf v) { vst1q_f32(p, (float32x4_t)v); }
inline vf splat(float s) { return (vf)vdupq_n_f32(s); }
#else
inline vf load(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
inline vf splat(float s) { return s - vf{}; }  // x - (+0) == x for every x, so this folds to a broadcast
#endif

// L int8 weights widened to floats: int8 panels cost a quarter of the memory traffic for a widening per
// vector. Intrinsics, because GCC 12 lowers a vector-extension int8 -> float conversion to scalar ones.
inline vf load(const int8_t* p) {
  vf out;
#if MOEFY_LANES == 16 && defined(__AVX512F__) && !defined(MOEFY_PORTABLE)
  __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  __builtin_memcpy(&out, &f, sizeof out);
#elif MOEFY_LANES == 8 && defined(__AVX2__) && !defined(MOEFY_PORTABLE)
  __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  __builtin_memcpy(&out, &f, sizeof out);
#elif MOEFY_LANES == 4 && defined(__SSE4_1__) && !defined(MOEFY_PORTABLE)
  int32_t bytes;
  __builtin_memcpy(&bytes, p, 4);
  __m128 f = _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(bytes)));
  __builtin_memcpy(&out, &f, sizeof out);
#elif MOEFY_LANES == 4 && defined(__SSE2__) && !defined(MOEFY_PORTABLE)
  int32_t bytes;
  __builtin_memcpy(&bytes, p, 4);
  __m128i b = _mm_cvtsi32_si128(bytes);
  b = _mm_unpacklo_epi8(b, b);   // each byte twice
  b = _mm_unpacklo_epi16(b, b);  // each byte four times: the arithmetic shift keeps its sign
  __m128 f = _mm_cvtepi32_ps(_mm_srai_epi32(b, 24));
  __builtin_memcpy(&out, &f, sizeof out);
#elif MOEFY_LANES == 4 && defined(__ARM_NEON) && !defined(MOEFY_PORTABLE)
  int32_t bytes;
  __builtin_memcpy(&bytes, p, 4);
  int16x8_t h = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(bytes)));
  float32x4_t f = vcvtq_f32_s32(vmovl_s16(vget_low_s16(h)));
  __builtin_memcpy(&out, &f, sizeof out);
#else
  for (int i = 0; i < L; ++i) out[i] = static_cast<float>(p[i]);
#endif
  return out;
}

// L float16 weights widened to floats (exact): half the bytes of float32 for one conversion per vector. Paths
// without a conversion instruction never load them (kHalfLoads: packing widens their experts instead).
#if MOEFY_LANES == 16 && defined(__AVX512F__) && !defined(MOEFY_PORTABLE)
constexpr bool kHalfLoads = true;
inline vf load(const Half* p) {
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#elif MOEFY_LANES == 8 && defined(__F16C__) && !defined(MOEFY_PORTABLE)
constexpr bool kHalfLoads = true;
inline vf load(const Half* p) { return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#elif MOEFY_LANES == 4 && defined(__ARM_NEON) && defined(__aarch64__) && !defined(MOEFY_PORTABLE)
constexpr bool kHalfLoads = true;
inline vf load(const Half* p) {
  return (vf)vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p))));
}
#else
constexpr bool kHalfLoads = false;
inline vf load(const Half* p) {
  vf out;
  for (int i = 0; i < L; ++i) out[i] = half_to_float(p[i]);
  return out;
}
#endif

// One weight as a float (the few output columns that no panel covers).
inline float widen(float w) { return w; }
inline float widen(int8_t w) { return static_cast<float>(w); }
inline float widen(Half w) { return half_to_float(w); }

// exp (Cephes polynomial, ~1 ulp on the clamped range).
inline vf vexp(vf x) {
  x = x < splat(88.3762626647949f) ? x : splat(88.3762626647949f);
  x = x > splat(-87.3365478515625f) ? x : splat(-87.3365478515625f);
  vf fx = x * splat(1.44269504088896341f) + splat(0.5f);
  vi n = __builtin_convertvector(fx, vi);
  n += (__builtin_convertvector(n, vf) > fx);  // truncation -> floor (true lanes are -1)
  vf nf = __builtin_convertvector(n, vf);
  vf r = x - nf * splat(0.693359375f) + nf * splat(2.12194440e-4f);
  vf q = splat(1.9875691500e-4f);
  q = q * r + splat(1.3981999507e-3f);
  q = q * r + splat(8.3334519073e-3f);
  q = q * r + splat(4.1665795894e-2f);
  q = q * r + splat(1.6666665459e-1f);
  q = q * r + splat(5.0000001201e-1f);
  q = q * r * r + r + splat(1.f);
  vi bits = (n + 127) << 23;
  vf scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return q * scale;
}

// erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7).
inline vf verf(vf x) {
  vf ax = x < splat(0.f) ? -x : x;
  vf t = splat(1.f) / (splat(1.f) + splat(0.3275911f) * ax);
  vf y = splat(1.061405429f);
  y = y * t + splat(-1.453152027f);
  y = y * t + splat(1.421413741f);
  y = y * t + splat(-0.284496736f);
  y = y * t + splat(0.254829592f);
  y = splat(1.f) - y * t * vexp(-ax * ax);
  return x < splat(0.f) ? -y : y;
}

inline vf activate_v(Activation a, vf z) {
  switch (a) {
    case Activation::kRelu:
      return z > splat(0.f) ? z : splat(0.f);
    case Activation::kGelu:
      return splat(0.5f) * z * (splat(1.f) + verf(z * splat(0.7071067811865476f)));
    case Activation::kGeluTanh: {
      vf u = splat(0.7978845608028654f) * (z + splat(0.044715f) * z * z * z);
      vf tanh_u = splat(1.f) - splat(2.f) / (vexp(u + u) + splat(1.f));
      return splat(0.5f) * z * (splat(1.f) + tanh_u);
    }
    case Activation::kSilu:
      return z / (splat(1.f) + vexp(-z));
  }
  return z;
}

// In place over n floats; a partial last vector goes through a zero-padded copy.
void activate(Activation a, float* v, int64_t n) {
  int64_t i = 0;
  for (; i + L <= n; i += L) store(v + i, activate_v(a, load(v + i)));
  if (i < n) {
    float tail[L] = {};
    __builtin_memcpy(tail, v + i, (n - i) * sizeof(float));
    store(tail, activate_v(a, load(tail)));
    __builtin_memcpy(v + i, tail, (n - i) * sizeof(float));
  }
}

// up[i] *= act(gate[i]) over n floats (the gated form, e.g. SwiGLU).
void gate_multiply(Activation a, const float* gate, float* up, int64_t n) {
  int64_t i = 0;
  for (; i + L <= n; i += L) store(up + i, activate_v(a, load(gate + i)) * load(up + i));
  if (i < n) {
    float g[L] = {}, u[L] = {};
    __builtin_memcpy(g, gate + i, (n - i) * sizeof(float));
    __builtin_memcpy(u, up + i, (n - i) * sizeof(float));
    store(u, activate_v(a, load(g)) * load(u));
    __builtin_memcpy(up + i, u, (n - i) * sizeof(float));
  }
}

// ---- Top-k (driver.cc's select_range): 12-30% of a call with many narrow experts when scalar ----
typedef uint32_t vu __attribute__((vector_size(L * 4)));

inline uint32_t order_key(float score) {  // driver.cc's, for the tail
  score += 0.f;
  uint32_t bits;
  __builtin_memcpy(&bits, &score, sizeof bits);
  const uint32_t flip = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31) | 0x80000000u;
  return score != score ? 0u : bits ^ flip;
}

void order_keys(const float* row, int64_t n, uint32_t* u) {
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const vf s = load(row + i) + splat(0.f);  // -0 ranks as +0
    vu bits;
    __builtin_memcpy(&bits, &s, sizeof bits);
    const vu flip = (vu)((vi)bits >> 31) | 0x80000000u;
    const vu key = (vu)(s == s) & (bits ^ flip);  // NaN: 0
    __builtin_memcpy(u + i, &key, sizeof key);
  }
  for (; i < n; ++i) u[i] = order_key(row[i]);
}

int64_t count_at_least(const uint32_t* u, int64_t n, uint32_t t) {
  vi acc = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    vu v;
    __builtin_memcpy(&v, u + i, sizeof v);
    acc -= (vi)(v >= t);  // true lanes are -1
  }
  int64_t count = 0;
  for (int j = 0; j < L; ++j) count += acc[j];
  for (; i < n; ++i) count += u[i] >= t;
  return count;
}

void add(float* y, const float* x, int64_t n) {
  int64_t i = 0;
  for (; i + L <= n; i += L) store(y + i, load(y + i) + load(x + i));
  for (; i < n; ++i) y[i] += x[i];
}

// One token group of TB tokens over `rows` rows of a [rows, V * L] panel. Weights are loaded once per row
// and used by every token of the group; token values are broadcast from memory. While computing, the group
// prefetches its share of the next bytes of the packed stream, so reading weights overlaps the math.
// `sub` (or null): a row subtracted from every token's output as the tile is loaded (accumulating only).
template <int TB, int V, typename Wt>
inline void panel_block(const float* const* a, int64_t r0, int64_t rows, const Wt* panel, float* const* out,
                        bool accumulate, const char* prefetch, int64_t prefetch_per_row, const float* sub) {
  vf acc[TB][V];
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < V; ++v)
      acc[t][v] = !accumulate ? vf{} : sub ? load(out[t] + L * v) - load(sub + L * v) : load(out[t] + L * v);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t q = 0; q < prefetch_per_row; ++q) __builtin_prefetch(prefetch + (r * prefetch_per_row + q) * 64, 0, 2);
    vf w[V];
    for (int v = 0; v < V; ++v) w[v] = load(panel + r * L * V + L * v);
    for (int t = 0; t < TB; ++t) {
      vf av = splat(a[t][r0 + r]);
      for (int v = 0; v < V; ++v) acc[t][v] += av * w[v];
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < V; ++v) store(out[t] + L * v, acc[t][v]);
}

// A single token (decode): the tile has only V accumulators, too few chains to hide the FMA latency, so
// even and odd rows go to two accumulator sets.
template <int V, typename Wt>
inline void panel_row(const float* a, int64_t r0, int64_t rows, const Wt* panel, float* out, bool accumulate,
                      const char* prefetch, int64_t prefetch_per_row, const float* sub) {
  vf acc0[V], acc1[V];
  for (int v = 0; v < V; ++v) {
    acc0[v] = !accumulate ? vf{} : sub ? load(out + L * v) - load(sub + L * v) : load(out + L * v);
    acc1[v] = vf{};
  }
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2) {
    for (int64_t q = 0; q < 2 * prefetch_per_row; ++q)
      __builtin_prefetch(prefetch + (r * prefetch_per_row + q) * 64, 0, 2);
    const vf a0 = splat(a[r0 + r]), a1 = splat(a[r0 + r + 1]);
    for (int v = 0; v < V; ++v) {
      acc0[v] += a0 * load(panel + r * L * V + L * v);
      acc1[v] += a1 * load(panel + (r + 1) * L * V + L * v);
    }
  }
  if (r < rows) {
    const vf a0 = splat(a[r0 + r]);
    for (int v = 0; v < V; ++v) acc0[v] += a0 * load(panel + r * L * V + L * v);
  }
  for (int v = 0; v < V; ++v) store(out + L * v, acc0[v] + acc1[v]);
}

// Token groups: kTB tokens while they last, then the rest in tiles of kTB / 2, kTB / 4 (when at least 2
// tokens) and single tokens, so an expert's leftover tokens do not each take a pass over the panel. (Narrow
// panels taking more tokens per group, to keep kTB x kV accumulators, measured no faster: 0.95-1.02x.)
constexpr int kTB2 = kTB / 2 >= 2 ? kTB / 2 : 1;
constexpr int kTB4 = kTB / 4 >= 2 ? kTB / 4 : 1;
inline int64_t next_group(int64_t left) {
  return left >= kTB ? kTB : left >= kTB2 ? kTB2 : left >= kTB4 ? kTB4 : 1;
}

// Rows per step: a step of a panel stays in L1 while every token group of the block uses it. Blocks of
// many tokens take long steps (fewer reloads of the output tile); blocks of few tokens, which mostly stream
// weights, take short ones (4096x11008, one thread: 32 rows made 1 and 16 tokens 5-10% faster on the avx512
// path and 128 tokens 10% slower; benchmarks/README.md, item 14).
constexpr int64_t kRowStep = 64, kShortRowStep = 32, kLongStepTokens = 16;
// How far ahead the token groups of a block prefetch the packed stream, into L2 (prefetcht1); 0: not at all;
// kPrefetchBytes for blocks of kLongStepTokens or more, PackedView::prefetch_few for fewer (MOEFY_PREFETCH_FEW_BYTES,
// or on AMD CPUs MOEFY_PREFETCH_FEW_BYTES_AMD: the two vendors' prefetchers differ). Measured on AMD Zen 4,
// 4096x11008, one thread (benchmarks/README.md, items 11 and 14): prefetching one step ahead into L1 left the
// loads waiting at 16 tokens (17-18 GB/s: L1's few miss buffers cap the lines in flight); 32 KiB ahead into L2
// streams at 23-26 GB/s, except that the AVX-512 path does better at 16 tokens leaving it to the hardware
// prefetcher (13.5 vs 14.9 ms; at 128 tokens it needs it: 78 vs 63 ms). A single token does almost no math per
// byte and streams fastest with no software prefetch on every path (3.0 vs 3.5 ms). On Intel Sapphire Rapids
// the AVX-512 path needs it at 16 tokens too (4096x11008: 37-48 -> 26-30 ms; benchmarks/README.md, item 23).
#ifndef MOEFY_PREFETCH_FEW_BYTES
#define MOEFY_PREFETCH_FEW_BYTES (32 << 10)
#endif
#ifndef MOEFY_PREFETCH_FEW_BYTES_AMD
#define MOEFY_PREFETCH_FEW_BYTES_AMD MOEFY_PREFETCH_FEW_BYTES
#endif
constexpr int64_t kPrefetchBytes = 32 << 10;
// int8 blocks of at least this many tokens widen each step once into an L1 float buffer (apply_panels). On
// the AVX paths a block of one or two groups is faster widening in registers (the buffer costs a store and a
// load per weight); on the 4-lane paths widening takes three to five instructions per vector, so any block
// of two tokens or more gains (measured: BERT-base int8, 16 tokens, sse41 path 1745 -> 1601 us).
constexpr int64_t kWidenTokens = kTB > 2 ? 2 * kTB : 2;

template <int V, typename Wt>
void panel_tokens(const float* const* a, int64_t n, int64_t r0, int64_t rows, const Wt* panel,
                  float* const* out, bool accumulate, const char* next, int64_t next_lines, const float* sub) {
  int64_t groups = 0;
  for (int64_t t = 0; t < n; t += next_group(n - t)) ++groups;
  const int64_t per_row = (next_lines + groups * rows - 1) / (groups * rows);  // cache lines per row
  int64_t g = 0;
  for (int64_t t = 0; t < n; ++g) {
    const int64_t tb = next_group(n - t);
    const int64_t first = g * rows * per_row;
    const int64_t count = first < next_lines ? per_row : 0;
    const char* pf = next + first * 64;
    if (tb == kTB)
      panel_block<kTB, V>(a + t, r0, rows, panel, out + t, accumulate, pf, count, sub);
    else if (tb == kTB2 && kTB2 > 1)
      panel_block<kTB2, V>(a + t, r0, rows, panel, out + t, accumulate, pf, count, sub);
    else if (tb == kTB4 && kTB4 > 1)
      panel_block<kTB4, V>(a + t, r0, rows, panel, out + t, accumulate, pf, count, sub);
    else
      panel_row<V>(a[t], r0, rows, panel, out[t], accumulate, pf, count, sub);
    t += tb;
  }
}

// One panel of V vectors (w = V * L columns) at output column c, in steps of rows that stay in L1.
template <int V, typename Wt>
void apply_panel(const float* const* a, int64_t n, int64_t rows, const Wt* panel, float* const* shifted,
                 bool accumulate, int64_t few_bytes, const float* sub) {
  constexpr int64_t w = int64_t{V} * L;
  const int64_t row_step = n >= kLongStepTokens ? kRowStep : kShortRowStep;
  const int64_t step_bytes = row_step * w * static_cast<int64_t>(sizeof(Wt));
  const int64_t distance = n >= kLongStepTokens ? kPrefetchBytes : few_bytes;
  const int64_t ahead = (distance + step_bytes - 1) / step_bytes * step_bytes;
  const int64_t lines = distance > 0 ? step_bytes / 64 : 0;  // to prefetch per step
  for (int64_t r0 = 0; r0 < rows; r0 += row_step) {
    const int64_t step = rows - r0 < row_step ? rows - r0 : row_step;
    const Wt* chunk = panel + r0 * w;
    // The bytes of the packed stream `ahead` of this step (panels and experts lie back to back; past the
    // end of the buffer a prefetch is harmless).
    const char* next = reinterpret_cast<const char*>(chunk) + ahead;
    const bool acc = accumulate || r0 > 0;
    const float* s = accumulate && r0 == 0 ? sub : nullptr;
    if (sizeof(Wt) == 1 && n >= kWidenTokens) {
      // int8 weights and several token groups: widen the step once into an L1 buffer that every group
      // then reads as floats, instead of each group widening every weight again.
      float wide[kRowStep * w];
      for (int64_t i = 0; i < step * w; i += L) store(wide + i, load(chunk + i));
      panel_tokens<V>(a, n, r0, step, wide, shifted, acc, next, lines, s);
    } else if (n == 1) {
      panel_row<V>(a[0], r0, step, chunk, shifted[0], acc, next, 0, s);
    } else {
      panel_tokens<V>(a, n, r0, step, chunk, shifted, acc, next, lines, s);
    }
  }
}

// out[t][c] (+)= sum_r a[t][r] * packed[r][c] for c < cols (a multiple of L); `packed` holds the panels back
// to back ([rows, w] each: kPanel wide while they fit, then one panel of the rest, so that an expert of 16
// neurons on a 24-column AVX2 tile takes one pass of two vectors per token, not two of one).
// `shifted`: scratch of n row pointers. `few_bytes`: the prefetch distance of blocks of few tokens
// (PackedView::prefetch_few). `sub` (or null; accumulating only): out[t][c] -= sub[c] as well,
// folded into the first row step's tile loads instead of another pass over every token's output per expert
// (passes that add up with many small experts).
template <typename Wt>
void apply_panels(const float* const* a, int64_t n, int64_t rows, const Wt* packed, int64_t cols,
                  float* const* out, bool accumulate, float** shifted, int64_t few_bytes,
                  const float* sub = nullptr) {
  for (int64_t c = 0; c < cols;) {
    const int64_t w = c + kPanel <= cols ? kPanel : cols - c;
    const Wt* panel = packed + rows * c;
    for (int64_t t = 0; t < n; ++t) shifted[t] = out[t] + c;
    const float* s = sub ? sub + c : nullptr;
    switch (w / L) {  // kV is at most 4 (tiles of 2 to 4 vectors per row)
      case 1: apply_panel<1>(a, n, rows, panel, shifted, accumulate, few_bytes, s); break;
      case 2: apply_panel<(kV >= 2 ? 2 : 1)>(a, n, rows, panel, shifted, accumulate, few_bytes, s); break;
      case 3: apply_panel<(kV >= 3 ? 3 : 1)>(a, n, rows, panel, shifted, accumulate, few_bytes, s); break;
      default: apply_panel<kV>(a, n, rows, panel, shifted, accumulate, few_bytes, s); break;
    }
    c += w;
  }
}

// ---- First layer of narrow experts as dot products (PackedView::dot) ----
// A panel of one or two vectors per row gives a token group only TB x V accumulators, too few chains to hide
// the FMA latency when an expert has few tokens (with 128 experts of 12 neurons at 16 tokens, 3.5 tokens per
// expert), and pads 12 neurons to 16 lanes. As dot products each token's vector of x serves J neurons and each
// weight vector TB tokens: TB x J accumulators whatever the expert's width, no padded neurons, then one lane
// reduction per token and J neurons.
#ifndef MOEFY_DOT_TOKENS
#define MOEFY_DOT_TOKENS 2
#endif
#ifndef MOEFY_DOT_NEURONS
#define MOEFY_DOT_NEURONS 4
#endif
#ifndef MOEFY_DOT_MAX_M
#define MOEFY_DOT_MAX_M 0
#endif
constexpr int kDotTB = MOEFY_DOT_TOKENS, kDotJ = MOEFY_DOT_NEURONS;
static_assert(kDotJ >= 1 && kDotJ <= L && (kDotJ & (kDotJ - 1)) == 0, "J: a power of two, at most one vector");

// Two vectors' lanes as C-lane chunks side by side: the even chunks of (u, v) plus the odd ones.
template <int C>
inline vf fold(vf u, vf v) {
  vi even, odd;
  for (int i = 0; i < L; ++i) even[i] = i / C * 2 * C + i % C, odd[i] = even[i] + C;
  return __builtin_shuffle(u, v, even) + __builtin_shuffle(u, v, odd);
}

// Lane j of the result = the sum of v[j]'s lanes, j < N (N a power of two <= L; lanes from N on are 0): a tree
// of folds, one level per halving of the chunk, so N vectors cost N - 1 + log2(L / N) folds, not N horizontal
// sums. Overwrites v.
template <int N, int C = L / 2>
inline vf lane_sums(vf* v) {
  if constexpr (C == 0) {
    return v[0];
  } else {
    constexpr int half = N > 1 ? N / 2 : 1;
    for (int i = 0; i < half; ++i) v[i] = fold<C>(v[2 * i], N > 1 ? v[2 * i + 1] : vf{});
    return lane_sums<half, C / 2>(v);
  }
}

// Prefetches (into L2) the `bytes` at p, one instruction per cache line.
template <int64_t bytes>
inline void prefetch_lines(const void* p) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b, 0, 2);
}

// h[t][j] = a[t] . W[j] for TB tokens and J neurons; `w` = the dot rows at the tile's first neuron (chunks of
// d are m * L apart). `pf` (or null): where the same rows of the next block's expert lie, prefetched as this
// tile reads its own: small experts are short streams that the hardware prefetcher barely starts on.
template <int TB, int J, typename Wt>
inline void dot_tile(const float* const* a, int64_t d, int64_t m, const Wt* w, float* const* h, const Wt* pf) {
  vf acc[TB][J];
  for (int t = 0; t < TB; ++t)
    for (int j = 0; j < J; ++j) acc[t][j] = vf{};
  auto step = [&](const float* const* x_rows, int64_t i, const Wt* wc) {
    vf x[TB];
    for (int t = 0; t < TB; ++t) x[t] = load(x_rows[t] + i);
    for (int j = 0; j < J; ++j) {
      const vf wv = load(wc + j * L);
      for (int t = 0; t < TB; ++t) acc[t][j] += x[t] * wv;
    }
  };
  const int64_t full = d / L;
  for (int64_t c = 0; c < full; ++c) {
    step(a, c * L, w + c * m * L);
    if (pf) prefetch_lines<J * L * sizeof(Wt)>(pf + c * m * L);  // loop-invariant branch: unswitched
  }
  if (const int64_t rest = d - full * L) {  // the last piece of x through a zero-padded copy (W is 0 there)
    float tail[TB][L] = {};
    const float* rows[TB];
    for (int t = 0; t < TB; ++t) __builtin_memcpy(tail[t], a[t] + full * L, rest * sizeof(float)), rows[t] = tail[t];
    step(rows, 0, w + full * m * L);
  }
  for (int t = 0; t < TB; ++t) {
    float sums[L];
    store(sums, lane_sums<J>(acc[t]));
    for (int j = 0; j < J; ++j) h[t][j] = sums[j];
  }
}

// Neuron tiles of J while they last, then at most one each of J / 2, J / 4, ..., 1.
template <int TB, int J, typename Wt>
inline void dot_neurons(const float* const* a, int64_t d, int64_t m, const Wt* w, float* const* h, int64_t j,
                        const Wt* pf) {
  float* hj[TB];
  for (; j + J <= m; j += J) {
    for (int t = 0; t < TB; ++t) hj[t] = h[t] + j;
    dot_tile<TB, J>(a, d, m, w + j * L, hj, pf ? pf + j * L : nullptr);
  }
  if constexpr (J > 1) dot_neurons<TB, J / 2>(a, d, m, w, h, j, pf);
}

// Token groups of TB while they last, then the rest (fewer than TB) as one smaller group; the first group
// prefetches the next expert's rows (pf, or null).
template <int TB, typename Wt>
inline void dot_layer(const float* const* a, int64_t n, int64_t d, int64_t m, const Wt* w, float* const* h,
                      const Wt* pf) {
  int64_t t = 0;
  for (; t + TB <= n; t += TB, pf = nullptr) dot_neurons<TB, kDotJ>(a + t, d, m, w, h + t, 0, pf);
  if constexpr (TB > 1)
    if (t < n) dot_layer<TB - 1>(a + t, n - t, d, m, w, h + t, pf);
}

// Second layer of a narrow expert: out[t][0:cols) (+)= h[t] . W2 - sub over the full kPanel-wide panels, all
// of them in one loop per token group. With m <= dot_max_m rows a panel is too little work to carry the
// per-panel calls, prefetch arithmetic and row steps of apply_panels; NP panels per step give a small group
// more accumulator chains (a single token also splits even and odd rows). Returns the columns done.
#ifndef MOEFY_VREGS
#define MOEFY_VREGS 16
#endif
template <int TB, int NP, typename Wt>
inline void narrow_panels(const float* const* h, int64_t m, const Wt* packed, int64_t panels, float* const* out,
                          const float* sub, const Wt* pf) {
  constexpr int S = TB == 1 ? 2 : 1;  // accumulator sets: a single token's even and odd rows
  constexpr int W = NP * kV;           // vectors per row of the step
  for (int64_t p = 0; p + NP <= panels; p += NP) {
    const Wt* w = packed + p * m * kPanel;
    const int64_t c = p * kPanel;
    vf acc[S][TB][W];
    for (int t = 0; t < TB; ++t)
      for (int v = 0; v < W; ++v) {
        const int64_t col = c + v * L;
        acc[0][t][v] = sub ? load(out[t] + col) - load(sub + col) : load(out[t] + col);
        if constexpr (S == 2) acc[1][t][v] = vf{};
      }
    for (int64_t j = 0; j < m; ++j) {
      if (pf)  // the next expert's rows at this place, one row of the step (NP panels) at a time
        for (int q = 0; q < NP; ++q) prefetch_lines<kPanel * sizeof(Wt)>(pf + (p + q) * m * kPanel + j * kPanel);
      for (int t = 0; t < TB; ++t) {
        const vf hv = splat(h[t][j]);
        for (int v = 0; v < W; ++v)
          acc[j % S][t][v] += hv * load(w + (v / kV) * m * kPanel + j * kPanel + (v % kV) * L);
      }
    }
    for (int t = 0; t < TB; ++t)
      for (int v = 0; v < W; ++v) store(out[t] + c + v * L, S == 2 ? acc[0][t][v] + acc[S - 1][t][v] : acc[0][t][v]);
  }
}

// Panels per step for a group of TB tokens: two while their accumulators (two sets for one token), a row's
// weights and a broadcast fit the register file.
template <int TB>
constexpr int narrow_step_panels() {
  return (TB == 1 ? 2 : TB) * 2 * kV + 2 * kV + 1 <= MOEFY_VREGS ? 2 : 1;
}

template <typename Wt>
int64_t narrow_second(const float* const* h, int64_t n, int64_t m, const Wt* packed, int64_t cols,
                      float* const* out, const float* sub, const Wt* pf) {
  constexpr bool pairs = narrow_step_panels<1>() == 2 || narrow_step_panels<kTB2>() == 2 ||
                         narrow_step_panels<kTB4>() == 2;
  const int64_t panels = pairs ? cols / kPanel / 2 * 2 : cols / kPanel;  // the rest: apply_panels
  for (int64_t t = 0; t < n;) {
    const int64_t tb = next_group(n - t);
    if (tb == kTB)
      narrow_panels<kTB, narrow_step_panels<kTB>()>(h + t, m, packed, panels, out + t, sub, pf);
    else if (tb == kTB2 && kTB2 > 1)
      narrow_panels<kTB2, narrow_step_panels<kTB2>()>(h + t, m, packed, panels, out + t, sub, pf);
    else if (tb == kTB4 && kTB4 > 1)
      narrow_panels<kTB4, narrow_step_panels<kTB4>()>(h + t, m, packed, panels, out + t, sub, pf);
    else
      narrow_panels<1, narrow_step_panels<1>()>(h + t, m, packed, panels, out + t, sub, pf);
    t += tb, pf = nullptr;  // the first group prefetches
  }
  return panels * kPanel;
}

template <typename Wt>
void expert_block_t(const SparseFFNProblem& p, const PackedView& pk, int64_t e, const int32_t* tokens, int64_t n,
                    float* out, const BlockScratch& s, int64_t next_e) {
  // Narrow experts prefetch the next block's expert, each place of it as they read the same place of their own.
  const int64_t ahead = pk.dot && next_e >= 0 ? (next_e - e) * pk.expert_stride : 0;
  // hs: the stride of h's rows. The panel form writes mp (m padded to whole vectors) columns a token; dot products
  // write m, so the activation does not run over padding (256 experts of 6: 16 values a token on the AVX-512 path).
  const int64_t d = p.d, m = p.m, mp = pk.mp, hs = pk.dot ? m : mp;
  for (int64_t r = 0; r < n; ++r) {
    s.a[r] = p.x + tokens[r] * d;
    s.out[r] = out + tokens[r] * d;
  }
  // h = scale * (W x) + bias (scale: int8 row scales, else none); rows of h are hs apart.
  auto first_layer = [&](const void* packed, const float* scale, const float* bias, float* h) {
    for (int64_t r = 0; r < n; ++r) s.h[r] = h + r * hs;
    const Wt* w = static_cast<const Wt*>(packed) + e * pk.expert_stride;
    if (pk.dot) {
      dot_layer<kDotTB>(s.a, n, d, m, w, s.h, ahead ? w + ahead : nullptr);
    } else {
      apply_panels(s.a, n, d, w, mp, s.h, false, s.shifted, pk.prefetch_few);
    }
    if (scale)
      for (int64_t r = 0; r < n; ++r)
        for (int64_t j = 0; j < m; ++j) h[r * hs + j] *= scale[e * m + j];
    if (bias)
      for (int64_t r = 0; r < n; ++r)
        for (int64_t j = 0; j < m; ++j) h[r * hs + j] += bias[e * m + j];
  };
  first_layer(pk.w1p, p.w1_scale, p.b1, s.up);
  if (p.wg) {
    first_layer(pk.wgp, p.wg_scale, p.bg, s.gate);
    gate_multiply(p.activation, s.gate, s.up, n * hs);  // panel padding neurons: act(0) * 0 = 0
  } else {
    activate(p.activation, s.up, n * hs);  // panel padding neurons stay act(0) = 0
  }
  // Second layer: W2's row scales fold into h; packed panels over the first dl output columns, plain
  // rows for the (< L) rest.
  if (p.w2_scale)
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < m; ++j) s.up[r * hs + j] *= p.w2_scale[e * m + j];
  for (int64_t r = 0; r < n; ++r) s.a[r] = s.up + r * hs;
  // The expert's unselected bias U[e] (already in the output's base) comes off as the tiles are loaded.
  const float* u = p.unselected_bias ? p.unselected_bias + e * d : nullptr;
  const Wt* w2 = static_cast<const Wt*>(pk.w2p) + e * pk.expert_stride;
  const int64_t done = pk.dot ? narrow_second(s.a, n, m, w2, pk.dl, s.out, u, ahead ? w2 + ahead : nullptr) : 0;
  if (done < pk.dl) {
    for (int64_t r = 0; r < n; ++r) s.h[r] = s.out[r] + done;
    apply_panels(s.a, n, m, w2 + m * done, pk.dl - done, s.h, true, s.shifted, pk.prefetch_few,
                 u ? u + done : nullptr);
  }
  if (pk.dl < d) {
    const Wt* w2 = static_cast<const Wt*>(p.w2) + e * m * d;
    for (int64_t r = 0; r < n; ++r)
      for (int64_t i = pk.dl; i < d; ++i) {
        float acc = s.out[r][i] - (u ? u[i] : 0.f);
        for (int64_t j = 0; j < m; ++j) acc += s.up[r * hs + j] * widen(w2[j * d + i]);
        s.out[r][i] = acc;
      }
  }
}

void expert_block(const SparseFFNProblem& p, const PackedView& pk, int64_t e, const int32_t* tokens, int64_t n,
                  float* out, const BlockScratch& s, int64_t next_e) {
  if (p.weight_type == WeightType::kInt8)
    expert_block_t<int8_t>(p, pk, e, tokens, n, out, s, next_e);
  else if (kHalfLoads && p.weight_type == WeightType::kFloat16)  // else packed as float32 (pack_weights)
    expert_block_t<Half>(p, pk, e, tokens, n, out, s, next_e);
  else
    expert_block_t<float>(p, pk, e, tokens, n, out, s, next_e);
}

void router_scores(const SparseFFNProblem& p, const PackedView& pk, int64_t t0, int64_t n, float* scores,
                   const BlockScratch& s) {
  const int64_t ld = pk.ep;
  for (int64_t r = 0; r < n; ++r) {
    s.a[r] = p.x + (t0 + r) * p.d;
    s.out[r] = scores + r * ld;
  }
  apply_panels(s.a, n, p.d, pk.routerp, ld, s.out, false, s.shifted, pk.prefetch_few);
  if (p.router_b)
    for (int64_t r = 0; r < n; ++r)
      for (int64_t e = 0; e < p.experts; ++e) scores[r * ld + e] += p.router_b[e];
}

}  // namespace

#define MOEFY_STR2(x) #x
#define MOEFY_STR(x) MOEFY_STR2(x)
// The table this TU exports (its only symbol with external linkage).
extern const IsaKernels kKernels;
const IsaKernels kKernels = {MOEFY_STR(MOEFY_ISA_NS), MOEFY_TILE_NAME, L, kPanel, MOEFY_DOT_MAX_M,
                             MOEFY_PREFETCH_FEW_BYTES, MOEFY_PREFETCH_FEW_BYTES_AMD, kHalfLoads, &expert_block, &router_scores,
                             &order_keys, &count_at_least, &activate, &add};

}  // namespace MOEFY_ISA_NS
}  // namespace moefy
