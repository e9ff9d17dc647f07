"""What the frame loop tells the outside world: one small interface for every line output.

The loop (``mrkd.runtime.line.loop.run_line``; ``run_stream`` is its one-camera case) calls a
``LineObserver`` on the loop thread for every scored frame, every alarm event and every change in a
camera's state. Observers (MQTT, Prometheus metrics, the operator page, ...) must return at once:
anything slow (network, encoding for a browser) goes onto a bounded queue of their own, so a slow
broker or browser never slows scoring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class CameraInfo:
    """A camera as the loop runs it (what a status topic, a metrics label or a page shows)."""

    name: str
    source: str                  # the URI as given
    model: str                   # model file path
    model_sha256: str            # hash of the model file, as checked against its metadata
    backend: str                 # "onnxruntime" / "tensorrt"
    precision: str               # "fp32" / "fp16" / "int8"
    threshold: float
    threshold_source: str        # where the threshold came from, e.g. "sidecar model.json (calibrated on line)"


@dataclass(frozen=True)
class FrameResult:
    """One scored frame of one camera."""

    camera: str
    frame_index: int             # increasing over the whole run (also across --loop passes)
    frame_time: float            # seconds, source clock, increasing
    image: np.ndarray            # HxWx3 uint8 BGR as the camera delivered it (do not modify)
    amap: np.ndarray             # anomaly map (model size), float32
    score: float
    threshold: float
    anomalous: bool              # score >= threshold
    event: Optional[dict] = None  # the alarm event this frame raised, if any (same dict as on_event)
    infer_s: float = 0.0         # this frame's share of the batch's inference time
    latency_s: float = 0.0       # from the frame's arrival to its result


@dataclass(frozen=True)
class CameraStatus:
    """A camera's health, sent when it changes (and at the status interval)."""

    camera: str
    up: bool
    frames: int = 0
    dropped: int = 0
    bad_frames: int = 0
    reconnects: int = 0
    fps: float = 0.0
    extra: Dict[str, float] = field(default_factory=dict)


class LineObserver:
    """Base class with no-op hooks; subclasses override what they need. Hooks run on the loop thread
    and must not block."""

    def on_start(self, cameras: Sequence[CameraInfo]) -> None:
        pass

    def on_frame(self, result: FrameResult) -> None:
        pass

    def on_event(self, camera: str, event: dict) -> None:
        pass

    def on_status(self, status: CameraStatus) -> None:
        pass

    def on_stop(self) -> None:
        """The loop has ended (every event is written); flush within a short deadline and release."""
