"""--with-tokenizer: a model from strings to sentence embeddings (onnxruntime-extensions' tokenizer in front, pooling
and L2 normalisation behind) gives the embeddings of the Python path (HF tokenizer + session + NumPy pooling)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import runtime
from runtime import spec
from conftest import requires_cpp
from exporter import export
from exporter.cli import main as export_main
from exporter.embed_model import EmbeddingModelError, check_tokenizer, python_embeddings
from exporter.embed_model import main as embed_main

TEXTS = ["Where is the nearest train station?", "The cat sat on the mat.", "",
         "Crème brûlée in Zürich, 東京 and CAPITALS.", "word " * 400]  # the last one is cut at max_length


def strings_session(path, moefy_library: bool = True) -> ort.InferenceSession:
    """A plain ONNX Runtime session with onnxruntime-extensions' library (and moefy's) registered, as a host does."""
    import onnxruntime_extensions
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.register_custom_ops_library(onnxruntime_extensions.get_library_path())
    if moefy_library:
        so.register_custom_ops_library(runtime.library_path())
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def reference_embeddings(encoder_session, tokenizer, texts, max_length, pooling="mean"):
    """Written out here rather than reusing the exporter's: HF tokenizer, one text at a time, pooled in NumPy."""
    out = []
    for t in texts:
        b = tokenizer(t, truncation=True, max_length=max_length, return_tensors="np")
        feed = {i.name: b[i.name].astype(np.int64) for i in encoder_session.get_inputs()}
        h = encoder_session.run(["last_hidden_state"], feed)[0][0].astype(np.float64)
        e = h.mean(0) if pooling == "mean" else h[0]
        out.append(e / np.linalg.norm(e))
    return np.array(out)


@requires_cpp
def test_minilm_strings_give_the_python_path_embeddings(minilm_embed_export, minilm_export, minilm_dir):
    from transformers import AutoTokenizer
    model = onnx.load(minilm_embed_export)
    assert [i.name for i in model.graph.input] == ["text"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.STRING
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["moefy.embedding"])["max_length"] == 256  # sentence-transformers' max_seq_length
    # The encoder inside is the plain export's (same seed and recipe): the same weights.
    wrapped = {t.name: t for t in model.graph.initializer}
    for t in onnx.load(minilm_export).graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(wrapped[t.name]), numpy_helper.to_array(t))

    got = strings_session(minilm_embed_export).run(["sentence_embedding"], {"text": np.array(TEXTS, object)})[0]
    want = reference_embeddings(runtime.InferenceSession(str(minilm_export), backend="cpp", threads=1),
                                AutoTokenizer.from_pretrained(minilm_dir), TEXTS, 256)
    assert got.shape == (len(TEXTS), 384)
    assert np.abs(got - want).max() <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    empty = strings_session(minilm_embed_export).run(None, {"text": np.array([], object)})[0]
    assert empty.shape == (0, 384)


def test_cli_standard_target_runs_without_moefy_library(tiny_bert_dir, tmp_path, capsys):
    """--target standard needs only onnxruntime-extensions' library; sentence-transformers' settings (pooling,
    max_seq_length) are read from the model directory."""
    from transformers import AutoTokenizer
    d = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, d)
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                             "pooling_mode_mean_tokens": False}))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8}))
    out, plain = tmp_path / "embed.onnx", tmp_path / "plain.onnx"
    common = ["--experts", "4", "--top-k", "2", "--target", "standard", "--quiet"]
    assert export_main([str(d), str(out), *common, "--with-tokenizer"]) == 0
    assert "'text' [N] -> 'sentence_embedding' [N, 32]" in capsys.readouterr().out
    assert export_main([str(d), str(plain), *common]) == 0
    assert not any(o.domain == spec.DOMAIN for o in onnx.load(out).opset_import)

    texts = ["the cat is on a mat", "a b c d e f g h i j k l", "?"]
    got = strings_session(out, moefy_library=False).run(None, {"text": np.array(texts, object)})[0]
    enc = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"])
    want = reference_embeddings(enc, AutoTokenizer.from_pretrained(d), texts, 8, pooling="cls")
    assert np.abs(got - want).max() <= 1e-4
    np.testing.assert_allclose(python_embeddings(enc, AutoTokenizer.from_pretrained(d), texts, max_length=8,
                                                 pooling="cls"), want, atol=1e-6)


def test_bad_settings_fail_before_the_work_and_write_nothing(tiny_bert_dir, tmp_path, capsys):
    d = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, d)
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    out = tmp_path / "embed.onnx"
    assert export_main([str(d), str(out), "--experts", "4", "--top-k", "2", "--with-tokenizer", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "moe-export: error:" in err and "asks for pooling max; supported: mean, cls" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    with pytest.raises(EmbeddingModelError, match="only WordPiece"):
        check_tokenizer(type("GPT2TokenizerFast", (), {})())
    assert embed_main([str(tmp_path / "missing.onnx"), str(d), str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: encoder model" in err and "does not exist" in err and not out.exists()


def test_wrap_an_existing_export(tiny_bert_dir, tmp_path, capsys):
    """python -m exporter.embed_model wraps a file exported before (custom target: both libraries)."""
    from transformers import AutoTokenizer
    enc, out = tmp_path / "enc.onnx", tmp_path / "embed.onnx"
    export(tiny_bert_dir, enc, experts=4, top_k=2, progress=False, log=lambda *a: None)
    if not runtime.cpp_available():
        pytest.skip("C++ op library not built")
    assert embed_main([str(enc), str(tiny_bert_dir), str(out)]) == 0
    assert "at most 64 tokens per text" in capsys.readouterr().out  # the model's max_position_embeddings
    texts = ["the fox and the dog", "it is"]
    got = strings_session(out).run(None, {"text": np.array(texts, object)})[0]
    want = reference_embeddings(runtime.InferenceSession(str(enc), backend="cpp"),
                                AutoTokenizer.from_pretrained(tiny_bert_dir), texts, 64)
    assert np.abs(got - want).max() <= 1e-4


def test_directory_for_stock_onnxruntime_optimum_and_strings(tiny_bert_dir, tmp_path, capsys):
    """An export directory with --target ort-moe --with-tokenizer: optimum loads model.onnx with no custom-op
    library, and sentence_embedding.onnx beside it turns strings into the same embeddings."""
    import torch
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from transformers import AutoTokenizer
    out = tmp_path / "export"
    assert export_main([str(tiny_bert_dir), str(out), "--experts", "4", "--top-k", "2", "--target", "ort-moe",
                        "--with-tokenizer", "--quiet"]) == 0
    assert "sentence_embedding.onnx: strings 'text' [N] -> 'sentence_embedding' [N, 32]" in capsys.readouterr().out
    info = json.loads((out / "moefy.json").read_text())
    assert info["target"] == "ort-moe" and info["sentence_embedding"]["file"] == "sentence_embedding.onnx"

    ort_model = ORTModelForFeatureExtraction.from_pretrained(out)  # stock session options
    tok = AutoTokenizer.from_pretrained(out)
    texts = ["the cat is on a mat", "it is for you"]
    want = []
    for t in texts:
        b = tok(t, return_tensors="pt")
        with torch.no_grad():
            h = ort_model(**{k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).last_hidden_state
        e = h[0].numpy().astype(np.float64).mean(0)
        want.append(e / np.linalg.norm(e))
    got = strings_session(out / "sentence_embedding.onnx", moefy_library=False).run(
        None, {"text": np.array(texts, object)})[0]
    assert np.abs(got - np.array(want)).max() <= 1e-4
