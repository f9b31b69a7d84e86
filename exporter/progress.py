"""Progress bars that suit where they go: redrawn in place on a terminal; on a pipe or a log file, whole ASCII lines
(no carriage returns), at most one every LOG_INTERVAL seconds besides the first and the last.

tqdm itself checks only whether it may draw; in a CI log its default redraws, ten a second, each with a ``\\r``,
make one unreadable line of many kilobytes per bar.
"""
from __future__ import annotations

import sys

LOG_INTERVAL = 30.0  # seconds between progress lines when stderr is not a terminal
_CURSOR_UP = "\x1b[A"  # what tqdm writes to draw a nested bar (position > 0) below its parent


class _Lines:
    """A file for tqdm that turns each in-place redraw into one line (and drops the blank ones that clear a bar, and
    the cursor moves of a bar nested in another)."""

    def __init__(self, file):
        self.file = file

    def write(self, s: str) -> None:
        s = s.replace("\r", "").replace(_CURSOR_UP, "").rstrip()
        if s:
            self.file.write(s + "\n")

    def flush(self) -> None:
        self.file.flush()


def _is_terminal(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def tqdm(iterable=None, *, file=None, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)`` on a terminal (``file``, default stderr); otherwise a plain tqdm writing
    whole lines at most every LOG_INTERVAL seconds."""
    file = sys.stderr if file is None else file
    if _is_terminal(file):
        from tqdm.auto import tqdm as live
        return live(iterable, file=file, **kwargs)
    from tqdm import tqdm as plain
    kwargs.update(mininterval=max(kwargs.get("mininterval", 0), LOG_INTERVAL), maxinterval=LOG_INTERVAL,
                  ascii=True, ncols=kwargs.get("ncols") or 100, dynamic_ncols=False)
    return plain(iterable, file=_Lines(file), **kwargs)
