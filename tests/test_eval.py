"""moe-eval on the tiny seeded BERT: exact when every expert is kept, bounded otherwise, clear errors.

Labelled-task data comes from tiny inline fixtures (MOEFY_DATA_DIR points at a temporary directory),
so these tests need no download; the real data sets are only checked when `make data` fetched them.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from exporter import datasets, export
from exporter.eval_cli import build_parser, main
from exporter.evaluate import TASKS, Evaluator, markdown_table, read_moe_onnx

QUIET = dict(progress=False, log=lambda *a: None)
FETCHED = datasets.data_dir()  # the real data directory, before the fixtures below point elsewhere


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data directory in the layout `make data` produces, with a few rows of each data set."""
    root = tmp_path_factory.mktemp("data")
    fortunes = root / datasets.FORTUNES
    fortunes.mkdir(parents=True)
    (fortunes / "tiny").write_text("\n%\n".join(
        f"it is a tale of {w} and the {v} as it is told in the {w}" for w in "abcdefghij" for v in "klmnopq") + "\n")
    (fortunes / "tiny.dat").write_bytes(b"\0index")  # index files are skipped
    pairs = root / datasets.WORD_SIMILARITY
    pairs.mkdir(parents=True)
    rows = [("the", "a", 8.5), ("of", "in", 6.0), ("to", "for", 5.5), ("on", "at", 7.0), ("it", "is", 2.0),
            ("by", "from", 4.0), ("and", "with", 3.5), ("as", "the", 1.0)]
    text = "# word1\tword2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows)
    (pairs / "wordsim353.tsv").write_text(text)
    (pairs / "simlex999.txt").write_text(text)
    wordnet = root / datasets.WORDNET_NOUNS
    wordnet.parent.mkdir(parents=True)
    glosses = {"cab": "a car that takes a fare", "bed": "a thing to lie on at night", "ink": "it is for a pen",
               "hat": "a thing on the head", "jam": "a fruit spread for the bread", "fig": "a fruit of the fig tree"}
    wordnet.write_text("  licence header line\n" + "".join(
        f"{i:08d} 05 n 01 {w} 0 000 | {g}; an example\n" for i, (w, g) in enumerate(glosses.items())))
    return root


@pytest.fixture(scope="module")
def with_data(data_dir):
    old = os.environ.get("MOEFY_DATA_DIR")
    os.environ["MOEFY_DATA_DIR"] = str(data_dir)
    yield data_dir
    if old is None:
        del os.environ["MOEFY_DATA_DIR"]
    else:
        os.environ["MOEFY_DATA_DIR"] = old


@pytest.fixture(scope="module")
def models(tiny_bert_dir, tmp_path_factory, with_data):
    d = tmp_path_factory.mktemp("moe")
    # every expert in float32 (float16 experts would round the weights): exactly the dense FFN
    export(tiny_bert_dir, d / "all.onnx", experts=4, top_k=4, weights="float32", **QUIET)
    export(tiny_bert_dir, d / "k1.onnx", experts=4, top_k=1, router="ls", correction="mean", **QUIET)
    return d


@pytest.fixture(scope="module")
def evaluator(tiny_bert_dir, with_data):
    return Evaluator(tiny_bert_dir, tasks=TASKS, **QUIET)


def test_keeping_every_expert_is_exact(evaluator, models):
    r = evaluator(models / "all.onnx")
    assert r.heldout_texts == len(datasets.heldout_texts()) > 12
    assert r.cosine_mean == pytest.approx(1, abs=1e-5) and r.cosine_min == pytest.approx(1, abs=1e-5)
    assert r.nn_agreement == 1.0
    assert len(r.layers) == 2
    for f in r.layers:
        assert f.router_recall == pytest.approx(1) and f.oracle_recall == pytest.approx(1)
        assert f.ffn_rel_error < 1e-5
    assert set(r.tasks) == set(TASKS)
    for t in r.tasks.values():
        assert t.ratio == pytest.approx(1, abs=1e-4)


def test_sparse_model_metrics_are_bounded(evaluator, models):
    r = evaluator(models / "k1.onnx")
    assert r.calibration["source"] == "fortunes"
    assert 0 <= r.nn_agreement <= 1 and -1 <= r.cosine_min <= r.cosine_mean <= 1
    for f in r.layers:
        assert 0 <= f.router_recall <= f.oracle_recall + 1e-12 <= 1 + 1e-12
        assert f.ffn_rel_error > 1e-3  # one expert of four cannot reproduce the FFN
    json.dumps(r.to_dict())  # serialisable


def test_heldout_and_calibration_never_overlap(with_data):
    held = datasets.heldout_texts()
    calib, source = datasets.calibration_texts()
    assert source == "fortunes" and calib and not set(held) & set(calib)
    assert (held, calib) == (datasets.heldout_texts(), datasets.calibration_texts()[0])  # deterministic


def test_calibration_text_is_fetched_on_first_use(monkeypatch, tmp_path):
    """A pip-only user (no `make data`) gets the fortunes: fetched from the package registry on first use."""
    from exporter import fetch_data
    monkeypatch.setenv("MOEFY_DATA_DIR", str(tmp_path))
    fetched = []

    def fake_fetch(name, packages, marker, root, log=print):  # what apt-get download + dpkg-deb -x would leave
        fetched.append(packages)
        (root / marker).mkdir(parents=True)
        (root / marker / "fortunes").write_text("\n%\n".join(f"Fortune number {i} is a sentence of seven words." for i in range(40)))
    monkeypatch.setattr(fetch_data, "fetch_debs", fake_fetch)
    logged = []
    texts, source = datasets.calibration_texts(log=logged.append)
    assert fetched == [["fortunes", "fortunes-min"]] and source == "fortunes" and len(texts) == 20
    assert any("fetching the default calibration text" in line for line in logged)
    datasets.calibration_texts(log=logged.append)
    assert len(fetched) == 1  # once


def test_calibration_falls_back_to_docstrings_loudly(monkeypatch, tmp_path):
    from exporter import fetch_data

    def offline(*a, **k):
        raise fetch_data.FetchError("apt-get download failed: no network")
    monkeypatch.setenv("MOEFY_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(fetch_data, "fetch_debs", offline)
    logged = []
    texts, source = datasets.calibration_texts(log=logged.append)
    assert source.startswith("standard-library docstrings (fallback") and len(texts) > 100
    assert any("WARNING" in line and "no network" in line and "make data" in line for line in logged)
    assert len(datasets.heldout_texts()) == 12


def test_missing_data_says_how_to_fetch_it(monkeypatch, tmp_path, tiny_bert_dir, models, capsys):
    monkeypatch.setenv("MOEFY_DATA_DIR", str(tmp_path))
    assert main([str(tiny_bert_dir), str(models / "all.onnx"), "--quiet"]) == 2
    assert "run `make data`" in capsys.readouterr().err


def test_cli_writes_table_and_json(tiny_bert_dir, models, tmp_path, capsys, with_data):
    out = tmp_path / "r.json"
    assert main([str(tiny_bert_dir), str(models / "all.onnx"), str(models / "k1.onnx"), "--tasks", "ws353",
                 "--json", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "| all.onnx | 100.0% | 1.0000 |" in table and "| k1.onnx | 25.0% |" in table
    reports = json.loads(out.read_text())["reports"]
    assert [set(r["tasks"]) for r in reports] == [{"ws353"}, {"ws353"}]


def test_curve_exports_evaluates_and_plots(tiny_bert_dir, tmp_path, capsys, with_data):
    out = tmp_path / "curve"
    assert main([str(tiny_bert_dir), "--curve", str(out), "--experts", "4", "--shares", "0.5,1", "--tasks", "none",
                 "--quiet"]) == 0
    assert "| top4-of-4.onnx | 100.0% | 1.0000 |" in capsys.readouterr().out
    curve = json.loads((out / "curve.json").read_text())
    assert [r["config"]["top_k"] for r in curve["reports"]] == [2, 4] and curve["recipe"]["experts"] == 4
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_curve_without_experts_takes_the_presets_count_for_the_model(tiny_bert_dir, tmp_path, capsys, with_data):
    """No --experts: the curve exports what moe-export would for this FFN (64 neurons: too narrow for 128
    experts of 12 or more, so 32), with the weight-only fast preset to stay quick."""
    out = tmp_path / "curve"
    assert main([str(tiny_bert_dir), "--curve", str(out), "--shares", "0.25", "--tasks", "none", "--quiet",
                 "--recipe", "fast", "--router", "centroid", "--split", "param", "--correction", "none"]) == 0
    curve = json.loads((out / "curve.json").read_text())
    assert curve["recipe"]["experts"] == 32 and [r["config"]["top_k"] for r in curve["reports"]] == [8]
    assert (out / "top8-of-32.onnx").exists()


def test_plot_of_given_models(tiny_bert_dir, models, tmp_path, capsys, with_data):
    """Models exported one by one (their own distillation budgets) still make a curve, sorted by share."""
    out = tmp_path / "given.png"
    assert main([str(tiny_bert_dir), str(models / "all.onnx"), str(models / "k1.onnx"), "--tasks", "none",
                 "--plot", str(out), "--quiet"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    _fails(capsys, [tiny_bert_dir, models / "k1.onnx", "--tasks", "none", "--plot", out],
           "--plot needs models at two or more different active shares, one model per share; got 25.0%: k1.onnx")
    _fails(capsys, [tiny_bert_dir, models / "k1.onnx", models / "all.onnx", "--plot", tmp_path / "no" / "p.png"],
           "--plot: directory")
    with pytest.raises(SystemExit) as e:
        main([str(tiny_bert_dir), "--curve", str(tmp_path), "--plot", str(out)])
    assert e.value.code == 2 and "--plot goes with MoE ONNX files" in capsys.readouterr().err


def test_fetch_is_idempotent(data_dir, monkeypatch):
    import subprocess

    from exporter import fetch_data

    def no_download(*a, **k):
        raise AssertionError("fetched although the data is there")
    monkeypatch.setattr(subprocess, "run", no_download)
    assert fetch_data.fetch_all(data_dir, log=no_download) == data_dir


def test_help_documents_every_flag():
    for action in build_parser()._actions:
        assert action.help, f"{action.dest} has no help"


def _fails(capsys, argv, message):
    assert main([*map(str, argv), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_bad_paths(capsys, tmp_path, tiny_bert_dir, models):
    _fails(capsys, [tmp_path / "nope", models / "all.onnx", "--tasks", "none"], "does not exist")
    _fails(capsys, [tiny_bert_dir, tmp_path / "none.onnx", "--tasks", "none"], "does not exist")
    (tmp_path / "text.onnx").write_text("hello")
    _fails(capsys, [tiny_bert_dir, tmp_path / "text.onnx", "--tasks", "none"], "is not an ONNX model")


def test_plain_onnx_is_not_a_moefy_model(capsys, tmp_path, tiny_bert_dir):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])),
              tmp_path / "plain.onnx")
    _fails(capsys, [tiny_bert_dir, tmp_path / "plain.onnx", "--tasks", "none"], "is not a moefy model")


def test_mismatched_dense_model(capsys, tmp_path, tiny_bert_dir, models):
    import torch
    from transformers import BertModel
    other = tmp_path / "other"
    torch.manual_seed(1)  # same shapes, other weights
    BertModel(BertModel.from_pretrained(tiny_bert_dir).config).save_pretrained(other)
    for f in tiny_bert_dir.glob("*"):
        if "token" in f.name or f.name == "vocab.txt":
            (other / f.name).write_bytes(f.read_bytes())
    _fails(capsys, [other, models / "all.onnx", "--tasks", "none"], "was not exported from this dense model")
    wide = tmp_path / "wide"
    cfg = BertModel.from_pretrained(tiny_bert_dir).config
    cfg.intermediate_size = 128
    BertModel(cfg).save_pretrained(wide)
    for f in tiny_bert_dir.glob("*"):
        if "token" in f.name or f.name == "vocab.txt":
            (wide / f.name).write_bytes(f.read_bytes())
    _fails(capsys, [wide, models / "all.onnx", "--tasks", "none"], "FFN width 64 in the ONNX model, 128")


def test_flag_errors(capsys, tiny_bert_dir, tmp_path):
    _fails(capsys, [tiny_bert_dir, "--curve", tmp_path, "--top-k", "2"], "--curve sets --top-k itself")
    _fails(capsys, [tiny_bert_dir, "--curve", tmp_path, "--experts", "4", "--shares", "0.3"],
           "not a whole number of experts")
    _fails(capsys, [tiny_bert_dir, "--curve", tmp_path, "--shares", "0.5,1.5"], "numbers in (0, 1], got '1.5'")
    _fails(capsys, [tiny_bert_dir, "--curve", tmp_path, "--calib", tmp_path / "none.txt"], "calibration file")
    _fails(capsys, [tiny_bert_dir, tmp_path / "x.onnx", "--tasks", "glue"], "unknown task(s) ['glue']")
    with pytest.raises(SystemExit) as e:
        main([str(tiny_bert_dir), str(tmp_path / "x.onnx"), "--router", "ls"])
    assert e.value.code == 2 and "go with --curve" in capsys.readouterr().err


def test_reads_the_exported_operators(models):
    config, calibration, layers = read_moe_onnx(models / "k1.onnx")
    assert config.top_k == 1 and len(layers) == config.num_layers == 2
    for op in layers:
        assert op.inputs["W1"].shape == (4, 16, 32) and op.inputs["unselected_bias"].shape == (4, 32)
        assert op(np.zeros((3, 32), np.float32)).shape == (3, 32)


@pytest.mark.skipif(not (FETCHED / datasets.WORDNET_NOUNS).exists(), reason="data not fetched: run `make data`")
def test_fetched_data_sets_parse(monkeypatch):
    monkeypatch.setenv("MOEFY_DATA_DIR", str(FETCHED))
    assert len(datasets.word_pairs("ws353")) == 353 and len(datasets.word_pairs("simlex")) == 999
    assert len(datasets.wordnet_glosses()) == 600
    assert len(datasets.fortunes()) > datasets.HELDOUT_FORTUNES + datasets.CALIB_FORTUNES


def test_curve_forwards_every_recipe_flag(tiny_bert_dir):
    """Recipe flags given to --curve reach the exports (none silently dropped)."""
    import argparse

    from exporter.eval_cli import _recipe
    r = _recipe(argparse.Namespace(dense_dir=str(tiny_bert_dir)),
                ["--split", "coact", "--shared-experts", "1", "--dynamic-k", "2", "--weights", "int8"])
    assert (r.split, r.shared_experts, r.dynamic_k, r.weights) == ("coact", 1, 2.0, "int8")


def test_decoder_fidelity_is_exact_with_every_expert_and_bounded_otherwise(tiny_model_dir, tmp_path, with_data):
    """moe-eval on a decoder: held-out perplexity ratio, next-token agreement and mean KL to dense through the
    exported graph; every expert kept gives the dense model back (issue 18 item 3)."""
    llama = tiny_model_dir("llama")
    export(llama, tmp_path / "all.onnx", experts=4, top_k=4, weights="float32", **QUIET)
    export(llama, tmp_path / "half", experts=4, top_k=2, **QUIET)  # an export directory works too
    evaluator = Evaluator(llama, **QUIET)  # labelled tasks are left out for decoders
    exact, half = evaluator(tmp_path / "all.onnx"), evaluator(tmp_path / "half")
    n = exact.next_token
    assert n["perplexity_ratio"] == pytest.approx(1, abs=1e-4) and n["next_token_agreement"] > 0.99
    assert n["mean_kl"] == pytest.approx(0, abs=1e-5) and n["tokens"] > 100
    assert all(f.router_recall == pytest.approx(1) for f in exact.layers)
    h = half.next_token
    assert h["next_token_agreement"] < 1 and h["mean_kl"] > 0 and half.cosine_mean is None and not half.tasks
    table = markdown_table([exact, half])
    assert "ppl ratio" in table and "next-token agree" in table


def test_decoder_curve(tiny_model_dir, tmp_path, capsys, with_data):
    """Without --shares a decoder's curve is 25/50/75% active (JSON + PNG), with perplexity ratio, next-token
    agreement and KL at each share."""
    out = tmp_path / "curve"
    assert main([str(tiny_model_dir("gpt2")), "--curve", str(out), "--experts", "4", "--quiet"]) == 0
    payload = json.loads((out / "curve.json").read_text())
    assert [r["active_share"] for r in payload["reports"]] == [0.25, 0.5, 0.75]
    assert all(r["next_token"]["tokens"] > 0 and {"perplexity_ratio", "next_token_agreement", "mean_kl"}
               <= set(r["next_token"]) for r in payload["reports"])
    assert (out / "curve.png").stat().st_size > 0
