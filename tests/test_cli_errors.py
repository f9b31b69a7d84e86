"""The CLI end to end, and every bad input the issue names: a clear error, exit code 2, no output file."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import SESSION_BACKENDS

import runtime
from exporter.cli import build_parser, main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "exporter.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_cli_end_to_end(tiny_bert_dir, tmp_path):
    out = tmp_path / "m.onnx"
    r = run_cli(tiny_bert_dir, out, "--experts", 4, "--top-k", 1, "--backend", "numba-split")
    assert r.returncode == 0, r.stderr
    assert out.is_file()
    assert "4 x 16 neurons, top-k 1: 25.0% of FFN parameters active per token" in r.stdout
    assert "max rel diff" in r.stdout and "cosine to the dense model" in r.stdout
    assert "splitting FFNs into experts" in r.stderr  # progress


def test_help_documents_every_flag():
    text = build_parser().format_help()
    for action in build_parser()._actions:
        assert action.help, f"{action.dest} has no help"
        for flag in action.option_strings:
            assert flag in text


def assert_fails_cleanly(capsys, tmp_path, argv, message):
    out = tmp_path / "out.onnx"
    assert main([*map(str, argv[:1]), str(out), *map(str, argv[1:])]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert os.listdir(tmp_path) == [p for p in os.listdir(tmp_path) if p != "out.onnx" and ".tmp" not in p]


def test_missing_model_dir(capsys, tmp_path):
    assert_fails_cleanly(capsys, tmp_path, [tmp_path / "nope"], "does not exist")


def test_model_dir_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_fails_cleanly(capsys, tmp_path, [tmp_path / "empty"], "has no config.json")


def test_unreadable_weights(capsys, tmp_path, tiny_bert_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_bert_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert_fails_cleanly(capsys, tmp_path, [broken], "cannot load the model in")


def test_unsupported_architecture_names_supported_ones(capsys, tmp_path):
    from exporter.arch import supported
    d = tmp_path / "t5"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert_fails_cleanly(capsys, tmp_path, [d], f"architecture 't5' is not supported yet; supported: "
                                                f"{', '.join(supported())}")
    assert {"bert", "roberta", "distilbert", "gpt2", "opt", "llama", "qwen2", "mistral"} <= set(supported())


def test_top_k_larger_than_experts(capsys, tmp_path, tiny_bert_dir):
    assert_fails_cleanly(capsys, tmp_path, [tiny_bert_dir, "--experts", 4, "--top-k", 5],
                         "--top-k must be between 1 and --experts (4)")


def test_experts_must_divide_ffn_width(capsys, tmp_path, tiny_bert_dir):
    assert_fails_cleanly(capsys, tmp_path, [tiny_bert_dir, "--experts", 5, "--top-k", 1],
                         "--experts must divide the FFN width 64")


def test_missing_calibration_file(capsys, tmp_path, tiny_bert_dir):
    assert_fails_cleanly(capsys, tmp_path, [tiny_bert_dir, "--calib", tmp_path / "none.txt"], "calibration file")


def test_failed_validation_leaves_no_file(capsys, tmp_path, tiny_bert_dir):
    assert_fails_cleanly(capsys, tmp_path, [tiny_bert_dir, "--experts", 4, "--top-k", 2, "--rtol", "-1"],
                         "nothing was written")


@pytest.fixture(scope="module")
def tiny_session_model(tiny_bert_dir, tmp_path_factory):
    from exporter import export
    out = tmp_path_factory.mktemp("sess") / "m.onnx"
    export(tiny_bert_dir, out, experts=4, top_k=2, backend="numba-split", progress=False, log=lambda *a: None)
    return out


@pytest.mark.parametrize("backend", SESSION_BACKENDS)
@pytest.mark.parametrize("change,message", [
    (lambda f: f.update(input_ids=f["input_ids"].astype(np.float32)), "input 'input_ids' must be a int64 array"),
    (lambda f: f.update(input_ids=f["input_ids"][0]), "of rank 2"),
    (lambda f: f.pop("token_type_ids"), "missing ['token_type_ids']"),
    (lambda f: f.update(extra=f["input_ids"]), "unexpected ['extra']"),
])
def test_session_rejects_wrong_dtype_rank_and_names(tiny_session_model, backend, change, message):
    sess = runtime.InferenceSession(tiny_session_model, backend=backend)
    feed = {"input_ids": np.ones((1, 4), np.int64), "attention_mask": np.ones((1, 4), np.int64),
            "token_type_ids": np.zeros((1, 4), np.int64)}
    change(feed)
    with pytest.raises(runtime.InvalidInputError) as e:
        sess.run(None, feed)
    assert message in str(e.value)


def test_unknown_backend_and_missing_model(tiny_session_model, tmp_path):
    with pytest.raises(ValueError, match="backend must be one of auto, cpp, numba, numba-split"):
        runtime.InferenceSession(tiny_session_model, backend="gpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runtime.InferenceSession(tmp_path / "none.onnx")


def test_long_calibration_file_is_cut_and_says_so(tiny_bert_dir, tmp_path):
    from exporter.text import CALIB_LINES
    calib = tmp_path / "calib.txt"
    calib.write_text("".join(f"line {i} of some calibration text\n" for i in range(CALIB_LINES + 5)))
    logs = []
    from exporter import export
    export(tiny_bert_dir, tmp_path / "m.onnx", experts=8, top_k=2, router="ls", correction="mean", calib=calib,
           backend="numba-split", progress=False, log=logs.append)
    assert f"--calib: using the first {CALIB_LINES} of its {CALIB_LINES + 5} lines" in logs
    logs.clear()
    export(tiny_bert_dir, tmp_path / "m20.onnx", experts=8, top_k=2, router="ls", correction="mean", calib=calib,
           calib_texts=20, backend="numba-split", progress=False, log=logs.append)
    assert f"--calib: using the first 20 of its {CALIB_LINES + 5} lines" in logs
    assert any(line.startswith("calibrating on 20 texts") for line in logs)
