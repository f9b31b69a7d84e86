"""The sanitizer job: the custom-op library built with -fsanitize=address,undefined (cmake -DMOEFY_SANITIZE=ON, into
build/sanitize, incremental), loaded into Python with the compiler's libasan preloaded, runs tests/sanitize_sweep.py:
a seeded random sweep of valid problems against the NumPy reference on the C++ and the Numba-hosted op, then the
malformed cases. It fails on any sanitizer report, wrong answer or accepted malformed case. Skips when the
toolchain cannot build or load a sanitized library. Also `make test-sanitize`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "sanitize"
CASES = 300  # valid problems, each on both backends (about 20 s of the job; the build takes longer once)
FLAGS = "-fsanitize=address,undefined"


def _toolchain() -> tuple[str, str] | str:
    """(cmake, LD_PRELOAD value), or why the job cannot run here."""
    cxx, cmake = shutil.which("c++") or shutil.which("g++"), shutil.which("cmake")
    if not cxx or not cmake:
        return "no C++ compiler or cmake"
    asan, stdcxx = (subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
                    for lib in ("libasan.so", "libstdc++.so"))
    if not os.path.isabs(asan) or not os.path.exists(asan):
        return f"{cxx} has no libasan"
    probe = subprocess.run([cxx, FLAGS, "-shared", "-fPIC", "-x", "c++", "-", "-o", os.devnull],
                           input="int f(int x) { return x + 1; }\n", capture_output=True, text=True)
    if probe.returncode:
        return f"{cxx} cannot build with {FLAGS}: {probe.stderr[-300:]}"
    # libasan first (it must be the first library loaded); libstdc++ too, or ASan finds no __cxa_throw to wrap in a
    # python that does not link it, and the library's first exception aborts with a CHECK failure.
    return cmake, f"{asan} {stdcxx}" if os.path.isabs(stdcxx) else asan


def test_sanitized_library_sweep(tmp_path):
    tools = _toolchain()
    if isinstance(tools, str):
        pytest.skip(tools)
    cmake, preload = tools
    configure = subprocess.run([cmake, "-S", ROOT / "cpp_ops", "-B", BUILD, "-DMOEFY_SANITIZE=ON",
                                f"-DPython_EXECUTABLE={sys.executable}"], capture_output=True, text=True)
    assert configure.returncode == 0, configure.stdout[-2000:] + configure.stderr[-2000:]
    build = subprocess.run([cmake, "--build", BUILD], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    library = BUILD / "libmoefy_ops.so"
    if not library.is_file():  # CMake said why (no ONNX Runtime headers ...) and built nothing
        pytest.skip(f"the library was not built: {configure.stderr[-500:]}")

    logs = tmp_path / "reports"
    logs.mkdir()
    env = {**os.environ, "LD_PRELOAD": preload, "MOEFY_OPS_LIBRARY": str(library),
           # Python's own allocations are not leaks of ours; the library's must not overflow or be undefined.
           "ASAN_OPTIONS": f"detect_leaks=0:log_path={logs}/asan",
           "UBSAN_OPTIONS": f"print_stacktrace=1:log_path={logs}/ubsan",
           "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, ROOT / "tests" / "sanitize_sweep.py", str(CASES)], capture_output=True,
                       text=True, env=env, timeout=1800)
    reports = sorted(logs.iterdir())
    text = "".join(p.read_text(errors="replace")[:3000] for p in reports[:3])
    assert not reports, f"{len(reports)} sanitizer report(s):\n{text}"
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"sweep: {CASES} valid problems x 2 backends, 0 wrong" in r.stdout and "0 accepted" in r.stdout, r.stdout
