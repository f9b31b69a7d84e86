"""The C++ kernel core built for each vector ISA it has a path for, checked against a plain double-precision
implementation (cpp_ops/tests/kernel_check.cc): AVX-512 and AVX2 (x86 builds pick one with -march), the generic
vector fallback, and NEON (aarch64, cross-compiled and run under qemu when those tools are installed:
apt-get install g++-aarch64-linux-gnu qemu-user)."""
from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "cpp_ops"
SOURCES = [ROOT / "tests" / "kernel_check.cc", ROOT / "kernels" / "sparse_ffn.cc"]
CXX = shutil.which("c++") or shutil.which("g++")


def cpu_flags() -> set[str]:
    try:
        line = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


X86_BUILDS = {  # -march, CPU flags the build needs to run here
    "native": set(),
    "x86-64-v4": {"avx512f", "avx512bw", "avx512vl"},  # AVX-512 path
    "x86-64-v3": {"avx2", "fma"},  # AVX2 path
    "x86-64-v2": set(),  # no AVX: the generic vector-extension path
}


def build_and_run(cxx: list[str], march: str, out: Path, runner: list[str] = ()) -> str:
    build = subprocess.run([*cxx, "-std=c++17", "-O2", f"-march={march}", f"-I{ROOT}", *map(str, SOURCES), "-o",
                            str(out), *(["-static"] if runner else [])], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    got = subprocess.run([*runner, str(out)], capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]
    return got.stdout


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 builds")
@pytest.mark.parametrize("march", list(X86_BUILDS))
def test_x86_builds_match_the_math(march, tmp_path):
    missing = X86_BUILDS[march] - cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(sorted(missing))}")
    assert "ok" in build_and_run([CXX], march, tmp_path / f"check-{march}")


@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64")),
                    reason="no aarch64 cross compiler / qemu-aarch64 (apt-get install g++-aarch64-linux-gnu qemu-user)")
def test_neon_build_matches_the_math(tmp_path):
    assert "ok" in build_and_run(["aarch64-linux-gnu-g++"], "armv8-a", tmp_path / "check-neon", ["qemu-aarch64"])
