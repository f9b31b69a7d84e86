// SparseExpertFFN kernel core, the ISA-free part: routing, top-k, grouping tokens by expert (counting sort),
// scheduling and scratch. Each expert's two weight blocks are read once per call, not once per token;
// workers pull expert blocks from a shared counter (large ones first, then in memory order), so a descheduled
// worker delays only the block it holds, and accumulate into their own output buffer, so no atomics touch the
// output. The hot loops are the IsaKernels of the chosen instruction set (simd_impl.h).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "sparse_ffn.h"

namespace moefy {
namespace {

// Packs src (element (col, row) at src[col * src_col_stride + row * src_row_stride]) into panels of `cols`
// columns (zero beyond `valid_cols`; a multiple of `lanes`) and `rows` rows: `panel` wide while they fit, then
// one panel of the rest (apply_panels reads the same layout).
template <typename Wt>
void pack_panels(const Wt* src, int64_t rows, int64_t cols, int64_t valid_cols, int64_t src_row_stride,
                 int64_t src_col_stride, int64_t panel, Wt* dst) {
  for (int64_t c = 0; c < cols;) {
    const int64_t w = c + panel <= cols ? panel : cols - c;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < w; ++k)
        dst[rows * c + r * w + k] = c + k < valid_cols ? src[(c + k) * src_col_stride + r * src_row_stride] : Wt{};
    c += w;
  }
}

// The dot-product layout of a first layer (PackedView::dot): W [m, d] as [ceil(d / L)][m][L], zero beyond d.
template <typename Wt>
void pack_dot_rows(const Wt* src, int64_t m, int64_t d, int64_t L, Wt* dst) {
  for (int64_t c = 0; c < d; c += L)
    for (int64_t j = 0; j < m; ++j)
      for (int64_t i = 0; i < L; ++i) *dst++ = c + i < d ? src[j * d + c + i] : Wt{};
}

// One expert's packed blocks lie back to back: its first layer, its gate, its second layer, then the next
// expert's. So the weights a call reads for an expert are one contiguous stream that the hardware prefetcher
// follows from one matrix into the next (three separate streams per expert restarted it each time: with int8
// weights at one token, each stream is only tens of KB).
template <typename Wt>
void pack_experts(const SparseFFNProblem& p, PackedView& v, HugeVector<Wt>& storage) {
  const int64_t E = p.experts, m = p.m, d = p.d;
  const int64_t first = v.dot ? (d + v.lanes - 1) / v.lanes * v.lanes * m : d * v.mp, second = m * v.dl;
  v.expert_stride = first * (p.wg ? 2 : 1) + second;
  storage.resize(E * v.expert_stride);
  Wt* base = storage.data();
  for (int64_t e = 0; e < E; ++e) {
    Wt* dst = base + e * v.expert_stride;
    // First layer (and gate): W[e] is [m, d]; panels run over neurons (columns), rows over d; or dot rows.
    const Wt* w1 = static_cast<const Wt*>(p.w1) + e * m * d;
    const Wt* wg = p.wg ? static_cast<const Wt*>(p.wg) + e * m * d : nullptr;
    if (v.dot) {
      pack_dot_rows(w1, m, d, v.lanes, dst);
      if (wg) pack_dot_rows(wg, m, d, v.lanes, dst + first);
    } else {
      pack_panels(w1, d, v.mp, m, 1, d, v.panel, dst);
      if (wg) pack_panels(wg, d, v.mp, m, 1, d, v.panel, dst + first);
    }
    // Second layer: W2[e] is [m, d]; panels run over output columns, rows over m.
    pack_panels(static_cast<const Wt*>(p.w2) + e * m * d, m, v.dl, v.dl, d, 1, v.panel,
                dst + first * (p.wg ? 2 : 1));
  }
  v.w1p = base;
  v.wgp = p.wg ? base + first : nullptr;
  v.w2p = base + first * (p.wg ? 2 : 1);
}

// Router ranking: NaN below every number, equal scores (-0 = +0) to the lower index. order_key maps a score
// to an unsigned integer in that order of scores (NaN 0); rank_key appends the index, larger = better.
inline uint32_t order_key(float score) {
  score += 0.f;  // -0 ranks as +0
  uint32_t bits;
  std::memcpy(&bits, &score, sizeof bits);
  const uint32_t flip = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31) | 0x80000000u;
  return score != score ? 0u : bits ^ flip;  // negatives: all bits flipped; positives: the sign bit set
}
inline uint64_t rank_key(float score, int64_t e) {
  return uint64_t{order_key(score)} << 32 | (0xFFFFFFFFu - static_cast<uint32_t>(e));
}
inline int32_t key_index(uint64_t key) { return static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(key)); }

// The k-th largest of n order keys: the largest t with at least k keys >= t, found bit by bit from the top,
// each step one branch-free (vectorised) count over the keys. It stops as soon as exactly k keys pass, which
// for real-valued scores is after a dozen steps or so, not 32. 2-4x faster than nth_element on (score,
// index) keys plus a sort of the k, whose compares mispredict half the time (96 experts, top-24: 1.5 ->
// 0.43 us per token on Zen 4; that was 14% of the operator's time at 128 tokens).
inline uint32_t kth_largest(const IsaKernels& isa, const uint32_t* u, int64_t n, int64_t k) {
  uint32_t t = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t candidate = t | (uint32_t{1} << bit);
    const int64_t count = isa.count_at_least(u, n, candidate);
    if (count >= k) t = candidate;
    if (count == k) break;
  }
  return t;
}

// Scratch of the thread running an expert block or a routing range. Grows to the largest call it has
// seen and is reused: calls after that allocate nothing.
struct ThreadScratch {
  std::vector<float> up, gate, scores, routerp;
  std::vector<const float*> a;
  std::vector<float*> out, h, shifted;
  std::vector<uint32_t> order;
  std::vector<int32_t> picked;
  std::vector<uint64_t> keys;
  BlockScratch block(int64_t mp, bool gated) {
    const std::size_t n = static_cast<std::size_t>(kTokenBlock * mp);
    if (up.size() < n) up.resize(n);
    if (gated && gate.size() < n) gate.resize(n);
    if (a.size() < static_cast<std::size_t>(kTokenBlock))
      a.resize(kTokenBlock), out.resize(kTokenBlock), h.resize(kTokenBlock), shifted.resize(kTokenBlock);
    return {up.data(), gate.data(), a.data(), out.data(), h.data(), shifted.data()};
  }
};
ThreadScratch& thread_scratch() {
  thread_local ThreadScratch s;
  return s;
}

struct Block {
  int64_t expert, begin, count;
};

// Scratch of the calling thread for one call (the plan and the other workers' output buffers).
struct CallScratch {
  std::vector<int32_t> selected, tokens;
  std::vector<int64_t> start, fill;
  std::vector<Block> blocks;
  std::vector<float> partial;
  std::vector<char> used;
};
CallScratch& call_scratch() {
  thread_local CallScratch s;
  return s;
}

template <typename T>
void grow(std::vector<T>& v, std::size_t n) {
  if (v.size() < n) v.resize(n);
}

// The view of `pk` for a call, with the router packed into this thread's scratch when the weights were
// packed without one (a router fed at run time while the experts are initializers).
PackedView routed_view(const SparseFFNProblem& p, const PackedWeights& pk) {
  PackedView v = pk.view;
  if (p.router_w && !v.routerp) {
    v.ep = (p.experts + v.lanes - 1) / v.lanes * v.lanes;
    std::vector<float>& r = thread_scratch().routerp;
    grow(r, static_cast<std::size_t>(p.d * v.ep));
    pack_panels(p.router_w, p.d, v.ep, p.experts, 1, p.d, v.panel, r.data());
    v.routerp = r.data();
  }
  return v;
}

void select_range(const SparseFFNProblem& p, const PackedWeights& pk, const PackedView& v, int64_t t_begin,
                  int64_t t_end, int32_t* selected) {
  const int64_t E = p.experts, k = p.top_k;
  const bool dynamic = p.score_threshold > -std::numeric_limits<float>::infinity();
  ThreadScratch& ts = thread_scratch();
  grow(ts.order, static_cast<std::size_t>(E));
  grow(ts.picked, static_cast<std::size_t>(E + 1));
  grow(ts.keys, static_cast<std::size_t>(k));
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kTokenBlock) {
    const int64_t n = std::min(kTokenBlock, t_end - t0);
    // Scores of this chunk: given, or one panel product on the packed router.
    const float* s;
    int64_t ld;
    if (p.router_scores) {
      s = p.router_scores + t0 * E, ld = E;
    } else {
      grow(ts.scores, static_cast<std::size_t>(kTokenBlock * v.ep));
      pk.isa->router_scores(p, v, t0, n, ts.scores.data(), ts.block(v.mp, p.wg != nullptr));
      s = ts.scores.data(), ld = v.ep;
    }
    // The k best: those above the k-th largest key and, of the keys equal to it, the lowest indices; in
    // index order (the sum over experts does not depend on it), ranked only for dynamic k, which keeps the
    // first min_k in rank order and drops the rest below the threshold.
    uint32_t* u = ts.order.data();
    for (int64_t r = 0; r < n; ++r) {
      const float* row = s + r * ld;
      pk.isa->order_keys(row, E, u);
      const uint32_t kth = kth_largest(*pk.isa, u, E, k);
      int64_t ties = k - (kth == 0xFFFFFFFFu ? 0 : pk.isa->count_at_least(u, E, kth + 1));  // k minus those above
      int32_t* out = selected + (t0 + r) * k;
      int32_t* picked = ts.picked.data();  // E + 1 slots: every index is written, the chosen ones kept
      int64_t j = 0;
      for (int64_t e = 0; e < E; ++e) {
        const bool take = u[e] > kth || (u[e] == kth && ties-- > 0);
        picked[j] = static_cast<int32_t>(e);
        j += take;
      }
      std::memcpy(out, picked, k * sizeof(int32_t));
      if (dynamic) {
        uint64_t* keys = ts.keys.data();
        for (int64_t i = 0; i < k; ++i) keys[i] = rank_key(row[out[i]], out[i]);
        std::sort(keys, keys + k, std::greater<uint64_t>());
        for (int64_t i = 0; i < k; ++i) {
          const int32_t e = key_index(keys[i]);
          out[i] = i >= p.min_k && row[e] < p.score_threshold ? -1 : e;
        }
      }
    }
  }
}

}  // namespace

PackedWeights pack_weights(const SparseFFNProblem& p, const IsaKernels& isa) {
  PackedWeights pk;
  pk.isa = &isa;
  PackedView& v = pk.view;
  const int64_t E = p.experts, d = p.d, L = isa.lanes;
  v.panel = isa.panel, v.lanes = L;
  v.mp = (p.m + L - 1) / L * L;
  v.dl = d / L * L;
  v.dot = p.m <= isa.dot_max_m;
  v.prefetch_few = cpu_is_amd() ? isa.prefetch_few_amd : isa.prefetch_few;
  pk.weight_type = p.weight_type;
  if (p.weight_type == WeightType::kInt8) {
    pack_experts<int8_t>(p, v, pk.experts_q);
  } else if (p.weight_type == WeightType::kFloat16 && isa.half_loads) {
    pack_experts<Half>(p, v, pk.experts_h);
  } else if (p.weight_type == WeightType::kFloat16) {
    // A path that cannot widen float16 as it loads (SSE, generic) packs float32 panels of the same values.
    const std::size_t n = static_cast<std::size_t>(E * p.m * d);
    auto widen = [n](const void* w) {
      std::vector<float> f(n);
      for (std::size_t i = 0; i < n; ++i) f[i] = half_to_float(static_cast<const Half*>(w)[i]);
      return f;
    };
    std::vector<float> w1 = widen(p.w1), wg = p.wg ? widen(p.wg) : std::vector<float>{};
    pk.widened_w2 = widen(p.w2);
    SparseFFNProblem wide = p;
    wide.weight_type = pk.weight_type = WeightType::kFloat32;
    wide.w1 = w1.data(), wide.w2 = pk.widened_w2.data(), wide.wg = p.wg ? wg.data() : nullptr;
    pack_experts<float>(wide, v, pk.experts_f);
  } else {
    pack_experts<float>(p, v, pk.experts_f);
  }
  // Router: router_w [E, d] as panels over experts (columns), rows over d.
  if (p.router_w) {
    v.ep = (E + L - 1) / L * L;
    pk.routerp_storage.resize(d * v.ep);
    pack_panels(p.router_w, d, v.ep, E, 1, d, v.panel, pk.routerp_storage.data());
    v.routerp = pk.routerp_storage.data();
  }
  if (p.b2 || p.unselected_bias) {
    pk.base.assign(d, 0.f);
    if (p.b2) std::memcpy(pk.base.data(), p.b2, d * sizeof(float));
    if (p.unselected_bias)
      for (int64_t e = 0; e < E; ++e) isa.add(pk.base.data(), p.unselected_bias + e * d, d);
    pk.base_b2 = p.b2, pk.base_unselected = p.unselected_bias, pk.has_base = true;
  }
  return pk;
}

void sparse_ffn(const SparseFFNProblem& p, const IsaKernels& isa, const ParallelFor& pfor, std::size_t workers) {
  SparseFFNProblem unpacked = p;
  unpacked.b2 = unpacked.unselected_bias = nullptr;  // the base is computed per call below
  PackedWeights pk = pack_weights(unpacked, isa);
  sparse_ffn(p, pk, pfor, workers);
}

// Expert blocks of at least this many tokens are scheduled first, heaviest first (sparse_ffn).
constexpr int64_t kLargeBlock = kTokenBlock / 2;

void sparse_ffn(const SparseFFNProblem& given, const PackedWeights& pk, const ParallelFor& pfor,
                std::size_t workers) {
  // The hot loops read the packed weights' type (and W2's left-out columns from its widened copy, if any).
  SparseFFNProblem p = given;
  p.weight_type = pk.weight_type;
  if (!pk.widened_w2.empty()) p.w2 = pk.widened_w2.data();
  const int64_t T = p.tokens, d = p.d, E = p.experts, k = p.top_k;
  if (T == 0 || d == 0) return;  // Y is empty (and memcpy below must not be handed null pointers)
  const IsaKernels& isa = *pk.isa;
  CallScratch& cs = call_scratch();

  // Output starts at B2 + sum_e U[e]; each selected expert then adds its output minus U[e].
  if (pk.has_base && p.b2 == pk.base_b2 && p.unselected_bias == pk.base_unselected) {
    for (int64_t t = 0; t < T; ++t) std::memcpy(p.y + t * d, pk.base.data(), d * sizeof(float));
  } else {
    if (p.b2)
      std::memcpy(p.y, p.b2, d * sizeof(float));
    else
      std::memset(p.y, 0, d * sizeof(float));
    if (p.unselected_bias)
      for (int64_t e = 0; e < E; ++e) isa.add(p.y, p.unselected_bias + e * d, d);
    for (int64_t t = 1; t < T; ++t) std::memcpy(p.y + t * d, p.y, d * sizeof(float));
  }

  // Routing, parallel over token ranges (router_w . x is T x E x d work: not negligible for wide models).
  const PackedView view = routed_view(p, pk);
  grow(cs.selected, static_cast<std::size_t>(T * k));
  int32_t* selected = cs.selected.data();
  const std::size_t route_parts = std::max<std::size_t>(1, std::min<std::size_t>(workers, (T + 7) / 8));
  if (route_parts == 1) {
    select_range(p, pk, view, 0, T, selected);
  } else {
    auto route = [&](std::size_t w) {
      select_range(p, pk, view, T * w / route_parts, T * (w + 1) / route_parts, selected);
    };
    pfor(route_parts, TaskRef(route));
  }

  // Counting sort of (token, expert) pairs by expert.
  grow(cs.start, static_cast<std::size_t>(E + 1));
  grow(cs.fill, static_cast<std::size_t>(E));
  grow(cs.tokens, static_cast<std::size_t>(T * k));
  int64_t* start = cs.start.data();
  std::fill(start, start + E + 1, 0);
  for (int64_t i = 0; i < T * k; ++i)
    if (selected[i] >= 0) ++start[selected[i] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::copy(start, start + E, cs.fill.begin());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j)
      if (const int32_t e = selected[t * k + j]; e >= 0) cs.tokens[cs.fill[e]++] = static_cast<int32_t>(t);

  // Blocks of <= kTokenBlock tokens of one expert: the large ones first, heaviest first, which balances the
  // workers' ends; then the small ones in memory order. Packed experts lie back to back, so small blocks,
  // which mostly stream weights, then read one forward stream that the prefetchers follow from one expert
  // into the next (taken by size, each restarted it: with 96 experts of 16 neurons, 16 tokens, the
  // operator waited on memory in the first layer; memory order made MiniLM 5-16% faster end to end).
  cs.blocks.clear();  // keeps its capacity
  for (int64_t e = 0; e < E; ++e)
    for (int64_t b = start[e]; b < start[e + 1]; b += kTokenBlock)
      cs.blocks.push_back({e, b, std::min(kTokenBlock, start[e + 1] - b)});
  std::sort(cs.blocks.begin(), cs.blocks.end(), [](const Block& a, const Block& b) {
    const bool large_a = a.count >= kLargeBlock, large_b = b.count >= kLargeBlock;
    if (large_a != large_b) return large_a;
    if (large_a && a.count != b.count) return a.count > b.count;
    return a.expert != b.expert ? a.expert < b.expert : a.begin < b.begin;
  });
  const std::size_t nblocks = cs.blocks.size();
  if (nblocks == 0) return;

  workers = std::max<std::size_t>(1, std::min(workers, nblocks));
  // Worker 0 accumulates straight into y; each other worker into its own buffer, zeroed when it takes its
  // first block (a worker the pool never ran costs nothing), summed at the end.
  grow(cs.partial, static_cast<std::size_t>((workers - 1) * T * d));
  cs.used.assign(workers, 0);  // no allocation once grown
  std::atomic<std::size_t> next{0};
  const bool gated = p.wg != nullptr;
  auto work = [&](std::size_t w) {
    float* out = w == 0 ? p.y : cs.partial.data() + (w - 1) * T * d;
    BlockScratch s{};
    for (std::size_t b; (b = next.fetch_add(1, std::memory_order_relaxed)) < nblocks;) {
      if (!cs.used[w]) {
        if (w > 0) std::memset(out, 0, T * d * sizeof(float));
        s = thread_scratch().block(view.mp, gated);
        cs.used[w] = 1;
      }
      const Block& blk = cs.blocks[b];
      const int64_t next_e = b + 1 < nblocks && cs.blocks[b + 1].expert != blk.expert ? cs.blocks[b + 1].expert : -1;
      isa.expert_block(p, view, blk.expert, cs.tokens.data() + blk.begin, blk.count, out, s, next_e);
    }
  };
  if (workers == 1)
    work(0);
  else
    pfor(workers, TaskRef(work));
  for (std::size_t w = 1; w < workers; ++w)
    if (cs.used[w]) isa.add(p.y, cs.partial.data() + (w - 1) * T * d, T * d);
}

}  // namespace moefy
