"""int8 expert weights (weight-only, one float scale per row): every backend against the reference, the
spec's type rules with the same words everywhere, and an int8 export end to end."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import SESSION_BACKENDS, make_inputs, requires_cpp
from test_kernels import BACKENDS, IN_ORT, assert_matches_reference, assert_refused, run_in_ort

from exporter import export
from exporter.quantize import dequantize_rows, quantize_experts, quantize_rows
from runtime import reference, spec


quantized = quantize_experts


def test_quantize_rows_round_trip(rng):
    w = torch.from_numpy(rng.standard_normal((3, 5, 40)).astype(np.float32))
    w[1, 2] = 0.0  # an all-zero row (e.g. padding) stays exactly zero
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (3, 5) and int(q.abs().max()) == 127
    back = dequantize_rows(q, s)
    assert float((back - w).abs().max()) <= float(s.max()) / 2 + 1e-7  # round to nearest
    assert float(back[1, 2].abs().max()) == 0.0


@pytest.mark.parametrize("backend", list(BACKENDS.values()), ids=list(BACKENDS))
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("lead,d,E,m,k", [((1,), 33, 5, 17, 2), ((130,), 64, 8, 16, 3), ((3, 50), 384, 32, 48, 8)])
def test_int8_experts_match_reference(backend, gated, lead, d, E, m, k, rng):
    a = quantized(make_inputs(rng, lead=lead, d=d, E=E, m=m, gated=gated, unselected=True))
    assert a["W1"].dtype == np.int8
    assert_matches_reference(backend(a, top_k=k, activation="gelu"), a, top_k=k, activation="gelu")


@requires_cpp
@pytest.mark.parametrize("backend", ["cpp", "numba"])
def test_int8_weights_fed_at_run_time(backend, rng):
    a = quantized(make_inputs(rng, lead=(37,), d=40, E=8, m=20, gated=True, unselected=True))
    got = run_in_ort(a, feeds=[p.name for p in spec.INPUTS], backend=backend, top_k=3, activation="silu")
    assert_matches_reference(got, a, top_k=3, activation="silu")


BAD_TYPES = [  # (mutation, expected message fragment); ONNX Runtime itself enforces float-only inputs' types
    (lambda a: a.update(W1=a["W1"].astype(np.float64)), "W1 must be float32, float16 or int8, got float64"),
    (lambda a: a.pop("W1_scale"), "int8 W1 needs W1_scale (one float scale per row)"),
    (lambda a: a.update(W2=a["W2"].astype(np.float32) * a["W2_scale"][..., None]),
     "W1, W2 and Wg must have one element type, got W1 int8 and W2 float32"),
    (lambda a: a.update(W2_scale=a["W2_scale"][:, :-1]), "W2_scale must have shape"),
]


@pytest.mark.parametrize("mutate,message", BAD_TYPES, ids=[m for _, m in BAD_TYPES])
@pytest.mark.parametrize("impl", ["reference", "numba", *(pytest.param(i, marks=requires_cpp) for i in IN_ORT)])
def test_bad_types_get_the_same_clear_error(mutate, message, impl, rng):
    a = quantized(make_inputs(rng))
    mutate(a)
    assert_refused(a, impl, message, top_k=2)


def test_float_checks_of_the_spec(rng):
    a = make_inputs(rng)
    a["B1"] = a["B1"].astype(np.float64)
    with pytest.raises(spec.SpecError, match="B1 must be float32, got float64"):
        reference.sparse_expert_ffn(a, top_k=2)
    a = make_inputs(rng)
    a["W1_scale"] = np.ones((6, 5), np.float32)
    with pytest.raises(spec.SpecError, match="W1_scale is only for an int8 W1"):
        reference.sparse_expert_ffn(a, top_k=2)


@pytest.mark.parametrize("backend", SESSION_BACKENDS)
def test_int8_export_end_to_end(tiny_bert_dir, tmp_path, backend):
    out = tmp_path / "int8.onnx"
    report = export(tiny_bert_dir, out, experts=8, top_k=2, weights="int8", backend=backend, progress=False,
                    log=lambda *a: None)
    assert report.max_rel_diff <= 1e-4  # the exported graph computes what the (dequantized) PyTorch model does
    m = onnx.load(out)
    inits = {t.name: t for t in m.graph.initializer}
    for node in (n for n in m.graph.node if n.domain == spec.DOMAIN):
        w1, w2 = (inits[node.input[spec.INPUT_INDEX[n]]] for n in ("W1", "W2"))
        assert w1.data_type == w2.data_type == onnx.TensorProto.INT8
        assert node.input[spec.INPUT_INDEX["W1_scale"]] and node.input[spec.INPUT_INDEX["W2_scale"]]


def test_int8_needs_the_custom_target(tiny_bert_dir, tmp_path):
    with pytest.raises(ValueError, match="--weights int8 needs --target custom"):
        export(tiny_bert_dir, tmp_path / "x.onnx", experts=8, top_k=2, weights="int8", target="standard",
               progress=False, log=lambda *a: None)
    assert not list(tmp_path.iterdir())


def test_int8_with_mlp_router_and_shared_expert(tiny_bert_dir, tmp_path):
    """int8 experts combine with a router that feeds router_scores and with always-on shared experts."""
    calib = tmp_path / "calib.txt"
    calib.write_text("the cat is on a mat\nit is for you\na dog and a cat\nwe read a book by the sea\n")
    out = tmp_path / "int8-mlp.onnx"
    report = export(tiny_bert_dir, out, experts=8, top_k=3, router="mlp", correction="mean", shared_experts=1,
                    calib=calib, weights="int8", backend="numba-split", progress=False, log=lambda *a: None)
    assert report.max_rel_diff <= 1e-4
    node = next(n for n in onnx.load(out).graph.node if n.domain == spec.DOMAIN)
    assert node.input[spec.INPUT_INDEX["router_scores"]] and node.input[spec.INPUT_INDEX["W2_scale"]]
