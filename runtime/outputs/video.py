"""Output sinks for annotated frames: a video file (cv2.VideoWriter) and a window (--show)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from mrkd.runtime.outputs.overlay import heatmap_overlay

FOURCC_BY_SUFFIX = {".avi": "MJPG", ".mp4": "mp4v", ".mkv": "XVID"}


def annotate(frame_bgr: np.ndarray, amap: np.ndarray, score: float, threshold: Optional[float],
             alarm: bool = False) -> np.ndarray:
    """The frame with the heat-map blended in and "score / threshold" written on it (red on alarm)."""
    top = threshold if threshold else float(amap.max()) or 1.0
    image = heatmap_overlay(frame_bgr, amap, vmin=0.0, vmax=top, alpha=0.4)
    text = f"score {score:.4f} / {threshold:.4f}" if threshold is not None else f"score {score:.4f}"
    colour = (0, 0, 255) if alarm else (255, 255, 255)
    scale = max(0.35, frame_bgr.shape[1] / 900)
    cv2.putText(image, text + ("  ALARM" if alarm else ""), (5, int(20 * scale) + 5), cv2.FONT_HERSHEY_SIMPLEX,
                scale, colour, max(1, int(scale * 2)), cv2.LINE_AA)
    return image


class VideoFileSink:
    """Writes annotated frames to a video file; opened on the first frame (its size fixes the file's)."""

    def __init__(self, path, fps: float = 15.0):
        self.path = Path(path)
        self.fps = fps
        self.writer = None
        self.frames = 0

    def write(self, image: np.ndarray) -> None:
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fourcc = cv2.VideoWriter_fourcc(*FOURCC_BY_SUFFIX.get(self.path.suffix.lower(), "MJPG"))
            self.size = (image.shape[1], image.shape[0])
            self.writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, self.size)
            if not self.writer.isOpened():
                raise OSError(f"{self.path}: OpenCV cannot write this video format (try .avi)")
        if (image.shape[1], image.shape[0]) != self.size:
            image = cv2.resize(image, self.size)
        self.writer.write(image)
        self.frames += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None


class WindowSink:
    """Shows annotated frames in a window; closing it (or pressing q/Esc) asks the run to stop."""

    def __init__(self, title: str = "mrkd"):
        self.title = title
        self.wants_stop = False

    def write(self, image: np.ndarray) -> None:
        try:
            cv2.imshow(self.title, image)
            key = cv2.waitKey(1) & 0xFF
        except cv2.error as exc:
            raise RuntimeError("--show needs an OpenCV with GUI support (opencv-python, not -headless, "
                               f"or JetPack's OpenCV) and a display: {exc}") from None
        if key in (ord("q"), 27):
            self.wants_stop = True

    def close(self) -> None:
        try:
            cv2.destroyWindow(self.title)
        except cv2.error:
            pass
