"""Export round trips: a tiny seeded BERT (fast, every backend and target) and the real MiniLM."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import SESSION_BACKENDS, available_backends

import runtime
from exporter import export
from runtime.session import METADATA_KEY
from runtime import spec



def feed_for(model_dir, texts=("the cat is on a mat", "it is for you")):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    b = tok(list(texts), padding=True, return_tensors="np")
    return {k: b[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.fixture(scope="module")
def tiny_custom(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny.onnx"
    saved = out.parent / "tiny.moefied"
    report = export(tiny_bert_dir, out, experts=8, top_k=2, save_moefied_dir=saved, backend="numba-split", progress=False,
                    log=lambda *a: None)
    return out, saved, report


def test_custom_export_graph(tiny_custom):
    out, _, report = tiny_custom
    m = onnx.load(out)
    onnx.checker.check_model(m)
    nodes = [n for n in m.graph.node if n.domain == spec.DOMAIN]
    assert [n.op_type for n in nodes] == [spec.OP_TYPE] * 2  # one per FFN
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in m.graph.output] == ["last_hidden_state"]
    dims = [d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch_size", "sequence_length"]
    cfg = json.loads({p.key: p.value for p in m.metadata_props}[METADATA_KEY])
    assert (cfg["experts"], cfg["top_k"], cfg["op_version"]) == (8, 2, spec.VERSION)
    assert report.max_rel_diff <= 1e-4


@pytest.mark.parametrize("backend", SESSION_BACKENDS)
def test_backends_agree_with_pytorch_on_new_shapes(tiny_custom, tiny_bert_dir, backend):
    """Batch and sequence sizes other than the traced ones, against the PyTorch MoEfied model."""
    from exporter.moefy import install_moe, last_hidden_state
    from exporter.source import load_model
    out, saved, _ = tiny_custom
    model, _, adapter, cfg, routers = load_model(saved)
    install_moe(model, adapter, cfg, routers)
    feed = feed_for(tiny_bert_dir, ["a", "the dog is in the house of a friend", "on it"])
    import torch
    want = last_hidden_state(model, {k: torch.as_tensor(v) for k, v in feed.items()})
    got = runtime.InferenceSession(out, backend=backend).run(None, feed)[0]
    mask = feed["attention_mask"].astype(bool)
    assert np.abs(got - want)[mask].max() <= 1e-4 * np.abs(want[mask]).max()


def test_reexport_from_saved_moefied_dir_is_identical(tiny_custom, tmp_path):
    out, saved, _ = tiny_custom
    again = tmp_path / "again.onnx"
    export(saved, again, experts=8, top_k=2, backend="numba-split", progress=False, log=lambda *a: None)
    a, b = onnx.load(out), onnx.load(again)
    wa = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_standard_target_runs_on_stock_onnxruntime(tiny_bert_dir, tiny_custom, tmp_path):
    out_std = tmp_path / "std.onnx"
    export(tiny_custom[1], out_std, experts=8, top_k=2, target="standard", progress=False, log=lambda *a: None)
    m = onnx.load(out_std)
    assert {n.domain for n in m.graph.node} <= {"", "ai.onnx"}
    assert "TopK" in {n.op_type for n in m.graph.node}
    feed = feed_for(tiny_bert_dir)
    std = ort.InferenceSession(str(out_std), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    custom = runtime.InferenceSession(tiny_custom[0], backend="numba-split").run(None, feed)[0]
    np.testing.assert_allclose(std, custom, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", ["custom", "standard"])
def test_minilm_round_trip(minilm_dir, tmp_path, target):
    out = tmp_path / f"minilm-{target}.onnx"
    # the plumbing on the real model: the weight-only recipe (quick); the default recipe is tested on the tiny BERT
    report = export(minilm_dir, out, experts=32, top_k=8, split="param", router="centroid", correction="none",
                    target=target, progress=False, log=lambda *a: None)
    assert out.is_file() and report.max_rel_diff <= 1e-4
    assert report.config.active_share == 0.25
    if target == "custom":
        feed = feed_for(minilm_dir, ["Sparse experts run fast on CPUs.", "A second, longer sentence about cats."])
        outs = [runtime.InferenceSession(out, backend=b).run(None, feed)[0]
                for b in available_backends()]
        for o in outs[1:]:
            np.testing.assert_allclose(o, outs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("split,router", [("param", "centroid"), ("coact", "ls")])
def test_calibrated_recipes_export_and_match(tiny_bert_dir, tmp_path, split, router):
    """--correction mean (with either split and router): the op gets an unselected_bias input (empty
    names fill the gap before it), and ONNX still matches PyTorch on every backend."""
    calib = tmp_path / "calib.txt"
    calib.write_text("the cat is on a mat\nit is for you\na dog and a cat\n")
    out = tmp_path / "corr.onnx"
    report = export(tiny_bert_dir, out, experts=8, top_k=2, split=split, router=router, correction="mean",
                    calib=calib, backend="numba-split", progress=False, log=lambda *a: None)
    assert (report.config.split, report.config.router, report.config.correction) == (split, router, "mean")
    assert report.max_rel_diff <= 1e-4 and report.validated_on >= 1
    node = next(n for n in onnx.load(out).graph.node if n.domain == spec.DOMAIN)
    names = [p.name for p in spec.INPUTS]
    assert len(node.input) == names.index("unselected_bias") + 1 and node.input[-1]  # trailing absent inputs left off
    assert all(node.input[names.index(n)] == "" for n in ("router_scores", "Wg", "Bg"))
    feed = feed_for(tiny_bert_dir)
    outs = [runtime.InferenceSession(out, backend=b).run(None, feed)[0]
            for b in available_backends()]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=1e-4, atol=1e-5)


def test_least_squares_router_scores_stay_on_the_targets_scale(rng):
    """A near-constant input dimension (as in real hidden states) must not blow the router up: plain
    least squares gave biases of ~3e4 whose float32 scores cancelled to noise."""
    from exporter.routers import expert_deviation, least_squares_router
    x = rng.standard_normal((500, 16))
    x[:, 3] = 7.0 + 1e-6 * rng.standard_normal(500)  # outlier-like, nearly constant
    w1, w2 = rng.standard_normal((32, 16)), rng.standard_normal((32, 16))
    h = np.maximum(x @ w1.T, 0)
    rw, rb = least_squares_router(x, h, w2, n_experts=4)
    target = expert_deviation(h, w2, 4)
    assert np.abs(rb).max() < 10 * np.abs(target).max()
    assert np.abs(x @ rw.T + rb - target).mean() < np.abs(target - target.mean(0)).mean()


# ----------------------------------------------------------------------------- recipes by default
def test_recipe_presets_map_to_the_measured_flags():
    from exporter.cli import build_parser
    from exporter.recipe import PRESETS, Recipe
    # no flags: the best training-free recipe measured; for plain FFNs 128 experts (where each keeps 8 neurons or
    # more) and sequential calibration; an eighth of the default top-k goes to the low-rank stand-in (MiniLM: 1536
    # neurons, 128 experts of 12 -> top-k 28 + rank 48, 25% in all)
    balanced = Recipe().resolved(gated=False, width=1536)
    assert (balanced.preset, balanced.split, balanced.router, balanced.correction, balanced.distill) == \
        ("balanced", "coact", "bce", "mean", None)
    assert (balanced.experts, balanced.top_k, balanced.lowrank, balanced.sequential) == (128, 28, 48, True)
    assert balanced.describe() == ("--recipe balanced (plain FFN): --experts 128 --top-k 28 --split coact --router bce "
                                   "--correction mean --weights float16 --lowrank 48 --sequential")
    # narrower FFNs (or widths 128 does not divide) keep 32 experts; gated FFNs (decoders) too, without --sequential
    for width in (768, 1000):  # 6 neurons each, or not divisible
        assert Recipe().resolved(gated=False, width=width).experts == 32
    # 32 experts of 48 -> top-k 7 + rank 48
    assert (lambda r: (r.experts, r.top_k, r.lowrank))(Recipe(experts=32).resolved(False, 1536)) == (32, 7, 48)
    # a weight-only recipe stays weight-only: the preset's --sequential only refines calibrated fits
    weight_only = Recipe(split="param", router="centroid", correction="none", lowrank=0).resolved(False, 1536)
    assert (weight_only.experts, weight_only.sequential) == (128, False)
    assert Recipe(sequential=False).resolved(False, 1536).sequential is False
    # --experts alone keeps the share: a quarter of the experts, an eighth of them spent on the stand-in
    # (128 experts of 12 -> top-k 28 + rank 48; 64 gated experts of 24 -> top-k 14 + rank 72)
    fine, fine_gated = Recipe(experts=128).resolved(False, 1536), Recipe(experts=64).resolved(True, 1536)
    assert (fine.top_k, fine.lowrank, fine_gated.top_k, fine_gated.lowrank) == (28, 48, 14, 72)
    gated = Recipe().resolved(gated=True, width=1536)
    assert (gated.split, gated.router, gated.correction, gated.top_k, gated.lowrank) == ("coact", "bce", "mean", 7, 72)
    assert (gated.experts, gated.sequential) == (32, False)
    fast = Recipe(preset="fast").resolved(gated=True, width=1536)
    assert (fast.split, fast.router, fast.correction, fast.distill) == ("coact", "ls", "mean", None)
    fast_plain = Recipe(preset="fast").resolved(gated=False, width=1536)
    assert (fast_plain.experts, fast_plain.sequential) == (32, False)
    best_plain = Recipe(preset="best").resolved(gated=False, width=1536)
    best_gated = Recipe(preset="best").resolved(gated=True, width=1536)
    assert (best_plain.distill, best_gated.distill) == (30.0, 60.0) and best_plain.distill_steps == 100000
    # best: plain FFNs 192 experts of 8 neurons, top-k 48 and no stand-in
    assert (best_plain.experts, best_plain.top_k_or_default, best_plain.lowrank, best_gated.experts) == (192, 48, 0, 32)
    # float16 experts where the target computes with them (custom), float32 for standard ONNX ops and ONNX Runtime's
    # MoE; --weights wins
    assert (best_plain.weights, best_gated.weights, balanced.weights, fast.weights) == ("float16",) * 4
    assert best_plain.describe() == ("--recipe best (plain FFN): --experts 192 --top-k 48 --split coact --router bce "
                                     "--correction mean --weights float16 --distill 30 --sequential")
    assert [Recipe(preset="best").resolved(False, 1536, target).weights for target in ("standard", "ort-moe")] == \
        ["float32", "float32"]
    assert Recipe(preset="best", weights="int8").resolved(False, 1536).weights == "int8"
    assert Recipe(weights="float32").resolved(False, 1536).describe().count("--weights") == 0
    assert Recipe(preset="best").resolved(False, 1000).experts == 32  # 192 does not divide it
    assert Recipe(preset="best").trains and not Recipe().trains
    # an explicit --top-k means that many experts and no stand-in; other explicit flags win over the preset's values
    mixed = Recipe.from_namespace(build_parser().parse_args(["m", "o.onnx", "--recipe", "fast", "--router", "bce",
                                                             "--distill-steps", "7", "--top-k", "8"]))
    mixed = mixed.resolved(gated=False, width=1536)
    assert (mixed.preset, mixed.split, mixed.router, mixed.distill_steps, mixed.top_k, mixed.lowrank) == \
        ("fast", "coact", "bce", 7, 8, 0)
    assert mixed.describe() == ("--recipe fast (plain FFN): --experts 32 --top-k 8 --split coact --router bce "
                                "--correction mean --weights float16")
    assert Recipe(lowrank=16).resolved(gated=False, width=1536).lowrank == 16
    assert set(PRESETS) == {"fast", "balanced", "best"} and all(set(p) == {"plain", "gated"} for p in PRESETS.values())
    with pytest.raises(ValueError, match="--recipe must be one of fast, balanced, best, got 'quick'"):
        Recipe(preset="quick").check()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["m", "o.onnx", "--recipe", "quick"])


def test_default_export_is_the_balanced_recipe(tiny_bert_dir, tmp_path):
    """No recipe flags: the balanced preset, its low-rank stand-in in place of one default expert (25% in all), and
    for a plain FFN sequential calibration."""
    report = export(tiny_bert_dir, tmp_path / "d.onnx", experts=32, backend="numba-split", progress=False,
                    log=lambda *a: None)
    c = report.config
    assert (c.split, c.router, c.correction, c.top_k, c.lowrank) == ("coact", "bce", "mean", 7, 2)
    assert c.active_share == pytest.approx(0.25)
    assert c.sequential
    assert ("recipe --recipe balanced (plain FFN): --experts 32 --top-k 7 --split coact --router bce --correction mean "
            "--weights float16 --lowrank 2 --sequential") in report.summary()


def test_summary_names_the_recipe_and_matches_moe_eval(tiny_custom, tiny_bert_dir):
    """The export's held-out cosine is moe-eval's: same texts, batching and pooling."""
    from exporter import datasets
    from exporter.evaluate import Evaluator
    out, _, report = tiny_custom
    summary = report.summary()
    assert ("recipe --recipe balanced (plain FFN): --experts 8 --top-k 2 --split coact --router bce --correction mean "
            "--weights float16 --sequential") in summary
    assert f"held-out texts ({len(datasets.heldout_texts())}, as moe-eval)" in summary
    assert report.metrics["heldout_texts"] == len(datasets.heldout_texts())
    r = Evaluator(tiny_bert_dir, tasks=(), progress=False, log=lambda *a: None)(out, backend="numba-split")
    assert report.cosine_moe_vs_dense == pytest.approx(r.cosine_mean, abs=1e-6)
    assert report.metrics["heldout_nn_agreement"] == r.nn_agreement
    assert json.loads((out.parent / "tiny.moefied" / "moefy_config.json").read_text())["router"] == "bce"
