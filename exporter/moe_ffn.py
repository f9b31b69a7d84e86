"""The MoEfied FFN as a PyTorch module.

Eager forward (and the ``standard`` ONNX target) computes every expert and masks the unselected
ones: exact operator semantics with standard ops only (TopK, ScatterElements, MatMul). Under ONNX
export with the ``custom`` target it becomes one ``SparseExpertFFN`` node instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.onnx import symbolic_helper

from runtime import spec

from .quantize import dequantize_rows, quantize_rows

TORCH_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
}


def selection_mask(scores: torch.Tensor, top_k: int, min_k: int = 1, score_threshold: float = -math.inf
                   ) -> torch.Tensor:
    """1.0 for the experts a token computes: its top_k by score, less those after the first min_k whose score
    is below score_threshold (dynamic k; runtime/spec.py)."""
    top = scores.topk(top_k, dim=-1)
    keep = torch.ones_like(top.values)
    if math.isfinite(score_threshold) and min_k < top_k:
        dropped = top.values[..., min_k:] < score_threshold
        keep = torch.cat([keep[..., :min_k], (~dropped).to(keep.dtype)], dim=-1)
    return torch.zeros_like(scores).scatter(-1, top.indices, keep)


def expert_hidden(x, w1, b1, activation: str) -> torch.Tensor:
    """[..., E * m]: every expert's activations act(W1 x + B1), experts contiguous."""
    E, m, d = w1.shape
    return TORCH_ACTIVATIONS[activation](x @ w1.reshape(E * m, d).T + b1.reshape(E * m))


def masked_dense(x, w1, b1, w2, b2, router_w, router_b, router_scores, unselected_bias, top_k: int, activation: str,
                 min_k: int = 1, score_threshold: float = -math.inf, *, router_temperature: float | None = None
                 ) -> torch.Tensor:
    """Operator semantics computed densely: all experts, unselected ones masked to zero (plus
    their unselected_bias row, if any). Scores: router_scores if given, else x @ router_w.T + router_b.

    ``router_temperature`` (training only) lets gradients reach the router through the top-k selection
    (a straight-through surrogate): the forward value is unchanged, the backward pass treats the mask as
    sigmoid((score - t) / (temperature * spread)), t halfway between the k-th and (k+1)-th scores and
    spread the token's median absolute deviation of scores (so the temperature is scale-free)."""
    E, m, d = w1.shape
    scores = router_scores if router_scores is not None else x @ router_w.T + router_b
    mask = selection_mask(scores, top_k, min_k, score_threshold)
    if router_temperature is not None and top_k < E:
        s = scores.detach()
        threshold = s.topk(top_k + 1, dim=-1).values[..., top_k - 1:].mean(-1, keepdim=True)
        centre = s.median(-1, keepdim=True).values
        spread = (s - centre).abs().median(-1, keepdim=True).values.clamp_min(1e-12)  # robust to shared experts
        soft = torch.sigmoid((scores - threshold) / (router_temperature * spread))
        mask = mask + (soft - soft.detach())  # exactly the hard mask in the forward pass
    h = expert_hidden(x, w1, b1, activation)
    h = (h.unflatten(-1, (E, m)) * mask.unsqueeze(-1)).flatten(-2)
    y = h @ w2.reshape(E * m, d) + b2
    return y if unselected_bias is None else y + (1.0 - mask) @ unselected_bias


def routing_margin(scores: torch.Tensor, top_k: int, shared: int = 0, score_threshold: float = -math.inf
                   ) -> torch.Tensor:
    """Per token, (k-th best - (k+1)-th best score) / max |score|, and with dynamic k the distance of the
    nearest score to the threshold likewise: how far the selection is from a tie. Near zero, float32
    rounding may pick either expert, legitimately, in another implementation. The first ``shared``
    experts (always on, forced by a huge score) are left out."""
    scores, top_k = scores[..., shared:], top_k - shared
    scale = scores.abs().amax(-1).clamp_min(1e-30)
    margin = torch.full(scores.shape[:-1], float("inf"))
    if top_k < scores.shape[-1]:
        top = scores.topk(top_k + 1, dim=-1).values
        margin = (top[..., top_k - 1] - top[..., top_k]) / scale
    if math.isfinite(score_threshold):
        margin = torch.minimum(margin, (scores - score_threshold).abs().amin(-1) / scale)
    return margin


class _SparseExpertFFNFunction(torch.autograd.Function):
    """Carries the custom node through the TorchScript-based ONNX exporter."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, router_w, router_b, router_scores, unselected_bias, top_k, activation,
                min_k, score_threshold, w1_scale, w2_scale):
        if w1_scale is not None:  # int8 experts
            w1, w2 = dequantize_rows(w1, w1_scale), dequantize_rows(w2, w2_scale)
        return masked_dense(x, w1, b1, w2, b2, router_w, router_b, router_scores, unselected_bias, top_k, activation,
                            min_k, score_threshold)

    @staticmethod
    def symbolic(g, x, w1, b1, w2, b2, router_w, router_b, router_scores, unselected_bias, top_k, activation,
                 min_k, score_threshold, w1_scale, w2_scale):
        given = {"X": x, "W1": w1, "B1": b1, "W2": w2, "B2": b2, "router_w": router_w, "router_b": router_b,
                 "router_scores": router_scores, "unselected_bias": unselected_bias, "W1_scale": w1_scale,
                 "W2_scale": w2_scale}
        given = {k: v for k, v in given.items() if v is not None and not symbolic_helper._is_none(v)}
        names = [p.name for p in spec.INPUTS]
        last = max(names.index(n) for n in given)
        # Absent optional inputs before the last given one become empty names, as ONNX prescribes.
        inputs = [given[n] if n in given else symbolic_helper._optional_input_placeholder_tensor(g)
                  for n in names[: last + 1]]
        dynamic = {"min_k_i": min_k, "score_threshold_f": score_threshold} if math.isfinite(score_threshold) else {}
        return g.op(f"{spec.DOMAIN}::{spec.OP_TYPE}", *inputs,
                    top_k_i=top_k, activation_s=activation, expert_weighting_s="ones", **dynamic).setType(x.type())


class MoEFFN(nn.Module):
    """FFN(x) = B2 + sum over the top_k experts by router score of W2[e].T act(W1[e] x + B1[e])
    (+ unselected_bias[e] for each expert not selected). The first ``shared`` experts are always on
    (their router score is forced); ``shared`` only tells the tie check to leave them out.

    ``router_mlp`` = (A [H, d], a [H], B [E, H]) adds a small MLP to the linear router,
    scores = router_w x + router_b + B relu(A x + a); it is exported as standard ONNX ops feeding the
    operator's ``router_scores`` input (router_w and router_b are then not given to the operator).

    Dynamic k (``min_k``, a finite ``score_threshold``): of the top_k, experts after the first min_k whose
    score is below the threshold are skipped, as the operator's attributes of the same names say."""

    def __init__(self, w1, b1, w2, b2, router_w, router_b, unselected_bias=None, *, top_k: int, activation: str,
                 target: str = "custom", shared: int = 0, router_mlp=None, min_k: int = 1,
                 score_threshold: float = -math.inf):
        super().__init__()
        E, m, d = w1.shape
        if not 1 <= top_k <= E:
            raise ValueError(f"top_k must be in [1, {E}], got {top_k}")
        if not 1 <= min_k <= top_k or math.isnan(score_threshold):
            raise ValueError(f"dynamic k needs 1 <= min_k <= top_k={top_k} and a threshold, got {min_k}, "
                             f"{score_threshold}")
        if not 0 <= shared < top_k:
            raise ValueError(f"shared must be in [0, top_k), got {shared}")
        if activation not in TORCH_ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(TORCH_ACTIVATIONS)}, got {activation!r}")
        for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("router_w", router_w), ("router_b", router_b)):
            self.register_buffer(name, torch.as_tensor(t, dtype=torch.float32).contiguous())
        self.router_mlp = None
        if router_mlp is not None:
            a, a_b, b = (torch.as_tensor(t, dtype=torch.float32).contiguous() for t in router_mlp)
            if a.shape[1] != d or a_b.shape != a.shape[:1] or b.shape != (E, a.shape[0]):
                raise ValueError(f"router_mlp must be ([H, {d}], [H], [{E}, H]), got "
                                 f"{[tuple(t.shape) for t in (a, a_b, b)]}")
            self.router_mlp = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in (a, a_b, b)])
        self.unselected_bias = None if unselected_bias is None else nn.Buffer(
            torch.as_tensor(unselected_bias, dtype=torch.float32).contiguous())
        self.top_k, self.activation, self.target, self.shared = top_k, activation, target, shared
        self.min_k, self.score_threshold = min_k, float(score_threshold)
        self.router_temperature = None  # distillation: straight-through gradients to the router (masked_dense)
        self.record_gaps = False  # validation: keep each token's routing margin in self.gaps
        self.gaps = None
        for name in ("w1_q", "w1_scale", "w2_q", "w2_scale"):  # set by quantize_int8
            self.register_buffer(name, None)

    def quantize_int8(self) -> None:
        """Experts become int8 rows with float scales (exported as such); eager forward and the standard
        target use the dequantized weights, so they still compute exactly what the exported graph does."""
        self.w1_q, self.w1_scale = quantize_rows(self.w1)
        self.w2_q, self.w2_scale = quantize_rows(self.w2)
        self.w1 = dequantize_rows(self.w1_q, self.w1_scale)
        self.w2 = dequantize_rows(self.w2_q, self.w2_scale)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        s = x @ self.router_w.T + self.router_b
        if self.router_mlp is not None:
            a, a_b, b = self.router_mlp
            s = s + torch.relu(x @ a.T + a_b) @ b.T
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.router_mlp is None:
            router = (self.router_w, self.router_b, None)
        else:
            router = (None, None, self.scores(x))
        args = (x, self.w1, self.b1, self.w2, self.b2, *router, self.unselected_bias, self.top_k, self.activation,
                self.min_k, self.score_threshold)
        if self.target == "custom" and torch.onnx.is_in_onnx_export():
            if self.w1_q is not None:
                args = (x, self.w1_q, self.b1, self.w2_q) + args[4:]
            return _SparseExpertFFNFunction.apply(*args, self.w1_scale, self.w2_scale)
        if self.record_gaps:
            self.gaps = routing_margin(self.scores(x), self.top_k, self.shared, self.score_threshold)
        return masked_dense(*args, router_temperature=self.router_temperature)
