"""``InferenceSession``: an ONNX Runtime session for models holding SparseExpertFFN nodes."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from . import spec
from .library import ISA_CONFIG_KEY, cpp_available, isa_paths, library_path
from .numba_backend import NumbaGraphSession, is_sparse_ffn

BACKENDS = ("auto", "cpp", "numba", "numba-split")
METADATA_KEY = "moefy.config"
log = logging.getLogger("moefy.runtime")


def choose_backend(isa: str | None = None) -> tuple[str, str]:
    """What ``backend="auto"`` runs on this machine, and why.

    The rule comes from the side-by-side benchmarks (benchmarks/README.md, item 15): with the C++ library
    built, its kernels on the path the CPU gets were faster than the Numba kernels on every benchmarked shape
    (MiniLM, BERT-base, SmolLM2 gated, 4096x11008), token count (1, 16, 128), thread count (1, 2) and weight type
    on the avx512 and avx2 paths, and within 10% of Numba compiled for the same CPU on the sse41 path. Without
    the library only numba-split runs (the numba backend needs the library too, as its host op).
    """
    if not cpp_available():
        return "numba-split", ("the C++ library was not built at install time (no C++ compiler or ONNX Runtime "
                               "headers), so the Numba kernels run between ONNX Runtime sessions")
    info = isa_paths()
    path = isa or info["default"] or "auto"
    tile = next((p["tile"] for p in info["paths"] if p["name"] == path), "?")
    why = ("forced by MOEFY_ISA" if not isa and os.environ.get("MOEFY_ISA") else "forced by isa=" if isa
           else "the widest this CPU runs")
    return "cpp", (f"C++ kernels on the {path} path ({why}, {tile} register tile): at least as fast as the Numba "
                   f"kernels on every benchmarked shape (benchmarks/README.md)")


class InvalidInputError(ValueError):
    """A feed that does not match the model's inputs (name, dtype or rank)."""


def default_options(threads: int | None = None, *, spinning: bool = True) -> ort.SessionOptions:
    """ONNX Runtime options: ``threads`` intra-op threads (default: all cores). Spinning keeps idle
    pool threads hot (lowest latency when ONNX Runtime owns the cores); turn it off when another
    engine (Numba) computes between ONNX Runtime calls, or its idle threads steal that engine's cores."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class InferenceSession:
    """Like ``onnxruntime.InferenceSession``, with the moefy operator available.

    Args:
        path_or_bytes: an ONNX model (path or serialized bytes).
        backend: ``"cpp"`` (the C++ kernels of the custom-op library, inside ONNX Runtime), ``"numba"``
            (the Numba kernels inside ONNX Runtime, on its thread pool, through the library's
            ai.moefy.numba op), ``"numba-split"`` (no C++ library: the graph cut at each sparse FFN,
            ONNX Runtime sessions with the Numba kernels between them) or ``"auto"`` (the fastest here:
            see :func:`choose_backend`; the choice and its reason are in ``backend`` and ``backend_reason``
            and logged once to the "moefy.runtime" logger).
        threads: intra-op threads for ONNX Runtime (default: all cores).
        spinning: let idle ONNX Runtime threads spin (default: on; always off for numba-split, whose
            Numba threads need the cores between ONNX Runtime calls). Turn it off when other sessions
            or engines share the cores.
        sess_options: ONNX Runtime options to start from (not numba-split; overrides threads and spinning).
        isa: instruction-set path of the C++ kernels (backend cpp): "avx512", "avx2", "sse41", "sse2" (x86-64), "neon"
            (aarch64) or "auto" (the widest this CPU runs); default: $MOEFY_ISA, else "auto". A path this CPU
            cannot run is refused with the features it lacks (``runtime.isa_paths()`` lists them).
    """

    def __init__(self, path_or_bytes: str | os.PathLike | bytes, backend: str = "auto", *,
                 threads: int | None = None, spinning: bool = True,
                 sess_options: ort.SessionOptions | None = None, isa: str | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "auto":
            backend, self.backend_reason = choose_backend(isa)
            log.info("backend auto -> %s: %s", backend, self.backend_reason)
        else:
            self.backend_reason = "asked for"
        self.backend = backend
        self.isa = None  # the C++ kernels' instruction-set path (backend cpp)
        if backend == "cpp":
            self.isa = isa if isa not in (None, "auto") else isa_paths()["default"] or None
        if isinstance(path_or_bytes, (bytes, bytearray)):
            model = onnx.load_from_string(bytes(path_or_bytes))
        else:
            if not Path(path_or_bytes).is_file():
                raise FileNotFoundError(f"ONNX model {path_or_bytes} does not exist")
            model = onnx.load(os.fspath(path_or_bytes))
        self.moe_config = _read_moe_config(model)
        self.num_sparse_ffn = sum(is_sparse_ffn(n) for n in model.graph.node)
        if backend in ("cpp", "numba"):
            so = sess_options or default_options(threads, spinning=spinning)
            if backend == "numba":
                from . import numba_host  # compiles (or loads) its kernels: only when asked for
                so.register_custom_ops_library(numba_host.register())
                numba_host.retarget(model)
            else:
                if isa is not None:  # read by the library when it is registered, so set first
                    so.add_session_config_entry(ISA_CONFIG_KEY, isa)
                so.register_custom_ops_library(library_path())
            self._ort = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            self._numba = None
        else:  # numba-split
            self._ort = None
            self._numba = NumbaGraphSession(model, lambda: default_options(threads, spinning=False))
        self._inputs = list(model.graph.input)
        self._outputs = [o.name for o in model.graph.output]

    def get_inputs(self) -> list[onnx.ValueInfoProto]:
        return list(self._inputs)

    def get_output_names(self) -> list[str]:
        return list(self._outputs)

    def run(self, output_names: Sequence[str] | None, input_feed: dict) -> list[np.ndarray]:
        self._check_feed(input_feed)
        names = list(output_names) if output_names else self._outputs
        unknown = [n for n in names if n not in self._outputs]
        if unknown:
            raise InvalidInputError(f"unknown output(s) {unknown}; the model's outputs are {self._outputs}")
        if self._ort is not None:
            return self._ort.run(names, input_feed)
        return self._numba.run(names, input_feed)

    def _check_feed(self, feed: dict) -> None:
        expected = [i.name for i in self._inputs]
        missing = [n for n in expected if n not in feed]
        extra = [n for n in feed if n not in expected]
        if missing or extra:
            raise InvalidInputError(f"the model takes inputs {expected}; missing {missing}, unexpected {extra}")
        for i in self._inputs:
            name, t = i.name, i.type.tensor_type
            value = feed[name]
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            want = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
            if not isinstance(value, np.ndarray) or value.dtype != want or value.ndim != len(dims) or any(
                    isinstance(w, int) and w > 0 and w != g for w, g in zip(dims, value.shape)):
                got = (f"{value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray)
                       else type(value).__name__)
                raise InvalidInputError(f"input '{name}' must be a {want} array of rank {len(dims)} "
                                        f"{dims}; got {got}")


def _read_moe_config(model: onnx.ModelProto) -> dict | None:
    meta = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in meta:
        return None
    cfg = json.loads(meta[METADATA_KEY])
    if cfg.get("op_domain") != spec.DOMAIN or int(cfg.get("op_version", 0)) > spec.VERSION:
        raise ValueError(f"model needs operator {cfg.get('op_domain')} version {cfg.get('op_version')}; "
                         f"this runtime provides {spec.DOMAIN} version {spec.VERSION}: upgrade moefy")
    return cfg
