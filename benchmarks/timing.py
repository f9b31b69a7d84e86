"""Timing shared by the benchmarks (after optimum-benchmark: warm-up, minimum runs and duration, p50/p90).

Backends are timed in blocks that rotate over several rounds, not interleaved run by run: ONNX Runtime
pools spin after a run, and a pool spinning from the previous backend's run would steal the cores from
the next one. Between blocks the process sleeps long enough for spinning pools to go idle, so every
backend runs with its own best settings (spinning on for ONNX Runtime, off only where Numba shares the
cores) and still side by side with the others in one process.
"""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numba
import numpy as np

SETTLE_SECONDS = 0.02  # longer than ONNX Runtime's spin-wait before its threads block


def time_blocks(fns: dict[str, Callable[[], object]], *, warmup: int = 10, iters: int = 10,
                min_seconds: float = 0.5, rounds: int = 3,
                before: Callable[[], object] | None = None) -> dict[str, np.ndarray]:
    """Per backend: ``warmup`` untimed runs, then at least ``iters`` timed runs and ``min_seconds`` of
    timed work, spread over ``rounds`` rotating blocks. ``before`` (untimed) runs ahead of every timed
    run, e.g. to evict the caches. Returns microseconds per run."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    per_round_runs = max(1, -(-iters // rounds))
    per_round_seconds = min_seconds / rounds
    for r in range(rounds):
        names = list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]
        for name in names:
            time.sleep(SETTLE_SECONDS)
            f, start, n = fns[name], time.perf_counter(), 0
            while n < per_round_runs or time.perf_counter() - start < per_round_seconds:
                if before is not None:
                    before()
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
                n += 1
    return {k: np.asarray(v) * 1e6 for k, v in times.items()}


class CacheEvictor:
    """Writes a buffer twice the size of the last-level cache, so the next run reads its weights from DRAM,
    as a layer of a real model does (the other layers' weights have been through the cache since)."""

    def __init__(self, factor: float = 2.0):
        self.buf = np.ones(int(factor * last_level_cache_bytes()) // 8, np.float64)

    def __call__(self) -> None:
        self.buf += 1.0


def last_level_cache_bytes(default: int = 64 << 20) -> int:
    """Size of the largest CPU cache (Linux sysfs), or ``default``."""
    import glob
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = open(path).read().strip()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=default)


def stream_bandwidth(threads: int, repeats: int = 10, min_seconds: float = 1.0) -> float:
    """Bytes per second this machine reads from DRAM with ``threads`` Numba threads: the best of at least
    ``repeats`` parallel sums (and ``min_seconds`` of them) over a buffer 16x the last-level cache (so no pass
    finds it in a cache). The bound on any kernel that must read a given number of weight bytes once per call."""
    buf = np.ones(max(16 * last_level_cache_bytes(), 256 << 20) // 4, np.float32)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    _chunked_sum(buf[:1 << 20])  # compile outside the timing
    best, n, start = np.inf, 0, time.perf_counter()
    while n < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        _chunked_sum(buf)
        best, n = min(best, time.perf_counter() - t0), n + 1
    return buf.nbytes / best


class BandwidthProbe:
    """One parallel sum over a buffer 16x the last-level cache (Numba's threads, as many as set): timed in the
    same rotation as the kernels, its median gives the DRAM read bandwidth available during that very case
    (this machine's varies by tens of percent from minute to minute, so a figure taken once at the start
    would misplace the ceilings)."""

    def __init__(self):
        self.buf = np.ones(max(16 * last_level_cache_bytes(), 256 << 20) // 4, np.float32)
        _chunked_sum(self.buf[:1 << 20])  # compile outside the timing

    def __call__(self) -> None:
        _chunked_sum(self.buf)

    def bytes_per_s(self, us: np.ndarray) -> float:
        return self.buf.nbytes / (float(np.median(us)) * 1e-6)


@numba.njit(parallel=True, fastmath=True, cache=True)  # fastmath: a vectorised, reassociated sum
def _chunked_sum(a):
    chunks = 64  # several per thread, each vectorised by NumPy's sum
    step = (a.size + chunks - 1) // chunks
    part = np.zeros(chunks, np.float32)
    for c in numba.prange(chunks):
        part[c] = a[c * step:min(a.size, (c + 1) * step)].sum()
    return part.sum()


def p50_p90(us: np.ndarray) -> tuple[float, float]:
    return float(np.median(us)), float(np.percentile(us, 90))


def cpu_model() -> str:
    """The CPU's model name and vector ISA, from /proc/cpuinfo (e.g. "AMD EPYC 9R14 (AVX-512)")."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == (platform.processor() or platform.machine()):
                name = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    isa = ("AVX-512" if {"avx512f", "avx512bw", "avx512vl"} <= flags else "AVX2" if {"avx2", "fma"} <= flags
           else "NEON" if "asimd" in flags else "SSE2" if "sse2" in flags else "?")
    return f"{name} ({isa})"


def machine(threads: list[int] | int | None = None) -> str:
    """One line naming the machine and the code paths each engine runs, for every table's caption."""
    import numba
    import onnxruntime as ort
    import runtime
    paths = "C++ library not built"
    if runtime.cpp_available():
        info = runtime.isa_paths()
        paths = f"moefy C++ paths this CPU runs: {', '.join(p['name'] for p in info['paths'] if p['runs'])} " \
                f"(default {info['default'] or info['default_error']})"
    numba_target = numba.config.CPU_NAME or "host"
    return (f"{cpu_model()}, {os.cpu_count()} cores; {paths}; dense ONNX Runtime {ort.__version__} (MLAS picks "
            f"its own kernels for this CPU); Numba {numba.__version__} compiles for {numba_target}")


@contextlib.contextmanager
def background_load(processes: int) -> Iterator[None]:
    """``processes`` CPU-bound processes (a Python busy loop each, unpinned: the scheduler shares the cores
    with them), as a desktop app's CPU is shared with other programs; stopped on exit, whatever happens."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
             for _ in range(processes)]
    try:
        time.sleep(0.2)  # let them start and take their share of the cores
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
