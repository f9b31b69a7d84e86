"""Export methods (issue 3): every --split, --router, --shared-experts and --budget exports on the tiny
seeded BERT, matches PyTorch in ONNX, and bad values fail with a clear message (exit code 2)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import available_backends
from test_cli_errors import assert_fails_cleanly

import runtime
from exporter import export
from exporter.moe_ffn import MoEFFN, selection_mask
from exporter.tasks import task_for
from exporter.moefy import FORCED_SCORE, ROUTERS, SPLITS, install_moe, last_hidden_state
from exporter.source import load_model
from runtime import spec

CALIB = ("the cat is on a mat\nit is for you\na dog and a cat\nthe house of a friend is on the hill\n"
         "to be or not to be\nwith a bag of flour and salt\nas it is in the book\nby the sea at dawn\n"
         "from a to z and back\nit is a dog\n")


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(CALIB)
    return p


def quiet_export(model_dir, out, **kw):
    return export(model_dir, out, backend="numba-split", progress=False, log=lambda *a: None, **kw)


def onnx_matches_torch(out, saved, texts=("the cat is on a mat", "a dog and a cat", "it is for you and me")):
    """The exported file against the saved PyTorch MoEfied model, on every backend."""
    from transformers import AutoTokenizer
    model, tok, adapter, cfg, routers = load_model(saved)
    install_moe(model, adapter, cfg, routers)
    b = AutoTokenizer.from_pretrained(saved)(list(texts), padding=True, return_tensors="np")
    feed = {k: b[k].astype(np.int64) for k in task_for(adapter).model_inputs(model)}
    want = last_hidden_state(model, {k: torch.as_tensor(v) for k, v in feed.items()})
    mask = feed["attention_mask"].astype(bool)
    for backend in available_backends():
        got = runtime.InferenceSession(out, backend=backend).run(None, feed)[0]
        assert np.abs(got - want)[mask].max() <= 1e-4 * np.abs(want[mask]).max(), backend
    return model, cfg, routers


@pytest.mark.parametrize("split", SPLITS)
def test_every_split_exports_and_matches(tiny_bert_dir, tmp_path, calib, split):
    out, saved = tmp_path / "m.onnx", tmp_path / "saved"
    report = quiet_export(tiny_bert_dir, out, experts=8, top_k=2, split=split, calib=calib, save_moefied_dir=saved)
    assert report.config.split == split and report.max_rel_diff <= 1e-4
    onnx_matches_torch(out, saved)


@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_exports_and_matches(tiny_bert_dir, tmp_path, calib, router):
    out, saved = tmp_path / "m.onnx", tmp_path / "saved"
    report = quiet_export(tiny_bert_dir, out, experts=8, top_k=3, router=router, correction="mean", calib=calib,
                          save_moefied_dir=saved)
    assert report.config.router == router and report.max_rel_diff <= 1e-4
    onnx_matches_torch(out, saved)


def test_mlp_router_feeds_router_scores(tiny_bert_dir, tmp_path, calib):
    """The MLP router is standard ONNX ops whose output is the operator's router_scores input; no
    router_w / router_b; shared experts stay forced through it."""
    out, saved = tmp_path / "m.onnx", tmp_path / "saved"
    report = quiet_export(tiny_bert_dir, out, experts=8, top_k=3, router="mlp", shared_experts=1, correction="mean",
                          calib=calib, save_moefied_dir=saved)
    assert report.max_rel_diff <= 1e-4
    names = [p.name for p in spec.INPUTS]
    for node in (n for n in onnx.load(out).graph.node if n.domain == spec.DOMAIN):
        assert node.input[names.index("router_scores")] and not node.input[names.index("router_w")]
    _, cfg, routers = onnx_matches_torch(out, saved)
    assert routers["layer.0.router_mlp_b"].shape == (8, 64) and not routers["layer.0.router_mlp_b"][0].any()


def test_bce_router_is_deterministic_and_beats_its_start():
    """Same seed, same weights; the held-out recall it reports never falls below the least-squares start."""
    from exporter.routers import bce_router
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 12)).astype(np.float32)
    w1, w2 = rng.standard_normal((32, 12)), rng.standard_normal((32, 12))
    h = np.maximum(x @ w1.T, 0).astype(np.float32)
    groups = np.repeat(np.arange(40), 10)
    for batch in (4096, 64):  # all 360 training tokens per step; 64 drawn per step (the seeded minibatch path)
        a = bce_router(x, h, w2, 8, 2, groups=groups, steps=60, batch=batch)
        b = bce_router(x, h, w2, 8, 2, groups=groups, steps=60, batch=batch)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert a[2]["recall"] >= a[2]["recall_start"] and a[2]["recall"] > 2 / 8  # better than chance


@pytest.mark.parametrize("centred", [True, False])
def test_expert_deviation_is_each_experts_output_norm(centred):
    """The Gram-matrix form equals ||(h_e - mean h_e) W2_e|| (or ||h_e W2_e||) computed from the outputs, in chunks."""
    from exporter.routers import expert_deviation
    rng = np.random.default_rng(1)
    h, w2 = rng.standard_normal((300, 24)), rng.standard_normal((24, 10))
    hc = h - h.mean(0) if centred else h
    direct = np.stack([np.linalg.norm(hc[:, e * 6:(e + 1) * 6] @ w2[e * 6:(e + 1) * 6], axis=1) for e in range(4)], 1)
    got = expert_deviation(h, w2, 4, chunk=128, centred=centred)
    assert got.dtype == np.float64 and got.shape == (300, 4)
    np.testing.assert_allclose(got, direct, rtol=1e-10)
    np.testing.assert_allclose(expert_deviation(h.astype(np.float32), w2.astype(np.float32), 4, centred=centred),
                               direct, rtol=1e-4)


def test_metis_split_is_an_equal_partition():
    from exporter.split import metis_split
    rng = np.random.default_rng(0)
    h = rng.standard_normal((300, 64)).astype(np.float32)
    perm = metis_split(h, np.ones(64), 8)
    assert sorted(perm) == list(range(64))
    assert np.array_equal(metis_split(h, np.ones(64), 8), perm)  # seeded


def test_rebalance_moves_the_least_tied_surplus():
    from exporter.split import rebalance
    aff = np.zeros((6, 6))
    aff[0, 1] = aff[1, 0] = aff[2, 3] = aff[3, 2] = aff[4, 5] = aff[5, 4] = 1.0
    aff[2, 4] = aff[4, 2] = 0.5  # neuron 2 would rather go with 4 than with 0/1
    labels = rebalance(np.array([0, 0, 0, 1, 2, 2]), aff, 3)  # part 0 has 3, part 1 has 1
    assert np.bincount(labels).tolist() == [2, 2, 2]
    assert labels[0] == labels[1] == 0 and labels[2] == 1


def test_shared_experts_always_selected_in_float32(tiny_bert_dir, tmp_path, calib):
    """A shared expert is the first one, with a zero router row and router_b = 1e6; routed scores stay
    far below, so it is selected for every token in float32; near-ties are judged on routed experts only."""
    out, saved = tmp_path / "m.onnx", tmp_path / "saved"
    report = quiet_export(tiny_bert_dir, out, experts=8, top_k=3, shared_experts=2, split="coact", router="bce",
                          correction="mean", calib=calib, save_moefied_dir=saved)
    assert report.config.shared_experts == 2 and report.validated_on >= 1
    model, cfg, routers = onnx_matches_torch(out, saved)
    for i in range(cfg.num_layers):
        rw, rb = routers[f"layer.{i}.router_w"], routers[f"layer.{i}.router_b"]
        assert not rw[:2].any() and (rb[:2] == np.float32(FORCED_SCORE)).all()
        assert not routers[f"layer.{i}.unselected_bias"][:2].any()
        x = np.random.default_rng(i).standard_normal((1000, rw.shape[1])).astype(np.float32) * 10
        s = x @ rw.T + rb  # float32
        assert (np.sort(np.argsort(-s, axis=1, kind="stable")[:, :2], axis=1) == [0, 1]).all()
        assert np.abs(s[:, 2:]).max() < FORCED_SCORE / 1e3
    assert "(2 shared)" in report.summary()


def test_shared_experts_hold_the_largest_contributions():
    from exporter.split import shared_neurons
    h = np.tile([[1.0], [-1.0]], (25, 1)) * np.arange(1, 17)  # |h - mean| = 1, 2, ..., 16
    assert list(shared_neurons(h, np.ones(16), 4)) == [15, 14, 13, 12]
    assert list(shared_neurons(h, np.r_[np.ones(15), 0.0], 1)) == [14]


def test_budget_chooses_per_layer_top_k(tiny_bert_dir, tmp_path, calib):
    out, saved = tmp_path / "m.onnx", tmp_path / "saved"
    report = quiet_export(tiny_bert_dir, out, experts=8, budget=0.3125, router="ls", correction="mean", calib=calib,
                          save_moefied_dir=saved)
    cfg = report.config
    assert len(cfg.layer_top_k) == 2 and sum(cfg.layer_top_k) == 5 and cfg.active_share == 0.3125
    nodes = [n for n in onnx.load(out).graph.node if n.domain == spec.DOMAIN]
    ks = [next(a.i for a in n.attribute if a.name == "top_k") for n in nodes]
    assert ks == cfg.layer_top_k
    onnx_matches_torch(out, saved)
    # re-exporting the saved directory keeps its per-layer top-k
    again = quiet_export(saved, tmp_path / "again.onnx")
    assert again.config.layer_top_k == cfg.layer_top_k


def test_greedy_budget_favours_the_layer_that_needs_more():
    from exporter.moefy import choose_layer_top_k
    flat = np.ones((10, 8))  # every expert matters equally
    peaked = np.tile([10.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], (10, 1))  # one expert carries the layer
    assert choose_layer_top_k([flat, peaked], 0.5) == [7, 1]
    assert choose_layer_top_k([flat, peaked], 0.5, shared=1) == [6, 2]  # shared expert 0 holds peaked's mass
    assert sum(choose_layer_top_k([flat, peaked, flat], 0.25, shared=1)) == 6


@pytest.mark.parametrize("argv,message", [
    (["--split", "kmeans"], "invalid choice: 'kmeans'"),
    (["--router", "mlp2"], "invalid choice: 'mlp2'"),
    (["--experts", 4, "--top-k", 2, "--shared-experts", 2], "--shared-experts must be between 0 and top-k - 1 (1)"),
    (["--experts", 4, "--top-k", 2, "--shared-experts", -1], "--shared-experts must be between 0 and top-k - 1"),
    (["--experts", 4, "--budget", 0.1], "--budget must be between 0.25 ((shared experts + 1) / experts) and 1"),
    (["--experts", 4, "--budget", 1.5], "--budget must be between"),
    (["--experts", 4, "--budget", 0.5, "--shared-experts", 2], "--budget must be between 0.75"),
    (["--experts", 4, "--top-k", 2, "--budget", 0.5], "give --top-k or --budget, not both"),
])
def test_bad_method_values_fail_cleanly(capsys, tmp_path, tiny_bert_dir, argv, message):
    if "invalid choice" in message:  # argparse's own error: exit code 2 and the allowed values
        with pytest.raises(SystemExit) as e:
            from exporter.cli import main
            main([str(tiny_bert_dir), str(tmp_path / "out.onnx"), *map(str, argv)])
        assert e.value.code == 2 and message in capsys.readouterr().err
        return
    assert_fails_cleanly(capsys, tmp_path, [tiny_bert_dir, *argv], message)


def test_budget_on_a_moefied_dir_is_refused(capsys, tmp_path, tiny_bert_dir, calib):
    saved = tmp_path / "saved"
    quiet_export(tiny_bert_dir, tmp_path / "first.onnx", experts=4, top_k=2, save_moefied_dir=saved)
    (tmp_path / "first.onnx").unlink()
    assert_fails_cleanly(capsys, tmp_path, [saved, "--experts", 4, "--budget", 0.5], "--budget needs the original")


def test_dynamic_threshold_keeps_k_on_average():
    from exporter.moefy import dynamic_threshold
    from runtime.reference import selected_mask
    scores = np.random.default_rng(0).standard_normal((500, 16))
    t = dynamic_threshold(scores, 4, 2, 8)
    counts = selected_mask(scores, 8, 2, t).sum(1)
    assert counts.mean() == pytest.approx(4, abs=0.01) and counts.min() >= 2 and counts.max() <= 8
    assert dynamic_threshold(scores, 2, 2, 8) == np.inf and dynamic_threshold(scores, 8, 2, 8) == -np.inf


def test_dynamic_k_exports_and_matches(tiny_bert_dir, tmp_path, calib):
    """--dynamic-k: each layer's node carries min_k and a calibrated score_threshold, every backend computes what
    PyTorch does, and the experts per token vary."""
    out, saved = tmp_path / "dyn.onnx", tmp_path / "saved"
    report = quiet_export(tiny_bert_dir, out, calib=calib, experts=8, top_k=2, dynamic_k=2, router="ls",
                          correction="mean", save_moefied_dir=saved)
    cfg = report.config
    assert cfg.dynamic_k == 2 and len(cfg.layer_threshold) == 2 and report.max_rel_diff <= 1e-4
    nodes = [n for n in onnx.load(out).graph.node if n.domain == spec.DOMAIN]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert [(a["top_k"], a["min_k"]) for a in attrs] == [(4, 1), (4, 1)]
    assert [a["score_threshold"] for a in attrs] == pytest.approx(cfg.layer_threshold)
    model, _, _ = onnx_matches_torch(out, saved)
    ffns = [m for m in model.modules() if isinstance(m, MoEFFN)]
    x = torch.randn(200, ffns[0].w1.shape[2])
    counts = selection_mask(ffns[0].scores(x), 4, 1, cfg.layer_threshold[0]).sum(-1)
    assert counts.min() < counts.max()


@pytest.mark.parametrize("factor", [1.0, 0.5, 100.0])
def test_bad_dynamic_k(tiny_bert_dir, tmp_path, capsys, factor):
    assert_fails_cleanly(capsys, tmp_path, [tiny_bert_dir, "--dynamic-k", factor], "--dynamic-k must be a factor in (1, 64]")


def test_lowrank_fit_is_the_reduced_rank_least_squares_solution(rng):
    from exporter.moefy import lowrank_fit
    x = rng.standard_normal((400, 12))
    w = rng.standard_normal((12, 3)) @ rng.standard_normal((3, 10))  # a rank-3 map
    target = x @ w + 0.5
    a, b, c = lowrank_fit(x, target, 3, ridge=0)
    assert (a.shape, b.shape, c.shape) == ((3, 12), (3, 10), (10,))
    np.testing.assert_allclose((x @ a.T) @ b + c, target, atol=1e-4)  # recovered exactly at its rank
    noisy = target + rng.standard_normal(target.shape)
    errors = [np.linalg.norm((x @ a.T) @ b + c - noisy) for a, b, c in (lowrank_fit(x, noisy, r) for r in (1, 2, 3))]
    assert errors[0] > errors[1] > errors[2]  # each rank captures more


def test_lowrank_stand_in_exports_beside_the_operator(tiny_bert_dir, tmp_path, calib, capsys):
    """--lowrank: two R x d matrices per layer, standard MatMuls beside the node; ONNX matches PyTorch; it lowers
    each layer's FFN error on the calibration text; its cost counts in the active share."""
    from exporter.calib_cache import calibrate
    from exporter.moefy import build_moes
    out, saved = tmp_path / "lr.onnx", tmp_path / "lr.moefied"
    report = quiet_export(tiny_bert_dir, out, experts=8, top_k=2, router="ls", lowrank=4, calib=calib,
                          save_moefied_dir=saved)
    assert report.config.lowrank == 4 and report.config.active_share == pytest.approx(2 / 8 + 2 * 4 / (2 * 64))
    assert "rank-4 low-rank stand-in" in report.summary() and "--lowrank 4" in report.summary()
    onnx_matches_torch(out, saved)
    nodes = onnx.load(out).graph.node
    assert sum(n.domain == spec.DOMAIN for n in nodes) == 2  # still one operator per FFN, the stand-in beside it
    from exporter.tasks import task_for as tf
    model, tok, adapter, cfg, routers = load_model(saved)  # the dense FFNs, experts contiguous
    assert routers["layer.0.lowrank_a"].shape == (4, 32)
    x = calibrate(model, adapter, tf(adapter).batch(tok, CALIB.splitlines(), model, 32), use_cache=False).xs
    without = {k: v for k, v in routers.items() if "lowrank" not in k}
    for i, (with_lr, plain) in enumerate(zip(build_moes(model, adapter, cfg, routers),
                                             build_moes(model, adapter, cfg, without))):
        ffn = adapter.read(adapter.layers(model)[i])
        y = ffn.forward(x[i], cfg.activation)
        err = [np.linalg.norm(m(torch.as_tensor(x[i])).detach().numpy() - y) for m in (with_lr, plain)]
        assert err[0] < err[1]
    from exporter.genai_layout import GenaiLayoutError, normalize_layer
    entry = {**with_lr.operator_inputs()[0], **with_lr.operator_inputs()[1]}
    assert [t.shape for t in normalize_layer(entry, 0)[2]] == [(4, 32), (4, 32), (32,)]  # the genai layout takes it too
    with pytest.raises(GenaiLayoutError, match="lowrank must be \\(A \\[R, 32\\], B \\[R, 32\\], c \\[32\\]\\), got "
                                               "\\(\\[4, 32\\], \\[4, 32\\], \\[4\\]\\)"):
        normalize_layer({**entry, "lowrank": entry["lowrank"][:2] + (np.zeros(4),)}, 0)
    bad = tmp_path / "bad"
    bad.mkdir()
    assert_fails_cleanly(capsys, bad, [tiny_bert_dir, "--lowrank", "-1"], "--lowrank must be a rank >= 0, got -1")


def test_router_labels_and_the_representative_router(rng):
    """--router-labels output ranks experts by ||h_e W2_e|| (WINA) instead of the deviation from the mean; the cmoe
    router scores each expert by its most contributing neuron's pre-activation."""
    from exporter.routers import expert_deviation, representative_router
    h, w2 = rng.standard_normal((50, 12)) + 3.0, rng.standard_normal((12, 5))
    out = expert_deviation(h, w2, 3, centred=False)
    np.testing.assert_allclose(out[7, 1], np.linalg.norm(h[7, 4:8] @ w2[4:8]), rtol=1e-6)
    np.testing.assert_allclose(expert_deviation(h, w2, 3)[7, 1], np.linalg.norm((h[7, 4:8] - h[:, 4:8].mean(0)) @ w2[4:8]),
                               rtol=1e-6)
    keys, bias = rng.standard_normal((12, 6)), rng.standard_normal(12)
    h = np.zeros((4, 12))
    h[:, [2, 5, 11]] = 1.0  # the representative neuron of experts 0, 1, 2 (4 neurons each)
    rw, rb = representative_router(keys, bias, h, np.ones((12, 5)), 3)
    np.testing.assert_array_equal(rw, keys[[2, 5, 11]].astype(np.float32))
    np.testing.assert_array_equal(rb, bias[[2, 5, 11]].astype(np.float32))


def test_wina_labels_export(tiny_bert_dir, tmp_path, calib):
    out, saved = tmp_path / "m.onnx", tmp_path / "saved"
    report = quiet_export(tiny_bert_dir, out, experts=8, top_k=3, router="ls", router_labels="output", calib=calib,
                          save_moefied_dir=saved)
    assert report.config.router_labels == "output" and "--router-labels output" in report.summary()
    onnx_matches_torch(out, saved)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_sequential_calibration_puts_the_last_layer_back(tiny_bert_dir, tiny_model_dir, tmp_path, calib, family):
    """--sequential: each layer is fitted on the inputs the MoEfied layers below give it, its stand-in on putting
    the layer's output where the dense model's is. On the calibration text the last hidden states end closer to
    the dense model's than with the same recipe fitted on dense inputs; the export validates as any other."""
    texts = CALIB.splitlines()
    errors = []
    for sequential in (False, True):
        saved = tmp_path / f"s{sequential}"
        out = tmp_path / (f"s{sequential}.onnx")
        report = quiet_export(tiny_bert_dir if family == "bert" else tiny_model_dir(family), out, experts=8, top_k=2,
                              router="ls", correction="mean",
                              lowrank=8, calib=calib, sequential=sequential, save_moefied_dir=saved)
        assert report.max_rel_diff <= 1e-4 and report.config.sequential == sequential
        assert ("--sequential" in report.summary()) == sequential
        model, tok, adapter, cfg, routers = load_model(saved)
        batch = task_for(adapter).batch(tok, texts, model, 32)
        mask = batch["attention_mask"].bool()
        with torch.no_grad():
            dense = model.base_model(**batch).last_hidden_state[mask]
            install_moe(model, adapter, cfg, routers)
            moe = model.base_model(**batch).last_hidden_state[mask]
        errors.append(float((moe - dense).norm() / dense.norm()))
    assert errors[1] < errors[0], errors
