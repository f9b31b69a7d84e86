"""The benchmark's ceilings (arithmetic only: no timing is asserted)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_ops import add_ceilings  # noqa: E402


def rows(tokens, touched, p50, bandwidth=0.0):
    """Rows of one case; ``bandwidth``: the DRAM bytes/s measured beside them."""
    return [{"backend": b, "tokens": tokens, "touched_share": touched, "p50_us": t, "dram_bytes_per_s": bandwidth}
            for b, t in p50.items()]


def test_compute_bound_when_few_experts_are_touched():
    r = rows(1, 0.25, {"dense ORT": 10_000, "moefy cpp": 2_500}, bandwidth=400e9)
    add_ceilings(r, 0.25, expert_bytes=400_000_000, from_dram=True)  # floor 250 µs: far below dense/4
    assert r[0]["ceiling"] is None and r[1]["ceiling"] == pytest.approx(4.0)


def test_memory_bound_when_every_expert_is_read():
    # 16 tokens touch 98% of 360 MB; at 45 GB/s that is 7.84 ms, so against a 16 ms dense call the bound is
    # about 2.04x, below the 4x compute bound; int8 reads a quarter of the bytes.
    r = rows(16, 0.98, {"dense ORT": 16_000, "moefy cpp": 9_000, "moefy cpp int8": 3_000}, bandwidth=45e9)
    add_ceilings(r, 0.25, expert_bytes=360_000_000, from_dram=True)
    assert r[1]["ceiling"] == pytest.approx(16_000 / 7_840, rel=1e-3)
    assert r[2]["ceiling"] == pytest.approx(4.0)


def test_no_memory_bound_for_weights_in_cache():
    r = rows(16, 0.98, {"dense ORT": 100, "moefy cpp": 60}, bandwidth=45e9)
    add_ceilings(r, 0.25, expert_bytes=4_700_000, from_dram=False)
    assert r[1]["ceiling"] == pytest.approx(4.0)


def test_each_load_has_its_own_dense_and_bandwidth():
    quiet = rows(16, 0.98, {"dense ORT": 16_000, "moefy cpp": 9_000}, bandwidth=45e9)
    loaded = rows(16, 0.98, {"dense ORT": 32_000, "moefy cpp": 12_000}, bandwidth=30e9)
    for r in loaded:
        r["background_load"] = 1
    add_ceilings(quiet + loaded, 0.25, expert_bytes=360_000_000, from_dram=True)
    assert quiet[1]["ceiling"] == pytest.approx(16_000 / 7_840, rel=1e-3)
    assert loaded[1]["ceiling"] == pytest.approx(min(4.0, 32_000 / (1e6 * 0.98 * 360e6 / 30e9)), rel=1e-3)
