"""What a user expects around the work: progress that a log can read, a calibration cache that says its size, keeps
under a cap (least recently used out first) and says where it lives in --help."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporter import calib_cache
from exporter.cli import build_parser, main as export_main
from exporter.progress import tqdm


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_in_a_log_is_whole_lines():
    log = io.StringIO()
    for _ in tqdm(range(1000), desc="work", file=log):
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 2  # the first state and the last: redraws within LOG_INTERVAL are not written
    assert lines[0].startswith("work:   0%") and "1000/1000" in lines[1]
    log = io.StringIO()
    for _ in tqdm(range(3), desc="gone", file=log, leave=False):
        pass
    assert log.getvalue().splitlines() == [ln for ln in log.getvalue().splitlines() if ln.strip()]  # no blank lines
    log = io.StringIO()
    for _ in tqdm(range(2), desc="outer", file=log):
        for _ in tqdm(range(2), desc="inner", file=log, leave=False):
            pass
    assert "\x1b" not in log.getvalue() and all(ln.strip() for ln in log.getvalue().splitlines())  # nested: no escapes


def test_progress_on_a_terminal_redraws_in_place():
    term = _Terminal()
    for _ in tqdm(range(5), desc="work", file=term, mininterval=0):
        pass
    assert term.getvalue().count("\r") >= 5


def test_export_through_a_pipe_does_not_spam(tiny_bert_dir, tmp_path):
    """moe-export with stderr on a pipe (as in CI or `2> log`): each bar is a line or two, no carriage returns."""
    exe = Path(sys.executable).with_name("moe-export")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(exe), str(tiny_bert_dir), str(tmp_path / "m.onnx"), "--experts", "4", "--top-k", "2",
                        ], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr
    bars = [ln for ln in r.stderr.splitlines() if ln.startswith(("splitting FFNs into experts:", "building routers:"))]
    assert 2 <= len(bars) <= 4 and all("it/s]" in ln or "s/it]" in ln for ln in bars)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(calib_cache.MAX_GB_ENV, raising=False)
    return tmp_path / "cache"


def _fake_entries(cache: Path, sizes: list[int]) -> list[Path]:
    """Entries of the given sizes, oldest first."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        p = cache / f"{calib_cache.CACHE_FORMAT}-model{i}-text.npz"
        p.write_bytes(b"\0" * size)
        os.utime(p, (1_000_000 + i, 1_000_000 + i))
        paths.append(p)
    return paths


def test_cap_evicts_least_recently_used(cache):
    old, mid, new = _fake_entries(cache, [400, 300, 200])
    assert calib_cache.usage() == (3, 900)
    assert calib_cache.evict(550) == [old]  # 200 + 300 fit; the oldest goes
    assert calib_cache.usage() == (2, 500)
    os.utime(mid, None)  # used now: the most recent
    assert calib_cache.evict(350) == [new]
    assert calib_cache.usage() == (1, 300) and mid.exists()
    assert calib_cache.describe(350_000_000) == f"1 entry, 0 MB of a 350 MB cap in {cache}"


def test_calibrate_reports_size_and_keeps_to_the_cap(tiny_bert_dir, cache, monkeypatch):
    from exporter.source import load_model
    from exporter.tasks import task_for
    model, tok, adapter, _, _ = load_model(tiny_bert_dir)

    def batch(words):
        b = tok([f"{w} the cat" for w in words], padding=True, return_tensors="pt")
        return {k: b[k] for k in task_for(adapter).model_inputs(model)}
    logs = []
    calib_cache.calibrate(model, adapter, batch(["a", "b"]), log=logs.append)
    (first,) = calib_cache.entries()
    size = first.stat().st_size
    assert "computed and cached" in logs[-1] and f"cache: 1 entry" in logs[-1] and f"in {cache}" in logs[-1]

    monkeypatch.setenv(calib_cache.MAX_GB_ENV, str(1.5 * size / 1e9))  # room for one entry
    calib_cache.calibrate(model, adapter, batch(["c", "d"]), log=logs.append)
    assert "1 least recently used removed" in logs[-1] and not first.exists() and calib_cache.usage()[0] == 1
    calib_cache.calibrate(model, adapter, batch(["c", "d"]), log=logs.append)
    assert "cache hit" in logs[-1]

    calib_cache.calibrate(model, adapter, batch(["e", "f"]), max_gb=size / 2e9, log=logs.append)  # flag over env
    assert "not cached" in logs[-1] and "1 least recently used removed" in logs[-1]
    assert calib_cache.usage() == (0, 0)


def test_bad_cap_is_a_clear_error(tiny_bert_dir, tmp_path, cache, monkeypatch, capsys):
    out = tmp_path / "m.onnx"
    assert export_main([str(tiny_bert_dir), str(out), "--calib-cache-max-gb", "-1", "--quiet"]) == 2
    assert "--calib-cache-max-gb must be a size in GB >= 0" in capsys.readouterr().err
    monkeypatch.setenv(calib_cache.MAX_GB_ENV, "lots")
    assert export_main([str(tiny_bert_dir), str(out), "--quiet"]) == 2
    assert "$MOEFY_CALIB_CACHE_MAX_GB must be a size in GB >= 0 (e.g. 2 or 0.5), got 'lots'" in capsys.readouterr().err
    assert not out.exists()


def test_help_names_the_cache_location_and_size(tmp_path, monkeypatch):
    monkeypatch.delenv("MOEFY_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps help text at the terminal's width
    _fake_entries(tmp_path / "xdg" / "moefy" / "calibration", [2_000_000, 3_000_000])
    text = " ".join(build_parser().format_help().split())
    assert f"here {tmp_path / 'xdg' / 'moefy' / 'calibration'}, now 2 entries, 5 MB" in text
    assert "$XDG_CACHE_HOME/moefy/calibration" in text
    assert f"--calib-cache-max-gb GB cap on the calibration cache's total size" in text
    assert f"default $MOEFY_CALIB_CACHE_MAX_GB if set, else {calib_cache.DEFAULT_MAX_GB:g}" in text
