"""Frame sources: one ``open_source(uri)`` for cameras, streams, video files and image folders.

Every source has the same small interface (after jetson-inference's videoSource): ``read()`` returns
the next ``Frame`` (None at the end), iteration yields frames, ``close()`` releases it and ``stats``
counts frames read, bad frames skipped, frames dropped and reconnects.

URIs: "0" / "v4l2:///dev/video0" (USB/V4L2 camera), "csi://0" (Jetson CSI camera through a GStreamer
pipeline: needs an OpenCV built with GStreamer - JetPack's has it, PyPI's opencv-python does not),
"gige://ADDRESS-or-SERIAL" (GigE Vision camera through Aravis, sources/gige.py),
"rtsp://..", "http(s)://.." (network streams), "file://x.mp4" or a path to a video file, a folder of
images, a glob ("parts/*.png") or a single image. Live sources (cameras, streams) are read by a
thread that keeps only the newest frame, so the detector never works on a stale frame; network
streams that drop are reopened with exponential backoff. Files deliver every frame. A frame that
cannot be decoded or has the wrong shape is skipped and counted; it never ends the stream.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from mrkd.errors import MrkdError
from mrkd.runtime.image_folders import warn_narrow_16bit, warn_unread_images
from mrkd.runtime.images import ImageListError, ImageReadError, list_images, read_image
from mrkd.runtime.raw_image import RawImage
from mrkd.runtime.redact import redact_uri
from mrkd.runtime.sources.open_turns import given_up_when, in_turn
from mrkd.runtime.sources.reachable import Unreachable, probe_target, probed_open
from mrkd.runtime.warning_limiter import WarningLimiter
from mrkd.unjoined_threads import left_running

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".mjpg", ".mjpeg")
NETWORK_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")
TRIGGER_MODES = ("free", "software", "hardware")


class SourceError(MrkdError, RuntimeError):
    """A source cannot be opened; the message names the URI and what to do."""


class SourceUnreachable(SourceError):
    """A network camera or stream did not answer (yet): it may still be booting, so a line opens it
    again in the background (sources/late.py LateSource) instead of refusing to start."""


@dataclass
class Frame:
    """One frame: ``index`` counts every frame the source produced (gaps = dropped or bad frames),
    ``image`` is uint8 H×W×3 BGR, ``timestamp`` is seconds (media time for video files, wall clock
    for live sources), ``source`` the URI. ``raw``: the camera's own pixels where ``image`` is not
    them (a GigE camera in Mono10/12/16 or Bayer, runtime/raw_image.py); None for every other source."""

    index: int
    image: np.ndarray
    timestamp: float
    source: str
    raw: Optional[RawImage] = None
    arrived: Optional[float] = None   # a live source's: time.monotonic() when its reader got it (None: not live)


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


@dataclass
class SourceOptions:
    """How a source is opened, the same for every kind and for `mrkd run` and `mrkd calibrate`.

    size: (width, height) every frame is resized to (cameras are also asked for it). fps: camera rate
    to request, or the rate at which files/folders are replayed (None: as fast as they are read).
    loop: restart files and folders at their end. timeout: seconds a network stream may take to open
    or to deliver a frame before it counts as dropped. reconnect/backoff: reopen dropped live sources,
    waiting backoff[0] seconds, doubling up to backoff[1]. features / trigger: GenICam settings and
    the trigger mode of cameras that have them (other sources refuse features; in triggered mode a
    file or folder gives its next frame per trigger).
    """

    size: Optional[Tuple[int, int]] = None
    fps: Optional[float] = None
    loop: bool = False
    timeout: float = 5.0
    reconnect: bool = True
    backoff: Tuple[float, float] = (0.1, 5.0)
    features: Tuple[Tuple[str, str], ...] = ()   # GenICam NAME=VALUE settings (gige:// cameras)
    trigger: str = "free"                        # free / software / hardware (cameras that take triggers)
    name: Optional[str] = None                   # the camera's name on the line, for messages

    MAX_SIDE = 16384
    MAX_FPS = 1000.0

    def validate(self) -> "SourceOptions":
        """Raise SourceError naming the option that is out of range; returns self."""
        if self.size is not None:
            # a bool is an int to Python: size = [true, true] in a line file ran the camera at 1x1
            if (len(self.size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                               and 1 <= v <= self.MAX_SIDE for v in self.size)):
                raise SourceError(f"size {self.size!r}: width and height must be whole numbers 1..{self.MAX_SIDE}")
            self.size = (int(self.size[0]), int(self.size[1]))
        if self.fps is not None and not (math.isfinite(self.fps) and 0 < self.fps <= self.MAX_FPS):
            raise SourceError(f"fps {self.fps!r}: must be a number in (0, {self.MAX_FPS:g}]")
        if not (math.isfinite(self.timeout) and 0 < self.timeout <= 3600):
            raise SourceError(f"timeout {self.timeout!r}: must be seconds in (0, 3600]")
        low, high = self.backoff
        if not (0 < low <= high <= 3600):
            raise SourceError(f"backoff {self.backoff!r}: must be 0 < first <= longest <= 3600 seconds")
        if self.trigger not in TRIGGER_MODES:
            raise SourceError(f"trigger {self.trigger!r}: use one of {', '.join(TRIGGER_MODES)}")
        self.features = tuple((str(k), str(v)) for k, v in self.features)
        return self

    @staticmethod
    def parse_size(text: Optional[str]) -> Optional[Tuple[int, int]]:
        """"WIDTHxHEIGHT" -> (width, height); None stays None; SourceError naming the text otherwise."""
        if text is None:
            return None
        match = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", str(text))
        if not match:
            raise SourceError(f"size {text!r}: expected WIDTHxHEIGHT, e.g. 640x480")
        return int(match.group(1)), int(match.group(2))


class Source:
    """Base of every source: subclasses implement ``_next(timeout)`` (a Frame; None at the end or when
    ``timeout`` passed without one) and ``close()``. Kinds: ArraySource / ImageFilesSource (memory,
    image files), VideoFileSource (a video file), LiveSource (cameras and network streams)."""

    live = False
    paced = True      # replayed at options.fps; live sources run at the camera's rate

    @property
    def stamps_wall_clock(self) -> bool:
        """Its frames' ``timestamp`` is the wall clock when each came (a live source), not media time: a
        wall clock that jumps must not count on the line (the alarm cooldown takes the monotonic clock)."""
        return self.live

    def __init__(self, uri: str, size: Optional[Tuple[int, int]] = None, fps: Optional[float] = None):
        self.uri = redact_uri(uri)     # what is shown and logged; only the opener keeps the URI as given
        self.size = tuple(size) if size else None     # (width, height) delivered frames are resized to
        self.fps = fps
        self.stats = SourceStats()
        self._next_index = 0
        self._closed = False
        self._held: Optional[Frame] = None            # a frame waiting for its replay time
        self._paced_count = 0
        self._started = time.monotonic()
        self._warnings = WarningLimiter(logger)
        self.keeps_camera_bits = False               # Frame.raw wanted (keep_camera_bits)

    def keep_camera_bits(self, keep: bool) -> None:
        """Whether frames carry the camera's own bits (``Frame.raw``) where they differ from the judged
        frame (a GigE camera in Mono10/12/16 or Bayer): off until the line asks for them, for an output
        that keeps them (outputs/base.py ``keeps_camera_bits``). Other sources have none to carry."""
        self.keeps_camera_bits = keep

    def _deliverable(self, image, index: int, reason: Optional[str] = None) -> Optional[np.ndarray]:
        """Validate (and resize) a raw frame; count and log it when it is bad (``reason``: why, if known)."""
        frame = check_frame(image)
        if frame is None:
            self.stats.bad_frames += 1
            shape = getattr(image, "shape", None)
            reason = reason or f"unusable image {getattr(image, 'dtype', type(image).__name__)} {shape}"
            self.stats.last_error = f"frame {index}: {reason}"
            self._warnings.warn("bad_frame", "%s: skipped %s (%d bad so far)", self.uri, self.stats.last_error,
                                self.stats.bad_frames)
            return None
        if self.size and (frame.shape[1], frame.shape[0]) != self.size:
            frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
        return frame

    def _next(self, timeout: Optional[float]) -> Optional[Frame]:
        raise NotImplementedError

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]:
        """The next frame, or None when the source has ended or ``timeout`` seconds passed without a
        frame (a file being replayed at ``fps`` also waits at most ``timeout`` for its next frame)."""
        if self._closed and self._held is None:
            return None
        frame = self._held or self._next(timeout)
        if frame is None:
            return None
        if self.fps and self.paced:
            wait = self._started + self._paced_count / self.fps - time.monotonic()
            if wait > 0:
                if timeout is not None and wait > timeout:   # keep it; the caller can check for a stop
                    time.sleep(timeout)
                    self._held = frame
                    return None
                time.sleep(wait)
            self._paced_count += 1
        self._held = None
        self.stats.frames_read += 1
        return frame

    @property
    def ended(self) -> bool:
        """True once the source can deliver no more frames."""
        return self._closed and self._held is None

    def __iter__(self) -> Iterator[Frame]:
        while not self.ended:
            frame = self.read(timeout=1.0)
            if frame is not None:
                yield frame

    def stop_reading(self) -> None:
        """Ask this source's own reader threads to stop, without waiting: a line stopping many cameras asks
        them all first, then waits for them together (``reader_threads``), then closes each."""

    @property
    def reader_threads(self) -> Tuple[threading.Thread, ...]:
        """The threads of its own that read it and may be inside a native call (an OpenCV open or read)."""
        return ()

    def close(self) -> None:
        """Release the device/stream/file. Safe to call twice. Subclasses that override it call it too."""
        self._closed = True
        self._held = None
        self._warnings.flush()     # the count of a flood of bad frames since its last line, else lost

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _past(deadline: Optional[float]) -> bool:
    return deadline is not None and time.monotonic() > deadline


# ---------------------------------------------------------------- in-memory and image files

class ArraySource(Source):
    """Frames from an iterable of arrays (tests, or frames grabbed by other code). With ``loop`` the
    frames repeat while frame numbers keep counting up; a pass without one usable frame ends it."""

    def __init__(self, frames: Iterable[np.ndarray], uri: str = "memory", loop: bool = False, **kwargs):
        super().__init__(uri, **kwargs)
        self._frames = frames
        self._iterator = iter(frames)
        self._loop = loop
        self._good_in_pass = 0

    @property
    def stamps_wall_clock(self) -> bool:
        return not self.fps          # without a rate a frame is stamped when it is read (``_next``)

    def _raw(self) -> Tuple[bool, object, Optional[str]]:
        """(more frames?, the next raw frame, why it is unreadable or None)."""
        try:
            return True, next(self._iterator), None
        except StopIteration:
            if not self._loop:
                return False, None, None
            if not self._good_in_pass:
                logger.warning("%s: a whole pass gave no usable frame; not looping", self.uri)
                return False, None, None
            self._iterator, self._good_in_pass = iter(self._frames), 0
            # Not self._raw() again: a subclass's _raw (image files) would get its own result back.
            try:
                return True, next(self._iterator), None
            except StopIteration:
                return False, None, None

    def _next(self, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ok, raw, reason = self._raw()
            if not ok:
                self._closed = True
                return None
            index = self._next_index
            self._next_index += 1
            image = self._deliverable(raw, index, reason)
            if image is not None:
                self._good_in_pass += 1
                timestamp = index / self.fps if self.fps else time.time()
                return Frame(index, image, timestamp, self.uri)
            if _past(deadline):    # many bad files in a row: let the caller check for a stop
                return None


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


def _open_capture(uri: str, opener: Callable[[], "cv2.VideoCapture"]):
    cap = opener()
    if cap is None or not cap.isOpened():
        network = uri.lower().startswith(NETWORK_SCHEMES)    # may answer later; a file or device will not
        raise (SourceUnreachable if network else SourceError)(f"{redact_uri(uri)}: cannot open (device missing, stream unreachable, or a codec/"
                          f"backend this OpenCV build lacks)")
    return cap


class VideoFileSource(Source):
    """A video file read in the caller's thread: every decodable frame, in order, with media time.

    A frame that does not decode is skipped and counted; where the file is cut short (the seek past
    the bad frame does not advance) the source ends at the last decodable frame and counts the frames
    the header promised but the file lacks. With ``loop``, frame numbers and times keep increasing
    across passes (alarm cooldowns and debouncing see one long recording)."""

    def __init__(self, uri: str, path: str, loop: bool = False, **kwargs):
        super().__init__(uri, **kwargs)
        self._path = path
        self._loop = loop
        self._cap = _open_capture(uri, lambda: cv2.VideoCapture(path))
        self._total = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self._frame_s = 1.0 / (self._cap.get(cv2.CAP_PROP_FPS) or 25.0)
        self._pass_index, self._pass_time = 0, 0.0      # where the current pass starts
        self._pass_frames, self._pass_last_time, self._good_in_pass = 0, 0.0, 0

    def _skip_bad(self, position: int) -> bool:
        """Count the frame at ``position`` as unreadable and seek past it; False when the seek does not
        advance (the file is cut short here: the rest of the promised frames count as unreadable)."""
        index = self._pass_index + position
        self._deliverable(None, index, "does not decode")
        self._cap.set(cv2.CAP_PROP_POS_FRAMES, position + 1)
        if int(self._cap.get(cv2.CAP_PROP_POS_FRAMES)) == position + 1:
            return True
        missing = self._total - position - 1
        self.stats.bad_frames += missing
        self.stats.last_error = (f"file ends at frame {position} of the {self._total} its header promises "
                                 f"({missing + 1} unreadable)")
        self._warnings.warn("truncated", "%s: %s", self.uri, self.stats.last_error)
        return False

    def _end_of_pass(self) -> bool:
        """Start the next pass (True) or end the source (False)."""
        if not (self._loop and self._good_in_pass):
            if self._loop:
                logger.warning("%s: a whole pass gave no decodable frame; not looping", self.uri)
            self._closed = True
            return False
        self._pass_index += max(self._pass_frames, self._total)
        self._pass_time += self._pass_last_time + self._frame_s
        self._pass_frames, self._pass_last_time, self._good_in_pass = 0, 0.0, 0
        self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
        if int(self._cap.get(cv2.CAP_PROP_POS_FRAMES)) != 0:     # cannot seek back: reopen
            self._cap.release()
            self._cap = _open_capture(self.uri, lambda: cv2.VideoCapture(self._path))
        return True

    def _next(self, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed:
            position = int(self._cap.get(cv2.CAP_PROP_POS_FRAMES))
            ok, raw = self._cap.read()
            if not ok:
                if not (self._total and position < self._total and self._skip_bad(position)):
                    if not self._end_of_pass():
                        return None
            else:
                media_time = self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0   # of the frame just read
                self._pass_frames = max(self._pass_frames, position + 1)
                self._pass_last_time = max(self._pass_last_time, media_time)
                index = self._pass_index + position
                image = self._deliverable(raw, index)
                if image is not None:
                    self._good_in_pass += 1
                    self._next_index = index + 1
                    return Frame(index, image, self._pass_time + media_time, self.uri)
            if _past(deadline):    # a run of bad frames: let the caller check for a stop
                return None
        return None

    def close(self) -> None:
        super().close()
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class LatestFrameSource(Source):
    """A source whose reader thread keeps only the newest frame (``_latest``, guarded by ``_cond``;
    ``_ended`` once the reader stops): the detector never works on a stale frame. Subclasses set the
    three in ``__init__`` and count the frames they replace as dropped."""

    def _next(self, timeout):
        with self._cond:
            self._cond.wait_for(lambda: self._latest is not None or self._ended, timeout)
            frame, self._latest = self._latest, None
        return frame

    @property
    def ended(self) -> bool:
        return self._closed or (self._ended and self._latest is None)


class LiveSource(LatestFrameSource):
    """A camera or network stream: a reader thread keeps only the newest frame (the detector never
    works on a stale one) and, with ``reconnect``, reopens a dropped stream with exponential backoff.
    Stopping never waits for a blocked read for more than ``STOP_WAIT_S``."""

    live = True
    paced = False
    STOP_WAIT_S = 0.5

    def __init__(self, uri: str, opener: Callable[[], "cv2.VideoCapture"], reconnect: bool = True,
                 backoff: Tuple[float, float] = (0.1, 5.0), **kwargs):
        super().__init__(uri, **kwargs)
        self._opener = opener
        self._reconnect = reconnect
        self._backoff = backoff
        self._reasons_said: set[str] = set()     # why reopens failed, each said once
        self._cap = _open_capture(uri, opener)
        self._latest: Optional[Frame] = None
        self._ended = False
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._reader, name=f"source:{self.uri}", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        delay = self._backoff[0]
        while not self._stop.is_set():
            if self._cap is None:
                with given_up_when(self._stop.is_set):     # a stop while it waits for its turn: not opened
                    cap = self._open_again()
                if cap is not None and cap.isOpened():
                    self._cap, delay = cap, self._backoff[0]
                    self.stats.reconnects += 1
                    self._warnings.warn("reconnect", "%s: reconnected (%d reconnects)", self.uri,
                                        self.stats.reconnects)
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
                self._warnings.warn("dropped", "%s: stream dropped; reopening with backoff", self.uri)
                continue
            index = self._next_index
            self._next_index += 1
            image = self._deliverable(raw, index)
            if image is None:
                continue
            with self._cond:
                if self._latest is not None:
                    self.stats.dropped += 1
                self._latest = Frame(index, image, time.time(), self.uri, arrived=time.monotonic())
                self._cond.notify_all()
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def _open_again(self) -> Optional["cv2.VideoCapture"]:
        """The opener's capture; None where the camera did not answer its connect (reachable.py), whose
        reason is said once per new reason."""
        try:
            return self._opener()
        except SourceUnreachable as exc:
            self.stats.last_error = str(exc)
            if self.stats.last_error not in self._reasons_said:
                self._reasons_said.add(self.stats.last_error)
                logger.warning("%s; reopening with backoff", self.stats.last_error)
            return None

    def stop_reading(self) -> None:
        self._stop.set()      # the reader opens nothing more; one inside an open or read ends with its timeout

    @property
    def reader_threads(self) -> Tuple[threading.Thread, ...]:
        return (self._thread,)

    def close(self) -> None:
        self.stop_reading()
        self._thread.join(timeout=self.STOP_WAIT_S)
        self._closed = True
        # A reader blocked in read() still owns the capture; it is a daemon and ends with the process,
        # whose exit must not happen while it is inside OpenCV (mrkd/unjoined_threads.py).
        if self._thread.is_alive():
            left_running(self._thread)
        elif self._cap is not None:
            self._cap.release()
            self._cap = None
        super().close()


def _ffmpeg_opener(url: str, timeout_s: float) -> Callable[[], "cv2.VideoCapture"]:
    # Without these the FFmpeg backend waits ~30 s (or forever) on a dead stream.
    ms = int(timeout_s * 1000)
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]

    def open_stream() -> "cv2.VideoCapture":
        return cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)
    # one open at a time (OpenCV's own lock would make them wait in native code, past a stop): open_turns.py
    target = probe_target(url)
    if target is None:
        return lambda: in_turn(open_stream)

    def open_reachable() -> Optional["cv2.VideoCapture"]:
        # a camera that does not accept a connect does not take the turn (reachable.py)
        try:
            return probed_open(url, target, timeout_s, open_stream, lambda cap: cap.isOpened())
        except Unreachable as exc:
            raise SourceUnreachable(f"{redact_uri(url)}: {exc}") from None
    return open_reachable


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
    try:
        return list_images(uri)
    except ImageListError:
        return None


def _open_v4l2(uri: str, options: SourceOptions) -> Source:
    return LiveSource(uri, _camera_opener(uri[len("v4l2://"):], cv2.CAP_V4L2, options.size, options.fps),
                      reconnect=options.reconnect, backoff=options.backoff, size=options.size, fps=options.fps)


def _open_csi(uri: str, options: SourceOptions) -> Source:
    if not gstreamer_available():
        raise SourceError(f"{uri}: CSI cameras need OpenCV with GStreamer (JetPack's python3-opencv has it; "
                          "PyPI's opencv-python does not: uninstall it and use the system OpenCV)")
    width, height = options.size or (1280, 720)
    pipeline = csi_pipeline(int(uri[len("csi://"):] or 0), width, height, options.fps or 30)
    return LiveSource(uri, lambda: cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER), reconnect=options.reconnect,
                      backoff=options.backoff, size=options.size, fps=options.fps)


# Camera kinds by URI scheme -> opener(uri, SourceOptions); a "module:function" text is imported when
# that scheme is used, so an optional binding (Aravis) is needed only by its cameras. A new kind of
# camera is one module plus one line here.
CAMERA_SCHEMES = {
    "v4l2://": _open_v4l2,
    "csi://": _open_csi,
    "gige://": "mrkd.runtime.sources.gige:open_gige",
}
FEATURE_SCHEMES = ("gige://",)     # the kinds that take GenICam features


# Network schemes FFmpeg reads only from a host (udp:// and tcp:// may also listen: udp://@:1234)
HOST_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https")


def _check_network_url(uri: str, shown: str) -> None:
    """SourceError for a stream URL that can never open: no host (rtsp://), a port that is no port. Such
    a source was retried with backoff until a signal stopped the run, judging nothing."""
    from urllib.parse import urlsplit
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in HOST_SCHEMES and not parts.hostname:
        raise SourceError(f"{shown}: a {scheme}:// URL without a host; give {scheme}://HOST[:PORT]/PATH")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 and parts.netloc.rpartition("@")[2].rpartition("]")[2].count(":"):
        raise SourceError(f"{shown}: the port is not a number 1..65535")


def open_source(uri, size: Optional[Tuple[int, int]] = None, fps: Optional[float] = None, loop: bool = False,
                timeout: float = 5.0, reconnect: bool = True, backoff: Tuple[float, float] = (0.1, 5.0),
                options: Optional[SourceOptions] = None, features: Sequence[Tuple[str, str]] = (),
                trigger: str = "free", name: Optional[str] = None) -> Source:
    """Open any frame source by URI (see the module docstring); a list/array of images is read from memory.

    ``options`` (a SourceOptions, what the CLIs build) replaces the keyword settings, which are
    described there. Settings out of range raise SourceError naming them.
    """
    options = (options or SourceOptions(size=tuple(size) if size else None, fps=fps, loop=loop, timeout=timeout,
                                        reconnect=reconnect, backoff=tuple(backoff), features=tuple(features),
                                        trigger=trigger, name=name)).validate()
    size, fps, loop = options.size, options.fps, options.loop
    common = dict(size=size, fps=fps)
    if not isinstance(uri, (str, os.PathLike)):
        return ArraySource(uri, loop=loop, **common)
    uri = os.fspath(uri)
    shown = redact_uri(uri)    # in messages; the URI itself goes only to the opener
    scheme = next((s for s in CAMERA_SCHEMES if uri.lower().startswith(s)), None)
    if options.features and scheme not in FEATURE_SCHEMES:
        raise SourceError(f"{shown}: camera features ({options.features[0][0]}=...) apply to "
                          f"{', '.join(FEATURE_SCHEMES)} cameras only")
    if scheme is not None:
        opener = CAMERA_SCHEMES[scheme]
        if isinstance(opener, str):     # "module:function", imported when used (optional bindings)
            module, _, function = opener.partition(":")
            opener = getattr(importlib.import_module(module), function)
        return opener(uri, options)
    live = dict(reconnect=options.reconnect, backoff=options.backoff, **common)
    if uri.isascii() and uri.isdigit():      # "²".isdigit() too, which int() refuses
        return LiveSource(uri, _camera_opener(int(uri), cv2.CAP_ANY, size, fps), **live)
    if uri.lower().startswith(NETWORK_SCHEMES):
        _check_network_url(uri, shown)
        return LiveSource(uri, _ffmpeg_opener(uri, options.timeout), **live)
    local = uri[len("file://"):] if uri.startswith("file://") else uri
    paths = _image_paths(local)
    if paths is not None:
        # The same looks as training's folders: a line judging GIFs left out, or 12-bit data read
        # nearly black, is said once at the start.
        if Path(local).is_dir():
            warn_unread_images(local)
        if not paths:
            raise SourceError(f"{shown}: no image files found")
        warn_narrow_16bit(paths, shown)
        return ImageFilesSource(paths, uri=uri, loop=loop, **common)
    if Path(local).is_file():
        return VideoFileSource(uri, local, loop=loop, **common)
    raise SourceError(f"{shown}: not a camera index, v4l2://, csi:// or gige:// camera, network URL, video file, "
                      f"image folder or glob (file not found?)")
