"""moefy's onnxruntime-genai layout (exporter/genai_layout.py): the model builder's graph with SparseExpertFFN
as every MLP, loaded and run by onnxruntime-genai.

Parity without a MoEfied model: with every expert on (top_k = E, no unselected_bias) the experts add up to the
dense MLP, so the layout must match the builder's own dense model; with top_k < E it must match a PyTorch
forward of the same model whose MLPs are the operator's NumPy reference. Needs the builder's environment
(`make genai-venv`) and onnxruntime-genai; skipped without them. The real SmolLM2 test also needs its GGUF.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime import spec
from runtime.reference import sparse_expert_ffn

og = pytest.importorskip("onnxruntime_genai")
from exporter.genai_layout import GenaiLayoutError, builder_python, export_genai, greedy  # noqa: E402

try:
    builder_python()
    HAVE_BUILDER = True
except FileNotFoundError:
    HAVE_BUILDER = False
pytestmark = [pytest.mark.skipif(not HAVE_BUILDER, reason="no model builder environment (make genai-venv)"),
              pytest.mark.skipif(not runtime.cpp_available(), reason="C++ op library not built")]

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1,
            tie_word_embeddings=False, hidden_act="silu")
EXPERTS = 8
PROMPT = [5, 17, 42, 99, 7, 250, 3, 64]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A seeded tiny LLaMA (SwiGLU, grouped-query attention) with a byte-level BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY["vocab_size"], special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the capital of france is paris", "a tiny model for tests"] * 8, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**TINY, "vocab_size": len(fast)}, bos_token_id=0, eos_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def contiguous_experts(model_dir: Path, *, top_k: int, seed: int = 0, weights: str = "float32") -> list[dict]:
    """Each layer's SwiGLU FFN as EXPERTS contiguous blocks of neurons, with a random router."""
    from safetensors.numpy import load_file
    sd = load_file(model_dir / "model.safetensors")
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(TINY["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp."
        up, gate, down = sd[p + "up_proj.weight"], sd[p + "gate_proj.weight"], sd[p + "down_proj.weight"]
        E, d = EXPERTS, up.shape[1]
        layer = {"W1": up.reshape(E, -1, d), "Wg": gate.reshape(E, -1, d), "W2": down.T.reshape(E, -1, d).copy(),
                 "router_w": rng.standard_normal((E, d)).astype(np.float32), "top_k": top_k, "activation": "silu"}
        if weights == "float16":
            layer.update({n: layer[n].astype(np.float16) for n in spec.SCALES})
        if weights == "int8":
            from exporter.quantize import quantize_experts
            layer = {**quantize_experts({k: v for k, v in layer.items() if isinstance(v, np.ndarray)}),
                     "top_k": top_k, "activation": "silu"}
        layers.append(layer)
    return layers


def generate(model_dir: Path, prompt=PROMPT, new_tokens=NEW_TOKENS) -> tuple[list[int], np.ndarray]:
    return greedy(model_dir, prompt, new_tokens)


def reference_logits(model_dir: Path, layers: list[dict], tokens: list[int]) -> np.ndarray:
    """PyTorch forward of the dense model with each MLP replaced by the operator's NumPy reference:
    logits at every position of ``tokens``."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for layer, ops in zip(model.model.layers, layers):
        inputs = {k: v for k, v in ops.items() if isinstance(v, np.ndarray)}
        attrs = {k: v for k, v in ops.items() if not isinstance(v, np.ndarray) and k != "lowrank"}
        a, b, c = ops.get("lowrank", (np.zeros((1, TINY["hidden_size"]), np.float32),) * 2 + (0.0,))
        layer.mlp.forward = (lambda x, inputs=inputs, attrs=attrs, a=a, b=b, c=c: torch.from_numpy(
            sparse_expert_ffn({**inputs, "X": x.numpy()}, **attrs) + (x.numpy() @ a.T) @ b + c))
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def dense(tiny_llama, tmp_path_factory) -> Path:
    return export_genai(tiny_llama, None, tmp_path_factory.mktemp("g") / "dense", progress=False)


def test_the_low_rank_stand_in_goes_beside_the_operator(tiny_llama, tmp_path):
    """--lowrank's (X A^T) B + c: standard MatMuls beside each layer's node, matching the reference forward."""
    rng = np.random.default_rng(1)
    d = TINY["hidden_size"]
    layers = [{**layer, "lowrank": tuple(rng.standard_normal(s).astype(np.float32) * 0.1 for s in ((4, d), (4, d), (d,)))}
              for layer in contiguous_experts(tiny_llama, top_k=2)]
    out = export_genai(tiny_llama, layers, tmp_path / "moe", progress=False)
    import onnx
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    per_layer = 2 * TINY["num_hidden_layers"]
    assert sorted(n.op_type for n in graph.node if "/mlp/lowrank/" in n.name) == ["Add"] * per_layer + ["MatMul"] * per_layer
    tokens, logits = generate(out)
    ref = reference_logits(tiny_llama, layers, PROMPT + tokens[:-1])[len(PROMPT) - 1:]
    assert max_rel(logits, ref) < 1e-4
    assert tokens == [int(t) for t in ref.argmax(-1)]
    bad = [{**layers[0], "lowrank": layers[0]["lowrank"][:2]}, layers[1]]
    with pytest.raises(GenaiLayoutError, match=f"layer 0: lowrank must be \\(A \\[R, {d}\\], B \\[R, {d}\\], c \\[{d}\\]\\)"):
        export_genai(tiny_llama, bad, tmp_path / "bad", progress=False)


def test_all_experts_match_the_builders_dense_model(tiny_llama, dense, tmp_path):
    out = export_genai(tiny_llama, contiguous_experts(tiny_llama, top_k=EXPERTS), tmp_path / "moe", progress=False)
    cfg = json.loads((out / "genai_config.json").read_text())
    library = cfg["model"]["decoder"]["session_options"]["custom_ops_library"]
    assert (out / library).is_file() and not os.path.isabs(library)
    tokens, logits = generate(out)
    dense_tokens, dense_logits = generate(dense)
    assert tokens == dense_tokens
    assert max_rel(logits, dense_logits) < 1e-4


@pytest.mark.parametrize("weights", ["float32", "float16", "int8"])
def test_top_k_matches_the_reference_forward(tiny_llama, tmp_path, weights):
    layers = contiguous_experts(tiny_llama, top_k=2, weights=weights)
    out = export_genai(tiny_llama, layers, tmp_path / "moe", progress=False)
    import onnx
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    ops = [n for n in graph.node if n.op_type == spec.OP_TYPE]
    assert len(ops) == TINY["num_hidden_layers"] and all(n.domain == spec.DOMAIN for n in ops)
    assert not [n.name for n in graph.node if "/mlp/" in n.name and n.op_type != spec.OP_TYPE]
    tokens, logits = generate(out)
    ref = reference_logits(tiny_llama, layers, PROMPT + tokens[:-1])[len(PROMPT) - 1:]
    assert max_rel(logits, ref) < 1e-4
    assert tokens == [int(t) for t in ref.argmax(-1)]


def test_int4_dense_parts_generate(tiny_llama, tmp_path):
    out = export_genai(tiny_llama, contiguous_experts(tiny_llama, top_k=2), tmp_path / "moe", precision="int4",
                       progress=False)
    import onnx
    ops = {n.op_type for n in onnx.load(out / "model.onnx", load_external_data=False).graph.node}
    assert {"MatMulNBits", spec.OP_TYPE} <= ops
    layers = contiguous_experts(tiny_llama, top_k=2)
    tokens, logits = generate(out)
    ref = reference_logits(tiny_llama, layers, PROMPT + tokens[:-1])[len(PROMPT) - 1:]
    # int4 attention and LM head (blocks of 32 over this tiny model's d=64): near the float32 reference (measured
    # correlation 0.91-0.98 per step), not equal
    assert np.isfinite(logits).all() and min(np.corrcoef(a, b)[0, 1] for a, b in zip(logits, ref)) > 0.8


# ----------------------------------------------------------------------------- bad input
def test_wrong_layer_count_is_refused_and_nothing_written(tiny_llama, tmp_path):
    layers = contiguous_experts(tiny_llama, top_k=2)[:1]
    with pytest.raises(GenaiLayoutError, match=r"1 layers of operator inputs given, .* has 2"):
        export_genai(tiny_llama, layers, tmp_path / "moe", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_wrong_width_is_refused(tiny_llama, tmp_path):
    layers = contiguous_experts(tiny_llama, top_k=2)
    layers = [{k: (v[..., :32].copy() if isinstance(v, np.ndarray) else v) for k, v in layer.items()}
              for layer in layers]
    with pytest.raises(GenaiLayoutError, match=r"width d=32, the model's hidden size is 64"):
        export_genai(tiny_llama, layers, tmp_path / "moe", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change, message", [
    (lambda l: {**l, "top_k": 0}, r"layer 0: .*top_k must be an integer in \[1, E=8\]"),
    (lambda l: {**l, "router_scores": l["router_w"]}, r"layer 0: unknown keys \['router_scores'\]"),
    (lambda l: {k: v for k, v in l.items() if k != "router_w"}, r"layer 0: .*exactly one of router_w"),
    (lambda l: {**l, "W2": l["W2"][:4]}, r"layer 0: .*W2 must have shape \[8, 16, 64\]"),
])
def test_bad_operator_inputs_are_refused_before_the_build(tiny_llama, tmp_path, change, message):
    layers = contiguous_experts(tiny_llama, top_k=2)
    layers[0] = change(layers[0])
    with pytest.raises(GenaiLayoutError, match=message):
        export_genai(tiny_llama, layers, tmp_path / "moe", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_failing_check_leaves_nothing(tiny_llama, tmp_path):
    def check(model_dir):
        assert (model_dir / "genai_config.json").is_file()
        raise ValueError("validation failed")
    with pytest.raises(ValueError, match="validation failed"):
        export_genai(tiny_llama, contiguous_experts(tiny_llama, top_k=2), tmp_path / "moe", check=check,
                     progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_source_precision_and_existing_output(tiny_llama, tmp_path):
    with pytest.raises(GenaiLayoutError, match="neither a .gguf file nor a Hugging Face directory"):
        export_genai(tmp_path, None, tmp_path / "out")
    with pytest.raises(GenaiLayoutError, match="precision must be one of fp32, int4, int8"):
        export_genai(tiny_llama, None, tmp_path / "out", precision="fp16")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_genai(tiny_llama, None, tmp_path / "out")


# ----------------------------------------------------------------------------- the real SmolLM2
CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "user", "content": "Write a haiku about the sea."}]


def test_moe_export_directory_generates_in_optimum_genai_and_moe_generate(tiny_llama, tmp_path):
    """`moe-export` of a decoder to a directory: optimum's layout and, with --genai, onnxruntime-genai's beside it
    (genai_config.json on top, its model in genai/), both greedy like the PyTorch MoEfied model (here with the
    low-rank stand-in, which both layouts put beside the operator)."""
    from exporter import convert, export
    from exporter.tasks.decoder import torch_greedy
    from runtime.generate import DecoderSession
    out = tmp_path / "out"
    report = export(tiny_llama, out, experts=EXPERTS, top_k=2, lowrank=8, genai="fp32", progress=False,
                    log=lambda *a: None)
    assert (out / "genai_config.json").is_file() and (out / "genai" / "model.onnx").is_file()
    info = json.loads((out / "moefy.json").read_text())
    assert info["genai"]["precision"] == "fp32" and info["genai"]["identical"] == info["genai"]["prompts"]
    assert any("onnxruntime-genai layout" in line for line in report.lines)
    converted = convert(tiny_llama, experts=EXPERTS, top_k=2, lowrank=8, progress=False, log=lambda *a: None)
    with converted.patched():
        want, tie = torch_greedy(converted.model, converted.moes, PROMPT, NEW_TOKENS, 1e-4)
    got, _ = greedy(out, PROMPT, NEW_TOKENS)
    assert tie is not None or got == want[:len(got)]
    assert list(DecoderSession(out).greedy(PROMPT, len(got))) == got
    from optimum.onnxruntime import ORTModelForCausalLM
    import torch
    model = ORTModelForCausalLM.from_pretrained(out, session_options=runtime.session_options(threads=1))
    # up to len(got) tokens: optimum stops at EOS as onnxruntime-genai does (the 6th token here)
    optimum_tokens = model.generate(torch.tensor([PROMPT]), max_new_tokens=len(got), do_sample=False)[0, len(PROMPT):]
    assert optimum_tokens.tolist() == got
    from runtime.generate import Generator, main as generate_main
    fast, slow = Generator(out, threads=1), Generator(out, threads=1, layout="onnx")
    assert fast.layout == "genai" and slow.layout == "onnx"
    assert list(fast.generate_ids(PROMPT, len(got))) == list(slow.generate_ids(PROMPT, len(got)))[:len(got)]
    assert fast.stats.prompt_tokens == len(PROMPT) and fast.stats.decode_tokens >= 1
    with pytest.raises(ValueError, match="--backend and session options apply to --layout onnx only"):
        Generator(out, "numba", layout="genai")
    assert generate_main([str(out), "the capital", "--max-new-tokens", "4", "--layout", "genai"]) == 0


def test_moe_generate_genai_layout_needs_the_directory_to_have_it(exported, capsys):
    from runtime.generate import main as generate_main
    out, _, _ = exported("llama")  # exported with genai="off"
    assert generate_main([str(out), "hi", "--layout", "genai"]) == 2
    assert "has no genai_config.json; export with moe-export --genai" in capsys.readouterr().err


def test_genai_option_errors_before_the_work(tiny_llama, tmp_path, capsys):
    from exporter.cli import main
    assert main([str(tiny_llama), str(tmp_path / "m.onnx"), "--experts", str(EXPERTS), "--genai", "fp32"]) == 2
    assert "--genai builds onnxruntime-genai's layout of a decoder exported to a directory" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_smollm2_all_experts_generate_as_the_dense_model(tmp_path):
    """SmolLM2-135M (GGUF): 32 experts of 48 neurons, all on; greedy 32 tokens as the builder's dense fp32
    model (and the answer names Paris)."""
    from exporter.genai_layout import dequantize_gguf
    from exporter.models import smollm2_gguf
    try:
        gguf = smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    hf = dequantize_gguf(gguf, tmp_path / "hf", progress=False)
    from safetensors.numpy import load_file
    sd = load_file(hf / "model.safetensors")
    layers, rng = [], np.random.default_rng(0)
    for i in range(30):
        p = f"model.layers.{i}.mlp."
        up, gate, down = sd[p + "up_proj.weight"], sd[p + "gate_proj.weight"], sd[p + "down_proj.weight"]
        layers.append({"W1": up.reshape(32, 48, -1), "Wg": gate.reshape(32, 48, -1),
                       "W2": down.T.reshape(32, 48, -1).copy(), "router_w": rng.standard_normal((32, 576), np.float32),
                       "top_k": 32, "activation": "silu"})
    del sd
    moe = export_genai(hf, layers, tmp_path / "moe", progress=False)
    dense = export_genai(hf, None, tmp_path / "dense", progress=False)
    tokenizer = og.Tokenizer(og.Model(str(dense)))
    for message in CHAT:
        prompt = tokenizer.encode(tokenizer.apply_chat_template(json.dumps([message]), add_generation_prompt=True))
        tokens, logits = generate(moe, list(prompt), 32)
        dense_tokens, dense_logits = generate(dense, list(prompt), 32)
        assert tokens == dense_tokens
        assert max_rel(logits, dense_logits) < 1e-4
        if "France" in message["content"]:
            assert "Paris" in tokenizer.decode(np.asarray(tokens, np.int32))
