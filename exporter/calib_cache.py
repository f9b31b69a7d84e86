"""Calibration activations (each layer's dense FFN input on the calibration tokens), cached on disk.

Capturing them runs the model over the whole calibration text; every export of the same model and text
(e.g. the exports of a ``moe-eval --curve``) needs the same arrays, so they are kept in the user cache,
keyed by the model as loaded (weights, buffers and config, so a model changed in memory, e.g. by
``--relufy``, gets its own entry) and by the tokenized calibration text (so the text, the tokenizer and
the token cap all count). About 280 MB per entry for MiniLM on 1,000 fortunes. The cache's total size is
capped (``--calib-cache-max-gb`` / ``$MOEFY_CALIB_CACHE_MAX_GB``, default ``DEFAULT_MAX_GB``): the least recently
used entries go first, and an entry larger than the cap is not kept. Each use logs the cache's size.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .moefy import ffn_inputs, text_ids

CACHE_FORMAT = 1  # bump when what is stored, or how it is computed, changes
DEFAULT_MAX_GB = 4.0  # about 14 MiniLM entries of 1,000 texts (distillation runs cache more texts)
MAX_GB_ENV = "MOEFY_CALIB_CACHE_MAX_GB"


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


def max_bytes(max_gb: float | None = None) -> int:
    """The cache's cap in bytes: ``max_gb``, else ``$MOEFY_CALIB_CACHE_MAX_GB``, else DEFAULT_MAX_GB (0: keep none).
    Raises ValueError for a cap that is not a number >= 0."""
    source = "--calib-cache-max-gb"
    if max_gb is None and os.environ.get(MAX_GB_ENV):
        source = f"${MAX_GB_ENV}"
        try:
            max_gb = float(os.environ[MAX_GB_ENV])
        except ValueError:
            raise ValueError(f"{source} must be a size in GB >= 0 (e.g. 2 or 0.5), got {os.environ[MAX_GB_ENV]!r}") \
                from None
    if max_gb is None:
        max_gb = DEFAULT_MAX_GB
    if isinstance(max_gb, bool) or not (isinstance(max_gb, (int, float)) and math.isfinite(max_gb) and max_gb >= 0):
        raise ValueError(f"{source} must be a size in GB >= 0 (e.g. 2 or 0.5), got {max_gb!r}")
    return int(max_gb * 1e9)


def entries(directory: Path | None = None) -> list[Path]:
    """The cache's entries (any format), most recently used first."""
    directory = directory or cache_dir()
    found = []
    try:
        for p in directory.glob("[0-9]*-*.npz"):
            try:
                found.append((p.stat().st_mtime, p))
            except OSError:  # removed meanwhile by another run
                pass
    except OSError:
        return []
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


def usage(directory: Path | None = None) -> tuple[int, int]:
    """(entries, bytes) in the cache."""
    sizes = []
    for p in entries(directory):
        try:
            sizes.append(p.stat().st_size)
        except OSError:
            pass
    return len(sizes), sum(sizes)


def describe(cap: int | None = None) -> str:
    """'N entries, X MB [of a Y MB cap] in DIR', for logs and --help."""
    n, size = usage()
    of = "" if cap is None else f" of a {cap / 1e6:,.0f} MB cap"
    return f"{n} {'entry' if n == 1 else 'entries'}, {size / 1e6:,.0f} MB{of} in {cache_dir()}"


def evict(cap: int, directory: Path | None = None) -> list[Path]:
    """Delete the least recently used entries until the cache holds at most ``cap`` bytes; returns them."""
    kept, removed = 0, []
    for p in entries(directory):
        try:
            size = p.stat().st_size
        except OSError:
            continue
        if kept + size <= cap:
            kept += size
        else:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


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


def calibrate(model, adapter, batch, *, use_cache: bool = True, max_gb: float | None = None, log=None) -> Calibration:
    """The dense model's FFN inputs on ``batch`` (tokenized, padded calibration text), from the cache when
    this model and this text were seen before; the cache is then trimmed to ``max_gb`` (see :func:`max_bytes`)."""
    cap = max_bytes(max_gb)
    path = cache_dir() / f"{CACHE_FORMAT}-{model_digest(model)}-{batch_digest(batch)}.npz"
    if use_cache and path.is_file():
        try:
            with np.load(path) as f:
                calib = Calibration([f[f"layer{i}"] for i in range(len(adapter.layers(model)))], f["groups"])
            os.utime(path)  # recently used
            removed = evict(cap)  # the cap may have been lowered since
            if log:
                log(f"  calibration activations: cache hit ({path.name}); cache: {describe(cap)}"
                    + (f", {len(removed)} least recently used removed" if removed else ""))
            return calib
        except (OSError, ValueError, KeyError) as e:  # a truncated or foreign file: recompute it
            if log:
                log(f"  calibration activations: ignoring unreadable cache file {path}: {e}")
    calib = Calibration(ffn_inputs(model, adapter, batch), text_ids(batch))
    if use_cache:
        _store(path, calib, cap, log)
    return calib


def _store(path: Path, calib: Calibration, cap: int, log) -> None:
    size = calib.groups.nbytes + sum(x.nbytes for x in calib.xs)
    if size > cap:
        removed = evict(cap, path.parent)
        if log:
            log(f"  calibration activations: not cached ({size / 1e6:,.0f} MB > the cache's cap of {cap / 1e6:,.0f} "
                f"MB: --calib-cache-max-gb or ${MAX_GB_ENV})"
                + (f"; {len(removed)} least recently used removed" if removed else ""))
        return
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
        removed = evict(cap, path.parent)
        if log:
            log(f"  calibration activations: computed and cached ({path.name}); cache: {describe(cap)}"
                + (f", {len(removed)} least recently used removed" if removed else ""))
    except OSError as e:  # a read-only or full disk must not fail the export
        if log:
            log(f"  calibration activations: not cached ({e})")
