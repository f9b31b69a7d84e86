"""Issue 3's training modes on the tiny seeded BERT: --distill and --relufy export, validate and improve
fidelity on held-out calibration text; calibration activations are cached; bad values fail cleanly."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from conftest import TINY_WORDS
from test_cli_errors import assert_fails_cleanly
from test_methods import onnx_matches_torch

from exporter import export
from exporter.moe_ffn import expert_hidden, masked_dense
from runtime.session import METADATA_KEY
from runtime import spec


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """200 seeded lines of the tiny vocabulary's words: enough text to hold some out."""
    rng = np.random.default_rng(0)
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text("".join(" ".join(rng.choice(TINY_WORDS, rng.integers(4, 12))) + "\n" for _ in range(200)))
    return p


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Each test its own, empty activation cache."""
    monkeypatch.setenv("MOEFY_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


RECIPE = dict(experts=8, top_k=2, split="coact", router="ls", correction="mean")


def run_export(model_dir, out, **kw):
    logs = []
    report = export(model_dir, out, backend="numba", progress=False, log=logs.append, **kw)
    return report, logs


def test_distill_exports_validates_and_improves(tiny_bert_dir, tmp_path, calib):
    out, saved = tmp_path / "d.onnx", tmp_path / "saved"
    report, logs = run_export(tiny_bert_dir, out, calib=calib, distill=1.0, distill_steps=30, save_moefied_dir=saved,
                              **RECIPE)
    assert report.max_rel_diff <= 1e-4  # the distilled ONNX still matches the distilled PyTorch model
    onnx_matches_torch(out, saved)
    record = report.config.distill
    assert record["steps"] == 30 and record["heldout_texts"] == 25  # a tenth of 200 lines and 50 spans of them
    before, after_layerwise, after = record["heldout_loss"]
    assert after_layerwise < before and after < after_layerwise  # each phase lowered the held-out loss
    for start, end in record["layer_error"]:
        assert end < start  # and lowered each FFN's error on the dense inputs
    meta = json.loads({p.key: p.value for p in onnx.load(out).metadata_props}[METADATA_KEY])
    assert meta["distill"]["steps"] == 30
    assert any("distilling the MoEfied model" in line for line in logs)


def test_distill_is_reproducible_with_a_step_cap(tiny_bert_dir, tmp_path, calib):
    # A budget the tiny model never meets (the layer-wise phase stops on time, or after its epochs): on a loaded
    # machine one minute cut the layer-wise epochs short, differently in each run.
    a, _ = run_export(tiny_bert_dir, tmp_path / "a.onnx", calib=calib, distill=60.0, distill_steps=5, **RECIPE)
    b, _ = run_export(tiny_bert_dir, tmp_path / "b.onnx", calib=calib, distill=60.0, distill_steps=5, **RECIPE)
    assert a.config.distill["heldout_loss"] == b.config.distill["heldout_loss"]
    wa, wb = ({t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / f).graph.initializer}
              for f in ("a.onnx", "b.onnx"))
    assert wa.keys() == wb.keys() and [k for k in wa if not np.array_equal(wa[k], wb[k])] == []


def test_the_export_releases_the_layerwise_activations_as_it_goes(tiny_bert_dir, tmp_path, calib, monkeypatch):
    """The teacher's FFN inputs (up to ACTIVATIONS_MAX_GB) are dropped layer by layer in the layer-wise phase: the
    end-to-end phase does not hold them beside its own memory."""
    from exporter import distill
    seen, layerwise = [], distill.layerwise

    def spy(moes, teacher, adapter, calib_acts, *args, **kwargs):
        seen.append(calib_acts)
        return layerwise(moes, teacher, adapter, calib_acts, *args, **kwargs)
    monkeypatch.setattr(distill, "layerwise", spy)
    run_export(tiny_bert_dir, tmp_path / "a.onnx", calib=calib, distill=1.0, distill_steps=2, **RECIPE)
    assert len(seen) == 1 and seen[0].xs == [None, None]


def test_an_encoders_layerwise_phase_gets_its_share_of_the_budget(tiny_bert_dir, tmp_path, calib, monkeypatch):
    """An encoder's layer-wise phase may take LAYERWISE_SHARE[False] of the budget (0.15: it converges in a few
    epochs, and the end-to-end phase makes more of the time), a language model's LAYERWISE_SHARE[True]."""
    import time
    from exporter import distill
    assert distill.LAYERWISE_SHARE[False] < distill.LAYERWISE_SHARE[True] <= 0.5
    left, layerwise = [], distill.layerwise

    def spy(*args, deadline, **kwargs):
        left.append(deadline - time.monotonic())
        return layerwise(*args, deadline=deadline, **kwargs)
    monkeypatch.setattr(distill, "layerwise", spy)
    run_export(tiny_bert_dir, tmp_path / "a.onnx", calib=calib, distill=1.0, distill_steps=2, **RECIPE)
    budget = 60 * distill.LAYERWISE_SHARE[False]
    assert len(left) == 1 and budget - 5 < left[0] <= budget  # less what the set-up before it took


def test_the_end_to_end_rate_warms_up_then_decays_to_a_tenth_by_the_cap_or_the_deadline():
    from exporter.distill import E2E_WARMUP, lr_factor
    assert lr_factor(0, 1000) == pytest.approx(1 / E2E_WARMUP)  # warm-up
    assert lr_factor(E2E_WARMUP - 1, 1000) == pytest.approx(1 - 0.9 * (E2E_WARMUP - 1) / 1000)
    assert lr_factor(500, 1000) == pytest.approx(0.55) and lr_factor(1000, 1000) == pytest.approx(0.1)
    # a run the budget ends: by the share of the time spent, whatever the step; never below a tenth
    assert lr_factor(500, 10**5, 0.5) == pytest.approx(0.55)
    assert lr_factor(800, 10**5, 1.0) == lr_factor(900, 10**5, 1.3) == pytest.approx(0.1)


def test_slow_held_out_evaluations_are_spaced_to_a_share_of_the_time():
    from exporter.distill import E2E_EVAL_EVERY, E2E_EVAL_SHARE, eval_interval
    assert eval_interval(0.1, 1.0) == E2E_EVAL_EVERY  # cheap (MiniLM-like): the usual interval
    n = eval_interval(120.0, 21.0)  # SmolLM2 on chat text: 120 s an evaluation, 21 s a step
    assert 120.0 / (n * 21.0) <= E2E_EVAL_SHARE < 120.0 / ((n - 1) * 21.0)  # of the training time


def test_relufy_exports_relu(tiny_bert_dir, tmp_path, calib):
    out, saved = tmp_path / "r.onnx", tmp_path / "saved"
    report, logs = run_export(tiny_bert_dir, out, calib=calib, relufy=0.1, relufy_minutes=1.0, distill_steps=20,
                              save_moefied_dir=saved, **RECIPE)
    assert report.config.activation == "relu" and report.max_rel_diff <= 1e-4
    nodes = [n for n in onnx.load(out).graph.node if n.domain == spec.DOMAIN]
    assert [onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "activation")) for n in nodes] \
        == [b"relu"] * 2
    record = report.config.relufy
    assert record["shift"] == 0.1 and record["heldout_loss"][-1] < record["heldout_loss"][0]
    assert json.loads((saved / "config.json").read_text())["hidden_act"] == "relu"  # reloads as a ReLU model
    onnx_matches_torch(out, saved)
    assert not report.config.distill  # --relufy alone does not distill the MoE


def test_calibration_cache_hit_and_invalidated(tiny_bert_dir, tmp_path, calib, cache_dir):
    _, first = run_export(tiny_bert_dir, tmp_path / "1.onnx", calib=calib, **RECIPE)
    _, second = run_export(tiny_bert_dir, tmp_path / "2.onnx", calib=calib, **{**RECIPE, "top_k": 3})
    assert any("calibration activations: computed and cached" in line for line in first)
    assert any("calibration activations: cache hit" in line for line in second)
    other = tmp_path / "other.txt"
    other.write_text(calib.read_text().replace("the", "a"))
    _, third = run_export(tiny_bert_dir, tmp_path / "3.onnx", calib=other, **RECIPE)
    assert any("calibration activations: computed and cached" in line for line in third)
    assert len(list(cache_dir.glob("*.npz"))) == 2
    _, off = run_export(tiny_bert_dir, tmp_path / "4.onnx", calib=calib, calib_cache=False, **RECIPE)
    assert not any("calibration activations" in line for line in off)


def test_cached_activations_equal_fresh_ones(tiny_bert_dir, calib):
    from exporter.calib_cache import calibrate
    from exporter.moefy import ffn_inputs
    from exporter.source import load_model
    from exporter.tasks import task_for
    model, tok, adapter, _, _ = load_model(tiny_bert_dir)
    b = tok(calib.read_text().splitlines(), padding=True, return_tensors="pt")
    batch = {k: b[k] for k in task_for(adapter).model_inputs(model)}
    fresh = calibrate(model, adapter, batch)
    again = calibrate(model, adapter, batch)
    whole = ffn_inputs(model, adapter, batch, chunk=len(calib.read_text().splitlines()))  # one forward pass
    for x, y, z in zip(fresh.xs, again.xs, whole):
        assert np.array_equal(x, y) and np.allclose(x, z, atol=1e-5)
    assert np.array_equal(fresh.groups, again.groups) and fresh.groups[-1] == len(batch["input_ids"]) - 1


@pytest.mark.parametrize("router", ["ls", "mlp"])  # a linear router, and one with an MLP (its own parameters)
@pytest.mark.parametrize("refit", [False, True])
def test_end_to_end_phase_routers(tiny_bert_dir, tmp_path, calib, monkeypatch, router, refit):
    """Routers trained end to end through the straight-through top-k wrecked MiniLM (distill.py), so the task
    loss never reaches them: with the refit off (E2E_ROUTER_LR of 0) every router weight stays where the
    layer-wise phase put it; with it on (the default) they move, on their own loss only."""
    import exporter.distill as D
    from exporter.source import load_model
    recipe = {**RECIPE, "router": router}
    monkeypatch.setattr(D, "layerwise", lambda moes, *a, **k: [[1.0, 1.0] for _ in moes])  # end to end only
    if not refit:
        monkeypatch.setattr(D, "E2E_ROUTER_LR", {False: 0.0, True: 0.0})
    run_export(tiny_bert_dir, tmp_path / "p.onnx", calib=calib, save_moefied_dir=tmp_path / "plain", **recipe)
    run_export(tiny_bert_dir, tmp_path / "d.onnx", calib=calib, distill=1.0, distill_steps=10,
               save_moefied_dir=tmp_path / "e2e", **recipe)
    plain, *_, plain_routers = load_model(tmp_path / "plain")
    trained, *_, trained_routers = load_model(tmp_path / "e2e")
    assert plain_routers.keys() == trained_routers.keys()
    router_keys = [k for k in plain_routers if not k.endswith("unselected_bias")]  # that one is the FFN's, trains
    moved = [k for k in router_keys if not np.array_equal(plain_routers[k], trained_routers[k])]
    assert moved if refit else not moved, moved
    a, b = plain.state_dict(), trained.state_dict()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert any("intermediate" in k for k in changed) and any("attention" in k for k in changed)


@pytest.mark.parametrize("bf16", [False, True])
def test_distillation_trains_in_float32_or_bfloat16_autocast(tiny_bert_dir, tmp_path, calib, monkeypatch, bf16):
    """TRAIN_BF16 (on by default on CPUs with bfloat16 in hardware) changes the training steps' arithmetic only, in
    both phases: each phase still lowers its held-out loss, the weights written back stay float32, and the export
    matches its PyTorch model."""
    import exporter.distill as D
    from exporter.moe_ffn import MoEFFN
    monkeypatch.setattr(D, "TRAIN_BF16", bf16)
    calls, forward = [], MoEFFN.forward  # (training?, in autocast?) of every MoE FFN call

    def spy(self, x):
        calls.append((torch.is_grad_enabled() and self.w1.requires_grad, torch.is_autocast_enabled("cpu")))
        return forward(self, x)
    monkeypatch.setattr(MoEFFN, "forward", spy)
    out, saved = tmp_path / "d.onnx", tmp_path / "saved"
    report, _ = run_export(tiny_bert_dir, out, calib=calib, distill=1.0, distill_steps=30, save_moefied_dir=saved,
                           **RECIPE)
    assert {autocast for training, autocast in calls if training} == {bf16}
    assert {autocast for training, autocast in calls if not training} == {False}  # evaluations in float32
    assert report.config.distill["arithmetic"] == ("bfloat16" if bf16 else "float32")
    before, after_layerwise, after = report.config.distill["heldout_loss"]
    assert after_layerwise < before and after < after_layerwise
    assert all(end < start for start, end in report.config.distill["layer_error"])
    assert report.max_rel_diff <= 1e-4
    onnx_matches_torch(out, saved)
    assert {t.data_type for t in onnx.load(out).graph.initializer if t.data_type in (1, 16)} == {1}  # float32


def test_the_expert_layer_stays_bfloat16_inside_the_autocast():
    """The FFN's biases join the autocast's bfloat16 products in their dtype: a float32 bias would promote the whole
    hidden layer (and its activation, mask and gradients) to float32. Outside an autocast nothing changes."""
    g = torch.Generator().manual_seed(0)
    E, m, d = 6, 4, 8
    w1, b1, w2 = torch.randn(E, m, d, generator=g), torch.randn(E, m, generator=g), torch.randn(E, m, d, generator=g)
    x, rw, rb = torch.randn(5, d, generator=g), torch.randn(E, d, generator=g), torch.randn(E, generator=g)
    args = (x, w1, b1, w2, None, rw, rb, None, None, 2, "gelu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = expert_hidden(x, w1, b1, "gelu")
        inside = masked_dense(*args, hidden=h)
    assert h.dtype == torch.bfloat16
    outside = masked_dense(*args)
    assert expert_hidden(x, w1, b1, "gelu").dtype == outside.dtype == torch.float32
    torch.testing.assert_close(inside.float(), outside, rtol=0.05, atol=0.05 * float(outside.abs().max()))


def test_attention_stays_float32_inside_the_bfloat16_autocast():
    """PyTorch's CPU flash attention is slow to differentiate in bfloat16 (distill._Float32Attention): inside the
    autocast it runs in float32, equal to attention outside it; the products around it are bfloat16."""
    import torch.nn.functional as F
    from exporter.distill import _Float32Attention
    q, k, v = torch.randn(3, 2, 4, 7, 8).unbind(0)
    mask = torch.randn(2, 1, 7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16), _Float32Attention():
        inside = F.scaled_dot_product_attention(q.bfloat16(), k, v, attn_mask=mask)
        assert (q @ k.transpose(-1, -2)).dtype == torch.bfloat16
    assert inside.dtype == torch.float32
    outside = F.scaled_dot_product_attention(q.bfloat16().float(), k, v, attn_mask=mask)
    torch.testing.assert_close(inside, outside)


def test_straight_through_router_keeps_the_forward_value():
    """The surrogate changes gradients only: same output, and the router gets a gradient."""
    g = torch.Generator().manual_seed(0)
    E, m, d = 6, 4, 8
    x, w1, w2 = torch.randn(10, d, generator=g), torch.randn(E, m, d, generator=g), torch.randn(E, m, d, generator=g)
    b1, b2, u = torch.zeros(E, m), torch.zeros(d), torch.randn(E, d, generator=g)
    rw = torch.randn(E, d, generator=g, requires_grad=True)
    rb = torch.zeros(E, requires_grad=True)
    plain = masked_dense(x, w1, b1, w2, b2, rw, rb, None, u, 2, "gelu")
    soft = masked_dense(x, w1, b1, w2, b2, rw, rb, None, u, 2, "gelu", router_temperature=0.5)
    assert torch.equal(plain, soft)
    assert not plain.requires_grad  # the top-k selection alone passes no gradient
    soft.sum().backward()
    assert rw.grad.abs().sum() > 0


@pytest.mark.parametrize("argv,message", [
    (["--distill", 0], "--distill takes a positive number of minutes, got 0"),
    (["--distill", -2], "--distill takes a positive number of minutes"),
    (["--distill", 1, "--distill-steps", -1], "--distill-steps must be >= 0, got -1"),
    (["--distill", 1, "--distill-texts", 1], "--distill-texts must be >= 2, got 1"),
    (["--calib-texts", 0], "--calib-texts must be a number of texts >= 1, got 0"),
    (["--relufy", -0.5], "--relufy takes a threshold shift >= 0, got -0.5"),
    (["--relufy", "nan"], "--relufy takes a threshold shift >= 0"),
    (["--relufy", "--relufy-minutes", 0], "--relufy-minutes must be positive"),
])
def test_bad_training_values_fail_cleanly(capsys, tmp_path, tiny_bert_dir, argv, message):
    assert_fails_cleanly(capsys, tmp_path, [tiny_bert_dir, *argv], message)


def test_distillation_trains_on_more_text_than_calibration(tiny_bert_dir, tmp_path, calib):
    # the MoE calibrates on the first 50 lines, distillation takes 120
    report, logs = run_export(tiny_bert_dir, tmp_path / "d.onnx", calib=calib, distill=1.0, distill_steps=3,
                              calib_texts=50, distill_texts=120, **RECIPE)
    assert "--calib: using the first 120 of its 200 lines" in logs
    assert any(line.startswith("calibrating on 50 texts") for line in logs)
    # the 120 lines, then 30 short spans of them (an encoder: FeatureExtraction.distillation_texts)
    assert "distillation text: 150 texts (--calib %s, plus 30 spans of 1-4 words from them)" % calib in logs
    assert report.calibration["distillation_texts"] == 150
    assert report.config.distill["heldout_texts"] == 15  # a tenth of the distillation texts


def test_short_spans_are_runs_of_words_of_the_texts():
    from exporter.text import short_spans
    texts = ["Hello, world! It's a fine day in New-York, 1999.", "The quick brown fox jumps over the lazy dog",
             "42 17 -- 3.5", "Ümlaut café naïve"] * 25
    spans = short_spans(texts, 0.5, seed=3)
    assert spans == short_spans(texts, 0.5, seed=3) != short_spans(texts, 0.5, seed=4)
    assert 35 <= len(spans) <= 50  # one per sampled text, none from the text without words
    runs = {" ".join(w[i:i + n]).lower() for t in texts[:4] for w in [[x.strip(",.!") for x in t.split()]]
            for n in (1, 2, 3, 4) for i in range(len(w) - n + 1)}
    assert all(span.lower() in runs for span in spans), set(spans) - runs
    assert {len(s.split()) for s in spans} == {1, 2, 3, 4}
    assert any(s != s.lower() for s in spans) and any(s.lower() == s and s.upper() != s for s in spans)
    assert short_spans([], 0.25) == [] and short_spans(["only 42"], 1.0) == ["only"]


def test_only_encoders_distill_on_spans_after_the_texts():
    from exporter.tasks import TASKS
    texts = [f"text number {i} of the corpus" for i in range(40)]
    out, added = TASKS["feature-extraction"]().distillation_texts(texts, 0)
    assert out[:40] == texts and len(out) == 50 and added == "plus 10 spans of 1-4 words from them"
    assert TASKS["text-generation"]().distillation_texts(texts, 0) == (texts, "")


def test_calibration_prefix_matches_its_own_capture(tiny_bert_dir, calib):
    """The MoE's calibration activations are taken as the first texts of the distillation text's."""
    from exporter.calib_cache import calibrate
    from exporter.source import load_model
    from exporter.text import load_texts
    model, tok, adapter, _, _ = load_model(tiny_bert_dir)
    texts = load_texts(calib)
    batch = lambda t: dict(tok(t, padding=True, return_tensors="pt"))  # noqa: E731
    full = calibrate(model, adapter, batch(texts[:150]), use_cache=False)
    own = calibrate(model, adapter, batch(texts[:70]), use_cache=False)
    prefix = full.first_texts(70)
    np.testing.assert_array_equal(prefix.groups, own.groups)
    for a, b in zip(prefix.xs, own.xs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_curve_passes_distill_texts(tiny_bert_dir):
    from exporter.eval_cli import _recipe, build_parser
    args = build_parser().parse_args([str(tiny_bert_dir), "--curve", "out"])
    assert _recipe(args, ["--distill", "2", "--distill-texts", "5000"]).distill_texts == 5000
    with pytest.raises(ValueError, match="--distill-texts must be >= 2"):
        _recipe(args, ["--distill", "2", "--distill-texts", "1"])


def test_heldout_share_is_capped():
    from exporter.distill import HOLDOUT_MAX, _heldout_texts
    assert _heldout_texts(100, 0).sum() == 10
    assert _heldout_texts(10 * HOLDOUT_MAX + 500, 0).sum() == HOLDOUT_MAX
    assert _heldout_texts(1, 0).sum() == 0


def test_non_numeric_distill_is_an_argparse_error(capsys, tmp_path, tiny_bert_dir):
    from exporter.cli import main
    with pytest.raises(SystemExit) as e:
        main([str(tiny_bert_dir), str(tmp_path / "out.onnx"), "--distill", "ten"])
    assert e.value.code == 2 and "invalid float value: 'ten'" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


def test_training_a_moefied_dir_is_refused(capsys, tmp_path, tiny_bert_dir):
    saved = tmp_path / "saved"
    run_export(tiny_bert_dir, tmp_path / "first.onnx", experts=4, top_k=2, save_moefied_dir=saved)
    (tmp_path / "first.onnx").unlink()
    assert_fails_cleanly(capsys, tmp_path, [saved, "--distill", 1], "--distill needs the original dense model")
    assert_fails_cleanly(capsys, tmp_path, [saved, "--relufy"], "--relufy needs the original dense model")


def test_curve_passes_the_training_flags(tiny_bert_dir):
    from exporter.eval_cli import _recipe, build_parser
    args = build_parser().parse_args([str(tiny_bert_dir), "--curve", "out"])
    r = _recipe(args, ["--distill", "2", "--distill-steps", "50", "--relufy", "0.25"])
    assert (r.distill, r.distill_steps, r.relufy, r.relufy_minutes) == (2.0, 50, 0.25, 2.0)
    with pytest.raises(ValueError, match="--distill takes a positive number"):
        _recipe(args, ["--distill", "0"])


@pytest.mark.parametrize("tokens", [None, 64])
def test_router_refit_learns_its_own_oracle(tokens):
    """The end-to-end router refit (E2E_ROUTER_LR > 0) trains the router alone towards the experts whose
    skipping costs most on the FFN's current inputs, also from a random sample of the tokens at each step."""
    from exporter.distill import router_refit_loss
    from exporter.moe_ffn import MoEFFN
    g = torch.Generator().manual_seed(0)
    E, m, d, k = 8, 4, 16, 2
    moe = MoEFFN(torch.randn(E, m, d, generator=g), torch.zeros(E, m), torch.randn(E, m, d, generator=g),
                 torch.zeros(d), torch.zeros(E, d), torch.zeros(E), torch.zeros(E, d), top_k=k, activation="gelu")
    x = torch.randn(512, d, generator=g, requires_grad=True)
    moe.router_w.requires_grad_(True)
    moe.router_b.requires_grad_(True)
    opt = torch.optim.Adam([moe.router_w, moe.router_b], lr=3e-2)
    first = None
    for _ in range(200):
        loss = router_refit_loss(moe, x, tokens=tokens)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first
    assert x.grad is None and moe.w1.grad is None  # inputs and experts are only read
    with torch.no_grad():
        h = torch.nn.functional.gelu(x @ moe.w1.reshape(E * m, d).T).unflatten(-1, (E, m))
        oracle = torch.einsum("nem,emd->ned", h, moe.w2).norm(dim=-1).topk(k).indices
        chosen = moe.scores(x).topk(k).indices
    overlap = (chosen.unsqueeze(-1) == oracle.unsqueeze(-2)).any(-1).float().mean()
    assert overlap > 0.5  # chance: k / E = 0.25


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_expert_deviations_through_the_gram_matrices_match_the_outputs(gated, bias):
    """The router refit's labels, ||h_e W2_e - s_e|| computed through W2_e W2_e^T, equal the per-expert outputs'
    (s_e: unselected_bias, else the mean output), and reusing the forward's activations changes nothing; a
    sample of the tokens, or a batch's real tokens, give the loss on those rows."""
    from exporter.distill import expert_deviations, router_refit_loss
    from exporter.moe_ffn import MoEFFN, expert_hidden
    g = torch.Generator().manual_seed(1)
    E, m, d, k = 6, 5, 12, 2
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    moe = MoEFFN(r(E, m, d), r(E, m), r(E, m, d), r(d), r(E, d), r(E), r(E, d) if bias else None, top_k=k,
                 activation="silu" if gated else "gelu", wg=r(E, m, d) if gated else None)
    x = r(40, d)
    h = expert_hidden(x, moe.w1, moe.b1, moe.activation, moe.wg, moe.bg)
    out = torch.einsum("nem,emd->ned", h.unflatten(-1, (E, m)), moe.w2)
    s = moe.unselected_bias if bias else out.mean(0)
    torch.testing.assert_close(expert_deviations(moe, h), (out - s).norm(dim=-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(router_refit_loss(moe, x, h), router_refit_loss(moe, x))
    torch.testing.assert_close(router_refit_loss(moe, x, h, tokens=40), router_refit_loss(moe, x))
    torch.manual_seed(3)
    rows = torch.randperm(len(x))[:9]
    torch.manual_seed(3)  # a sample of the tokens: the loss on those rows
    torch.testing.assert_close(router_refit_loss(moe, x, h, tokens=9), router_refit_loss(moe, x[rows], h[rows]))
    real = torch.arange(10) < torch.tensor([[10], [3], [7], [1]])  # a padded batch's attention mask, [4 texts, 10]
    xb, hb = x.reshape(4, 10, d), h.reshape(4, 10, -1)  # padding rows are never routed in use: left out
    torch.testing.assert_close(router_refit_loss(moe, xb, hb, real=real), router_refit_loss(moe, xb[real], hb[real]))
    torch.manual_seed(4)
    rows = torch.randperm(int(real.sum()))[:5]
    torch.manual_seed(4)  # both: a sample of the real tokens
    torch.testing.assert_close(router_refit_loss(moe, xb, hb, tokens=5, real=real),
                               router_refit_loss(moe, xb[real][rows], hb[real][rows]))


def test_the_teachers_targets_in_bfloat16_are_float32_and_near_the_float32_ones(tiny_bert_dir):
    """The end-to-end phase's fit targets follow the training steps' arithmetic (bfloat16 where TRAIN_BF16 says so):
    the same tensors in float32, each layer within a small relative error of the float32 forward's."""
    from transformers import AutoModel, AutoTokenizer
    from exporter.distill import _teacher_target
    model, tok = AutoModel.from_pretrained(tiny_bert_dir).eval(), AutoTokenizer.from_pretrained(tiny_bert_dir)
    b = dict(tok([" ".join(TINY_WORDS[i:i + 5]) for i in range(6)], padding=True, return_tensors="pt"))
    (layers32, emb32, _), (layers16, emb16, lp) = _teacher_target(model, b), _teacher_target(model, b, bf16=True)
    assert lp is None and all(t.dtype == torch.float32 for t in (*layers16, emb16))
    assert not all(torch.equal(a, c) for a, c in zip(layers32, layers16))  # the autocast took effect
    for a, c in zip(layers32, layers16):
        assert a.shape == c.shape and float((a - c).norm() / a.norm()) < 0.02
    assert float(torch.nn.functional.cosine_similarity(emb32, emb16).min()) > 0.999


def test_a_language_models_bfloat16_targets_are_float32_log_probabilities_near_the_float32_ones(tiny_model_dir):
    """A language model's teacher targets in bfloat16: float32 next-token log-probabilities of the real tokens, a
    small KL from the float32 forward's (SmolLM2 on real text: 0.001 nats a token)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
    from exporter.distill import _teacher_target
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    b = dict(input_ids=ids, attention_mask=torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 6 + [0]]))
    (_, _, lp32), (_, _, lp16) = _teacher_target(model, b), _teacher_target(model, b, bf16=True)
    assert lp16.dtype == torch.float32 and lp16.shape == lp32.shape == (17, model.config.vocab_size)
    assert not torch.equal(lp16, lp32)  # the autocast took effect
    assert float(F.kl_div(lp16, lp32, log_target=True, reduction="none").sum(-1).max()) < 0.01


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_the_chunked_next_token_kl_equals_the_whole_one_and_its_gradient(monkeypatch, chunk):
    """next_token_kl, a few positions at a time and recomputed in the backward pass, gives the KL of the whole
    batch at once and the same gradient, for chunks that straddle padding, hold only padding, or the whole batch."""
    import torch.nn.functional as F
    from exporter import distill
    monkeypatch.setattr(distill, "KL_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]).bool()
    logits = torch.randn(3, 6, 11, generator=g, requires_grad=True)
    target = F.log_softmax(torch.randn(int(mask.sum()), 11, generator=g), -1)
    whole = F.kl_div(F.log_softmax(logits[mask], -1), target, log_target=True, reduction="none").sum(-1)
    chunked = distill.next_token_kl(logits, mask, target)
    torch.testing.assert_close(chunked, whole)
    (grad_whole,) = torch.autograd.grad((whole * torch.arange(len(whole))).sum(), logits)
    (grad_chunked,) = torch.autograd.grad((chunked * torch.arange(len(whole))).sum(), logits)
    torch.testing.assert_close(grad_chunked, grad_whole)


def test_distillation_trains_and_exports_the_low_rank_stand_in(tiny_bert_dir, tmp_path, calib, monkeypatch):
    """The stand-in trains with the experts, and what trained is what is exported (it used to train end to end and
    then be dropped: the export carried the closed-form fit beside distilled experts). The routers' refit is off:
    at the encoders' rate its moves make this tiny random model's held-out loss worse for the 10 steps, so the
    phase would keep its start (as it should) and leave nothing trained to compare."""
    import exporter.distill as D
    from safetensors.numpy import load_file
    from exporter.config import ROUTERS_FILE
    monkeypatch.setattr(D, "E2E_ROUTER_LR", {False: 0.0, True: 0.0})
    kw = dict(RECIPE, top_k=1, lowrank=4, calib=calib)
    run_export(tiny_bert_dir, tmp_path / "a.onnx", save_moefied_dir=tmp_path / "a", **kw)
    report, _ = run_export(tiny_bert_dir, tmp_path / "b.onnx", save_moefied_dir=tmp_path / "b", distill=1.0,
                           distill_steps=10, **kw)
    onnx_matches_torch(tmp_path / "b.onnx", tmp_path / "b")
    fit, trained = (load_file(tmp_path / d / ROUTERS_FILE) for d in "ab")
    for i in range(2):
        for name in ("lowrank_a", "lowrank_b", "lowrank_c"):
            assert fit[f"layer.{i}.{name}"].shape == trained[f"layer.{i}.{name}"].shape
            assert not np.allclose(fit[f"layer.{i}.{name}"], trained[f"layer.{i}.{name}"])
    before, after_layerwise, after = report.config.distill["heldout_loss"]
    assert after <= before  # the best held-out state is kept


@pytest.mark.parametrize("bf16", [False, True])
def test_decoder_distillation_lowers_next_token_kl(tiny_model_dir, tmp_path, calib, monkeypatch, bf16):
    """A language model distils on the next-token KL to the dense model (plus the hidden states), its teacher
    targets recomputed per step when they would not fit (forced here), the layer-wise phase on the first texts
    whose activations fit (forced to 60), in float32 or bfloat16 steps: the export validates, and the held-out KL
    falls."""
    import exporter.distill as D
    monkeypatch.setattr(D, "TARGETS_MAX_GB", 0.0)
    monkeypatch.setattr(D, "TRAIN_BF16", bf16)
    per_text = 4 * 32 * 2 * 8  # bytes of FFN inputs of a text of 8 tokens: tiny LLaMA's width x layers x 4
    monkeypatch.setattr(D, "ACTIVATIONS_MAX_GB", 60 * per_text / 1e9)
    report, logs = run_export(tiny_model_dir("llama"), tmp_path / "d", calib=calib, experts=8, top_k=2,
                              split="coact", router="ls", correction="mean", distill=1.0, distill_steps=20,
                              calib_texts=50, distill_texts=200, genai="off")
    record = report.config.distill
    assert "heldout_cosine" not in record and record["arithmetic"] == ("bfloat16" if bf16 else "float32")
    before, after_layerwise, after = record["heldout_kl"]
    assert after < before  # nats per token, lower is closer
    assert record["heldout_loss"][2] < record["heldout_loss"][0]
    assert any("layer-wise distillation on the first" in line for line in logs), logs
    assert report.max_rel_diff <= 1e-4
    from exporter.evaluate import _training  # what moe-eval prints of the export's training
    assert "held-out calibration next-token KL" in _training({"distill": record})


def test_length_batches_bound_texts_and_tokens():
    """Batches of similar-length texts, at most `size` texts and `max_tokens` padded tokens (language models'
    memory bound), every text exactly once."""
    from exporter.distill import _length_batches
    lengths = np.array([3, 9, 1, 7, 7, 2, 8, 5, 4, 6])
    mask = torch.zeros(len(lengths), 9, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    batch = {"input_ids": torch.arange(len(lengths))[:, None].repeat(1, 9), "attention_mask": mask}
    texts = np.arange(len(lengths))
    for size, cap in ((4, None), (4, 16), (32, 20), (1, 5)):
        batches = _length_batches(batch, texts, size, cap)
        seen = sorted(int(t) for b in batches for t in b["input_ids"][:, 0])
        assert seen == list(range(len(lengths)))
        for b in batches:
            rows, width = b["attention_mask"].shape
            assert rows <= size and (cap is None or rows == 1 or rows * width <= cap)
