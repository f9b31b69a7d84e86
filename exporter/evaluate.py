"""Fidelity of a MoEfied ONNX model to its dense Hugging Face source (what ``moe-eval`` reports).

The MoE side is always what was exported: embeddings come from the ONNX file run by the moefy
runtime, and the per-layer figures use the weights of each SparseExpertFFN node, evaluated with the
operator's NumPy reference. The dense side is the Hugging Face model in PyTorch.

Metrics (docs/QUALITY.md explains them):
* encoders: held-out embedding cosine (mean, min) and nearest-neighbour agreement, on mean-pooled last
  hidden states (what sentence-transformers does for MiniLM);
* decoders: on the held-out text, the perplexity ratio to dense, next-token top-1 agreement and the mean
  KL(dense || MoE) per predicted token (the MoE side through the exported graph);
* per layer, on the dense model's own FFN inputs for the held-out text: router recall (share of the
  FFN's activation mass that the selected experts hold), the same for the best possible k experts
  (oracle recall), and the FFN output's relative error;
* encoders' labelled tasks as ratios to dense: WordSim-353 and SimLex-999 Spearman, WordNet gloss -> lemma MRR.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from scipy.stats import spearmanr
from .progress import tqdm

from runtime import spec
from runtime.reference import expert_weights, selected_mask, sparse_expert_ffn
from runtime.session import METADATA_KEY

from . import datasets
from .arch import DenseFFN
from .config import MoEConfig
from .export import CALIBRATION_KEY, MODEL_FILE
from .moefy import ffn_inputs
from .outfile import atomic_path, writing
from .source import load_model
from .tasks import task_for
from .tasks.base import length_batches
from .tasks.encoder import nearest_neighbours, unit

TASKS = ("ws353", "simlex", "wordnet")
TASK_NAMES = {"ws353": "WordSim-353 Spearman", "simlex": "SimLex-999 Spearman", "wordnet": "WordNet gloss->lemma MRR"}
MATCH_RTOL = 1e-3  # all experts of the exported op vs the dense FFN: above this, they are different models
# A trained export (--distill, --relufy) no longer matches exactly; its MoE FFN must still beat predicting
# zero (relative error 1) on the dense inputs in every layer, which another model's FFN does not.
TRAINED_MATCH_RTOL = 0.9


class EvalError(ValueError):
    """Inputs moe-eval cannot evaluate: not a moefy ONNX file, or not exported from the given dense model."""


# ----------------------------------------------------------------------------- the exported operators
@dataclasses.dataclass
class SparseFFNLayer:
    """One SparseExpertFFN node's constant inputs (spec names; ``X`` absent) and attributes (defaults filled in)."""
    inputs: dict[str, np.ndarray | None]
    attrs: dict

    @property
    def top_k(self) -> int:
        return self.attrs["top_k"]

    def selected(self, scores: np.ndarray) -> np.ndarray:
        """[N, E] bool: the experts this operator computes for router ``scores``."""
        a = self.attrs
        return selected_mask(scores, a["top_k"], a["min_k"], a["score_threshold"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return sparse_expert_ffn({**self.inputs, "X": x}, **self.attrs)

    def dense(self) -> DenseFFN:
        """All experts as one dense FFN, float64 (int8 weights dequantized)."""
        w1 = expert_weights(self.inputs, "W1")
        E, m, d = w1.shape
        flat = lambda a, *s: None if a is None else np.asarray(a, np.float64).reshape(E * m, *s)  # noqa: E731
        b2 = self.inputs.get("B2")
        return DenseFFN(w1=flat(w1, d), w2=flat(expert_weights(self.inputs, "W2"), d), b1=flat(self.inputs.get("B1")),
                        b2=None if b2 is None else np.asarray(b2, np.float64), wg=flat(expert_weights(self.inputs, "Wg"), d),
                        bg=flat(self.inputs.get("Bg")))


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers, plus outputs of Constant nodes and of Identity nodes over constants (the
    TorchScript exporter deduplicates equal tensors, e.g. zero biases, through Identity)."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def model_file(path: str | os.PathLike) -> Path:
    """The ONNX file of an export: the path itself, or model.onnx in an export directory."""
    path = Path(path)
    return path / MODEL_FILE if path.is_dir() else path


def read_moe_onnx(path: str | os.PathLike) -> tuple[MoEConfig, dict, list[SparseFFNLayer]]:
    """The exporter's config and calibration metadata, and each layer's operator (node order = layer order).
    ``path``: an ONNX file, or an export directory."""
    if Path(path).is_dir() and not model_file(path).is_file():
        raise EvalError(f"{path} is a directory; pass an ONNX file or a directory written by moe-export "
                        f"(with its {MODEL_FILE})")
    path = model_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist")
    try:
        model = onnx.load(os.fspath(path))
    except Exception as e:  # protobuf's DecodeError and friends
        raise EvalError(f"{path} is not an ONNX model: {type(e).__name__}: {e}") from None
    meta = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in meta:
        raise EvalError(f"{path} is not a moefy model: it has no '{METADATA_KEY}' metadata; pass an ONNX file "
                        "written by moe-export (custom target)")
    stored = {}
    for key in (METADATA_KEY, CALIBRATION_KEY):
        try:
            stored[key] = json.loads(meta[key]) if key in meta else None
        except ValueError as e:
            raise EvalError(f"{path}: metadata '{key}' is not valid JSON ({e})") from None
    config = MoEConfig.from_dict(stored[METADATA_KEY], f"{path}: metadata '{METADATA_KEY}'")
    calibration = stored[CALIBRATION_KEY]
    if calibration is None:
        calibration = {"source": "unknown (exported before moefy recorded it)"}
    if not isinstance(calibration, dict):
        raise EvalError(f"{path}: metadata '{CALIBRATION_KEY}' must be a JSON object, got {type(calibration).__name__}")
    nodes = [n for n in model.graph.node if n.domain == spec.DOMAIN and n.op_type == spec.OP_TYPE]
    if len(nodes) != config.num_layers:
        raise EvalError(f"{path} has {len(nodes)} {spec.OP_TYPE} nodes but its metadata says {config.num_layers} "
                        "layers; moe-eval needs the custom target (moe-export --target custom)")
    values = _constant_values(model.graph)
    layers = []
    for node in nodes:
        inputs = {}
        for port, name in zip(spec.INPUTS, node.input):
            if port.name == "X" or not name:
                continue
            if name not in values:
                raise EvalError(f"{path}: input {port.name} of node {node.name} is computed, not a constant; "
                                "moe-eval reads the expert weights from initializers")
            inputs[port.name] = values[name]
        try:
            attrs = spec.node_attributes(node)  # as the runtime reads them
        except spec.SpecError as e:
            raise EvalError(f"{path}: {e}") from None
        layers.append(SparseFFNLayer(inputs, attrs))
    return config, calibration, layers


# ----------------------------------------------------------------------------- metrics
@dataclasses.dataclass
class LayerFidelity:
    layer: int
    router_recall: float  # mean over tokens: share of activation mass in the selected experts
    oracle_recall: float  # the same for the k experts holding the most mass (the best any router can do)
    ffn_rel_error: float  # ||Y_moe - Y_dense||_F / ||Y_dense||_F over the tokens
    mean_k: float  # experts computed per token (top_k, or its mean over these tokens with dynamic k)


def layer_fidelity(index: int, x: np.ndarray, dense, op: SparseFFNLayer, dense_activation: str | None = None,
                   trained: bool = False) -> LayerFidelity:
    """Compare the exported operator with the dense FFN (adapter.DenseFFN, activation ``dense_activation``,
    by default the operator's) on the dense model's FFN inputs x [N, d].

    Activation mass of neuron j for a token: |h_j| * ||W2_j||, an upper bound on the norm of what the neuron
    adds to the output; an expert's mass is the sum over its neurons. Recall is the selected experts' share.
    ``trained`` (--distill, --relufy): the experts were fine-tuned, so they need not add up to the dense FFN.
    """
    x64 = x.astype(np.float64)
    y_dense = dense.forward(x64, dense_activation or op.attrs["activation"])
    experts = op.dense()
    E, m, d = op.inputs["W1"].shape
    h = experts.hidden(x64, op.attrs["activation"])  # every expert, [N, E*m]
    w2 = experts.w2
    y_all = h @ w2 + (0.0 if experts.b2 is None else experts.b2)
    mismatch = np.linalg.norm(y_all - y_dense) / np.linalg.norm(y_dense)
    if not trained and not mismatch <= MATCH_RTOL:
        raise EvalError(f"layer {index}: the exported experts together differ from the dense FFN (relative "
                        f"difference {mismatch:.1e} > {MATCH_RTOL:.0e}): the ONNX model was not exported from this "
                        "dense model")
    mass = (np.abs(h) * np.linalg.norm(w2, axis=1)).reshape(-1, E, m).sum(2)  # [N, E]
    total = np.maximum(mass.sum(1), 1e-30)
    scores = x64 @ op.inputs["router_w"].T.astype(np.float64)
    if op.inputs.get("router_b") is not None:
        scores = scores + op.inputs["router_b"]
    selected = op.selected(scores)
    count = selected.sum(1)  # top_k, or per token with dynamic k
    recall = (mass * selected).sum(1) / total
    best = np.cumsum(np.sort(mass, axis=1)[:, ::-1], axis=1)  # the oracle picks as many experts as the router
    oracle = np.take_along_axis(best, count[:, None] - 1, 1)[:, 0] / total
    y_moe = op(x)
    error = float(np.linalg.norm(y_moe - y_dense) / np.linalg.norm(y_dense))
    if trained and not error <= TRAINED_MATCH_RTOL:
        raise EvalError(f"layer {index}: the exported (fine-tuned) FFN is no closer to the dense FFN than zero is "
                        f"(relative error {error:.2f} > {TRAINED_MATCH_RTOL}): the ONNX model was not exported from "
                        "this dense model")
    return LayerFidelity(index, float(recall.mean()), float(oracle.mean()), error, float(count.mean()))


def word_similarity(embed, pairs) -> float:
    """Spearman correlation between embedding cosine and human similarity scores."""
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    e = dict(zip(words, unit(embed(words))))
    return float(spearmanr([e[a] @ e[b] for a, b, _ in pairs], [s for *_, s in pairs]).statistic)


def gloss_retrieval_mrr(embed, pairs) -> float:
    """Each definition ranks all lemmas by cosine; mean reciprocal rank of its own lemma."""
    s = unit(embed([g for g, _ in pairs])) @ unit(embed([lemma for _, lemma in pairs])).T
    rank = (s > np.diag(s)[:, None]).sum(1)
    return float((1.0 / (rank + 1)).mean())


def _task_data(task: str):
    if task == "wordnet":
        return datasets.wordnet_glosses(), gloss_retrieval_mrr
    return datasets.word_pairs(task), word_similarity


# ----------------------------------------------------------------------------- reports
@dataclasses.dataclass
class TaskScore:
    dense: float
    moe: float

    @property
    def ratio(self) -> float:
        return self.moe / self.dense


@dataclasses.dataclass
class EvalReport:
    model: str
    config: dict
    calibration: dict
    backend: str
    heldout_texts: int
    cosine_mean: float | None  # encoders
    cosine_min: float | None
    nn_agreement: float | None
    layers: list[LayerFidelity]
    tasks: dict[str, TaskScore]
    seconds: float
    next_token: dict | None = None  # decoders: NextTokenFidelity.to_dict()

    @property
    def active_share(self) -> float:
        """Share of FFN parameters used per token, a low-rank stand-in included (MoEConfig.active_share)."""
        return MoEConfig.from_dict(self.config).active_share

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["active_share"] = self.active_share
        for name, t in self.tasks.items():
            d["tasks"][name]["ratio"] = t.ratio
        return d

    def summary(self) -> str:
        c = self.config
        lines = [f"{self.model}: {c['experts']} experts, top-k {c['top_k']} ({100 * self.active_share:.1f}% active), "
                 f"split {c['split']}, router {c['router']}, correction {c['correction']}"
                 + (f", low-rank stand-in of rank {c['lowrank']}" if c.get("lowrank") else "")
                 + (f", dynamic k {c['dynamic_k']:g}" if c.get("dynamic_k") else "") + f"{_training(c)}; "
                 f"calibrated on {self.calibration.get('source')}; {self.backend} backend",
                 f"  held-out texts: {self.heldout_texts}; " + (
                     f"embedding cosine to dense mean {self.cosine_mean:.4f}, min {self.cosine_min:.4f}; "
                     f"nearest-neighbour agreement {self.nn_agreement:.3f}" if self.next_token is None else
                     f"perplexity {self.next_token['perplexity_moe']:.3f} vs dense "
                     f"{self.next_token['perplexity_dense']:.3f} (ratio {self.next_token['perplexity_ratio']:.4f}), "
                     f"next-token agreement {self.next_token['next_token_agreement']:.4f}, mean KL "
                     f"{self.next_token['mean_kl']:.4f} over {self.next_token['tokens']} predicted tokens"),
                 "  | layer | experts per token | router recall | oracle recall | FFN rel. error |",
                 "  |---:|---:|---:|---:|---:|"]
        lines += [f"  | {f.layer} | {f.mean_k:.2f} | {f.router_recall:.3f} | {f.oracle_recall:.3f} | "
                  f"{f.ffn_rel_error:.3f} |" for f in self.layers]
        lines += [f"  {TASK_NAMES[n]}: dense {t.dense:.4f}, MoE {t.moe:.4f}, ratio {t.ratio:.3f}"
                  for n, t in self.tasks.items()]
        return "\n".join(lines)


def _training(config: dict) -> str:
    """', relufied (shift 0), distilled (...)' for trained exports, '' otherwise."""
    def figure(record):  # (name, values): encoders record the embedding cosine, language models the KL
        return ("next-token KL", record["heldout_kl"]) if "heldout_kl" in record else ("cosine", record["heldout_cosine"])
    out = ""
    if config.get("relufy"):
        r = config["relufy"]
        name, values = figure(r)
        out += f", relufied (shift {r['shift']:g}, recovery to held-out {name} {values[-1]:.4f})"
    if config.get("distill"):
        t = config["distill"]
        name, values = figure(t)
        out += (f", distilled ({t['steps']} end-to-end steps, {t['seconds']:.0f} s; held-out calibration {name} "
                f"{values[0]:.4f} -> {values[-1]:.4f})")
    return out


def markdown_table(reports: list[EvalReport]) -> str:
    tasks = [t for t in TASKS if any(t in r.tasks for r in reports)]
    decoder = any(r.next_token is not None for r in reports)
    quality = ["ppl ratio", "next-token agree", "mean KL"] if decoder else ["cos mean", "cos min", "NN agree"]
    head = ["model", "active", *quality, "router recall (oracle)", "FFN rel. err", *(f"{t} ratio" for t in tasks)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in reports:
        recall = np.mean([f.router_recall for f in r.layers])
        oracle = np.mean([f.oracle_recall for f in r.layers])
        n = r.next_token
        values = ([f"{n['perplexity_ratio']:.4f}", f"{n['next_token_agreement']:.4f}", f"{n['mean_kl']:.4f}"] if decoder
                  else [f"{r.cosine_mean:.4f}", f"{r.cosine_min:.4f}", f"{r.nn_agreement:.3f}"])
        cells = [Path(r.model).name, f"{100 * r.active_share:.1f}%", *values, f"{recall:.3f} ({oracle:.3f})",
                 f"{np.mean([f.ffn_rel_error for f in r.layers]):.3f}",
                 *(f"{r.tasks[t].ratio:.3f}" if t in r.tasks else "–" for t in tasks)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- evaluation
class Evaluator:
    """Loads the dense model and computes its side once; call it on any number of MoE ONNX files (or export
    directories). Encoders: embeddings and labelled tasks; decoders: next-token predictions."""

    def __init__(self, dense_dir: str | os.PathLike, *, tasks=TASKS, progress: bool = True, log=print):
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise EvalError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
        self.progress, self.log = progress, log
        log(f"loading the dense model {dense_dir}")
        self.model, self.tokenizer, self.adapter, moe_cfg, _ = load_model(dense_dir)
        self.dense_dir = Path(dense_dir)
        if moe_cfg is not None:
            raise EvalError(f"{dense_dir} is a --save-moefied directory; pass the original dense model")
        self.task = task_for(self.adapter)
        self.decoder = self.task.name == "text-generation"
        if self.decoder and tasks:
            log(f"labelled tasks ({', '.join(tasks)}) are for embedding models; this decoder is measured on "
                "next-token predictions")
            tasks = ()
        self.task_data = {t: _task_data(t) for t in tasks}  # fails early (MissingDataError) if not fetched
        hf = self.model.config
        self.max_length = min(128, getattr(hf, "max_position_embeddings", 128))
        self.texts = datasets.heldout_texts()
        if not datasets.fortunes_available():
            log(f"held-out text: only the {len(self.texts)} built-in sentences (run `make data` for 300 more)")
        self.ffn_x = self._ffn_inputs(self.texts)
        self.reference = self.task.heldout_reference(self.model, self.tokenizer, self.texts, self.max_length,
                                                     progress=self.progress)
        if not self.decoder:
            self.dense_tasks = {t: fn(lambda s: self._embed_dense(s, f"dense {t}"), data)
                                for t, (data, fn) in self.task_data.items()}

    def _embed_dense(self, texts, desc):
        return self.task.dense_embeddings(self.model, self.tokenizer, texts, self.max_length, desc=desc,
                                          progress=self.progress)

    @torch.no_grad()
    def _ffn_inputs(self, texts) -> list[np.ndarray]:
        """Each layer's dense FFN input on the texts' real tokens, [N, d] per layer."""
        captured = [ffn_inputs(self.model, self.adapter, {k: torch.from_numpy(v) for k, v in feed.items()})
                    for _, feed in length_batches(self.tokenizer, texts, self.task.model_inputs(self.model),
                                                  self.max_length, self.task.heldout_batch, desc="dense FFN inputs",
                                                  progress=self.progress)]
        return [np.concatenate(layer) for layer in zip(*captured)]

    def _check_same_model(self, path, config: MoEConfig, layers: list[SparseFFNLayer]) -> None:
        hf = self.model.config
        d = layers[0].inputs["W1"].shape[-1]
        for what, exported, dense in (("model_type", config.model_type, hf.model_type),
                                      ("number of layers", config.num_layers, len(self.adapter.layers(self.model))),
                                      ("FFN width", config.intermediate_size, self.adapter.width(self.model)),
                                      ("hidden size", d, hf.hidden_size)):
            if exported != dense:
                raise EvalError(f"{path} does not match the dense model {self.dense_dir}: {what} {exported!r} "
                                f"in the ONNX model, {dense!r} in the dense model")

    def __call__(self, moe_path: str | os.PathLike, *, backend: str = "auto") -> EvalReport:
        from runtime import InferenceSession
        t0 = time.perf_counter()
        config, calibration, ops = read_moe_onnx(moe_path)
        self._check_same_model(moe_path, config, ops)
        dense_layers = [self.adapter.read(layer) for layer in self.adapter.layers(self.model)]
        dense_act = self.adapter.activation(self.model.config)
        layers = [layer_fidelity(i, x, dense, op, dense_act, config.trained) for i, (x, dense, op) in enumerate(
            tqdm(list(zip(self.ffn_x, dense_layers, ops)), desc="per-layer fidelity", disable=not self.progress,
                 leave=False))]
        metrics, _ = self.task.heldout_fidelity(self.reference, model_file(moe_path), self.tokenizer, self.texts,
                                                self.max_length, backend=backend, progress=self.progress)
        if self.decoder:
            return EvalReport(str(moe_path), config.to_dict(), calibration, metrics["backend"], len(self.texts), None,
                              None, None, layers, {}, time.perf_counter() - t0,
                              {k: v for k, v in metrics.items() if k not in ("heldout_texts", "backend")})
        session = InferenceSession(model_file(moe_path), backend=backend)  # for the labelled tasks
        embed = lambda s, t: self.task.session_embeddings(session, self.tokenizer, s, self.max_length,  # noqa: E731
                                                          desc=f"MoE {t}", progress=self.progress)
        tasks = {t: TaskScore(self.dense_tasks[t], fn(lambda s: embed(s, t), data))
                 for t, (data, fn) in self.task_data.items()}
        return EvalReport(str(moe_path), config.to_dict(), calibration, metrics["backend"], len(self.texts),
                          metrics["cosine_mean"], metrics["cosine_min"], metrics["nn_agreement"], layers, tasks,
                          time.perf_counter() - t0)


# ----------------------------------------------------------------------------- quality vs active share
def quality_curve(evaluator: Evaluator, dense_dir, out_dir: str | os.PathLike, top_ks: list[int], recipe=None, *,
                  backend: str = "auto", log=print) -> list[EvalReport]:
    """Export ``dense_dir`` once per top-k with the same recipe (a :class:`~exporter.recipe.Recipe`) into
    ``out_dir``, evaluate each."""
    import dataclasses as dc

    from .export import export
    from .recipe import Recipe
    recipe = recipe or Recipe()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = []
    for k in top_ks:
        path = out_dir / f"top{k}-of-{recipe.experts}.onnx"
        log(f"exporting {path.name}")
        log(export(dense_dir, path, dc.replace(recipe, top_k=k, budget=None), backend=backend,
                   progress=evaluator.progress, log=log).summary())
        reports.append(evaluator(path, backend=backend))
        print(reports[-1].summary(), flush=True)  # a result, not progress
    return reports


def plot_curve(reports: list[EvalReport], path: str | os.PathLike, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    x = [100 * r.active_share for r in reports]
    if all(r.next_token is not None for r in reports):  # decoders
        series = {"dense perplexity / MoE perplexity": [1 / r.next_token["perplexity_ratio"] for r in reports],
                  "next-token top-1 agreement": [r.next_token["next_token_agreement"] for r in reports],
                  "exp(-mean KL)": [float(np.exp(-r.next_token["mean_kl"])) for r in reports]}
    else:
        series = {"held-out cosine (mean)": [r.cosine_mean for r in reports],
                  "held-out cosine (min)": [r.cosine_min for r in reports],
                  "nearest-neighbour agreement": [r.nn_agreement for r in reports]}
    series |= {"router recall (mean over layers)": [np.mean([f.router_recall for f in r.layers]) for r in reports],
               "1 - FFN rel. error (mean over layers)": [1 - np.mean([f.ffn_rel_error for f in r.layers])
                                                         for r in reports]}
    for t in TASKS:
        if all(t in r.tasks for r in reports):
            series[f"{TASK_NAMES[t]} / dense"] = [r.tasks[t].ratio for r in reports]
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for label, y in series.items():
        ax.plot(x, y, marker="o", label=label)
    ax.set_xlabel("FFN parameters active per token (%)")
    ax.set_ylabel("fidelity to the dense model")
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))  # outside: lines cross everywhere
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, "plot") as tmp, writing(path, "plot"):
        fig.savefig(tmp, dpi=120, format=Path(path).suffix[1:] or "png")
    plt.close(fig)
