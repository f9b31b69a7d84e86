"""--target ort-moe (exporter/ort_moe.py): SparseExpertFFN rewritten onto ONNX Runtime's com.microsoft::MoE / QMoE,
run in a stock onnxruntime session (no custom-op library), against the NumPy reference. Tolerance as for the
kernels (max |diff| <= 2e-5 * max |ref| + 1e-6) wherever the stock op computes the same function."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_inputs, near_tie_tokens

from exporter.ort_moe import GELU_TANH_MAX_DIFF, TARGET_KEY, ConversionError, convert, convert_model, main
from exporter.quantize import quantize_experts
from runtime import reference, spec
from runtime.single_op import single_op_model

RTOL = 2e-5


def run_converted(a, feeds=("X",), exact=False, dequantize=False, **attrs):
    """The op as a one-node model, converted, in a plain ONNX Runtime session; returns (Y, ops used)."""
    feeds = [f for f in feeds if a.get(f) is not None]
    model, ops, _ = convert_model(single_op_model(a, feeds=feeds, **attrs), exact=exact, dequantize=dequantize)
    assert not any(n.domain == spec.DOMAIN for n in model.graph.node)
    assert spec.DOMAIN not in {o.domain for o in model.opset_import}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {f: a[f] for f in feeds})[0], ops


def assert_matches(got, a, ties_excluded=True, **attrs):
    ref = reference.sparse_expert_ffn(a, **attrs)
    assert got.shape == ref.shape and got.dtype == np.float32
    keep = ~near_tie_tokens(a, attrs["top_k"]).reshape(ref.shape[:-1]) if ties_excluded else \
        np.ones(ref.shape[:-1], bool)
    err = np.abs(got - ref)[keep].max(initial=0.0)
    assert err <= RTOL * np.abs(ref).max() + 1e-6, f"max abs error {err:.3e}"


CASES = [  # activation, gated, int8: every form the stock ops express exactly
    ("relu", False, False), ("gelu_tanh", False, False), ("silu", False, False), ("silu", True, False),
    ("relu", False, True), ("silu", True, True),
]


@pytest.mark.parametrize("activation,gated,int8", CASES, ids=[f"{a}-{'gated' if g else 'plain'}-{'int8' if i else 'fp32'}"
                                                              for a, g, i in CASES])
@pytest.mark.parametrize("router", ["weights", "scores"])
@pytest.mark.parametrize("biases,unselected", [(True, True), (False, False)], ids=["biases+U", "no-biases"])
def test_forms_match_reference(activation, gated, int8, router, biases, unselected, rng):
    a = make_inputs(rng, lead=(2, 9), d=40, E=8, m=7, gated=gated, router=router, biases=biases, unselected=unselected)
    if int8:
        a = quantize_experts(a)
    got, ops = run_converted(a, feeds=("X", "router_scores"), top_k=3, activation=activation)
    assert ops == {"QMoE" if int8 else "MoE": 1}
    assert_matches(got, a, top_k=3, activation=activation)


@pytest.mark.parametrize("lead,d,E,m,k", [
    ((1,), 16, 4, 3, 1),         # one token, k = 1
    ((1,), 33, 5, 17, 5),        # k = E, odd sizes
    ((3, 5, 7), 48, 16, 20, 2),  # rank-4 input (MoE itself takes 2-D or 3-D)
    ((200,), 384, 32, 48, 8),    # MiniLM's FFN shape
])
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_shapes_and_k(lead, d, E, m, k, int8, rng):
    a = make_inputs(rng, lead=lead, d=d, E=E, m=m, gated=int8, unselected=k < E)
    if int8:
        a = quantize_experts(a)
    assert_matches(run_converted(a, top_k=k, activation="silu")[0], a, top_k=k, activation="silu")


def test_ties_one_expert_for_all_and_an_unpicked_expert(rng):
    """Given scores with exact ties: the TopK in front makes the stock kernels pick the lower index, as the operator
    does (their own rule picks the higher); compared on every token."""
    a = make_inputs(rng, lead=(6,), E=5, router="scores", unselected=True)
    a["router_scores"][:3] = 1.0  # all tied
    a["router_scores"][3:, 2] += 100.0  # everyone else picks expert 2 first ...
    a["router_scores"][3:, 4] -= 100.0  # ... and nobody else picks expert 4
    for int8 in (False, True):
        b = quantize_experts(dict(a, Wg=a["W1"] * 0.5)) if int8 else a
        act = "silu" if int8 else "relu"
        got, _ = run_converted(b, feeds=("X", "router_scores"), top_k=2, activation=act)
        assert_matches(got, b, ties_excluded=False, top_k=2, activation=act)


def test_erf_gelu_is_approximated_within_its_bound(rng):
    a = make_inputs(rng, lead=(50,), d=64, E=8, m=16, unselected=True)
    got, _ = run_converted(a, top_k=4, activation="gelu")
    assert_matches(got, a, top_k=4, activation="gelu_tanh")  # what ONNX Runtime's MoE "gelu" computes
    # against the erf GELU: each selected neuron's activation is off by at most GELU_TANH_MAX_DIFF
    bound = GELU_TANH_MAX_DIFF * np.abs(a["W2"]).sum((0, 1)).max()
    keep = ~near_tie_tokens(a, 4)
    assert np.abs(got - reference.sparse_expert_ffn(a, top_k=4, activation="gelu"))[keep].max() <= bound
    with pytest.raises(ConversionError, match="tanh approximation"):
        run_converted(a, exact=True, top_k=4, activation="gelu")


def test_int8_plain_gelu_needs_dequantize(rng):
    a = quantize_experts(make_inputs(rng, lead=(20,), unselected=True))
    with pytest.raises(ConversionError, match="per neuron.*--dequantize"):
        run_converted(a, top_k=2, activation="silu")
    got, ops = run_converted(a, dequantize=True, top_k=2, activation="silu")
    assert ops == {"MoE": 1}
    assert_matches(got, a, top_k=2, activation="silu")


@pytest.mark.parametrize("change,message", [
    (dict(min_k=1, score_threshold=0.5), "dynamic k"),
    (dict(gated=True, activation="gelu_tanh"), "only SwiGLU"),
    (dict(feeds=("X", "W1")), "W1 .* computed in the graph"),
    (dict(top_k=9), r"top_k must be an integer in \[1, E=6\]"),
])
def test_refusals_name_the_reason(change, message, rng):
    change = dict(change)
    a = make_inputs(rng, gated=change.pop("gated", False))
    attrs = {"top_k": 2, "activation": "relu", **{k: v for k, v in change.items() if k != "feeds"}}
    model = single_op_model(a, feeds=change.get("feeds", ("X",)), **attrs)
    with pytest.raises(ConversionError, match=message):
        convert_model(model)


def test_cli_writes_a_model_for_stock_onnxruntime_or_nothing(rng, tmp_path, capsys):
    a = make_inputs(rng, lead=(5,), unselected=True)
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(single_op_model(a, top_k=2, activation="gelu"), src)
    assert main([str(src), str(dst)]) == 0
    assert "1 SparseExpertFFN nodes -> 1 MoE" in capsys.readouterr().out
    meta = json.loads({p.key: p.value for p in onnx.load(dst).metadata_props}[TARGET_KEY])
    assert meta["target"] == "ort-moe" and "tanh approximation" in meta["notes"][0]
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"X": a["X"]})[0]
    assert_matches(got, a, top_k=2, activation="gelu_tanh")

    bad = tmp_path / "bad.onnx"
    assert main([str(src), str(bad), "--exact"]) == 2
    assert "moe-convert: error:" in capsys.readouterr().err and not bad.exists()
    assert set(tmp_path.iterdir()) == {src, dst}  # no temporary file left behind
    assert main([str(tmp_path / "missing.onnx"), str(bad)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert main([str(tmp_path / "junk.onnx"), str(bad)]) == 2
    assert "not an ONNX model" in capsys.readouterr().err


def test_model_without_sparse_ffn_is_refused(tmp_path):
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(ConversionError, match="no SparseExpertFFN node"):
        convert_model(helper.make_model(g))


def _feed(minilm_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    b = tok(["Sparse experts run fast on CPUs.", "A second, longer sentence about cats, dogs and everything else."],
            padding=True, return_tensors="np")
    return {k: b[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def test_minilm_export_converted(minilm_export, minilm_dir, tmp_path):
    """The real MiniLM export: exact where the semantics allow (its nodes switched to gelu_tanh on both sides),
    and its erf GELU approximated (embedding cosine to the custom op's > 0.99999)."""
    import runtime
    feed = _feed(minilm_dir)
    mask = feed["attention_mask"].astype(bool)
    model = onnx.load(minilm_export)
    for node in model.graph.node:
        if node.op_type == spec.OP_TYPE:
            next(a for a in node.attribute if a.name == "activation").s = b"gelu_tanh"
    tanh_path = tmp_path / "tanh.onnx"
    onnx.save(model, tanh_path)
    for src, bound in ((tanh_path, 1e-4), (minilm_export, 1e-3)):
        out = tmp_path / f"ort-moe-{src.name}"
        report = convert(src, out)
        assert report.ops == {"MoE": 6}
        want = runtime.InferenceSession(str(src)).run(None, feed)[0]
        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        assert np.abs(got - want)[mask].max() <= bound * np.abs(want[mask]).max()
        pool = lambda h: (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # noqa: E731
        pw, pg = pool(want), pool(got)
        assert ((pw * pg).sum(1) / np.linalg.norm(pw, axis=1) / np.linalg.norm(pg, axis=1)).min() > 0.99999


# ---- moe-export --target ort-moe ---------------------------------------------------------------------------------

def _relu_bert(tiny_bert_dir, tmp_path):
    """The tiny BERT with ReLU: semantics both targets compute exactly (int8 experts too, as QMoE)."""
    import shutil
    d = tmp_path / "relu-bert"
    shutil.copytree(tiny_bert_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    return d


def _tiny_feed(model_dir):
    from transformers import AutoTokenizer
    b = AutoTokenizer.from_pretrained(model_dir)(["the cat is on the mat.", "a b c d e f", "it is a fox, is it?"],
                                                 padding=True, return_tensors="np")
    return {k: b[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.mark.parametrize("weights, op", [("float32", "MoE"), ("int8", "QMoE")])
def test_export_target_ort_moe_runs_stock_with_custom_op_parity(tiny_bert_dir, tmp_path, capsys, weights, op):
    import runtime
    from exporter.cli import main as export_main
    d = _relu_bert(tiny_bert_dir, tmp_path)
    custom, stock = tmp_path / "custom.onnx", tmp_path / "stock.onnx"
    common = ["--experts", "4", "--top-k", "2", "--weights", weights, "--quiet"]
    assert export_main([str(d), str(custom), *common]) == 0
    assert export_main([str(d), str(stock), *common, "--target", "ort-moe"]) == 0
    assert f"target ort-moe, {weights} experts" in capsys.readouterr().out
    model = onnx.load(stock)
    assert {o.domain for o in model.opset_import} >= {"com.microsoft"} and \
        spec.DOMAIN not in {o.domain for o in model.opset_import}
    assert sorted({n.op_type for n in model.graph.node if n.domain == "com.microsoft"}) == [op]
    feed = _tiny_feed(d)
    mask = feed["attention_mask"].astype(bool)
    got = ort.InferenceSession(str(stock), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    want = runtime.InferenceSession(str(custom)).run(None, feed)[0]
    assert np.abs(got - want)[mask].max() <= 1e-4


def test_export_target_ort_moe_refusals_before_the_work(tiny_bert_dir, tmp_path, capsys):
    from exporter.cli import main as export_main
    out = tmp_path / "out.onnx"
    for extra, message in ((["--dynamic-k", "2"], "dynamic k cannot be expressed"),
                           (["--weights", "int8"], "int8 experts with a plain gelu activation")):
        assert export_main([str(tiny_bert_dir), str(out), "--experts", "4", "--top-k", "2", "--target", "ort-moe",
                            "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("moe-export: error: --target ort-moe: ") and message in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_minilm_export_target_ort_moe(minilm_dir, minilm_export, tmp_path):
    """MiniLM through moe-export --target ort-moe on a stock session: the custom-op model's numbers within 1e-4 where
    the semantics allow (both with the tanh GELU that ONNX Runtime's MoE computes), its erf GELU approximated."""
    import runtime
    from exporter import export
    out = tmp_path / "minilm-ort-moe.onnx"
    report = export(minilm_dir, out, experts=32, top_k=8, target="ort-moe", progress=False, log=lambda *a: None)
    assert any("validated against the MoEfied model with ONNX Runtime's tanh GELU" in line for line in report.lines)
    feed = _feed(minilm_dir)
    mask = feed["attention_mask"].astype(bool)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    model = onnx.load(minilm_export)
    for node in model.graph.node:
        if node.op_type == spec.OP_TYPE:
            next(a for a in node.attribute if a.name == "activation").s = b"gelu_tanh"
    tanh = runtime.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    assert np.abs(got - tanh)[mask].max() <= 1e-4
    erf = runtime.InferenceSession(str(minilm_export)).run(None, feed)[0]
    pool = lambda h: (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # noqa: E731
    pe, pg = pool(erf), pool(got)
    assert ((pe * pg).sum(1) / np.linalg.norm(pe, axis=1) / np.linalg.norm(pg, axis=1)).min() > 0.9999
