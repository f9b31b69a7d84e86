"""The MoE settings stored with a MoEfied model (JSON beside the weights, ONNX metadata_props)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from runtime import spec

FORMAT = "moefy.moe"
FORMAT_VERSION = 1
CONFIG_FILE = "moefy_config.json"
ROUTERS_FILE = "moefy_routers.safetensors"


@dataclasses.dataclass
class MoEConfig:
    """How a model was MoEfied; round-trips through dicts (and so JSON) with a format version."""

    experts: int
    top_k: int
    activation: str
    model_type: str
    num_layers: int
    intermediate_size: int
    split: str = "param"  # "param": balanced k-means on W1 rows; "coact": co-activation on calibration text
    router: str = "centroid"  # "centroid": MoEfication's similarity router; "ls": least-squares fitted
    correction: str = "none"  # "mean": skipped experts add their mean calibration output
    seed: int = 0
    op_domain: str = spec.DOMAIN
    op_version: int = spec.VERSION
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def expert_size(self) -> int:
        return self.intermediate_size // self.experts

    @property
    def active_share(self) -> float:
        """Share of FFN parameters used per token."""
        return self.top_k / self.experts

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"not a moefy MoE config of format version {FORMAT_VERSION}: "
                             f"format={d.get('format')!r}, format_version={d.get('format_version')!r}")
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def save(self, directory: Path) -> None:
        (Path(directory) / CONFIG_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "MoEConfig":
        return cls.from_dict(json.loads((Path(directory) / CONFIG_FILE).read_text()))
