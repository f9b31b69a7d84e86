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
    types = {("float32",): float_type, spec.WEIGHT_TYPES: any_type}
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


# ----------------------------------------------------------------------------- attributes as the backends read them
def with_attribute(model, name, value):
    """``model`` (one SparseExpertFFN node) with attribute ``name`` replaced by onnx.helper's attribute for ``value``
    (whose Python type picks the ONNX type), or removed when ``value`` is None."""
    from onnx import helper
    node = model.graph.node[0]
    keep = [x for x in node.attribute if x.name != name]
    del node.attribute[:]
    node.attribute.extend(keep)
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))
    return model


def plain_ort_session(model, backend):
    """ONNX Runtime with the library registered by hand, as a C++/C#/Java host would: the C++ attribute reader
    alone (runtime.InferenceSession checks attributes in Python first)."""
    so = ort.SessionOptions()
    if backend == "numba":
        from runtime import numba_host
        so.register_custom_ops_library(numba_host.register())
        numba_host.retarget(model)
    else:
        so.register_custom_ops_library(runtime.library_path())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _tensor(v):
    from onnx import numpy_helper
    return numpy_helper.from_array(np.array(v, np.float32))


WRONG_TYPES = [  # (attribute, value of the wrong ONNX type, expected message)
    ("score_threshold", 0, "attribute score_threshold must be of ONNX type FLOAT, got INT"),
    ("min_k", 2.0, "attribute min_k must be of ONNX type INT, got FLOAT"),
    ("activation", 1, "attribute activation must be of ONNX type STRING, got INT"),
    ("expert_weighting", 1, "attribute expert_weighting must be of ONNX type STRING, got INT"),
    ("top_k", 2.0, "attribute top_k must be of ONNX type INT, got FLOAT"),
    ("top_k", "2", "attribute top_k must be of ONNX type INT, got STRING"),
    ("min_k", [1, 2], "attribute min_k must be of ONNX type INT, got INTS"),
    ("score_threshold", [0.5], "attribute score_threshold must be of ONNX type FLOAT, got FLOATS"),
    ("score_threshold", _tensor(0.5), "attribute score_threshold must be of ONNX type FLOAT, got "),  # TENSOR
    ("top_k", None, "attribute top_k is required"),
]


@pytest.mark.parametrize("name,value,message", WRONG_TYPES, ids=[f"{n}-{m.split()[-1]}" for n, _, m in WRONG_TYPES])
@pytest.mark.parametrize("reader", ["python", pytest.param("cpp", marks=requires_cpp),
                                    pytest.param("numba", marks=requires_cpp)])
def test_wrong_attribute_types_are_refused_not_defaulted(name, value, message, reader, rng):
    """An attribute of another ONNX type than the spec's is an error on every backend; the C++ op used to read it
    as absent and compute with the default (an INT score_threshold turned dynamic k off)."""
    from runtime.single_op import single_op_model
    a = make_inputs(rng)
    model = with_attribute(single_op_model(a, top_k=2, min_k=1, score_threshold=0.0), name, value)
    if reader == "python":  # numba-split, moe-eval and runtime.InferenceSession's load-time check
        with pytest.raises(spec.SpecError, match=re.escape(message)):
            spec.node_attributes(model.graph.node[0])
    else:
        with pytest.raises(Exception, match=re.escape(message)):
            plain_ort_session(model, reader)


@pytest.mark.parametrize("backend", ["numba-split", pytest.param("numba", marks=requires_cpp),
                                     pytest.param("cpp", marks=requires_cpp)])
def test_sessions_refuse_wrong_attribute_types_and_unknown_attributes(backend, rng):
    from runtime.single_op import single_op_model
    a = make_inputs(rng)
    for name, value, message in [("score_threshold", 0, "attribute score_threshold must be of ONNX type FLOAT, got INT"),
                                 ("topk", 2, "unknown attribute 'topk'")]:
        model = with_attribute(single_op_model(a, top_k=2), name, value)
        with pytest.raises(runtime.session.InvalidModelError, match=re.escape(message)):
            runtime.InferenceSession(model.SerializeToString(), backend=backend)


@pytest.mark.parametrize("backend", ["numba-split", pytest.param("numba", marks=requires_cpp),
                                     pytest.param("cpp", marks=requires_cpp)])
def test_single_op_model_writes_float_attributes_as_float(backend, rng):
    """single_op_model(score_threshold=0) used to write an INT attribute, which the C++ op then ignored."""
    from runtime.single_op import single_op_model
    a = make_inputs(rng, lead=(40,), E=8, router="scores")
    attrs = dict(top_k=4, min_k=1, score_threshold=0)
    model = single_op_model(a, feeds=("X", "router_scores"), **attrs)
    assert {x.name: x.type for x in model.graph.node[0].attribute}["score_threshold"] == spec.ONNX_TYPES["float"]
    got = runtime.InferenceSession(model.SerializeToString(), backend=backend).run(
        None, {"X": a["X"], "router_scores": a["router_scores"]})[0]
    np.testing.assert_allclose(got, reference.sparse_expert_ffn(a, **attrs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("version", [0, 3, 99])
@pytest.mark.parametrize("backend", ["numba-split", pytest.param("numba", marks=requires_cpp),
                                     pytest.param("cpp", marks=requires_cpp)])
def test_unknown_op_versions_are_refused_without_metadata(version, backend, rng):
    """A hand-built model (no moefy metadata) of an ai.moefy version this runtime lacks is refused; it used to run
    as version 2 on every backend."""
    from runtime.single_op import single_op_model
    model = single_op_model(make_inputs(rng), top_k=2)
    assert not model.metadata_props
    next(o for o in model.opset_import if o.domain == spec.DOMAIN).version = version
    with pytest.raises(runtime.session.InvalidModelError, match=f"uses ai.moefy version {version}; this moefy "
                                                                 f"implements versions 1 to 2"):
        runtime.InferenceSession(model.SerializeToString(), backend=backend)


@pytest.mark.parametrize("impl", ["spec", "reference", "numba", *(pytest.param(i, marks=requires_cpp) for i in IN_ORT)])
def test_d_zero_is_refused_everywhere(impl, rng):
    """d = 0 (an FFN of width 0): one clear error on every implementation (spec.check used to pass it, the reference
    then failed in NumPy and the C++ kernel handed null pointers to memcpy)."""
    a = make_inputs(rng, d=0)
    a["router_w"] = np.zeros((6, 0), np.float32)
    message = "d (the last dim of X and W1) must be >= 1"
    if impl == "spec":
        with pytest.raises(spec.SpecError, match=re.escape(message)):
            spec.check_arrays(a, {"top_k": 2})
    elif impl in IN_ORT:
        with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match=re.escape(message)):
            run_in_ort(a, backend=impl.removesuffix("-in-ort"), top_k=2)
    else:
        fn = reference.sparse_expert_ffn if impl == "reference" else numba_kernels.sparse_expert_ffn
        with pytest.raises(spec.SpecError, match=re.escape(message)):
            fn(a, top_k=2)


def test_numba_check_memo_keys_on_element_types(rng):
    """After one valid call, the same shapes with other element types must still be checked (the memo used to key
    on shapes and attributes only, so int8 W1 with float W2, or a float64 X, passed)."""
    a = make_inputs(rng)
    numba_kernels.sparse_expert_ffn(a, top_k=2)
    mixed = {**a, "W1": np.ones(a["W1"].shape, np.int8), "W1_scale": np.ones(a["W1"].shape[:2], np.float32)}
    with pytest.raises(spec.SpecError, match="W1, W2 and Wg must have one element type"):
        numba_kernels.sparse_expert_ffn(mixed, top_k=2)
    with pytest.raises(spec.SpecError, match="X must be float32, got float64"):
        numba_kernels.sparse_expert_ffn({**a, "X": a["X"].astype(np.float64)}, top_k=2)


def test_python_attribute_values_are_checked_strictly(rng):
    a = make_inputs(rng)
    for attrs, message in [({"top_k": True}, "top_k must be an integer"), ({"top_k": 2, "min_K": 1}, "unknown attribute"),
                           ({"top_k": 2, "score_threshold": "0"}, "score_threshold must be a number")]:
        with pytest.raises(spec.SpecError, match=message):
            reference.sparse_expert_ffn(a, **attrs)
