"""Ctrl-C and SIGTERM for the batch commands (train, export, refit, bench): one way to stop, one way to say so.

Both unwind the work as a KeyboardInterrupt, so every ``finally`` on the way (a refit's staging folder,
an atomic write's temporary file, the data loader's workers) cleans up; SIGTERM's default action ended
the process without running any of them. The command then prints one line saying what was kept and
exits 128 + the signal's number (130, 143), as a shell reports a process the signal ended; click's own
handling said "Aborted!" and exited 1 for both (``stops_in_one_line``). A few renames that must all
happen or none (an export's set moved into place, a Triton version folder with its config) run under
``stops_deferred``: a stop that arrives meanwhile is raised once they are done.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator, Optional

SIGINT_EXIT = 128 + signal.SIGINT      # 130
SIGTERM_EXIT = 128 + signal.SIGTERM    # 143


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised where the main thread was, like Ctrl-C's KeyboardInterrupt."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside, SIGTERM raises Terminated in the main thread. Main thread only (elsewhere a no-op);
    the old handler comes back at the end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(_signum, _frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stopped_by(stopped: KeyboardInterrupt) -> str:
    """How a person would name what stopped the command."""
    return "SIGTERM" if isinstance(stopped, Terminated) else "Ctrl-C"


@contextlib.contextmanager
def stops_in_one_line(report: Callable[[str], Optional[str]]) -> Iterator[None]:
    """Run a command's work so that Ctrl-C or SIGTERM ends it with the one line ``report(by)`` returns
    (by: "Ctrl-C" or "SIGTERM"; None prints nothing, e.g. on a torchrun rank other than 0) on stderr
    and exit status 130 or 143."""
    import click
    try:
        with sigterm_interrupts():
            yield
    except KeyboardInterrupt as stopped:
        by = stopped_by(stopped)
        line = report(by)
        if line:
            click.echo(line, err=True)
        raise click.exceptions.Exit(SIGTERM_EXIT if by == "SIGTERM" else SIGINT_EXIT) from None


@contextlib.contextmanager
def stops_deferred() -> Iterator[None]:
    """Inside, Ctrl-C and SIGTERM wait: the block (a few renames that must all happen or none) runs to its
    end, then the stop is raised as it would have been at that point. Main thread only (elsewhere a no-op).
    Signals themselves are not blocked: Python runs its handlers in the main thread whichever thread the
    signal reached, so swapping the handlers is what holds them back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived = []
    previous = {number: signal.signal(number, lambda got, _frame: arrived.append(got))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(arrived):
            signal.raise_signal(number)    # now handled as outside: KeyboardInterrupt, Terminated, ...
