"""Numba kernels of ``SparseExpertFFN`` (same algorithm as cpp_ops/kernels/sparse_ffn.cc).

Tokens are grouped by expert (counting sort), experts are processed in parallel, and each
thread accumulates into its own output buffer (``numba.get_thread_id``), so no two threads
write the same row. Compiled once and cached on disk (``cache=True``).
"""
from __future__ import annotations

import math
from typing import Mapping

import numba
import numpy as np
from numba import njit, prange

from . import spec

ACTIVATION_CODES = {name: i for i, name in enumerate(spec.ACTIVATIONS)}
_TOKEN_BLOCK = 64  # tokens per work item: bounds scratch and balances threads
_EMPTY2 = np.zeros((0, 0), np.float32)
_EMPTY3 = np.zeros((0, 0, 0), np.float32)


@njit(cache=True, fastmath=True, inline="always")
def _act(z, code):
    """relu | gelu (erf) | gelu_tanh | silu, by spec.ACTIVATIONS index."""
    if code == 0:
        return max(z, 0.0)
    if code == 1:
        return 0.5 * z * (1.0 + math.erf(z * 0.7071067811865476))
    if code == 2:
        return 0.5 * z * (1.0 + math.tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    return z / (1.0 + math.exp(-z))


@njit(cache=True)
def _better(a, b):
    """NaN ranks below every number; equal scores keep the earlier (lower) index."""
    if math.isnan(b):
        return not math.isnan(a)
    return a > b


@njit(cache=True, parallel=True, fastmath=True)
def _scores(x, router_w, router_b):
    """s[t, e] = <x[t], router_w[e]> + router_b[e]"""
    T, E = x.shape[0], router_w.shape[0]
    s = np.empty((T, E), np.float32)
    for t in prange(T):
        for e in range(E):
            acc = np.float32(0.0)
            for i in range(x.shape[1]):
                acc += x[t, i] * router_w[e, i]
            s[t, e] = acc + router_b[e]
    return s


@njit(cache=True)
def select_top_k(scores, k):
    """Indices [T, k] of the k largest scores per row (ties to the lower index, NaN last)."""
    T, E = scores.shape
    sel = np.empty((T, k), np.int32)
    taken = np.zeros(E, np.bool_)
    for t in range(T):
        taken[:] = False
        for j in range(k):
            best = -1
            for e in range(E):
                if not taken[e] and (best < 0 or _better(scores[t, e], scores[t, best])):
                    best = e
            taken[best] = True
            sel[t, j] = best
    return sel


@njit(cache=True)
def _blocks(sel, E, block):
    """Counting sort of (token, expert) pairs by expert, cut into blocks of <= block tokens."""
    T, k = sel.shape
    start = np.zeros(E + 1, np.int64)
    for t in range(T):
        for j in range(k):
            start[sel[t, j] + 1] += 1
    for e in range(E):
        start[e + 1] += start[e]
    fill = start[:-1].copy()
    tokens = np.empty(T * k, np.int32)
    for t in range(T):
        for j in range(k):
            e = sel[t, j]
            tokens[fill[e]] = t
            fill[e] += 1
    n_blocks = 0
    for e in range(E):
        n_blocks += (start[e + 1] - start[e] + block - 1) // block
    blocks = np.empty((n_blocks, 3), np.int64)  # expert, begin, count
    b = 0
    for e in range(E):
        p = start[e]
        while p < start[e + 1]:
            blocks[b, 0], blocks[b, 1], blocks[b, 2] = e, p, min(block, start[e + 1] - p)
            p += block
            b += 1
    return tokens, blocks


@njit(cache=True, parallel=True, fastmath=True)
def _experts(x, w1, b1, w2, wg, bg, ub, gated, has_ub, act, tokens, blocks, acc):
    """acc[thread, t] += sum over the blocks of expert e holding t of (W2[e].T h_e(x_t) - U[e])."""
    d, m = x.shape[1], w1.shape[1]
    for bi in prange(blocks.shape[0]):
        out = acc[numba.get_thread_id()]
        e, begin, n = blocks[bi, 0], blocks[bi, 1], blocks[bi, 2]
        h = np.empty((n, m), np.float32)
        for r in range(n):
            xt = x[tokens[begin + r]]
            for j in range(m):
                up = b1[e, j]
                for i in range(d):
                    up += xt[i] * w1[e, j, i]
                if gated:
                    g = bg[e, j]
                    for i in range(d):
                        g += xt[i] * wg[e, j, i]
                    h[r, j] = _act(g, act) * up
                else:
                    h[r, j] = _act(up, act)
        for r in range(n):
            yt = out[tokens[begin + r]]
            for j in range(m):
                hj = h[r, j]
                for i in range(d):
                    yt[i] += hj * w2[e, j, i]
            if has_ub:
                for i in range(d):
                    yt[i] -= ub[e, i]


def sparse_expert_ffn(inputs: Mapping[str, np.ndarray | None], **attrs) -> np.ndarray:
    """Evaluate the operator with the Numba kernels; same contract as reference.sparse_expert_ffn."""
    attrs, dims = spec.check_arrays(inputs, attrs)
    T, d, E, m = dims.tokens, dims.d, dims.experts, dims.m
    f32 = lambda n, empty: empty if inputs.get(n) is None else np.ascontiguousarray(inputs[n], np.float32)  # noqa
    x = np.ascontiguousarray(inputs["X"], np.float32).reshape(T, d)
    w1, w2 = f32("W1", _EMPTY3), f32("W2", _EMPTY3)
    b1 = f32("B1", None)
    b1 = np.zeros((E, m), np.float32) if b1 is None else b1
    wg, bg = f32("Wg", _EMPTY3), f32("Bg", None)
    gated = inputs.get("Wg") is not None
    bg = np.zeros((E, m), np.float32) if bg is None else bg
    ub = f32("unselected_bias", _EMPTY2)
    has_ub = inputs.get("unselected_bias") is not None

    if inputs.get("router_scores") is not None:
        scores = f32("router_scores", None).reshape(T, E)
    else:
        rb = f32("router_b", None)
        scores = _scores(x, f32("router_w", None), np.zeros(E, np.float32) if rb is None else rb)
    sel = select_top_k(scores, int(attrs["top_k"]))
    tokens, blocks = _blocks(sel, E, _TOKEN_BLOCK)
    acc = np.zeros((numba.get_num_threads(), T, d), np.float32)
    _experts(x, w1, b1, w2, wg, bg, ub, gated, has_ub, ACTIVATION_CODES[attrs["activation"]], tokens, blocks, acc)
    y = acc.sum(axis=0)
    if inputs.get("B2") is not None:
        y += np.asarray(inputs["B2"], np.float32)
    if has_ub:
        y += ub.sum(axis=0)
    return y.reshape(np.shape(inputs["X"]))
