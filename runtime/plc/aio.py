"""The one way a PLC adapter runs its asyncio server (pymodbus, asyncua) beside the line's threads."""

from __future__ import annotations

import asyncio
import threading
from typing import Optional


class AsyncioServerThread:
    """An asyncio event loop on a daemon thread of its own. The subclass's ``_listen()`` coroutine runs
    first (it binds the port); its exception, if any, is what ``_start_loop`` returns, and then the loop
    serves until ``loop.stop()``."""

    _loop: Optional[asyncio.AbstractEventLoop] = None
    _thread: Optional[threading.Thread] = None
    _error: Optional[BaseException] = None

    async def _listen(self) -> None:
        raise NotImplementedError

    def _start_loop(self, name: str, wait_s: float) -> Optional[BaseException]:
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
            loop.close()
