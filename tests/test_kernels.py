"""Every backend against the NumPy reference: C++ and Numba inside ONNX Runtime, Numba called directly, on random shapes
and the corner cases the operator must get right. Tolerance: max |diff| <= 2e-5 * max |ref| + 1e-6."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import make_inputs, near_tie_tokens, requires_cpp

import runtime
from runtime import numba_kernels, reference, spec
from runtime.single_op import single_op_model

RTOL = 2e-5


def run_in_ort(a, feeds=("X",), cast=True, backend="cpp", **attrs):
    """The op as a one-node model in ONNX Runtime: backend cpp (C++ kernels) or numba (Numba kernels)."""
    feeds = [f for f in feeds if a.get(f) is not None]
    model = single_op_model(a, feeds=feeds, cast=cast, **attrs)
    sess = runtime.InferenceSession(model.SerializeToString(), backend=backend)
    return sess.run(None, {f: a[f] for f in feeds})[0]


IN_ORT = ("cpp", "numba-in-ort")  # the op-level implementations that run_in_ort runs
BACKENDS = {
    "numba": lambda a, **attrs: numba_kernels.sparse_expert_ffn(a, **attrs),
    "numba-in-ort": pytest.param(lambda a, **attrs: run_in_ort(a, feeds=("X", "router_scores"), backend="numba",
                                                               **attrs), marks=requires_cpp),
    "cpp": pytest.param(lambda a, **attrs: run_in_ort(a, feeds=("X", "router_scores"), **attrs), marks=requires_cpp),
}


def assert_refused(a, impl, message, **attrs):
    """``impl`` (reference, numba, or one of IN_ORT, then fed every input at run time: ONNX Runtime hands the op
    whatever type the arrays have) refuses the inputs ``a`` with ``message``."""
    import re
    if impl in IN_ORT:
        import onnxruntime as ort
        with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match=re.escape(message)):
            run_in_ort(a, feeds=list(a), cast=False, backend=impl.removesuffix("-in-ort"), **attrs)
    else:
        fn = reference.sparse_expert_ffn if impl == "reference" else numba_kernels.sparse_expert_ffn
        with pytest.raises(spec.SpecError, match=re.escape(message)):
            fn(a, **attrs)


def assert_matches_reference(got, a, **attrs):
    ref = reference.sparse_expert_ffn(a, **attrs)
    assert got.shape == ref.shape and got.dtype == np.float32
    keep = ~near_tie_tokens(a, attrs["top_k"], threshold=attrs.get("score_threshold")).reshape(ref.shape[:-1])
    err = np.abs(got - ref)[keep].max(initial=0.0)
    assert err <= RTOL * np.abs(ref).max() + 1e-6, f"max abs error {err:.3e}"


@pytest.mark.parametrize("backend", list(BACKENDS.values()), ids=list(BACKENDS))
@pytest.mark.parametrize("activation", spec.ACTIVATIONS)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_activations_plain_and_gated(backend, activation, gated, rng):
    a = make_inputs(rng, lead=(2, 9), d=40, E=8, m=7, gated=gated)
    assert_matches_reference(backend(a, top_k=3, activation=activation), a, top_k=3, activation=activation)


@pytest.mark.parametrize("backend", list(BACKENDS.values()), ids=list(BACKENDS))
@pytest.mark.parametrize("lead,d,E,m,k", [
    ((1,), 16, 4, 3, 1),        # one token, k = 1
    ((1,), 33, 5, 17, 5),       # one token, k = E, odd sizes (vector tails)
    ((130,), 64, 8, 16, 8),     # k = E: every expert on every token (more than one token block)
    ((3, 5, 7), 48, 16, 20, 2), # rank-4 input
    ((200,), 384, 32, 48, 8),   # MiniLM's FFN shape
])
@pytest.mark.parametrize("router", ["weights", "scores"])
def test_shapes_and_k(backend, lead, d, E, m, k, router, rng):
    a = make_inputs(rng, lead=lead, d=d, E=E, m=m, router=router, unselected=(k < E))
    assert_matches_reference(backend(a, top_k=k, activation="gelu"), a, top_k=k, activation="gelu")


@pytest.mark.parametrize("backend", list(BACKENDS.values()), ids=list(BACKENDS))
def test_all_tokens_on_one_expert_and_unpicked_experts(backend, rng):
    a = make_inputs(rng, lead=(70,), E=6, router="scores", unselected=True)
    a["router_scores"][:, 2] += 100.0  # everyone picks expert 2 first ...
    a["router_scores"][:, 4] -= 100.0  # ... and nobody picks expert 4
    assert_matches_reference(backend(a, top_k=2, activation="silu"), a, top_k=2, activation="silu")


# Given router scores with exact ties and NaN in the positions that matter (row 2: NaN first, then a tie at the k-th
# place; row 5: NaN must not count as below the dynamic-k threshold; row 7: -0 ties with +0; row 8: NaN below
# -inf). Compared on every row: given scores carry no rounding, so no token is a near tie to leave out.
NAN_SCORES = [[1, 1, 1, 1, 1], [0, 2, 2, 0, 2], [np.nan, 0, 0, 0, 0], [np.nan] * 5, [0, np.nan, 1, np.nan, -1],
              [np.nan, 5, np.nan, 1, 0], [3, 2, np.nan, 1, 0], [-1, -0.0, 0, -0.0, 0],
              [-np.inf, np.nan, np.inf, -np.inf, -1]]
NAN_CASES = [dict(top_k=2), dict(top_k=3), dict(top_k=4, min_k=1, score_threshold=2.0)]


def nan_inputs():
    a = make_inputs(np.random.default_rng(5), lead=(len(NAN_SCORES),), E=5, router="scores")
    a["router_scores"][:] = NAN_SCORES
    return a


def assert_nan_rows_match(backend):
    a = nan_inputs()
    for attrs in NAN_CASES:
        got, ref = backend(a, activation="relu", **attrs), reference.sparse_expert_ffn(a, activation="relu", **attrs)
        err = np.abs(got - ref).max(axis=1)
        assert (err <= RTOL * np.abs(ref).max() + 1e-6).all(), f"{attrs}: rows {np.nonzero(err > 1e-5)[0].tolist()} differ"


@pytest.mark.parametrize("backend", list(BACKENDS.values()), ids=list(BACKENDS))
def test_ties_go_to_lower_index_and_nan_ranks_last(backend):
    assert_nan_rows_match(backend)
    scores = np.array(NAN_SCORES, np.float32)
    assert reference.select_top_k(scores, 2).tolist() == [[0, 1], [1, 2], [1, 2], [0, 1], [2, 0], [1, 3], [0, 1],
                                                          [1, 2], [2, 4]]
    assert reference.select_top_k(scores, 4)[8].tolist() == [2, 4, 0, 3]
    assert reference.selected_mask(scores, 4, 1, 2.0)[5].tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("backend", list(BACKENDS.values()), ids=list(BACKENDS))
def test_many_experts_with_ties_at_the_kth_score(backend):
    """Rows wider than a vector with runs of equal scores across the k-th place (the kernels' top-k searches for
    the k-th score, then takes ties from the lowest index): every tie-break must match the reference's."""
    rng = np.random.default_rng(11)
    a = make_inputs(rng, lead=(40,), d=16, E=70, m=4, router="scores", unselected=True)
    a["router_scores"][:] = rng.integers(-3, 4, size=(40, 70)).astype(np.float32)  # 7 values over 70 experts
    a["router_scores"][0] = 1.0  # all equal: the k lowest indices
    a["router_scores"][1, ::3] = np.nan
    for attrs in (dict(top_k=1), dict(top_k=17), dict(top_k=70), dict(top_k=20, min_k=5, score_threshold=1.0)):
        got, ref = backend(a, activation="gelu", **attrs), reference.sparse_expert_ffn(a, activation="gelu", **attrs)
        assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max() + 1e-6, attrs


NAN_PROBE = """
import sys
import numpy as np
from numpy import inf, nan
from runtime import numba_kernels, reference
scores = np.array({scores!r}, np.float32)
T, E = scores.shape
for step in sys.argv[1:]:
    if step == "helpers":  # the selection helpers compiled on their own, before any kernel calls them
        numba_kernels._better(np.float32(np.nan), np.float32(0.0))
        continue
    for k, min_k, threshold in ((2, 2, -np.inf), (3, 3, -np.inf), (4, 1, 2.0)):  # _route: fastmath, calls them
        sel = np.empty((T, k), np.int32)
        numba_kernels._route(np.zeros((T, 1), np.float32), np.zeros((0, 0), np.float32), np.zeros(0, np.float32),
                             k, min_k, np.float32(threshold), scores.copy(), False, sel, 0, T)
        got = np.zeros((T, E), bool)
        for t in range(T):
            got[t, sel[t][sel[t] >= 0]] = True
        bad = np.nonzero((got != reference.selected_mask(scores, k, min_k, threshold)).any(axis=1))[0]
        assert not bad.size, f"top_k={{k}}, min_k={{min_k}}: rows {{bad.tolist()}} select other experts"
print("ok")
"""


@pytest.mark.parametrize("order", [["route", "helpers"], ["helpers", "route"]], ids="-".join)
def test_nan_selection_does_not_depend_on_compile_order(order, tmp_path):
    """Which variant of the Numba selection helpers is compiled (and cached on disk) used to depend on who called
    them first: compiled first for the fastmath _route, isnan folded to False and NaN ranked first. Each order runs
    in a fresh process with an empty Numba cache, then again on the cache it wrote."""
    import os
    import subprocess
    import sys
    code = NAN_PROBE.format(scores=NAN_SCORES)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    for run in ("empty cache", "warm cache"):
        r = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0 and r.stdout.strip().endswith("ok"), f"{run}: {r.stdout[-2000:]}{r.stderr[-3000:]}"


@pytest.mark.parametrize("backend", list(BACKENDS.values()), ids=list(BACKENDS))
def test_no_biases(backend, rng):
    a = make_inputs(rng, biases=False)
    assert_matches_reference(backend(a, top_k=2, activation="gelu_tanh"), a, top_k=2, activation="gelu_tanh")


def test_reference_equals_dense_ffn_when_k_is_e(rng):
    """With every expert selected the operator is the dense FFN it was cut from."""
    a = make_inputs(rng, lead=(9,), d=16, E=4, m=6)
    x = a["X"].astype(np.float64)
    w1, w2 = a["W1"].reshape(-1, 16), a["W2"].reshape(-1, 16)
    dense = reference.ACTIVATION_FUNCTIONS["gelu"](x @ w1.T + a["B1"].reshape(-1)) @ w2 + a["B2"]
    np.testing.assert_allclose(reference.sparse_expert_ffn(a, top_k=4), dense, rtol=1e-5, atol=1e-5)


@requires_cpp
@pytest.mark.parametrize("backend", ["cpp", "numba"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_weights_fed_at_run_time(gated, backend, rng):
    """Weights that are graph inputs (not initializers) are packed per call, and a router_w input is not
    packed at all: both paths must give the reference's answer."""
    a = make_inputs(rng, lead=(37,), d=40, E=8, m=20, gated=gated, unselected=True)
    got = run_in_ort(a, feeds=[p.name for p in spec.INPUTS], backend=backend, top_k=3, activation="silu")
    assert_matches_reference(got, a, top_k=3, activation="silu")


@requires_cpp
@pytest.mark.parametrize("backend", ["cpp", "numba", "numba-split"])
def test_zero_tokens(backend, rng):
    a = make_inputs(rng, lead=(1, 0), d=16, E=4, m=3)
    assert run_in_ort(a, backend=backend, top_k=2).shape == (1, 0, 16)


@requires_cpp
def test_numba_host_op_needs_the_python_runtime(rng, tmp_path):
    """A model naming the ai.moefy.numba op, loaded by plain ONNX Runtime (no Numba kernels installed in that
    process), fails at session creation with a message that says what to do."""
    import subprocess
    import sys

    from runtime import numba_host
    model = single_op_model(make_inputs(rng), top_k=2)
    numba_host.retarget(model)
    path = tmp_path / "host.onnx"
    path.write_bytes(model.SerializeToString())
    code = (f"import onnxruntime as ort; so = ort.SessionOptions(); so.register_custom_ops_library({runtime.library_path()!r});"
            f"ort.InferenceSession({str(path)!r}, so, providers=['CPUExecutionProvider'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    assert "runs Numba kernels that Python's moefy runtime installs" in r.stderr
    assert "backend='numba'" in r.stderr


@requires_cpp
def test_numba_kernel_table_from_another_version_is_refused():
    import ctypes

    from runtime import numba_host
    lib = ctypes.CDLL(runtime.library_path())
    lib.moefy_set_numba_kernels.restype = ctypes.c_char_p
    table = numba_host._Kernels(spec.NUMBA_HOST_ABI_VERSION + 1, 0, 1, 1, 1, 1, 1)
    assert b"another moefy version" in lib.moefy_set_numba_kernels(ctypes.byref(table))
    table = numba_host._Kernels(spec.NUMBA_HOST_ABI_VERSION, 0, None, 1, 1, 1, 1)
    assert lib.moefy_set_numba_kernels(ctypes.byref(table)) == b"incomplete kernel table"


@pytest.mark.parametrize("backend", list(BACKENDS.values()), ids=list(BACKENDS))
@pytest.mark.parametrize("min_k,threshold", [(1, 0.0), (2, 0.8), (6, 5.0), (3, float("-inf"))])
def test_dynamic_k(backend, min_k, threshold, rng):
    """Of each token's top-6, those after the first min_k scoring below the threshold are dropped."""
    a = make_inputs(rng, lead=(150,), d=48, E=16, m=8, unselected=True)
    attrs = dict(top_k=6, min_k=min_k, score_threshold=threshold, activation="gelu")
    counts = reference.selected_mask(reference.router_scores(a, 48), 6, min_k, threshold).sum(1)
    assert counts.min() >= min_k and counts.max() <= 6
    if 0 < threshold < 5:
        assert counts.min() < counts.max()  # the case really is dynamic
    assert_matches_reference(backend(a, **attrs), a, **attrs)
