"""A network camera that did not answer when the line started: opened again in the background.

``open_source`` raises ``SourceUnreachable`` (not a plain SourceError) for a network stream that does not
answer; the line (runtime/line/loop.py ``open_sources``) wraps such a camera in a LateSource instead of
refusing to start, and the camera shows as down until it answers.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Tuple

from mrkd.runtime.sources import Frame, Source, SourceError, SourceStats

logger = logging.getLogger(__name__)


class LateSource(Source):
    """A network camera that did not answer when the line started (a camera still booting): opened
    again with backoff on its camera's reader thread until it answers, then read like any live source."""

    live = True
    paced = False

    def __init__(self, uri: str, opener: Callable[[], Source], first_error: str,
                 backoff: Tuple[float, float] = (0.5, 5.0)):
        self._inner: Optional[Source] = None
        super().__init__(uri)
        self._own_stats.last_error = first_error
        self._opener, self._backoff, self._delay = opener, backoff, backoff[0]
        self._next_try = time.monotonic() + self._delay

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

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]:
        if self._closed:
            return None
        if self._inner is None:
            wait = self._next_try - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, 0.25 if timeout is None else timeout))
                return None
            try:
                self._inner = self._opener()
                self._inner.keep_camera_bits(self.keeps_camera_bits)
                logger.warning("%s: answered; reading it", self.uri)
            except SourceError as exc:
                self._own_stats.last_error = str(exc)
                self._delay = min(self._delay * 2, self._backoff[1])
                self._next_try = time.monotonic() + self._delay
                return None
        return self._inner.read(timeout)

    @property
    def ended(self) -> bool:
        return self._closed or (self._inner is not None and self._inner.ended)

    def close(self) -> None:
        self._closed = True
        if self._inner is not None:
            self._inner.close()
