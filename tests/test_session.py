"""runtime.InferenceSession at the edges: large models, the caller's options, inputs without shapes, scalars,
malformed files and metadata, and graphs numba-split used to read differently from ONNX Runtime."""
from __future__ import annotations

import json
import re

import numpy as np
import onnxruntime as ort
import pytest
from conftest import SESSION_BACKENDS, make_inputs, requires_cpp
from onnx import TensorProto, helper, numpy_helper

import runtime
from runtime import reference, spec
from runtime.session import METADATA_KEY, InvalidModelError
from runtime.single_op import single_op_model


def run(model, backend, feed):
    return runtime.InferenceSession(model.SerializeToString(), backend=backend).run(None, feed)[0]


@pytest.mark.parametrize("backend", SESSION_BACKENDS)
def test_model_over_2_gib_opens_by_path(backend, rng, tmp_path):
    """A model whose external data passes 2 GiB (decoder LLMs do) opens as plain ONNX Runtime opens it; the session
    used to load the data into the proto and fail to serialize it. The data is a sparse file of zeros (no disk)."""
    a = make_inputs(rng, lead=(3,), d=16, E=4, m=3)
    model = single_op_model(a, top_k=2)
    n = 2**29 + 2**20  # float32 values: 2 GiB + 4 MiB
    big = TensorProto(name="unused_big", data_type=TensorProto.FLOAT, dims=[n], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "big.bin"), ("offset", "0"), ("length", str(4 * n))):
        big.external_data.add(key=key, value=value)
    model.graph.initializer.append(big)
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(4 * n)
    got = runtime.InferenceSession(tmp_path / "m.onnx", backend=backend).run(None, {"X": a["X"]})[0]
    np.testing.assert_allclose(got, reference.sparse_expert_ffn(a, top_k=2), rtol=1e-4, atol=1e-5)


@requires_cpp
@pytest.mark.parametrize("backend", ["cpp", "numba"])
def test_sess_options_are_not_modified_and_can_be_reused(backend, rng):
    """One options object for several sessions: it used to get the library registered into it, and the second
    session failed with "Domain already set in registry"."""
    a = make_inputs(rng)
    model = single_op_model(a, top_k=2).SerializeToString()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = [runtime.InferenceSession(model, backend=backend, sess_options=so) for _ in range(2)]
    for s in sessions:
        np.testing.assert_allclose(s.run(None, {"X": a["X"]})[0], reference.sparse_expert_ffn(a, top_k=2), rtol=1e-4,
                                   atol=1e-5)
        used = s._ort.get_session_options()
        assert used.intra_op_num_threads == 1 and used.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    # Untouched: the caller can still register the library on it once, as a plain ONNX Runtime user would.
    so.register_custom_ops_library(runtime.library_path())
    plain = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    assert plain.run(None, {"X": a["X"]})[0].shape == a["X"].shape


@pytest.mark.parametrize("backend", SESSION_BACKENDS)
def test_inputs_without_declared_shape_take_any_rank(backend, rng):
    """A graph input declared with a type but no shape was read as rank 0, and every feed refused."""
    a = make_inputs(rng, lead=(2, 5))
    model = single_op_model(a, top_k=2)
    model.graph.input[0].type.tensor_type.ClearField("shape")
    np.testing.assert_allclose(run(model, backend, {"X": a["X"]}), reference.sparse_expert_ffn(a, top_k=2),
                               rtol=1e-4, atol=1e-5)


def scaled_input_model(a):
    """X * alpha -> SparseExpertFFN, alpha a rank-0 float input."""
    model = single_op_model(a, top_k=2)
    g = model.graph
    g.node[0].input[0] = "X_scaled"
    g.node.insert(0, helper.make_node("Mul", ["X", "alpha"], ["X_scaled"]))
    g.input.append(helper.make_tensor_value_info("alpha", TensorProto.FLOAT, []))
    return model


@pytest.mark.parametrize("backend", SESSION_BACKENDS)
def test_numpy_scalars_feed_rank_0_inputs_and_messages_say_scalar(backend, rng):
    a = make_inputs(rng)
    model = scaled_input_model(a)
    got = run(model, backend, {"X": a["X"], "alpha": np.float32(2.0)})  # a NumPy scalar is a rank-0 value
    np.testing.assert_allclose(got, reference.sparse_expert_ffn({**a, "X": 2 * a["X"]}, top_k=2), rtol=1e-4, atol=1e-5)
    sess = runtime.InferenceSession(model.SerializeToString(), backend=backend)
    with pytest.raises(runtime.InvalidInputError, match=re.escape("input 'alpha' must be a float32 array of rank 0 "
                                                                  "(a scalar); got float")):
        sess.run(None, {"X": a["X"], "alpha": 2.0})
    with pytest.raises(runtime.InvalidInputError, match=re.escape("input 'X' must be a float32 array of rank 2 "
                                                                  "['lead0', 24]; got float32 array of shape []")):
        sess.run(None, {"X": np.float32(1.0), "alpha": np.float32(2.0)})


def test_files_that_are_not_models_are_named(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\x00 not a protobuf \x01" * 8)
    with pytest.raises(InvalidModelError, match=re.escape(f"{bad} is not an ONNX model")):
        runtime.InferenceSession(bad, backend="numba-split")
    with pytest.raises(InvalidModelError, match="the bytes given are not an ONNX model"):
        runtime.InferenceSession(bad.read_bytes(), backend="numba-split")
    with pytest.raises(IsADirectoryError, match="is a directory, not a file"):
        runtime.InferenceSession(tmp_path, backend="numba-split")


@pytest.mark.parametrize("metadata,message", [
    ("{not json", "metadata 'moefy.config' is not valid JSON"),
    ("[1, 2]", "metadata 'moefy.config' must be a JSON object, got list"),
    ('{"op_domain": "ai.moefy"}', "must name the operator as op_domain (a string) and op_version (an integer); got "
                                  "'ai.moefy' and None"),
    ('{"op_domain": "ai.moefy", "op_version": "2"}', "op_version (an integer); got 'ai.moefy' and '2'"),
    ('{"op_domain": "ai.moefy", "op_version": 9}', "model needs operator ai.moefy version 9"),
])
def test_bad_metadata_is_an_error_not_a_traceback(metadata, message, rng):
    model = single_op_model(make_inputs(rng), top_k=2)
    model.metadata_props.add(key=METADATA_KEY, value=metadata)
    with pytest.raises(InvalidModelError, match=re.escape(message)):
        runtime.InferenceSession(model.SerializeToString(), backend="numba-split")


# ------------------------------------------------------------------ graphs numba-split used to read differently
@pytest.mark.parametrize("backend", SESSION_BACKENDS)
def test_x_given_as_an_initializer(backend, rng):
    """X a constant (numba-split: KeyError); the graph then has no inputs."""
    a = make_inputs(rng)
    model = single_op_model(a, feeds=(), top_k=2)
    assert not model.graph.input
    np.testing.assert_allclose(run(model, backend, {}), reference.sparse_expert_ffn(a, top_k=2), rtol=1e-4, atol=1e-5)


def with_extra(model, *, inputs=(), outputs=()):
    node = model.graph.node[0]
    for name in inputs:
        node.input.append(name)
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), name))
    node.output.extend(outputs)
    return model


@pytest.mark.parametrize("change,message", [
    (lambda m: with_extra(m, inputs=[""] * (len(spec.INPUTS) - len(m.graph.node[0].input)) + ["extra"]),
     r"15|input size|at most 14"),
    (lambda m: with_extra(m, outputs=["Y2"]), r"output|Y2"),
], ids=["15 inputs", "2 outputs"])
@pytest.mark.parametrize("backend", SESSION_BACKENDS)
def test_nodes_the_schema_does_not_allow_are_refused(change, message, backend, rng):
    """A 15th input (numba-split ignored it) or a second output: refused on every backend."""
    a = make_inputs(rng)
    model = change(single_op_model(a, top_k=2))
    with pytest.raises(Exception, match=message):
        run(model, backend, {"X": a["X"]})


@pytest.mark.parametrize("backend", SESSION_BACKENDS)
def test_initializer_dims_that_do_not_match_its_data(backend, rng):
    """numba-split failed in a NumPy reshape that named no tensor; now it names W1, as ONNX Runtime does."""
    a = make_inputs(rng)
    model = single_op_model(a, top_k=2)
    w1 = next(t for t in model.graph.initializer if t.name == "W1")
    w1.dims[2] += 1
    with pytest.raises(Exception, match="W1"):
        run(model, backend, {"X": a["X"]})


@pytest.mark.parametrize("backend", SESSION_BACKENDS)
def test_moefy_metadata_from_the_exporter_still_loads(backend, rng):
    model = single_op_model(make_inputs(rng), top_k=2)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps({"op_domain": spec.DOMAIN, "op_version": 1}))
    assert runtime.InferenceSession(model.SerializeToString(), backend=backend).moe_config["op_version"] == 1
