"""The CLIs' file handling, tried the way a careful user breaks it: outputs that are directories, in missing,
read-only or full places, malformed config files and metadata, signals mid-export. Every case must end in
``error: ...`` or ``interrupted`` with the documented exit code, no traceback, and nothing half-written; bad output
paths must be refused before the work starts.

Read-only and full filesystems are made in a private mount namespace (``unshare --mount``: a read-only bind mount,
a small filled tmpfs), which needs root (we may run as root, for whom chmod does not make a directory read-only);
without it the read-only case falls back to chmod and the full-disk case is skipped.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_inputs

from exporter import export
from exporter.cli import main as export_main
from exporter.eval_cli import main as eval_main

QUIET = dict(progress=False, log=lambda *a: None)
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
EXPORT_FLAGS = ["--experts", "4", "--top-k", "1", "--backend", "numba-split"]


def cli(module: str, *args) -> list[str]:
    return [sys.executable, "-m", f"exporter.{module}", *map(str, args)]


def _namespaces_work() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d" && umount "$d" && rmdir "$d"'],
                       capture_output=True)
    return r.returncode == 0


NAMESPACES = _namespaces_work()
READ_ONLY = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0"'
# A tmpfs filled to the last block: creating a file still works (the pre-work check passes), writing data fails.
FULL = 'mount -t tmpfs -o size=256k tmpfs "$0" && (dd if=/dev/zero of="$0/fill" bs=4k 2>/dev/null || true)'


def run_in(directory: Path, setup: str, argv: list[str]) -> tuple[int, str, list[str]]:
    """Run ``argv`` with ``directory`` prepared by ``setup`` (READ_ONLY, FULL) in a private mount namespace, which
    vanishes with the process; returns (exit code, stderr, what the directory held at the end)."""
    script = setup + '\n"$@"; rc=$?\necho "@@left:$(ls -A "$0" | tr "\\n" " ")" >&2\nexit $rc'
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(directory), *argv],
                       capture_output=True, text=True, env=ENV, timeout=900)
    err, _, left = r.stderr.rpartition("@@left:")
    return r.returncode, err, left.split()


def assert_clean_error(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err, err


@pytest.fixture(scope="module")
def tiny_moe(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe") / "k1.onnx"
    export(tiny_bert_dir, out, experts=4, top_k=1, backend="numba-split", **QUIET)
    return out


# ----------------------------------------------------------------------------- bad output paths, before the work
def bad_targets(tmp_path: Path) -> list[tuple[Path, str]]:
    """(output path, message) pairs a user could pass by mistake."""
    (tmp_path / "adir").mkdir(exist_ok=True)
    (tmp_path / "afile").write_text("x")
    return [(tmp_path / "adir", "is a directory"),
            (tmp_path / "missing" / "out.onnx", "does not exist"),
            (tmp_path / "afile" / "out.onnx", "is not a directory"),
            (tmp_path / ("x" * 300 + ".onnx"), "File name too long")]


def test_moe_export_refuses_bad_outputs_before_the_work(capsys, tmp_path, tiny_bert_dir):
    # A path without .onnx is an export directory: an existing one that moefy did not write is refused.
    (tmp_path / "adir" / "keep.txt").parent.mkdir()
    (tmp_path / "adir" / "keep.txt").write_text("x")
    targets = [(tmp_path / "adir", "is not a moefy export directory")] + bad_targets(tmp_path)[1:]
    for target, message in targets:
        code = export_main([str(tiny_bert_dir), str(target), *EXPORT_FLAGS])
        err = capsys.readouterr().err
        assert_clean_error(code, err, message)
        assert "loading" not in err, f"{target}: the model was loaded before the output was checked"
    code = export_main([str(tiny_bert_dir), str(tmp_path / "m.onnx"), *EXPORT_FLAGS, "--save-moefied",
                        str(tmp_path / "afile")])
    assert_clean_error(code, capsys.readouterr().err, "exists and is not a directory")
    assert sorted(os.listdir(tmp_path)) == ["adir", "afile"]


def test_moe_eval_refuses_bad_outputs_before_the_work(capsys, tmp_path, tiny_bert_dir, tiny_moe):
    for flag in ("--json", "--plot"):
        for target, message in bad_targets(tmp_path):
            extra = [tiny_moe, tiny_moe] if flag == "--plot" else [tiny_moe]
            code = eval_main([str(tiny_bert_dir), *map(str, extra), "--tasks", "none", flag, str(target)])
            err = capsys.readouterr().err
            assert_clean_error(code, err, message)
            assert "loading the dense model" not in err
    code = eval_main([str(tiny_bert_dir), "--curve", str(tmp_path / "afile" / "curve"), "--experts", "4", "--shares",
                      "0.25,0.5"])
    assert_clean_error(code, capsys.readouterr().err, "exists and is not a directory")
    code = eval_main([str(tiny_bert_dir), str(tmp_path / "adir"), "--tasks", "none"])  # a directory as the model
    assert_clean_error(code, capsys.readouterr().err, f"{tmp_path / 'adir'} is a directory; pass an ONNX file")


@pytest.mark.parametrize("tool", ["moe-export", "moe-eval"])
def test_read_only_directory(tool, tmp_path, tiny_bert_dir, tiny_moe):
    ro = tmp_path / "ro"
    ro.mkdir()
    argv = (cli("cli", tiny_bert_dir, ro / "m.onnx", *EXPORT_FLAGS) if tool == "moe-export"
            else cli("eval_cli", tiny_bert_dir, tiny_moe, "--tasks", "none", "--json", ro / "r.json"))
    if NAMESPACES:
        code, err, left = run_in(ro, READ_ONLY, argv)
        message = "Read-only file system"
    elif os.geteuid() != 0:
        ro.chmod(0o555)
        r = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=900)
        code, err, left, message = r.returncode, r.stderr, os.listdir(ro), "Permission denied"
    else:
        pytest.skip("root without mount namespaces: no way to make a read-only directory")
    assert_clean_error(code, err, f"cannot write to the directory {ro}: {message}")
    assert "loading" not in err  # refused before the work
    assert left == []


@pytest.mark.skipif(not NAMESPACES, reason="a small tmpfs needs root and mount namespaces (unshare --mount)")
def test_full_disk_moe_export(tmp_path, tiny_bert_dir):
    full = tmp_path / "full"
    full.mkdir()
    code, err, left = run_in(full, FULL, cli("cli", tiny_bert_dir, full / "m.onnx", *EXPORT_FLAGS))
    assert_clean_error(code, err, f"cannot write output {full / 'm.onnx'}: No space left on device")
    assert "validating" not in err  # the write failed, nothing was validated or renamed
    assert left == ["fill"]  # no temporary file, no output


@pytest.mark.skipif(not NAMESPACES, reason="a small tmpfs needs root and mount namespaces (unshare --mount)")
def test_full_disk_moe_eval_json(tmp_path, tiny_bert_dir, tiny_moe):
    full = tmp_path / "full"
    full.mkdir()
    code, err, left = run_in(full, FULL, cli("eval_cli", tiny_bert_dir, tiny_moe, "--tasks", "none", "--json",
                                             full / "r.json"))
    assert_clean_error(code, err, f"cannot write --json {full / 'r.json'}: No space left on device")
    assert left == ["fill"]


# ----------------------------------------------------------------------------- signals, stale files, file mode
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_export_leaves_nothing(sig, tmp_path, tiny_bert_dir):
    """Stopped once the ONNX file is written to its temporary name and is being validated, then signalled: the
    temporary file is removed, no traceback, exit 128 + N (SIGTERM used to leave the full-size temporary file,
    SIGINT to print a traceback)."""
    p = subprocess.Popen(cli("cli", tiny_bert_dir, tmp_path / "m.onnx", *EXPORT_FLAGS), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    seen = []
    for line in p.stderr:
        seen.append(line)
        if line.startswith("validating with ONNX Runtime"):
            p.send_signal(signal.SIGSTOP)
            break
    try:
        temporary = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # the export's staging directory
        size = sum(f.stat().st_size for f in (tmp_path / temporary[0]).rglob("*")) if temporary else 0
        assert size > 10_000, (os.listdir(tmp_path), seen)
    finally:
        p.send_signal(sig)
        p.send_signal(signal.SIGCONT)
    _, rest = p.communicate(timeout=600)
    err = "".join(seen) + rest
    assert p.returncode == 128 + sig, err
    assert f"moe-export: interrupted ({sig.name}); nothing was written" in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []


def test_stale_temporary_files_are_removed_and_the_umask_is_honoured(tmp_path, tiny_bert_dir):
    """A temporary file of a killed run (its process gone) is removed by the next export to the same output; one of
    a live process is not. The output's mode is 0666 less the umask (temp file + rename used to give 0600)."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".m.onnx.{dead.pid}.0123abcd.tmp"
    live = tmp_path / f".m.onnx.{os.getppid()}.0123abcd.tmp"
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"x")
    old = os.umask(0o027)
    try:
        export(tiny_bert_dir, tmp_path / "m.onnx", experts=4, top_k=1, backend="numba-split", **QUIET)
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == sorted(["m.onnx", live.name])
    assert stat.S_IMODE((tmp_path / "m.onnx").stat().st_mode) == 0o640


# ----------------------------------------------------------------------------- malformed JSON
@pytest.mark.parametrize("config,message", [
    ("3", "must hold a JSON object, got int"),
    ("null", "must hold a JSON object, got NoneType"),
    ('{"model_type": ["bert"]}', "model_type must be a string, got ['bert']"),
    ("{not json", "cannot read"),
])
def test_malformed_config_json(config, message, capsys, tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(config)
    assert_clean_error(export_main([str(d), str(tmp_path / "m.onnx"), *EXPORT_FLAGS]), capsys.readouterr().err, message)


def test_moefied_directory_with_a_broken_moefy_config(capsys, tmp_path, tiny_bert_dir):
    d = tmp_path / "moefied"
    shutil.copytree(tiny_bert_dir, d)
    for content, message in [({"format": "moefy.moe", "format_version": 1, "experts": 4},
                              "lacks the field(s) top_k, activation"),
                             ({"format": "moefy.moe", "format_version": 1, "experts": "4", "top_k": 1,
                               "activation": "gelu", "model_type": "bert", "num_layers": 2,
                               "intermediate_size": 64}, "experts must be int, got '4'")]:
        (d / "moefy_config.json").write_text(json.dumps(content))
        assert_clean_error(export_main([str(d), str(tmp_path / "m.onnx"), *EXPORT_FLAGS]), capsys.readouterr().err,
                           message)


def _moe_metadata(**change):
    cfg = {"format": "moefy.moe", "format_version": 1, "experts": 4, "top_k": 1, "activation": "gelu",
           "model_type": "bert", "num_layers": 1, "intermediate_size": 20, "op_domain": "ai.moefy", "op_version": 2}
    cfg.update(change)
    return json.dumps({k: v for k, v in cfg.items() if v is not None})


@pytest.mark.parametrize("metadata,message", [
    (_moe_metadata(experts=0), "experts, num_layers and intermediate_size must be >= 1"),  # was ZeroDivisionError
    (_moe_metadata(top_k=None), "lacks the field(s) top_k"),
    (_moe_metadata(num_layers="1"), "num_layers must be int, got '1'"),
    (_moe_metadata(layer_top_k=[1, 2]), "layer_top_k must list 1 values"),
    ("[1]", "must be a JSON object, got list"),
    ("{oops", "is not valid JSON"),
])
def test_moe_eval_on_broken_metadata(metadata, message, capsys, tmp_path, tiny_bert_dir, rng):
    from runtime.session import METADATA_KEY
    from runtime.single_op import single_op_model
    model = single_op_model(make_inputs(rng, d=32, E=4, m=5), top_k=1)
    model.metadata_props.add(key=METADATA_KEY, value=metadata)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert_clean_error(eval_main([str(tiny_bert_dir), str(path), "--tasks", "none"]), capsys.readouterr().err, message)


def test_saved_moefied_directory_is_whole(tmp_path, tiny_bert_dir):
    """--save-moefied writes into a staging directory and moves the files in at the end; the result reloads."""
    from exporter.config import MoEConfig
    saved = tmp_path / "nested" / "moefied"
    export(tiny_bert_dir, tmp_path / "m.onnx", experts=4, top_k=1, backend="numba-split", save_moefied_dir=saved,
           **QUIET)
    assert MoEConfig.load(saved).experts == 4
    assert not [p for p in saved.parent.iterdir() if p.name.endswith(".tmp")]
    assert np.isfinite((tmp_path / "m.onnx").stat().st_size)
