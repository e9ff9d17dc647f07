"""Many cameras in one process: a ``Line`` of cameras and the one frame loop, ``run_line``.

Each camera is read on its own thread (``_Feed``): live sources keep only their newest frame (the
source layer already does, and reconnects dropped streams), files and folders deliver every frame
through a short queue. The loop thread gathers one round of frames, at most ``batch`` per camera,
waiting for the cameras that are delivering until about one frame period after the oldest frame in
hand (DeepStream's nvstreammux does the same): a slow or dead camera never holds the others back,
because a camera that has sent nothing for ``stale_after_s`` is not waited for. Cameras whose model
file is the same share one loaded Detector and their frames are scored in one batch. Per camera:
alarm policy, events tagged with its name, snapshots in its own folder, status fields.

An alarm's event goes to the outputs off the loop: its record (every output's ``event_fields``: the
snapshot, the lossless evidence and its sha256, each written to disk) and then every ``on_event`` run
on one notifier thread (runtime/outputs/notifier.py), in the order of the alarms, so an encode or an
fsync never holds the next frame back, and an event names only files already written. The alarm waits
there with its frame; past ``ALARMS_WAITING`` alarms waiting (a disk far slower than the line) the loop
waits for room, as the part runner does: an alarm is never dropped. ``on_frame`` stays on the loop.

``run_stream`` (stream.py) is the one-camera case of this loop; runtime calibration reads frames
with ``iter_frames`` below.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Deque, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from mrkd.errors import MrkdError
from mrkd.runtime.calibration import frame_size_mismatch, ignore_mask_mismatch
from mrkd.runtime.clock_steps import ClockWatch
from mrkd.runtime.line.alarms import ALARM_FIELDS, AlarmPolicy, AlarmSettings
from mrkd.runtime.detector import STAGES, Detector
from mrkd.runtime.ignore_mask import IgnoreMask, IgnoreMaskError, MapGeometry, load_ignore_mask, masked
from mrkd.runtime.outputs.base import (CameraInfo, CameraStatus, FrameResult, LineObserver, call_each,
                                        keeps_camera_bits, stop_each)
from mrkd.runtime.outputs.events import make_event
from mrkd.runtime.outputs.notifier import Notifier
from mrkd.runtime.outputs.snapshots import regions_from_map
from mrkd.runtime.redact import redact_uri
from mrkd.runtime.sources import NETWORK_SCHEMES, Frame, Source, SourceError, SourceUnreachable, open_source
from mrkd.runtime.sources.late import LateSource, OpenInFlight
from mrkd.runtime.sources.open_turns import POLL_S, given_up_when
from mrkd.runtime.line.stats import LatencyWindow, RunStats
from mrkd.runtime.line.trigger import PartSettings
from mrkd.unjoined_threads import left_running

logger = logging.getLogger(__name__)

LINE_SCHEMA_VERSION = 1
CAMERA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")   # also a folder name and a metrics label
DEFAULT_CAMERA = "cam0"
# How long a stop waits for the cameras' readers, together: one network open or read in flight (their
# timeout, open_sources' 5 s) ends within it; nothing is opened after the stop.
READERS_STOP_WAIT_S = 5.5
# How long a free run's start waits for its network cameras' first opens (tried together): one that has
# not answered by then (off, hung, or waiting for another's open) starts as a LateSource that keeps that
# open going, so the line judges the cameras that answered instead of waiting out each dead one's timeout.
START_GRACE_S = 1.5
ALARMS_WAITING = 32          # alarms (each with its frame) waiting for the outputs before the loop waits
# How long the stop waits for the alarms handed over to reach every output; past it the rest is given up,
# counted (summary "outputs_given_up") and logged, as the part runner's OUTPUTS_DRAIN_S.
ALARM_OUTPUTS_DRAIN_S = 30.0


class LineError(MrkdError, ValueError):
    """A line description that cannot run (bad camera name, duplicate names, bad settings)."""


@dataclass(frozen=True)
class Camera:
    """One camera of a line: where its frames come from, the model that scores them, its alarm policy.

    source: any URI ``open_source`` takes (or an iterable of frames, for tests and embedding).
    alarm: its AlarmSettings (threshold, debounce, cooldown, cooldown_frames); those four may also be
    given as keywords, ``Camera(name, uri, model, threshold=0.4)``, and are kept in ``alarm`` only
    (``camera.alarm.threshold``). size: (width, height) frames are resized to.
    fps: camera rate to request, or the rate files/folders are replayed at (free run only: refused
    with a trigger). features: GenICam (NAME, VALUE) settings of a gige:// camera. trigger: free
    (frames as they come) / software / hardware (one image per part trigger, runtime/line/parts.py).
    ignore_mask: an image of the camera's frame size, white where its images are not judged
    (runtime/ignore_mask.py).
    """

    name: str
    source: object
    model: str
    alarm: AlarmSettings = AlarmSettings()
    size: Optional[Tuple[int, int]] = None
    fps: Optional[float] = None
    loop: bool = False
    features: Tuple[Tuple[str, str], ...] = ()
    trigger: str = "free"
    ignore_mask: Optional[str] = None
    # Keyword shortcuts for the alarm settings (folded into ``alarm``; not attributes).
    threshold: dataclasses.InitVar[Optional[float]] = None
    debounce: dataclasses.InitVar[Optional[Tuple[int, int]]] = None
    cooldown: dataclasses.InitVar[Optional[float]] = None
    cooldown_frames: dataclasses.InitVar[Optional[int]] = None

    def __post_init__(self, threshold, debounce, cooldown, cooldown_frames):
        given = {name: value for name, value in zip(ALARM_FIELDS, (threshold, debounce, cooldown, cooldown_frames))
                 if value is not None}
        if given:
            object.__setattr__(self, "alarm", dataclasses.replace(self.alarm, **given))


class _AlarmShortcut:
    """``camera.threshold`` (etc.) reads ``camera.alarm.threshold``: the shortcut keyword is never a
    second copy (dataclasses.replace reads it back and folds it in again unchanged)."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, camera, owner=None):
        return None if camera is None else getattr(camera.alarm, self.name)


for _shortcut in ALARM_FIELDS:
    setattr(Camera, _shortcut, _AlarmShortcut(_shortcut))


@dataclass(frozen=True)
class Line:
    """The cameras one process watches, with the settings of the models they load."""

    cameras: Tuple[Camera, ...]
    backend: str = "auto"
    postprocess: str = "auto"
    providers: Optional[Tuple[str, ...]] = None
    threads: Optional[int] = None
    part: Optional[PartSettings] = None      # how a triggered line makes parts (None: the defaults)
    schema_version: int = LINE_SCHEMA_VERSION

    def __post_init__(self):
        object.__setattr__(self, "cameras", tuple(self.cameras))
        check_cameras(self.cameras)


def camera_mask(camera: Camera) -> Optional[IgnoreMask]:
    """The camera's ignore mask, read (LineError naming the camera where it cannot be used); None without."""
    if camera.ignore_mask is None:
        return None
    try:
        return load_ignore_mask(camera.ignore_mask)
    except IgnoreMaskError as exc:
        raise LineError(f"camera {camera.name!r}: {exc}") from None


def calibration_mismatches(camera: Camera, detector: Detector, mask: Optional[IgnoreMask]) -> List[str]:
    """Why the model's calibrated threshold may not fit this camera's scores (they depend on the frame size
    and on the ignore mask); none where the camera sets its own threshold."""
    if camera.alarm.threshold is not None:
        return []
    calibration = detector.metadata.calibration
    return [problem for problem in (frame_size_mismatch(calibration, camera.size),
                                    ignore_mask_mismatch(calibration, mask.sha256 if mask is not None else None))
            if problem]


def check_cameras(cameras: Sequence[Camera]) -> None:
    """Raise LineError naming the camera when a name is unusable or repeated or a setting is out of range."""
    if not cameras:
        raise LineError("a line needs at least one camera")
    seen = set()
    controlled: Dict[str, str] = {}     # a GigE camera has one controlling client: two cameras cannot open one
    for camera in cameras:
        uri = camera.source if isinstance(camera.source, str) else ""
        if uri.startswith("gige://"):
            if uri in controlled:
                raise LineError(f"cameras {controlled[uri]!r} and {camera.name!r} both open {uri}: a GigE camera "
                                f"takes one controlling client (give it once; --part-images takes several a part)")
            controlled[uri] = camera.name
        if not isinstance(camera.name, str) or not CAMERA_NAME.match(camera.name):
            raise LineError(f"camera name {camera.name!r}: use 1-64 letters, digits, '_', '-', '.', starting with a "
                            f"letter or digit (it names the snapshot folder and the metrics label)")
        if camera.name in seen:
            raise LineError(f"camera name {camera.name!r} is used twice")
        seen.add(camera.name)
        if camera.fps is not None and not camera.fps > 0:
            raise LineError(f"camera {camera.name!r}: fps must be > 0, got {camera.fps}")
        if camera.trigger not in ("free", "software", "hardware"):
            raise LineError(f"camera {camera.name!r}: trigger must be free, software or hardware, got {camera.trigger!r}")
        if camera.fps is not None and camera.trigger != "free":
            # a triggered camera makes one image per trigger (a file or folder: its next frame), so a rate
            # would be dropped without a word when the part runner opens it
            raise LineError(f"camera {camera.name!r}: fps {camera.fps:g} sets a free-running camera's rate; with "
                            f"trigger {camera.trigger} it makes one image per trigger: leave fps (--fps) out")
        if camera.size is not None and (len(camera.size) != 2 or min(camera.size) < 1):
            raise LineError(f"camera {camera.name!r}: size must be WIDTHxHEIGHT with both >= 1, got {camera.size}")
        if camera.ignore_mask is not None:
            mask = camera_mask(camera)       # read here, size or not: a mistake is said before anything opens
            why = camera.size and mask.resize_misfit(camera.size, "its frames are resized to")
            if why:
                raise LineError(f"camera {camera.name!r}: {why}")


# ---------------------------------------------------------------- reading: one thread per camera

@dataclass
class _Arrived:
    frame: Frame
    arrival: float            # time.monotonic() when the frame reached this process


class _Feed:
    """Reads one camera's source on its own thread into a short buffer the loop takes frames from.

    Live sources: only the newest frame is kept (an older one still waiting is dropped and counted).
    Files/folders: every frame, the reader waits while ``capacity`` frames are waiting.
    """

    def __init__(self, name: str, source: Source, cond: threading.Condition, capacity: int,
                 max_frames: Optional[int]):
        self.name, self.source, self._cond = name, source, cond
        self.capacity = max(1, capacity)
        self.max_frames = max_frames
        self.buffer: Deque[_Arrived] = deque()
        self.read_count = 0       # frames put into the buffer
        self.taken = 0            # frames the loop took (live sources drop the others)
        self.dropped = 0          # frames replaced by a newer one before the loop took them
        # frames read from the source that the loop never took: waiting at the end of the run (a stop,
        # --max-frames reached on a live camera) or read while the reader stopped
        self.unjudged = 0
        self.last_arrival: Optional[float] = None
        self.intervals: Deque[float] = deque(maxlen=32)
        self.finished = False     # the reader will add no more frames
        self.failure: Optional[str] = None   # why the reader died (a source that raised), None if it did not
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"camera:{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _read(self) -> None:
        try:
            while not self._stop.is_set() and not self.source.ended:
                if self._limit_reached():
                    break
                frame = self.source.read(timeout=0.25)   # short: a stop request is seen quickly
                if frame is None:
                    continue
                with self._cond:
                    if not self.source.live:
                        self._cond.wait_for(lambda: len(self.buffer) < self.capacity or self._stop.is_set())
                        if self._stop.is_set():
                            self.unjudged += 1
                            break
                    elif len(self.buffer) >= self.capacity:
                        self.buffer.popleft()
                        self.dropped += 1
                    now = time.monotonic()
                    if self.source.live:   # the source's reader stamped it on arrival
                        now = min(now, frame.arrived) if frame.arrived is not None else \
                            now - max(0.0, time.time() - frame.timestamp)
                    if self.last_arrival is not None:
                        self.intervals.append(now - self.last_arrival)
                    self.last_arrival = now
                    self.buffer.append(_Arrived(frame, now))
                    self.read_count += 1
                    self._cond.notify_all()
        except Exception as exc:   # a source bug must end this camera, not the line; the run reports it
            self.failure = f"{type(exc).__name__}: {exc}"
            logger.error("camera %s: its source failed and stopped (%s)", self.name, self.failure)
            logger.debug("camera %s: reader traceback", self.name, exc_info=True)
        finally:
            with self._cond:
                self.finished = True
                self._cond.notify_all()

    def _limit_reached(self) -> bool:
        if self.max_frames is None:
            return False
        # Files deliver every frame, so reading stops at the limit; a live camera's frames may be
        # replaced by newer ones, so only the frames the loop took count.
        return (self.taken if self.source.live else self.read_count) >= self.max_frames

    @property
    def done(self) -> bool:
        """No frame waiting and none to come."""
        return (self.finished and not self.buffer) or (self.max_frames is not None and self.taken >= self.max_frames)

    def period(self) -> Optional[float]:
        """The camera's frame period: the median of its recent inter-arrival times."""
        if len(self.intervals) < 2:
            return None
        return float(np.median(self.intervals))

    @property
    def ready(self) -> bool:
        """A frame is waiting for the loop."""
        return bool(self.buffer) and not self.done

    def take(self, limit: int) -> List[_Arrived]:
        if self.max_frames is not None:
            limit = min(limit, self.max_frames - self.taken)
        out = []
        while self.buffer and len(out) < limit:
            out.append(self.buffer.popleft())
        self.taken += len(out)
        if out:
            self._cond.notify_all()   # a file reader waiting for room
        return out

    def stop(self) -> None:
        """Ask the reader (and the source's own readers) to stop, without waiting for them."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self.source.stop_reading()

    @property
    def threads(self) -> Tuple[threading.Thread, ...]:
        return (self._thread,) + tuple(self.source.reader_threads)

    def close(self) -> None:
        close_feeds([self])


def close_feeds(feeds: Sequence[_Feed], wait_s: float = READERS_STOP_WAIT_S) -> None:
    """Stop the feeds' readers together, wait for them together (at most ``wait_s``: one open or read of
    a camera that does not answer, in flight at the stop), then close their sources. A reader still
    inside a native call past it is left running, for the exit to handle (mrkd/unjoined_threads.py)."""
    for feed in feeds:
        feed.stop()
    deadline = time.monotonic() + wait_s
    for feed in feeds:
        for thread in feed.threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
    for feed in feeds:
        if feed._thread.is_alive():
            logger.warning("camera %s: its reader is still inside its source after %.1f s; not waiting for it",
                           feed.name, wait_s)
            left_running(feed._thread)
        feed.source.close()
        with feed._cond:
            feed.unjudged += len(feed.buffer)
            feed.buffer.clear()


def gather_round(feeds: Sequence[_Feed], cond: threading.Condition, stop: threading.Event, per_camera: int,
                 deadline_s: Optional[float], stale_after_s: float, wait_s: float = 0.25) -> Dict[str, List[_Arrived]]:
    """One round of frames: wait (at most ``wait_s``) for any frame, then until every camera that
    delivered within ``stale_after_s`` has one or the deadline (the oldest frame in hand plus one
    frame period, ``deadline_s`` or the fastest camera's measured period) passes; take up to
    ``per_camera`` frames from each. Empty when nothing came (or everything ended)."""
    with cond:
        cond.wait_for(lambda: stop.is_set() or any(f.ready for f in feeds) or all(f.done for f in feeds), wait_s)
        if stop.is_set() or not any(f.ready for f in feeds):
            return {}
        now = time.monotonic()
        expected = [f for f in feeds if not f.done and f.last_arrival is not None
                    and now - f.last_arrival <= stale_after_s]
        periods = [p for p in (f.period() for f in expected) if p is not None]
        period = deadline_s if deadline_s is not None else min(min(periods, default=0.0), 0.2)
        oldest = min(f.buffer[0].arrival for f in feeds if f.ready)
        remaining = oldest + period - now
        if remaining > 0:
            cond.wait_for(lambda: stop.is_set() or all(f.ready or f.finished for f in expected), remaining)
        return {f.name: f.take(per_camera) for f in feeds if f.ready}


# ---------------------------------------------------------------- the loop

@dataclass
class _CameraState:
    camera: Camera
    detector: Detector
    policy: AlarmPolicy
    feed: _Feed
    info: CameraInfo
    mask: Optional[IgnoreMask]
    frames: int = 0
    alarms: int = 0
    latency: LatencyWindow = field(default_factory=LatencyWindow)
    up: bool = False
    fps_mark: Tuple[float, int] = (0.0, 0)


def _threshold_source(camera: Camera, detector: Detector) -> str:
    if camera.alarm.threshold is not None:
        return "camera setting (line file or --threshold)"
    return detector.threshold_source


def decision_thresholds(line: Line, model_key: str) -> Tuple[Optional[float], ...]:
    """The thresholds the line's cameras decide at on the model at ``model_key`` (a resolved path), None
    for a camera that uses the model's own: OpenVINO under auto runs bf16 only where its check holds at each."""
    def same(model) -> bool:
        return str(Path(model).resolve()) == model_key
    part = line.part
    recipe = part is not None and any(same(model) for _, model in part.recipes)
    part_cameras = (part.cameras or tuple(c.name for c in line.cameras)) if recipe else ()
    # a recipe's model judges the part cameras' images, at their own thresholds where they have one
    return tuple(camera.alarm.threshold for camera in line.cameras if same(camera.model) or camera.name in part_cameras)


def line_detector(line: Line, model) -> Detector:
    """A Detector for ``model`` with the line's backend settings and the thresholds the line decides at
    on it: what the line opens at start, a recipe's model and a hot swap's new version alike."""
    return Detector(model, backend=line.backend, postprocess=line.postprocess,
                    providers=list(line.providers) if line.providers else None, threads=line.threads,
                    decision_thresholds=decision_thresholds(line, str(Path(model).resolve())))


def open_detectors(line: Line) -> Dict[str, Detector]:
    """One Detector per distinct model file (resolved path) of the line."""
    detectors: Dict[str, Detector] = {}
    for camera in line.cameras:
        key = str(Path(camera.model).resolve())
        if key not in detectors:
            detectors[key] = line_detector(line, camera.model)
    return detectors


def _naming(camera: Camera, exc: Exception) -> str:
    """A source error that names its camera: a GigE source's own errors already begin "camera NAME",
    so they are not named twice ("camera 'top': camera top: ...")."""
    text = str(exc)
    named = text.startswith((f"camera {camera.name}:", f"camera {camera.name} ("))
    return text if named else f"camera {camera.name!r}: {text}"


STOPPED_AT_START = "not opened: the run stopped while it started"


def open_sources(line: Line, timeout: float = 5.0, cameras: Optional[Sequence[str]] = None,
                 triggered: bool = False, stop: Optional[threading.Event] = None) -> Dict[str, Source]:
    """Open the sources of the line's cameras (``cameras``: only these names); a failure names the
    camera (sources opened so far are closed). Free run: a network camera that does not answer yet is
    not a failure: it is opened again in the background (LateSource) and shows as down until it
    answers; the network cameras' first opens run together, after the other cameras', and the line
    starts without those that have not answered within START_GRACE_S (their opens go on in their
    LateSource). ``triggered`` (the part runner): each camera in its trigger mode, grabbed directly, one
    after another, so a camera that does not answer is an error. ``stop`` (free run; the CLI's signal
    handler sets it): once set, the cameras not yet opened are not (each open of a camera that does not
    answer takes ``timeout``); they are LateSources that are never tried, so the line stops at once with
    every camera in its summary."""
    chosen = [camera for camera in line.cameras if cameras is None or camera.name in cameras]
    sources: Dict[str, Source] = {}
    together: List[Tuple[Camera, Callable[[], Source]]] = []     # free run's network cameras
    try:
        for camera in chosen:
            opener = _source_opener(camera, timeout, triggered)
            stopping = stop.is_set if stop is not None and not triggered else None
            if stopping is not None and stopping():
                sources[camera.name] = LateSource(camera.source, opener, STOPPED_AT_START, stop=stop)
            elif not triggered and _is_network(camera):
                together.append((camera, opener))
            else:
                sources[camera.name] = _open_one(camera, opener, triggered, stopping, stop)
        sources.update(_open_together(together, stop, timeout))
    except BaseException:
        for source in sources.values():
            source.close()
        raise
    return {camera.name: sources[camera.name] for camera in chosen}


def _source_opener(camera: Camera, timeout: float, triggered: bool) -> Callable[[], Source]:
    mode = dict(trigger=camera.trigger) if triggered else dict(fps=camera.fps)

    def opener() -> Source:
        return open_source(camera.source, size=camera.size, loop=camera.loop, timeout=timeout,
                           features=camera.features, name=camera.name, **mode)
    return opener


def _is_network(camera: Camera) -> bool:
    """Whether the camera's open may say it did not answer (SourceUnreachable) instead of failing."""
    return isinstance(camera.source, str) and camera.source.lower().startswith(NETWORK_SCHEMES)


def _open_one(camera: Camera, opener: Callable[[], Source], triggered: bool,
              stopping: Optional[Callable[[], bool]], stop: Optional[threading.Event]) -> Source:
    """One camera opened on this thread: the part runner's, and a free run's cameras that are not network
    streams (opened before those start: a file's open would wait behind a hung camera's in OpenCV)."""
    try:
        with given_up_when(stopping):
            return opener()
    except SourceUnreachable as exc:     # a network camera still booting: not a failure
        if triggered:
            raise SourceError(_naming(camera, exc)) from exc
        if not (stopping is not None and stopping()):     # not given up for the stop, nor did it come meanwhile
            logger.warning("camera %r: %s; trying again in the background", camera.name, exc)
        return LateSource(camera.source, opener, str(exc), stop=stop)
    except SourceError as exc:
        raise SourceError(_naming(camera, exc)) from exc


def _open_together(cameras: Sequence[Tuple[Camera, Callable[[], Source]]], stop: Optional[threading.Event],
                   timeout: float) -> Dict[str, Source]:
    """A free run's network cameras: their first opens together (OpenCV's part still one at a time,
    open_turns.py), waited for until each ended, START_GRACE_S passed, the stop, or one failed for good."""
    line_stopped = stop.is_set if stop is not None else (lambda: False)
    attempts = [(camera, opener, OpenInFlight(camera.name, opener, line_stopped)) for camera, opener in cameras]
    try:
        _wait_for_first_opens([attempt for *_, attempt in attempts], line_stopped)
    except BaseException:     # an interrupt: nothing waits for the opens; what they open is closed
        for *_, attempt in attempts:
            attempt.abandon()
            if attempt.thread.is_alive():
                left_running(attempt.thread)
        raise
    ended = [attempt.done.is_set() for *_, attempt in attempts]     # once: one ending now is the LateSource's
    failed = next(((camera, attempt) for (camera, _, attempt), done in zip(attempts, ended)
                   if done and _failed_for_good(attempt)), None)
    if failed is not None:
        _abandon_all([attempt for *_, attempt in attempts], timeout)
        camera, attempt = failed
        if isinstance(attempt.error, SourceError):
            raise SourceError(_naming(camera, attempt.error)) from attempt.error
        raise attempt.error
    return {camera.name: _started(camera, opener, attempt, done, stop)
            for (camera, opener, attempt), done in zip(attempts, ended)}


def _wait_for_first_opens(attempts: Sequence[OpenInFlight], line_stopped: Callable[[], bool]) -> None:
    """Until every open ended, START_GRACE_S passed, the stop, or one failed for good."""
    deadline = time.monotonic() + START_GRACE_S
    while not line_stopped() and not any(_failed_for_good(attempt) for attempt in attempts):
        waiting = [attempt for attempt in attempts if not attempt.done.is_set()]
        left = deadline - time.monotonic()
        if not waiting or left <= 0:
            return
        waiting[0].done.wait(min(POLL_S, left))     # the line starts as soon as the last one ends


def _failed_for_good(attempt: OpenInFlight) -> bool:
    """The open ended in an error that fails the start (not a camera that did not answer yet)."""
    return attempt.done.is_set() and attempt.error is not None and not isinstance(attempt.error, SourceUnreachable)


def _abandon_all(attempts: Sequence[OpenInFlight], timeout: float) -> None:
    """The start failed: every open is given up and waited for (one inside OpenCV runs out ``timeout``),
    and what they opened is closed."""
    for attempt in attempts:
        attempt.give_up()
    deadline = time.monotonic() + timeout + 1.0
    for attempt in attempts:
        attempt.thread.join(max(0.0, deadline - time.monotonic()))
        if attempt.thread.is_alive():
            left_running(attempt.thread)
        attempt.abandon()


def _started(camera: Camera, opener: Callable[[], Source], attempt: OpenInFlight, ended: bool,
             stop: Optional[threading.Event]) -> Source:
    """The camera's source for the line: the one its first open gave, or a LateSource (that takes over
    the open still in flight, or tries again later)."""
    quiet = stop is not None and stop.is_set()     # given up for the stop: nothing to warn about
    if not ended:
        # not a failure: an RTSP camera's open often takes a few seconds (stream probing); said as a warning
        # only if that open fails (LateSource), so a healthy camera does not raise one at every start
        reason = f"no answer within {START_GRACE_S:g} s of the start; still opening it"
        if not quiet:
            logger.info("camera %r: %s; the line starts without it", camera.name, reason)
        return LateSource(camera.source, opener, reason, stop=stop, in_flight=attempt)
    try:
        return attempt.take()
    except SourceUnreachable as exc:     # a network camera still booting: not a failure
        if not quiet:
            logger.warning("camera %r: %s; trying again in the background", camera.name, exc)
        return LateSource(camera.source, opener, str(exc), stop=stop)


def _status_of(state: _CameraState, now: float, stale_after_s: float) -> CameraStatus:
    feed, stats = state.feed, state.feed.source.stats
    then, frames_then = state.fps_mark
    fps = (state.frames - frames_then) / (now - then) if now > then else 0.0
    state.fps_mark = (now, state.frames)
    p = state.latency.percentiles_ms()
    return CameraStatus(camera=state.camera.name, up=state.up, frames=state.frames,
                        dropped=stats.dropped + feed.dropped, bad_frames=stats.bad_frames,
                        reconnects=stats.reconnects, fps=fps,
                        extra={"latency_p50_ms": p["p50"], "latency_p99_ms": p["p99"], "alarms": state.alarms},
                        features=dict(getattr(feed.source, "features_applied", {})))


def _status_line(statuses: Sequence[CameraStatus], stats: RunStats, observers: Sequence[LineObserver] = ()) -> str:
    stages = " ".join(f"{stage} {p['p50']:.1f}/{p['p99']:.1f}"
                      for stage, p in ((s, w.percentiles_ms()) for s, w in stats.latency.items()))
    cameras = " | ".join(
        f"{s.camera}: {'up' if s.up else 'DOWN'} {s.frames} frames {s.fps:.1f} fps "
        f"p50/p99 {s.extra['latency_p50_ms']:.1f}/{s.extra['latency_p99_ms']:.1f} ms alarms {int(s.extra['alarms'])} "
        f"dropped {s.dropped} bad {s.bad_frames} reconnects {s.reconnects}" for s in statuses)
    failing = [f"{name} {h['state']} ({h['failed']} failed)" for name, h in outputs_summary(observers).items()
               if not h["ok"]]
    outputs = f" || outputs FAILING: {', '.join(failing)}" if failing else ""
    return f"{stats.frames} frames, ms p50/p99 per frame: {stages} || {cameras}{outputs}"


@dataclass(frozen=True)
class RunSettings:
    """How the loop runs (not what it watches, the Line, nor where results go, the outputs).

    max_frames: per camera. status_every: seconds between status lines (0 = none). batch: frames per
    camera per round (files gain throughput; live cameras only ever have their newest).
    batch_timeout: seconds to wait for the other cameras after the oldest frame in hand (default: the
    fastest camera's frame period, at most 0.2 s). stale_after_s: a camera silent this long is not
    waited for and shows as down. cross_camera_batching=False scores each camera's frames in a
    separate call (the benchmark's baseline).
    """

    max_frames: Optional[int] = None
    status_every: float = 0.0
    batch: int = 1
    batch_timeout: Optional[float] = None
    stale_after_s: float = 2.0
    cross_camera_batching: bool = True

    def __post_init__(self):
        if self.batch < 1 or (self.max_frames is not None and self.max_frames < 1):
            raise LineError(f"batch and max_frames must be >= 1, got {self.batch} and {self.max_frames}")


def run_line(line: Line, observers: Sequence[LineObserver] = (), settings: Optional[RunSettings] = None, *,
             stop: Optional[threading.Event] = None, status: Callable[[str], None] = print,
             detectors: Optional[Mapping[str, Detector]] = None, sources: Optional[Mapping[str, Source]] = None,
             policies: Optional[Mapping[str, AlarmPolicy]] = None, slots=None, **run_settings) -> dict:
    """Score every camera of ``line`` until all sources end, each reached ``settings.max_frames`` (per
    camera) or ``stop`` is set; returns the run summary (totals, per-camera figures under "cameras",
    every output's health under "outputs").

    observers: the line's outputs (``mrkd.runtime.outputs.build_outputs``) and any other LineObserver,
    called on this thread in this order; each is told ``on_stop`` at the end (they flush there).
    settings: RunSettings, or its fields as keywords (``max_frames=10``). detectors / sources: already
    opened ones (keyed by resolved model path / camera name); the sources are closed at the end, the
    detectors are the caller's. policies: camera name -> an AlarmPolicy to use instead of one built
    from the camera's settings. slots: a runtime/line/swap.py ModelSlots over ``detectors`` (hot swap;
    also pass it among the observers, it keeps the frames a new model is checked on).
    """
    settings = dataclasses.replace(settings or RunSettings(), **run_settings)
    observers = list(observers)
    stop = stop or threading.Event()
    max_frames, batch, stale_after_s = settings.max_frames, settings.batch, settings.stale_after_s
    own_detectors = detectors is None
    cond = threading.Condition()
    states: List[_CameraState] = []
    sources = dict(sources) if sources is not None else None
    try:
        detectors = dict(detectors) if detectors is not None else open_detectors(line)
        if sources is None:
            sources = open_sources(line, stop=stop)
        camera_bits = keeps_camera_bits(observers)     # camera bits only for an output that keeps them
        for source in sources.values():
            source.keep_camera_bits(camera_bits)
        for camera in line.cameras:
            detector = detectors[str(Path(camera.model).resolve())]
            mask = camera_mask(camera)
            for problem in calibration_mismatches(camera, detector, mask):    # before the first decision
                logger.warning("camera %r: %s", camera.name, problem)
            policy = (policies or {}).get(camera.name) or camera.alarm.policy(detector.threshold)
            threshold = policy.threshold
            source = sources[camera.name]
            feed = _Feed(camera.name, source, cond, capacity=max(2, 2 * batch) if not source.live else 1,
                         max_frames=max_frames)
            info = CameraInfo(name=camera.name, source=redact_uri(getattr(source, "uri", camera.source)),
                              model=str(camera.model), model_sha256=detector.model_sha256,
                              backend=detector.backend.name, precision=detector.precision,
                              threshold=float(threshold), threshold_source=_threshold_source(camera, detector),
                              ignore_mask=mask.short() if mask is not None else "",
                              map_geometry=MapGeometry.of(detector.metadata))
            states.append(_CameraState(camera, detector, policy, feed, info, mask))
    except BaseException:
        for source in (sources or {}).values():
            source.close()
        if own_detectors:
            for detector in (detectors or {}).values():
                detector.close()
        stop_each(observers)     # the outputs were the caller's to start, ours to stop
        raise
    by_name = {s.camera.name: s for s in states}
    feeds = [s.feed for s in states]
    stats = RunStats(STAGES)
    rounds = scored_calls = 0
    infos = [s.info for s in states]
    alarm_outputs = Notifier("alarm-outputs", max_waiting=ALARMS_WAITING)
    call_each(observers, lambda o: o.see_outputs(observers))   # the whole list: PLC servers, shadow... too
    call_each(observers, lambda o: o.on_start(infos))
    last_status = time.monotonic()
    clock = ClockWatch()      # a step of the wall clock (what events are stamped with) is said, once
    clock.check()
    for state in states:
        state.fps_mark = (last_status, 0)
        state.feed.start()
    try:
        while not stop.is_set() and not all(f.done for f in feeds):
            taken = gather_round(feeds, cond, stop, batch, settings.batch_timeout, stale_after_s)
            clock.check()
            now = time.monotonic()
            for state in states:    # a camera goes down when silent, up again with its next frame
                up = state.camera.name in taken or (not state.feed.done and state.feed.last_arrival is not None
                                                    and now - state.feed.last_arrival <= stale_after_s)
                if up != state.up:
                    state.up = up
                    camera_status = _status_of(state, now, stale_after_s)
                    call_each(observers, lambda o: o.on_status(camera_status))
            if slots is not None:     # runtime/line/swap.py: a reloaded model takes over between rounds
                shown = [s.info for s in states]
                if slots.apply(states):
                    for info in [s.info for s, old in zip(states, shown) if s.info is not old]:
                        call_each(observers, lambda o: o.on_model(info))
            if taken:
                rounds += 1
                scored_calls += _score_round(taken, by_name, stats, observers, settings.cross_camera_batching,
                                             alarm_outputs, stop)
                if any(_asks_to_stop(o) for o in observers):
                    stop.set()
            if settings.status_every and time.monotonic() - last_status >= settings.status_every:
                last_status = time.monotonic()
                statuses = [_status_of(s, last_status, stale_after_s) for s in states]
                for camera_status in statuses:
                    call_each(observers, lambda o: o.on_status(camera_status))
                status(_status_line(statuses, stats, observers))
    finally:
        close_feeds(feeds)
        alarm_outputs.release_room()
        alarm_outputs.close(ALARM_OUTPUTS_DRAIN_S)   # every alarm reaches the outputs before they stop
        stop_each(observers)     # every event is out of the loop: flush and release
        if own_detectors:
            for detector in detectors.values():
                detector.close()
    cameras = {}
    for state in states:
        cameras[state.camera.name] = {
            "source": source_summary(state.feed.source) | {"dropped": state.feed.source.stats.dropped
                                                           + state.feed.dropped},
            "frames": state.frames, "unjudged": state.feed.unjudged, "alarms": state.alarms, "up": state.up,
            "alarms_suppressed_by_cooldown": state.policy.suppressed,
            "latency_ms": state.latency.percentiles_ms(), "threshold": state.info.threshold,
            "model": state.info.model, "model_sha256": state.info.model_sha256, "source_failed": state.feed.failure,
            "ignore_mask": state.mask.summary() if state.mask is not None else None}
    return stats.summary({"cameras": cameras, "events": stats.alarms, "outputs": outputs_summary(observers),
                          "failed_cameras": [s.camera.name for s in states if s.feed.failure],
                          "detector_calls": scored_calls, "rounds": rounds,
                          "frames_per_call": stats.frames / scored_calls if scored_calls else 0.0,
                          "stopped_early": stop.is_set(), "outputs_given_up": alarm_outputs.given_up})


def source_summary(source: Source) -> dict:
    """A camera's source in the run's summary: its counters, and its last error where it has one (why a
    camera shows 0 frames: "not opened: the run stopped while it started", "camera lost (...)")."""
    stats = source.stats
    return stats.as_dict() | ({"last_error": stats.last_error} if stats.last_error else {})


def outputs_summary(observers: Sequence[LineObserver]) -> Dict[str, dict]:
    """Every output's health by name (the summary's "outputs"): state, sent, failed, dropped, last error."""
    found: list = []
    call_each(observers, lambda o: found.append(o.health()))
    return {h.name: dataclasses.asdict(h) for h in found if h is not None}


def _asks_to_stop(observer: LineObserver) -> bool:
    try:
        return bool(observer.stop_requested())
    except Exception:
        return False


def _score_round(taken: Dict[str, List[_Arrived]], by_name: Dict[str, _CameraState], stats: RunStats,
                 observers: Sequence[LineObserver], batched: bool, alarm_outputs: Notifier,
                 stop: Optional[threading.Event] = None) -> int:
    """Score one round (one detector call per model, or per camera when not ``batched``); then per
    frame in camera order: the policy's decision, for an alarm its event handed to ``alarm_outputs``
    (``_deliver_alarm``), and every output's ``on_frame``. Returns the number of detector calls."""
    groups: Dict[object, List[Tuple[_CameraState, _Arrived]]] = {}
    for name, arrived in taken.items():
        state = by_name[name]
        key = id(state.detector) if batched else name
        groups.setdefault(key, []).extend((state, a) for a in arrived)
    for members in groups.values():
        detector = members[0][0].detector
        result = detector([a.frame.image for _, a in members])
        stats.add_frames(len(members), result.timings)
        done = time.monotonic()
        infer_share = result.timings.get("infer", 0.0) / len(members)
        for i, (state, arrived) in enumerate(members):
            frame = arrived.frame
            try:
                amap, score = masked(state.mask, result.maps[i], float(result.scores[i]), frame.image.shape[:2],
                                     detector.metadata)
            except IgnoreMaskError as exc:     # its frames are not the mask's size: nothing it judges is right
                raise LineError(f"camera {state.camera.name!r}: {exc}") from None
            latency = done - arrived.arrival
            state.frames += 1
            state.latency.add(latency)
            # a frame stamped with the wall clock counts its cooldown on the monotonic clock (its arrival):
            # a wall clock set back an hour would hold every alarm back for that hour
            clock = arrived.arrival if state.feed.source.stamps_wall_clock else frame.timestamp
            decision = state.policy.decide(frame.index, frame.timestamp, score, clock)
            scored = FrameResult(
                camera=state.camera.name, frame_index=frame.index, frame_time=frame.timestamp, image=frame.image,
                amap=amap, score=score, threshold=state.policy.threshold, anomalous=decision.anomalous,
                infer_s=infer_share, latency_s=latency, model_sha256=state.info.model_sha256, raw=frame.raw,
                backend=state.info.backend, precision=state.info.precision, ignore_mask=state.mask)
            if decision.alarm is not None:
                state.alarms += 1
                stats.alarms += 1
                alarm = decision.alarm
                event = make_event(alarm, state.info.source, regions_from_map(amap, alarm.threshold, frame.image.shape[:2]),
                                   None, state.camera.name)     # its id and time from one clock reading
                # the model that judged it and what it ran on (a hot swap changes them), and the mask its score
                # was taken under (an auditor asks whether a place was judged at all)
                event.update(model_sha256=scored.model_sha256, backend=scored.backend, precision=scored.precision,
                             ignore_mask_sha256=state.mask.sha256 if state.mask is not None else None)
                scored = dataclasses.replace(scored, event=event)
                alarm_outputs.put(functools.partial(_deliver_alarm, observers, scored, alarm_outputs))
            call_each(observers, lambda o: o.on_frame(scored))
            # The outputs far behind (a stalled disk): the frames their alarms hold are bounded. A stop is
            # noticed meanwhile; the stop's drain then gives up what a stalled output cannot take (counted).
            while scored.event is not None and not alarm_outputs.wait_for_room(0.25):
                if stop is not None and stop.is_set():
                    break
    return len(groups)


def _deliver_alarm(observers: Sequence[LineObserver], scored: FrameResult, alarm_outputs: Notifier) -> None:
    """(The alarm notifier's thread.) Every output adds to the event first (``event_fields``: the
    snapshot and the evidence, written before they are named), then every output gets it
    (``on_event``). None once the notifier is closed: past the stop's deadline their on_stop runs."""
    event = scored.event

    def each(call: Callable[[LineObserver], object]) -> None:
        call_each(observers, lambda o: None if alarm_outputs.closed else call(o))
    each(lambda o: event.update(o.event_fields(scored)))
    each(lambda o: o.on_event(scored.camera, event))


def iter_frames(source: Source, max_frames: Optional[int] = None, batch: int = 1) -> Iterator[List[Frame]]:
    """Frames of one source in lists of up to ``batch``, read on its own thread like a line camera
    (runtime calibration scores them); closes the source at the end."""
    cond, stop = threading.Condition(), threading.Event()
    feed = _Feed(DEFAULT_CAMERA, source, cond, capacity=max(2, 2 * batch) if not source.live else 1,
                 max_frames=max_frames)
    feed.start()
    try:
        while not feed.done:
            taken = gather_round([feed], cond, stop, batch, 0.0, float("inf"))
            if taken:
                yield [a.frame for a in taken[feed.name]]
    finally:
        feed.close()
