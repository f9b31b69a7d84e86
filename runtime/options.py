"""``session_options()``: ONNX Runtime options with moefy's operator available, for any ONNX Runtime host in
Python (optimum's ``ORTModel*.from_pretrained(..., session_options=...)``, plain ``onnxruntime``)."""
from __future__ import annotations

import onnxruntime as ort

from .library import library_path
from .session import default_options


def session_options(threads: int | None = None, *, spinning: bool = True) -> ort.SessionOptions:
    """ONNX Runtime options with moefy's C++ custom-op library registered (the ``cpp`` backend's kernels)
    and moefy's threading settings: ``threads`` intra-op threads (default: all cores), idle threads spinning
    unless ``spinning`` is False (turn it off when other engines or sessions share the cores).

    Example::

        from optimum.onnxruntime import ORTModelForCausalLM
        model = ORTModelForCausalLM.from_pretrained("out/smollm-moe", session_options=runtime.session_options())

    Raises:
        FileNotFoundError: the C++ library was not built (see :func:`runtime.library_path`).
    """
    so = default_options(threads, spinning=spinning)
    so.register_custom_ops_library(library_path())
    return so
