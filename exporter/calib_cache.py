"""Calibration activations (each layer's dense FFN input on the calibration tokens), cached on disk.

Capturing them runs the model over the whole calibration text; every export of the same model and text
(e.g. the exports of a ``moe-eval --curve``) needs the same arrays, so they are kept in the user cache,
keyed by the model as loaded (weights, buffers and config, so a model changed in memory, e.g. by
``--relufy``, gets its own entry) and by the tokenized calibration text (so the text, the tokenizer and
the token cap all count). About 280 MB per entry for MiniLM on 1,000 fortunes; the least recently used
entries beyond ``MAX_ENTRIES`` are deleted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .moefy import ffn_inputs, text_ids

CACHE_FORMAT = 1  # bump when what is stored, or how it is computed, changes
MAX_ENTRIES = 6


@dataclasses.dataclass
class Calibration:
    """xs[i] [N, d]: layer i's FFN input on the real (unpadded) calibration tokens, text after text;
    groups [N]: the text each token comes from."""
    xs: list[np.ndarray]
    groups: np.ndarray

    def first_texts(self, n: int) -> "Calibration":
        """The tokens of the first ``n`` texts (views: tokens are stored text after text)."""
        end = int(np.searchsorted(self.groups, n))
        return Calibration([x[:end] for x in self.xs], self.groups[:end])


def cache_dir() -> Path:
    """``$MOEFY_CACHE_DIR``, else ``${XDG_CACHE_HOME:-~/.cache}/moefy/calibration``."""
    if os.environ.get("MOEFY_CACHE_DIR"):
        return Path(os.environ["MOEFY_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moefy" / "calibration"


def model_digest(model) -> str:
    """Hash of everything that decides the model's function: its state (sorted by name) and its config
    (less the fields that only say where it came from)."""
    h = hashlib.blake2b(digest_size=16)
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data )
    return h.hexdigest()


def batch_digest(batch) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(batch):
        a = np.ascontiguousarray(batch[name].numpy())
        h.update(f"{name}:{a.dtype}:{a.shape}".encode())
        h.update(a.data)
    return h.hexdigest()


def calibrate(model, adapter, batch, *, use_cache: bool = True, log=None) -> Calibration:
    """The dense model's FFN inputs on ``batch`` (tokenized, padded calibration text), from the cache when
    this model and this text were seen before."""
    path = cache_dir() / f"{CACHE_FORMAT}-{model_digest(model)}-{batch_digest(batch)}.npz"
    if use_cache and path.is_file():
        try:
            with np.load(path) as f:
                calib = Calibration([f[f"layer{i}"] for i in range(len(adapter.layers(model)))], f["groups"])
            os.utime(path)  # recently used
            if log:
                log(f"  calibration activations: cache hit ({path})")
            return calib
        except (OSError, ValueError, KeyError) as e:  # a truncated or foreign file: recompute it
            if log:
                log(f"  calibration activations: ignoring unreadable cache file {path}: {e}")
    calib = Calibration(ffn_inputs(model, adapter, batch), text_ids(batch))
    if use_cache:
        _store(path, calib, log)
    return calib


def _store(path: Path, calib: Calibration, log) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, groups=calib.groups, **{f"layer{i}": x for i, x in enumerate(calib.xs)})
            os.replace(tmp, path)  # readers never see a partial file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        entries = sorted(path.parent.glob(f"{CACHE_FORMAT}-*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[MAX_ENTRIES:]:
            old.unlink(missing_ok=True)
        if log:
            log(f"  calibration activations: computed and cached ({path})")
    except OSError as e:  # a read-only or full disk must not fail the export
        if log:
            log(f"  calibration activations: not cached ({e})")
