"""Frame sources: one ``open_source(uri)`` for cameras, streams, video files and image folders.

Every source has the same small interface (after jetson-inference's videoSource): ``read()`` returns
the next ``Frame`` (None at the end), iteration yields frames, ``close()`` releases it and ``stats``
counts frames read, bad frames skipped, frames dropped and reconnects.

URIs: "0" / "v4l2:///dev/video0" (USB/V4L2 camera), "csi://0" (Jetson CSI camera through a GStreamer
pipeline: needs an OpenCV built with GStreamer - JetPack's has it, PyPI's opencv-python does not),
"rtsp://..", "http(s)://.." (network streams), "file://x.mp4" or a path to a video file, a folder of
images, a glob ("parts/*.png") or a single image. Live sources (cameras, streams) are read by a
thread that keeps only the newest frame, so the detector never works on a stale frame; network
streams that drop are reopened with exponential backoff. Files deliver every frame. A frame that
cannot be decoded or has the wrong shape is skipped and counted; it never ends the stream.
"""

from __future__ import annotations

import glob as globlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Tuple, Union

import cv2
import numpy as np

from mrkd.runtime.images import ImageReadError, is_image_file, read_image

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".mjpg", ".mjpeg")
NETWORK_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")


class SourceError(RuntimeError):
    """A source cannot be opened; the message names the URI and what to do."""


@dataclass
class Frame:
    """One frame: ``index`` counts every frame the source produced (gaps = dropped or bad frames),
    ``image`` is uint8 H×W×3 BGR, ``timestamp`` is seconds (media time for video files, wall clock
    for live sources), ``source`` the URI."""

    index: int
    image: np.ndarray
    timestamp: float
    source: str


@dataclass
class SourceStats:
    """Counters of a source: frames delivered, bad frames skipped, frames dropped because a newer
    one arrived first (live sources), and reconnects after a stream dropped."""

    frames_read: int = 0
    bad_frames: int = 0
    dropped: int = 0
    reconnects: int = 0
    last_error: str = ""

    def as_dict(self) -> dict:
        return {"frames_read": self.frames_read, "bad_frames": self.bad_frames, "dropped": self.dropped,
                "reconnects": self.reconnects}


def check_frame(image) -> Optional[np.ndarray]:
    """A frame as uint8 H×W×3 BGR, or None when it is unusable (empty, wrong dtype or shape).

    Gray (H×W, H×W×1) and BGRA frames, which cameras deliver, are converted."""
    if not isinstance(image, np.ndarray) or image.size == 0 or image.dtype != np.uint8:
        return None
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2BGR)
    if image.ndim != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        return None
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image if image.shape[2] == 3 else None


class Source:
    """Base of every source: subclasses implement ``_next()`` (a Frame, None at the end) and ``close()``."""

    live = False

    def __init__(self, uri: str, size: Optional[Tuple[int, int]] = None, fps: Optional[float] = None):
        self.uri = uri
        self.size = tuple(size) if size else None     # (width, height) delivered frames are resized to
        self.fps = fps
        self.stats = SourceStats()
        self._next_index = 0
        self._closed = False

    def _deliverable(self, image, index: int, reason: Optional[str] = None) -> Optional[np.ndarray]:
        """Validate (and resize) a raw frame; count and log it when it is bad (``reason``: why, if known)."""
        frame = check_frame(image)
        if frame is None:
            self.stats.bad_frames += 1
            shape = getattr(image, "shape", None)
            reason = reason or f"unusable image {getattr(image, 'dtype', type(image).__name__)} {shape}"
            self.stats.last_error = f"frame {index}: {reason}"
            logger.warning("%s: skipped %s", self.uri, self.stats.last_error)
            return None
        if self.size and (frame.shape[1], frame.shape[0]) != self.size:
            frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
        return frame

    def _next(self, timeout: Optional[float]) -> Optional[Frame]:
        raise NotImplementedError

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]:
        """The next frame, or None when the source has ended (or, for live sources, ``timeout``
        seconds passed without a new frame)."""
        if self._closed:
            return None
        frame = self._next(timeout)
        if frame is not None:
            self.stats.frames_read += 1
        return frame

    @property
    def ended(self) -> bool:
        """True once the source can deliver no more frames."""
        return self._closed

    def __iter__(self) -> Iterator[Frame]:
        while not self.ended:
            frame = self.read(timeout=1.0)
            if frame is not None:
                yield frame

    def close(self) -> None:
        """Release the device/stream/file. Safe to call twice."""
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _pace(self, started: float, count: int) -> None:
        """Deliver recorded frames at ``fps`` when one was asked for (a replayed file as a live camera)."""
        if self.fps:
            delay = started + count / self.fps - time.monotonic()
            if delay > 0:
                time.sleep(delay)


# ---------------------------------------------------------------- in-memory and image files

class ArraySource(Source):
    """Frames from an iterable of arrays (tests, or frames grabbed by other code)."""

    def __init__(self, frames: Iterable[np.ndarray], uri: str = "memory", loop: bool = False, **kwargs):
        super().__init__(uri, **kwargs)
        self._frames = frames
        self._iterator = iter(frames)
        self._loop = loop
        self._started = time.monotonic()

    def _raw(self) -> Tuple[bool, object, Optional[str]]:
        """(more frames?, the next raw frame, why it is unreadable or None)."""
        try:
            return True, next(self._iterator), None
        except StopIteration:
            if not self._loop:
                return False, None, None
            self._iterator = iter(self._frames)
            return self._raw()

    def _next(self, timeout):
        while True:
            ok, raw, reason = self._raw()
            if not ok:
                self._closed = True
                return None
            index = self._next_index
            self._next_index += 1
            image = self._deliverable(raw, index, reason)
            if image is None:
                continue
            self._pace(self._started, index)
            timestamp = index / self.fps if self.fps else time.time()
            return Frame(index, image, timestamp, self.uri)


class ImageFilesSource(ArraySource):
    """Frames from image files (a folder, a glob or one file), in name order; unreadable files are
    skipped and counted."""

    def __init__(self, paths: List[Path], uri: str, **kwargs):
        self.paths = paths
        super().__init__(paths, uri=uri, **kwargs)

    def _raw(self):
        ok, path, _ = super()._raw()
        if not ok:
            return False, None, None
        try:
            return True, read_image(path), None
        except ImageReadError as exc:
            return True, None, str(exc)   # counted as a bad frame by _deliverable


# ---------------------------------------------------------------- OpenCV captures

def gstreamer_available() -> bool:
    """Whether this OpenCV build can run GStreamer pipelines (JetPack's can, PyPI's cannot)."""
    match = re.search(r"GStreamer:\s*(\w+)", cv2.getBuildInformation())
    return bool(match) and match.group(1).upper() == "YES"


def csi_pipeline(sensor_id: int, width: int = 1280, height: int = 720, fps: float = 30) -> str:
    """The nvarguscamerasrc pipeline that hands a Jetson CSI camera's frames to OpenCV as BGR."""
    return (f"nvarguscamerasrc sensor-id={sensor_id} ! "
            f"video/x-raw(memory:NVMM), width={width}, height={height}, framerate={int(fps)}/1, format=NV12 ! "
            f"nvvidconv ! video/x-raw, format=BGRx ! videoconvert ! video/x-raw, format=BGR ! "
            f"appsink drop=true max-buffers=1 sync=false")


class CaptureSource(Source):
    """A cv2.VideoCapture source. Files are read in the caller's thread and deliver every frame;
    live sources (cameras, streams) are read by a thread that keeps only the newest frame and, for
    ``reconnect=True``, reopens a dropped stream with exponential backoff."""

    def __init__(self, uri: str, opener: Callable[[], "cv2.VideoCapture"], live: bool, loop: bool = False,
                 reconnect: bool = True, backoff: Tuple[float, float] = (0.1, 5.0), **kwargs):
        super().__init__(uri, **kwargs)
        self.live = live
        self._opener = opener
        self._loop = loop
        self._reconnect = reconnect and live
        self._backoff = backoff
        self._cap = self._open_or_raise()
        self._started = time.monotonic()
        if live:
            self._latest: Optional[Frame] = None
            self._ended = False
            self._cond = threading.Condition()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._reader, name=f"source:{uri}", daemon=True)
            self._thread.start()

    def _open_or_raise(self):
        cap = self._opener()
        if cap is None or not cap.isOpened():
            raise SourceError(f"{self.uri}: cannot open (device missing, stream unreachable, or a codec/"
                              f"backend this OpenCV build lacks)")
        return cap

    # --- files: caller's thread, every frame ---------------------------------------------------
    def _next_file_frame(self) -> Optional[Frame]:
        total = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        while True:
            index = int(self._cap.get(cv2.CAP_PROP_POS_FRAMES))
            ok, raw = self._cap.read()
            timestamp = self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0   # of the frame just read
            if not ok:
                if total and index < total - 1:      # a frame that does not decode, not the end
                    self._deliverable(None, index)
                    self._cap.set(cv2.CAP_PROP_POS_FRAMES, index + 1)
                    continue
                if self._loop and index > 0:
                    self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    continue
                self._closed = True
                return None
            self._next_index = index + 1
            image = self._deliverable(raw, index)
            if image is None:
                continue
            self._pace(self._started, self.stats.frames_read)
            return Frame(index, image, timestamp, self.uri)

    # --- live: reader thread, newest frame only ------------------------------------------------
    def _reader(self) -> None:
        delay = self._backoff[0]
        while not self._stop.is_set():
            if self._cap is None:
                cap = self._opener()
                if cap is not None and cap.isOpened():
                    self._cap, delay = cap, self._backoff[0]
                    self.stats.reconnects += 1
                    logger.warning("%s: reconnected (%d reconnects)", self.uri, self.stats.reconnects)
                else:
                    if cap is not None:
                        cap.release()
                    self._stop.wait(delay)
                    delay = min(delay * 2, self._backoff[1])
                continue
            ok, raw = self._cap.read()
            if not ok:
                self._cap.release()
                self._cap = None
                self.stats.last_error = "stream dropped"
                if not self._reconnect:
                    break
                logger.warning("%s: stream dropped; reopening with backoff", self.uri)
                continue
            index = self._next_index
            self._next_index += 1
            image = self._deliverable(raw, index)
            if image is None:
                continue
            with self._cond:
                if self._latest is not None:
                    self.stats.dropped += 1
                self._latest = Frame(index, image, time.time(), self.uri)
                self._cond.notify_all()
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def _next_live_frame(self, timeout: Optional[float]) -> Optional[Frame]:
        with self._cond:
            self._cond.wait_for(lambda: self._latest is not None or self._ended, timeout)
            frame, self._latest = self._latest, None
        return frame

    def _next(self, timeout):
        return self._next_live_frame(timeout) if self.live else self._next_file_frame()

    @property
    def ended(self) -> bool:
        if self.live:
            return self._closed or (self._ended and self._latest is None)
        return self._closed

    def close(self) -> None:
        if self.live and not self._stop.is_set():
            self._stop.set()
            self._thread.join(timeout=10)
        self._closed = True
        if self._cap is not None and (not self.live or not self._thread.is_alive()):
            self._cap.release()
            self._cap = None


def _ffmpeg_opener(url: str, timeout_s: float) -> Callable[[], "cv2.VideoCapture"]:
    # Without these the FFmpeg backend waits ~30 s (or forever) on a dead stream.
    ms = int(timeout_s * 1000)
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
    return lambda: cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)


def _camera_opener(target: Union[int, str], api: int, size, fps) -> Callable[[], "cv2.VideoCapture"]:
    def open_camera():
        cap = cv2.VideoCapture(target, api)
        if cap.isOpened():
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)      # the driver queue would otherwise hold stale frames
            if size:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, size[0])
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, size[1])
            if fps:
                cap.set(cv2.CAP_PROP_FPS, fps)
        return cap
    return open_camera


def _image_paths(uri: str) -> Optional[List[Path]]:
    """The image files a folder, glob or image-file URI names (None when it names none of these)."""
    path = Path(uri)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p))
    if any(ch in uri for ch in "*?["):
        return sorted(Path(p) for p in globlib.glob(uri) if Path(p).is_file())
    if path.is_file() and is_image_file(path):
        return [path]
    return None


def open_source(uri, size: Optional[Tuple[int, int]] = None, fps: Optional[float] = None, loop: bool = False,
                timeout: float = 5.0, reconnect: bool = True,
                backoff: Tuple[float, float] = (0.1, 5.0)) -> Source:
    """Open any frame source by URI (see the module docstring); a list/array of images is read from memory.

    size: (width, height) every frame is resized to (cameras are also asked for it). fps: camera rate
    to request, or the rate at which files/folders are replayed (default: as fast as they are read).
    loop: restart files and folders at the end. timeout: seconds a network stream may take to open or
    to deliver a frame before it counts as dropped. reconnect/backoff: reopen dropped live sources,
    waiting backoff[0] seconds, doubling up to backoff[1].
    """
    common = dict(size=size, fps=fps)
    if not isinstance(uri, (str, os.PathLike)):
        return ArraySource(uri, loop=loop, **common)
    uri = os.fspath(uri)
    live = dict(live=True, reconnect=reconnect, backoff=backoff, **common)
    if uri.isdigit():
        return CaptureSource(uri, _camera_opener(int(uri), cv2.CAP_ANY, size, fps), **live)
    if uri.startswith("v4l2://"):
        device = uri[len("v4l2://"):]
        return CaptureSource(uri, _camera_opener(device, cv2.CAP_V4L2, size, fps), **live)
    if uri.startswith("csi://"):
        if not gstreamer_available():
            raise SourceError(f"{uri}: CSI cameras need OpenCV with GStreamer (JetPack's python3-opencv has it; "
                              "PyPI's opencv-python does not: uninstall it and use the system OpenCV)")
        width, height = size or (1280, 720)
        pipeline = csi_pipeline(int(uri[len("csi://"):] or 0), width, height, fps or 30)
        return CaptureSource(uri, lambda: cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER), **live)
    if uri.lower().startswith(NETWORK_SCHEMES):
        return CaptureSource(uri, _ffmpeg_opener(uri, timeout), **live)
    local = uri[len("file://"):] if uri.startswith("file://") else uri
    paths = _image_paths(local)
    if paths is not None:
        if not paths:
            raise SourceError(f"{uri}: no image files found")
        return ImageFilesSource(paths, uri=uri, loop=loop, **common)
    if Path(local).is_file():
        return CaptureSource(uri, lambda: cv2.VideoCapture(local), live=False, loop=loop, **common)
    raise SourceError(f"{uri}: not a camera index, v4l2:// or csi:// camera, network URL, video file, "
                      f"image folder or glob (file not found?)")
