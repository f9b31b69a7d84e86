"""Shared fixtures: seeded random operator inputs, a tiny seeded BERT directory, the bundled MiniLM."""
from __future__ import annotations

import string

import numpy as np
import pytest

import runtime

requires_cpp = pytest.mark.skipif(not runtime.cpp_available(), reason="C++ op library not built")
# InferenceSession backends; numba (Numba kernels inside ONNX Runtime) runs through the C++ library too.
SESSION_BACKENDS = ["numba-split", pytest.param("numba", marks=requires_cpp), pytest.param("cpp", marks=requires_cpp)]


def available_backends() -> list[str]:
    return ["numba-split", "numba", "cpp"] if runtime.cpp_available() else ["numba-split"]


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (real models, minutes)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow (real model): run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def calibration_cache(tmp_path_factory):
    """Calibration activations go to a temporary cache, never the user's."""
    import os
    old = os.environ.get("MOEFY_CACHE_DIR")
    os.environ["MOEFY_CACHE_DIR"] = str(tmp_path_factory.mktemp("calibration-cache"))
    yield
    if old is None:
        del os.environ["MOEFY_CACHE_DIR"]
    else:
        os.environ["MOEFY_CACHE_DIR"] = old


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def make_inputs(rng, *, lead=(7,), d=24, E=6, m=5, gated=False, router="weights", biases=True,
                unselected=False):
    """Random SparseExpertFFN inputs (float32) with weights scaled so outputs stay O(1)."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    a = {"X": f(*lead, d), "W1": f(E, m, d) / np.sqrt(d), "W2": f(E, m, d) / np.sqrt(m)}
    if biases:
        a["B1"], a["B2"] = f(E, m) * 0.1, f(d) * 0.1
    if router == "weights":
        a["router_w"], a["router_b"] = f(E, d), f(E) * 0.1
    else:
        a["router_scores"] = f(*lead, E)
    if gated:
        a["Wg"], a["Bg"] = f(E, m, d) / np.sqrt(d), f(E, m) * 0.1
    if unselected:
        a["unselected_bias"] = f(E, d) * 0.1
    return {k: v.astype(np.float32) for k, v in a.items()}  # numpy scalars would promote to float64


def near_tie_tokens(a, k, gap=1e-4, threshold=None):
    """Tokens whose k-th and (k+1)-th router scores are closer than ``gap``, or with a score that close to
    the dynamic-k ``threshold`` (float32 rounding may legitimately flip their selection between
    implementations); excluded from comparisons."""
    from runtime.reference import router_scores
    scores = router_scores(a, a["X"].shape[-1])
    s = np.sort(scores, axis=1)[:, ::-1]
    near = np.zeros(s.shape[0], bool) if k >= s.shape[1] else np.abs(s[:, k - 1] - s[:, k]) < gap
    if threshold is not None and np.isfinite(threshold):
        near |= (np.abs(scores - threshold) < gap).any(axis=1)
    return near


TINY_WORDS = ("the", "a", "of", "and", "to", "in", "is", "it", "for", "on", "with", "as", "by", "at", "from")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer BERT (hidden 32, FFN 64, GELU) initialised with a fixed seed, plus a WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS, *string.ascii_lowercase,
                                *("##" + c for c in string.ascii_lowercase), *".,?!'-"]))
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, hidden_act="gelu")
    BertModel(cfg).eval().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def minilm_dir():
    from exporter.models import bundled_minilm_dir
    try:
        return bundled_minilm_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def minilm_export(minilm_dir, tmp_path_factory):
    """The bundled MiniLM exported as `make example` does (32 experts, top-8, custom target), once per run."""
    from exporter import export
    out = tmp_path_factory.mktemp("minilm-export") / "minilm-moe.onnx"
    export(minilm_dir, out, experts=32, top_k=8, progress=False, log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def minilm_embed_export(minilm_dir, tmp_path_factory):
    """The same export with --with-tokenizer (strings -> sentence embeddings), as `make example` writes it."""
    from exporter import export
    out = tmp_path_factory.mktemp("minilm-embed") / "minilm-moe-embed.onnx"
    export(minilm_dir, out, experts=32, top_k=8, with_tokenizer=True, progress=False, log=lambda *a: None)
    return out
