"""The frame loop: source -> detector -> alarm policy -> event sinks (+ annotated outputs).

``run_stream`` is the library function behind ``mrkd run``; it returns a summary dict. It stops at
the end of the source, after ``max_frames``, or when ``stop`` is set (the CLI's SIGINT/SIGTERM
handler sets it): the frames in hand are finished, every event is written and the webhook queue is
flushed within a deadline.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Callable, List, Optional, Sequence

from mrkd.runtime.alarms import AlarmPolicy
from mrkd.runtime.detector import STAGES, Detector
from mrkd.runtime.events import EventSinks
from mrkd.runtime.sources import Source
from mrkd.runtime.stats import RunStats
from mrkd.runtime.video_output import annotate

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event, signals=(signal.SIGINT, signal.SIGTERM)):
    """While inside, SIGINT/SIGTERM set ``stop`` instead of killing the process (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def handler(signum, _frame):
        logger.warning("%s: finishing the current frame, writing events, then stopping",
                       signal.Signals(signum).name)
        stop.set()

    for sig in signals:
        signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _read_batch(source: Source, size: int, stop: threading.Event, limit: Optional[int]) -> List:
    frames = []
    while len(frames) < size and not stop.is_set() and not source.ended:
        if limit is not None and len(frames) >= limit:
            break
        # A short timeout keeps a stalled live source from hiding a stop request.
        frame = source.read(timeout=0.25)
        if frame is not None:
            frames.append(frame)
        elif frames:
            break    # do not hold frames back waiting to fill a batch
    return frames


def run_stream(detector: Detector, source: Source, alarm_policy: AlarmPolicy, sinks: Optional[EventSinks] = None,
               outputs: Sequence = (), max_frames: Optional[int] = None, status_every: float = 0.0,
               batch: int = 1, stop: Optional[threading.Event] = None,
               status: Callable[[str], None] = print, webhook_deadline_s: float = 5.0) -> dict:
    """Score every frame of ``source``, raise alarms, write events; returns the run summary.

    outputs: frame sinks (VideoFileSink, WindowSink) receiving annotated frames. status_every:
    seconds between status lines passed to ``status`` (0 = none). batch: frames per detector call.
    """
    stop = stop or threading.Event()
    sinks = sinks or EventSinks()
    stats = RunStats(STAGES)
    last_status = time.monotonic()
    try:
        while not stop.is_set() and not source.ended:
            remaining = None if max_frames is None else max_frames - stats.frames
            if remaining is not None and remaining <= 0:
                break
            frames = _read_batch(source, batch, stop, remaining)
            if not frames:
                continue
            result = detector([f.image for f in frames])
            stats.add_frames(len(frames), result.timings)
            for i, frame in enumerate(frames):
                alarm = alarm_policy.update(frame.index, frame.timestamp, float(result.scores[i]))
                if alarm is not None:
                    stats.alarms += 1
                    sinks.emit(alarm, frame.source, frame.image, result.maps[i])
                for output in outputs:
                    output.write(annotate(frame.image, result.maps[i], float(result.scores[i]),
                                          result.threshold, alarm is not None))
                    if getattr(output, "wants_stop", False):
                        stop.set()
            if status_every and time.monotonic() - last_status >= status_every:
                last_status = time.monotonic()
                status(stats.line(source.stats.dropped, source.stats.bad_frames))
    finally:
        source.close()
        webhook = sinks.close(webhook_deadline_s)
        for output in outputs:
            output.close()
    return stats.summary({"source": source.stats.as_dict(), "webhook": webhook, "events": sinks.events,
                          "alarms_suppressed_by_cooldown": alarm_policy.suppressed,
                          "stopped_early": stop.is_set()})
