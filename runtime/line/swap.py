"""Hot swap: a running line takes a new model without stopping.

``ModelSlots`` holds the Detector each model path of the line serves. A reload request (SIGHUP, an
authenticated HTTP request, a recipe change) starts a loader thread that, beside the running model:

1. opens the model file at the SAME path again (a new version is moved there atomically, sidecar
   first or together): the Detector's own checks run (sidecar against the file's sha256, inputs and
   outputs against the metadata), so a half-written or foreign file is refused, and so is one without
   a sidecar where the running model was read with one (the embedded metadata would drop a threshold set
   on the line); the same file with a new calibration in its sidecar (`mrkd calibrate model.onnx`) is
   taken for its new threshold;
2. refuses a model the line cannot take in place: another image size, backbone or input format;
   a file that changed while it was read (its sha256 before and after differ);
3. scores the last few frames the running model judged (kept by ``on_frame``; right after a swap,
   the frames the running model was checked on, with its scores): scores must be finite and maps of
   the model's size; the score correlation with the running model's scores is reported.

Only then is the new Detector staged. The frame loop calls ``apply(states)`` between rounds: every
camera of that path gets the new Detector, its model hash (events name ``model_sha256``) and, when
the camera's threshold is the model's, the new calibrated threshold; the old Detector is closed after
the swap. So no frame is judged by a half-loaded model and no frame is skipped: frames that arrive
while the new model loads are scored by the old one. A refused model leaves the old one running and
says why in one line (``status``) and in ``report()``. The file at the path decides: a reload that finds
the running model there again (a roll-back) or refuses the file drops a version an earlier reload
staged and no round applied yet.

The part runner (runtime/line/parts.py) uses the same slots: it adds its recipes' models (``add``),
records each judged image (``note``), looks the detector and hash up by path for every part and
calls ``apply()`` (no camera states: it reads ``detectors`` and ``sha256_of``) between parts.

Torch-free, like the rest of the runtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Deque, Dict, Iterator, List, Mapping, MutableMapping, Optional, Sequence, Tuple

import numpy as np

from mrkd.errors import MrkdError
from mrkd.runtime.ignore_mask import MapGeometry
from mrkd.runtime.metadata import sidecar_path
from mrkd.runtime.outputs.base import FrameResult, LineObserver

logger = logging.getLogger(__name__)

CHECK_FRAMES = 3              # frames of each model path the candidate must score before the swap
# A camera with its own threshold (line file or --threshold) keeps that number through a swap; it only
# means the same thing if the new version scores on the running one's scale. Past this ratio between
# their calibrated thresholds (or their median scores on the same frames), the number would be on
# another scale (another score kind: 1 - cos against memory-bank distances), alarms could fall silent.
FIXED_THRESHOLD_SCALE = 2.0
COMPATIBLE_FIELDS = ("image_size", "backbone", "input_format")


def on_one_scale(ratio: float) -> bool:
    """Whether two thresholds (or score levels) ``ratio`` apart are on one scale (nan: not)."""
    return 1.0 / FIXED_THRESHOLD_SCALE <= ratio <= FIXED_THRESHOLD_SCALE


class SwapRefused(MrkdError, ValueError):
    """A new model that cannot replace the running one; the message names the file and the reason."""


@dataclass(frozen=True)
class SwapRecord:
    """One reload request's outcome for one model path."""

    model: str
    reason: str                      # what asked: "SIGHUP", "http", ...
    outcome: str                     # "swapped" | "refused" | "unchanged" | "not applied" ("staged": outcomes_of)
    old_sha256: str
    new_sha256: Optional[str]
    detail: str = ""
    load_s: float = 0.0
    at: float = 0.0                  # wall clock of the outcome (the swap itself for "swapped")
    frames_before: int = 0           # frames (part images) the replaced version judged (since it went in)


@dataclass
class _Staged:
    """A loaded and checked version waiting for the loop to swap it in."""
    detector: object
    sha256: str
    load_s: float
    detail: str                      # the check's outcome
    reason: str                      # what asked for the reload
    checked: List[Tuple[np.ndarray, float]]   # the frames it was checked on, with its scores
    outcome: "_RoundStaged"          # its load round's answer about it (the round: outcome.load_round)


@dataclass
class _RoundStaged:
    """A load round's outcome "staged" for one path, as the round left it: its answer (outcomes_of) even
    after a later round replaced or dropped the version before the loop took it."""
    load_round: int
    record: SwapRecord
    superseded_by: Optional[str] = None      # the reason of the later reload that replaced or dropped it


ROUNDS_STAGED_KEPT = 64            # staged outcomes kept for outcomes_of (a request asks right after its round)


@dataclass
class _Slot:
    path: str                        # the model path as the line gives it
    detector: object
    sha256: str
    recent: Deque[Tuple[np.ndarray, float]]   # (frame, running model's score)
    frames: int = 0
    pending: Optional[_Staged] = None


class ModelSlots(LineObserver):
    """The line's detectors by resolved model path, replaceable between rounds of the frame loop.

    detectors: the dict the caller opened (resolved path -> Detector); it is updated in place on a
    swap, so whoever closes those detectors at the end closes the current ones. opener(path):
    opens a Detector with the line's backend settings.
    """

    def __init__(self, detectors: MutableMapping[str, object], opener: Callable[[str], object],
                 status: Callable[[str], None] = logger.warning, check_frames: int = CHECK_FRAMES,
                 fixed_thresholds: Optional[Mapping[str, Sequence[Tuple[str, float]]]] = None):
        self.detectors = detectors
        # resolved model path -> (camera, threshold) of the cameras that judge it by their own threshold
        self._fixed = {key: tuple(cameras) for key, cameras in (fixed_thresholds or {}).items() if cameras}
        self._opener, self._status = opener, status
        self._check_frames_kept = max(1, check_frames)
        self._lock = threading.Lock()
        self._slots: Dict[str, _Slot] = {}
        for key, detector in detectors.items():
            self._slots[key] = self._new_slot(detector)
        self._camera_key: Dict[str, str] = {}
        self._loader: Optional[threading.Thread] = None
        self._again: Optional[str] = None
        self.records: List[SwapRecord] = []
        # the load round of each record: a round loads every path once; the requests that come while one
        # runs share the next, so one request's outcomes are its round's records, not whatever else landed
        self._record_rounds: List[int] = []
        self._round = 0                  # rounds started
        self._round_staged: List[_RoundStaged] = []
        self._waiters = threading.Condition(self._lock)
        self._watchers: List[Callable[[SwapRecord], None]] = []

    def _new_slot(self, detector) -> _Slot:
        return _Slot(str(detector.model_path), detector, detector.model_sha256,
                     deque(maxlen=self._check_frames_kept))

    def add(self, key: str, detector) -> None:
        """Serve one more model path (a recipe's model the part runner opened): it goes into
        ``detectors`` and is loaded again with the others on every reload. Before the line runs."""
        with self._lock:
            if key in self._slots:
                return
            self.detectors[key] = detector
            self._slots[key] = self._new_slot(detector)

    def watch(self, swapped: Callable[[SwapRecord], None]) -> None:
        """``swapped(record)`` after every swap, on the thread that applies it (the frame loop between
        rounds, the part runner between parts): the thread that hands the next frames on, so whatever it
        starts again (a shadow run's comparison) starts before the new version's first frame."""
        if swapped not in self._watchers:
            self._watchers.append(swapped)

    # ------------------------------------------------------------ requests (any thread)
    def request_reload(self, reason: str = "request") -> bool:
        """Load every model path again in the background; True when a load starts now (False: one is
        running, this request follows it). Safe from a signal handler (no I/O here)."""
        return self._request(reason)[1]

    def request_reload_round(self, reason: str = "request") -> int:
        """request_reload, returning the number of the load round that serves this request (the one
        started now, or the one after the running round): outcomes_of(round) is its answer. A round
        that was already loading when the request came may have read the file before the new version
        moved in, so it does not answer it."""
        return self._request(reason)[0]

    def _request(self, reason: str) -> Tuple[int, bool]:
        with self._lock:
            if self._loader is not None and self._loader.is_alive():
                self._again = reason
                return self._round + 1, False
            self._round += 1
            self._loader = threading.Thread(target=self._load_all, args=(reason, self._round), name="model-reload",
                                            daemon=True)
            self._loader.start()
            return self._round, True

    def outcomes_of(self, load_round: int) -> List[dict]:
        """The records of one load round, then the versions it staged that the loop has not swapped in
        (outcome "staged"; one a later round replaced or dropped since says so): a reload request's own
        answer."""
        with self._lock:
            done = [dataclasses.asdict(r) for r, n in zip(self.records, self._record_rounds) if n == load_round]
            swapped = {r["model"] for r in done if r["outcome"] == "swapped"}
            waiting = {id(slot.pending.outcome): slot for slot in self._slots.values() if slot.pending is not None}
            staged = []
            for entry in self._round_staged:
                if entry.load_round != load_round or entry.record.model in swapped:
                    continue
                record = entry.record
                if entry.superseded_by is not None:
                    record = dataclasses.replace(record, detail=record.detail + (
                        f"; a later reload ({entry.superseded_by}) replaced or dropped this version before the "
                        f"loop swapped it in"))
                elif id(entry) in waiting:        # still waiting: the frames its running model judged so far
                    record = dataclasses.replace(record, frames_before=waiting[id(entry)].frames, at=time.time())
                staged.append(dataclasses.asdict(record))
        return done + staged

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no load runs (tests, the HTTP endpoint's reply)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                loader = self._loader
            if loader is None or not loader.is_alive():
                return True
            if time.monotonic() > deadline:
                return False
            loader.join(min(0.05, max(0.0, deadline - time.monotonic())))

    def _load_all(self, reason: str, load_round: int) -> None:
        while True:
            for key in list(self._slots):
                self._load_one(key, reason, load_round)
            with self._lock:
                reason, self._again = self._again, None
                if reason is None:
                    # decided under the lock: a request from here on starts a new loader (this thread
                    # lives on a moment; one seeing it alive would leave its request to it, unserved)
                    self._loader = None
                    return
                self._round += 1
                load_round = self._round

    def _load_one(self, key: str, reason: str, load_round: int = 0) -> None:
        slot = self._slots[key]
        started = time.perf_counter()
        path = Path(slot.path)
        new_detector, new_sha = None, None
        try:
            with_sidecar = getattr(slot.detector, "sidecar", None) is not None
            if with_sidecar and not sidecar_path(path).exists():
                raise _no_sidecar(path)       # said before the Detector warns that it reads the embedded metadata
            try:     # the Detector refuses a file that changed while it was read (its hash before and after)
                new_detector = self._opener(slot.path)
            except (OSError, ValueError, MrkdError, RuntimeError) as exc:   # half-written, foreign, missing
                raise SwapRefused(f"{path}: cannot be loaded ({_one_line(exc)})") from exc
            new_sha = new_detector.model_sha256
            if with_sidecar and getattr(new_detector, "sidecar", None) is None:    # it went while the file loaded
                raise _no_sidecar(path)
            # `mrkd calibrate model.onnx` rewrites only the sidecar: a new threshold in the same model file is
            # a model to take too (same hash, new calibration), not "unchanged".
            if new_sha == slot.sha256 and new_detector.metadata.calibration == slot.detector.metadata.calibration:
                new_detector.close()
                self._record(SwapRecord(slot.path, reason, "unchanged", slot.sha256, new_sha,
                                        "the file is the running model" + self._drop_pending(slot, reason),
                                        time.perf_counter() - started, time.time()), load_round)
                return
            old_meta, new_meta = slot.detector.metadata, new_detector.metadata
            for name in COMPATIBLE_FIELDS:
                if getattr(old_meta, name) != getattr(new_meta, name):
                    raise SwapRefused(f"{path}: {name} {getattr(new_meta, name)!r} differs from the running model's "
                                      f"{getattr(old_meta, name)!r}; restart the line for such a model")
            if new_detector.threshold is None:
                raise SwapRefused(f"{path}: has no calibrated threshold; the running model's alarms need one")
            detail, checked, old_scores = self._check_frames(slot, new_detector)
            detail += _threshold_note(slot.detector, new_detector)
            detail += self._check_fixed_thresholds(key, slot, new_detector, old_scores, [s for _, s in checked])
            detail += _runs_note(slot.detector, new_detector)
        except SwapRefused as exc:
            if new_detector is not None:
                new_detector.close()
            self._record(SwapRecord(slot.path, reason, "refused", slot.sha256, new_sha,
                                    str(exc) + self._drop_pending(slot, reason), time.perf_counter() - started,
                                    time.time()),
                         load_round)
            return
        load_s = time.perf_counter() - started
        outcome = _RoundStaged(load_round, SwapRecord(slot.path, reason, "staged", slot.sha256, new_sha, detail,
                                                      load_s, time.time(), slot.frames))
        with self._lock:
            if slot.pending is not None:          # a newer load replaces one not applied yet
                slot.pending.detector.close()
                slot.pending.outcome.superseded_by = reason
            slot.pending = _Staged(new_detector, new_sha, load_s, detail, reason, checked, outcome)
            self._round_staged.append(outcome)
            del self._round_staged[:-ROUNDS_STAGED_KEPT]

    def _drop_pending(self, slot: _Slot, by: str) -> str:
        """Forget a version staged by an earlier load that no round has applied yet: the file at the path
        is now the running model again (a roll-back) or one refused, so that version is no longer the
        one to run (a triggered line applies between parts, which may be minutes apart). The text
        added to the record's detail ("" when nothing was staged); ``by``: the reason of the reload that
        drops it (its own round's answer says so)."""
        with self._lock:
            pending, slot.pending = slot.pending, None
            if pending is not None:
                pending.outcome.superseded_by = by
        if pending is None:
            return ""
        pending.detector.close()
        return (f"; the version {pending.sha256[:12]} staged by the earlier reload ({pending.reason}) is dropped, "
                f"not swapped in")

    def _check_frames(self, slot: _Slot, detector) -> Tuple[str, List[Tuple[np.ndarray, float]], List[float]]:
        """The check's outcome, the frames it scored with the new model's scores (they check the
        version after it: a second swap right after a swap is checked too, not taken unchecked), and
        the running model's scores of those frames."""
        with self._lock:
            recent = list(slot.recent)
        if not recent:
            return "no frame seen yet to check it on", [], []
        frames = [frame for frame, _ in recent]
        try:
            result = detector(frames)
        except Exception as exc:   # noqa: BLE001 - any failure to score is a refusal
            raise SwapRefused(f"{slot.path}: the new model failed on {len(frames)} recent frame(s) "
                              f"({_one_line(exc)})") from exc
        size = detector.metadata.image_size
        if len(result.scores) != len(frames) or not np.isfinite(result.scores).all() \
                or tuple(result.maps.shape[1:]) != (size, size) or not np.isfinite(result.maps).all():
            raise SwapRefused(f"{slot.path}: the new model's scores or maps on {len(frames)} recent frame(s) are "
                              f"not finite or not {size}x{size}")
        old = np.array([score for _, score in recent], dtype=np.float64)
        new = result.scores.astype(np.float64)
        corr = float(np.corrcoef(old, new)[0, 1]) if len(old) > 1 and old.std() > 0 and new.std() > 0 else math.nan
        return (f"checked on {len(frames)} recent frame(s): scores old {_fmt(old)} new {_fmt(new)}"
                + ("" if math.isnan(corr) else f", correlation {corr:.3f}")), list(zip(frames, map(float, new))), \
            [float(v) for v in old]

    def _check_fixed_thresholds(self, key: str, slot: _Slot, detector, old_scores: List[float],
                                new_scores: List[float]) -> str:
        """Refuse a version whose scores are on another scale than the running one's when a camera keeps
        its own threshold through the swap (it would judge the new scores by the old scale's number);
        else the text the record adds, naming the kept thresholds."""
        fixed = self._fixed.get(key)
        if not fixed:
            return ""
        old_cal, new_cal = slot.detector.threshold, detector.threshold
        if old_cal is not None and old_cal > 0 and new_cal > 0:
            ratio, basis = new_cal / old_cal, f"calibrated threshold {new_cal:.4g} against the running model's {old_cal:.4g}"
        elif old_scores and np.median(old_scores) > 0:
            new_median, old_median = float(np.median(new_scores)), float(np.median(old_scores))
            ratio, basis = new_median / old_median, f"median score {new_median:.4g} against the running model's {old_median:.4g} on the same frames"
        else:
            ratio, basis = math.nan, "no calibrated threshold of the running model and no frame to compare on"
        cameras = ", ".join(f"{name} ({threshold:g})" for name, threshold in fixed)
        if not on_one_scale(ratio):    # nan included
            raise SwapRefused(f"{slot.path}: camera(s) {cameras} judge by their own threshold, and the new model "
                              f"scores on another scale ({basis}); set their threshold for the new model (line "
                              f"file or --threshold) and restart, or drop it to use the model's")
        return f"; camera(s) {cameras} keep their own threshold (the new model's {basis})"

    def _record(self, record: SwapRecord, load_round: int = 0) -> None:
        with self._lock:
            self.records.append(record)
            self._record_rounds.append(load_round)
        if record.outcome == "refused":
            self._status(f"model reload ({record.reason}) REFUSED, the running model {record.old_sha256[:12]} "
                         f"goes on: {record.detail}")
        else:
            self._status(f"model reload ({record.reason}) of {record.model}: {record.outcome} "
                         f"({record.new_sha256[:12] if record.new_sha256 else '?'}; {record.detail})")

    # ------------------------------------------------------------ the loop thread
    def __contains__(self, key: str) -> bool:
        return key in self._slots

    def sha256_of(self, key: str) -> str:
        return self._slots[key].sha256

    def on_frame(self, result: FrameResult) -> None:
        key = self._camera_key.get(result.camera)
        if key is not None:
            self.note(key, result.image, result.score)

    def note(self, key: str, image: np.ndarray, score: float) -> None:
        """The running model of ``key`` judged ``image`` (score ``score``): counted, and kept among
        the recent frames a new version is checked on."""
        slot = self._slots[key]
        with self._lock:
            slot.frames += 1
            slot.recent.append((image, float(score)))

    def apply(self, states: Sequence = ()) -> List[SwapRecord]:
        """Between rounds (loop thread): put staged detectors in place for every camera state of their
        path (``state.detector``, ``state.info``, and ``state.policy.threshold`` when the camera uses
        the model's threshold; the policy's debounce window starts again). The part runner gives no states: it looks ``detectors`` and
        ``sha256_of`` up per part. Returns the swaps done."""
        if not self._camera_key:
            for state in states:
                self._camera_key[state.camera.name] = str(Path(state.camera.model).resolve())
        with self._lock:
            ready = [(key, slot, slot.pending) for key, slot in self._slots.items() if slot.pending is not None]
            for _, slot, _ in ready:
                slot.pending = None
        done = []
        for key, slot, staged in ready:
            detector, sha = staged.detector, staged.sha256
            old, old_sha = slot.detector, slot.sha256
            for state in states:
                if self._camera_key.get(state.camera.name) != key:
                    continue
                state.detector = detector
                state.policy.restart_window()      # the next alarm counts only frames the new model judged
                own = state.camera.threshold is None
                if own:
                    state.policy.threshold = float(detector.threshold)
                state.info = dataclasses.replace(
                    state.info, model_sha256=sha, backend=detector.backend.name,
                    precision=getattr(detector, "precision", state.info.precision),
                    threshold=float(state.policy.threshold),
                    threshold_source=detector.threshold_source if own else state.info.threshold_source,
                    map_geometry=MapGeometry.of(detector.metadata))
            slot.detector, slot.sha256 = detector, sha
            self.detectors[key] = detector
            with self._lock:        # the frames it was checked on, with its own scores, until new ones come
                slot.recent.clear()
                slot.recent.extend(staged.checked)
                judged, slot.frames = slot.frames, 0     # the replaced version's own count
            record = SwapRecord(slot.path, staged.reason, "swapped", old_sha, sha, staged.detail, staged.load_s,
                                time.time(), judged)
            self._record(record, staged.outcome.load_round)
            done.append(record)
            old.close()
            for swapped in self._watchers:
                try:
                    swapped(record)
                except Exception:    # noqa: BLE001 - a watcher must not stop the line
                    logger.exception("a watcher of the model swap failed")
        return done

    def drop_unapplied(self) -> List[SwapRecord]:
        """At the stop (no load running: wait_idle): the versions a reload staged that no round or part took
        before the line stopped (a SIGHUP while the run finished) are closed and said, outcome "not
        applied", so the request gets an answer: the run ends with the model it started with."""
        with self._lock:
            dropped = [(slot, slot.pending) for slot in self._slots.values() if slot.pending is not None]
            for slot, _ in dropped:
                slot.pending = None
        records = []
        for slot, staged in dropped:
            staged.detector.close()
            record = SwapRecord(slot.path, staged.reason, "not applied", slot.sha256, staged.sha256,
                                "the run stopped before a frame or part took this version; the model is not "
                                "reloaded", staged.load_s, time.time(), slot.frames)
            self._record(record, staged.outcome.load_round)
            records.append(record)
        return records

    def open(self, path: str):
        """A Detector for ``path`` opened with the line's settings (a shadow candidate)."""
        return self._opener(path)

    def staged(self) -> List[str]:
        """Model paths whose new version waits for the loop's next round."""
        with self._lock:
            return [slot.path for slot in self._slots.values() if slot.pending is not None]

    def report(self) -> List[dict]:
        with self._lock:
            return [dataclasses.asdict(r) for r in self.records]



def _no_sidecar(path: Path) -> SwapRefused:
    """A version without its sidecar where the running model was read with one: the graph's embedded
    metadata has the export's threshold, not one set on the line, and no hash to check the file against;
    the sidecar is on its way (or moved away), not gone for good."""
    return SwapRefused(f"{path}: no sidecar {sidecar_path(path).name} beside it, where the running model was read "
                       f"with one (its threshold, perhaps set on the line by mrkd calibrate); move the new "
                       f"version's sidecar in first, then reload")


def _runs_on(detector) -> str:
    """"openvino bf16", "onnxruntime int8", ...: the backend and the precision a Detector runs at."""
    return f"{getattr(getattr(detector, 'backend', None), 'name', '?')} {getattr(detector, 'precision', '?')}"


def _threshold_note(old, new) -> str:
    """What the swap's record adds when the new version's threshold is another number (a refit sets it
    again): the cameras that judge by the model's threshold judge by it from the swap on."""
    if old.threshold is None or new.threshold is None or float(old.threshold) == float(new.threshold):
        return ""
    return f"; threshold {float(old.threshold):.6g} -> {float(new.threshold):.6g}"


def _runs_note(running, new) -> str:
    """What a new version runs on, and what the running one ran on where that differs: a version may change
    the precision (an INT8 graph; under --backend auto, bf16 comes and goes with its check and threshold)."""
    runs, ran = _runs_on(new), _runs_on(running)
    return f"; runs {runs}" + ("" if runs == ran else f" (the running model: {ran})")


def _fmt(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _one_line(exc: BaseException) -> str:
    return " | ".join(part.strip() for part in str(exc).splitlines() if part.strip()) or type(exc).__name__


def line_slots(line, detectors: MutableMapping[str, object],
               status: Callable[[str], None] = logger.warning) -> ModelSlots:
    """ModelSlots over the line's opened detectors, reopening a path with the line's backend settings."""
    from mrkd.runtime.line.loop import line_detector

    def opener(path: str):
        return line_detector(line, path)
    fixed: Dict[str, List[Tuple[str, float]]] = {}
    for camera in line.cameras:          # recipes' models are judged by their own thresholds (parts.py)
        if camera.alarm.threshold is not None:
            fixed.setdefault(str(Path(camera.model).resolve()), []).append((camera.name, float(camera.alarm.threshold)))
    return ModelSlots(detectors, opener, status, fixed_thresholds=fixed)


class HangupSeen:
    """Whether a SIGHUP came (``hangups_held``). Set by a signal handler, so without a lock: the handler
    runs on the main thread between any two of its steps, maybe while that thread holds the very lock
    (threading.Event.set takes its condition's lock)."""

    def __init__(self) -> None:
        self._seen = False

    def set(self) -> None:
        self._seen = True

    def clear(self) -> None:
        self._seen = False

    def is_set(self) -> bool:
        return self._seen


@contextlib.contextmanager
def hangups_held() -> Iterator[Optional[HangupSeen]]:
    """While inside (until the line can reload, ``reload_on_sighup``), a SIGHUP is kept instead of ending
    the process (its default action): a deployment that moves a new model in and signals while the line
    is still loading its models must not stop the line. Yields what a SIGHUP sets; None off the main
    thread or without SIGHUP."""
    if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
        yield None
        return
    seen = HangupSeen()
    previous = signal.signal(signal.SIGHUP, lambda _signum, _frame: seen.set())
    try:
        yield seen
    finally:
        signal.signal(signal.SIGHUP, previous)


def ignore_hangups_from_now() -> None:
    """A SIGHUP once the run's handlers are gone (the detectors closing, the exit) would end the process by
    its default action after the summary was written, exit status -1 (killed): the run is over, so it is
    ignored instead. Main thread only; a caller that set its own handler keeps it."""
    if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


@contextlib.contextmanager
def reload_on_sighup(slots: ModelSlots, also: Sequence[Callable[[str], None]] = (),
                     held: Optional[HangupSeen] = None):
    """While inside (main thread only), SIGHUP asks ``slots`` to load every model path again, and each
    of ``also`` (a reload request that returns at once, e.g. the page's certificate) to do its part.
    ``held``: set by a SIGHUP that came while the line was starting (``hangups_held``): answered now,
    since the models may have been opened before the new version was moved in, and cleared; its handler
    is back after the block, so once set again it tells of a SIGHUP that came as the run stopped, which
    nothing answers (the caller says so).

    The handler only writes a byte to a pipe; a thread of its own reads it and asks. The handler runs on
    the main thread, which runs the frame loop: asking from there took the slots' lock, and a signal that
    landed while the loop held it (after every frame) waited for it forever (the run hung, SIGTERM too)."""
    if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
        yield slots
        return

    def ask(reason: str) -> None:
        slots.request_reload(reason)
        for request in also:
            request(reason)
    readable, writable = os.pipe()
    os.set_blocking(writable, False)

    def on_sighup(_signum, _frame) -> None:
        try:
            os.write(writable, b"H")
        except OSError:      # the pipe is full: reloads are asked for already, and one follows the last
            pass

    def answer() -> None:
        while os.read(readable, 4096):       # b"": the write end closed, the line has stopped
            ask("SIGHUP")
    answering = threading.Thread(target=answer, name="sighup", daemon=True)
    answering.start()
    previous = signal.getsignal(signal.SIGHUP)
    signal.signal(signal.SIGHUP, on_sighup)
    if held is not None and held.is_set():
        held.clear()       # from here this handler, not held's, takes SIGHUPs: no signal falls between
        ask("SIGHUP during start-up")
    try:
        yield slots
    finally:
        signal.signal(signal.SIGHUP, previous)
        os.close(writable)
        answering.join(10)
        if not answering.is_alive():
            os.close(readable)
