"""One camera: source -> detector -> alarm policy -> the line's outputs.

``run_stream`` is the one-camera case of ``mrkd.runtime.line.loop.run_line`` (the one frame loop); it
returns a summary dict. It stops at
the end of the source, after ``max_frames``, or when ``stop`` is set (the CLI's SIGINT/SIGTERM
handler sets it): the frames in hand are finished, every event is written and the webhook queue is
flushed within a deadline.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Callable, Optional, Sequence

from mrkd.runtime.line.alarms import AlarmPolicy
from mrkd.runtime.detector import Detector
from mrkd.runtime.line.loop import DEFAULT_CAMERA, Camera, Line, RunSettings, run_line
from mrkd.runtime.outputs.base import LineObserver
from mrkd.runtime.sources import Source

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


def run_stream(detector: Detector, source: Source, alarm_policy: AlarmPolicy,
               outputs: Sequence[LineObserver] = (), settings: Optional[RunSettings] = None, *,
               stop: Optional[threading.Event] = None, status: Callable[[str], None] = print,
               camera: str = DEFAULT_CAMERA, **run_settings) -> dict:
    """Score every frame of ``source``, raise alarms, tell ``outputs``; returns the run summary.

    The one-camera case of ``mrkd.runtime.line.loop.run_line`` (same loop, camera named ``camera``).
    outputs: LineObservers, e.g. ``build_outputs(OutputSettings(events=..., snapshots=...))``.
    settings: RunSettings, or its fields as keywords (``batch=4``, ``status_every=5``).
    """
    threshold = None if alarm_policy.threshold == detector.threshold else alarm_policy.threshold
    line = Line((Camera(camera, getattr(source, "uri", "memory"), str(detector.model_path), threshold=threshold),))
    summary = run_line(line, outputs, settings, stop=stop, status=status,
                       detectors={str(detector.model_path.resolve()): detector}, sources={camera: source},
                       policies={camera: alarm_policy}, **run_settings)
    one = summary["cameras"][camera]
    summary.update(source=one["source"], alarms_suppressed_by_cooldown=one["alarms_suppressed_by_cooldown"])
    return summary
