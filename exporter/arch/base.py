"""What every model family shares: the dense FFN (:class:`DenseFFN`, whose :meth:`~DenseFFN.forward` is the
one written copy of the FFN formula) and :class:`FFNAdapter`, which knows where a family's FFNs live and how
their weights map onto the operator. A family is one file beside this one, registered by the Hugging Face
``model_type`` values it serves; a method (split, router, correction, training) never looks inside a family.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
from typing import Callable, Iterator

import numpy as np
from torch import nn

ADAPTERS: dict[str, type["FFNAdapter"]] = {}

# Hugging Face hidden_act / activation_function -> the operator's activation
HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_fast": "gelu_tanh", "silu": "silu", "swish": "silu"}


class UnsupportedModelError(ValueError):
    pass


def register(*model_types: str) -> Callable:
    def deco(cls):
        for t in model_types:
            ADAPTERS[t] = cls
        cls.model_types = model_types
        return cls
    return deco


def supported() -> list[str]:
    """The Hugging Face model types moefy converts."""
    return sorted(ADAPTERS)


def adapter_for(model_type: str) -> "FFNAdapter":
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(f"architecture '{model_type}' is not supported yet; supported: "
                                    f"{', '.join(supported())}")
    return ADAPTERS[model_type]()


def _activation_fns(x):
    """The activation functions for x's array library: PyTorch's, or the operator reference's (NumPy)."""
    import torch
    if isinstance(x, torch.Tensor):
        from ..moe_ffn import TORCH_ACTIVATIONS
        return TORCH_ACTIVATIONS, lambda a, like=x: None if a is None else torch.as_tensor(a, dtype=like.dtype)
    from runtime.reference import ACTIVATION_FUNCTIONS
    return ACTIVATION_FUNCTIONS, lambda a, like=None: a


def ffn_hidden(x, w1, b1, activation: str, wg=None, bg=None):
    """The FFN's hidden activations [..., I] for rows w1 / wg [I, d] (NumPy or PyTorch, as x is):
    act(x Wg^T + bg) * (x W1^T + b1) in the gated form (SwiGLU), act(x W1^T + b1) in the plain one."""
    acts, cast = _activation_fns(x)
    up = x @ cast(w1).T
    if b1 is not None:  # in the product's dtype: bfloat16 in an autocast, where a float32 bias would promote the
        up = up + cast(b1, up)  # hidden layer to float32 (distill.TRAIN_BF16: a MiniLM student step 20% longer)
    if wg is None:
        return acts[activation](up)
    gate = x @ cast(wg).T
    if bg is not None:
        gate = gate + cast(bg, gate)
    return acts[activation](gate) * up


@dataclasses.dataclass
class DenseFFN:
    """One FFN in operator layout: rows are neurons. w1 [I, d] (up), w2 [I, d] (down: row j is neuron j's
    output vector), optional biases b1 [I], b2 [d], and for gated FFNs wg [I, d] with optional bg [I]."""
    w1: np.ndarray
    w2: np.ndarray
    b1: np.ndarray | None = None
    b2: np.ndarray | None = None
    wg: np.ndarray | None = None
    bg: np.ndarray | None = None

    NEURON_FIELDS = ("w1", "b1", "w2", "wg", "bg")  # indexed by neuron (b2 is not)

    @property
    def gated(self) -> bool:
        return self.wg is not None

    def width(self) -> int:
        """Neurons I."""
        return len(self.w1)

    @property
    def keys(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(rows, bias) whose activation decides whether a neuron fires: the gate's if gated, else W1's.
        What weight-only splits and routers cluster and score."""
        return (self.wg, self.bg) if self.gated else (self.w1, self.b1)

    def hidden(self, x, activation: str):
        return ffn_hidden(x, self.w1, self.b1, activation, self.wg, self.bg)

    def forward(self, x, activation: str):
        """FFN(x) = hidden(x) W2 + b2, for x [..., d] (NumPy or PyTorch)."""
        _, cast = _activation_fns(x)
        y = self.hidden(x, activation) @ cast(self.w2)
        return y if self.b2 is None else y + cast(self.b2)

    def permuted(self, perm: np.ndarray) -> "DenseFFN":
        """The same function with the neurons reordered."""
        return dataclasses.replace(self, **{f: None if getattr(self, f) is None else getattr(self, f)[perm]
                                            for f in self.NEURON_FIELDS})

    def operator_weights(self, experts: int) -> dict[str, np.ndarray | None]:
        """The operator's weight inputs (spec names) for ``experts`` contiguous experts."""
        E, (I, d) = experts, self.w1.shape
        block = lambda a, *rest: None if a is None else np.ascontiguousarray(a, np.float32).reshape(E, I // E, *rest)  # noqa: E731
        return {"W1": block(self.w1, d), "B1": block(self.b1), "W2": block(self.w2, d),
                "B2": None if self.b2 is None else np.ascontiguousarray(self.b2, np.float32),
                "Wg": block(self.wg, d), "Bg": block(self.bg)}


def get_module(root: nn.Module, path: str):
    for name in path.split("."):
        root = getattr(root, name)
    return root


def set_module(root: nn.Module, path: str, module) -> None:
    *parents, name = path.split(".")
    setattr(get_module(root, ".".join(parents)) if parents else root, name, module)


def _linear_weight(module, conv1d: bool):
    """A linear map's weight as [out, in] (GPT-2's Conv1D stores [in, out])."""
    return module.weight.T if conv1d else module.weight


class FFNAdapter(abc.ABC):
    """Where a family's FFNs are and how their weights map onto the operator.

    A family sets the class attributes (module paths relative to the base model and to each layer) and
    :meth:`replacements`; everything else is generic. ``task`` says what the family is used for
    (``exporter/tasks``)."""

    model_types: tuple[str, ...] = ()
    task: str = "feature-extraction"  # or "text-generation"
    layers_path: str = ""  # the transformer layers, from the base model (model.base_model)
    up: str = ""  # first-layer linear map, from a layer
    down: str = ""  # second-layer linear map
    gate: str | None = None  # gate linear map of a gated FFN
    act: str = ""  # the activation module, from a layer
    act_config: str = "hidden_act"  # config attribute that names the activation
    ffn_input: str = ""  # module whose first positional input is the FFN input (calibration hooks)
    conv1d: bool = False  # weights stored [in, out] (GPT-2's Conv1D)

    def activation(self, config) -> str:
        act = getattr(config, self.act_config, None)
        if act not in HF_ACTIVATIONS:
            raise UnsupportedModelError(f"activation '{act}' is not supported; supported: "
                                        f"{', '.join(sorted(HF_ACTIVATIONS))}")
        return HF_ACTIVATIONS[act]

    def layers(self, model) -> list[nn.Module]:
        """The model's transformer layers, in order (with or without a task head)."""
        return list(get_module(model.base_model, self.layers_path))

    def width(self, model) -> int:
        """FFN width (neurons per layer) of the first layer."""
        return _linear_weight(get_module(self.layers(model)[0], self.up), self.conv1d).shape[0]

    def read(self, layer) -> DenseFFN:
        """The layer's FFN weights in operator layout."""
        f = lambda t: None if t is None else t.detach().float().numpy().copy()  # noqa: E731
        up, down = get_module(layer, self.up), get_module(layer, self.down)
        ffn = DenseFFN(w1=f(_linear_weight(up, self.conv1d)), w2=f(_linear_weight(down, self.conv1d).T),
                       b1=f(up.bias), b2=f(down.bias))
        if self.gate:
            g = get_module(layer, self.gate)
            ffn.wg, ffn.bg = f(_linear_weight(g, self.conv1d)), f(g.bias)
        return ffn

    def write(self, layer, ffn: DenseFFN) -> None:
        """Set the layer's dense FFN weights from operator layout; the inverse of :meth:`read`. The width
        must be the layer's (the module shapes do not change)."""
        import torch
        pairs = [(get_module(layer, self.up), ffn.w1, ffn.b1), (get_module(layer, self.down), ffn.w2.T, ffn.b2)]
        if self.gate:
            pairs.append((get_module(layer, self.gate), ffn.wg, ffn.bg))
        with torch.no_grad():
            for module, w, b in pairs:
                module.weight.copy_(torch.as_tensor(np.ascontiguousarray(w.T if self.conv1d else w)))
                if module.bias is not None:
                    module.bias.copy_(torch.as_tensor(np.ascontiguousarray(b)))

    def permute(self, layer, perm: np.ndarray) -> None:
        """Reorder the FFN's neurons in place (the dense function is unchanged)."""
        self.write(layer, self.read(layer).permuted(perm))

    def set_activation(self, model, hf_activation: str) -> None:
        """Make every FFN use the Hugging Face activation ``hf_activation`` (config included, so the
        model saves and reloads with it)."""
        from transformers.activations import ACT2FN
        setattr(model.config, self.act_config, hf_activation)
        for layer in self.layers(model):
            set_module(layer, self.act, ACT2FN[hf_activation])

    def ffn_module(self, layer) -> nn.Module:
        return get_module(layer, self.ffn_input)

    def post_norm(self, config) -> bool:
        """True if the layer normalises after adding the FFN output to the FFN input, LN(x + FFN(x)) (BERT); False
        if the output is added to the residual stream the FFN input was normalised from, h + FFN(norm(h)) (GPT-2,
        LLaMA). Sequential calibration needs that residual: x, else the layer's output minus the FFN's."""
        return False

    @abc.abstractmethod
    def replacements(self, layer, moe: nn.Module) -> dict[str, nn.Module]:
        """Module path in the layer -> the module that replaces it so the layer computes ``moe`` (which
        includes the output bias) instead of its dense FFN, everything around it unchanged."""

    def install(self, layer, moe: nn.Module) -> None:
        """Replace the layer's FFN by ``moe`` for good (see :func:`patched` to restore it)."""
        for path, module in self.replacements(layer, moe).items():
            set_module(layer, path, module)


@contextlib.contextmanager
def patched(model, adapter: FFNAdapter, moes: list[nn.Module]) -> Iterator[None]:
    """Model patcher: every layer computes its MoE FFN inside the block; the dense FFN modules are put
    back afterwards, even on error (so one loaded model serves as the dense reference again)."""
    saved = []
    try:
        for layer, moe in zip(adapter.layers(model), moes):
            for path, module in adapter.replacements(layer, moe).items():
                saved.append((layer, path, get_module(layer, path)))
                set_module(layer, path, module)
        yield
    finally:
        for layer, path, module in reversed(saved):
            set_module(layer, path, module)
