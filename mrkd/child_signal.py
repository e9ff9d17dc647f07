"""SIGCHLD's handler kept as it was across a block of work.

A torch DataLoader with worker processes installs torch's Python SIGCHLD handler for the rest of the
process; with OpenVINO loaded later in that process, the next child to exit crashed the interpreter
(SIGSEGV, seen in the test suite). Training, evaluation and every test put the previous handler back.
No torch here: the tests' fixture uses it too.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def sigchld_kept() -> Iterator[None]:
    """Put SIGCHLD's handler back as it was once the block ends (only the main thread can set one).
    Worker failures are still detected without torch's handler: the loader polls its workers."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGCHLD) if main else None
    try:
        yield
    finally:
        if main and before is not None and signal.getsignal(signal.SIGCHLD) is not before:
            signal.signal(signal.SIGCHLD, before)
