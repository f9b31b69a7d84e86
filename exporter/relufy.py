"""ReLU-fication: replace the FFN activation of a GELU model by ReLU(z - shift), then recover the dense
model's function by distillation from the original (``distill.py``), before MoEfication.

A ReLU neuron below its threshold contributes exactly zero, so the experts a router skips lose less
than GELU experts do, whose negative part is never zero. The shift raises the threshold (sparser
activations); it is folded into the first-layer bias, so the operator's plain "relu" computes it.
"""
from __future__ import annotations

import numpy as np

from .config import MoEConfig
from .distill import distill

RELU = "relu"  # Hugging Face's (and the operator's) name


def check_relufy(shift: float | None, minutes: float) -> None:
    if shift is not None and not (np.isfinite(shift) and shift >= 0):
        raise ValueError(f"--relufy takes a threshold shift >= 0, got {shift:g}")
    if not minutes > 0:
        raise ValueError(f"--relufy-minutes must be positive, got {minutes:g}")


def relufy(model, teacher, adapter, teacher_calib, batch, *, shift: float = 0.0, minutes: float, max_steps: int,
           seed: int = 0, progress: bool = True, log=None):
    """Make ``model`` (a dense copy of ``teacher``) a ReLU model and distill it towards ``teacher`` on
    ``batch`` (see :func:`~exporter.distill.distill`); returns the DistillResult."""
    check_relufy(shift, minutes)
    adapter.set_activation(model, RELU)
    for layer in adapter.layers(model):
        ffn = adapter.read(layer)
        ffn.b1 = ffn.b1 - np.float32(shift)
        adapter.write(layer, ffn)
    # The dense FFN is a MoE with one expert always selected: the same distillation trains it.
    width, d = adapter.read(adapter.layers(model)[0]).w1.shape
    layers = len(adapter.layers(model))
    dense = MoEConfig(experts=1, top_k=1, activation=RELU, model_type=model.config.model_type, num_layers=layers,
                      intermediate_size=width)
    routers = {k: v for i in range(layers) for k, v in ((f"layer.{i}.router_w", np.zeros((1, d), np.float32)),
                                                         (f"layer.{i}.router_b", np.zeros(1, np.float32)))}
    _, result = distill(model, teacher, adapter, dense, routers, teacher_calib, batch, minutes=minutes,
                        max_steps=max_steps, seed=seed, progress=progress, log=log)
    return result
