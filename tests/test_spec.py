"""The operator specification is the one source of truth: the C++ library must register exactly
it, and every implementation must reject bad inputs with the spec's messages."""
from __future__ import annotations

import ctypes
import json
import re

import numpy as np
import onnxruntime as ort
import pytest
from conftest import make_inputs, requires_cpp
from test_kernels import IN_ORT, run_in_ort

import runtime
from runtime import numba_kernels, reference, spec


@requires_cpp
def test_cpp_library_registers_exactly_the_spec():
    lib = ctypes.CDLL(runtime.library_path())
    lib.moefy_describe_ops.restype = ctypes.c_char_p
    ops = json.loads(lib.moefy_describe_ops())
    float_type, any_type = 1, 0  # ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, _UNDEFINED (the op checks the type)
    types = {("float32",): float_type, ("float32", "int8"): any_type}
    assert ops == [{
        "domain": spec.DOMAIN, "op_type": spec.OP_TYPE, "since_version": spec.SINCE_VERSION, "end_version": spec.VERSION,
        "inputs": [{"name": p.name, "optional": p.optional, "type": types[p.types]} for p in spec.INPUTS],
        "num_outputs": len(spec.OUTPUTS), "attributes": [a.name for a in spec.ATTRIBUTES],
        "activations": list(spec.ACTIVATIONS),
    }]


@requires_cpp
def test_cpp_library_exports_only_its_entry_points():
    import subprocess
    out = subprocess.run(["nm", "-D", "--defined-only", runtime.library_path()], capture_output=True, text=True)
    if out.returncode:
        pytest.skip("nm not available")
    names = {line.split()[-1] for line in out.stdout.splitlines() if " T " in line}
    assert names == {"RegisterCustomOps", "moefy_describe_ops", "moefy_describe_isas", "moefy_set_numba_kernels"}


def test_cpp_header_is_generated_from_spec():
    h = spec.cpp_header()
    assert f'kDomain = "{spec.DOMAIN}"' in h and f"kVersion = {spec.VERSION};" in h
    for i, p in enumerate(spec.INPUTS):
        assert f"k{p.name} = {i}" in h


BAD = [  # (mutation, expected message fragment)
    (lambda a: a.update(W2=a["W2"][:, :-1]), "W2 must have shape"),
    (lambda a: a.update(B2=np.zeros(3, np.float32)), "B2 must have shape"),
    (lambda a: a.update(router_b=np.zeros(2, np.float32)), "router_b must have shape"),
    (lambda a: a.update(X=np.zeros((7, 5), np.float32)), "last dim of X"),
    (lambda a: a.update(W1=a["W1"][0]), "W1 must be [E, m, d]"),
    (lambda a: [a.pop("router_w"), a.pop("router_b")], "exactly one of router_w and router_scores"),
    (lambda a: a.update(Bg=np.zeros((6, 5), np.float32)), "Bg needs Wg"),
]


@pytest.mark.parametrize("mutate,message", BAD, ids=[m for _, m in BAD])
@pytest.mark.parametrize("impl", ["reference", "numba", *(pytest.param(i, marks=requires_cpp) for i in IN_ORT)])
def test_bad_shapes_get_the_same_clear_error(mutate, message, impl, rng):
    a = make_inputs(rng)
    mutate(a)
    if impl in IN_ORT:
        with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match=re.escape(message)):
            run_in_ort(a, backend=impl.removesuffix("-in-ort"), top_k=2)
    else:
        fn = reference.sparse_expert_ffn if impl == "reference" else numba_kernels.sparse_expert_ffn
        with pytest.raises(spec.SpecError, match=re.escape(message)):
            fn(a, top_k=2)


@pytest.mark.parametrize("attrs,message", [
    ({"top_k": 0}, r"top_k must be an integer in \[1, E=6\]"),
    ({"top_k": 7}, r"top_k must be an integer in \[1, E=6\]"),
    ({"top_k": 2, "activation": "tanh"}, "activation must be one of relu, gelu, gelu_tanh, silu"),
    ({"top_k": 2, "min_k": 3}, r"min_k must be an integer in \[1, top_k=2\], got 3"),
    ({"top_k": 2, "min_k": 0}, r"min_k must be an integer in \[1, top_k=2\], got 0"),
    ({"top_k": 2, "score_threshold": float("nan")}, r"score_threshold must be a number \(not NaN\)"),
])
@pytest.mark.parametrize("impl", ["reference", *(pytest.param(i, marks=requires_cpp) for i in IN_ORT)])
def test_bad_attributes(attrs, message, impl, rng):
    a = make_inputs(rng)
    if impl in IN_ORT:
        with pytest.raises(Exception, match=message):
            run_in_ort(a, backend=impl.removesuffix("-in-ort"), **attrs)
    else:
        with pytest.raises(spec.SpecError, match=message):
            reference.sparse_expert_ffn(a, **attrs)


def test_docs_show_the_specs_table():
    """README and docs/OPS.md carry the operator table generated from the spec, not a hand-kept copy."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    for doc in ("README.md", "docs/OPS.md"):
        assert spec.markdown_table() in (root / doc).read_text(), f"{doc}: paste `python runtime/spec.py --markdown`"


@pytest.mark.parametrize("backend", ["numba-split", pytest.param("numba", marks=requires_cpp),
                                     pytest.param("cpp", marks=requires_cpp)])
def test_version_1_models_still_run(backend, rng):
    """Version 2 only added attributes whose defaults keep version 1's meaning: a version-1 node loads and
    computes the same."""
    from runtime.single_op import single_op_model
    a = make_inputs(rng, lead=(5,))
    model = single_op_model(a, top_k=2)
    for o in model.opset_import:
        if o.domain == spec.DOMAIN:
            o.version = 1
    got = runtime.InferenceSession(model.SerializeToString(), backend=backend).run(None, {"X": a["X"]})[0]
    np.testing.assert_allclose(got, reference.sparse_expert_ffn(a, top_k=2), rtol=1e-4, atol=1e-5)
