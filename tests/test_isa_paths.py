"""The C++ kernels' instruction-set paths (cpp_ops/kernels/isa_*.cc, chosen by kernels/dispatch.cc).

* Every path this machine runs, forced in turn through ONNX Runtime (``InferenceSession(..., isa=...)``), against
  the NumPy reference: shapes with vector tails, k, plain and gated, int8, dynamic k, one token, zero tokens,
  weights and router fed at run time.
* The dispatcher's choice against the CPU's flags; clear errors for a path that is unknown, of another
  architecture, or one the CPU lacks (``MOEFY_ISA`` too), never an illegal instruction.
* The kernel core alone (cpp_ops/tests/kernel_check.cc, every path against double-precision math), built with
  CMake and run natively, under ``qemu-x86_64 -cpu <model>`` for CPUs without AVX-512 / AVX2, and cross-built
  for aarch64 (NEON) under ``qemu-aarch64`` when those are installed (``apt-get install qemu-user
  g++-aarch64-linux-gnu``; .ci/run installs them); skipped cleanly otherwise.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_inputs, near_tie_tokens, requires_cpp

import runtime
from runtime import reference
from runtime.single_op import single_op_model

CPP_OPS = Path(__file__).resolve().parents[1] / "cpp_ops"
X86 = platform.machine() in ("x86_64", "AMD64")
RTOL = 2e-5


def runnable_paths() -> list[str]:
    if not runtime.cpp_available():
        return []
    return [p["name"] for p in runtime.isa_paths()["paths"] if p["runs"]]


def cpu_flags() -> set[str]:
    try:
        line = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def run_path(isa, a, feeds=("X",), **attrs):
    feeds = [f for f in feeds if a.get(f) is not None]
    sess = runtime.InferenceSession(single_op_model(a, feeds=feeds, **attrs).SerializeToString(), backend="cpp",
                                    isa=isa)
    return sess.run(None, {f: a[f] for f in feeds})[0]


def assert_matches_reference(got, a, **attrs):
    ref = reference.sparse_expert_ffn(a, **attrs)
    assert got.shape == ref.shape and got.dtype == np.float32
    keep = ~near_tie_tokens(a, attrs["top_k"], threshold=attrs.get("score_threshold")).reshape(ref.shape[:-1])
    err = np.abs(got - ref)[keep].max(initial=0.0)
    assert err <= RTOL * np.abs(ref).max(initial=0.0) + 1e-6, f"max abs error {err:.3e}"


def quantized(a):
    from exporter.quantize import quantize_experts
    return quantize_experts(a)


# -------------------------------------------------------------------------- every runnable path vs reference
PATHS = runnable_paths()
CASES = {  # name: (make_inputs kwargs, attrs, feeds, int8)
    "one-token": (dict(lead=(1,), d=16, E=4, m=3), dict(top_k=1), ("X",), False),
    "zero-tokens": (dict(lead=(0,), d=24, E=4, m=8), dict(top_k=2), ("X",), False),
    "tails-k=E": (dict(lead=(5,), d=33, E=5, m=17, unselected=False), dict(top_k=5), ("X",), False),
    "blocks": (dict(lead=(130,), d=64, E=8, m=16, unselected=True), dict(top_k=8), ("X",), False),
    "rank-4": (dict(lead=(3, 5, 7), d=48, E=16, m=20, unselected=True), dict(top_k=2), ("X",), False),
    "minilm": (dict(lead=(70,), d=384, E=32, m=48, unselected=True), dict(top_k=8), ("X",), False),
    "gated-silu": (dict(lead=(9,), d=40, E=8, m=7, gated=True), dict(top_k=3, activation="silu"), ("X",), False),
    "smollm-decode": (dict(lead=(1,), d=576, E=32, m=48, gated=True, biases=False), dict(top_k=8, activation="silu"),
                      ("X",), False),
    "int8": (dict(lead=(19,), d=40, E=8, m=7, unselected=True), dict(top_k=3), ("X",), True),
    "int8-gated": (dict(lead=(6,), d=64, E=8, m=24, gated=True), dict(top_k=2, activation="gelu_tanh"), ("X",), True),
    "dynamic-k": (dict(lead=(40,), d=48, E=16, m=8, unselected=True),
                  dict(top_k=6, min_k=2, score_threshold=0.3), ("X",), False),
    "scores-given": (dict(lead=(11,), d=32, E=6, m=9, router="scores"), dict(top_k=2, activation="relu"),
                     ("X", "router_scores"), False),
    "weights-fed": (dict(lead=(7,), d=24, E=6, m=5, gated=True, unselected=True), dict(top_k=2),
                    ("X", "W1", "W2", "Wg", "B2", "unselected_bias"), False),
    "router-fed": (dict(lead=(12,), d=40, E=8, m=16), dict(top_k=3), ("X", "router_w"), False),
}


@requires_cpp
@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_each_path_matches_the_reference(isa, case, rng):
    kwargs, attrs, feeds, int8 = CASES[case]
    a = make_inputs(rng, **kwargs)
    if int8:
        a = quantized(a)
    attrs = {"activation": "gelu", **attrs}
    assert_matches_reference(run_path(isa, a, feeds=feeds, **attrs), a, **attrs)


# ----------------------------------------------------------------------------------------------- the dispatcher
@requires_cpp
def test_dispatcher_picks_the_widest_path_the_cpu_runs():
    info = runtime.isa_paths()
    flags = cpu_flags()
    if X86:  # /proc/cpuinfo's names: pni is SSE3, abm is LZCNT
        v4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
        v3 = {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe"}
        v2 = {"pni", "ssse3", "sse4_1", "sse4_2", "popcnt", "cx16", "lahf_lm"}
        want = ("avx512" if v4 | v3 | v2 <= flags else "avx2" if v3 | v2 <= flags else "sse41" if v2 <= flags
                else "sse2")
        assert [p["name"] for p in info["paths"]] == ["avx512", "avx2", "sse41", "sse2"]
    else:
        want = "neon"
    assert info["best"] == want
    if not os.environ.get("MOEFY_ISA"):
        assert info["default"] == want and info["default_error"] == ""
    runs = {p["name"]: p["runs"] for p in info["paths"]}
    assert runs[want] and all(p["missing"] == "" for p in info["paths"] if p["runs"])


@requires_cpp
@pytest.mark.parametrize("isa, message", [
    ("avx9", "unknown instruction-set path 'avx9'; paths of this build: auto, "),
    ("neon" if X86 else "avx2", "path is not in this build (it is for another CPU architecture)"),
])
def test_a_path_that_cannot_run_is_a_clear_error(isa, message, rng):
    a = make_inputs(rng, lead=(2,))
    with pytest.raises(Exception, match=r"session option moefy\.isa=" + isa + ": .*" + message.replace("(", r"\(")
                       .replace(")", r"\)")):
        run_path(isa, a, top_k=2)


@requires_cpp
def test_moefy_isa_forces_the_path_for_the_process_and_refuses_a_foreign_one():
    code = ("import runtime, numpy as np; from runtime.single_op import single_op_model\n"
            "from conftest import make_inputs\n"
            "a = make_inputs(np.random.default_rng(0), lead=(3,))\n"
            "print(runtime.isa_paths()['default'])\n"
            "s = runtime.InferenceSession(single_op_model(a, top_k=2).SerializeToString(), backend='cpp')\n"
            "print(s.run(None, {'X': a['X']})[0].shape)\n")
    env = dict(os.environ)
    forced = PATHS[-1]  # the narrowest path this CPU runs
    env["MOEFY_ISA"] = forced
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                        cwd=Path(__file__).parent)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.split()[0] == forced
    env["MOEFY_ISA"] = "neon" if X86 else "avx512"
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).parent)
    assert bad.returncode == 1, bad.stdout + bad.stderr[-2000:]  # a Python exception, not a signal
    assert f"MOEFY_ISA={env['MOEFY_ISA']}: the {env['MOEFY_ISA']} path is not in this build" in bad.stderr


# ----------------------------------------------------------------------- the kernel core alone, under qemu too
CXX = shutil.which("c++") or shutil.which("g++")
CMAKE = shutil.which("cmake")
QEMU_X86 = shutil.which("qemu-x86_64")
needs_toolchain = pytest.mark.skipif(not (CXX and CMAKE), reason="no C++ compiler or cmake")


def build_kernel_check(build: Path, *cmake_args: str) -> Path:
    cfg = subprocess.run([CMAKE, "-S", str(CPP_OPS), "-B", str(build), "-DMOEFY_KERNEL_CHECK=ON",
                          "-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_EXE_LINKER_FLAGS=-static", *cmake_args],
                         capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout[-2000:] + cfg.stderr[-2000:]
    make = subprocess.run([CMAKE, "--build", str(build), "-j", "2"], capture_output=True, text=True)
    assert make.returncode == 0, make.stdout[-3000:] + make.stderr[-3000:]
    return build / "kernel_check"


@pytest.fixture(scope="module")
def kernel_check(tmp_path_factory):
    if not (CXX and CMAKE):
        pytest.skip("no C++ compiler or cmake")
    return build_kernel_check(tmp_path_factory.mktemp("kernel-check"))


def run_check(cmd: list[str], env_isa: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MOEFY_ISA"}
    if env_isa:
        env["MOEFY_ISA"] = env_isa
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


@needs_toolchain
def test_kernel_core_every_path_here(kernel_check):
    got = run_check([str(kernel_check)])
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]
    native = runnable_paths() or (["avx512", "avx2", "sse41", "sse2"] if X86 else ["neon"])
    for isa in [*native, "generic"]:
        assert f"ok {isa} " in got.stdout
    # A forced path of another architecture: a clear error and exit code 2, not a signal.
    foreign = run_check([str(kernel_check)], env_isa="neon" if X86 else "avx2")
    assert foreign.returncode == 2 and "path is not in this build" in foreign.stderr


# CPU models (qemu-x86_64 -cpu) and what the dispatcher must make of them. TCG emulates AVX2 since QEMU 7.2, never
# AVX-512, so these are the CPUs a laptop may have that this machine may not be.
QEMU_CPUS = {"qemu64": ("sse2", ["sse2"]), "Nehalem": ("sse41", ["sse41", "sse2"]),
             "Haswell": ("avx2", ["avx2", "sse41", "sse2"])}


@needs_toolchain
@pytest.mark.skipif(not (X86 and QEMU_X86), reason="x86-64 only; needs qemu-x86_64 (apt-get install qemu-user)")
@pytest.mark.parametrize("cpu", list(QEMU_CPUS))
def test_kernel_core_under_qemu_on_older_cpus(kernel_check, cpu):
    best, runs = QEMU_CPUS[cpu]
    got = run_check([QEMU_X86, "-cpu", cpu, str(kernel_check)])
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]
    for isa in runs:
        assert f"ok {isa} " in got.stdout
    assert f"default {best}" in got.stdout
    assert "ok avx512 " not in got.stdout
    # Forcing AVX-512 there: the features it lacks, exit code 2 (no SIGILL).
    forced = run_check([QEMU_X86, "-cpu", cpu, str(kernel_check)], env_isa="avx512")
    assert forced.returncode == 2, forced.stdout[-1000:] + forced.stderr[-1000:]
    assert "this CPU cannot run the avx512 path (it lacks" in forced.stderr and "avx512f" in forced.stderr
    assert f"paths it runs: {', '.join(runs)}" in forced.stderr


@needs_toolchain
@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64")),
                    reason="no aarch64 cross compiler / qemu-aarch64 (apt-get install g++-aarch64-linux-gnu qemu-user)")
def test_kernel_core_neon_under_qemu(tmp_path):
    exe = build_kernel_check(tmp_path / "arm", "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
                             f"-DCMAKE_CXX_COMPILER={shutil.which('aarch64-linux-gnu-g++')}")
    got = run_check([shutil.which("qemu-aarch64"), str(exe)])
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]
    assert "ok neon " in got.stdout and "ok generic " in got.stdout and "default neon" in got.stdout


# ------------------------------------------------------------------------------------------------- backend=auto
def test_auto_says_what_it_picked_and_why(rng, caplog, monkeypatch):
    import logging

    from runtime import session as session_module
    a = make_inputs(rng, lead=(2,))
    model = single_op_model(a, top_k=2).SerializeToString()
    monkeypatch.delenv("MOEFY_ISA", raising=False)
    with caplog.at_level(logging.INFO, logger="moefy.runtime"):
        sess = runtime.InferenceSession(model)
    if runtime.cpp_available():
        best = runtime.isa_paths()["best"]
        assert (sess.backend, sess.isa) == ("cpp", best)
        assert f"on the {best} path" in sess.backend_reason
    else:
        assert sess.backend == "numba-split" and "not built" in sess.backend_reason
    assert [r.getMessage() for r in caplog.records] == [f"backend auto -> {sess.backend}: {sess.backend_reason}"]
    # Without the library auto falls back to the Numba kernels between ONNX Runtime sessions, and says why.
    monkeypatch.setattr(session_module, "cpp_available", lambda: False)
    sess = runtime.InferenceSession(model)
    assert sess.backend == "numba-split" and "C++ library was not built" in sess.backend_reason
    np.testing.assert_allclose(sess.run(None, {"X": a["X"]})[0], reference.sparse_expert_ffn(a, top_k=2), atol=1e-5)
