"""Per-architecture knowledge: where each FFN lives and how its weights map onto the operator.

One adapter class per FFN family, registered by the Hugging Face ``model_type`` values it serves.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Callable

import numpy as np
from torch import nn

from .moe_ffn import MoEFFN

ADAPTERS: dict[str, type["FFNAdapter"]] = {}

# Hugging Face hidden_act -> spec activation
HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "silu": "silu", "swish": "silu"}


def register(*model_types: str) -> Callable:
    def deco(cls):
        for t in model_types:
            ADAPTERS[t] = cls
        return cls
    return deco


def adapter_for(model_type: str) -> "FFNAdapter":
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(f"architecture '{model_type}' is not supported yet; supported: "
                                    f"{', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]()


class UnsupportedModelError(ValueError):
    pass


@dataclasses.dataclass
class DenseFFN:
    """One FFN's weights in operator layout: w1 [I, d] (rows = neurons), b1 [I], w2 [I, d], b2 [d]."""
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray


class FFNAdapter(abc.ABC):
    task = "feature-extraction"
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()

    def activation(self, config) -> str:
        act = getattr(config, "hidden_act", None)
        if act not in HF_ACTIVATIONS:
            raise UnsupportedModelError(f"activation '{act}' is not supported; supported: "
                                        f"{', '.join(sorted(HF_ACTIVATIONS))}")
        return HF_ACTIVATIONS[act]

    @abc.abstractmethod
    def layers(self, model) -> list[nn.Module]:
        """The model's transformer layers, in order."""

    @abc.abstractmethod
    def read(self, layer) -> DenseFFN:
        """The layer's FFN weights in operator layout."""

    @abc.abstractmethod
    def write(self, layer, ffn: DenseFFN) -> None:
        """Set the layer's (dense) FFN weights from operator layout; the inverse of :meth:`read`."""

    @abc.abstractmethod
    def set_activation(self, model, hf_activation: str) -> None:
        """Make every FFN use the Hugging Face activation ``hf_activation`` (config included, so the
        model saves and reloads with it)."""

    @abc.abstractmethod
    def permute(self, layer, perm: np.ndarray) -> None:
        """Reorder the FFN's neurons in place (the dense function is unchanged)."""

    @abc.abstractmethod
    def install(self, layer, moe: MoEFFN) -> None:
        """Replace the layer's FFN by ``moe`` (which includes the output bias)."""

    @abc.abstractmethod
    def ffn_module(self, layer) -> nn.Module:
        """The module whose first positional input is the FFN's input (for calibration hooks)."""


@register("bert")
class BertAdapter(FFNAdapter):
    """BERT: intermediate.dense (d -> I) + act, then output.dense (I -> d), dropout, residual LayerNorm."""

    input_names = ("input_ids", "attention_mask", "token_type_ids")
    output_names = ("last_hidden_state",)

    def layers(self, model):
        return list(model.encoder.layer)

    def read(self, layer) -> DenseFFN:
        up, down = layer.intermediate.dense, layer.output.dense
        f = lambda t: t.detach().float().numpy().copy()  # noqa: E731
        return DenseFFN(f(up.weight), f(up.bias), f(down.weight.T), f(down.bias))

    def write(self, layer, ffn: DenseFFN) -> None:
        import torch
        up, down = layer.intermediate.dense, layer.output.dense
        with torch.no_grad():
            for param, value in ((up.weight, ffn.w1), (up.bias, ffn.b1), (down.weight, ffn.w2.T), (down.bias, ffn.b2)):
                param.copy_(torch.as_tensor(np.ascontiguousarray(value)))

    def set_activation(self, model, hf_activation: str) -> None:
        from transformers.activations import ACT2FN
        model.config.hidden_act = hf_activation
        for layer in self.layers(model):
            layer.intermediate.intermediate_act_fn = ACT2FN[hf_activation]

    def permute(self, layer, perm):
        import torch
        p = torch.as_tensor(perm)
        up, down = layer.intermediate.dense, layer.output.dense
        with torch.no_grad():
            up.weight.copy_(up.weight[p])
            up.bias.copy_(up.bias[p])
            down.weight.copy_(down.weight[:, p])

    def ffn_module(self, layer):
        return layer.intermediate

    def install(self, layer, moe):
        # BertOutput computes LayerNorm(dropout(dense(h)) + residual); with dense = Identity and
        # intermediate = MoE FFN (bias included) the layer's math is otherwise untouched.
        layer.intermediate = moe
        layer.output.dense = nn.Identity()
