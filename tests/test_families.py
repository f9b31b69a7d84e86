"""Every supported family on a tiny seeded model: export (a directory optimum loads as it is), then generate or
embed with parity to the PyTorch MoEfied model, through moefy's runtime and through optimum."""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import BACKEND, DECODER_FAMILIES, ENCODER_FAMILIES, QUIET, available_backends, requires_cpp

import runtime
from exporter import export
from exporter.arch import adapter_for
from exporter.moe_ffn import MoEFFN
from exporter.source import load_model
from exporter.tasks import task_for
from runtime import spec

def moefied(saved):
    """The saved MoEfied model with its MoE FFNs installed, in PyTorch."""
    from exporter.moefy import install_moe
    model, tok, adapter, cfg, routers = load_model(saved)
    install_moe(model, adapter, cfg, routers)
    return model, tok, adapter


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_decoder_exports_in_optimums_layout(exported, family):
    out, report, _ = exported(family)
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json", "moefy.json"} <= {
        p.name for p in out.iterdir()}
    m = onnx.load(out / "model.onnx")
    layers = report.config.num_layers
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert sorted(i.name for i in m.graph.input) == sorted(["input_ids", "attention_mask", "position_ids", *past])
    assert [o.name for o in m.graph.output] == ["logits"] + [f"present.{i}.{kv}" for i in range(layers)
                                                            for kv in ("key", "value")]
    nodes = [n for n in m.graph.node if n.domain == spec.DOMAIN]
    assert len(nodes) == layers
    gated = adapter_for(report.config.model_type).gate is not None
    assert report.config.gated == gated
    wg = [p.name for p in spec.INPUTS].index("Wg")
    assert all((len(n.input) > wg and bool(n.input[wg])) == gated for n in nodes)
    assert {o.domain: o.version for o in m.opset_import}[spec.DOMAIN] == spec.VERSION
    assert report.max_rel_diff <= 1e-4 and report.metrics["greedy_identical"] + report.metrics["greedy_tied"] == 8
    info = json.loads((out / "moefy.json").read_text())
    assert info["moe"]["experts"] == 4 and info["recipe"]["top_k"] == 2


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_decoder_generates_as_pytorch_on_every_backend(exported, family):
    """Greedy tokens of the export (moefy's runtime, KV cache) = the PyTorch MoEfied model's (its own cache)."""
    out, _, saved = exported(family)
    model, tok, _ = moefied(saved)
    prompt = tok("the cat is on a mat and")["input_ids"]
    want = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    for backend in available_backends():
        got = list(runtime.DecoderSession(out, backend).greedy(prompt, 12))
        assert got == want, backend


@requires_cpp
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_optimum_loads_the_decoder_directory_as_it_is(exported, family):
    from optimum.onnxruntime import ORTModelForCausalLM
    out, _, saved = exported(family)
    ort_model = ORTModelForCausalLM.from_pretrained(out, session_options=runtime.session_options(threads=1))
    model, tok, _ = moefied(saved)
    batch = tok(["the cat is on a mat", "a dog and"], return_tensors="pt", padding=True, padding_side="left")
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert ort_model.generate(**batch, **kw).tolist() == model.generate(**batch, **kw).tolist()


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_encoder_exports_and_embeds_as_pytorch(exported, family):
    out, report, saved = exported(family)
    model, tok, adapter = moefied(saved)
    inputs = task_for(adapter).model_inputs(model)
    assert [i.name for i in onnx.load(out / "model.onnx").graph.input] == list(inputs)
    b = tok(["a dog and a cat", "it is for you and me, on the hill"], padding=True, return_tensors="np")
    feed = {k: b[k].astype(np.int64) for k in inputs}
    with torch.no_grad():
        want = model(**{k: torch.as_tensor(v) for k, v in feed.items()}).last_hidden_state.numpy()
    mask = feed["attention_mask"].astype(bool)
    for backend in available_backends():
        got = runtime.InferenceSession(out / "model.onnx", backend=backend).run(None, feed)[0]
        assert np.abs(got - want)[mask].max() <= 1e-4 * np.abs(want[mask]).max(), backend
    assert report.cosine_moe_vs_dense is not None and report.max_rel_diff <= 1e-4


@requires_cpp
def test_optimum_loads_an_encoder_directory_as_it_is(exported):
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    out, _, saved = exported("distilbert")
    ort_model = ORTModelForFeatureExtraction.from_pretrained(out, session_options=runtime.session_options(threads=1))
    model, tok, _ = moefied(saved)
    b = tok(["a dog and a cat"], return_tensors="pt")
    b = {k: b[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        np.testing.assert_allclose(ort_model(**b).last_hidden_state.numpy(), model(**b).last_hidden_state.numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_dense_ffn_formula_matches_each_family(tiny_model_dir):
    """DenseFFN.forward (the one written copy) reproduces each family's own FFN module on its input."""
    for family in ("gpt2", "opt", "llama", "distilbert"):
        model, _, adapter, _, _ = load_model(tiny_model_dir(family))
        layer = adapter.layers(model)[0]
        x = torch.randn(5, model.config.hidden_size)
        ffn, act = adapter.read(layer), adapter.activation(model.config)
        with torch.no_grad():
            if family == "opt":
                want = layer.fc2(layer.activation_fn(layer.fc1(x)))
            else:
                want = adapter.ffn_module(layer)(x)
        torch.testing.assert_close(ffn.forward(x, act), want, rtol=1e-5, atol=1e-5)


def test_patched_restores_the_dense_model(tiny_model_dir):
    from exporter.arch import patched
    from exporter.config import MoEConfig
    from exporter.moefy import build_moes, moefy
    model, tok, adapter, _, _ = load_model(tiny_model_dir("llama"))
    cfg = MoEConfig(experts=4, top_k=1, activation="silu", model_type="llama", num_layers=2, intermediate_size=64,
                    gated=True, task="text-generation")
    ids = torch.tensor([tok("the cat is on a mat")["input_ids"]])
    with torch.no_grad():
        dense = model(ids).logits
        moes = build_moes(model, adapter, cfg, moefy(model, adapter, cfg, progress=False))
        with patched(model, adapter, moes):
            assert sum(isinstance(m, MoEFFN) for m in model.modules()) == 2
            assert not torch.allclose(model(ids).logits, dense)
        assert not any(isinstance(m, MoEFFN) for m in model.modules())
        torch.testing.assert_close(model(ids).logits, dense)  # the split only permuted neurons


@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_gated_calibrated_recipe_exports_and_matches(tiny_model_dir, tmp_path, weights):
    """SwiGLU through the calibrated methods (co-activation split on silu(g)*u, bce router, mean correction,
    a shared expert) and int8 experts (Wg quantized too)."""
    calib = tmp_path / "calib.txt"
    calib.write_text("the cat is on a mat\nit is for you\na dog and a cat\nto be or not to be\nby the sea at dawn\n")
    out = tmp_path / "m.onnx"
    report = export(tiny_model_dir("llama"), out, experts=8, top_k=3, split="coact", router="bce", correction="mean",
                    shared_experts=1, calib=calib, weights=weights, backend=BACKEND, **QUIET)
    assert report.max_rel_diff <= 1e-4 and report.metrics["greedy_identical"] + report.metrics["greedy_tied"] == 8
    names = [p.name for p in spec.INPUTS]
    node = next(n for n in onnx.load(out).graph.node if n.domain == spec.DOMAIN)
    assert node.input[names.index("Wg")] and node.input[names.index("unselected_bias")]
    assert bool(len(node.input) > names.index("Wg_scale") and node.input[names.index("Wg_scale")]) == (weights == "int8")


def test_operator_inputs_are_what_the_nodes_hold(tiny_model_dir):
    """exporter.convert(...).operator_inputs(): per layer the arrays and attributes of its SparseExpertFFN node."""
    from exporter import convert
    c = convert(tiny_model_dir("llama"), experts=4, top_k=2, weights="int8", **QUIET)
    layers = c.operator_inputs()
    assert len(layers) == 2 and layers[0]["Wg"].dtype == np.int8 and layers[0]["Wg_scale"].shape == (4, 16)
    assert (layers[0]["top_k"], layers[0]["activation"], layers[0]["B1"]) == (2, "silu", None)
    x = np.random.default_rng(0).standard_normal((6, 32)).astype(np.float32)
    with torch.no_grad():
        want = c.moes[0](torch.from_numpy(x)).numpy()
    from runtime.reference import sparse_expert_ffn
    inputs = {k: v for k, v in layers[0].items() if k in spec.INPUT_INDEX}
    attrs = {k: v for k, v in layers[0].items() if k in {a.name for a in spec.ATTRIBUTES}}
    np.testing.assert_allclose(sparse_expert_ffn({**inputs, "X": x}, **attrs), want, rtol=1e-4, atol=1e-5)


@requires_cpp
def test_weights_past_the_protobuf_limit_go_to_external_data(tiny_model_dir, tmp_path, monkeypatch):
    """Past 2 GB (here: a threshold made tiny) the weights go to model.onnx_data, and optimum still loads the
    directory as it is."""
    from optimum.onnxruntime import ORTModelForCausalLM

    import sys
    monkeypatch.setattr(sys.modules["exporter.export"], "MAX_PROTOBUF", 10_000)  # (the package's `export` is the function)
    out = tmp_path / "out"
    export(tiny_model_dir("qwen2"), out, experts=4, top_k=2, backend=BACKEND, **QUIET)
    assert (out / "model.onnx_data").stat().st_size > (out / "model.onnx").stat().st_size
    ids = torch.tensor([[5, 6, 7, 8]])
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=2)
    ort_model = ORTModelForCausalLM.from_pretrained(out, session_options=runtime.session_options(threads=1))
    assert ort_model.generate(ids, **kw)[0, 4:].tolist() == list(runtime.DecoderSession(out, BACKEND).greedy(ids[0].tolist(), 6))
    single = tmp_path / "single.onnx"
    export(tiny_model_dir("qwen2"), single, experts=4, top_k=2, backend=BACKEND, **QUIET)
    assert (tmp_path / "single.onnx_data").is_file()


@pytest.mark.parametrize("family", [*ENCODER_FAMILIES, *DECODER_FAMILIES])
def test_post_norm_says_where_the_ffn_output_is_added(tiny_model_dir, family):
    """Sequential calibration's residual (exporter.moefy.LayerReplay) rests on each family's post_norm: a vector added
    to the FFN's output comes out of the layer unchanged exactly when the layer adds it to the residual stream
    (pre-norm); a post-norm layer normalises it away."""
    from exporter.arch.base import get_module
    from exporter.moefy import LayerReplay
    model, tok, adapter = load_model(tiny_model_dir(family))[:3]
    batch = task_for(adapter).batch(tok, ["the cat is on a mat", "a dog"], model, 32)
    layer = adapter.layers(model)[0]
    outs = []
    for shift in (0.0, 1.0):
        hook = get_module(layer, adapter.down).register_forward_hook(lambda m, a, out, s=shift: out + s)
        try:
            outs.append(LayerReplay(model, adapter, batch)(0))
        finally:
            hook.remove()
    (x0, r0), (x1, r1) = outs
    np.testing.assert_allclose(x0, x1)  # the FFN input does not depend on its own output
    np.testing.assert_allclose(r0, r1, atol=1e-5)  # nor does the residual it is added to
    def out_of_layer(shift):
        seen = []
        h1 = layer.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
        h2 = get_module(layer, adapter.down).register_forward_hook(lambda m, a, out: out + shift)
        try:
            with torch.no_grad():
                model.base_model(**batch)
        finally:
            h1.remove(), h2.remove()
        return seen[0]
    moved = out_of_layer(1.0) - out_of_layer(0.0)
    assert torch.allclose(moved, torch.ones_like(moved), atol=1e-5) == (not adapter.post_norm(model.config))


@pytest.mark.parametrize("family", ["bert", *ENCODER_FAMILIES, *DECODER_FAMILIES])
def test_layer_replay_sees_the_changed_layers_below(tiny_bert_dir, tiny_model_dir, family):
    """LayerReplay (--sequential's linear-time pass) gives layer i the FFN input and residual a whole forward pass
    gives it, after each layer below was changed between the calls; padded texts over several chunks."""
    from exporter.arch.base import get_module
    from exporter.moefy import LayerReplay
    model, tok, adapter = load_model(tiny_bert_dir if family == "bert" else tiny_model_dir(family))[:3]
    texts = ["the cat is on a mat", "a dog", "one two three four five six seven", "hello"]
    batch = task_for(adapter).batch(tok, texts, model, 32)
    real = batch["attention_mask"].bool()
    layers = adapter.layers(model)

    def forward_pass(i):  # layer i's (FFN input, residual stream) from the model's own forward pass
        seen = {}
        hooks = [adapter.ffn_module(layers[i]).register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0])),
                 get_module(layers[i], adapter.down).register_forward_hook(lambda m, a, o: seen.__setitem__("y", o)),
                 layers[i].register_forward_hook(lambda m, a, o: seen.__setitem__("out", o[0] if isinstance(o, tuple) else o))]
        try:
            with torch.no_grad():
                model.base_model(**batch)
        finally:
            for h in hooks:
                h.remove()
        x, y, out = (seen[k].reshape(*real.shape, -1)[real] for k in ("x", "y", "out"))
        return x, x if adapter.post_norm(model.config) else out - y

    dense = copy.deepcopy(model)
    dense_replay = LayerReplay(dense, adapter, batch, chunk=3)
    replay = dense_replay.fork(model)  # as --sequential: the student's replay starts from the dense model's pass
    inputs = []
    for i, layer in enumerate(layers):
        inputs.append(replay(i))
        for got, want in zip(inputs[-1], forward_pass(i)):
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
        with torch.no_grad():  # as sequential calibration MoEfies layer i before asking for layer i + 1
            get_module(layer, adapter.down).weight.mul_(0.5)
    for i, (x, _) in enumerate(inputs):  # the dense model's replay does not see the changes
        assert np.allclose(dense_replay(i)[0], x, atol=1e-5) == (i == 0)
    with pytest.raises(ValueError, match="in order: asked for layer 0 after layer 1"):
        replay(0)
    with pytest.raises(ValueError, match="fork before asking for a layer"):
        replay.fork(model)
