"""One thread that tells the outputs, in order, so whoever has news never waits for them.

The part runner (runtime/line/parts.py) tells the PLC servers of a trigger or a part at once and hands
the call for every other output to a ``Notifier``: those calls run one at a time on the notifier's own
thread, in the order they were handed over. So a PLC's trigger (answered on the Modbus or OPC UA
server's loop) and the runner's next part wait for no output's fsync (parts log, events log), snapshot
or evidence file, or peer; the logs' lines keep the order of events; and every output still sees one
hook at a time, as before.

A part waits in the queue with its images (the snapshot and evidence writers take them from it), so
the queue is bounded: after handing a part over (the PLC has had its verdict by then), the runner waits
for room (``wait_for_room``) while ``max_waiting`` calls wait, before it judges the next part. ``close`` (the stop)
lets the calls already handed over finish within a deadline; any it has to give up, and any handed
over after it, are counted (``given_up``) and logged, never silent. A call counts once, but a folded
report of refused triggers stands for many: those are counted by trigger too
(``given_up_refused_triggers``, from the call's ``refused_triggers``), so the outputs' refusals plus
the ones given up are every refused trigger.

Calls the runner does not wait for (a refused trigger, a camera's status, handed over from a PLC's
trigger or the runner's idle loop) must not grow the queue without limit behind a stalled output
either: while ``max_waiting`` calls wait, a call is folded into a waiting one that ``absorb``s it
(runtime/line/handover.py: a run of refused triggers becomes one counted report, a status the newest
one) instead of waiting on its own. The newest waiting calls are tried first, and a call is never
moved ahead of another whose order matters: only past calls that are ``orderless``, or when it is
itself (a status: running totals, the newest wins).

``DroppingWorker`` is the same thread for work an output may leave out rather than fall behind (the
evidence's OK samples, the video file's frames): past its bound an item is dropped, counted and warned about.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Deque, List, Optional

logger = logging.getLogger(__name__)
_outputs_logger = logging.getLogger("mrkd.runtime.outputs")     # where the outputs' own warnings go (delivery.py)


class Notifier:
    """Runs the calls handed to ``put`` one at a time, in order, on one thread of its own (started at
    the first call)."""

    def __init__(self, name: str = "outputs", max_waiting: int = 64):
        self.name = name
        self.max_waiting = max_waiting
        self.given_up = 0                    # calls
        self.given_up_refused_triggers = 0   # the refused triggers those calls stood for (handover.py)
        self._calls: Deque[Callable[[], object]] = deque()
        self._cond = threading.Condition()
        self._running: Optional[Callable[[], object]] = None    # taken off the queue, not yet returned
        self._closed = False
        self._holding_back = True      # wait_for_room waits; off from the stop on (release_room)
        self._thread: Optional[threading.Thread] = None

    def put(self, call: Callable[[], object]) -> None:
        """Hand ``call`` over; returns at once (never waits for room: see ``wait_for_room``). Past
        ``max_waiting`` waiting calls it is folded into one that absorbs it, where one does (above)."""
        with self._cond:
            if self._closed:
                self._give_up([call])
                logger.warning("%s: a call handed over after the stop was not made (%d given up%s)", self.name,
                               self.given_up, self._refused_given_up())
                return
            if len(self._calls) >= self.max_waiting and self._folded(call):
                return
            self._calls.append(call)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _folded(self, call: Callable[[], object]) -> bool:
        """(``_cond`` held: a waiting call is not running.) Whether a waiting call absorbed ``call``."""
        moves_freely = getattr(call, "orderless", False)
        for waiting in reversed(self._calls):
            absorb = getattr(waiting, "absorb", None)
            if absorb is not None and absorb(call):
                return True
            if not (moves_freely or getattr(waiting, "orderless", False)):
                return False        # folding further back would move ``call`` ahead of this one
        return False

    @property
    def waiting(self) -> int:
        """Calls handed over and not yet taken (the one running not among them)."""
        with self._cond:
            return len(self._calls)

    @property
    def closed(self) -> bool:
        """The stop has closed it: the outputs' on_stop may be running, so no more calls to them."""
        return self._closed

    def wait_for_room(self, timeout: Optional[float] = None) -> bool:
        """Wait while ``max_waiting`` calls wait (the outputs are that far behind), until ``release_room``
        (at most ``timeout`` seconds: a caller that must notice its own stop waits in slices); whether
        there is room now."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._calls) < self.max_waiting or not self._holding_back
                                       or self._closed, timeout)

    def release_room(self) -> None:
        """Hold back no one from now on: the stop reports the parts left (bounded by the trigger queue)
        and must reach ``close`` and its deadline, not wait for room behind a stalled output."""
        with self._cond:
            self._holding_back = False
            self._cond.notify_all()

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until every call handed over has returned (at most ``timeout`` seconds); whether it has."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._calls and self._running is None, timeout)

    def close(self, deadline_s: float) -> int:
        """Let the calls handed over finish (at most ``deadline_s`` seconds), then take no more; returns
        how many were given up (still waiting at the deadline)."""
        finished = self.wait_idle(deadline_s)
        with self._cond:
            self._closed = True
            # The call still running (stalled) is given up too: its caller skips the outputs it has not
            # reached yet once it sees ``closed``.
            stalled = self._running
            left = list(self._calls) + ([stalled] if stalled is not None else [])
            self._calls.clear()
            self._give_up(left)
            refused = self._refused_given_up()
            self._cond.notify_all()
        if not finished:
            logger.warning("%s: the outputs were still busy %g s after the stop (a stalled disk or peer?): "
                           "%d call(s) for them given up%s%s", self.name, deadline_s, len(left),
                           " (one of them stalled in an output)" if stalled is not None else "", refused)
        return len(left)

    def _give_up(self, calls: List[Callable[[], object]]) -> None:
        """(``_cond`` held.) Count ``calls`` as given up, and the refused triggers they stand for."""
        self.given_up += len(calls)
        self.given_up_refused_triggers += sum(getattr(call, "refused_triggers", 0) for call in calls)

    def _refused_given_up(self) -> str:
        """(``_cond`` held.) The log's words for the refused triggers given up so far, if any."""
        count = self.given_up_refused_triggers
        return f"; their reports of {count} refused trigger(s) given up in all" if count else ""

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._calls or self._closed)
                if not self._calls:
                    return
                call = self._calls.popleft()
                self._running = call
                self._cond.notify_all()        # room for wait_for_room
            try:
                call()
            except Exception:                  # call_each already logs an output's failure; this is a bug
                logger.exception("%s: a call failed", self.name)
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()


class DroppingWorker:
    """A Notifier for work an output may leave out when it falls behind (the evidence's OK samples, the
    video's frames): ``offer`` hands a call over unless ``max_waiting`` calls wait already; then the item is
    dropped, counted (``dropped``, which the output's health shows) and warned about, at most once every
    ``warn_every_s``. The calls run in order on one thread. ``close`` (the stop) lets the queued calls finish
    within a deadline and counts the ones it gives up as dropped too."""

    def __init__(self, name: str, max_waiting: int, falling_behind: str, warn_every_s: float = 30.0):
        """``falling_behind``: the warning's words, naming the output, its target and what is left out."""
        self.notifier = Notifier(name, max_waiting=max_waiting)
        self.falling_behind = falling_behind
        self.warn_every_s = warn_every_s
        self._dropped = 0
        self._lock = threading.Lock()       # the loop's offer and a scrape's health; no file work under it
        self._last_warning = float("-inf")

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._dropped

    @property
    def closed(self) -> bool:
        return self.notifier.closed

    def offer(self, call: Callable[[], object]) -> bool:
        """Hand ``call`` over (returns at once); False when it was dropped instead (counted, warned)."""
        if self.notifier.waiting < self.notifier.max_waiting:
            self.notifier.put(call)
            return True
        with self._lock:
            self._dropped += 1
            dropped = self._dropped
            now = time.monotonic()
            warn = now - self._last_warning >= self.warn_every_s
            if warn:
                self._last_warning = now
        if warn:
            _outputs_logger.warning("%s (%d dropped so far)", self.falling_behind, dropped)
        return False

    def close(self, deadline_s: float) -> int:
        """The calls still queued get ``deadline_s`` to run; returns how many were given up (dropped)."""
        given_up = self.notifier.close(deadline_s)
        with self._lock:
            self._dropped += given_up
        return given_up
