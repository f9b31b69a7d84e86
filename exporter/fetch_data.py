"""``python -m exporter.fetch_data`` (``make data``): fetch the calibration and evaluation data into
the user cache (see :func:`exporter.datasets.data_dir`). Idempotent: what is there is not fetched again.

* Debian ``fortunes`` + ``fortunes-min``: the default calibration corpus and held-out text;
* Debian ``wordnet-base``: WordNet definitions for gloss -> lemma retrieval;
* PyPI ``gensim`` wheel: only its WordSim-353 and SimLex-999 test files are kept.

The .deb files are downloaded with ``apt-get download`` and unpacked with ``dpkg-deb -x`` (no root, the
system is untouched); the wheel with ``pip download --no-deps``. Third-party data stays in the cache
and is never committed.
"""
from __future__ import annotations

import glob
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .datasets import FORTUNES, WORD_PAIR_FILES, WORD_SIMILARITY, WORDNET_NOUNS, data_dir

GENSIM = "gensim==4.4.0"  # pinned: the test files' content is then fixed


class FetchError(RuntimeError):
    pass


def _run(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise FetchError(f"`{' '.join(cmd)}` failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")


def _apt_download(packages: list[str], work: Path) -> None:
    """Download .deb files into ``work``. Tries the system's package lists first; if they are missing
    (a fresh container), refreshes private lists from the system's sources, leaving /var/lib/apt alone."""
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise FetchError("apt-get and dpkg-deb are needed to fetch the Debian data packages (not a Debian system?)")
    try:
        _run(["apt-get", "-qq", "download", *packages], work)
        return
    except FetchError:
        pass
    state = work / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    opts = ["-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state / 'cache'}",
            "-o", "Debug::NoLocking=1"]
    _run(["apt-get", *opts, "-qq", "update"], work)
    _run(["apt-get", *opts, "-qq", "download", *packages], work)


def fetch_debs(name: str, packages: list[str], marker: str, root: Path, log=print) -> None:
    """Unpack ``packages`` into ``root/name`` unless ``root/marker`` already exists."""
    if (root / marker).exists():
        return
    log(f"fetch_data: downloading Debian {', '.join(packages)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _apt_download(packages, work)
        partial = work / "unpacked"
        for deb in sorted(glob.glob(str(work / "*.deb"))):
            _run(["dpkg-deb", "-x", deb, str(partial)], work)
        dest = root / name
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(partial), dest)  # whole directory at once: no half-unpacked data on failure
    if not (root / marker).exists():
        raise FetchError(f"unpacked {', '.join(packages)} but {root / marker} is missing")


def fetch_word_pairs(root: Path, log=print) -> None:
    dest = root / WORD_SIMILARITY
    if all((dest / f).is_file() for f in WORD_PAIR_FILES.values()):
        return
    log(f"fetch_data: downloading the {GENSIM} wheel for its WordSim-353 and SimLex-999 files")
    with tempfile.TemporaryDirectory() as tmp:
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", "-d", tmp, GENSIM],
             Path(tmp))
        wheel = next(Path(tmp).glob("gensim-*.whl"), None)
        if wheel is None:
            raise FetchError(f"pip downloaded no {GENSIM} wheel for this Python")
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for f in WORD_PAIR_FILES.values():
                (dest / f).write_bytes(z.read(f"gensim/test/test_data/{f}"))


def fetch_all(root: Path | None = None, log=print) -> Path:
    root = Path(root or data_dir())
    root.mkdir(parents=True, exist_ok=True)
    fetch_debs("fortunes", ["fortunes", "fortunes-min"], FORTUNES, root, log)
    fetch_debs("wordnet-base", ["wordnet-base"], WORDNET_NOUNS, root, log)
    fetch_word_pairs(root, log)
    return root


def main() -> int:
    try:
        root = fetch_all(log=lambda *a: print(*a, file=sys.stderr, flush=True))
    except (FetchError, OSError) as e:
        print(f"fetch_data: error: {e}", file=sys.stderr)
        return 1
    print(f"moefy data ready in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
