"""Outputs written whole or not at all, and checked before the work that produces them.

A file is written to a temporary name beside its target, ``.NAME.PID.RANDOM.tmp``, created with mode 0666 less the
umask (as ``open()`` would create the target), and renamed into place once complete. An interrupted run (an
exception, SIGINT, SIGTERM within :func:`interruptible`) removes its temporary file; one that was killed outright
leaves it, and the next run writing the same target removes it, knowing its process is gone.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
from pathlib import Path
from typing import Iterator


class OutputError(OSError):
    """An output path that cannot be written (said before the work when it can be)."""


def temp_name(target: Path) -> Path:
    """``.NAME.PID.RANDOM.tmp`` beside ``target``: what :func:`remove_stale` recognises."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _create(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for open()


def remove_stale(target: str | os.PathLike) -> None:
    """Remove temporary files (or directories) of ``target`` left by runs whose process no longer exists."""
    target = Path(target)
    try:
        candidates = list(target.parent.glob(f".{target.name}.*.tmp"))
    except OSError:
        return
    for p in candidates:
        pid = p.name[len(target.name) + 2:].split(".")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or another user's): not ours to remove
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def check_output(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail now, not after the work, if ``path`` cannot be written: a directory, a missing or read-only parent
    directory, one we may not write to. A file is created and removed beside the target to find out."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a directory; give the path of a file to write")
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"{what}: directory {parent} does not exist" if not parent.exists()
                          else f"{what}: {parent} is not a directory")
    probe = temp_name(path)
    try:
        _create(probe)
    except OSError as e:
        raise OutputError(f"{what}: cannot write to the directory {parent}: {e.strerror}") from None
    probe.unlink()
    return path


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """The same for a directory to be created (with its parents) or filled: it, or its nearest existing
    ancestor, must be a directory we can write to."""
    path = Path(path)
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"{what} {path}: {existing} exists and is not a directory")
    check_output(existing / ".moefy-probe", what)
    return path


@contextlib.contextmanager
def writing(target: str | os.PathLike, what: str = "output") -> Iterator[None]:
    """Report an OSError of the block (a full disk ...) as an OutputError naming ``target``."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"cannot write {what} {target}: {e.strerror or e}") from None


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """A temporary path to write ``target``'s content to; renamed onto ``target`` when the block ends normally,
    removed otherwise."""
    target = check_output(target, what)
    remove_stale(target)
    tmp = temp_name(target)
    try:
        with writing(target, what):
            _create(tmp)
        yield tmp
        with writing(target, what):
            os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike, what: str) -> Iterator[Path]:
    """A temporary directory beside ``target`` to fill; its files are moved into ``target`` (created if needed)
    when the block ends normally, and it is removed otherwise."""
    target = check_output_dir(target, what)
    remove_stale(target)
    tmp = temp_name(target)
    try:
        with writing(target, what):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        with writing(target, what):
            yield tmp
        with writing(target, what):
            target.mkdir(exist_ok=True)
            for p in tmp.iterdir():
                os.replace(p, target / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(target: str | os.PathLike, text: str, what: str = "output") -> None:
    with atomic_path(target, what) as tmp, writing(target, what):
        tmp.write_text(text)


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived: unwinds like KeyboardInterrupt, so temporary outputs are removed on the way."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`Interrupted` in the main thread (a CLI catches it and
    exits with 128 + the signal's number, without a traceback); the previous handlers come back afterwards."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
