"""Threads a stop gave up waiting for while they may be inside native code, and the exit that survives them.

A daemon thread still inside a native call (OpenCV's FFmpeg open of a camera that never answers) when the
interpreter shuts down is ended as it comes back, by an unwinding that C++ frames do not allow: the
process aborts ("terminate called without an active exception", exit -6) after a clean stop, its status
lost. A stop that could not wait for such a thread names it here (``left_running``); the CLI's exit
(mrkd/cli.py ``main_one_line``) then waits a moment more and, if one is still alive, ends the process
with ``os._exit`` after flushing its output, with the status it was exiting with.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import List

EXIT_WAIT_S = 1.0        # what the exit still waits for a thread left running before it leaves without it

_left: List[threading.Thread] = []
_lock = threading.Lock()


def left_running(thread: threading.Thread) -> None:
    """``thread`` may still be inside a native call that Python's shutdown cannot survive."""
    with _lock:
        _left[:] = [t for t in _left if t.is_alive()] + [thread]


def still_running(wait_s: float = 0.0) -> List[threading.Thread]:
    """The threads left running that are still alive after waiting (together) up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    with _lock:
        threads = list(_left)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t for t in threads if t.is_alive()]


def exit_status(code: object) -> int:
    """The status ``sys.exit(code)`` ends the process with."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def leave_if_stuck(code: object, wait_s: float = EXIT_WAIT_S) -> None:
    """Before ``sys.exit(code)``: if a thread left running is still inside its native call, flush what
    was written and end the process now with the same status (the interpreter's shutdown would abort)."""
    stuck = still_running(wait_s)
    if not stuck:
        return
    if isinstance(code, str):
        print(code, file=sys.stderr)     # what sys.exit would have printed
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(exit_status(code))
