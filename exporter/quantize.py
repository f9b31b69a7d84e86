"""Weight-only int8 experts: one symmetric float scale per weight row (a neuron's input or output vector).

Few-token latency is bound by reading the expert weights, so int8 rows cut it by up to 4x; the scales
fold into the neuron's activation, so the kernels never dequantize a whole matrix.
"""
from __future__ import annotations

import torch

from runtime.spec import WEIGHT_TYPES  # noqa: F401  what --weights accepts: the operator's types


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values q and float32 scales s with w[..., j, :] ~= s[..., j] * q[..., j, :] (round to nearest)."""
    amax = w.abs().amax(-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).float()  # all-zero rows stay zero
    q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_experts(arrays: dict) -> dict:
    """Operator inputs (name -> NumPy array) with W1, W2 and Wg, where present, as int8 rows plus their
    ``*_scale`` inputs: what ``moe-export --weights int8`` writes."""
    from runtime import spec
    q = dict(arrays)
    for name, scale in spec.SCALES.items():
        if arrays.get(name) is not None:
            q[name], q[scale] = (t.numpy() for t in quantize_rows(torch.from_numpy(arrays[name])))
    return q


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[..., None]
