"""Run statistics: per-stage latency percentiles over a sliding window, frames per second."""

from __future__ import annotations

import time
from collections import deque
from typing import Dict, Iterable, Optional

import numpy as np


class LatencyWindow:
    """The last ``size`` durations of one stage (seconds); percentiles in milliseconds."""

    def __init__(self, size: int = 1000):
        self.values: deque = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self.values.append(seconds)

    def percentiles_ms(self, qs: Iterable[float] = (50, 99)) -> Dict[str, float]:
        if not self.values:
            return {f"p{int(q)}": float("nan") for q in qs}
        data = np.fromiter(self.values, dtype=np.float64) * 1000.0
        return {f"p{int(q)}": float(np.percentile(data, q)) for q in qs}


class RunStats:
    """Frames, alarms and latencies of one stream run; ``line()`` is the periodic status line."""

    def __init__(self, stages: Iterable[str], window: int = 1000):
        self.latency = {stage: LatencyWindow(window) for stage in stages}
        self.started = time.monotonic()
        self.frames = 0
        self.alarms = 0
        self._fps_mark = (self.started, 0)

    def add_frames(self, count: int, timings: Dict[str, float]) -> None:
        """Record ``count`` frames processed together; each stage's time is per frame (divided by count)."""
        self.frames += count
        for stage, seconds in timings.items():
            if stage in self.latency:
                self.latency[stage].add(seconds / max(count, 1))

    def fps(self) -> float:
        """Frames per second since the start."""
        elapsed = time.monotonic() - self.started
        return self.frames / elapsed if elapsed > 0 else 0.0

    def recent_fps(self) -> float:
        """Frames per second since the previous call (the status line's rate)."""
        now = time.monotonic()
        then, frames_then = self._fps_mark
        self._fps_mark = (now, self.frames)
        return (self.frames - frames_then) / (now - then) if now > then else 0.0

    def summary(self, extra: Optional[dict] = None) -> dict:
        out = {"frames": self.frames, "alarms": self.alarms, "seconds": time.monotonic() - self.started,
               "fps": self.fps(),
               "latency_ms": {stage: w.percentiles_ms() for stage, w in self.latency.items()}}
        out.update(extra or {})
        return out

    def line(self, dropped: int = 0, bad: int = 0) -> str:
        stages = " ".join(f"{stage} {p['p50']:.1f}/{p['p99']:.1f}"
                          for stage, p in ((s, w.percentiles_ms()) for s, w in self.latency.items()))
        return (f"{self.frames} frames, {self.recent_fps():.1f} fps, ms p50/p99: {stages}, "
                f"alarms {self.alarms}, dropped {dropped}, bad {bad}")
