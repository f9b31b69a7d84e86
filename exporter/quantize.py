"""Weight-only int8 experts: one symmetric float scale per weight row (a neuron's input or output vector).

Few-token latency is bound by reading the expert weights, so int8 rows cut it by up to 4x; the scales
fold into the neuron's activation, so the kernels never dequantize a whole matrix.
"""
from __future__ import annotations

import torch

WEIGHT_TYPES = ("float32", "int8")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values q and float32 scales s with w[..., j, :] ~= s[..., j] * q[..., j, :] (round to nearest)."""
    amax = w.abs().amax(-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).float()  # all-zero rows stay zero
    q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[..., None]
