"""The conversion recipe and the export options: every ``moe-export`` setting, its default, its help and its
range check, declared once. The command lines (``moe-export``, ``moe-eval --curve``) are generated from these
fields and ``exporter.export(MODEL, OUT, **settings)`` takes the same names, so a default lives here only.

:class:`Recipe` says how a model is MoEfied (what ``moe-eval --curve`` varies and a preset would choose);
:class:`ExportOptions` what is written and how it is checked.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os

from .calib_cache import DEFAULT_MAX_GB, MAX_GB_ENV, max_bytes
from .genai_layout import PRECISIONS as GENAI_PRECISIONS
from .distill import E2E_BATCH, E2E_LM_TOKENS, HOLDOUT_MAX, MAX_STEPS, check_distill
from .moefy import CORRECTIONS, ROUTER_LABELS, ROUTERS, SPLITS, check_budget, check_split, needs_calibration
from .quantize import WEIGHT_TYPES
from .relufy import check_relufy
from .text import CALIB_LINES, DISTILL_TEXTS
from runtime.session import BACKENDS

DEFAULT_ACTIVE = 0.25  # without --top-k or --budget, each token computes this share of the experts (8 of 32)
DEFAULT_EXPERTS = 32  # without --experts, unless the preset asks for finer experts that fit the FFN
MIN_EXPERT_NEURONS = 8  # a preset's finer experts only where each keeps at least this many neurons
LOWRANK_SHARE = 8  # the presets' low-rank stand-in costs 1/LOWRANK_SHARE of that budget (one expert of 8)


def default_top_k(experts: int) -> int:
    """Experts per token when --top-k is not given: DEFAULT_ACTIVE of them, so --experts alone keeps the share."""
    return max(1, round(experts * DEFAULT_ACTIVE))

TARGETS = ("custom", "standard", "ort-moe")
DEFAULT_TARGET = "custom"
GENAI_CHOICES = ("auto", "off", *GENAI_PRECISIONS)

# The presets of --recipe, per FFN family ("plain": act(W1 x) W2, e.g. BERT; "gated": act(Wg x) * (W1 x) W2, e.g.
# LLaMA's SwiGLU): the best recipes measured (docs/QUALITY.md, "Recipes by default"). Written here only; a
# flag given explicitly overrides its preset value. fast: closed-form fits only (about a minute for MiniLM);
# balanced (the default): the best training-free recipe; best: balanced plus the recovery fine-tune
# (--distill) within the stated CPU-minute budget. "stand_in": a low-rank stand-in (--lowrank) costing
# 1/LOWRANK_SHARE of the default top-k's experts, taken from them so that the total stays the default's worth.
# Plain FFNs (encoders) also get 128 experts and sequential calibration: MiniLM 25% cosine 0.8455 -> 0.8839,
# WordNet 87.9% -> 92.7% of dense, 1.2-1.6x dense speed since the kernels' narrow-expert path, 8-25% below 32
# experts (docs/QUALITY.md, tenth pass; at 16 tokens 0.73-1.17x in the eleventh, 1.08-1.64x in the twelfth: noisy,
# open). Gated FFNs (decoders) keep 32: little gained (x1.96 -> x1.74 at 50%).
_TRAINING_FREE = {"split": "coact", "router": "bce", "correction": "mean"}
_FINE = {"plain": {"experts": 128, "sequential": True}, "gated": {}}
_BALANCED = {family: {**_TRAINING_FREE, "stand_in": True, **_FINE[family]} for family in ("plain", "gated")}
# best: the recovery fine-tune (third and fourth pass: MiniLM 25% cosine 0.845 -> 0.9425; SmolLM2 25% perplexity
# ratio x1.64). Plain FFNs: 192 experts of 8 neurons and no stand-in, which fine-tuning recovers past 128 x 12 with
# it (MiniLM cosine 0.9571 -> 0.9613, every task >= 97.9% of dense, Sapphire Rapids, sixteenth pass; AMD Zen 4,
# fewer steps in the 30 minutes: 0.9593-0.9599, seventeenth) and which run faster (Zen 4: 1.40x / 1.46x dense at 16
# tokens, avx512 / avx2).
_DISTILL = {"plain": {"distill": 30.0, "distill_steps": 100000, "experts": 192, "stand_in": False},
            "gated": {"distill": 60.0, "distill_steps": 100000}}
PRESETS = {
    "fast": {family: {"split": "coact", "router": "ls", "correction": "mean", "stand_in": True}
             for family in ("plain", "gated")},
    "balanced": _BALANCED,
    "best": {family: {**_BALANCED[family], **_DISTILL[family]} for family in ("plain", "gated")},
}
# Expert weights of --target custom without --weights: float16 halves the bytes a few-token call reads (MiniLM and
# SmolLM2 at 16 tokens 1.2-1.4x faster on the avx512 and avx2 paths) for the fourth decimal of the fidelity figures
# (MiniLM's default 0.8842 either way, seventeenth pass; recovered MiniLM and SmolLM2, sixteenth pass). The other
# targets compute in float32 (standard ONNX ops; ONNX Runtime's MoE would widen them).
CUSTOM_WEIGHTS = "float16"
DEFAULT_PRESET = "balanced"
PRESET_FIELDS = ("experts", "split", "router", "correction", "lowrank", "sequential", "distill",
                 "distill_steps")  # what a preset may set


def setting(default, help: str, *, flag: str | None = None, show_default: bool = True, **argparse_kwargs):
    """A dataclass field that is also a command-line flag (``--name-with-dashes`` unless ``flag``);
    ``argparse_kwargs`` go to ``add_argument`` (type, choices, metavar, nargs, const, action)."""
    if show_default and default is not None and argparse_kwargs.get("action") != "store_false":
        help += f" (default {default})"
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "argparse": argparse_kwargs})


class _Settings:
    """Command-line generation and dict round trips shared by the settings dataclasses."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
        for f in dataclasses.fields(cls):
            if f.name in exclude or f.metadata.get("internal"):
                continue
            m = f.metadata
            kwargs = {"dest": f.name, "help": m["help"], **m["argparse"]}
            if kwargs.get("action") != "store_false":
                kwargs["default"] = f.default
            parser.add_argument(m["flag"] or "--" + f.name.replace("_", "-"), **kwargs)

    @classmethod
    def flags(cls) -> dict[str, str]:
        """Field name -> its command-line flag."""
        return {f.name: f.metadata["flag"] or "--" + f.name.replace("_", "-") for f in dataclasses.fields(cls)
                if not f.metadata.get("internal")}

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace):
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")}

    def to_dict(self) -> dict:
        """JSON-ready: a path given from Python (e.g. calib=Path(...)) as its string."""
        return {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class Recipe(_Settings):
    """How a dense model becomes a MoE: the split, the routers, the corrections and the training."""

    preset: str = setting(
        DEFAULT_PRESET, "fast: calibrated closed-form fits only (--split coact --router ls --correction mean); "
                        "balanced: the best training-free recipe measured (--split coact --router bce --correction "
                        "mean; plain FFNs such as BERT's also --experts 128 --sequential); both, without --top-k, "
                        "spend an eighth of the default top-k on a low-rank stand-in (--lowrank; 32 experts: 7 plus a "
                        "stand-in of one expert's worth; 128: 28 plus one of four experts' worth); best: balanced plus "
                        "the recovery fine-tune within a CPU-minute budget (--distill 30 for plain FFNs, "
                        "--distill 60 for gated ones, --distill-steps 100000), for plain FFNs with --experts 192 "
                        "and no stand-in. Flags given explicitly override the "
                        "preset's values", flag="--recipe", choices=tuple(PRESETS))
    experts: int | None = setting(
        None, f"experts per FFN; must divide the FFN width (default: from --recipe: for plain FFNs 128 with "
              f"balanced, 192 with best, where that leaves {MIN_EXPERT_NEURONS} or more neurons each, e.g. MiniLM; "
              f"else {DEFAULT_EXPERTS})", type=int, show_default=False)
    top_k: int | None = setting(
        None, "experts computed per token, 1..experts, shared experts included (default: a quarter of "
              "--experts, 8 of 32; re-exporting a --save-moefied directory: its own)", type=int, show_default=False)
    budget: float | None = setting(
        None, "instead of --top-k: choose each layer's top-k from calibration text so that on average the share F of "
              "FFN parameters is active per token (greedy on the share of each layer's expert-output deviation an "
              "oracle choice would capture), e.g. 0.25", type=float, metavar="F")
    dynamic_k: float | None = setting(
        None, "dynamic k per token: each token computes between k/F and k*F experts (rounded, within 1..experts), "
              "those whose router score passes a per-layer threshold chosen on calibration text so that tokens "
              "compute k experts on average (same mean cost as --top-k k); exported as the operator's min_k / "
              "score_threshold, e.g. 2", type=float, metavar="F")
    shared_experts: int = setting(
        0, "N always-on experts per layer, built from the neurons with the largest mean contribution "
           "|h - mean| * ||W2 row|| on calibration text and forced on by the router (zero row, bias 1e6); they count "
           "in --top-k, which must exceed N", type=int, metavar="N")
    lowrank: int | None = setting(
        None, "R > 0: a rank-R linear stand-in for what the skipped experts leave out, added once per token: each layer's "
           "remaining FFN error on calibration text is fitted in closed form (reduced-rank ridge regression on the "
           "FFN input, R-Sparse-like) and exported as two R x d matrices (standard ONNX MatMuls beside the operator). "
           "It costs as much as R/m experts of m neurons (plain FFN; gated: 2R/3m) and counts in the active share "
           "reported. Without --top-k and --budget, --recipe fast/balanced/best spend an eighth of the default "
           "top-k on it (MiniLM: 7 of 32 experts and --lowrank 48, or 28 of 128 and --lowrank 48; 25%% in all); "
           "with --top-k, none unless given (default: from --recipe)",
        type=int, metavar="R", show_default=False)
    sequential: bool | None = setting(
        None, "error-aware sequential calibration: layer i's router, mean correction and low-rank stand-in are fitted "
               "on the FFN inputs the already MoEfied layers below give it (not the dense model's), and the stand-in "
               "(--lowrank) is fitted to put the layer's output back where the dense model's is, absorbing the error "
               "those layers left in the residual stream. Costs about four more forward passes over the calibration text "
               "(one to record it, then each layer of the dense and the MoEfied model replayed on the outputs of "
               "the one below). Default: from --recipe (on for plain FFNs with balanced and best, when the recipe "
               "calibrates anyway)",
        action=argparse.BooleanOptionalAction)
    split: str | None = setting(
        None, "param: balanced k-means over normalised first-layer rows (MoEfication; the gate's rows in gated "
                 "FFNs); coact: balanced k-means on how neurons' output deviations move together on calibration text; "
                 "metis: the same co-activation as a neighbour graph cut into equal parts by METIS (pymetis); random: "
                 "a seeded random split, a baseline (default: from --recipe)", choices=SPLITS, show_default=False)
    router: str | None = setting(
        None, "centroid: similarity to each expert's mean normalised first-layer (gated: gate) row "
                    "(MoEfication); avgk: each expert's mean first-layer row and bias (its mean pre-activation); norm: "
                    "avgk with each neuron weighted by its second-layer row's norm (output-aware); ls: fitted by least "
                    "squares to each expert's output deviation on calibration text; bce: trained (logistic loss, from "
                    "the ls fit) to pick each calibration token's top-k experts by output deviation, keeping the best "
                    "weights on held-out calibration texts; mlp: bce plus a small MLP (64 hidden ReLU units, exported "
                    "as standard ONNX ops feeding the operator's router_scores input); cmoe: each expert scored by the "
                    "pre-activation of its representative neuron, the one with the largest mean contribution on "
                    "calibration text (CMoE's analytic router, no training); best measured: bce (default: from "
                    "--recipe)", choices=ROUTERS, show_default=False)
    router_labels: str = setting(
        "deviation", "what the calibrated routers (ls, bce, mlp) rank experts by on calibration tokens: deviation: "
                     "||(h_e - mean h_e) W2_e||, what a skipped expert changes when --correction mean replaces it by its "
                     "mean; output: ||h_e W2_e||, its output norm (WINA's criterion)", choices=ROUTER_LABELS)
    correction: str | None = setting(
        None, "none: a skipped expert contributes nothing; mean: it contributes its mean output over the "
                "calibration tokens where the router skips it, since skipped GELU/SiLU neurons are not zero; use it "
                "with a calibrated router (ls, bce): with centroid it hurts (default: from --recipe)", choices=CORRECTIONS,
        show_default=False)
    weights: str | None = setting(
        None, "element type of the exported expert weights (few-token latency is bound by reading them): "
              "float16 halves the bytes (each weight rounded to float16, computed in float32); int8 stores each "
              "weight row as int8 with a float scale (a quarter of the bytes); both need --target custom, or "
              "ort-moe (float16 experts widened to float32 there; int8 with ReLU or SwiGLU experts) (default: "
              f"{CUSTOM_WEIGHTS} with --target custom, float32 with the others)", choices=WEIGHT_TYPES,
        show_default=False)
    distill: float | None = setting(
        None, "after MoEfication, fine-tune the MoEfied model towards the dense one on the calibration text for at "
              "most MINUTES: first each FFN alone on the dense model's FFN inputs, then the whole model (hidden "
              "states of every layer and the embedding cosine), with the model's own top-k routing in the loop; a "
              f"tenth of the texts (at most {HOLDOUT_MAX}) is held out and the best weights are kept. The exported "
              "experts then no longer add up to the dense FFN (default: off, but --recipe best sets it)", type=float,
        metavar="MINUTES",
        show_default=False)
    distill_steps: int | None = setting(
        None, f"cap on the end-to-end steps ({E2E_BATCH} texts each, a language model's at most {E2E_LM_TOKENS:,} "
              "tokens) of every distillation (--distill, --relufy); a run that stops on this cap rather than on time "
              "is reproducible on the same kind of CPU (steps run in bfloat16 on CPUs with AMX or AVX-512 BF16; "
              f"default {MAX_STEPS}; --recipe best: 100000, so its budget is time)", type=int,
        metavar="N", show_default=False)
    distill_texts: int = setting(
        DISTILL_TEXTS, f"texts the distillations (--distill, --relufy) train on: the first N of the default corpus "
                       "or of --calib (embedding models: plus short spans of a quarter of them, words and phrases); "
                       "the MoE's calibration uses the first --calib-texts of them; memory grows with "
                       "N (about 0.6 GB per 1,000 texts for MiniLM)", type=int, metavar="N")
    relufy: float | None = setting(
        None, "before MoEfication, replace the GELU activation by ReLU(z - SHIFT) (SHIFT >= 0, default 0; folded into "
              "the first-layer bias) and recover the dense model by distillation from the original for "
              "--relufy-minutes; the operator then computes 'relu', whose skipped experts contribute exactly zero "
              "below the threshold (default: off)", type=float, nargs="?", const=0.0, metavar="SHIFT",
        show_default=False)
    relufy_minutes: float = setting(2.0, "time budget of --relufy's recovery distillation", type=float, metavar="M")
    calib: str | None = setting(
        None, "UTF-8 calibration text, one sample per line (default: Debian fortunes, fetched from the package "
              "registry into the cache on first use; if that fails, with a warning, sentences from Python's "
              "standard-library docstrings); the first --calib-texts lines calibrate the MoE (with "
              "--distill/--relufy up to --distill-texts train it; said when cut); validation always uses built-in "
              "held-out sentences", metavar="FILE")
    calib_texts: int = setting(
        CALIB_LINES, "texts that calibrate the MoE (split, routers, corrections, stand-in): the first N of the default "
                     "corpus (about 12,000 fortunes) or of --calib. More text, slightly better routers, for time and "
                     "memory: MiniLM's default recipe on 4,000 texts, cosine +0.002 and WordNet retrieval +1.4 points, "
                     "about 4x the time and 3x the peak memory (docs/QUALITY.md)", type=int, metavar="N")
    calib_cache: bool = setting(
        True, "do not read or write the cached calibration activations (each layer's FFN input on the calibration "
              "text, keyed by the model's weights and the tokenized text; about 280 MB per entry for MiniLM) in "
              "$MOEFY_CACHE_DIR, else $XDG_CACHE_HOME/moefy/calibration, else ~/.cache/moefy/calibration",
        flag="--no-calib-cache", action="store_false")
    calib_cache_max_gb: float | None = setting(
        None, "cap on the calibration cache's total size: the least recently used entries are removed beyond it, 0 "
              f"keeps none (default ${MAX_GB_ENV} if set, else {DEFAULT_MAX_GB:g})", type=float, metavar="GB",
        show_default=False)
    seed: int = setting(0, "seed of the expert clustering and of the training", type=int)
    # Set by resolved(): the FFN family ("plain" or "gated") whose preset values filled the open fields; not a flag.
    resolved_for_family: str | None = dataclasses.field(default=None, metadata={"internal": True})

    VERSION = 1  # bump when a field changes meaning

    @property
    def trains(self) -> bool:
        return self.distill is not None or self.relufy is not None or self.preset == "best"

    @property
    def top_k_or_default(self) -> int:
        """Experts per token: --top-k, else the default share of --experts (what --budget replaces per layer)."""
        return default_top_k(self.experts) if self.top_k is None else self.top_k

    def weights_for(self, target: str) -> str:
        """--weights, else CUSTOM_WEIGHTS for the target whose kernels compute with them (custom), else float32."""
        if self.weights is not None:
            return self.weights
        return CUSTOM_WEIGHTS if target == "custom" else WEIGHT_TYPES[0]

    def experts_for(self, gated: bool, width: int) -> int:
        """--experts, else the preset's for the FFN family where it divides ``width`` into experts of at least
        MIN_EXPERT_NEURONS neurons, else DEFAULT_EXPERTS."""
        if self.experts is not None:
            return self.experts
        fine = PRESETS[self.preset]["gated" if gated else "plain"].get("experts", DEFAULT_EXPERTS)
        return fine if width % fine == 0 and width // fine >= MIN_EXPERT_NEURONS else DEFAULT_EXPERTS

    @property
    def corpus_texts(self) -> int:
        """Texts of the default corpus (or of --calib) the export reads: the calibration's, or the distillation's
        when it trains on more."""
        return max(self.calib_texts, self.distill_texts) if self.trains else self.calib_texts

    def resolved(self, gated: bool, width: int, target: str = DEFAULT_TARGET) -> "Recipe":
        """This recipe with what it leaves open filled in from its preset for the FFN family (gated or plain) of
        an FFN of ``width`` neurons, exported for ``target``."""
        family = "gated" if gated else "plain"
        values = dict(PRESETS[self.preset][family])
        experts = self.experts_for(gated, width)
        filled = {name: values[name] for name in PRESET_FIELDS if getattr(self, name) is None and name in values
                  and name not in ("experts", "sequential")}
        filled["experts"] = experts
        filled["weights"] = self.weights_for(target)
        if self.distill_steps is None and "distill_steps" not in filled:
            filled["distill_steps"] = MAX_STEPS
        if self.lowrank is None:
            # With neither --top-k nor --budget, the preset's stand-in is paid for with the default top-k, so the
            # default stays that many experts' worth. One expert's weights are 2 m x d (plain) or 3 m x d (gated),
            # the stand-in's 2 R x d. An explicit --top-k K means K experts and no stand-in (unless --lowrank).
            k = default_top_k(experts)
            spend = max(1, round(k / LOWRANK_SHARE)) if values.get("stand_in") else 0
            if spend and self.top_k is None and self.budget is None and k - spend > self.shared_experts:
                filled["top_k"] = k - spend
                filled["lowrank"] = spend * (width // experts) * (3 if gated else 2) // 2
            else:
                filled["lowrank"] = 0
        if self.sequential is None:  # refines calibrated fits: a weight-only recipe stays weight-only (and fast)
            calibrates = needs_calibration(dataclasses.replace(self, **filled, sequential=False))
            filled["sequential"] = bool(values.get("sequential")) and calibrates
        if self.budget is not None:
            check_budget(self.budget, experts, self.shared_experts)
        return dataclasses.replace(self, **filled, resolved_for_family=family)

    def describe(self) -> str:
        """The resolved recipe as moe-export flags, named by its preset (for summaries)."""
        # without --top-k or --budget, the default top-k the export uses, so the line says what ran
        top_k = self.top_k_or_default if self.budget is None and self.experts is not None else self.top_k
        flags = [f"{self.flags()[n]} {value}" for n, value in (("experts", self.experts), ("top_k", top_k),
                 ("split", self.split), ("router", self.router), ("correction", self.correction)) if value is not None]
        if self.weights not in (None, WEIGHT_TYPES[0]):
            flags.append(f"{self.flags()['weights']} {self.weights}")
        if self.router_labels != "deviation":
            flags.append(f"{self.flags()['router_labels']} {self.router_labels}")
        for name in ("lowrank", "shared_experts", "budget", "dynamic_k", "relufy", "distill"):
            value = getattr(self, name)
            if value not in (None, 0):
                flags.append(f"{self.flags()[name]} {value:g}")
        if self.sequential:
            flags.append(self.flags()["sequential"])
        return f"--recipe {self.preset} ({self.resolved_for_family or 'any'} FFN): {' '.join(flags)}"

    def check(self) -> None:
        """Every range the recipe alone decides (the FFN width is checked once the model is loaded)."""
        if self.preset not in PRESETS:
            raise ValueError(f"--recipe must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for name, allowed in (("split", SPLITS), ("router", ROUTERS), ("correction", CORRECTIONS),
                              ("router_labels", ROUTER_LABELS), ("weights", WEIGHT_TYPES)):
            if getattr(self, name) is None and name in (*PRESET_FIELDS, "weights"):
                continue  # from the preset, or (weights) the target
            if getattr(self, name) not in allowed:
                raise ValueError(f"{self.flags()[name]} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.lowrank is not None and not (isinstance(self.lowrank, int) and self.lowrank >= 0):
            raise ValueError(f"--lowrank must be a rank >= 0, got {self.lowrank!r}")
        if self.budget is not None and self.top_k is not None:
            raise ValueError("give --top-k or --budget, not both")
        if self.dynamic_k is not None and not (isinstance(self.dynamic_k, (int, float)) and 1 < self.dynamic_k <= 64):
            raise ValueError(f"--dynamic-k must be a factor in (1, 64] (e.g. 2: each token computes k/2 to 2k experts), "
                             f"got {self.dynamic_k!r}")
        check_distill(self.distill, MAX_STEPS if self.distill_steps is None else self.distill_steps,
                      self.distill_texts)
        if not (isinstance(self.calib_texts, int) and self.calib_texts >= 1):
            raise ValueError(f"--calib-texts must be a number of texts >= 1, got {self.calib_texts!r}")
        if self.calib_cache:
            max_bytes(self.calib_cache_max_gb)  # a bad cap (flag or environment) fails before the work
        if self.relufy is not None:
            check_relufy(self.relufy, self.relufy_minutes)
        # Without --experts the count depends on the model's FFN (experts_for): checked once it is loaded.
        if self.experts is None:
            if self.top_k is not None and self.top_k < 1:
                raise ValueError(f"--top-k must be at least 1, got {self.top_k}")
        elif self.budget is not None:
            check_budget(self.budget, self.experts, self.shared_experts)
        else:
            check_split(self.experts, self.top_k_or_default, shared=self.shared_experts)


@dataclasses.dataclass
class ExportOptions(_Settings):
    """What is written and how it is checked (not part of the recipe)."""

    target: str = setting(
        DEFAULT_TARGET,
        "custom: one ai.moefy SparseExpertFFN node per FFN (needs the moefy runtime); standard: standard "
        "ONNX ops only (TopK, ScatterElements, MatMul), runs on any ONNX Runtime but computes every expert; "
        "ort-moe: ONNX Runtime's own com.microsoft::MoE (float32 experts) / QMoE (int8) nodes, run by a "
        "stock ONNX Runtime (CPU build with those contrib ops; checked on 1.32; no custom-op library) "
        "computing only the selected experts; the erf GELU becomes ONNX Runtime's tanh form there (validated "
        "against it, the distance reported)",
        choices=TARGETS)
    save_moefied_dir: str | None = setting(
        None, "also save the MoEfied model (HF weights with experts contiguous + moefy_config.json + routers) to DIR, "
              "so it can be re-exported without redoing the split", flag="--save-moefied", metavar="DIR")
    backend: str = setting("auto", "runtime backend used to validate a custom-target export", choices=BACKENDS)
    rtol: float = setting(1e-4, "largest accepted max|ONNX - PyTorch| / max|PyTorch| (logits for decoders)", type=float)
    with_tokenizer: bool = setting(
        False, "encoders: strings in, sentence embeddings out: the .onnx output (in a directory, "
               "sentence_embedding.onnx beside model.onnx) takes 'text' (a 1-D string tensor) and gives "
               "'sentence_embedding' [N, hidden]: onnxruntime-extensions' tokenizer (BERT WordPiece) in front, the "
               "model directory's sentence-transformers pooling (else mean) and L2 normalisation behind; a host "
               "registers onnxruntime-extensions' library (and moefy's for --target custom) and passes strings "
               "(examples/cpp)", action="store_true", show_default=False)
    genai: str = setting(
        "auto", "decoders exported to a directory: also onnxruntime-genai's fast layout beside optimum's (the genai "
                "model builder's fused graph with moefy's operator as every MLP; dense parts in this precision; its "
                "greedy tokens checked against PyTorch); auto: fp32 if the builder environment exists (make "
                "genai-venv), else skipped with a note; off: never", choices=GENAI_CHOICES)

    def check(self, recipe: Recipe) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if recipe.weights not in (None, WEIGHT_TYPES[0]) and self.target == "standard":
            raise ValueError(f"--weights {recipe.weights} needs --target custom or ort-moe (standard ONNX ops would "
                             "compute with float32 weights)")
        if self.target == "ort-moe":  # the model's activation is checked once it is loaded
            from .ort_moe import check_config
            check_config(None, dynamic_k=recipe.dynamic_k is not None)
        if self.genai not in GENAI_CHOICES:
            raise ValueError(f"--genai must be one of {', '.join(GENAI_CHOICES)}, got {self.genai!r}")
        if not (isinstance(self.rtol, (int, float)) and math.isfinite(self.rtol)):
            raise ValueError(f"--rtol must be a number, got {self.rtol!r}")


def split_settings(recipe: Recipe | None, settings: dict) -> tuple[Recipe, ExportOptions]:
    """(recipe, options) from keyword settings named as the fields (``recipe``'s fields overridden by them)."""
    unknown = set(settings) - Recipe.names() - ExportOptions.names()
    if unknown:
        raise TypeError(f"unknown setting(s) {sorted(unknown)}; recipe: {', '.join(sorted(Recipe.names()))}; "
                        f"options: {', '.join(sorted(ExportOptions.names()))}")
    ours = {k: v for k, v in settings.items() if k in Recipe.names()}
    recipe = dataclasses.replace(recipe, **ours) if recipe is not None else Recipe(**ours)
    return recipe, ExportOptions(**{k: v for k, v in settings.items() if k in ExportOptions.names()})
