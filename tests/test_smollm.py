"""The real SmolLM2-135M-Instruct (LLaMA architecture, GGUF) end to end: export at 25% active, then generation
through optimum, moefy's API and moe-generate with greedy tokens identical to the PyTorch MoEfied model. Slow
(minutes): `make test-smollm`; skipped cleanly when the model is not fetched (`make smollm`)."""
from __future__ import annotations

import pytest
from conftest import BACKEND, requires_cpp

import runtime
from exporter.text import SAMPLE_PROMPTS

pytestmark = pytest.mark.slow
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm_export(smollm2_gguf, tmp_path_factory):
    from exporter import export
    root = tmp_path_factory.mktemp("smollm")
    # the plumbing on the real model with the weight-only recipe (the default's co-activation split and bce router
    # calibrate 30 layers: tens of minutes); the default recipe is tested on the tiny models
    report = export(smollm2_gguf, root / "out", experts=32, top_k=8, split="param", router="centroid",
                    correction="none", backend=BACKEND, save_moefied_dir=root / "saved", progress=False)
    return root / "out", report, root / "saved"


def test_export_validates(smollm_export):
    out, report, _ = smollm_export
    assert report.config.gated and report.config.num_layers == 30 and report.config.active_share == 0.25
    assert report.max_rel_diff <= 1e-4
    assert report.metrics["greedy_identical"] + report.metrics["greedy_tied"] == len(SAMPLE_PROMPTS)
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}


@requires_cpp
def test_optimum_generates_as_the_pytorch_moe(smollm_export):
    """32 greedy tokens on 8 chat prompts: optimum's ORTModelForCausalLM on the export directory, moefy's
    DecoderSession, and the PyTorch MoEfied model agree."""
    from optimum.onnxruntime import ORTModelForCausalLM

    from exporter.moefy import install_moe
    from exporter.source import load_model
    out, _, saved = smollm_export
    model, tok, adapter, cfg, routers = load_model(saved)
    install_moe(model, adapter, cfg, routers)
    ort_model = ORTModelForCausalLM.from_pretrained(out, session_options=runtime.session_options())
    decoder = runtime.DecoderSession(out, "cpp")
    for prompt in SAMPLE_PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt")
        kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)
        want = model.generate(ids, **kw)[0, ids.shape[1]:].tolist()
        assert ort_model.generate(ids, **kw)[0, ids.shape[1]:].tolist() == want, prompt
        assert list(decoder.greedy(ids[0].tolist(), NEW_TOKENS)) == want, prompt
        if (out / "genai_config.json").is_file():  # moe-export --genai (auto: with the builder's environment)
            from exporter.genai_layout import greedy
            got, _ = greedy(out, ids[0].tolist(), NEW_TOKENS)
            assert got == want[:len(got)], prompt


def test_moe_generate_answers(smollm_export, capsys):
    from runtime.generate import main
    out, _, _ = smollm_export
    assert main([str(out), "What is the capital of France?", "--chat", "--max-new-tokens", "24",
                 "--backend", BACKEND]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and "tokens/s" in captured.err
