"""Encoders (feature extraction): token ids in, last_hidden_state out; sentence embeddings by mean pooling."""
from __future__ import annotations

import numpy as np
import torch

from ..moe_ffn import routing_margins
from .base import Task, Validation, ValidationError, clear_texts, register, relative_difference


def mean_pool(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings: hidden states averaged over real tokens (as sentence-transformers does)."""
    m = mask[..., None].astype(np.float64)
    return (h * m).sum(1) / np.maximum(m.sum(1), 1)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@register
class FeatureExtraction(Task):
    name = "feature-extraction"
    optimum_task = "feature-extraction"
    auto_class = "AutoModel"

    def model_inputs(self, model):
        return tuple(self.onnx_config(model).inputs)  # optimum's input order (BERT: with token_type_ids)

    @torch.no_grad()
    def outputs(self, model, batch):
        return model(**batch).last_hidden_state.numpy()

    def validate(self, model, moes, onnx_path, batch, dense, *, tokenizer, backend, rtol, log):
        from runtime import InferenceSession
        mask = batch["attention_mask"].numpy().astype(bool)
        with routing_margins(moes) as margins:
            want = self.outputs(model, batch)
        # Texts with a near-tied routing decision anywhere are left out of the comparison: there float32
        # rounding differences between PyTorch and ONNX Runtime may legitimately select another expert.
        clear = clear_texts(margins, mask)
        if not clear.any():
            raise ValidationError("every validation text has a near-tied routing decision; cannot validate")
        if backend == "onnxruntime":  # the standard target: stock ONNX Runtime
            import onnxruntime as ort
            sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        else:
            sess = InferenceSession(onnx_path, backend=backend)
            backend = sess.backend
        got = sess.run(["last_hidden_state"], {k: v.numpy() for k, v in batch.items()})[0]
        max_abs, max_rel = relative_difference(got, want, mask & clear[:, None])
        if not max_rel <= rtol:
            raise ValidationError(f"ONNX model differs from the PyTorch MoEfied model: max rel diff {max_rel:.2e} "
                                  f"> {rtol:.0e} (max abs {max_abs:.2e}); nothing was written")
        cos = float(cosine(mean_pool(got, mask), mean_pool(dense, mask)).mean())
        return Validation(backend, max_abs, max_rel, int(clear.sum()), int((~clear).sum()), {"cosine": cos},
                          [f"mean embedding cosine to the dense model: {cos:.4f}"])
