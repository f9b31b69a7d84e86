"""Timing shared by the benchmarks (after optimum-benchmark: warm-up, minimum runs and duration, p50/p90).

Backends are timed in blocks that rotate over several rounds, not interleaved run by run: ONNX Runtime
pools spin after a run, and a pool spinning from the previous backend's run would steal the cores from
the next one. Between blocks the process sleeps long enough for spinning pools to go idle, so every
backend runs with its own best settings (spinning on for ONNX Runtime, off only where Numba shares the
cores) and still side by side with the others in one process.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

SETTLE_SECONDS = 0.02  # longer than ONNX Runtime's spin-wait before its threads block


def time_blocks(fns: dict[str, Callable[[], object]], *, warmup: int = 10, iters: int = 10,
                min_seconds: float = 0.5, rounds: int = 3) -> dict[str, np.ndarray]:
    """Per backend: ``warmup`` untimed runs, then at least ``iters`` timed runs and ``min_seconds`` of
    timed work, spread over ``rounds`` rotating blocks. Returns microseconds per run."""
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
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
                n += 1
    return {k: np.asarray(v) * 1e6 for k, v in times.items()}


def p50_p90(us: np.ndarray) -> tuple[float, float]:
    return float(np.median(us)), float(np.percentile(us, 90))
