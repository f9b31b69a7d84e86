"""examples/cpp: the C++ desktop host (ONNX Runtime's C++ API, moefy's and onnxruntime-extensions' libraries)
builds, and its embeddings of strings are Python's (HF tokenizer + session + NumPy pooling) within 1e-4."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime
from conftest import requires_cpp
from test_embed_model import reference_embeddings

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cpp"


@pytest.fixture(scope="module")
def semantic_search(tmp_path_factory):
    """The example built as `make example` builds it (cmake from the venv, headers from moefy's build)."""
    cmake = Path(sys.executable).with_name("cmake")
    if not cmake.exists():
        pytest.skip("cmake not installed in this environment (make setup installs it)")
    build = tmp_path_factory.mktemp("example-build")
    for cmd in ([cmake, "-S", EXAMPLE, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
                 f"-DPython_EXECUTABLE={sys.executable}"], [cmake, "--build", build]):
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return build / "semantic_search"


@requires_cpp
def test_cpp_host_embeddings_match_python(semantic_search, minilm_embed_export, minilm_export, minilm_dir, tmp_path):
    from transformers import AutoTokenizer
    lines = [line for line in (EXAMPLE / "sample.txt").read_text().splitlines() if line.strip()]
    query = "Where can I catch a train to the airport?"
    dump = tmp_path / "embeddings.txt"
    r = subprocess.run([semantic_search, "--model", minilm_embed_export, "--dump-embeddings", dump, "--top", "3",
                        EXAMPLE / "sample.txt", query], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = np.loadtxt(dump, dtype=np.float64)
    want = reference_embeddings(runtime.InferenceSession(str(minilm_export), backend="cpp", threads=1),
                                AutoTokenizer.from_pretrained(minilm_dir), [query, *lines], 256)
    assert got.shape == (len(lines) + 1, 384)
    assert np.abs(got - want).max() <= 1e-4
    # The ranking it prints is Python's cosine ranking.
    best = int(np.argmax(want[1:] @ want[0]))
    out = r.stdout.splitlines()
    assert out[0] == f"query: {query}" and len(out) == 4
    assert out[1].endswith(lines[best]) and f"{want[1:][best] @ want[0]:.4f}" in out[1]


@requires_cpp
def test_cpp_host_bad_input_is_a_clear_error(semantic_search, minilm_embed_export, tmp_path):
    def run(*args):
        return subprocess.run([semantic_search, "--model", minilm_embed_export, *map(str, args)],
                              capture_output=True, text=True)
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    for args, message in (((tmp_path / "missing.txt", "q"), "cannot read"),
                          ((tmp_path / "blank.txt", "q"), "has no non-empty line"),
                          (("--top", "0", EXAMPLE / "sample.txt", "q"), "--top needs a positive integer"),
                          ((EXAMPLE / "sample.txt",), "expected TEXT_FILE and QUERY"),
                          (("--model", tmp_path / "junk.onnx", EXAMPLE / "sample.txt", "q"), "ONNX Runtime:"),
                          (("--moefy-lib", tmp_path / "no.so", EXAMPLE / "sample.txt", "q"), "--moefy-lib")):
        r = run(*args)
        assert r.returncode == 2 and r.stderr.startswith("semantic_search: error:") and message in r.stderr, r.stderr
