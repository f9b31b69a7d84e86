"""Generation (moefy's streaming API and moe-generate) and every bad input of the decoder path: a clear error,
exit code 2, and no partial output directory."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from conftest import BACKEND, QUIET

import runtime
from exporter import export
from exporter.cli import main as export_main
from runtime.generate import main as generate_main


def test_stream_yields_the_greedy_tokens_as_text(exported):
    out, _, _ = exported("llama")
    gen = runtime.Generator(out, BACKEND, threads=1)
    ids = gen.encode("the cat is on a mat")
    tokens = [t for t in runtime.DecoderSession(out, BACKEND).greedy(ids, 10, eos_token_id=gen.eos_token_id)
              if t not in gen.eos_token_id]
    text = "".join(gen.stream("the cat is on a mat", 10))
    assert text == gen.tokenizer.decode(tokens, skip_special_tokens=True)
    assert gen.stats.prompt_tokens == len(ids) and gen.stats.decode_tokens <= 9


def test_moe_generate_cli(exported, capsys):
    out, _, _ = exported("llama")
    assert generate_main([str(out), "a dog and", "--max-new-tokens", "6", "--chat", "--threads", "1",
                          "--backend", BACKEND]) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err and "prefill" in captured.err
    chat = runtime.Generator(out, BACKEND)("a dog and", 6, chat=True)
    assert captured.out == chat + "\n"


def test_prompt_longer_than_the_context(exported, capsys):
    out, _, _ = exported("llama")
    long = "the cat " * 100  # the tiny model has 128 positions
    assert generate_main([str(out), long, "--max-new-tokens", "4", "--backend", BACKEND]) == 2
    assert "more than the model's context of 128 positions" in capsys.readouterr().err


def test_past_of_the_wrong_shape(exported):
    out, _, _ = exported("llama")
    dec = runtime.DecoderSession(out, BACKEND)
    past = dec.empty_past(1)
    past["past_key_values.0.key"] = np.zeros((1, dec.kv_heads + 1, 0, dec.head_dim), np.float32)
    with pytest.raises(runtime.InvalidInputError, match="input 'past_key_values.0.key' must be a float32 array of rank 4"):
        dec.step(np.ones((1, 3), np.int64), np.ones((1, 3), np.int64), past)
    past = {k: np.zeros((1, dec.kv_heads, 2, dec.head_dim), np.float32) for k in dec.empty_past(1)}
    with pytest.raises(runtime.InvalidInputError, match=r"attention_mask must be \[batch, past \+ new tokens\]"):
        dec.step(np.ones((1, 3), np.int64), np.ones((1, 3), np.int64), past)  # the mask forgets the 2 cached


def test_generate_needs_a_decoder_export_with_a_tokenizer(exported, tmp_path, capsys):
    out, _, _ = exported("llama")
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    assert generate_main([str(bare), "hello", "--backend", BACKEND]) == 2
    assert "has no usable tokenizer" in capsys.readouterr().err
    encoder, _, _ = exported("distilbert")
    assert generate_main([str(encoder), "hello", "--backend", BACKEND]) == 2
    assert "is not a text-generation model with a KV cache" in capsys.readouterr().err


def assert_no_output(tmp_path, name="out"):
    assert not (tmp_path / name).exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(f".{name}")]  # no temporary leftovers


def test_model_without_a_tokenizer(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir("llama"), src)
    for f in list(src.glob("tokenizer*")) + list(src.glob("special_tokens*")) + list(src.glob("chat_template*")):
        f.unlink()
    assert export_main([str(src), str(tmp_path / "out"), "--experts", "4", "--top-k", "2"]) == 2
    assert "cannot load a tokenizer from" in capsys.readouterr().err
    assert_no_output(tmp_path)


def _gguf(path, arch: str):
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_tensor("token_embd.weight", np.zeros((10, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch,message", [
    ("bloom", "architecture 'bloom' is not supported yet; supported: bert, distilbert, gpt2, llama"),
    ("foo", "GGUF architecture 'foo' is not supported; moefy converts bert"),
])
def test_gguf_of_an_unsupported_architecture(tmp_path, capsys, arch, message):
    assert export_main([str(_gguf(tmp_path / f"{arch}.gguf", arch)), str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert_no_output(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_gguf(tmp_path, capsys, keep):
    data = _gguf(tmp_path / "whole.gguf", "llama").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: int(len(data) * keep)])
    assert export_main([str(tmp_path / "cut.gguf"), str(tmp_path / "out")]) == 2
    assert "is not a readable GGUF file (truncated or corrupt?)" in capsys.readouterr().err
    assert_no_output(tmp_path)


def test_not_a_gguf_file(tmp_path, capsys):
    (tmp_path / "model.bin").write_bytes(b"\0" * 100)
    assert export_main([str(tmp_path / "model.bin"), str(tmp_path / "out")]) == 2
    assert "is a file but not a .gguf file" in capsys.readouterr().err


def test_failed_decoder_validation_leaves_no_directory(tiny_model_dir, tmp_path, capsys):
    assert export_main([str(tiny_model_dir("gpt2")), str(tmp_path / "out"), "--experts", "4", "--top-k", "2",
                        "--rtol", "-1", "--backend", BACKEND]) == 2
    assert "nothing was written" in capsys.readouterr().err
    assert_no_output(tmp_path)


def test_existing_directory_is_replaced_only_if_it_is_an_export(tiny_model_dir, tmp_path, capsys):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    assert export_main([str(tiny_model_dir("opt")), str(other), "--experts", "4", "--top-k", "2"]) == 2
    assert "exists and is not a moefy export directory" in capsys.readouterr().err
    assert (other / "mine.txt").read_text() == "keep me"
    out = tmp_path / "out"
    for k in (2, 1):  # the second export replaces the first
        export(tiny_model_dir("opt"), out, experts=4, top_k=k, backend=BACKEND, **QUIET)
    import json
    assert json.loads((out / "moefy.json").read_text())["moe"]["top_k"] == 1
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


def test_a_tie_on_every_texts_first_token_still_validates(tiny_model_dir, tmp_path, monkeypatch):
    """Every token counted as a near tie (as at a chat template's first token, which every prompt shares): the
    tokens where ONNX and PyTorch agree anyway are validated, and the export goes through (it used to be refused
    with "every validation text starts with a near-tied routing decision")."""
    import exporter.tasks.base as base
    import exporter.tasks.decoder as decoder
    monkeypatch.setattr(base, "TIE_MARGIN", float("inf"))
    monkeypatch.setattr(decoder, "TIE_MARGIN", float("inf"))
    report = export(tiny_model_dir("llama"), tmp_path / "out", experts=4, top_k=2, genai="off", backend=BACKEND,
                    **QUIET)
    assert report.max_rel_diff <= 1e-4 and report.validated_on > 0


def test_a_tie_on_every_first_token_and_wrong_logits_fail(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import exporter.tasks.base as base
    from runtime.generate import DecoderSession
    monkeypatch.setattr(base, "TIE_MARGIN", float("inf"))
    logits = DecoderSession.logits
    monkeypatch.setattr(DecoderSession, "logits", lambda self, *a: logits(self, *a) + 1.0)
    assert export_main([str(tiny_model_dir("llama")), str(tmp_path / "out"), "--experts", "4", "--top-k", "2",
                        "--genai", "off", "--backend", BACKEND]) == 2
    assert "near-tied routing decision at its first token and the ONNX logits differ" in capsys.readouterr().err
    assert_no_output(tmp_path)


def test_instruct_models_also_calibrate_on_chat_turns(tiny_model_dir):
    """A tokenizer with a chat template: every second default calibration text becomes a one-turn chat (the text
    before it as the user's message), with one BOS whether or not the tokenizer adds its own; without: unchanged."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    from exporter.tasks.decoder import TextGeneration
    tok = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    texts = ["one", "two", "three", "four", "five"]
    got, change = TextGeneration().default_calibration(tok, texts)
    assert got == ["one", "<s>user: one</s><s>assistant: two</s>", "three", "<s>user: three</s><s>assistant: four</s>",
                   "five"]
    assert "chat" in change
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    got, _ = TextGeneration().default_calibration(tok, texts)
    assert tok(got[1]).input_ids[:2].count(bos) == 1 and tok(got[1]).input_ids[0] == bos
    tok.chat_template = None
    assert TextGeneration().default_calibration(tok, texts) == (texts, "")


def test_stats_without_a_decode_step_say_so():
    """An answer that ends with the prompt's call (end-of-sequence first, or one new token) prints no 'nan tokens/s'."""
    from runtime.generate import GenerationStats
    stats = GenerationStats()
    stats.record(0, 37, 0.18)
    assert "nan" not in stats.summary() and "no decode step" in stats.summary()
    stats.record(1, 1, 0.05)
    assert stats.summary().endswith("decode 1 tokens at 20.0 tokens/s")
