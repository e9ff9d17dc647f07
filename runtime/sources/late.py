"""A network camera that did not answer when the line started: opened again in the background.

``open_source`` raises ``SourceUnreachable`` (not a plain SourceError) for a network stream that does not
answer; the line (runtime/line/loop.py ``open_sources``) wraps such a camera in a LateSource instead of
refusing to start, and the camera shows as down until it answers. Once the line stops (its stop flag, or
``stop_reading``) the camera is not tried again: an open of a camera that does not answer lasts its whole
timeout, which the stop would wait for.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional, Tuple

from mrkd.runtime.sources import Frame, Source, SourceError, SourceStats
from mrkd.runtime.sources.open_turns import given_up_when

logger = logging.getLogger(__name__)


class LateSource(Source):
    """A network camera that did not answer when the line started (a camera still booting): opened
    again with backoff on its camera's reader thread until it answers, then read like any live source."""

    live = True
    paced = False

    def __init__(self, uri: str, opener: Callable[[], Source], first_error: str,
                 backoff: Tuple[float, float] = (0.5, 5.0), stop: Optional[threading.Event] = None):
        self._inner: Optional[Source] = None
        super().__init__(uri)
        self._own_stats.last_error = first_error
        self._reasons_said = {first_error}     # the line said the first (runtime/line/loop.py open_sources)
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
            wait = self._next_try - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, 0.25 if timeout is None else timeout))
                return None
            try:
                with given_up_when(self._stopped):      # the stop comes while it waits for its turn: not opened
                    inner = self._opener()
            except SourceError as exc:
                self._failed(str(exc))
                self._delay = min(self._delay * 2, self._backoff[1])
                self._next_try = time.monotonic() + self._delay
                return None
            with self._lock:
                self._inner = inner     # close() closes it, also when it answered only after the stop
                closed, stopped = self._closed, self._stopped()
            if closed:       # close() came while it opened: it is this reader's to close
                inner.close()
                return None
            if stopped:
                inner.stop_reading()
                return None
            inner.keep_camera_bits(self.keeps_camera_bits)
            logger.warning("%s: answered; reading it", self.uri)
        return self._inner.read(timeout)

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
            inner = self._inner
        if inner is not None:
            inner.stop_reading()

    @property
    def reader_threads(self) -> Tuple[threading.Thread, ...]:
        inner = self._inner
        return inner.reader_threads if inner is not None else ()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            inner = self._inner
        if inner is not None:
            inner.close()
        super().close()
