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


class InvalidModelError(ValueError):
    """A file or bytes that are not an ONNX model this runtime can run (the message names the source)."""


# Session config entries carried from a caller's sess_options to the copy the library is registered on (ONNX
# Runtime's Python API can neither clone options nor list their entries): onnxruntime_session_options_config_keys.h's
# session-wide keys.
_CONFIG_KEYS = tuple(f"session.{k}" for k in (
    "allow_released_opsets_only", "collect_node_memory_stats_to_file", "debug_layout_transformation",
    "disable_aot_function_inlining", "disable_cpu_ep_fallback", "disable_double_qdq_remover", "disable_prepacking",
    "disable_quant_qdq", "dynamic_block_base", "enable_quant_qdq_cleanup", "force_spinning_stop",
    "inter_op.allow_spinning", "intra_op.allow_spinning", "intra_op_thread_affinities", "load_model_format",
    "model_external_initializers_file_folder_path", "node_partition_config_file",
    "optimized_model_external_initializers_file_name", "optimized_model_external_initializers_min_size_in_bytes",
    "qdq_matmulnbits_accuracy_level", "qdqisint8allowed", "save_external_prepacked_constant_initializers",
    "save_model_format", "set_denormal_as_zero", "strict_shape_type_inference", "use_device_allocator_for_initializers",
    "use_env_allocators", "use_ort_model_bytes_directly", "use_ort_model_bytes_for_initializers", "x64quantprecision",
)) + tuple(f"optimization.{k}" for k in (
    "disable_specified_optimizers", "enable_gelu_approximation", "minimal_build_optimizations")) + (
    "mlas.enable_gemm_fastmath_arm64_bfloat16", ISA_CONFIG_KEY)
_EXTERNAL_DATA_DIR = "session.model_external_initializers_file_folder_path"


def _copy_options(so: ort.SessionOptions) -> ort.SessionOptions:
    """A new SessionOptions with ``so``'s properties and the _CONFIG_KEYS entries it sets: the library is registered
    on the copy, so the caller's object stays as it was and can open further sessions."""
    new = ort.SessionOptions()
    for name, attr in vars(type(so)).items():
        if isinstance(attr, property) and attr.fset is not None:
            setattr(new, name, getattr(so, name))
    for key in _CONFIG_KEYS:
        try:
            value = so.get_session_config_entry(key)
        except Exception:  # noqa: BLE001 - ONNX Runtime raises a plain RuntimeError/Fail for "not set"
            continue
        new.add_session_config_entry(key, value)
    return new


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
        sess_options: ONNX Runtime options to start from (not numba-split; overrides threads and spinning). It
            is not modified: the library is registered on a copy that carries its properties and session config
            entries (ONNX Runtime cannot clone options, so initializers, free-dimension overrides and providers
            added to it are not carried over).
        isa: instruction-set path of the C++ kernels (backend cpp): "avx512", "avx2", "sse41", "sse2" (x86-64), "neon"
            (aarch64) or "auto" (the widest this CPU runs); default: $MOEFY_ISA, else "auto". A path this CPU
            cannot run is refused with the features it lacks (``runtime.isa_paths()`` lists them).

    Raises:
        FileNotFoundError / IsADirectoryError: no file at the path.
        InvalidModelError: not an ONNX model, bad moefy metadata, or an ai.moefy version this runtime lacks.
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
        model, path = _load(path_or_bytes)
        source = f"ONNX model {path}" if path is not None else "the ONNX model bytes"
        _check_op_nodes(model, source)
        self.moe_config = _read_moe_config(model, source)
        self.num_sparse_ffn = sum(is_sparse_ffn(n) for n in model.graph.node)
        if backend in ("cpp", "numba"):
            so = _copy_options(sess_options) if sess_options is not None else \
                default_options(threads, spinning=spinning)
            if backend == "numba":
                from . import numba_host  # compiles (or loads) its kernels: only when asked for
                so.register_custom_ops_library(numba_host.register())
                numba_host.retarget(model)
                # The retargeted model goes to ONNX Runtime as bytes; it was read without its external data
                # (a > 2 GiB model cannot be serialized with it), which ONNX Runtime reads from the model's folder.
                if path is not None and _has_external_data(model):
                    so.add_session_config_entry(_EXTERNAL_DATA_DIR, str(Path(path).resolve().parent))
                what = model.SerializeToString()
            else:
                if isa is not None:  # read by the library when it is registered, so set first
                    so.add_session_config_entry(ISA_CONFIG_KEY, isa)
                so.register_custom_ops_library(library_path())
                # By path when there is one: ONNX Runtime then reads external data itself (models over 2 GiB).
                what = os.fspath(path) if path is not None else bytes(path_or_bytes)
            self._ort = ort.InferenceSession(what, so, providers=["CPUExecutionProvider"])
            self._numba = None
        else:  # numba-split
            self._ort = None
            self._numba = NumbaGraphSession(model, lambda: default_options(threads, spinning=False),
                                            None if path is None else str(Path(path).resolve().parent))
        self._inputs = list(model.graph.input)
        self._outputs = [o.name for o in model.graph.output]

    def get_inputs(self) -> list[onnx.ValueInfoProto]:
        return list(self._inputs)

    def get_output_names(self) -> list[str]:
        return list(self._outputs)

    def run(self, output_names: Sequence[str] | None, input_feed: dict) -> list[np.ndarray]:
        input_feed = self._check_feed(input_feed)
        names = list(output_names) if output_names else self._outputs
        unknown = [n for n in names if n not in self._outputs]
        if unknown:
            raise InvalidInputError(f"unknown output(s) {unknown}; the model's outputs are {self._outputs}")
        if self._ort is not None:
            return self._ort.run(names, input_feed)
        return self._numba.run(names, input_feed)

    def _check_feed(self, feed: dict) -> dict:
        """The feed checked against the graph inputs' declared types and shapes (an input declared without a shape
        takes any rank); NumPy scalars become 0-d arrays."""
        expected = [i.name for i in self._inputs]
        missing = [n for n in expected if n not in feed]
        extra = [n for n in feed if n not in expected]
        if missing or extra:
            raise InvalidInputError(f"the model takes inputs {expected}; missing {missing}, unexpected {extra}")
        feed = {k: np.asarray(v) if isinstance(v, np.generic) else v for k, v in feed.items()}
        for i in self._inputs:
            if not i.type.HasField("tensor_type"):
                continue  # sequences, maps, optionals: ONNX Runtime checks them
            name, t = i.name, i.type.tensor_type
            value = feed[name]
            want = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type) if t.elem_type else None
            dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim] \
                if t.HasField("shape") else None
            if not isinstance(value, np.ndarray) or (want is not None and value.dtype != want) or (
                    dims is not None and (value.ndim != len(dims) or any(
                        isinstance(w, int) and w > 0 and w != g for w, g in zip(dims, value.shape)))):
                got = (f"{value.dtype} array of shape {list(value.shape)}" if isinstance(value, np.ndarray)
                       else type(value).__name__)
                shape = "" if dims is None else " of rank 0 (a scalar)" if not dims else f" of rank {len(dims)} {dims}"
                raise InvalidInputError(f"input '{name}' must be a{'' if want is None else f' {want}'} array{shape}; "
                                        f"got {got}")
        return feed


def _load(path_or_bytes) -> tuple[onnx.ModelProto, Path | None]:
    """The model without its external data (ONNX Runtime reads that itself), and its path (None for bytes)."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        try:
            return onnx.load_from_string(bytes(path_or_bytes)), None
        except Exception as e:  # protobuf's DecodeError and friends
            raise InvalidModelError(f"the bytes given are not an ONNX model ({type(e).__name__}: {e})") from None
    path = Path(path_or_bytes)
    if path.is_dir():
        raise IsADirectoryError(f"ONNX model {path} is a directory, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist")
    try:
        return onnx.load(os.fspath(path), load_external_data=False), path
    except OSError:
        raise
    except Exception as e:  # protobuf's DecodeError and friends
        raise InvalidModelError(f"{path} is not an ONNX model ({type(e).__name__}: {e})") from None


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _check_op_nodes(model: onnx.ModelProto, source: str) -> None:
    """For every backend, before ONNX Runtime sees the model: the ai.moefy opset version it imports (ONNX Runtime
    would run a node of any version from the custom op's first on as that op; spec.check_version), and each
    node's attributes as spec.node_attributes reads them (the C++ op reads them the same way, but cannot see
    unknown ones)."""
    nodes = [n for n in model.graph.node if is_sparse_ffn(n)]
    versions = [o.version for o in model.opset_import if o.domain == spec.DOMAIN]
    if nodes and not versions:
        raise InvalidModelError(f"{source} has {spec.OP_TYPE} nodes but does not import the {spec.DOMAIN} opset")
    try:
        for v in versions:
            spec.check_version(v)
    except spec.SpecError as e:
        raise InvalidModelError(f"{source}: {e}") from None
    for n in nodes:
        try:
            spec.node_attributes(n)
        except spec.SpecError as e:
            raise InvalidModelError(f"{source}, node '{n.name}': {e}") from None


def _read_moe_config(model: onnx.ModelProto, source: str = "the ONNX model") -> dict | None:
    meta = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in meta:
        return None
    try:
        cfg = json.loads(meta[METADATA_KEY])
    except ValueError as e:
        raise InvalidModelError(f"{source}: metadata '{METADATA_KEY}' is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise InvalidModelError(f"{source}: metadata '{METADATA_KEY}' must be a JSON object, got "
                                f"{type(cfg).__name__}")
    domain, version = cfg.get("op_domain"), cfg.get("op_version")
    if not isinstance(domain, str) or not isinstance(version, int) or isinstance(version, bool):
        raise InvalidModelError(f"{source}: metadata '{METADATA_KEY}' must name the operator as op_domain (a string) "
                                f"and op_version (an integer); got {domain!r} and {version!r}")
    if domain != spec.DOMAIN or version > spec.VERSION:
        raise InvalidModelError(f"model needs operator {domain} version {version}; this runtime provides "
                                f"{spec.DOMAIN} version {spec.VERSION}: upgrade moefy")
    return cfg
