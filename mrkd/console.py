"""Lines for the person at the terminal while tqdm progress bars may be on screen.

A bar is redrawn in place (a carriage return, no newline), so a warning printed while it is live
lands after the bar on the same line ("train grain:  40%|####  | 4/10 warning: ..."). ``say`` writes
through tqdm.write, which clears the live bars, prints the line and draws them again below it;
``warnings_above_bars`` sends Python warnings the same way. mrkd's command boundary
(mrkd.errors.error_boundary) installs it for every command, and the trainer's own reports use ``say``.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Iterator


def say(line: str) -> None:
    """``line`` on stderr, on a line of its own above any live progress bar."""
    tqdm = sys.modules.get("tqdm")          # no bar can be on screen before tqdm was imported
    if tqdm is None:
        print(line, file=sys.stderr, flush=True)
        return
    tqdm.tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


@contextlib.contextmanager
def warnings_above_bars() -> Iterator[None]:
    """Inside, a warning meant for stderr is written by ``say`` (its text as warnings.formatwarning
    makes it, whatever that is then); warnings written to another file, and those recorded by
    warnings.catch_warnings(record=True), are left as they were."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if file is not None and file is not sys.stderr:
            shown(message, category, filename, lineno, file, line)
            return
        text = warnings.formatwarning(message, category, filename, lineno, line)
        say(text[:-1] if text.endswith("\n") else text)

    warnings.showwarning = show
    try:
        yield
    finally:
        if warnings.showwarning is show:
            warnings.showwarning = shown
