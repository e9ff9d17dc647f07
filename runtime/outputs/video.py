"""Outputs of annotated frames: a video file (cv2.VideoWriter) and a window (--show)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from mrkd.errors import SettingError
from mrkd.runtime.outputs.base import FrameResult, LineObserver, OutputHealth
from mrkd.runtime.outputs.delivery import DISK_FULL, Delivery
from mrkd.runtime.outputs.overlay import heatmap_overlay

logger = logging.getLogger(__name__)

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


class VideoFileSink(LineObserver):
    """``--save-video FILE``: one camera's annotated frames in a video file; opened on the first frame
    (its size fixes the file's). A frame that cannot be written is counted and warned about."""

    def __init__(self, path, fps: float = 15.0, camera: Optional[str] = None):
        self.path = Path(path)
        self.fps = fps
        self.camera = camera          # None: the first camera that sends a frame
        self.writer = None
        self.frames = 0
        self.delivery = Delivery("video", str(self.path))
        if self.path.suffix.lower() not in FOURCC_BY_SUFFIX:
            # OpenCV picks the container by the extension: out.xyz failed at its first frame and the run went
            # on recording nothing, exit 0
            raise SettingError(f"--save-video {self.path}: no video writer for the extension "
                               f"{self.path.suffix or '(none)'!r}; use {', '.join(FOURCC_BY_SUFFIX)}")
        if self.path.exists() or self.path.is_symlink():     # an earlier run's recording, or any other file
            raise SettingError(f"--save-video {self.path}: exists; a recording is never written over a file "
                               "(name a new one)")
        try:      # a folder that cannot exist is the user's mistake, said at the start
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise OSError(exc.errno, f"--save-video {self.path}: cannot create its folder "
                                         f"({exc.strerror or exc})") from None

    def on_frame(self, result: FrameResult) -> None:
        if self.camera is None:
            self.camera = result.camera
        if result.camera != self.camera:
            return
        try:
            self.write(annotate(result.image, result.amap, result.score, result.threshold, result.event is not None))
        except OSError as exc:
            self.delivery.failed_one(str(exc))
        else:
            self.delivery.delivered()

    def write(self, image: np.ndarray) -> None:
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fourcc = cv2.VideoWriter_fourcc(*FOURCC_BY_SUFFIX[self.path.suffix.lower()])
            self.size = (image.shape[1], image.shape[0])
            self.writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, self.size)
            if not self.writer.isOpened():
                self.writer = None
                raise OSError(f"{self.path}: OpenCV cannot write this video format (try .avi)")
        if (image.shape[1], image.shape[0]) != self.size:
            image = cv2.resize(image, self.size)
        self.writer.write(image)
        self.frames += 1

    def health(self) -> OutputHealth:
        return self.delivery.health()

    def on_stop(self) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None


class WindowSink(LineObserver):
    """``--show``: one camera's annotated frames in a window; closing it (q/Esc) asks the run to stop."""

    def __init__(self, title: str = "mrkd", camera: Optional[str] = None):
        self.title = title
        self.camera = camera
        self.wants_stop = False

    def on_frame(self, result: FrameResult) -> None:
        if self.camera is None:
            self.camera = result.camera
        if result.camera != self.camera or self.wants_stop:
            return
        try:
            self.write(annotate(result.image, result.amap, result.score, result.threshold, result.event is not None))
        except RuntimeError as exc:     # no GUI: say so once and end the run (the operator asked to watch)
            logger.error("%s", exc)
            self.wants_stop = True

    def write(self, image: np.ndarray) -> None:
        try:
            cv2.imshow(self.title, image)
            key = cv2.waitKey(1) & 0xFF
        except cv2.error as exc:
            raise RuntimeError("--show needs an OpenCV with GUI support (opencv-python, not -headless, "
                               f"or JetPack's OpenCV) and a display: {exc}") from None
        if key in (ord("q"), 27):
            self.wants_stop = True

    def stop_requested(self) -> bool:
        return self.wants_stop

    def on_stop(self) -> None:
        self.close()

    def close(self) -> None:
        try:
            cv2.destroyWindow(self.title)
        except cv2.error:
            pass


def outputs_from(settings) -> list:
    """``--save-video FILE`` and ``--show`` (OutputSettings.save_video, .show)."""
    outputs: list = []
    if settings.save_video:
        outputs.append(VideoFileSink(settings.save_video, settings.video_fps, settings.video_camera))
    if settings.show:
        outputs.append(WindowSink(camera=settings.video_camera))
    return outputs
