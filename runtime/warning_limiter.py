"""Warnings that may repeat thousands of times a second (bad frames of a broken file, a PLC's refused
writes and trigger edges) said as a few lines that still count every one of them."""

from __future__ import annotations

import logging
import threading
import time


class WarningLimiter:
    """Logs the first ``first`` warnings of each kind, then at most one per ``every_s`` seconds per
    kind; the next one said, and ``flush()`` at the end, say how many of that kind were held back. A
    file with thousands of bad frames, or a PLC writing a refused value in a loop, gives a few lines,
    not thousands, and each line stands for 1 + the number it names. Any thread may warn."""

    def __init__(self, log: logging.Logger, every_s: float = 5.0, first: int = 1):
        self.log, self.every_s, self.first = log, every_s, first
        self._lock = threading.Lock()
        self._said: dict = {}      # kind -> warnings said
        self._last: dict = {}      # kind -> when the last one was said (monotonic)
        self._held: dict = {}      # kind -> (count held back, the last one held: (message, args))

    def warn(self, kind: str, message: str, *args) -> None:
        now = time.monotonic()
        with self._lock:
            said, last = self._said.get(kind, 0), self._last.get(kind)
            if said >= self.first and last is not None and now - last < self.every_s:
                held, _ = self._held.get(kind, (0, None))
                self._held[kind] = (held + 1, (message, args))
                return
            held, _ = self._held.pop(kind, (0, None))
            self._said[kind], self._last[kind] = said + 1, now
        self.log.warning(_with_held(message, held), *args)

    def flush(self) -> None:
        """Say the last warning held back of each kind, with the count of the others (at a stop: the
        count of a flood that ended since its last line would be lost)."""
        with self._lock:
            held, self._held = self._held, {}
        for count, (message, args) in held.values():
            self.log.warning(_with_held(message, count - 1), *args)


def _with_held(message: str, held: int) -> str:
    return message + (f" (and {held} more like this since the last one said)" if held else "")
