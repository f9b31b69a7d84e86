"""``export``: Hugging Face model directory -> MoEfied ONNX model, validated before it is written."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
import warnings

import numpy as np
import onnx
import torch
from torch import nn

from runtime import spec
from runtime.session import METADATA_KEY

from .calib_cache import calibrate, max_bytes
from .config import MoEConfig
from .distill import MAX_STEPS, DistillResult, check_distill, distill as distill_moe
from .moefy import (CORRECTIONS, ROUTERS, SPLITS, check_budget, check_split, install_moe, last_hidden_state,
                    load_model, moefy, needs_calibration, save_moefied)
from .moe_ffn import MoEFFN
from .outfile import atomic_path, check_output, check_output_dir, writing
from .datasets import calibration_texts
from .quantize import WEIGHT_TYPES
from .relufy import check_relufy, relufy as relufy_model
from .text import CALIB_LINES, DISTILL_TEXTS, SAMPLE_TEXTS, load_texts

TARGETS = ("custom", "standard", "ort-moe")
OPSET = 18  # what optimum uses for BERT, so both graphs get the same ORT fusions
TIE_MARGIN = 1e-5  # routing margins below this (relative to the largest score) count as ties
CALIBRATION_KEY = "moefy.calibration"  # metadata: which text calibrated the model (moe-eval reports it)


class ValidationError(RuntimeError):
    pass


@dataclasses.dataclass
class ExportReport:
    output: str
    target: str
    config: MoEConfig
    file_bytes: int
    max_abs_diff: float  # ONNX vs PyTorch MoEfied model, over real (unpadded) tokens
    max_rel_diff: float  # max_abs_diff / max |PyTorch output|
    cosine_moe_vs_dense: float  # mean over texts of mean-pooled embedding cosine
    validated_on: int  # number of texts compared
    tied_texts: int  # texts left out: a near-tied routing decision (see TIE_MARGIN)
    backend: str
    seconds: float
    weights: str = "float32"
    embedding: str | None = None  # --with-tokenizer: what the strings -> embeddings model does, and its check
    notes: tuple = ()  # what the target approximates (ort-moe: the erf GELU), one line each

    def summary(self) -> str:
        c = self.config
        ks = str(c.top_k) if c.layer_top_k is None else ",".join(map(str, c.layer_top_k))
        shared = f" ({c.shared_experts} shared)" if c.shared_experts else ""
        if c.dynamic_k is not None:
            shared += f", dynamic (k/{c.dynamic_k:g} to k*{c.dynamic_k:g} per token, k on average on calibration text)"
        return "\n".join([
            f"wrote {self.output} ({self.file_bytes / 2**20:.1f} MiB, target {self.target}, {self.weights} experts)",
            f"  experts {c.experts} x {c.expert_size} neurons, top-k {ks}{shared}: "
            f"{100 * c.active_share:.1f}% of FFN parameters active per token, {c.num_layers} layers",
            f"  vs PyTorch MoEfied model ({self.backend} backend, {self.validated_on} texts"
            f"{f', {self.tied_texts} with near-tied routing left out' if self.tied_texts else ''}): "
            f"max abs diff {self.max_abs_diff:.2e}, max rel diff {self.max_rel_diff:.2e}",
            f"  mean embedding cosine to the dense model: {self.cosine_moe_vs_dense:.4f}",
            *([f"  {self.embedding}"] if self.embedding else []),
            *(f"  note: {n}" for n in self.notes),
            f"  took {self.seconds:.1f} s",
        ])


class _Outputs(nn.Module):
    """Returns the task's outputs as a tuple (what the ONNX exporter traces)."""

    def __init__(self, model, input_names, output_names):
        super().__init__()
        self.model, self.input_names, self.output_names = model, list(input_names), list(output_names)

    def forward(self, *inputs):
        out = self.model(**dict(zip(self.input_names, inputs)))
        return tuple(out[n] for n in self.output_names)


def mean_pool(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings: hidden states averaged over real tokens (as sentence-transformers does)."""
    m = mask[..., None].astype(np.float64)
    return (h * m).sum(1) / np.maximum(m.sum(1), 1)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _record(result: DistillResult) -> dict:
    """What the config keeps of a distillation (rounded: it is a record, not an input)."""
    return {"steps": result.steps, "seconds": round(result.seconds, 1), "heldout_texts": result.heldout_texts,
            "heldout_loss": [round(c, 6) for c in result.loss], "heldout_cosine": [round(c, 6) for c in result.cosine],
            "layer_error": [[round(a, 6), round(b, 6)] for a, b in result.layer_error]}


def export(model_dir: str | os.PathLike, output: str | os.PathLike, *, experts: int = 32, top_k: int | None = None,
           target: str = "custom", split: str = "param", router: str = "centroid", correction: str = "none",
           shared_experts: int = 0, budget: float | None = None, dynamic_k: float | None = None,
           calib: str | os.PathLike | None = None,
           save_moefied_dir: str | os.PathLike | None = None, seed: int = 0, backend: str = "auto",
           rtol: float = 1e-4, weights: str = "float32", distill: float | None = None,
           distill_steps: int = MAX_STEPS, distill_texts: int = DISTILL_TEXTS, relufy: float | None = None,
           relufy_minutes: float = 2.0, calib_cache: bool = True, calib_cache_max_gb: float | None = None,
           with_tokenizer: bool = False,
           progress: bool = True, log=print) -> ExportReport:
    """MoEfy ``model_dir`` and write it to ``output`` as ONNX; see ``moe-export --help``.

    ``top_k`` defaults to 8 (re-exporting a saved MoEfied directory: to its own); ``budget`` instead
    chooses each layer's top_k from calibration so that on average that share of FFN parameters is active.
    ``relufy`` (a threshold shift, 0 for plain ReLU) swaps GELU for ReLU and recovers the dense model by
    distillation for ``relufy_minutes`` before MoEfication; ``distill`` (minutes) fine-tunes the MoEfied
    model towards the dense one; ``distill_steps`` caps each distillation's end-to-end steps and
    ``distill_texts`` the texts they train on (the calibration's first CALIB_LINES calibrate the MoE).
    ``calib_cache`` reads and writes the calibration activations' cache, trimmed to ``calib_cache_max_gb``
    (default: $MOEFY_CALIB_CACHE_MAX_GB, else calib_cache.DEFAULT_MAX_GB).

    The file appears only after the model passed ``onnx.checker`` and matched the PyTorch MoEfied
    model within ``rtol`` (max abs diff / max |output|) on the validation texts.

    ``with_tokenizer`` (sentence encoders): the file is instead a model from strings to sentence embeddings,
    onnxruntime-extensions' tokenizer in front and the model directory's pooling (sentence-transformers' config,
    else mean) and L2 normalisation behind (exporter/embed_model.py), written only after it also matched the HF
    tokenizer + session + NumPy pooling within 1e-4.
    """
    t0 = time.perf_counter()
    if target not in TARGETS:
        raise ValueError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    for flag, value, allowed in (("--split", split, SPLITS), ("--router", router, ROUTERS),
                                 ("--correction", correction, CORRECTIONS), ("--weights", weights, WEIGHT_TYPES)):
        if value not in allowed:
            raise ValueError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    if weights == "int8" and target == "standard":
        raise ValueError("--weights int8 needs --target custom or ort-moe (standard ONNX ops would compute with float "
                         "weights)")
    if budget is not None and top_k is not None:
        raise ValueError("give --top-k or --budget, not both")
    if dynamic_k is not None and not (isinstance(dynamic_k, (int, float)) and 1 < dynamic_k <= 64):
        raise ValueError(f"--dynamic-k must be a factor in (1, 64] (e.g. 2: each token computes k/2 to 2k experts), "
                         f"got {dynamic_k!r}")
    check_distill(distill, distill_steps, distill_texts)
    if calib_cache:
        max_bytes(calib_cache_max_gb)  # a bad cap (flag or environment) fails now
    if relufy is not None:
        check_relufy(relufy, relufy_minutes)
    if budget is not None:
        check_budget(budget, experts, shared_experts)
    else:
        check_split(experts, 8 if top_k is None else top_k, shared=shared_experts)  # before the (slow) model load
    output = check_output(output)  # a directory, a read-only place ...: said now, not after the work
    if save_moefied_dir:
        check_output_dir(save_moefied_dir, "--save-moefied")
    trains = distill is not None or relufy is not None
    n_texts = max(CALIB_LINES, distill_texts) if trains else CALIB_LINES  # calibration + distillation texts
    calib_texts = load_texts(calib) if calib is not None else None  # fail early on a bad file
    if calib_texts is not None and len(calib_texts) > n_texts:
        log(f"--calib: using the first {n_texts} of its {len(calib_texts)} lines")
        calib_texts = calib_texts[:n_texts]
    texts = list(SAMPLE_TEXTS)  # validation text, never used for calibration

    log(f"loading {model_dir}")
    model, tokenizer, adapter, moe_cfg, routers = load_model(model_dir)
    hf = model.config
    if moe_cfg is None:
        moe_cfg = MoEConfig(experts=experts, top_k=8 if top_k is None else top_k, activation=adapter.activation(hf),
                            model_type=hf.model_type, num_layers=len(adapter.layers(model)),
                            intermediate_size=hf.intermediate_size, seed=seed, split=split, router=router,
                            correction=correction, shared_experts=shared_experts, budget=budget, dynamic_k=dynamic_k)
    else:
        for flag, value in (("--budget", budget), ("--dynamic-k", dynamic_k), ("--distill", distill),
                            ("--relufy", relufy)):
            if value is not None:
                raise ValueError(f"{model_dir} is already MoEfied: {flag} needs the original dense model")
        if top_k is not None:
            if moe_cfg.dynamic_k is not None:
                log("  --top-k replaces the saved model's dynamic k (its thresholds were calibrated for another k)")
            moe_cfg.top_k, moe_cfg.layer_top_k, moe_cfg.budget = top_k, None, None
            moe_cfg.dynamic_k, moe_cfg.layer_threshold = None, None
        ks = moe_cfg.top_k if moe_cfg.layer_top_k is None else moe_cfg.layer_top_k
        log(f"  already MoEfied ({moe_cfg.experts} experts); reusing its split and routers, top-k {ks}")
    if moe_cfg.budget is None:
        check_split(moe_cfg.experts, moe_cfg.top_k, moe_cfg.intermediate_size, moe_cfg.shared_experts)
    else:  # the budget itself was checked above, or its per-layer top-k are being reused
        check_split(moe_cfg.experts, 1, moe_cfg.intermediate_size)

    if with_tokenizer:
        embedding = _embedding_settings(model_dir, tokenizer, adapter, target)
    if target == "ort-moe":  # what ONNX Runtime's MoE / QMoE cannot express, said before the work
        from .ort_moe import check_config
        check_config(moe_cfg.activation if relufy is None else "relu", weights=weights,
                     dynamic_k=moe_cfg.dynamic_k is not None)
    if relufy is not None and moe_cfg.activation not in ("gelu", "gelu_tanh"):
        raise ValueError(f"--relufy replaces a GELU activation; this model's is {moe_cfg.activation}")

    max_length = min(128, getattr(hf, "max_position_embeddings", 128))

    def tokenize(sample):
        b = tokenizer(sample, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {k: b[k] for k in adapter.input_names if k in b}  # optimum's input order

    batch = tokenize(texts)
    mask = batch["attention_mask"].numpy().astype(bool)
    dense = last_hidden_state(model, batch)

    calibration = {"source": "none (not needed by this recipe)" if routers is None
                   else f"as when {model_dir} was MoEfied (--save-moefied)"}
    if routers is None:
        calib_batch = train_batch = None
        if needs_calibration(moe_cfg) or trains:
            pool, source = (calib_texts, f"--calib {calib}") if calib_texts else calibration_texts(n_texts)
            sample = pool[:CALIB_LINES]
            calibration = {"source": source, "texts": len(sample)}
            log(f"calibrating on {len(sample)} texts ({source})")
            calib_batch = tokenize(sample)
            if trains:
                calibration["distillation_texts"] = len(pool)
                log(f"distillation text: {len(pool)} texts ({source})")
                train_batch = tokenize(pool) if len(pool) > len(sample) else calib_batch
        calibrated = lambda m, b: calibrate(m, adapter, b, use_cache=calib_cache, max_gb=calib_cache_max_gb,
                                               log=log)  # noqa: E731
        teacher = copy.deepcopy(model) if trains else None
        teacher_train = calibrated(teacher, train_batch) if teacher is not None else None
        if relufy is not None:
            log(f"ReLU-fying (threshold shift {relufy:g}) and recovering the dense model by distillation")
            result = relufy_model(model, teacher, adapter, teacher_train, train_batch, shift=relufy,
                                  minutes=relufy_minutes, max_steps=distill_steps, seed=seed, progress=progress,
                                  log=log)
            moe_cfg.activation = adapter.activation(model.config)
            moe_cfg.relufy = {"shift": relufy, "minutes": relufy_minutes, "max_steps": distill_steps,
                              **_record(result)}
        # The model's own FFN inputs on the calibration text: the teacher's (the calibration texts are the first
        # of the distillation texts) unless --relufy changed the model.
        calib_acts = None if not needs_calibration(moe_cfg) else \
            teacher_train.first_texts(len(sample)) if teacher is not None and relufy is None else \
            calibrated(model, calib_batch)
        routers = moefy(model, adapter, moe_cfg, calib_acts, progress=progress, log=log)
        del calib_acts
        if distill is not None:
            log(f"distilling the MoEfied model for at most {distill:g} min, {distill_steps} end-to-end steps")
            routers, result = distill_moe(model, teacher, adapter, moe_cfg, routers, teacher_train, train_batch,
                                          minutes=distill, max_steps=distill_steps, seed=seed, progress=progress,
                                          log=log)
            moe_cfg.distill = {"minutes": distill, "max_steps": distill_steps, **_record(result)}
        if save_moefied_dir:
            save_moefied(save_moefied_dir, model, tokenizer, moe_cfg, routers)
            log(f"saved the MoEfied model to {save_moefied_dir} (re-export it without re-splitting)")
    install_moe(model, adapter, moe_cfg, routers, target="standard" if target == "standard" else "custom")
    moe_modules = [m for m in model.modules() if isinstance(m, MoEFFN)]
    if weights == "int8":
        for m in moe_modules:
            m.quantize_int8()
    # ort-moe computes BERT's erf GELU as ONNX Runtime's tanh form: the file is validated against the PyTorch model
    # with that GELU (what it computes), and its distance to the erf model is reported.
    approximated = target == "ort-moe" and moe_cfg.activation == "gelu"
    moe_erf = last_hidden_state(model, batch) if approximated else None
    for m in moe_modules:
        m.record_gaps = True
        if approximated:
            m.activation = "gelu_tanh"
    moe_torch = last_hidden_state(model, batch)
    # Texts with a near-tied routing decision anywhere are left out of the comparison: there float32
    # rounding differences between PyTorch and ONNX Runtime may legitimately select another expert.
    margin = torch.stack([m.gaps for m in moe_modules]).amin(0).numpy()  # [texts, tokens]
    clear = np.where(mask, margin, np.inf).min(1) >= TIE_MARGIN
    for m in moe_modules:
        m.record_gaps, m.gaps = False, None
        if approximated:
            m.activation = "gelu"  # the traced graph carries the model's own activation; the rewrite maps it
    if not clear.any():
        raise ValidationError("every validation text has a near-tied routing decision; cannot validate")

    log(f"tracing to ONNX ({target} target)")
    notes = []
    wrapper = _Outputs(model, batch, adapter.output_names)
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in list(batch) + list(adapter.output_names)}
    # Written to a temporary file beside the output, renamed onto it once validated (outfile.py).
    with atomic_path(output) as tmp:
        tmp = str(tmp)
        # The TorchScript exporter is deprecated upstream but is the one that carries custom ops
        # through autograd.Function.symbolic; its warnings (and HF's tracer warnings) are noise here.
        with writing(output), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, tuple(batch.values()), tmp, dynamo=False, input_names=list(batch),
                              output_names=list(adapter.output_names), dynamic_axes=axes, opset_version=OPSET,
                              custom_opsets={spec.DOMAIN: spec.VERSION}, do_constant_folding=True)
        proto = onnx.load(tmp)
        proto.metadata_props.add(key=METADATA_KEY, value=json.dumps({**moe_cfg.to_dict(), "weights": weights}))
        proto.metadata_props.add(key=CALIBRATION_KEY, value=json.dumps(calibration))
        with writing(output):
            onnx.save(proto, tmp)
        if target == "ort-moe":
            from .ort_moe import convert_model
            log("rewriting the sparse FFNs onto ONNX Runtime's com.microsoft::MoE / QMoE")
            proto, ops, notes = convert_model(proto)
            with writing(output):
                onnx.save(proto, tmp)
        onnx.checker.check_model(tmp, full_check=False)

        log("validating with ONNX Runtime")
        feed = {k: v.numpy() for k, v in batch.items()}
        if target == "custom":
            from runtime import InferenceSession
            sess = InferenceSession(tmp, backend=backend)
            used = sess.backend
        else:  # standard, ort-moe: a stock session, no custom-op library
            import onnxruntime as ort
            sess, used = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"]), "onnxruntime"
        got = sess.run([adapter.output_names[0]], feed)[0]
        keep = mask & clear[:, None]
        max_abs = float(np.abs(got - moe_torch)[keep].max())
        max_rel = max_abs / float(np.abs(moe_torch[keep]).max())
        cos = float(_cosine(mean_pool(got, mask), mean_pool(dense, mask)).mean())
        if approximated:
            erf_cos = float(_cosine(mean_pool(got, mask), mean_pool(moe_erf, mask)).min())
            erf_abs = float(np.abs(got - moe_erf)[keep].max())
            notes = [f"validated against the MoEfied model with tanh GELU; to its erf-GELU form (PyTorch): lowest "
                     f"embedding cosine {erf_cos:.6f}, max abs diff {erf_abs:.2e} (a near-tied routing decision "
                     "may go the other way)", *notes]
        if not max_rel <= rtol:
            raise ValidationError(f"ONNX model differs from the PyTorch MoEfied model: max rel diff {max_rel:.2e} "
                                  f"> {rtol:.0e} (max abs {max_abs:.2e}); nothing was written")
        del sess
        embedded = None
        if with_tokenizer:
            from .embed_model import INPUT, OUTPUT, write_checked
            with writing(output):
                diff = write_checked(proto, tokenizer, tmp, **embedding, log=log)
            embedded = (f"strings '{INPUT}' [N] -> '{OUTPUT}' [N, {hf.hidden_size}]: onnxruntime-extensions' "
                        f"tokenizer (at most {embedding['max_length']} tokens per text), {embedding['pooling']} "
                        f"pooling, L2-normalised; max abs diff to HF tokenizer + session + NumPy pooling {diff:.1e}")
    return ExportReport(str(output), target, moe_cfg, output.stat().st_size, max_abs, max_rel, cos,
                        int(clear.sum()), int((~clear).sum()), used, time.perf_counter() - t0, weights, embedded,
                        tuple(notes))


def _embedding_settings(model_dir, tokenizer, adapter, target: str) -> dict:
    """--with-tokenizer's max_length and pooling (from the model directory), or why it cannot be done here."""
    from pathlib import Path

    from .embed_model import check_tokenizer, settings
    if "last_hidden_state" not in adapter.output_names:
        raise ValueError("--with-tokenizer makes sentence embeddings from an encoder's last_hidden_state; this "
                         f"model's outputs are {', '.join(adapter.output_names)}")
    check_tokenizer(tokenizer)
    if target == "custom":
        from runtime import cpp_available
        if not cpp_available():  # the strings model runs in plain ONNX Runtime, with moefy's library registered
            raise ValueError("--with-tokenizer with --target custom needs moefy's C++ op library, which was not "
                             "built (see cpp_ops/README.md); use --target standard, or build the library")
    max_length, pooling = settings(Path(model_dir), tokenizer, None, None)
    return {"max_length": max_length, "pooling": pooling}
