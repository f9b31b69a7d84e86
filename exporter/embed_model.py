"""Sentence embeddings from strings in one ONNX model: the tokenizer in front, pooling and L2 normalisation behind.

``with_tokenizer(ENCODER.onnx, HF_DIR, OUT.onnx)`` wraps an exported encoder (inputs input_ids, attention_mask
[, token_type_ids], output last_hidden_state; moefy's custom or ort-moe target, or a dense export) into a model
whose input ``text`` is a 1-D string tensor and whose output ``sentence_embedding`` is [len(text), d], each row
the encoder's mean-pooled (or CLS) last hidden state, L2-normalised, as sentence-transformers computes it. A
C/C++/C#/Java host then needs no tokenizer and no pooling code: it registers onnxruntime-extensions' library
(the tokenizer op) and, for the custom target, moefy's (runtime.library_path()).

The tokenizer is onnxruntime-extensions' own conversion of the Hugging Face tokenizer (``gen_processing_models``).
Its BertTokenizer op takes one text (two make a sentence pair), so the model runs the tokenizer, the encoder and
the pooling once per string inside a Loop over ``text``: every string is embedded alone, without padding,
exactly as the single-text Python path does, and the encoder's weights stay outer-graph initializers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

INPUT, OUTPUT = "text", "sentence_embedding"
TOKENIZER_DOMAIN = "ai.onnx.contrib"  # onnxruntime-extensions' ops
POOLINGS = ("mean", "cls")
NORM_EPS = 1e-12  # as torch.nn.functional.normalize
MAX_LENGTH_CAP = 512  # when neither the tokenizer nor the model config sets a usable length


class EmbeddingModelError(ValueError):
    """An encoder or tokenizer that cannot be wrapped (the message says why)."""


@dataclasses.dataclass
class EmbeddingReport:
    output: str
    max_length: int
    pooling: str
    normalize: bool
    dim: int
    max_abs_diff: float | None  # against the Python path on sample texts (None: not checked)
    file_bytes: int

    def summary(self) -> str:
        checked = "not checked" if self.max_abs_diff is None else \
            f"max abs diff to HF tokenizer + session + NumPy pooling {self.max_abs_diff:.1e}"
        return (f"wrote {self.output} ({self.file_bytes / 2**20:.1f} MiB): strings '{INPUT}' -> '{OUTPUT}' "
                f"[N, {self.dim}], {self.pooling} pooling{', L2-normalised' if self.normalize else ''}, at most "
                f"{self.max_length} tokens per text; {checked}")


def extensions_library_path() -> str:
    """onnxruntime-extensions' custom-op library (the tokenizer ops), for register_custom_ops_library.

    The PyPI wheel ships it as its Python extension module; a host outside Python must make libpython's symbols
    resolvable before loading it (examples/cpp/README.md)."""
    import onnxruntime_extensions
    return onnxruntime_extensions.get_library_path()


def settings(tokenizer_dir: Path, tokenizer, max_length: int | None, pooling: str | None) -> tuple[int, str]:
    """Defaults from the model directory: sentence-transformers' max_seq_length and pooling mode when present,
    else the tokenizer's and the model config's limits, and mean pooling."""
    st = tokenizer_dir / "sentence_bert_config.json"
    if max_length is None and st.is_file():
        max_length = json.loads(st.read_text()).get("max_seq_length")
    if max_length is None:
        limits = [tokenizer.model_max_length]
        if (tokenizer_dir / "config.json").is_file():
            limits.append(json.loads((tokenizer_dir / "config.json").read_text()).get("max_position_embeddings"))
        limits = [n for n in limits if isinstance(n, int) and 2 < n < 1_000_000]  # HF's "unset" is a huge int
        max_length = min(limits) if limits else MAX_LENGTH_CAP
    if not isinstance(max_length, int) or max_length < 2:
        raise EmbeddingModelError(f"max_length must be an integer >= 2 (room for [CLS] and [SEP]), got {max_length!r}")
    pool_cfg = tokenizer_dir / "1_Pooling" / "config.json"
    if pooling is None and pool_cfg.is_file():
        modes = [k[len("pooling_mode_"):].removesuffix("_tokens").removesuffix("_token")
                 for k, v in json.loads(pool_cfg.read_text()).items() if k.startswith("pooling_mode_") and v]
        if modes not in (["mean"], ["cls"]):
            raise EmbeddingModelError(f"{pool_cfg} asks for pooling {', '.join(modes) or 'none'}; supported: "
                                      f"{', '.join(POOLINGS)}")
        pooling = modes[0]
    pooling = pooling or "mean"
    if pooling not in POOLINGS:
        raise EmbeddingModelError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return max_length, pooling


def tokenizer_graph(tokenizer, max_length: int) -> onnx.GraphProto:
    """onnxruntime-extensions' tokenizer graph for ``tokenizer``: one string in, 1-D int64 input_ids,
    token_type_ids, attention_mask out (cut to ``max_length`` tokens, [SEP] kept)."""
    from onnxruntime_extensions import gen_processing_models
    check_tokenizer(tokenizer)
    # Hugging Face: strip_accents None means "as do_lower_case"; the converter reads it as off, so it is set here.
    lower = bool(tokenizer.init_kwargs.get("do_lower_case", True))
    strip = tokenizer.init_kwargs.get("strip_accents")
    pre, _ = gen_processing_models(tokenizer, pre_kwargs={"do_lower_case": int(lower),
                                                          "strip_accents": int(lower if strip is None else strip),
                                                          "max_length": int(max_length)})
    return pre.graph


def _reduce(op: str, x: str, out: str, axis: int, keepdims: int, opset: int, nodes: list, inits: list) -> None:
    """A Reduce* node in the form of ``opset`` (axes became an input in opset 18)."""
    if opset >= 18:
        inits.append(helper.make_tensor(out + "_axes", TensorProto.INT64, [1], [axis]))
        nodes.append(helper.make_node(op, [x, out + "_axes"], [out], keepdims=keepdims))
    else:
        nodes.append(helper.make_node(op, [x], [out], axes=[axis], keepdims=keepdims))


def embedding_model(encoder: onnx.ModelProto, tokenizer, *, max_length: int, pooling: str = "mean",
                    normalize: bool = True) -> onnx.ModelProto:
    """The encoder wrapped: ``text`` [N] strings -> ``sentence_embedding`` [N, d] (see the module docstring)."""
    g = encoder.graph
    opsets = {o.domain or "ai.onnx": o.version for o in encoder.opset_import}
    opset = opsets.get("ai.onnx", 0)
    if opset < 13:
        raise EmbeddingModelError(f"the encoder imports ONNX opset {opset}; wrapping it needs >= 13")
    inputs = [i.name for i in g.input if i.name not in {t.name for t in g.initializer}]
    if "input_ids" not in inputs or not set(inputs) <= {"input_ids", "attention_mask", "token_type_ids"}:
        raise EmbeddingModelError(f"the encoder's inputs are {inputs}; expected input_ids, attention_mask and "
                                  "optionally token_type_ids (a Hugging Face encoder export)")
    if "last_hidden_state" not in [o.name for o in g.output]:
        raise EmbeddingModelError(f"the encoder's outputs are {[o.name for o in g.output]}; expected "
                                  "last_hidden_state")
    tok = tokenizer_graph(tokenizer, max_length)

    # Loop body: text[i] -> tokenizer -> [1, L] ids -> encoder -> pooled [d]. Names of the body's own tensors
    # carry a prefix so they cannot clash with the encoder's.
    p = "embed/"
    nodes, inits = [], []
    nodes.append(helper.make_node("Gather", [INPUT, p + "i"], [p + "one_text"], axis=0))
    inits.append(helper.make_tensor(p + "axis0", TensorProto.INT64, [1], [0]))
    nodes.append(helper.make_node("Unsqueeze", [p + "one_text", p + "axis0"], [p + "text_1"]))
    tok_inputs = [i.name for i in tok.input]
    renamed = {tok_inputs[0]: p + "text_1", **{o.name: p + "tok_" + o.name for o in tok.output}}
    renamed.update({t.name: p + "tok_" + t.name for t in tok.initializer})
    for t in tok.initializer:
        c = onnx.TensorProto()
        c.CopyFrom(t)
        c.name = renamed[t.name]
        inits.append(c)
    for n in tok.node:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.input[:] = [renamed.get(x, x) for x in n.input]
        m.output[:] = [renamed.get(x, x) for x in n.output]
        nodes.append(m)
    produced = {o.name for o in tok.output}
    for name in inputs:  # the encoder's inputs, [1, L]
        if name in produced:
            nodes.append(helper.make_node("Unsqueeze", [p + "tok_" + name, p + "axis0"], [name]))
        elif name == "token_type_ids":  # the tokenizer gives none: one segment
            nodes.append(helper.make_node("Shape", [p + "tok_input_ids"], [p + "len"]))
            nodes.append(helper.make_node("ConstantOfShape", [p + "len"], [p + "zeros"],
                                          value=helper.make_tensor("v", TensorProto.INT64, [1], [0])))
            nodes.append(helper.make_node("Unsqueeze", [p + "zeros", p + "axis0"], [name]))
        else:
            raise EmbeddingModelError(f"the tokenizer gives no {name} for the encoder")
    nodes.extend(g.node)
    h = "last_hidden_state"  # [1, L, d]; one unpadded text, so the masked mean is the plain mean
    if pooling == "mean":
        _reduce("ReduceMean", h, p + "pooled", 1, 0, opset, nodes, inits)
    else:
        inits.append(helper.make_tensor(p + "zero", TensorProto.INT64, [], [0]))
        nodes.append(helper.make_node("Gather", [h, p + "zero"], [p + "pooled"], axis=1))
    emb = p + "pooled"
    if normalize:
        _reduce("ReduceL2", emb, p + "norm", -1, 1, opset, nodes, inits)
        inits.append(helper.make_tensor(p + "eps", TensorProto.FLOAT, [], [NORM_EPS]))
        nodes.append(helper.make_node("Max", [p + "norm", p + "eps"], [p + "norm_eps"]))
        nodes.append(helper.make_node("Div", [emb, p + "norm_eps"], [p + "normalized"]))
        emb = p + "normalized"
    nodes.append(helper.make_node("Squeeze", [emb, p + "axis0"], [p + "embedding"]))
    nodes.append(helper.make_node("Identity", [p + "cond"], [p + "cond_out"]))
    dim = encoder_dim(encoder)
    body = helper.make_graph(
        nodes, "embed_one_text",
        [helper.make_tensor_value_info(p + "i", TensorProto.INT64, []),
         helper.make_tensor_value_info(p + "cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(p + "cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info(p + "embedding", TensorProto.FLOAT, [dim])],
        inits, value_info=list(g.value_info))

    # Outer graph: trip count = len(text); the encoder's weights stay here (the body reads outer-scope names).
    outer = [helper.make_node("Shape", [INPUT], ["embed/n"]),
             helper.make_node("Squeeze", ["embed/n", "embed/axis0_outer"], ["embed/trips"]),
             helper.make_node("Loop", ["embed/trips", "embed/true"], [OUTPUT], body=body, name="embed/per_text")]
    graph = helper.make_graph(
        outer, "sentence_embedding",
        [helper.make_tensor_value_info(INPUT, TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", dim])],
        [*g.initializer, helper.make_tensor("embed/axis0_outer", TensorProto.INT64, [1], [0]),
         helper.make_tensor("embed/true", TensorProto.BOOL, [], [True])])
    imports = dict(opsets)
    imports[TOKENIZER_DOMAIN] = max(imports.get(TOKENIZER_DOMAIN, 1), 1)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("" if k == "ai.onnx" else k, v)
                                                    for k, v in imports.items()],
                              ir_version=encoder.ir_version, producer_name="moefy")
    model.metadata_props.extend(encoder.metadata_props)
    model.metadata_props.add(key="moefy.embedding", value=json.dumps(
        {"input": INPUT, "output": OUTPUT, "pooling": pooling, "normalize": normalize, "max_length": max_length,
         "tokenizer": type(tokenizer).__name__}))
    return model


def tokenizer_settings(model_dir, max_length: int | None = None, pooling: str | None = None):
    """(tokenizer, max_length, pooling) of a Hugging Face model directory for the strings model (``settings``
    fills what is None), or an EmbeddingModelError saying why it cannot be made."""
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise EmbeddingModelError(f"{model_dir} holds no Hugging Face tokenizer: {e}") from None
    check_tokenizer(tokenizer)
    return (tokenizer, *settings(model_dir, tokenizer, max_length, pooling))


def check_tokenizer(tokenizer) -> None:
    """Fail before the work if ``tokenizer`` cannot go into the graph (or onnxruntime-extensions is missing)."""
    try:
        import onnxruntime_extensions  # noqa: F401
    except ImportError:
        raise EmbeddingModelError("the tokenizer in the graph needs onnxruntime-extensions (pip install "
                                  "onnxruntime-extensions; `make setup` installs it)") from None
    name = type(tokenizer).__name__
    if not name.removesuffix("Fast").endswith("BertTokenizer"):
        raise EmbeddingModelError(f"tokenizer {name}: only WordPiece (BERT-family) tokenizers are wired into the "
                                  "graph so far (onnxruntime-extensions' BertTokenizer op)")


def session_options(model: onnx.ModelProto | None = None, threads: int | None = None):
    """ONNX Runtime options with onnxruntime-extensions' library registered, and moefy's when ``model`` (or, if
    None, possibly) holds SparseExpertFFN nodes (a Loop body included: its opset imports are the model's)."""
    import runtime
    from runtime import spec
    from runtime.session import default_options
    uses_moefy = model is None or any(o.domain == spec.DOMAIN for o in model.opset_import)
    so = runtime.session_options(threads) if uses_moefy else default_options(threads)
    so.register_custom_ops_library(extensions_library_path())
    return so


def python_embeddings(session, tokenizer, texts: list[str], *, max_length: int, pooling: str = "mean",
                      normalize: bool = True) -> np.ndarray:
    """The same embeddings the Python way: the HF tokenizer, ``session`` (the encoder: an ONNX Runtime or moefy
    session), NumPy pooling; one text at a time, as the wrapped model runs them."""
    names = [i.name for i in session.get_inputs()]
    out = []
    for t in texts:
        b = tokenizer(t, truncation=True, max_length=max_length, return_tensors="np")
        feed = {n: b[n].astype(np.int64) if n in b else np.zeros_like(b["input_ids"], np.int64) for n in names}
        h = session.run(["last_hidden_state"], feed)[0][0].astype(np.float64)
        mask = b["attention_mask"][0].astype(np.float64)[:, None]
        e = (h * mask).sum(0) / mask.sum() if pooling == "mean" else h[0]
        out.append(e / max(np.linalg.norm(e), NORM_EPS) if normalize else e)
    return np.asarray(out, np.float32).reshape(len(texts), -1)


# Checked texts: plain, long enough to be cut at max_length, accents and CJK (the BertTokenizer's normaliser),
# and an empty one (just [CLS] [SEP]).
def check_texts(max_length: int) -> list[str]:
    from .text import SAMPLE_TEXTS
    return [*SAMPLE_TEXTS[:4], "Ünïcode, ACCENTS and 東京 — handled as the HF tokenizer does.", "",
            " ".join(SAMPLE_TEXTS * (1 + max_length // 150))]


def write_checked(encoder: onnx.ModelProto, tokenizer, tmp: str | os.PathLike, *, max_length: int,
                  pooling: str = "mean", normalize: bool = True, check: bool = True, log=None) -> float | None:
    """Wrap ``encoder``, write the result to ``tmp`` (the temporary file of an atomic output) and, with
    ``check``, compare its embeddings of :func:`check_texts` with :func:`python_embeddings` of the encoder in a
    plain ONNX Runtime session (moefy's library registered when it has the custom op, so both sides run the
    same kernels). Returns the largest difference; raises EmbeddingModelError above 1e-4."""
    import onnxruntime as ort
    model = embedding_model(encoder, tokenizer, max_length=max_length, pooling=pooling, normalize=normalize)
    if not check:
        onnx.save(model, os.fspath(tmp))
        onnx.checker.check_model(os.fspath(tmp), full_check=False)
        return None
    if log:
        log("checking the strings -> embeddings model against the HF tokenizer + session + NumPy pooling")
    enc = ort.InferenceSession(encoder.SerializeToString(), session_options(encoder),
                               providers=["CPUExecutionProvider"])
    texts = check_texts(max_length)
    want = python_embeddings(enc, tokenizer, texts, max_length=max_length, pooling=pooling, normalize=normalize)
    del enc
    onnx.save(model, os.fspath(tmp))
    onnx.checker.check_model(os.fspath(tmp), full_check=False)
    sess = ort.InferenceSession(os.fspath(tmp), session_options(model), providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT], {INPUT: np.array(texts, dtype=object)})[0]
    diff = float(np.abs(got - want).max())
    if not diff <= 1e-4:
        raise EmbeddingModelError(f"the strings -> embeddings model differs from the Python path (HF tokenizer + "
                                  f"session + pooling) by {diff:.2e} (> 1e-4); nothing was written")
    return diff


def with_tokenizer(encoder_path: str | os.PathLike, tokenizer_dir: str | os.PathLike, output: str | os.PathLike, *,
                   max_length: int | None = None, pooling: str | None = None, normalize: bool = True,
                   check: bool = True, log=None) -> EmbeddingReport:
    """Write ``output``: ``encoder_path`` wrapped with the tokenizer of ``tokenizer_dir`` in front and pooling
    behind (see the module docstring). ``max_length`` (tokens per text) and ``pooling`` default to the directory's
    sentence-transformers settings. With ``check``, the file appears only after its embeddings matched the
    Python path within 1e-4 (:func:`write_checked`). ``moe-export --with-tokenizer`` does the same in one step.

    Raises EmbeddingModelError (what cannot be wrapped, or a failed check), OSError (files).
    """
    from .outfile import atomic_path, check_output, writing
    tokenizer_dir = Path(tokenizer_dir)
    for path, what in ((encoder_path, "encoder model"), (tokenizer_dir, "tokenizer directory")):
        if not os.path.exists(path):
            raise EmbeddingModelError(f"{what} {path} does not exist")
    output = check_output(output)
    tokenizer, max_length, pooling = tokenizer_settings(tokenizer_dir, max_length, pooling)
    try:
        encoder = onnx.load(os.fspath(encoder_path))
    except Exception as e:  # noqa: BLE001 (protobuf's DecodeError and friends)
        raise EmbeddingModelError(f"{encoder_path} is not an ONNX model: {e}") from None
    with atomic_path(output) as tmp:
        with writing(output):
            diff = write_checked(encoder, tokenizer, tmp, max_length=max_length, pooling=pooling,
                                 normalize=normalize, check=check, log=log)
    dim = encoder_dim(encoder)
    return EmbeddingReport(str(output), max_length, pooling, normalize, dim, diff, output.stat().st_size)


def encoder_dim(encoder: onnx.ModelProto) -> int | None:
    out = next((o for o in encoder.graph.output if o.name == "last_hidden_state"), None)
    d = out.type.tensor_type.shape.dim[-1] if out is not None and out.type.tensor_type.shape.dim else None
    return d.dim_value if d is not None and d.HasField("dim_value") else None


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(
        prog="python -m exporter.embed_model",
        description="Wrap an exported encoder (input_ids, attention_mask[, token_type_ids] -> last_hidden_state) "
                    "into one ONNX model from strings ('text' [N]) to L2-normalised sentence embeddings "
                    "('sentence_embedding' [N, d]): onnxruntime-extensions' tokenizer in front, pooling behind. "
                    "Run it with onnxruntime-extensions' library registered (and moefy's for the custom target). "
                    "moe-export --with-tokenizer exports and wraps in one step.")
    ap.add_argument("encoder", help="encoder ONNX model (moe-export output, ort-moe or dense)")
    ap.add_argument("tokenizer_dir", help="Hugging Face model directory with the tokenizer (the one exported)")
    ap.add_argument("output", help="ONNX file to write")
    ap.add_argument("--max-length", type=int, help="tokens per text, [CLS] and [SEP] included (default: the "
                                                   "directory's sentence-transformers max_seq_length, else the "
                                                   "tokenizer's / model's limit)")
    ap.add_argument("--pooling", choices=POOLINGS, help="default: the directory's 1_Pooling config, else mean")
    ap.add_argument("--no-normalize", dest="normalize", action="store_false", help="skip the L2 normalisation")
    args = ap.parse_args(argv)
    try:
        report = with_tokenizer(args.encoder, args.tokenizer_dir, args.output, max_length=args.max_length,
                                pooling=args.pooling, normalize=args.normalize,
                                log=lambda *m: print(*m, file=sys.stderr, flush=True))
    except (ValueError, OSError) as e:
        print(f"exporter.embed_model: error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
