"""A network camera that did not answer when the line started: opened again in the background.

``open_source`` raises ``SourceUnreachable`` (not a plain SourceError) for a network stream that does not
answer; the line (runtime/line/loop.py ``open_sources``) wraps such a camera in a LateSource instead of
refusing to start, and the camera shows as down until it answers. Once the line stops (its stop flag, or
``stop_reading``) the camera is not tried again: an open of a camera that does not answer lasts its whole
timeout, which the stop would wait for.

A free run tries its network cameras' first opens together, each on a thread of its own (``OpenInFlight``);
a camera whose first open has not ended within the start-up grace starts as a LateSource that takes that
open over, so the line judges the cameras that answered meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional, Tuple

from mrkd.runtime.sources import Frame, Source, SourceError, SourceStats
from mrkd.runtime.sources.open_turns import given_up_when

logger = logging.getLogger(__name__)


class OpenInFlight:
    """One camera's open on a thread of its own, given up (open_turns.given_up_when) once ``line_stopped()``
    or ``give_up()``; its source goes to whoever ``take``s it, or is closed if it is ``abandon``ed."""

    def __init__(self, name: str, opener: Callable[[], Source], line_stopped: Callable[[], bool]):
        self._opener, self._line_stopped = opener, line_stopped
        self._given_up = threading.Event()
        self._lock = threading.Lock()
        self._source: Optional[Source] = None
        self._abandoned = False
        self.error: Optional[BaseException] = None     # why the open failed, once done
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._open, name=f"open:{name}", daemon=True)
        self.thread.start()

    def _stopped(self) -> bool:
        return self._given_up.is_set() or self._line_stopped()

    def _open(self) -> None:
        source, error = None, None
        try:
            with given_up_when(self._stopped):
                source = self._opener()
        except BaseException as exc:     # handed to whoever takes the result (a bug there too)
            error = exc
        with self._lock:
            self._source, self.error = source, error
            abandoned = self._abandoned
            self.done.set()
        if abandoned and source is not None:     # nobody takes it any more
            source.close()

    def give_up(self) -> None:
        """A wait for the connect or the turn ends at once; an open inside OpenCV runs out its timeout."""
        self._given_up.set()

    def take(self) -> Optional[Source]:
        """Once done: the opened source (None once abandoned); raises the open's error."""
        with self._lock:
            source, self._source = self._source, None
        if self.error is not None:
            raise self.error
        return source

    def abandon(self) -> None:
        """Nobody takes the source: given up, and closed now or as soon as its open ends."""
        self.give_up()
        with self._lock:
            self._abandoned = True
            source, self._source = self._source, None
        if source is not None:
            source.close()


class LateSource(Source):
    """A network camera that did not answer when the line started (a camera still booting): opened
    again with backoff on its camera's reader thread until it answers, then read like any live source."""

    live = True
    paced = False

    def __init__(self, uri: str, opener: Callable[[], Source], first_error: str,
                 backoff: Tuple[float, float] = (0.5, 5.0), stop: Optional[threading.Event] = None,
                 in_flight: Optional[OpenInFlight] = None):
        self._inner: Optional[Source] = None
        self._in_flight = in_flight      # the first open, still running: its result is this camera's first try
        super().__init__(uri)
        self._own_stats.last_error = first_error
        self._reasons_said = {first_error}     # the line said the first (runtime/line/loop.py open_sources)
        # an open still in flight at the start is no failure (said as info there): its answer is not a warning
        # either, unless a failure was said meanwhile
        self._quiet_first = in_flight is not None
        self._opener, self._backoff, self._delay = opener, backoff, backoff[0]
        self._next_try = time.monotonic() + self._delay
        # the line's stop: once set, the camera is not opened again (an open of a camera that does not
        # answer takes its whole timeout, and the stop would wait for it)
        self._line_stop = stop
        self._stopping = False
        self._lock = threading.Lock()     # an open that ends after the stop hands its camera to the stop

    @property
    def stats(self) -> SourceStats:
        return self._inner.stats if self._inner is not None else self._own_stats

    @stats.setter
    def stats(self, value: SourceStats) -> None:   # Source.__init__ assigns one
        self._own_stats = value

    def keep_camera_bits(self, keep: bool) -> None:
        super().keep_camera_bits(keep)
        if self._inner is not None:
            self._inner.keep_camera_bits(keep)

    def _stopped(self) -> bool:
        return self._closed or self._stopping or (self._line_stop is not None and self._line_stop.is_set())

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]:
        if self._stopped():
            return None
        if self._inner is None:
            inner = self._open_in_flight(timeout) if self._in_flight is not None else self._open_when_due(timeout)
            if inner is None or not self._adopt(inner):
                return None
        return self._inner.read(timeout)

    def _open_in_flight(self, timeout: Optional[float]) -> Optional[Source]:
        """The first open's source once it ended (None meanwhile, or when it failed: tried again later)."""
        attempt = self._in_flight
        if not attempt.done.wait(0.25 if timeout is None else min(timeout, 0.25)):
            return None
        self._in_flight = None
        try:
            return attempt.take()
        except SourceError as exc:
            self._retry_later(str(exc))
            return None

    def _open_when_due(self, timeout: Optional[float]) -> Optional[Source]:
        wait = self._next_try - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, 0.25 if timeout is None else timeout))
            return None
        try:
            with given_up_when(self._stopped):      # the stop comes while it waits for its turn: not opened
                return self._opener()
        except SourceError as exc:
            self._retry_later(str(exc))
            return None

    def _retry_later(self, reason: str) -> None:
        self._failed(reason)
        self._delay = min(self._delay * 2, self._backoff[1])
        self._next_try = time.monotonic() + self._delay

    def _adopt(self, inner: Source) -> bool:
        """Read ``inner`` from now on; False where the stop or close came while it opened."""
        with self._lock:
            self._inner = inner     # close() closes it, also when it answered only after the stop
            closed, stopped = self._closed, self._stopped()
        if closed:       # close() came while it opened: it is this reader's to close
            inner.close()
            return False
        if stopped:
            inner.stop_reading()
            return False
        inner.keep_camera_bits(self.keeps_camera_bits)
        only_slow = self._quiet_first and len(self._reasons_said) == 1
        logger.log(logging.INFO if only_slow else logging.WARNING, "%s: answered; reading it", self.uri)
        return True

    def _failed(self, reason: str) -> None:
        """Note why an open failed; a new reason is said once (not one an open given up for a stop gives)."""
        self._own_stats.last_error = reason
        if reason not in self._reasons_said and not self._stopped():
            self._reasons_said.add(reason)
            logger.warning("%s; trying again in the background", reason)

    @property
    def ended(self) -> bool:
        return self._stopped() or (self._inner is not None and self._inner.ended)

    def stop_reading(self) -> None:
        with self._lock:
            self._stopping = True
            inner, attempt = self._inner, self._in_flight
        if attempt is not None:
            attempt.give_up()
        if inner is not None:
            inner.stop_reading()

    @property
    def reader_threads(self) -> Tuple[threading.Thread, ...]:
        """What a stop waits for: the inner source's readers, or the first open still in flight."""
        inner, attempt = self._inner, self._in_flight
        if inner is not None:
            return inner.reader_threads
        return (attempt.thread,) if attempt is not None else ()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            inner, attempt = self._inner, self._in_flight
        if attempt is not None:      # its source, if it still opens one, is closed (the reader takes none now)
            attempt.abandon()
        if inner is not None:
            inner.close()
        super().close()
