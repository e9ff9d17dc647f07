"""Outputs of annotated frames: a video file (cv2.VideoWriter) and a window (--show).

The video file's annotation and encode take milliseconds per frame (tens for a large frame), so as
``build_outputs`` makes it (``background``) they run off the frame loop, on a worker of its own
(notifier.py's ``DroppingWorker``) that takes the frames in order through a bounded queue: while
``VIDEO_FRAMES_WAITING`` frames wait (an encoder or a disk slower than the line), a frame is left out of
the recording, counted in the health's ``dropped`` and warned about (rate-limited), and the loop goes on
at its own rate. The stop lets the queued frames be written (at most ``VIDEO_DRAIN_S``) and then
finalizes the file; every frame of its camera handed to it is written, failed or dropped. The window
(--show) stays on the loop's thread: a GUI window belongs to the thread that opened it.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from mrkd.errors import SettingError
from mrkd.runtime.outputs.base import FrameResult, LineObserver, OutputHealth
from mrkd.runtime.outputs.delivery import DISK_FULL, Delivery
from mrkd.runtime.outputs.notifier import DroppingWorker
from mrkd.runtime.outputs.overlay import heatmap_overlay

logger = logging.getLogger(__name__)

FOURCC_BY_SUFFIX = {".avi": "MJPG", ".mp4": "mp4v", ".mkv": "XVID"}
# Frames (each holds its image) waiting for the video worker: past it a frame is left out of the recording.
VIDEO_FRAMES_WAITING = 16
VIDEO_DRAIN_S = 10.0        # the stop waits this long for the queued frames, then counts the rest dropped
VIDEO_FINALIZE_WAIT_S = 2.0  # then this long for a frame still being encoded, before the file is finalized


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


def recording_path(given, now: Optional[time.struct_time] = None) -> Path:
    """``--save-video``'s file: the name with its strftime fields (``%Y%m%d-%H%M%S``; ``%%`` a percent sign)
    filled in with the local start time ``now``, so a line restarted by its supervisor records into a new
    file each start rather than being refused for the last one (a name without fields is taken as given)."""
    text = str(given)
    if "%" not in text:
        return Path(text)
    try:
        return Path(time.strftime(text, now if now is not None else time.localtime()))
    except ValueError as exc:          # e.g. a lone % at the end on some platforms
        raise SettingError(f"--save-video {text}: not a file name with time fields ({exc}); write a "
                           "percent sign as %%") from None


class VideoFileSink(LineObserver):
    """``--save-video FILE``: one camera's annotated frames in a video file; opened on the first frame
    (its size fixes the file's). A frame that cannot be written is counted and warned about.
    ``background``: annotated and encoded on a worker (see the module's notes); without it ``on_frame``
    does both on the caller's thread."""

    def __init__(self, path, fps: float = 15.0, camera: Optional[str] = None, background: bool = False):
        self.path = recording_path(path)
        self.fps = fps
        self.camera = camera          # None: the first camera that sends a frame
        self.writer = None
        self.given = 0                # frames of its camera handed to on_frame
        self.frames = 0               # of them written into the file
        self.delivery = Delivery("video", str(self.path))
        # The worker's write and the stop's finalize; once ``_stopped`` no frame is written (or counted so).
        self._writer_lock = threading.Lock()
        self._stopped = False
        self._dropped_at_stop: Optional[int] = None
        self._worker = DroppingWorker(
            "video-writer", VIDEO_FRAMES_WAITING, f"output video ({self.path}): the video encoder is slower than "
            "the line; frames are left out of the recording") if background else None
        if self.path.suffix.lower() not in FOURCC_BY_SUFFIX:
            # OpenCV picks the container by the extension: out.xyz failed at its first frame and the run went
            # on recording nothing, exit 0
            raise SettingError(f"--save-video {self.path}: no video writer for the extension "
                               f"{self.path.suffix or '(none)'!r}; use {', '.join(FOURCC_BY_SUFFIX)}")
        if self.path.exists() or self.path.is_symlink():     # an earlier run's recording, or any other file
            raise SettingError(f"--save-video {self.path}: exists; a recording is never written over a file "
                               "(name a new one; a line that restarts names its start time: "
                               "rec-%Y%m%d-%H%M%S.avi)")
        try:      # a folder that cannot exist is the user's mistake, said at the start
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise OSError(exc.errno, f"--save-video {self.path}: cannot create its folder "
                                         f"({exc.strerror or exc})") from None

    def on_frame(self, result: FrameResult) -> None:
        if self.camera is None:
            self.camera = result.camera
        if result.camera != self.camera or self._stopped:
            return
        self.given += 1
        if self._worker is None:
            self._record(result)
        else:   # the frame is not modified after delivery (FrameResult), so the worker may hold it
            self._worker.offer(functools.partial(self._record, result))

    def _record(self, result: FrameResult) -> None:
        """Annotate and write one frame (the worker's call, in the order the frames came)."""
        with self._writer_lock:
            if self._stopped:        # past the stop's deadline: counted dropped there, never written
                return
            try:
                self.write(annotate(result.image, result.amap, result.score, result.threshold,
                                    result.event is not None))
            except (OSError, cv2.error) as exc:
                self.delivery.failed_one(str(exc))
            else:
                self.delivery.delivered()
            if self._stopped:        # the stop gave up waiting for this (stalled) frame: finalize the file now
                self.close()

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

    @property
    def dropped(self) -> int:
        """Frames left out of the recording: past the queue's bound, and at the stop those not written by
        then (so written + failed + dropped = given)."""
        if self._dropped_at_stop is not None:
            return self._dropped_at_stop
        return self._worker.dropped if self._worker is not None else 0

    def health(self) -> OutputHealth:
        return self.delivery.health(dropped=self.dropped)

    def on_stop(self) -> None:
        """The queued frames get VIDEO_DRAIN_S to be written, then the file is finalized (a frame still
        being encoded gets VIDEO_FINALIZE_WAIT_S more; past that the file is left as it is, said in a warning)."""
        if self._worker is not None:
            self._worker.close(VIDEO_DRAIN_S)
        finalize = self._writer_lock.acquire(timeout=VIDEO_FINALIZE_WAIT_S)
        if not finalize:
            self._stopped = True      # from now on the stalled frame's _record finalizes the file when it returns
            finalize = self._writer_lock.acquire(blocking=False)      # it may have returned just now
        try:
            self._stopped = True
            health = self.delivery.health()
            # a frame still in the stalled worker's hands is counted when (if) it returns, as written or failed
            self._dropped_at_stop = self.given - health.sent - health.failed - (0 if finalize else 1)
            if finalize:
                self.close()
            else:
                logger.warning("output video (%s): the video encoder is stalled; the file is finalized only if "
                               "it returns", self.path)
        finally:
            if finalize:
                self._writer_lock.release()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None
            self._check_index()

    def _check_index(self) -> None:
        """OpenCV's writer says nothing when the disk under it is full (FFmpeg prints 'Failed to write frame'
        and goes on). The container's index (AVI idx1, MP4 moov, Matroska's cues) is written last, so a file
        whose index does not lead to its last frame was not finalized: its frames count as failed, not
        written. One seek and one frame's decode, at the stop."""
        capture = cv2.VideoCapture(str(self.path))
        try:
            indexed = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
            plays = indexed > 0 and capture.set(cv2.CAP_PROP_POS_FRAMES, indexed - 1) and capture.read()[0]
        finally:
            capture.release()
        if self.frames and not plays:
            self.delivery.not_delivered_after_all(self.frames, f"{self.path}: not finalized, its index does not "
                                                  f"lead to the {self.frames} frames written (a full disk?); a "
                                                  "player shows a few of them or none")
            self.frames = 0


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
        outputs.append(VideoFileSink(settings.save_video, settings.video_fps, settings.video_camera, background=True))
    if settings.show:
        outputs.append(WindowSink(camera=settings.video_camera))
    return outputs
