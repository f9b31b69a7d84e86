"""NumPy reference of ``SparseExpertFFN``: the oracle every kernel and export is tested against.

Written for clarity, not speed: float64 throughout, one expert at a time.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy.special import erf

from . import spec

ACTIVATION_FUNCTIONS = {
    "relu": lambda z: np.maximum(z, 0.0),
    "gelu": lambda z: 0.5 * z * (1.0 + erf(z / np.sqrt(2.0))),
    "gelu_tanh": lambda z: 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3))),
    "silu": lambda z: z / (1.0 + np.exp(-z)),
}


def router_scores(inputs: Mapping[str, np.ndarray | None], d: int) -> np.ndarray:
    """Scores [T, E]: the given router_scores, or X @ router_w.T + router_b."""
    if inputs.get("router_scores") is not None:
        return np.asarray(inputs["router_scores"], np.float64).reshape(-1, inputs["router_scores"].shape[-1])
    x = np.asarray(inputs["X"], np.float64).reshape(-1, d)
    s = x @ np.asarray(inputs["router_w"], np.float64).T
    if inputs.get("router_b") is not None:
        s = s + np.asarray(inputs["router_b"], np.float64)
    return s


def expert_weights(inputs: Mapping[str, np.ndarray | None], name: str) -> np.ndarray | None:
    """W1 / W2 / Wg in float64, dequantized (row scale times int8 value) when given as int8."""
    w = inputs.get(name)
    if w is None:
        return None
    w = np.asarray(w, np.float64)
    scale = inputs.get(spec.SCALES[name])
    return w if scale is None else w * np.asarray(scale, np.float64)[..., None]


def select_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices [T, k] of the k largest scores per row; ties go to the lower index, NaN ranks last."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def selected_mask(scores: np.ndarray, top_k: int, min_k: int = 1, score_threshold: float = -np.inf) -> np.ndarray:
    """[T, E] bool: the experts each token computes. Its top_k by score, of which those after the first
    min_k scoring below score_threshold are dropped (dynamic k; NaN is never below it)."""
    sel = select_top_k(scores, top_k)
    keep = np.ones(sel.shape, bool)
    keep[:, min_k:] = ~(np.take_along_axis(scores, sel[:, min_k:], axis=1) < score_threshold)
    mask = np.zeros(scores.shape, bool)
    np.put_along_axis(mask, sel, keep, axis=1)
    return mask


def sparse_expert_ffn(inputs: Mapping[str, np.ndarray | None], **attrs) -> np.ndarray:
    """Evaluate the operator; ``inputs`` maps spec input names to arrays (missing or None = absent)."""
    attrs, dims = spec.check_arrays(inputs, attrs)
    T, d, E, m = dims.tokens, dims.d, dims.experts, dims.m
    f64 = lambda name, shape: (np.zeros(shape) if inputs.get(name) is None  # noqa: E731
                               else np.asarray(inputs[name], np.float64))
    x = np.asarray(inputs["X"], np.float64).reshape(T, d)
    w1, w2, wg = (expert_weights(inputs, n) for n in ("W1", "W2", "Wg"))
    b1, b2, bg = f64("B1", (E, m)), f64("B2", (d,)), f64("Bg", (E, m))
    gated = wg is not None
    act = ACTIVATION_FUNCTIONS[attrs["activation"]]

    selected = selected_mask(router_scores(inputs, d), attrs["top_k"], attrs["min_k"], attrs["score_threshold"])
    y = np.tile(b2, (T, 1))
    for e in range(E):
        tokens = np.nonzero(selected[:, e])[0]
        if tokens.size == 0:
            continue
        xe = x[tokens]
        up = xe @ w1[e].T + b1[e]
        h = act(xe @ wg[e].T + bg[e]) * up if gated else act(up)
        y[tokens] += h @ w2[e]
    if inputs.get("unselected_bias") is not None:
        y += ~selected @ np.asarray(inputs["unselected_bias"], np.float64)
    return y.reshape(np.shape(inputs["X"])).astype(np.float32)
