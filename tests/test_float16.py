"""float16 expert weights (half the bytes, computed in float32): every backend against the reference, the spec's
type rules, and a float16 export end to end."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import SESSION_BACKENDS, make_inputs, requires_cpp
from test_isa_paths import PATHS, run_path
from test_kernels import BACKENDS, IN_ORT, assert_matches_reference, assert_refused, run_in_ort

from exporter import export
from runtime import reference, spec


def halved(a):
    """The inputs with W1, W2 and Wg as float16."""
    return {k: v.astype(np.float16) if k in spec.SCALES else v for k, v in a.items()}


@pytest.mark.parametrize("backend", list(BACKENDS.values()), ids=list(BACKENDS))
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("lead,d,E,m,k", [((1,), 33, 5, 17, 2), ((130,), 64, 8, 16, 3), ((3, 50), 384, 32, 48, 8),
                                          ((40,), 384, 256, 6, 64)])  # the last: narrow experts (dot products)
def test_float16_experts_match_reference(backend, gated, lead, d, E, m, k, rng):
    a = halved(make_inputs(rng, lead=lead, d=d, E=E, m=m, gated=gated, unselected=True))
    assert_matches_reference(backend(a, top_k=k, activation="gelu"), a, top_k=k, activation="gelu")


def test_reference_computes_the_float16_values(rng):
    """float16 weights mean their values: the same output as float32 weights holding them."""
    a = halved(make_inputs(rng, gated=True))
    widened = {k: v.astype(np.float32) if k in spec.SCALES else v for k, v in a.items()}
    np.testing.assert_array_equal(reference.sparse_expert_ffn(a, top_k=2, activation="silu"),
                                  reference.sparse_expert_ffn(widened, top_k=2, activation="silu"))


@requires_cpp
@pytest.mark.parametrize("backend", ["cpp", "numba"])
def test_float16_weights_fed_at_run_time(backend, rng):
    a = halved(make_inputs(rng, lead=(37,), d=40, E=8, m=20, gated=True, unselected=True))
    got = run_in_ort(a, feeds=[p.name for p in spec.INPUTS], backend=backend, top_k=3, activation="silu")
    assert_matches_reference(got, a, top_k=3, activation="silu")


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("m", [6, 40], ids=["narrow", "panels"])
def test_float16_on_every_instruction_set_path(isa, m, rng):
    """Paths with a float16 load (F16C, AVX-512, NEON) read float16 panels; the SSE paths widen them when packing."""
    a = halved(make_inputs(rng, lead=(21,), d=44, E=16, m=m, gated=True, unselected=True))
    assert_matches_reference(run_path(isa, a, top_k=4, activation="silu"), a, top_k=4, activation="silu")


BAD_TYPES = [  # (mutation, expected message fragment)
    (lambda a: a.update(W2=a["W2"].astype(np.float32)),
     "W1, W2 and Wg must have one element type, got W1 float16 and W2 float32"),
    (lambda a: a.update(W1_scale=np.ones(a["W1"].shape[:2], np.float32)), "W1_scale is only for an int8 W1"),
]


@pytest.mark.parametrize("mutate,message", BAD_TYPES, ids=[m for _, m in BAD_TYPES])
@pytest.mark.parametrize("impl", ["reference", "numba", *(pytest.param(i, marks=requires_cpp) for i in IN_ORT)])
def test_bad_float16_inputs_get_the_same_clear_error(mutate, message, impl, rng):
    a = halved(make_inputs(rng))
    mutate(a)
    assert_refused(a, impl, message, top_k=2)


@pytest.mark.parametrize("backend", SESSION_BACKENDS)
def test_float16_export_end_to_end(tiny_bert_dir, tmp_path, backend):
    out = tmp_path / "f16.onnx"
    report = export(tiny_bert_dir, out, experts=8, top_k=2, weights="float16", backend=backend, progress=False,
                    log=lambda *a: None)
    assert report.max_rel_diff <= 1e-4  # the exported graph computes what the (float16-rounded) PyTorch model does
    m = onnx.load(out)
    inits = {t.name: t for t in m.graph.initializer}
    nodes = [n for n in m.graph.node if n.domain == spec.DOMAIN]
    assert nodes
    for node in nodes:
        w1, w2 = (inits[node.input[spec.INPUT_INDEX[n]]] for n in ("W1", "W2"))
        assert w1.data_type == w2.data_type == onnx.TensorProto.FLOAT16


def test_float16_needs_the_custom_target(tiny_bert_dir, tmp_path):
    with pytest.raises(ValueError, match="--weights float16 needs --target custom"):
        export(tiny_bert_dir, tmp_path / "x.onnx", experts=8, top_k=2, weights="float16", target="standard",
               progress=False, log=lambda *a: None)
    assert not list(tmp_path.iterdir())
