"""Encoders (feature extraction): token ids in, last_hidden_state out; sentence embeddings by mean pooling."""
from __future__ import annotations

import numpy as np
import torch

from ..moe_ffn import routing_margins
from ..text import short_spans
from .base import Task, Validation, ValidationError, clear_texts, length_batches, register, relative_difference

DISTILL_SPANS = 0.25  # share of the distillation texts that also give a short span; MiniLM: 0.10-0.25 alike on cosine,
# 0.25 the best on WordNet and on short inputs (docs/QUALITY.md, fourteenth pass)


def mean_pool(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings: hidden states averaged over real tokens (as sentence-transformers does)."""
    m = mask[..., None].astype(np.float64)
    return (h * m).sum(1) / np.maximum(m.sum(1), 1)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def unit(e: np.ndarray) -> np.ndarray:
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)


def nearest_neighbours(e: np.ndarray) -> np.ndarray:
    """For each row, the index of its most cosine-similar other row."""
    s = unit(e) @ unit(e).T
    np.fill_diagonal(s, -np.inf)
    return s.argmax(1)


def onnx_session(onnx_path, backend: str):
    """The moefy runtime's session, or stock ONNX Runtime's for ``backend`` "onnxruntime" (the standard target)."""
    if backend == "onnxruntime":
        import onnxruntime as ort
        return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    from runtime import InferenceSession
    return InferenceSession(onnx_path, backend=backend)


@register
class FeatureExtraction(Task):
    name = "feature-extraction"
    optimum_task = "feature-extraction"
    auto_class = "AutoModel"

    def model_inputs(self, model):
        return tuple(self.onnx_config(model).inputs)  # optimum's input order (BERT: with token_type_ids)

    def distillation_texts(self, texts, seed):
        """Plus short spans of them: trained on sentences only, MiniLM's recovered student embedded 1-3 word
        spans of held-out text at cosine 0.89 to dense against 0.96 for the sentences (docs/QUALITY.md)."""
        spans = short_spans(texts, DISTILL_SPANS, seed)
        return texts + spans, f"plus {len(spans)} spans of 1-4 words from them"

    @torch.no_grad()
    def outputs(self, model, batch):
        return model(**batch).last_hidden_state.numpy()

    def embeddings(self, run, tokenizer, texts, input_names, max_length: int, *, desc: str = "",
                   progress: bool = False) -> np.ndarray:
        """Mean-pooled embeddings [texts, d]; ``run(feed)`` -> last_hidden_state for a NumPy feed."""
        out = None
        for idx, feed in length_batches(tokenizer, texts, input_names, max_length, self.heldout_batch, desc=desc,
                                        progress=progress):
            e = mean_pool(run(feed), feed["attention_mask"])
            out = np.zeros((len(texts), e.shape[1])) if out is None else out
            out[idx] = e
        return out

    @torch.no_grad()
    def dense_embeddings(self, model, tokenizer, texts, max_length: int, *, desc: str = "", progress: bool = False):
        run = lambda feed: model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()  # noqa: E731
        return self.embeddings(run, tokenizer, texts, self.model_inputs(model), max_length, desc=desc,
                               progress=progress)

    def session_embeddings(self, session, tokenizer, texts, max_length: int, *, desc: str = "",
                           progress: bool = False):
        names = [i.name for i in session.get_inputs()]
        run = lambda feed: session.run(["last_hidden_state"], {k: feed[k] for k in names})[0]  # noqa: E731
        return self.embeddings(run, tokenizer, texts, names, max_length, desc=desc, progress=progress)

    def heldout_reference(self, model, tokenizer, texts, max_length, *, progress=False):
        emb = self.dense_embeddings(model, tokenizer, texts, max_length, desc="dense embeddings", progress=progress)
        return emb, nearest_neighbours(emb)

    def heldout_fidelity(self, reference, onnx_path, tokenizer, texts, max_length, *, backend, progress=False):
        dense, dense_nn = reference
        session = onnx_session(onnx_path, backend)
        emb = self.session_embeddings(session, tokenizer, texts, max_length, desc="MoE embeddings", progress=progress)
        cos = (unit(emb) * unit(dense)).sum(1)
        metrics = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                   "nn_agreement": float((nearest_neighbours(emb) == dense_nn).mean()), "heldout_texts": len(texts),
                   "backend": getattr(session, "backend", backend)}
        line = (f"held-out texts ({len(texts)}, as moe-eval): embedding cosine to the dense model mean "
                f"{metrics['cosine_mean']:.4f}, min {metrics['cosine_min']:.4f}; nearest-neighbour agreement "
                f"{metrics['nn_agreement']:.3f}")
        return metrics, line

    def validate(self, model, moes, onnx_path, batch, dense, *, tokenizer, backend, rtol, log):
        mask = batch["attention_mask"].numpy().astype(bool)
        with routing_margins(moes) as margins:
            want = self.outputs(model, batch)
        # Texts with a near-tied routing decision anywhere are left out of the comparison: there float32
        # rounding differences between PyTorch and ONNX Runtime may legitimately select another expert.
        clear = clear_texts(margins, mask)
        if not clear.any():
            raise ValidationError("every validation text has a near-tied routing decision; cannot validate")
        sess = onnx_session(onnx_path, backend)  # the standard target: stock ONNX Runtime
        backend = getattr(sess, "backend", backend)
        got = sess.run(["last_hidden_state"], {k: v.numpy() for k, v in batch.items()})[0]
        max_abs, max_rel = relative_difference(got, want, mask & clear[:, None])
        if not max_rel <= rtol:
            raise ValidationError(f"ONNX model differs from the PyTorch MoEfied model: max rel diff {max_rel:.2e} "
                                  f"> {rtol:.0e} (max abs {max_abs:.2e}); nothing was written")
        cos = float(cosine(mean_pool(got, mask), mean_pool(dense, mask)).mean())
        return Validation(backend, max_abs, max_rel, int(clear.sum()), int((~clear).sum()), {"cosine": cos})
