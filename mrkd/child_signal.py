"""SIGCHLD's handler kept as it was across a block of work.

A torch DataLoader with worker processes installs torch's Python SIGCHLD handler for the rest of the
process; with OpenVINO loaded in that process, the next child to exit crashed the interpreter
(SIGSEGV, seen in the test suite). Training, evaluation and every test put the previous handler back;
inside the block torch is told its handler is already set, so it never installs it (a full suite run
crashed once in a training test with workers, inside that window). No torch import here: the tests'
fixture uses it too, so torch's flag is set only when torch's loader is already loaded.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator


@contextlib.contextmanager
def sigchld_kept() -> Iterator[None]:
    """Put SIGCHLD's handler back as it was once the block ends (only the main thread can set one).
    Worker failures are still detected without torch's handler: the loader polls its workers."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGCHLD) if main else None
    torch_signals = sys.modules.get("torch.utils.data._utils.signal_handling") if main else None
    flag_before = getattr(torch_signals, "_SIGCHLD_handler_set", None)
    if flag_before is False:
        torch_signals._SIGCHLD_handler_set = True      # its loaders then leave SIGCHLD alone
    try:
        yield
    finally:
        if flag_before is False:
            torch_signals._SIGCHLD_handler_set = False
        if main and before is not None and signal.getsignal(signal.SIGCHLD) is not before:
            signal.signal(signal.SIGCHLD, before)
