"""The wall clock of an edge device jumps: one without a real-time clock (a Jetson) boots at 1970 or at its
last shutdown and NTP steps it forward by hours or years mid-run; a technician sets it back an hour. What
counts time on the line uses the monotonic clock, which never jumps (cooldowns, timeouts, latencies,
health ages); what mrkd writes (event ids and times, the parts log's times, MQTT's and the page's stamps)
is the wall clock, and cannot be right across a step: events written after a step back carry earlier
times, and ids that sort before, those written before it.

So a step is said, once, in one line (``ClockWatch.check``, called by the free run's loop every round and
by the part runner every part): how far and which way, from when to when, and what it means. A clock that
says the time is before mrkd was installed is said at the start (``warn_if_before_install``): the
certificates of the PLC's secure channels are then "not yet valid", every event is dated 1970.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from typing import Callable, Optional

logger = logging.getLogger(__name__)

STEP_S = 2.0      # a change of the wall clock against the monotonic one past this is a step (NTP slews less)
# ... plus what slewing may add between two checks: Linux slews the clock by at most 500 ppm, so a line that
# checks once a part and stood idle over a weekend may see up to 108 s of it
MAX_SLEW = 500e-6


def _steady() -> float:
    """The clock the wall clock is compared with: Linux's CLOCK_BOOTTIME, monotonic and counting a suspend
    (CLOCK_MONOTONIC stops in one, so a resume would read as a step forward); elsewhere time.monotonic."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


def utc_text(wall: float) -> str:
    """``wall`` (seconds since 1970) as UTC ISO 8601 to the second; the number itself when out of range."""
    try:
        return dt.datetime.fromtimestamp(wall, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{wall:.0f} s since 1970"


def how_long(seconds: float) -> str:
    """A step's size in words: its seconds, and from half an hour on in hours, days or years too."""
    seconds = abs(seconds)
    for size, name in ((365.25 * 86400, "years"), (86400, "days"), (3600, "hours")):
        if seconds >= size / 2:
            return f"{seconds:.0f} s ({seconds / size:.1f} {name})"
    return f"{seconds:.0f} s"


class ClockWatch:
    """Notices steps of the wall clock against the monotonic clock and says each once (``warn``). The
    difference of the two is followed from check to check, so NTP's slow slewing never adds up to a step."""

    def __init__(self, warn: Optional[Callable[[str], None]] = None, step_s: float = STEP_S):
        self._warn = warn or logger.warning
        self.step_s = step_s
        self._lock = threading.Lock()
        self._last: Optional[tuple] = None       # (wall, monotonic) of the last check
        self.steps = 0

    def check(self, wall: Optional[float] = None, mono: Optional[float] = None) -> float:
        """Compare the clocks now (or at the given readings, taken together: ``mono`` of ``_steady``); the
        step in seconds since the last check (0.0: none), said when it is one."""
        wall = time.time() if wall is None else wall
        mono = _steady() if mono is None else mono
        with self._lock:
            last, self._last = self._last, (wall, mono)
            if last is None:
                return 0.0
            step = (wall - last[0]) - (mono - last[1])
            if abs(step) < self.step_s + MAX_SLEW * abs(mono - last[1]):
                return 0.0
            self.steps += 1
        before = last[0] + (mono - last[1])        # what the clock would say now without the step
        if step < 0:
            self._warn(f"the wall clock went back {how_long(step)}, from {utc_text(before)} to {utc_text(wall)}: "
                       f"events and parts written from now on carry earlier times than those before them, and "
                       f"their ids sort before theirs; cooldowns, timeouts and latencies are not affected")
        else:
            self._warn(f"the wall clock jumped forward {how_long(step)}, from {utc_text(before)} to "
                       f"{utc_text(wall)} (NTP setting a clock that was wrong?): events and parts written before "
                       f"it carry times that far behind; cooldowns, timeouts and latencies are not affected")
        return step


def installed_at() -> Optional[float]:
    """When this mrkd was installed (its package's modification time), None when it cannot be read."""
    try:
        return os.path.getmtime(os.path.dirname(os.path.abspath(__file__)))
    except OSError:
        return None


def warn_if_before_install(now: Optional[float] = None, installed: Optional[float] = None) -> bool:
    """Say once when the wall clock is before mrkd was installed: surely wrong (a device without a
    real-time clock, NTP not synchronised yet). True when said."""
    now = time.time() if now is None else now
    installed = installed_at() if installed is None else installed
    if installed is None or now >= installed - 86400:     # a day's leeway: time zones, a copied install
        return False
    logger.warning("the wall clock says %s, before this mrkd was installed (%s): it is wrong (no real-time clock, "
                   "NTP not synchronised yet?); events are stamped with it, and the certificates of secure PLC "
                   "connections are not yet valid by it, until it is set", utc_text(now), utc_text(installed))
    return True
