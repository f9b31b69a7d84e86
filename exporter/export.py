"""``export``: a Hugging Face model (directory or ``.gguf`` file) -> MoEfied ONNX, validated before it is written.

Stages: resolve (``source.py``) -> calibrate -> convert (split, routers, corrections) -> train (optional)
-> trace (optimum's ONNX config and patchers for the task, the MoE FFN as one custom node) -> validate
(the task's checks against the PyTorch MoEfied model) -> write (atomically: a file, or a directory that
optimum's ``ORTModel*.from_pretrained`` loads as it is). :func:`convert` is the first four stages alone,
for other layouts of the same MoE.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import onnx
import torch

from runtime import spec
from runtime.session import METADATA_KEY

from . import arch
from .calib_cache import calibrate
from .config import MoEConfig
from .datasets import calibration_texts, heldout_texts
from .distill import ACTIVATIONS_MAX_GB, DistillResult, distill as distill_moe, layerwise_texts
from .moe_ffn import MoEFFN
from .genai_layout import GenaiLayoutError, add_to_export, genai_precision
from .moefy import build_moes, check_split, moefy, needs_calibration, operator_inputs, save_moefied
from .outfile import check_output, check_output_dir, remove_stale, temp_name, writing
from .recipe import Recipe, split_settings
from .relufy import relufy as relufy_model
from .source import check_source, load_model, model_type_of
from .tasks import Task, ValidationError, task_for
from .tasks.decoder import GREEDY_TOKENS, TextGeneration, torch_greedy
from .text import SAMPLE_PROMPTS, SAMPLE_TEXTS, load_texts

__all__ = ["Converted", "ExportReport", "ValidationError", "convert", "export"]

OPSET = 18  # at least what optimum uses for these families, so both graphs get the same ORT fusions
CALIBRATION_KEY = "moefy.calibration"  # metadata: which text calibrated the model (moe-eval reports it)
MODEL_FILE = "model.onnx"
EXTERNAL_DATA = "model.onnx_data"  # optimum's name for the weights of models past protobuf's 2 GB
MAX_PROTOBUF = 2**31 - 2**26  # bytes: beyond this the weights go to external data (with some room for the graph)
EXPORT_INFO = "moefy.json"  # in an export directory: the MoE config, calibration and validation figures
EMBED_FILE = "sentence_embedding.onnx"  # in an export directory with --with-tokenizer: strings -> embeddings
MAX_LENGTH = 128  # tokens per calibration / validation text


@dataclasses.dataclass
class ExportReport:
    output: str
    target: str
    config: MoEConfig
    file_bytes: int
    max_abs_diff: float  # ONNX vs PyTorch MoEfied model, over real (unpadded) tokens
    max_rel_diff: float  # max_abs_diff / max |PyTorch output|
    cosine_moe_vs_dense: float | None  # encoders: moe-eval's held-out cosine (mean-pooled embeddings, mean)
    validated_on: int  # number of texts compared
    tied_texts: int  # texts left out: a near-tied routing decision
    backend: str
    seconds: float
    weights: str = "float32"
    task: str = "feature-extraction"
    metrics: dict = dataclasses.field(default_factory=dict)  # validation figures and held-out fidelity to dense
    lines: list = dataclasses.field(default_factory=list)
    recipe: str = ""  # Recipe.describe() of the recipe applied
    calibration: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        c = self.config
        ks = str(c.top_k) if c.layer_top_k is None else ",".join(map(str, c.layer_top_k))
        shared = f" ({c.shared_experts} shared)" if c.shared_experts else ""
        if c.lowrank:
            shared += f", plus a rank-{c.lowrank} low-rank stand-in ({100 * c.lowrank_share:.1f}%)"
        if c.dynamic_k is not None:
            shared += f", dynamic (k/{c.dynamic_k:g} to k*{c.dynamic_k:g} per token, k on average on calibration text)"
        return "\n".join([
            f"wrote {self.output} ({self.file_bytes / 2**20:.1f} MiB, {self.task}, target {self.target}, "
            f"{self.weights} experts)",
            *([f"  recipe {self.recipe}; calibration: {_calibration_words(self.calibration)}"] if self.recipe else []),
            f"  experts {c.experts} x {c.expert_size} neurons{' (gated)' if c.gated else ''}, top-k {ks}{shared}: "
            f"{100 * c.active_share:.1f}% of FFN parameters active per token, {c.num_layers} layers",
            f"  vs PyTorch MoEfied model ({self.backend} backend, {self.validated_on} texts"
            f"{f', {self.tied_texts} with near-tied routing left out' if self.tied_texts else ''}): "
            f"max abs diff {self.max_abs_diff:.2e}, max rel diff {self.max_rel_diff:.2e}",
            *(f"  {line}" for line in self.lines),
            f"  took {self.seconds:.1f} s",
        ])


def _calibration_words(calibration: dict) -> str:
    words = str(calibration.get("source", "?"))
    return words + (f" ({calibration['texts']} texts)" if "texts" in calibration else "")


@dataclasses.dataclass
class Converted:
    """A MoEfied model in PyTorch: ``model`` still computes its dense FFNs (neurons permuted so experts are
    contiguous; weights trained if the recipe trains) until ``with converted.patched():`` swaps in ``moes``."""
    model: torch.nn.Module
    tokenizer: object
    adapter: arch.FFNAdapter
    task: Task
    config: MoEConfig
    routers: dict
    moes: list[MoEFFN]
    calibration: dict  # where the calibration text came from
    dense: torch.nn.Module  # the dense source model (``model`` itself unless the recipe trained it)
    recipe: Recipe  # as applied: resolved for the FFN family (unless the source was already MoEfied)

    def patched(self):
        return arch.patched(self.model, self.adapter, self.moes)

    def operator_inputs(self) -> list[dict]:
        """Per layer, the SparseExpertFFN node's inputs and attributes (see :func:`moefy.operator_inputs`)."""
        return operator_inputs(self.moes)


def _record(result: DistillResult) -> dict:
    """What the config keeps of a distillation (rounded: it is a record, not an input)."""
    return {"steps": result.steps, "arithmetic": "bfloat16" if result.bf16 else "float32",
            "seconds": round(result.seconds, 1), "heldout_texts": result.heldout_texts,
            "heldout_loss": [round(c, 6) for c in result.loss], f"heldout_{result.figure_name}": [round(c, 6) for c in result.figure],
            "layer_error": [[round(a, 6), round(b, 6)] for a, b in result.layer_error]}


def _calibration_pool(recipe: Recipe, log) -> list[str] | None:
    """The --calib file's lines (read now: a bad file fails before the model loads), cut to what is used."""
    if recipe.calib is None:
        return None
    texts = load_texts(recipe.calib)
    n = recipe.corpus_texts
    if len(texts) > n:
        log(f"--calib: using the first {n} of its {len(texts)} lines")
        texts = texts[:n]
    return texts


def convert(source: str | os.PathLike, recipe: Recipe | None = None, *, progress: bool = True, log=print,
            **settings) -> Converted:
    """MoEfy a Hugging Face directory, ``.gguf`` file or ``--save-moefied`` directory with ``recipe`` (its fields
    as keywords also work: ``convert(path, experts=32, top_k=8)``; of the export options, ``target`` and
    ``save_moefied_dir`` apply). No ONNX: see :func:`export`."""
    recipe, options = split_settings(recipe, settings)
    recipe.check()
    options.check(recipe)
    user_texts = _calibration_pool(recipe, log)
    return _convert(source, recipe, user_texts, target=options.target, save_moefied_dir=options.save_moefied_dir,
                    progress=progress, log=log)


def _convert(source, recipe: Recipe, user_texts, *, target, save_moefied_dir, progress, log) -> Converted:
    log(f"loading {source}")
    model, tokenizer, adapter, moe_cfg, routers = load_model(source)
    task = task_for(adapter)
    hf = model.config
    if moe_cfg is None:
        first = adapter.read(adapter.layers(model)[0])
        recipe = recipe.resolved(first.gated, first.width(), target)
        log(f"recipe {recipe.describe()}")
        moe_cfg = MoEConfig.from_recipe(
            recipe, top_k=recipe.top_k_or_default,
            activation=adapter.activation(hf), model_type=hf.model_type, num_layers=len(adapter.layers(model)),
            intermediate_size=first.width(), task=task.name, gated=first.gated)
    else:
        for flag, value in (("--budget", recipe.budget), ("--dynamic-k", recipe.dynamic_k),
                            ("--distill", recipe.distill), ("--relufy", recipe.relufy), ("--lowrank", recipe.lowrank or None),
                            ("--sequential", recipe.sequential or None), ("--recipe best", "best" if recipe.preset == "best" else None)):
            if value is not None:
                raise ValueError(f"{source} is already MoEfied: {flag} needs the original dense model")
        if recipe.top_k is not None:
            if moe_cfg.dynamic_k is not None:
                log("  --top-k replaces the saved model's dynamic k (its thresholds were calibrated for another k)")
            moe_cfg.top_k, moe_cfg.layer_top_k, moe_cfg.budget = recipe.top_k, None, None
            moe_cfg.dynamic_k, moe_cfg.layer_threshold = None, None
        recipe = dataclasses.replace(recipe, weights=recipe.weights_for(target))
        ks = moe_cfg.top_k if moe_cfg.layer_top_k is None else moe_cfg.layer_top_k
        log(f"  already MoEfied ({moe_cfg.experts} experts); reusing its split and routers, top-k {ks}")
    if moe_cfg.budget is None:
        check_split(moe_cfg.experts, moe_cfg.top_k, moe_cfg.intermediate_size, moe_cfg.shared_experts)
    else:  # the budget itself was checked with the recipe, or its per-layer top-k are being reused
        check_split(moe_cfg.experts, 1, moe_cfg.intermediate_size)
    if recipe.relufy is not None and moe_cfg.activation not in ("gelu", "gelu_tanh"):
        raise ValueError(f"--relufy replaces a GELU activation; this model's is {moe_cfg.activation}")
    if target == "ort-moe":  # what ONNX Runtime's MoE / QMoE cannot express, said before the work
        from .ort_moe import check_config
        check_config("relu" if recipe.relufy is not None else moe_cfg.activation, weights=recipe.weights,
                     gated=moe_cfg.gated, dynamic_k=moe_cfg.dynamic_k is not None)

    max_length = min(MAX_LENGTH, getattr(hf, "max_position_embeddings", MAX_LENGTH))
    tokenize = lambda texts: task.batch(tokenizer, texts, model, max_length)  # noqa: E731
    calibration = {"source": "none (not needed by this recipe)" if routers is None
                   else f"as when {source} was MoEfied (--save-moefied)"}
    teacher = None
    if routers is None:
        calib_batch = train_batch = None
        if needs_calibration(moe_cfg) or recipe.trains:
            if user_texts:  # the user's text as given
                pool, where = user_texts, f"--calib {recipe.calib}"
            else:
                pool, where = calibration_texts(recipe.corpus_texts, log)
                pool, change = task.default_calibration(tokenizer, pool)
                where += f", {change}" if change else ""
            sample = pool[:recipe.calib_texts]
            calibration = {"source": where, "texts": len(sample)}
            log(f"calibrating on {len(sample)} texts ({where})")
            calib_batch = tokenize(sample)
            if recipe.trains:
                train_texts, added = task.distillation_texts(pool, recipe.seed)
                calibration["distillation_texts"] = len(train_texts)
                log(f"distillation text: {len(train_texts)} texts ({where}{', ' + added if added else ''})")
                train_batch = tokenize(train_texts) if len(train_texts) > len(sample) else calib_batch
        calibrated = lambda m, b: calibrate(m, adapter, b, use_cache=recipe.calib_cache,  # noqa: E731
                                            max_gb=recipe.calib_cache_max_gb, log=log)
        teacher = copy.deepcopy(model) if recipe.trains else None
        teacher_train = None
        if teacher is not None:  # the layer-wise phase's FFN inputs: the first texts that fit in memory
            n_fit = max(len(sample), layerwise_texts(train_batch, teacher.config))
            teacher_train = calibrated(teacher, {k: v[:n_fit] for k, v in train_batch.items()})
            if n_fit < len(train_texts):
                log(f"  layer-wise distillation on the first {n_fit} texts (their activations within "
                    f"{ACTIVATIONS_MAX_GB:g} GB); end to end on all {len(train_texts)}")
        if recipe.relufy is not None:
            log(f"ReLU-fying (threshold shift {recipe.relufy:g}) and recovering the dense model by distillation")
            result = relufy_model(model, teacher, adapter, teacher_train, train_batch, shift=recipe.relufy,
                                  minutes=recipe.relufy_minutes, max_steps=recipe.distill_steps, seed=recipe.seed,
                                  progress=progress, log=log)
            moe_cfg.activation = adapter.activation(model.config)
            moe_cfg.relufy = {"shift": recipe.relufy, "minutes": recipe.relufy_minutes,
                              "max_steps": recipe.distill_steps, **_record(result)}
        # The MoE calibrates on the model it splits: after --relufy that is the ReLU model; otherwise the
        # teacher's activations (already captured for distillation) are the model's.
        calib_acts = None if not needs_calibration(moe_cfg) else \
            teacher_train.first_texts(len(sample)) if teacher is not None and recipe.relufy is None else \
            calibrated(model, calib_batch)
        routers = moefy(model, adapter, moe_cfg, calib_acts, batch=calib_batch, progress=progress, log=log)
        del calib_acts
        if recipe.distill is not None:
            log(f"distilling the MoEfied model for at most {recipe.distill:g} min, {recipe.distill_steps} end-to-end "
                "steps")
            routers, result = distill_moe(model, teacher, adapter, moe_cfg, routers, teacher_train, train_batch,
                                          minutes=recipe.distill, max_steps=recipe.distill_steps, seed=recipe.seed,
                                          progress=progress, log=log, release_calib=True)  # its last use
            moe_cfg.distill = {"minutes": recipe.distill, "max_steps": recipe.distill_steps, **_record(result)}
        if save_moefied_dir:
            save_moefied(save_moefied_dir, model, tokenizer, moe_cfg, routers)
            log(f"saved the MoEfied model to {save_moefied_dir} (re-export it without re-splitting)")
    moes = build_moes(model, adapter, moe_cfg, routers, target="standard" if target == "standard" else "custom")
    for m in moes:
        if recipe.weights == "int8":
            m.quantize_int8()
        elif recipe.weights == "float16":
            m.round_float16()
    return Converted(model, tokenizer, adapter, task, moe_cfg, routers, moes, calibration,
                     teacher if teacher is not None else model, recipe)


# ----------------------------------------------------------------------------- trace and write
def _trace(converted: Converted, path: Path) -> None:
    """The MoEfied model to ONNX through optimum's ONNX config and patchers for the task."""
    from optimum.exporters.onnx.convert import export_pytorch
    model, task = converted.model, converted.task
    onnx_config = task.onnx_config(model)
    opset = max(OPSET, onnx_config.DEFAULT_ONNX_OPSET)
    # The TorchScript exporter (what optimum runs) is deprecated upstream but is the one that carries custom
    # ops through autograd.Function.symbolic; its warnings (and HF's tracer warnings) are noise here.
    with converted.patched(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_pytorch(model, onnx_config, opset, path)


def _finish_onnx(path: Path, metadata: dict, data_name: str = EXTERNAL_DATA, target: str = "custom") -> list[str]:
    """Record moefy's metadata, declare the operator's domain version, and keep weights past protobuf's limit
    in one external data file ``data_name`` beside the model (optimum's layout); then onnx.checker. The ort-moe
    target's rewrite onto ONNX Runtime's MoE / QMoE happens here (its notes are returned)."""
    proto = onnx.load(str(path))
    for opset in proto.opset_import:
        if opset.domain == spec.DOMAIN:  # the TorchScript exporter declares version 1 for custom domains
            opset.version = spec.VERSION
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    notes = []
    if target == "ort-moe":
        from .ort_moe import convert_model
        proto, _, notes = convert_model(proto)
    (path.parent / EXTERNAL_DATA).unlink(missing_ok=True)  # optimum's external data, if any: in memory now
    big = sum(t.ByteSize() for t in proto.graph.initializer) > MAX_PROTOBUF
    onnx.save(proto, str(path), save_as_external_data=big, all_tensors_to_one_file=True, location=data_name,
              size_threshold=1024)
    onnx.checker.check_model(str(path), full_check=False)
    return notes


class _Output:
    """Where the export goes: ``.onnx`` -> that one file (plus its external data, if any); otherwise a
    directory. Everything is built in a temporary directory beside it (outfile.py's naming, so a killed run's
    leftovers are removed by the next) and moved into place only after validation: a failure leaves no partial
    output. What can be checked (a writable place, not someone else's directory) is checked before the work."""

    def __init__(self, output: str | os.PathLike):
        self.path = Path(output)
        self.single_file = self.path.suffix.lower() == ".onnx"
        if self.single_file:
            check_output(self.path)
        else:
            check_output_dir(self.path, "output")
            if self.path.exists() and not self._replaceable(self.path):
                raise ValueError(f"{self.path} exists and is not a moefy export directory; choose another output "
                                 "(an existing export directory is replaced)")

    @staticmethod
    def _replaceable(path: Path) -> bool:
        return path.is_dir() and (not any(path.iterdir()) or (path / EXPORT_INFO).is_file())

    def __enter__(self) -> Path:
        remove_stale(self.path)
        self.tmp = temp_name(self.path)
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()  # mode 0777 less the umask, as the directory itself should be
        return self.tmp

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def data_name(self) -> str:
        """The external data file's name (used only past 2 GB): optimum's in a directory, else NAME.onnx_data."""
        return f"{self.path.name}_data" if self.single_file else EXTERNAL_DATA

    def commit(self) -> int:
        """Move the built files into place; returns the model's size in bytes."""
        with writing(self.path):
            return self._commit()

    def _commit(self) -> int:
        model, data = self.tmp / MODEL_FILE, self.tmp / self.data_name
        size = model.stat().st_size + (data.stat().st_size if data.is_file() else 0)
        if self.single_file:
            if data.is_file():
                os.replace(data, self.path.parent / self.data_name)
            os.replace(model, self.path)
            return size
        old = None
        if self.path.exists():
            old = temp_name(self.path)  # removed below; a kill in between leaves it to remove_stale
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        self.tmp = self.path.parent / f".{self.path.name}.gone"  # nothing left for __exit__ to remove
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return size


def _add_genai(source, converted: Converted, directory: Path, precision: str, tie: float, metadata: dict,
               progress: bool, log) -> dict:
    """onnxruntime-genai's layout of the same MoE beside optimum's (genai_layout.add_to_export)."""
    tokenizer = converted.tokenizer
    context = getattr(converted.model.config, "max_position_embeddings", None) or 2**31
    prompts = [tokenizer(p)["input_ids"] for p in SAMPLE_PROMPTS]
    new_tokens = min([GREEDY_TOKENS] + [context - len(p) for p in prompts])

    def reference(prompt, n):
        with converted.patched():
            return torch_greedy(converted.model, converted.moes, prompt, n, tie)
    checked = add_to_export(source, converted.operator_inputs(), directory, precision, reference=reference,
                            prompts=prompts, new_tokens=new_tokens,
                            metadata={k: json.dumps(v) for k, v in metadata.items()}, progress=progress, log=log)
    log(f"onnxruntime-genai layout ({precision} dense parts): greedy tokens identical to PyTorch on "
        f"{checked['identical']} of {checked['prompts']} prompts")
    return checked


def _embedding_settings(source, task: Task, target: str) -> dict:
    """--with-tokenizer's max_length and pooling (from the model directory), or why it cannot be done here."""
    from .embed_model import EmbeddingModelError, tokenizer_settings
    from .tasks.encoder import FeatureExtraction
    if task.name != FeatureExtraction.name:
        raise ValueError(f"--with-tokenizer makes sentence embeddings from an encoder; this model's task is "
                         f"{task.name}")
    source = Path(source)
    if not source.is_dir():
        raise ValueError(f"--with-tokenizer needs a Hugging Face model directory (its tokenizer), got {source}")
    if target == "custom":
        from runtime import cpp_available
        if not cpp_available():  # the strings model runs in plain ONNX Runtime, with moefy's library registered
            raise ValueError("--with-tokenizer with --target custom needs moefy's C++ op library, which was not "
                             "built (see cpp_ops/README.md); use --target ort-moe or standard, or build the library")
    try:
        _, max_length, pooling = tokenizer_settings(source)
    except EmbeddingModelError as e:
        raise ValueError(f"--with-tokenizer: {e}") from None
    return {"max_length": max_length, "pooling": pooling}


class _activation:
    """Within the block, every MoE FFN computes ``activation`` (None: unchanged); restored afterwards."""

    def __init__(self, moes: list[MoEFFN], activation: str | None):
        self.moes, self.activation = moes, activation

    def __enter__(self):
        self.saved = [m.activation for m in self.moes]
        if self.activation is not None:
            for m in self.moes:
                m.activation = self.activation

    def __exit__(self, *exc):
        for m, a in zip(self.moes, self.saved):
            m.activation = a


def _erf_distance(converted: Converted, path: Path, batch) -> str:
    """How far the ort-moe file (tanh GELU) is from the erf-GELU MoEfied model: encoders, embedding cosine and
    max abs diff; other tasks, only that it was validated against the tanh form."""
    from .tasks.encoder import FeatureExtraction, cosine, mean_pool
    head = "validated against the MoEfied model with ONNX Runtime's tanh GELU"
    if converted.task.name != FeatureExtraction.name:
        return head
    import numpy as np
    import onnxruntime as ort
    mask = batch["attention_mask"].numpy().astype(bool)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["last_hidden_state"], {k: v.numpy() for k, v in batch.items()})[0]
    with converted.patched():
        erf = converted.task.outputs(converted.model, batch)
    cos = float(cosine(mean_pool(got, mask), mean_pool(erf, mask)).min())
    return (f"{head}; to its erf form: lowest embedding cosine {cos:.6f}, max abs diff "
            f"{float(np.abs(got - erf)[mask].max()):.2e} (a near-tied routing decision may go the other way)")


def export(source: str | os.PathLike, output: str | os.PathLike, recipe: Recipe | None = None, *,
           progress: bool = True, log=print, **settings) -> ExportReport:
    """MoEfy ``source`` (a Hugging Face model directory, a ``.gguf`` file, or a ``--save-moefied`` directory)
    and write it as ONNX to ``output``: an ``.onnx`` file, or a directory that optimum's ``ORTModel*`` loads
    as it is (model.onnx, config.json, tokenizer files, generation_config.json for decoders, moefy.json).

    ``settings`` are the fields of :class:`~exporter.recipe.Recipe` (experts, top_k, split, router, ...) and
    of :class:`~exporter.recipe.ExportOptions` (target, backend, rtol, save_moefied_dir), with the same
    names, meanings and defaults as ``moe-export``'s flags (``moe-export --help``). ``recipe`` gives the
    recipe as an object (keywords override its fields).

    The output appears only after the model passed ``onnx.checker`` and the task's validation against the
    PyTorch MoEfied model: encoders, max abs diff / max |output| <= ``rtol`` on the validation texts;
    decoders, the same on logits, and greedy tokens identical for 32 new tokens on sample prompts.
    """
    t0 = time.perf_counter()
    recipe, options = split_settings(recipe, settings)
    recipe.check()
    options.check(recipe)
    out = _Output(output)  # a directory, a read-only place ...: said now, not after the work
    adapter = check_source(source)  # an unsupported or unreadable model fails before the (slow) load
    decoder_dir = task_for(adapter).name == TextGeneration.name and not out.single_file
    genai = genai_precision(options.genai, decoder_directory=decoder_dir, model_type=model_type_of(Path(source))[0])
    if genai and recipe.trains:  # the builder takes attention and norms from the source, not the trained model
        if options.genai != "auto":
            raise ValueError("--genai builds from the source model's attention and norms; with --distill or --relufy "
                             "those are trained: pass --genai off")
        genai = None
    if genai and options.target != "custom":  # the layout's MLPs are moefy's operator
        if options.genai != "auto":
            raise ValueError(f"--genai builds moefy's operator into onnxruntime-genai's graph; with --target "
                             f"{options.target} pass --genai off")
        genai = None
    if decoder_dir and not genai and options.genai == "auto":
        log("(no onnxruntime-genai layout: needs the model builder's environment, `make genai-venv`, and a recipe "
            "without training)")
    if options.save_moefied_dir:
        check_output_dir(options.save_moefied_dir, "--save-moefied")
    embedding = _embedding_settings(source, task_for(adapter), options.target) if options.with_tokenizer else None
    user_texts = _calibration_pool(recipe, log)
    converted = _convert(source, recipe, user_texts, target=options.target,
                         save_moefied_dir=options.save_moefied_dir, progress=progress, log=log)
    model, task, cfg = converted.model, converted.task, converted.config
    max_length = min(MAX_LENGTH, getattr(model.config, "max_position_embeddings", MAX_LENGTH))
    batch = task.batch(converted.tokenizer, SAMPLE_TEXTS, model, max_length)  # held out: never calibrates
    dense = task.outputs(converted.dense, batch)
    backend = options.backend if options.target == "custom" else "onnxruntime"
    metadata = {METADATA_KEY: {**cfg.to_dict(), "weights": converted.recipe.weights},
                CALIBRATION_KEY: converted.calibration}
    with out as tmp:
        log(f"tracing to ONNX ({task.name}, {options.target} target)")
        with writing(out.path):  # a full disk ... is an error naming the output, not a traceback
            _trace(converted, tmp / MODEL_FILE)
            notes = _finish_onnx(tmp / MODEL_FILE, metadata, out.data_name, options.target)
        log("validating with ONNX Runtime")
        # ort-moe computes the erf GELU as ONNX Runtime's tanh form: the file is validated against the PyTorch model
        # with that GELU (what it computes), and its distance to the erf model is reported.
        approximated = options.target == "ort-moe" and cfg.activation == "gelu"
        with converted.patched(), _activation(converted.moes, "gelu_tanh" if approximated else None):
            v = task.validate(model, converted.moes, tmp / MODEL_FILE, batch, dense, tokenizer=converted.tokenizer,
                              backend=backend, rtol=options.rtol, log=log)
        if approximated:
            v.lines.append(_erf_distance(converted, tmp / MODEL_FILE, batch))
        v.lines.extend(f"note: {n}" for n in notes)
        # Fidelity to the dense model as moe-eval measures it: its held-out texts, batching and pooling.
        heldout = heldout_texts()
        log(f"measuring fidelity to the dense model on {len(heldout)} held-out texts (as moe-eval)")
        reference = task.heldout_reference(converted.dense, converted.tokenizer, heldout, max_length, progress=progress)
        fidelity, line = task.heldout_fidelity(reference, tmp / MODEL_FILE, converted.tokenizer, heldout, max_length,
                                               backend=backend, progress=progress)
        v.metrics.update({f"heldout_{k}" if not k.startswith("heldout") else k: x for k, x in fidelity.items()})
        v.lines.append(line)
        if embedding is not None:
            from .embed_model import INPUT, OUTPUT, encoder_dim, write_checked
            with writing(out.path):
                encoder = onnx.load(str(tmp / MODEL_FILE))
                wrapped = tmp / (MODEL_FILE if out.single_file else EMBED_FILE)
                diff = write_checked(encoder, converted.tokenizer, wrapped, **embedding, log=log)
            v.lines.append(f"{'' if out.single_file else EMBED_FILE + ': '}strings '{INPUT}' [N] -> '{OUTPUT}' "
                           f"[N, {encoder_dim(encoder)}]: "
                           f"onnxruntime-extensions' tokenizer (at most {embedding['max_length']} tokens per text), "
                           f"{embedding['pooling']} pooling, L2-normalised; max abs diff to HF tokenizer + session + "
                           f"NumPy pooling {diff:.1e}")
        if not out.single_file:
            with writing(out.path):
                model.config.save_pretrained(tmp)
                converted.tokenizer.save_pretrained(tmp)
                task.save_extras(model, tmp)
                info = {"moe": metadata[METADATA_KEY], "calibration": converted.calibration,
                        "recipe": converted.recipe.to_dict(),
                        "recipe_version": Recipe.VERSION, "target": options.target,
                        **({"sentence_embedding": {"file": EMBED_FILE, **embedding}} if embedding else {}),
                        "validation": {**dataclasses.asdict(v), "rtol": options.rtol}}
                if genai:
                    try:
                        info["genai"] = _add_genai(source, converted, tmp, genai, options.rtol, metadata, progress,
                                                   log)
                    except (GenaiLayoutError, RuntimeError) as e:
                        if options.genai != "auto":
                            raise
                        log(f"(no onnxruntime-genai layout: {str(e).splitlines()[-1]})")  # auto: best effort
                        genai = None
                if genai:
                    v.lines.append(f"onnxruntime-genai layout ({genai} dense parts) in genai/: greedy tokens "
                                   f"identical to PyTorch on {info['genai']['identical']} of "
                                   f"{info['genai']['prompts']} prompts")
                (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=float) + "\n")
        size = out.commit()
    return ExportReport(str(out.path), options.target, cfg, size, v.max_abs_diff, v.max_rel_diff,
                        v.metrics.get("heldout_cosine_mean"), v.validated_on, v.tied, v.backend,
                        time.perf_counter() - t0, converted.recipe.weights, task.name, v.metrics, v.lines,
                        converted.recipe.describe(), converted.calibration)
