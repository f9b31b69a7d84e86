"""Shared fixtures: seeded random operator inputs, a tiny seeded BERT directory, the bundled MiniLM."""
from __future__ import annotations

import string

import numpy as np
import pytest

import runtime

QUIET = dict(progress=False, log=lambda *a: None)
BACKEND = "cpp" if runtime.cpp_available() else "numba-split"  # the fastest there is
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


def _tiny_bpe_tokenizer(directory, *, chat: bool = False):
    """A byte-level BPE tokenizer (vocabulary 300) trained on a few sentences: decodes any text exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from exporter.text import SAMPLE_PROMPTS, SAMPLE_TEXTS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([*SAMPLE_TEXTS, *SAMPLE_PROMPTS, " ".join(TINY_WORDS)] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_input_names=["input_ids", "attention_mask"])
    if chat:
        fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                              "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    fast.save_pretrained(directory)
    return fast


def _tiny_model_config(family: str, vocab: int):
    """A 2-layer config of each family moefy supports (hidden 32, FFN 64 or 128), seeded weights."""
    import transformers as tf
    common = dict(vocab_size=vocab, max_position_embeddings=128)
    if family == "gpt2":  # Conv1D, gelu_new, FFN 4 x 32
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=vocab,
                             activation_function="gelu_new", bos_token_id=0, eos_token_id=1)
    if family == "opt":  # ReLU, fc1/fc2 inside the layer's forward
        return tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=32, activation_function="relu", bos_token_id=0, eos_token_id=1,
                            pad_token_id=2, **common)
    if family in ("llama", "qwen2", "mistral"):  # SwiGLU, grouped-query attention
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[family]
        return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, hidden_act="silu", bos_token_id=0, eos_token_id=1, pad_token_id=2,
                   tie_word_embeddings=family != "mistral", **common)
    if family == "roberta":
        return tf.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                pad_token_id=0, **{**common, "max_position_embeddings": 130})
    if family == "distilbert":
        return tf.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=2, activation="gelu", **common)
    raise ValueError(family)


DECODER_FAMILIES = ("gpt2", "opt", "llama", "qwen2", "mistral")
ENCODER_FAMILIES = ("roberta", "distilbert")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_bert_dir):
    """family -> a directory with a tiny seeded model of that family and its tokenizer (made once)."""
    import torch
    import transformers as tf
    made = {}

    def make(family: str):
        if family in made:
            return made[family]
        d = tmp_path_factory.mktemp(f"tiny-{family}")
        if family in ENCODER_FAMILIES:  # BERT's WordPiece vocabulary serves them
            for f in tiny_bert_dir.iterdir():
                if "token" in f.name or f.name in ("vocab.txt", "special_tokens_map.json"):
                    (d / f.name).write_bytes(f.read_bytes())
            vocab = len(tf.AutoTokenizer.from_pretrained(d))
            model_cls = tf.AutoModel
        else:
            vocab = len(_tiny_bpe_tokenizer(d, chat=family == "llama"))
            model_cls = tf.AutoModelForCausalLM
        torch.manual_seed(0)
        model = model_cls.from_config(_tiny_model_config(family, vocab)).eval()
        with torch.no_grad():  # larger weights than the default init: outputs that depend on every FFN
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.2)
        model.save_pretrained(d)
        made[family] = d
        return d

    return make


@pytest.fixture(scope="session")
def exported(tiny_model_dir, tmp_path_factory):
    """family -> (export directory, report, saved MoEfied directory) of the tiny model, 4 experts, top-2; float32
    experts, so that the saved model (float32: re-exportable with any --weights) computes what the export does."""
    from exporter import export
    made = {}

    def get(family):
        if family not in made:
            root = tmp_path_factory.mktemp(f"export-{family}")
            report = export(tiny_model_dir(family), root / "out", experts=4, top_k=2, weights="float32",
                            backend=BACKEND, save_moefied_dir=root / "saved",
                            genai="off", **QUIET)  # genai: test_genai_layout
            made[family] = root / "out", report, root / "saved"
        return made[family]

    return get


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2-135M-Instruct GGUF (`make smollm` fetches it from PyPI), or a clean skip."""
    from exporter.models import smollm2_gguf as find
    try:
        return find()
    except FileNotFoundError as e:
        pytest.skip(str(e))
