"""Lines for the person at the terminal while tqdm progress bars may be on screen.

A bar is redrawn in place (a carriage return, no newline), so a warning printed while it is live
lands after the bar on the same line ("train grain:  40%|####  | 4/10 warning: ..."). ``say`` writes
through tqdm.write, which clears the live bars, prints the line and draws them again below it;
``warnings_above_bars`` sends Python warnings the same way. mrkd's command boundary
(mrkd.errors.error_boundary) installs it for every command, and the trainer's own reports use ``say``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Iterator


def speaks_for_all_ranks() -> bool:
    """Whether this process talks to the person at the terminal: under torchrun every rank runs the same
    command on the same files, so rank 0 speaks for them all (once, not once per rank)."""
    return os.environ.get("RANK", "0") == "0"


def warn_for_all_ranks(message: str, stacklevel: int = 1) -> None:
    """``warnings.warn(message)`` where this process speaks_for_all_ranks, nothing on torchrun's other ranks:
    for a warning about the data set or the run's settings, which every rank would say alike. ``stacklevel``
    as warnings.warn's, counted from the caller (1: the caller's line, as a warnings.warn there)."""
    if speaks_for_all_ranks():
        warnings.warn(message, stacklevel=stacklevel + 1)


def say(line: str) -> None:
    """``line`` on stderr, on a line of its own above any live progress bar."""
    tqdm = sys.modules.get("tqdm")          # no bar can be on screen before tqdm was imported
    if tqdm is None:
        print(line, file=sys.stderr, flush=True)
        return
    tqdm.tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


class _AboveBars:
    """A file for warnings' writer: each write becomes ``say``'s line."""

    def write(self, text: str) -> None:
        text = text[:-1] if text.endswith("\n") else text
        if text:
            say(text)

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def warnings_above_bars() -> Iterator[None]:
    """Inside, a warning meant for stderr is written by ``say``. The warning still goes through the
    writer that was in place, only with this file for stderr: a warnings.catch_warnings(record=True)
    (pytest.warns) records it as before; warnings meant for another file are left alone."""
    shown = warnings.showwarning
    above = _AboveBars()

    def show(message, category, filename, lineno, file=None, line=None):
        to_stderr = file is None or file is sys.stderr
        shown(message, category, filename, lineno, above if to_stderr else file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        if warnings.showwarning is show:
            warnings.showwarning = shown
