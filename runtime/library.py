"""Where the C++ custom-op library is, for this package and for other ONNX Runtime hosts."""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import json
import os
from pathlib import Path

LIBRARY_NAME = "libmoefy_ops.so"
ENV_VAR = "MOEFY_OPS_LIBRARY"  # overrides the packaged library (e.g. a development build)
ISA_ENV_VAR = "MOEFY_ISA"  # forces the C++ kernels' instruction-set path for the whole process
ISA_CONFIG_KEY = "moefy.isa"  # ... or per session: an ONNX Runtime session config entry, set before registering


def library_path() -> str:
    """Path of the SparseExpertFFN custom-op library, to pass to
    ``SessionOptions.register_custom_ops_library`` (Python), ``Ort::SessionOptions::RegisterCustomOpsLibrary``
    (C++), ``SessionOptions.RegisterCustomOpLibrary`` (C#) or ``OrtSession.SessionOptions.registerCustomOpLibrary``
    (Java).

    Raises:
        FileNotFoundError: the library was not built (no C++ compiler or ONNX Runtime headers at install time).
    """
    override = os.environ.get(ENV_VAR)
    path = Path(override) if override else Path(__file__).with_name(LIBRARY_NAME)
    if not override and not path.is_file():
        path = _installed_copy() or path
    if not path.is_file():
        how = f"${ENV_VAR} points to {path}, which does not exist" if override else (
            f"{path} was not built at install time (no C++ compiler or ONNX Runtime headers were found; "
            "see cpp_ops/README.md); use backend='numba-split' or reinstall with ORT_INCLUDE_DIR set")
        raise FileNotFoundError(f"moefy C++ op library not available: {how}")
    return str(path)


def _installed_copy() -> Path | None:
    """The library installed with the moefy distribution, for when this module is imported from a
    source checkout (e.g. Python started in the repository root) rather than from site-packages."""
    try:
        files = importlib.metadata.distribution("moefy").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [f for f in files if f.name == LIBRARY_NAME]
    return Path(found[0].locate()) if found else None


def cpp_available() -> bool:
    try:
        library_path()
        return True
    except FileNotFoundError:
        return False


@functools.cache
def isa_paths() -> dict:
    """The C++ kernels' instruction-set paths, as the library sees this CPU::

        {"best": "avx512", "default": "avx512", "default_error": "",
         "paths": [{"name": "avx512", "tile": "8x48", "lanes": 16, "runs": True, "missing": ""}, ...]}

    ``default`` is what a session gets without ``isa=``: $MOEFY_ISA, else ``best``; ``default_error`` says why
    $MOEFY_ISA cannot run here. ``missing`` names the CPU features a path lacks.
    """
    lib = ctypes.CDLL(library_path())  # the same handle ONNX Runtime's dlopen of this path gets
    lib.moefy_describe_isas.restype = ctypes.c_char_p
    return json.loads(lib.moefy_describe_isas().decode())
