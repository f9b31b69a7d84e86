"""MoEfication of a loaded Hugging Face model: split each FFN into experts, build routers,
save and reload the result, and swap the dense FFNs for MoE modules."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from .adapters import FFNAdapter, adapter_for
from .config import CONFIG_FILE, ROUTERS_FILE, MoEConfig
from .moe_ffn import MoEFFN
from .routers import centroid_router, least_squares_router
from .split import coactivation_split, parameter_clustering


class ModelLoadError(ValueError):
    pass


def _read_model_type(model_dir: Path) -> tuple[str, dict]:
    if not model_dir.exists():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir} is not a directory; pass a Hugging Face model directory "
                             "(config.json + weights + tokenizer)")
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {cfg}: {e}") from None
    if "model_type" not in config:
        raise ModelLoadError(f"{cfg} has no model_type")
    return config["model_type"], config


def load_model(model_dir: str | Path):
    """(model, tokenizer, adapter, moe_config or None, routers or None). Fails before loading
    weights if the architecture is unsupported."""
    from transformers import AutoModel, AutoTokenizer

    model_dir = Path(model_dir)
    model_type, _ = _read_model_type(model_dir)
    adapter = adapter_for(model_type)
    try:
        model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, safetensors errors ...
        raise ModelLoadError(f"cannot load the model in {model_dir}: {type(e).__name__}: {e}") from None
    if (model_dir / CONFIG_FILE).is_file():
        return model, tokenizer, adapter, MoEConfig.load(model_dir), load_file(model_dir / ROUTERS_FILE)
    return model, tokenizer, adapter, None, None


def check_split(experts: int, top_k: int, width: int | None = None) -> None:
    """1 <= top_k <= experts, and experts divides the FFN width (when known)."""
    if experts < 1 or not 1 <= top_k <= experts:
        raise ValueError(f"--top-k must be between 1 and --experts ({experts}), got {top_k}")
    if width is not None and width % experts:
        raise ValueError(f"--experts must divide the FFN width {width}, got {experts}")


SPLITS = ("param", "coact")
ROUTERS = ("centroid", "ls")
CORRECTIONS = ("none", "mean")


def needs_calibration(config: MoEConfig) -> bool:
    return config.split == "coact" or config.router == "ls" or config.correction == "mean"


def moefy(model, adapter: FFNAdapter, config: MoEConfig, calib_batch=None, *, progress: bool = True
          ) -> dict[str, np.ndarray]:
    """Split each FFN into experts (permuting its neurons in place into contiguous blocks; the dense
    model's function is unchanged) and build the routers. Returns {layer.i.router_w [E, d],
    layer.i.router_b [E], layer.i.unselected_bias [E, d] (correction "mean")}.

    ``calib_batch`` (tokenized text) is needed for the co-activation split, the least-squares router
    and the mean correction; FFN inputs are captured once, on the dense model.
    """
    from runtime.reference import ACTIVATION_FUNCTIONS
    check_split(config.experts, config.top_k, config.intermediate_size)
    xs = ffn_inputs(model, adapter, calib_batch) if needs_calibration(config) else None
    E, act = config.experts, ACTIVATION_FUNCTIONS[config.activation]
    routers = {}
    for i, layer in enumerate(tqdm(adapter.layers(model), desc="splitting FFNs into experts", disable=not progress)):
        ffn = adapter.read(layer)
        x = None if xs is None else xs[i]
        h = None if x is None else act(x @ ffn.w1.T + ffn.b1).astype(np.float32)
        if config.split == "coact":
            perm = coactivation_split(h, np.linalg.norm(ffn.w2, axis=1), E, seed=config.seed)
        else:
            perm = parameter_clustering(ffn.w1, E, seed=config.seed)
        adapter.permute(layer, perm)
        ffn = adapter.read(layer)
        h = None if h is None else h[:, perm]
        if config.router == "ls":
            rw, rb = least_squares_router(x, h, ffn.w2, E)
        else:
            rw, rb = centroid_router(ffn.w1, E)
        routers[f"layer.{i}.router_w"], routers[f"layer.{i}.router_b"] = rw, rb
        if config.correction == "mean":
            routers[f"layer.{i}.unselected_bias"] = mean_correction(ffn, rw, rb, x, h, config)
    return routers


@torch.no_grad()
def ffn_inputs(model, adapter: FFNAdapter, batch) -> list[np.ndarray]:
    """Each layer's FFN input on the batch's real (unpadded) tokens: [N, d] per layer."""
    mask = batch["attention_mask"].numpy().astype(bool)
    captured = []
    hooks = [adapter.ffn_module(layer).register_forward_hook(lambda mod, args, out: captured.append(args[0]))
             for layer in adapter.layers(model)]
    try:
        model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return [x.numpy()[mask] for x in captured]


def mean_correction(ffn, router_w, router_b, x: np.ndarray, h: np.ndarray, config: MoEConfig) -> np.ndarray:
    """unselected_bias [E, d]: each expert's mean output over the calibration tokens that did *not*
    select it (its mean over all tokens where none did). A skipped GELU/SiLU expert is not zero."""
    from runtime.reference import select_top_k
    E, m = config.experts, config.expert_size
    unselected = np.ones((len(x), E), bool)
    np.put_along_axis(unselected, select_top_k(x @ router_w.T + router_b, config.top_k), False, axis=1)
    weights = np.where(unselected.any(0), unselected, True).astype(np.float64)  # [N, E]
    mean_h = np.einsum("ne,nem->em", weights, h.reshape(len(x), E, m)) / weights.sum(0)[:, None]
    return np.einsum("em,emd->ed", mean_h, ffn.w2.reshape(E, m, -1)).astype(np.float32)


def save_moefied(directory: str | Path, model, tokenizer, config: MoEConfig, routers) -> None:
    """A Hugging Face directory (permuted weights: still the dense model) plus the MoE config and routers."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_file({k: np.ascontiguousarray(v) for k, v in routers.items()}, directory / ROUTERS_FILE)
    config.save(directory)


def install_moe(model, adapter: FFNAdapter, config: MoEConfig, routers, *, target: str = "custom") -> None:
    """Replace every dense FFN by a MoEFFN built from its (already permuted) weights."""
    E, m = config.experts, config.expert_size
    for i, layer in enumerate(adapter.layers(model)):
        ffn = adapter.read(layer)
        d = ffn.w1.shape[1]
        moe = MoEFFN(ffn.w1.reshape(E, m, d), ffn.b1.reshape(E, m), ffn.w2.reshape(E, m, d), ffn.b2,
                     routers[f"layer.{i}.router_w"], routers[f"layer.{i}.router_b"],
                     routers.get(f"layer.{i}.unselected_bias"), top_k=config.top_k, activation=config.activation, target=target)
        adapter.install(layer, moe)


@torch.no_grad()
def last_hidden_state(model, batch) -> np.ndarray:
    return model(**batch).last_hidden_state.numpy()
