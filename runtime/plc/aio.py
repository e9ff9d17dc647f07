"""The one way a PLC adapter runs its asyncio server (pymodbus, asyncua) beside the line's threads."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Callable, Optional

# A thread waiting for the interpreter lock asks the holder to drop it only after the switch interval
# (CPython's default 5 ms). The line's part runner thread runs Python between inference calls, so a
# PLC request arriving then waited up to 5 ms (more under load) before the server thread could answer:
# that was the Modbus handshake's p99. 0.5 ms bounds the hand-off; CPU-bound threads pay a little more
# switching. Lowered only (never raised) when a PLC server starts.
SWITCH_INTERVAL_S = 0.0005


class AsyncioServerThread:
    """An asyncio event loop on a daemon thread of its own. The subclass's ``_listen()`` coroutine runs
    first (it binds the port); its exception, if any, is what ``_start_loop`` returns, and then the loop
    serves until ``loop.stop()``."""

    _loop: Optional[asyncio.AbstractEventLoop] = None
    _thread: Optional[threading.Thread] = None
    _error: Optional[BaseException] = None
    _closed = False

    # At the end of a run the parts the line had accepted are judged and presented (PartRunner.stop
    # drains them first); a client whose trigger or job made one is owed its result. So the server
    # stays up until the subclass says nothing is owed, at most RESULTS_LINGER_S.
    RESULTS_LINGER_S = 3.0
    stop_waits_for_peer = True           # the linger runs beside the other outputs' stops

    def _linger(self, owed: Callable[[], bool]) -> bool:
        """Wait while ``owed()`` (and the server is open), at most RESULTS_LINGER_S; whether something
        is still owed then."""
        deadline = time.monotonic() + self.RESULTS_LINGER_S
        while not self._closed and owed() and time.monotonic() < deadline:
            time.sleep(0.01)
        return owed()

    async def _listen(self) -> None:
        raise NotImplementedError

    def _start_loop(self, name: str, wait_s: float) -> Optional[BaseException]:
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), name=name, daemon=True)
        self._thread.start()
        started.wait(wait_s)
        return self._error

    def _serve(self, started: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._listen())
        except BaseException as exc:   # reported by _start_loop's caller
            self._error = exc
            started.set()
            loop.close()
            return
        started.set()
        try:
            loop.run_forever()
        finally:
            _cancel_remaining(loop)
            loop.close()


def _cancel_remaining(loop: asyncio.AbstractEventLoop, wait_s: float = 5.0) -> None:
    """Cancel the tasks the server left on its stopped loop and let them unwind, as asyncio.run does: a
    session whose client vanished (its timeout loop, its subscription loop) was otherwise destroyed
    pending, and asyncio said so at exit as two ERRORs with the coroutines' source lines. In rounds,
    within ``wait_s`` in all: a task may start another while it unwinds (a publish racing the stop),
    which a single pass over the tasks of the moment left pending."""
    deadline = time.monotonic() + wait_s
    while True:
        tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
        left = deadline - time.monotonic()
        if not tasks or left <= 0:
            return
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.wait(tasks, timeout=left))
