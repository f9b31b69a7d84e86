"""Numba kernels of ``SparseExpertFFN`` (same contract as runtime/reference.py).

Same plan as cpp_ops/kernels/sparse_ffn.cc: tokens are grouped by expert (counting sort) into blocks
of <= 64 tokens, so each expert's weights are read once per block rather than once per token; blocks
are dealt to the workers heaviest first (static longest-processing-time schedule); every worker
accumulates into its own output buffer (worker 0 straight into Y), summed at the end.

What differs from the C++ kernel is the shape of the inner loops, chosen for what Numba/LLVM
vectorizes well (Numba has no SIMD types, but LLVM vectorizes a reduction loop with many scalar
accumulators under fastmath):

* both layers are "dot blocks": 4 tokens x 4 weight rows, 16 scalar accumulators, one loop along the
  contiguous dimension -> 16 vector accumulators, 8 vector loads per 16 FMAs;
* layer 1 reads W1 / Wg as given ([E, m, d], rows contiguous along d) in chunks of d so the current
  rows stay in L1/L2 while every token group of the block uses them;
* layer 2 runs as axpy over the original W2: 4 tokens x 4 neurons per pass, in 512-column chunks
  that stay in L2 (a variant on a transposed, packed W2 measured no faster end to end);
* activations are branch-free rational approximations (Eigen's erf and tanh, |error| < 5e-7) that
  vectorize, instead of scalar libm calls;
* the whole call (router, top-k, sort, schedule, experts, reduction) is one compiled function, and
  shape checking is memoized per (shapes, attributes), so small calls pay little Python overhead.

Compiled once and cached on disk (``cache=True``).
"""
from __future__ import annotations

from typing import Mapping

import numba
import numpy as np
from numba import njit, prange

from . import spec


def _prefer_512_bit_vectors() -> None:
    """LLVM's tuning for AVX-512 CPUs prefers 256-bit vectors; these kernels' loops (dot blocks, axpy,
    activations) run ~1.25x faster with 512-bit ones (benchmarks/README.md). So, unless NUMBA_CPU_NAME or
    NUMBA_CPU_FEATURES is set, compile with the host's features minus that preference. This applies to all
    Numba code the process compiles afterwards (and to none compiled before: it must come first)."""
    from numba.core import config
    if config.CPU_FEATURES is not None or config.CPU_NAME is not None:
        return
    try:
        import llvmlite.binding as llvm
        features = llvm.get_host_cpu_features().flatten()
    except RuntimeError:  # unknown host: leave Numba's defaults
        return
    if "+avx512f" in features.split(","):
        config.CPU_FEATURES = features + ",-prefer-256-bit"


_prefer_512_bit_vectors()


def _cache_by_content() -> None:
    """Numba keys a cached function on its own source file only: numba_host's cfuncs inline this module's
    functions, so after an upgrade that changed only this file they would load stale machine code (an
    upgrade that fixed the NaN rule of the selection kept the old rule that way). So, unless NUMBA_CACHE_DIR
    is set, the kernels cache in a directory named after the content of the kernel sources."""
    import hashlib
    import os
    from pathlib import Path

    from numba.core import config
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    here = Path(__file__).parent
    digest = hashlib.sha256(b"".join((here / f).read_bytes() for f in ("numba_kernels.py", "numba_host.py",
                                                                         "spec.py"))).hexdigest()[:16]
    path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moefy" / "numba" / digest
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable cache: Numba's own places (next to the sources, else its user dir)
        return
    config.CACHE_DIR = str(path)


_cache_by_content()

# OpenMP's wait policy is left to the user (OMP_WAIT_POLICY / GOMP_SPINCOUNT): measured here, "passive"
# makes each 2-thread parallel region cost ~0.6 ms on a quiet machine (25 us by default), while on a
# machine another process keeps busy the default spinning costs ~8 ms per region and "passive" ~5 us.

ACTIVATION_CODES = {name: i for i, name in enumerate(spec.ACTIVATIONS)}
_TOKEN_BLOCK = 64  # tokens per work item: bounds scratch and balances threads
_D_CHUNK = 512
_OUT_CHUNK = 512  # layer-2 (axpy) output chunk: W2[e][:, chunk] stays in L2 for all token groups  # layer-1 reduction chunk (floats): 4 weight rows + a token group's rows stay in L1/L2
_EMPTY1 = np.zeros(0, np.float32)
_EMPTY2 = np.zeros((0, 0), np.float32)


# ----------------------------------------------------------------------------------------- activations
@njit(cache=True, error_model="numpy", fastmath=True, inline="always")
def _erf(x):
    """erf, Eigen's float rational approximation (|error| < 5e-7); vectorizes."""
    lim = np.float32(4.0)
    x = x if x < lim else lim
    x = x if x > -lim else -lim
    x2 = x * x
    p = np.float32(-2.72614225801306e-10)
    p = p * x2 + np.float32(2.77068142495902e-08)
    p = p * x2 + np.float32(-2.10102402082508e-06)
    p = p * x2 + np.float32(-5.69250639462346e-05)
    p = p * x2 + np.float32(-7.34990630326855e-04)
    p = p * x2 + np.float32(-2.95459980854025e-03)
    p = p * x2 + np.float32(-1.60960333262415e-02)
    q = np.float32(-1.45660718464996e-05)
    q = q * x2 + np.float32(-2.13374055278905e-04)
    q = q * x2 + np.float32(-1.68282697438203e-03)
    q = q * x2 + np.float32(-7.37332916720468e-03)
    q = q * x2 + np.float32(-1.42647390514189e-02)
    return x * p / q


@njit(cache=True, error_model="numpy", fastmath=True, inline="always")
def _tanh(x):
    """tanh, Eigen's float rational approximation (|error| < 5e-7); vectorizes."""
    lim = np.float32(7.90531110763549805)
    x = x if x < lim else lim
    x = x if x > -lim else -lim
    x2 = x * x
    p = np.float32(-2.76076847742355e-16)
    p = p * x2 + np.float32(2.00018790482477e-13)
    p = p * x2 + np.float32(-8.60467152213735e-11)
    p = p * x2 + np.float32(5.12229709037114e-08)
    p = p * x2 + np.float32(1.48572235717979e-05)
    p = p * x2 + np.float32(6.37261928875436e-04)
    p = p * x2 + np.float32(4.89352455891786e-03)
    q = np.float32(1.19825839466702e-06)
    q = q * x2 + np.float32(1.18534705686654e-04)
    q = q * x2 + np.float32(2.26843463243900e-03)
    q = q * x2 + np.float32(4.89352518554385e-03)
    return x * p / q


@njit(cache=True, error_model="numpy", fastmath=True)
def _act_flat(z, code, out, gated):
    """out[i] = act(out[i]) (plain: z unused, since LLVM does not vectorize a loop reading z and writing out when
    they may alias, and in place they do: 5x slower) or act(z[i]) * out[i] (gated); 1-D contiguous, vectorizes."""
    half = np.float32(0.5)
    one = np.float32(1.0)
    n = z.shape[0]
    if code == 0:
        if gated:
            for i in range(n):
                v = z[i]
                out[i] = (v if v > np.float32(0.0) else np.float32(0.0)) * out[i]
        else:
            for i in range(n):
                v = out[i]
                out[i] = v if v > np.float32(0.0) else np.float32(0.0)
    elif code == 1:
        if gated:
            for i in range(n):
                v = z[i]
                out[i] = half * v * (one + _erf(v * np.float32(0.7071067811865476))) * out[i]
        else:
            for i in range(n):
                v = out[i]
                out[i] = half * v * (one + _erf(v * np.float32(0.7071067811865476)))
    elif code == 2:
        c0, c1 = np.float32(0.7978845608028654), np.float32(0.044715)
        if gated:
            for i in range(n):
                v = z[i]
                out[i] = half * v * (one + _tanh(c0 * (v + c1 * v * v * v))) * out[i]
        else:
            for i in range(n):
                v = out[i]
                out[i] = half * v * (one + _tanh(c0 * (v + c1 * v * v * v)))
    else:  # silu(z) = z * sigmoid(z) = z/2 * (1 + tanh(z/2))
        if gated:
            for i in range(n):
                v = z[i]
                out[i] = half * v * (one + _tanh(half * v)) * out[i]
        else:
            for i in range(n):
                v = out[i]
                out[i] = half * v * (one + _tanh(half * v))


@njit(cache=True, error_model="numpy", fastmath=True)
def _activate(h, n, code, gate):
    """h[:n] = act(h[:n]) (plain) or act(gate[:n]) * h[:n] (gated: gate non-empty)."""
    cols = h.shape[1]
    hf = h.reshape(h.shape[0] * cols)[:n * cols]
    if gate.shape[0] > 0:
        _act_flat(gate.reshape(gate.shape[0] * cols)[:n * cols], code, hf, True)
    else:
        _act_flat(hf, code, hf, False)  # in place


# ------------------------------------------------------------------------------------------ dot blocks
@njit(cache=True, error_model="numpy", fastmath=True)
def _dot44(a, r0, r1, r2, r3, b, c, i0, i1):
    """The 16 dot products <a[r_p, i0:i1], b[c + q, i0:i1]>: one loop, 16 vector accumulators."""
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0.0)
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = np.float32(0.0)
    for i in range(np.uint64(i0), np.uint64(i1)):  # unsigned: no wraparound check, so no gathers
        # float32(...) widens int8 weights and is a no-op on float32 ones
        w0, w1, w2, w3 = np.float32(b[c, i]), np.float32(b[c + 1, i]), np.float32(b[c + 2, i]), np.float32(b[c + 3, i])
        x = a[r0, i]
        s00 += x * w0
        s01 += x * w1
        s02 += x * w2
        s03 += x * w3
        x = a[r1, i]
        s10 += x * w0
        s11 += x * w1
        s12 += x * w2
        s13 += x * w3
        x = a[r2, i]
        s20 += x * w0
        s21 += x * w1
        s22 += x * w2
        s23 += x * w3
        x = a[r3, i]
        s30 += x * w0
        s31 += x * w1
        s32 += x * w2
        s33 += x * w3
    return (s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)


@njit(cache=True, error_model="numpy", fastmath=True)
def _dot14(a, r0, b, c, i0, i1):
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for i in range(np.uint64(i0), np.uint64(i1)):  # unsigned: no wraparound check, so no gathers
        x = a[r0, i]
        s0 += x * np.float32(b[c, i])
        s1 += x * np.float32(b[c + 1, i])
        s2 += x * np.float32(b[c + 2, i])
        s3 += x * np.float32(b[c + 3, i])
    return s0, s1, s2, s3


@njit(cache=True, error_model="numpy", fastmath=True)
def _dot11(a, r0, b, c, i0, i1):
    s = np.float32(0.0)
    for i in range(np.uint64(i0), np.uint64(i1)):  # unsigned: no wraparound check, so no gathers
        s += a[r0, i] * np.float32(b[c, i])
    return s


@njit(cache=True, error_model="numpy", fastmath=True)
def _rows_dot(a, rows, n, w, i0, i1, out):
    """out[r, c] += <a[rows[r], i0:i1], w[c, i0:i1]> for r < n, c < w.shape[0] (rows None-like: identity)."""
    nc = w.shape[0]
    n4, c4 = n - n % 4, nc - nc % 4
    for c in range(0, c4, 4):
        for r in range(0, n4, 4):
            s = _dot44(a, rows[r], rows[r + 1], rows[r + 2], rows[r + 3], w, c, i0, i1)
            for p in range(4):
                o = out[r + p]
                o[c] += s[4 * p]
                o[c + 1] += s[4 * p + 1]
                o[c + 2] += s[4 * p + 2]
                o[c + 3] += s[4 * p + 3]
        for r in range(n4, n):
            s0, s1, s2, s3 = _dot14(a, rows[r], w, c, i0, i1)
            out[r, c] += s0
            out[r, c + 1] += s1
            out[r, c + 2] += s2
            out[r, c + 3] += s3
    for c in range(c4, nc):
        for r in range(n):
            out[r, c] += _dot11(a, rows[r], w, c, i0, i1)


@njit(cache=True, error_model="numpy", fastmath=True)
def _first_layer(x, rows, n, w, scales, e, bias, h):
    """h[r, :m] = bias[e] + scales[e] * (w @ x[rows[r]]) (w [m, d]; scales: int8 row scales [E, m], or empty;
    bias [E, m] or empty); h's padding columns stay 0."""
    d = x.shape[1]
    m = w.shape[0]
    h[:n] = 0.0
    for i0 in range(0, d, _D_CHUNK):
        _rows_dot(x, rows, n, w, i0, min(d, i0 + _D_CHUNK), h)
    if scales.shape[0] > 0:
        for r in range(n):
            for j in range(m):
                h[r, j] *= scales[e, j]
    if bias.shape[0] > 0:
        for r in range(n):
            for j in range(m):
                h[r, j] += bias[e, j]


@njit(cache=True, error_model="numpy", fastmath=True)
def _second_layer_rows(h, n, m, w2, rows, out):
    """out[rows[r], :] += sum_j h[r, j] * w2[j, :] (w2 [m, d] as given): axpy, 4 tokens per pass."""
    d = w2.shape[1]
    for i0 in range(0, d, _OUT_CHUNK):  # this W2 column chunk stays in L2 for all token groups
        i1 = min(d, i0 + _OUT_CHUNK)
        n4, m4 = n - n % 4, m - m % 4
        for r in range(0, n4, 4):
            o0, o1, o2, o3 = out[rows[r]], out[rows[r + 1]], out[rows[r + 2]], out[rows[r + 3]]
            for j in range(0, m4, 4):
                h00, h01, h02, h03 = h[r, j], h[r, j + 1], h[r, j + 2], h[r, j + 3]
                h10, h11, h12, h13 = h[r + 1, j], h[r + 1, j + 1], h[r + 1, j + 2], h[r + 1, j + 3]
                h20, h21, h22, h23 = h[r + 2, j], h[r + 2, j + 1], h[r + 2, j + 2], h[r + 2, j + 3]
                h30, h31, h32, h33 = h[r + 3, j], h[r + 3, j + 1], h[r + 3, j + 2], h[r + 3, j + 3]
                w0, w1, w2_, w3 = w2[j], w2[j + 1], w2[j + 2], w2[j + 3]
                for i in range(np.uint64(i0), np.uint64(i1)):
                    a, b, c, e = np.float32(w0[i]), np.float32(w1[i]), np.float32(w2_[i]), np.float32(w3[i])
                    o0[i] += h00 * a + h01 * b + h02 * c + h03 * e
                    o1[i] += h10 * a + h11 * b + h12 * c + h13 * e
                    o2[i] += h20 * a + h21 * b + h22 * c + h23 * e
                    o3[i] += h30 * a + h31 * b + h32 * c + h33 * e
            for j in range(m4, m):
                h0, h1, h2, h3 = h[r, j], h[r + 1, j], h[r + 2, j], h[r + 3, j]
                wj = w2[j]
                for i in range(np.uint64(i0), np.uint64(i1)):
                    v = np.float32(wj[i])
                    o0[i] += h0 * v
                    o1[i] += h1 * v
                    o2[i] += h2 * v
                    o3[i] += h3 * v
        for r in range(n4, n):
            o0 = out[rows[r]]
            for j in range(m):
                h0 = h[r, j]
                wj = w2[j]
                for i in range(np.uint64(i0), np.uint64(i1)):
                    o0[i] += h0 * np.float32(wj[i])


# --------------------------------------------------------------------------------------------- routing
# The selection helpers compare scores that may be NaN, so they must not run under fastmath, whose ``nnan`` flag lets
# LLVM fold isnan(v) and v != v to False. A Numba function without its own fastmath setting inherits its caller's
# (numba.core.cpu.CPUTargetOptions.finalize), so whether they were compiled (and cached on disk) fast or not would
# depend on which caller compiled them first: they say fastmath=False, and test NaN on the bits, which no
# floating-point flag can fold even if LLVM inlines them into the fastmath _route.
@njit(cache=True, fastmath=False)
def _is_nan(v):
    """v is NaN: a float32 with all exponent bits set and a non-zero mantissa."""
    return (np.float32(v).view(np.uint32) & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)


@njit(cache=True, fastmath=False)
def _better(a, b):
    """NaN ranks below every number; equal scores keep the earlier (lower) index."""
    if _is_nan(b):
        return not _is_nan(a)
    return not _is_nan(a) and a > b


@njit(cache=True, error_model="numpy", fastmath=True)
def _router_scores(x, router_w, router_b, t0, t1, s):
    """s[t0:t1] = x[t0:t1] @ router_w.T + router_b."""
    n = t1 - t0
    iota = np.arange(t0, t1).astype(np.int32)
    out = s[t0:t1]
    for r in range(n):
        for e in range(router_w.shape[0]):
            out[r, e] = router_b[e] if router_b.shape[0] > 0 else np.float32(0.0)
    _rows_dot(x, iota, n, router_w, 0, x.shape[1], out)


@njit(cache=True, fastmath=False)
def _select(s, k, min_k, threshold, t, sel, taken):
    """sel[t] = token t's top-k experts, best first; -1 for those dropped by dynamic k (after the first
    min_k, a score below threshold; NaN never is)."""
    E = s.shape[1]
    taken[:] = False
    for j in range(k):
        best = -1
        for e in range(E):
            if not taken[e] and (best < 0 or _better(s[t, e], s[t, best])):
                best = e
        taken[best] = True
        v = s[t, best]
        sel[t, j] = -1 if j >= min_k and not _is_nan(v) and v < threshold else best


# --------------------------------------------------------------------------------------------- phases
# One call runs in four phases: route (parallel over token ranges), plan (serial), experts (parallel over
# workers), reduce (parallel over token ranges). `_ffn` runs them on Numba's own threads; runtime/numba_host.py
# runs the same functions on ONNX Runtime's thread pool, inside its graph. Arrays absent from the call are
# empty (shape 0); the scales are empty for float32 weights.

@njit(cache=True)
def _token_range(T, part, parts):
    """Tokens [t0, t1) of range `part` of `parts`; inner bounds are multiples of 4 (the dot blocks' height)."""
    t0 = (T * part // parts + 3) // 4 * 4 if part > 0 else 0
    t1 = (T * (part + 1) // parts + 3) // 4 * 4 if part + 1 < parts else T
    return min(t0, T), min(t1, T)


def max_blocks(T: int, k: int, E: int) -> int:
    """Upper bound on the number of (expert, <= _TOKEN_BLOCK tokens) work blocks of a call."""
    return (T * k + _TOKEN_BLOCK - 1) // _TOKEN_BLOCK + E


_max_blocks = njit(cache=True)(max_blocks)


@njit(cache=True, error_model="numpy", fastmath=True)
def _route(x, router_w, router_b, k, min_k, threshold, s, computed, sel, t0, t1):
    """sel[t] = the experts of tokens [t0, t1) (-1: dropped by dynamic k); their scores first go into s unless
    given (computed)."""
    if t0 >= t1:
        return
    if computed:
        _router_scores(x, router_w, router_b, t0, t1, s)
    taken = np.zeros(s.shape[1], np.bool_)
    for t in range(t0, t1):
        _select(s, k, min_k, threshold, t, sel, taken)


@njit(cache=True)
def _plan(sel, E, workers, start, tokens, b_e, b_begin, b_n, order, owner):
    """Counting sort of (token, expert) pairs by expert into blocks of <= _TOKEN_BLOCK tokens, dealt to the
    workers heaviest first, each to the least-loaded one (cost ~ weights + tokens). Returns (blocks, workers)."""
    T, k = sel.shape
    start[:] = 0
    for t in range(T):
        for j in range(k):
            if sel[t, j] >= 0:
                start[sel[t, j] + 1] += 1
    for e in range(E):
        start[e + 1] += start[e]
    fill = start[:-1].copy()
    for t in range(T):
        for j in range(k):
            e = sel[t, j]
            if e >= 0:
                tokens[fill[e]] = t
                fill[e] += 1
    nb = 0
    for e in range(E):
        p = start[e]
        while p < start[e + 1]:
            b_e[nb], b_begin[nb], b_n[nb] = e, p, min(_TOKEN_BLOCK, start[e + 1] - p)
            p += _TOKEN_BLOCK
            nb += 1
    W = max(1, min(workers, nb))
    order[:nb] = np.argsort(-b_n[:nb], kind="mergesort")
    load = np.zeros(W, np.int64)
    for q in range(nb):
        bi = order[q]
        w = 0
        for v in range(1, W):
            if load[v] < load[w]:
                w = v
        owner[bi] = w
        load[w] += b_n[bi] + 4
    return nb, W


@njit(cache=True, error_model="numpy", fastmath=True)
def _init_output(y, b2, ub):
    """y[t] = B2 + sum_e U[e] for every token: selected experts then add (their output - U[e])."""
    d = y.shape[1]
    base = np.zeros(d, np.float32)
    if b2.shape[0] > 0:
        base[:] = b2
    for e in range(ub.shape[0]):
        for i in range(d):
            base[i] += ub[e, i]
    for t in range(y.shape[0]):
        y[t] = base


@njit(cache=True, error_model="numpy", fastmath=True)
def _experts(w, x, w1, b1, w2, wg, bg, ub, w1s, w2s, wgs, act, tokens, b_e, b_begin, b_n, order, owner, nb,
             out, h, g):
    """Worker w's blocks, accumulated into out (Y itself for worker 0, else its own zeroed buffer); h and g
    are its [_TOKEN_BLOCK, mp] scratch (g empty for the plain form)."""
    m = w1.shape[1]
    d = x.shape[1]
    if w > 0:
        out[:] = 0.0
    for q in range(nb):
        bi = order[q]
        if owner[bi] != w:
            continue
        e, n = b_e[bi], b_n[bi]
        rows = tokens[b_begin[bi]:b_begin[bi] + n]
        _first_layer(x, rows, n, w1[e], w1s, e, b1, h)
        if g.shape[0] > 0:
            _first_layer(x, rows, n, wg[e], wgs, e, bg, g)
        _activate(h, n, act, g)
        if w2s.shape[0] > 0:  # W2's row scales fold into h
            for r in range(n):
                for j in range(m):
                    h[r, j] *= w2s[e, j]
        _second_layer_rows(h, n, m, w2[e], rows, out)
        if ub.shape[0] > 0:
            for r in range(n):
                o = out[rows[r]]
                for i in range(d):
                    o[i] -= ub[e, i]


@njit(cache=True, error_model="numpy", fastmath=True)
def _reduce(y, partial, W, t0, t1):
    """y[t0:t1] += the other workers' buffers."""
    d = y.shape[1]
    for t in range(t0, t1):
        for v in range(W - 1):
            pv = partial[v, t]
            for i in range(d):
                y[t, i] += pv[i]


# ---------------------------------------------------------------------------------------- whole call
@njit(cache=True, parallel=True, error_model="numpy", fastmath=True)
def _ffn(x, w1, b1, w2, wg, bg, b2, ub, scores, router_w, router_b, w1s, w2s, wgs, k, min_k, threshold, act, workers,
         y):
    """y[T, d] = the operator, on Numba's threads."""
    T, d = x.shape
    E, m = w1.shape[0], w1.shape[1]
    mp = (m + 15) // 16 * 16
    # routing and each range's top-k in one region (a serial top-k was ~60 us at 128 tokens, a second
    # region would cost as much)
    computed = scores.shape[0] == 0
    s = np.empty((T, E), np.float32) if computed else scores
    sel = np.empty((T, k), np.int32)
    parts = min(workers, (T + 3) // 4)
    for p in prange(parts):
        t0, t1 = _token_range(T, p, parts)
        _route(x, router_w, router_b, k, min_k, threshold, s, computed, sel, t0, t1)

    nbmax = _max_blocks(T, k, E)
    start = np.empty(E + 1, np.int64)
    tokens = np.empty(T * k, np.int32)
    b_e, b_begin, b_n = np.empty(nbmax, np.int64), np.empty(nbmax, np.int64), np.empty(nbmax, np.int64)
    order, owner = np.empty(nbmax, np.int64), np.empty(nbmax, np.int64)
    nb, W = _plan(sel, E, workers, start, tokens, b_e, b_begin, b_n, order, owner)
    _init_output(y, b2, ub)
    partial = np.empty((W - 1, T, d), np.float32)
    gated = wg.shape[0] > 0
    for w in prange(W):
        h = np.empty((_TOKEN_BLOCK, mp), np.float32)
        g = np.empty((_TOKEN_BLOCK, mp), np.float32) if gated else np.empty((0, 0), np.float32)
        _experts(w, x, w1, b1, w2, wg, bg, ub, w1s, w2s, wgs, act, tokens, b_e, b_begin, b_n, order, owner, nb,
                 y if w == 0 else partial[w - 1], h, g)
    if W > 1:  # serial: T x d adds cost less than waking the pool for a third parallel region
        _reduce(y, partial, W, 0, T)


# ---------------------------------------------------------------------------------------------- Python
_CHECKED: dict = {}


def _check(inputs, attrs):
    """spec.check_arrays, memoized on (shapes, element types, attributes): the checks depend on nothing else."""
    key = (tuple(None if inputs.get(n) is None else (tuple(inputs[n].shape), str(inputs[n].dtype))
                 for n in spec.INPUT_INDEX),
           tuple(sorted(attrs.items())))
    try:
        return _CHECKED[key]
    except (KeyError, TypeError):
        pass
    got = spec.check_arrays(inputs, attrs)
    try:
        if len(_CHECKED) > 256:
            _CHECKED.clear()
        _CHECKED[key] = got
    except TypeError:  # unhashable attribute values: no memo
        pass
    return got


def _f32(a):
    return a if (type(a) is np.ndarray and a.dtype == np.float32 and a.flags.c_contiguous) \
        else np.ascontiguousarray(a, np.float32)


def _weights(a):
    """Expert weights as given (float32 or int8, already checked), C-contiguous; float16 widened to float32 (the
    same values: the kernels compute in float32 either way)."""
    if a.dtype == np.float16:
        return np.ascontiguousarray(a, np.float32)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def sparse_expert_ffn(inputs: Mapping[str, np.ndarray | None], **attrs) -> np.ndarray:
    """Evaluate the operator with the Numba kernels; same contract as reference.sparse_expert_ffn.
    """
    attrs, dims = _check(inputs, attrs)
    T, d, E, m = dims.tokens, dims.d, dims.experts, dims.m
    get = inputs.get
    x = _f32(inputs["X"]).reshape(T, d)
    w1 = _weights(inputs["W1"])
    w2 = _weights(inputs["W2"])
    wg = get("Wg")
    wg = np.zeros((0, 0, 0), w1.dtype) if wg is None else _weights(wg)
    b1, bg, ub, w1s, w2s, wgs = (_EMPTY2 if get(n) is None else _f32(get(n))
                                 for n in ("B1", "Bg", "unselected_bias", "W1_scale", "W2_scale", "Wg_scale"))
    b2 = get("B2")
    b2 = _EMPTY1 if b2 is None else _f32(b2)
    rs = get("router_scores")
    if rs is not None:
        scores, rw, rb = _f32(rs).reshape(T, E), _EMPTY2, _EMPTY1
    else:
        rb = get("router_b")
        scores, rw = _EMPTY2, _f32(get("router_w"))
        rb = _EMPTY1 if rb is None else _f32(rb)
    y = np.empty((T, d), np.float32)
    if T:
        _ffn(x, w1, b1, w2, wg, bg, b2, ub, scores, rw, rb, w1s, w2s, wgs, int(attrs["top_k"]), int(attrs["min_k"]),
             np.float32(attrs["score_threshold"]), ACTIVATION_CODES[attrs["activation"]], numba.get_num_threads(), y)
    return y.reshape(np.shape(inputs["X"]))
