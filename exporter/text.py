"""Text for calibration and validation: a user's file, or a few built-in sentences."""
from __future__ import annotations

import random
import re
from pathlib import Path

# Written for this project: a small, varied default so validation runs with no data installed.
SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Sparse mixtures of experts compute only a small part of a large network for each token.",
    "She opened the window and the cold morning air filled the kitchen.",
    "Interest rates rose again this quarter, and markets reacted with caution.",
    "How do I reset my password if I no longer have access to my email account?",
    "The museum's new exhibition covers three centuries of maritime trade.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "After the match, the coach praised the defence but criticised the missed chances.",
    "Please remember to bring your passport and a printed copy of the booking.",
    "A small change in the initial conditions can lead to a very different outcome.",
    "The recipe calls for two cups of flour, a pinch of salt and three eggs.",
    "Our train was delayed by forty minutes because of a signal failure near the station.",
)

# Prompts for decoders' validation (greedy tokens against PyTorch) and demos; also never used for calibration.
SAMPLE_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in one sentence why the sky is blue.",
    "List three fruits that are red.",
    "The history of the printing press begins",
    "def fibonacci(n):",
    "Translate to French: good morning, my friend.",
    "Once upon a time, in a small village by the mountains,",
)


# Standard-library modules whose docstrings serve as the default calibration text: real English prose
# that every Python installation carries, so calibration needs no download and no committed corpus.
_DOC_MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "email", "fractions", "functools",
                "heapq", "http.client", "inspect", "itertools", "json", "logging", "pathlib", "pickle",
                "random", "re", "shutil", "socket", "statistics", "string", "subprocess", "tarfile",
                "textwrap", "threading", "typing", "unittest", "urllib.request", "zipfile")


def default_calibration_texts(limit: int = 512) -> list[str]:
    """Sentences from standard-library docstrings (deterministic for a Python version)."""
    import importlib
    import inspect
    import re

    texts: list[str] = []
    for name in _DOC_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(mod)] + [inspect.getdoc(obj) for _, obj in sorted(vars(mod).items())
                                        if (inspect.isfunction(obj) or inspect.isclass(obj))
                                        and getattr(obj, "__module__", None) == name]
        for doc in filter(None, docs):
            for para in re.split(r"\n\s*\n", doc):
                line = " ".join(para.split())
                if len(line.split()) >= 6 and not line.startswith((">>>", "...")) and line[:1].isupper():
                    texts.append(line[:400])
    return texts[:limit]


CALIB_LINES = 1000  # --calib-texts' default: texts that calibrate the MoE; bounds memory and time (SmolLM2: 10 GB)
# Distillation trains on more text (the MoEfication calibration takes the first --calib-texts of it): with
# 1,000 texts it overfits (held-out loss stops falling after ~2 epochs). About 300 MB of activations and
# 300 MB of teacher targets per 1,000 fortunes for MiniLM.
DISTILL_TEXTS = 10000


def short_spans(texts: list[str], share: float, seed: int = 0) -> list[str]:
    """A run of 1-4 consecutive words (more often 1 or 2) from a random ``share`` of ``texts``, half of them
    lower-cased: the words, names and queries an embedding model is also asked about."""
    rng = random.Random(seed)
    out = []
    for text in rng.sample(texts, round(share * len(texts))):
        words = re.findall(r"[^\W\d_]+(?:['-][^\W\d_]+)*", text)
        if words:
            n = min(len(words), rng.choices((1, 2, 3, 4), weights=(4, 3, 2, 1))[0])
            i = rng.randrange(len(words) - n + 1)
            span = " ".join(words[i:i + n])
            out.append(span.lower() if rng.random() < 0.5 else span)
    return out


def load_texts(path: str | Path | None, *, limit: int | None = None) -> list[str]:
    """Non-empty lines of a UTF-8 text file (the first ``limit`` if given), or the built-in sentences."""
    if path is None:
        return list(SAMPLE_TEXTS)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration file {p} does not exist or is not a file")
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise ValueError(f"calibration file {p} is not UTF-8 text: {e}") from None
    texts = [ln for ln in lines if ln][:limit]
    if not texts:
        raise ValueError(f"calibration file {p} has no non-empty lines")
    return texts
