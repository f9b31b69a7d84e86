"""The MoEfied FFN as a PyTorch module.

Eager forward (and the ``standard`` ONNX target) computes every expert and masks the unselected
ones: exact operator semantics with standard ops only (TopK, ScatterElements, MatMul). Under ONNX
export with the ``custom`` target it becomes one ``SparseExpertFFN`` node instead.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.onnx import symbolic_helper

from runtime import spec

from .arch.base import DenseFFN, ffn_hidden
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


def expert_hidden(x, w1, b1, activation: str, wg=None, bg=None) -> torch.Tensor:
    """[..., E * m]: every expert's activations (the dense FFN's formula, ``arch.base.ffn_hidden``), experts
    contiguous."""
    E, m, d = w1.shape
    flat = lambda w: None if w is None else w.reshape(E * m, *w.shape[2:])  # noqa: E731
    return ffn_hidden(x, flat(w1), flat(b1), activation, flat(wg), flat(bg))


def masked_dense(x, w1, b1, w2, b2, router_w, router_b, router_scores, unselected_bias, top_k: int, activation: str,
                 min_k: int = 1, score_threshold: float = -math.inf, wg=None, bg=None, *,
                 router_temperature: float | None = None, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Operator semantics computed densely: all experts, unselected ones masked to zero (plus
    their unselected_bias row, if any). Scores: router_scores if given, else x @ router_w.T + router_b.
    b1, b2 and bg may be None (absent); wg (and bg) make it the gated form.

    ``router_temperature`` (training only) lets gradients reach the router through the top-k selection
    (a straight-through surrogate): the forward value is unchanged, the backward pass treats the mask as
    sigmoid((score - t) / (temperature * spread)), t halfway between the k-th and (k+1)-th scores and
    spread the token's median absolute deviation of scores (so the temperature is scale-free).
    ``hidden``: :func:`expert_hidden` of ``x``, if the caller has it already."""
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
    h = expert_hidden(x, w1, b1, activation, wg, bg) if hidden is None else hidden
    # the mask repeated per neuron, in h's dtype (bfloat16 in an autocast): a broadcast over 12 neurons, or a product
    # in mixed dtypes, runs 2-3x slower
    h = h * mask.to(h.dtype).unsqueeze(-1).expand(*mask.shape, m).flatten(-2)
    y = h @ w2.reshape(E * m, d)
    if b2 is not None:
        y = y + b2
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


# The operator's inputs in MoEFFN's argument order (x, then the weights), and the int8 scales.
_ARGS = ("X", "W1", "B1", "W2", "B2", "router_w", "router_b", "router_scores", "unselected_bias")
_TAIL = ("Wg", "Bg", "W1_scale", "W2_scale", "Wg_scale")


@contextlib.contextmanager
def routing_margins(moes: list["MoEFFN"]):
    """Inside the block, every call of the MoE FFNs ``moes`` records its per-token routing margins
    (:func:`routing_margin`, shape of x without its last dimension); yields one list of them per module."""
    for m in moes:
        m.gap_log = []
    try:
        yield [m.gap_log for m in moes]
    finally:
        for m in moes:
            m.gap_log = None


class _SparseExpertFFNFunction(torch.autograd.Function):
    """Carries the custom node through the TorchScript-based ONNX exporter."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, router_w, router_b, router_scores, unselected_bias, top_k, activation,
                min_k, score_threshold, wg, bg, w1_scale, w2_scale, wg_scale):
        if w1_scale is not None:  # int8 experts
            w1, w2 = dequantize_rows(w1, w1_scale), dequantize_rows(w2, w2_scale)
            wg = None if wg is None else dequantize_rows(wg, wg_scale)
        elif w1.dtype == torch.float16:  # float16 experts: the same values in float32
            w1, w2, wg = (None if t is None else t.float() for t in (w1, w2, wg))
        return masked_dense(x, w1, b1, w2, b2, router_w, router_b, router_scores, unselected_bias, top_k, activation,
                            min_k, score_threshold, wg, bg)

    @staticmethod
    def symbolic(g, x, w1, b1, w2, b2, router_w, router_b, router_scores, unselected_bias, top_k, activation,
                 min_k, score_threshold, wg, bg, w1_scale, w2_scale, wg_scale):
        values = (x, w1, b1, w2, b2, router_w, router_b, router_scores, unselected_bias, wg, bg, w1_scale, w2_scale,
                  wg_scale)
        given = {n: v for n, v in zip(_ARGS + _TAIL, values) if v is not None and not symbolic_helper._is_none(v)}
        names = [p.name for p in spec.INPUTS]
        last = max(names.index(n) for n in given)
        # Absent optional inputs before the last given one become empty names, as ONNX prescribes.
        inputs = [given[n] if n in given else symbolic_helper._optional_input_placeholder_tensor(g)
                  for n in names[: last + 1]]
        dynamic = {"min_k_i": min_k, "score_threshold_f": score_threshold} if math.isfinite(score_threshold) else {}
        return g.op(f"{spec.DOMAIN}::{spec.OP_TYPE}", *inputs,
                    top_k_i=top_k, activation_s=activation, expert_weighting_s="ones", **dynamic).setType(x.type())


class MoEFFN(nn.Module):
    """FFN(x) = B2 + sum over the top_k experts by router score of W2[e].T h_e(x)
    (+ unselected_bias[e] for each expert not selected), h_e = act(W1[e] x + B1[e]), or in the gated form
    (``wg``, ``bg``) act(Wg[e] x + Bg[e]) * (W1[e] x + B1[e]); biases may be None. The first ``shared``
    experts are always on (their router score is forced); ``shared`` only tells the tie check to leave
    them out.

    ``router_mlp`` = (A [H, d], a [H], B [E, H]) adds a small MLP to the linear router,
    scores = router_w x + router_b + B relu(A x + a); it is exported as standard ONNX ops feeding the
    operator's ``router_scores`` input (router_w and router_b are then not given to the operator).

    Dynamic k (``min_k``, a finite ``score_threshold``): of the top_k, experts after the first min_k whose
    score is below the threshold are skipped, as the operator's attributes of the same names say."""

    EXPERT_WEIGHTS = ("w1", "b1", "w2", "b2", "wg", "bg")  # the buffers that hold the experts

    def __init__(self, w1, b1, w2, b2, router_w, router_b, unselected_bias=None, *, top_k: int, activation: str,
                 wg=None, bg=None, target: str = "custom", shared: int = 0, router_mlp=None, min_k: int = 1,
                 score_threshold: float = -math.inf, lowrank=None):
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
        if bg is not None and wg is None:
            raise ValueError("bg needs wg")
        tensors = {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "wg": wg, "bg": bg, "router_w": router_w,
                   "router_b": router_b}
        for name, t in tensors.items():
            self.register_buffer(name, None if t is None else torch.as_tensor(t, dtype=torch.float32).contiguous())
        self.router_mlp = None
        if router_mlp is not None:
            a, a_b, b = (torch.as_tensor(t, dtype=torch.float32).contiguous() for t in router_mlp)
            if a.shape[1] != d or a_b.shape != a.shape[:1] or b.shape != (E, a.shape[0]):
                raise ValueError(f"router_mlp must be ([H, {d}], [H], [{E}, H]), got "
                                 f"{[tuple(t.shape) for t in (a, a_b, b)]}")
            self.router_mlp = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in (a, a_b, b)])
        self.lowrank = None
        if lowrank is not None:
            a, b, c = (torch.as_tensor(t, dtype=torch.float32).contiguous() for t in lowrank)
            if a.ndim != 2 or a.shape[1] != d or b.shape != (a.shape[0], d) or c.shape != (d,):
                raise ValueError(f"lowrank must be ([R, {d}], [R, {d}], [{d}]), got {[tuple(t.shape) for t in (a, b, c)]}")
            self.lowrank = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in (a, b, c)])
        self.unselected_bias = None if unselected_bias is None else nn.Buffer(
            torch.as_tensor(unselected_bias, dtype=torch.float32).contiguous())
        self.top_k, self.activation, self.target, self.shared = top_k, activation, target, shared
        self.min_k, self.score_threshold = min_k, float(score_threshold)
        self.router_temperature = None  # distillation: straight-through gradients to the router (masked_dense)
        self.gap_log = None  # validation (routing_margins): a list that collects each call's routing margins
        self.hidden_log = None  # distillation: a list that collects each call's (input, expert_hidden), detached
        for name in ("w1_q", "w1_scale", "w2_q", "w2_scale", "wg_q", "wg_scale"):  # set by quantize_int8
            self.register_buffer(name, None)
        self.float16 = False  # set by round_float16: the experts are exported as float16

    @classmethod
    def from_dense(cls, ffn: DenseFFN, experts: int, router_w, router_b, unselected_bias=None, **kwargs) -> "MoEFFN":
        """The MoE of a dense FFN whose neurons are already ordered expert by expert."""
        w = ffn.operator_weights(experts)
        return cls(w["W1"], w["B1"], w["W2"], w["B2"], router_w, router_b, unselected_bias, wg=w["Wg"], bg=w["Bg"],
                   **kwargs)

    @property
    def gated(self) -> bool:
        return self.wg is not None

    def expert_tensors(self) -> list[torch.Tensor]:
        """The experts' weights and biases that are present (what training updates), unselected_bias and the
        low-rank stand-in included."""
        return [t for t in (*(getattr(self, n) for n in self.EXPERT_WEIGHTS), self.unselected_bias,
                            *(self.lowrank or ())) if t is not None]

    def dense(self) -> DenseFFN:
        """All experts together as one dense FFN (operator layout; float32 NumPy copies)."""
        E, m, d = self.w1.shape
        f = lambda t, *s: None if t is None else t.detach().reshape(E * m, *s).numpy().copy()  # noqa: E731
        return DenseFFN(w1=f(self.w1, d), w2=f(self.w2, d), b1=f(self.b1), wg=f(self.wg, d), bg=f(self.bg),
                        b2=None if self.b2 is None else self.b2.detach().numpy().copy())

    def quantize_int8(self) -> None:
        """Experts become int8 rows with float scales (exported as such); eager forward and the standard
        target use the dequantized weights, so they still compute exactly what the exported graph does."""
        for name in ("w1", "w2", "wg"):
            if getattr(self, name) is not None:
                q, scale = quantize_rows(getattr(self, name))
                setattr(self, f"{name}_q", q)
                setattr(self, f"{name}_scale", scale)
                setattr(self, name, dequantize_rows(q, scale))

    def round_float16(self) -> None:
        """Experts become float16 (exported as such: half the bytes); eager forward and the standard target use
        their values in float32, so they still compute exactly what the exported graph does."""
        for name in ("w1", "w2", "wg"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).half().float())
        self.float16 = True

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        s = x @ self.router_w.T + self.router_b
        if self.router_mlp is not None:
            a, a_b, b = self.router_mlp
            s = s + torch.relu(x @ a.T + a_b) @ b.T
        return s

    def operator_inputs(self) -> tuple[dict, dict]:
        """The exported node's constant inputs (spec names -> float32 / float16 / int8 NumPy arrays, None if absent;
        router_scores is computed from X by the router MLP when there is one, so it is absent here) and its
        attributes: what the SparseExpertFFN node of this FFN holds."""
        f = lambda t: None if t is None else t.detach().numpy().copy()  # noqa: E731
        int8 = self.w1_q is not None
        w = lambda t: None if t is None else f(t.half() if self.float16 else t)  # noqa: E731
        inputs = {"W1": w(self.w1_q if int8 else self.w1), "B1": f(self.b1), "W2": w(self.w2_q if int8 else self.w2),
                  "B2": f(self.b2), "Wg": w(self.wg_q if int8 else self.wg), "Bg": f(self.bg),
                  "router_w": f(self.router_w), "router_b": f(self.router_b),
                  "unselected_bias": f(self.unselected_bias), "W1_scale": f(self.w1_scale),
                  "W2_scale": f(self.w2_scale), "Wg_scale": f(self.wg_scale)}
        if self.router_mlp is not None:
            inputs["router_w"] = inputs["router_b"] = None
            inputs["router_mlp"] = tuple(f(t) for t in self.router_mlp)
        if self.lowrank is not None:  # not an operator input: added beside it as (X A^T) B + c
            inputs["lowrank"] = tuple(f(t) for t in self.lowrank)
        attrs = {"top_k": self.top_k, "activation": self.activation, "min_k": self.min_k,
                 "score_threshold": self.score_threshold}
        return inputs, attrs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.router_mlp is None:
            router = (self.router_w, self.router_b, None)
        else:
            router = (None, None, self.scores(x))
        w1, w2, wg = self.w1, self.w2, self.wg
        exporting = self.target == "custom" and torch.onnx.is_in_onnx_export()
        if exporting and self.w1_q is not None:
            w1, w2, wg = self.w1_q, self.w2_q, self.wg_q
        elif exporting and self.float16:
            w1, w2, wg = (None if t is None else t.half() for t in (w1, w2, wg))
        args = (x, w1, self.b1, w2, self.b2, *router, self.unselected_bias, self.top_k, self.activation,
                self.min_k, self.score_threshold, wg, self.bg)
        if exporting:
            y = _SparseExpertFFNFunction.apply(*args, self.w1_scale, self.w2_scale, self.wg_scale)
        else:
            if self.gap_log is not None:
                self.gap_log.append(routing_margin(self.scores(x), self.top_k, self.shared, self.score_threshold))
            h = None
            if self.hidden_log is not None:  # the router refit reuses the forward's first layer (distill)
                h = expert_hidden(x, w1, self.b1, self.activation, wg, self.bg)
                self.hidden_log.append((x.detach(), h.detach()))
            y = masked_dense(*args, router_temperature=self.router_temperature, hidden=h)
        if self.lowrank is not None:  # the low-rank stand-in for the skipped experts (standard ops when exported)
            a, b, c = self.lowrank
            y = y + (x @ a.T) @ b + c
        return y
