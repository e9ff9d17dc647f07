"""``Delivery``: one output's sent/failed counts, state and last error, and its warnings.

Every output that delivers something (events log, snapshots, webhook, MQTT, ...) keeps one; its
``health()`` is what the summary, ``/metrics``, ``/healthz`` and the page show. The first failure
after a success is warned about at once, naming the output and its target, unless a warning was
given in the last ``warn_every_s``; while it keeps failing, one warning every ``warn_every_s`` says
how many more failed; the first success after failures that were warned about says it delivers
again. An output that fails and delivers by turns (OK samples that cannot be written beside alarm
evidence that can, a web hook answering every other POST) is so said at most twice a period, its
failures folded into the next warning's count, or said by the first success after the period. So a line never fails silently and never floods its log.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from typing import Optional

from mrkd.runtime.outputs.base import OutputHealth

logger = logging.getLogger("mrkd.runtime.outputs")

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)   # a write that may succeed later: counted, the line goes on


class Delivery:
    def __init__(self, name: str, target: str, warn_every_s: float = 30.0, state: str = "ready"):
        self.name, self.target, self.warn_every_s = name, target, warn_every_s
        self.sent = self.failed = 0
        self.state, self.ok, self.detail = state, True, ""
        self._lock = threading.Lock()
        self._failing_since_warning = 0       # failures no warning has named yet
        self._last_warning = float("-inf")
        self._announced = False               # the failing state now was warned about (its end is said too)

    def delivered(self, count: int = 1, recover: bool = True) -> None:
        """``count`` items delivered; ``recover=False``: counted, but a failing state set by the output
        (e.g. over a disk budget) stays."""
        folded = 0
        with self._lock:
            self.sent += count
            recovered = recover and not self.ok and self._announced
            now = time.monotonic()
            if recover and self._failing_since_warning and now - self._last_warning >= self.warn_every_s:
                # failures folded into a period after which none came: said now, else the log's last word
                # may be "delivering again" while items were lost, and only the summary would count them
                folded, self._failing_since_warning, self._last_warning = self._failing_since_warning, 0, now
            if recover:
                self.ok, self.state = True, "delivering"
                self._announced = False
        if folded:
            logger.warning("output %s (%s): %d more failed since the last warning (%s); %d failed so far; "
                           "delivering again", self.name, self.target, folded, self.detail, self.failed)
        elif recovered:
            logger.warning("output %s (%s): delivering again", self.name, self.target)

    def not_delivered_after_all(self, count: int, detail: str) -> None:
        """``count`` items counted delivered turned out lost (a video file not finalized): failed instead."""
        with self._lock:
            self.sent -= count
        self.failed_one(detail, count)

    def failed_one(self, detail: str, count: int = 1, state: str = "failing") -> None:
        """``count`` items could not be delivered; ``detail`` names why (never a credential)."""
        with self._lock:
            self.failed += count
            if not self.set_failing(detail, state, locked=True):
                self._failing_since_warning += count

    def set_failing(self, detail: str, state: str = "failing", locked: bool = False) -> bool:
        """Not delivering (nothing lost yet, e.g. a broker unreachable with messages still queued).
        True when this was warned about now (else it is folded into the next warning)."""
        if not locked:
            with self._lock:
                return self.set_failing(detail, state, locked=True)
        self.ok, self.state, self.detail = False, state, detail
        now = time.monotonic()
        if now - self._last_warning < self.warn_every_s:
            return False
        self._last_warning, self._announced = now, True
        lost = self._failing_since_warning
        self._failing_since_warning = 0
        more = f" ({lost} more failed since the last warning)" if lost else ""
        logger.warning("output %s (%s): %s: %s%s; %d failed so far", self.name, self.target, state, detail,
                       more, self.failed)
        return True

    def set_ok(self, state: str) -> None:
        with self._lock:
            recovered = not self.ok and self._announced
            self.ok, self.state, self._announced = True, state, False
        if recovered:
            logger.warning("output %s (%s): %s again", self.name, self.target, state)

    def health(self, dropped: int = 0, state: Optional[str] = None) -> OutputHealth:
        with self._lock:
            return OutputHealth(name=self.name, ok=self.ok, state=state or self.state, sent=self.sent,
                                failed=self.failed, detail=self.detail, dropped=dropped, target=self.target)
