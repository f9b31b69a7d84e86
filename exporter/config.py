"""The MoE settings stored with a MoEfied model (JSON beside the weights, ONNX metadata_props)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from runtime import spec

FORMAT = "moefy.moe"
FORMAT_VERSION = 1
CONFIG_FILE = "moefy_config.json"
ROUTERS_FILE = "moefy_routers.safetensors"


class ConfigError(ValueError):
    """A stored MoE config (moefy_config.json, ONNX metadata) that is not one: the message names its source."""


# What each field's annotation accepts from JSON (bool is never an int here).
_JSON_TYPES = {"int": (int,), "str": (str,), "bool": (bool,), "float | None": (int, float, type(None)), "list | None": (list, type(None)),
               "dict | None": (dict, type(None))}


@dataclasses.dataclass
class MoEConfig:
    """How a model was MoEfied; round-trips through dicts (and so JSON) with a format version."""

    experts: int
    top_k: int
    activation: str
    model_type: str
    num_layers: int
    intermediate_size: int
    split: str = "param"  # "param": balanced k-means on W1 rows; "coact"/"metis": co-activation on calibration
    # text (k-means / METIS graph partitioning); "random": baseline
    router: str = "centroid"  # "centroid", "avgk", "norm": from the weights; "ls", "bce": fitted on calibration text
    correction: str = "none"  # "mean": skipped experts add their mean calibration output when not selected
    router_labels: str = "deviation"  # what calibrated routers rank by: "deviation" from the mean output, or "output" norm
    shared_experts: int = 0  # the first N experts of every layer are always on (counted in top_k)
    lowrank: int = 0  # --lowrank R: a rank-R linear stand-in for the skipped experts beside the operator
    sequential: bool = False  # --sequential: layer i fitted on the inputs the MoEfied layers below give it
    layer_top_k: list | None = None  # per-layer top_k (from --budget); None: top_k everywhere
    budget: float | None = None  # --budget: target mean share of FFN parameters active per token
    dynamic_k: float | None = None  # --dynamic-k F: a token computes k/F..k*F experts, k on average (calibration)
    layer_threshold: list | None = None  # per-layer router score threshold of dynamic k
    relufy: dict | None = None  # --relufy: threshold shift, recovery settings and result (activation is "relu")
    distill: dict | None = None  # --distill: settings and held-out result of the recovery fine-tune
    seed: int = 0
    task: str = "feature-extraction"  # or "text-generation" (exporter/tasks)
    gated: bool = False  # the FFN is gated (SwiGLU): the operator gets Wg
    op_domain: str = spec.DOMAIN
    op_version: int = spec.VERSION
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_recipe(cls, recipe, **model_facts) -> "MoEConfig":
        """The config of a new MoEfication: the recipe's fields that are config fields, and the model's facts
        (activation, model_type, num_layers, intermediate_size, task, gated)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in recipe.to_dict().items() if k in names and k not in model_facts}, **model_facts)

    @property
    def expert_size(self) -> int:
        return self.intermediate_size // self.experts

    def layer_k(self, i: int) -> int:
        """top_k of layer i."""
        return self.top_k if self.layer_top_k is None else int(self.layer_top_k[i])

    def k_bounds(self, i: int) -> tuple[int, int]:
        """(min_k, max_k) of layer i: k/F and k*F rounded, within [1, experts] (both k without dynamic k)."""
        k = self.layer_k(i)
        if self.dynamic_k is None:
            return k, k
        return max(1, round(k / self.dynamic_k)), min(self.experts, round(k * self.dynamic_k))

    def op_selection(self, i: int) -> dict:
        """Layer i's selection attributes of the operator: top_k, min_k, score_threshold."""
        if self.layer_threshold is None:
            return {"top_k": self.layer_k(i), "min_k": 1, "score_threshold": float("-inf")}
        lo, hi = self.k_bounds(i)
        return {"top_k": hi, "min_k": lo, "score_threshold": float(self.layer_threshold[i])}

    @property
    def lowrank_share(self) -> float:
        """What the low-rank stand-in (two R x d matrices) costs per token, as a share of the dense FFN's
        weights (2 I x d plain, 3 I x d gated)."""
        return 2 * self.lowrank / ((3 if self.gated else 2) * self.intermediate_size)

    @property
    def active_share(self) -> float:
        """Share of FFN parameters used per token (mean over layers; with dynamic k, on calibration text), the
        low-rank stand-in included."""
        ks = [self.layer_k(i) for i in range(self.num_layers)]
        return sum(ks) / len(ks) / self.experts + self.lowrank_share

    @property
    def trained(self) -> bool:
        """Weights changed by training (--relufy, --distill): the experts no longer add up to the dense FFN."""
        return bool(self.relufy or self.distill)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "MoE config") -> "MoEConfig":
        """Checked: a JSON object of this format version with every required field, of its type and in range
        (``source`` names where it came from in the messages)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source} must be a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"{source} is not a moefy MoE config of format version {FORMAT_VERSION}: "
                              f"format={d.get('format')!r}, format_version={d.get('format_version')!r}")
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in d]
        if missing:
            raise ConfigError(f"{source} lacks the field(s) {', '.join(missing)}")
        for f in fields:
            v = d.get(f.name, f.default)
            if not isinstance(v, _JSON_TYPES[f.type]) or (isinstance(v, bool) and f.type != "bool"):
                raise ConfigError(f"{source}: {f.name} must be {f.type.replace(' | None', ' or null')}, got {v!r}")
        config = cls(**{f.name: d[f.name] for f in fields if f.name in d})
        config._check_values(source)
        return config

    def _check_values(self, source: str) -> None:
        def bad(what):
            raise ConfigError(f"{source}: {what}")
        if self.experts < 1 or self.num_layers < 1 or self.intermediate_size < 1:
            bad(f"experts, num_layers and intermediate_size must be >= 1, got {self.experts}, {self.num_layers}, "
                f"{self.intermediate_size}")
        if self.intermediate_size % self.experts:
            bad(f"experts ({self.experts}) must divide intermediate_size ({self.intermediate_size})")
        if not 0 <= self.lowrank:
            bad(f"lowrank must be >= 0, got {self.lowrank}")
        if not 1 <= self.top_k <= self.experts or not 0 <= self.shared_experts < self.top_k:
            bad(f"need 0 <= shared_experts < top_k <= experts, got {self.shared_experts}, {self.top_k}, {self.experts}")
        for name, values, ok in (
                ("layer_top_k", self.layer_top_k, lambda k: isinstance(k, int) and 1 <= k <= self.experts),
                ("layer_threshold", self.layer_threshold, lambda t: isinstance(t, (int, float)) and not math.isnan(t))):
            if values is not None and (len(values) != self.num_layers or not all(map(ok, values))):
                bad(f"{name} must list {self.num_layers} values (one per layer), got {values!r}")

    def save(self, directory: Path) -> None:
        (Path(directory) / CONFIG_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "MoEConfig":
        path = Path(directory) / CONFIG_FILE
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        return cls.from_dict(d, str(path))
