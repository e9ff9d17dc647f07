"""Network streams are opened one at a time, and the wait for a turn happens here, where a stop reaches it.

OpenCV's FFmpeg backend holds one process-wide lock for the whole of an open, so the opens of cameras
that do not answer run one after another, each for its whole timeout, inside native code where no stop
reaches them: three dead cameras' readers, asked to stop together, still opened their cameras one after
another for 15 s. The turn is now taken in Python first, and an open still waiting for it is given up once
its camera stops (``given_up_when``, set by whoever reads the camera on that thread): a stop waits for at
most the one open in flight, its timeout.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Optional, TypeVar

Opened = TypeVar("Opened")

POLL_S = 0.05        # how often a wait for the turn looks at its camera's stop

_turn = threading.Lock()
_given_up = threading.local()


@contextlib.contextmanager
def given_up_when(stopped: Optional[Callable[[], bool]]) -> Iterator[None]:
    """Inside, an open on this thread still waiting for its turn is given up (``in_turn`` returns None)
    once ``stopped()`` is true (None: it waits)."""
    previous = getattr(_given_up, "stopped", None)
    _given_up.stopped = stopped
    try:
        yield
    finally:
        _given_up.stopped = previous


def given_up() -> bool:
    """Whether this thread's camera stopped (``given_up_when``): work before the turn (reachable.py's
    connect) ends at the same stop."""
    stopped = getattr(_given_up, "stopped", None)
    return stopped is not None and stopped()


def in_turn(open_stream: Callable[[], Opened]) -> Optional[Opened]:
    """``open_stream()`` once no other network open is running; None, without opening, if this thread's
    camera stopped first (``given_up_when``)."""
    stopped = getattr(_given_up, "stopped", None)
    while not _turn.acquire(timeout=POLL_S):
        if stopped is not None and stopped():
            return None
    try:
        if stopped is not None and stopped():
            return None
        return open_stream()
    finally:
        _turn.release()
