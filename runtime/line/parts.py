"""The part runner: a line judged per part on trigger (``mrkd run ... --trigger software|hardware``).

One trigger -> the image(s) of each camera of the part (a GigE camera triggered by mrkd or by the
line's I/O; a folder or video gives its next frame, so a cell can be commissioned without a camera)
-> scored by the Detector of the part's recipe -> one ``PartResult`` -> every observer's ``on_part``,
in trigger order. ``PartRunner`` is the ``TriggerTarget`` every trigger source calls.

Triggers wait in a bounded queue while a part is judged; past the bound a trigger is refused and
counted as missed (``on_trigger`` says so). A part is never answered with another part's images:
a software-triggered camera's images from before the trigger are discarded (counted), and a part
whose camera gives no image in time, an incomplete buffer (lost packets) or is down is ERROR, never
OK. The PLC servers are told of a trigger or a part on the spot (the trigger caller's thread for
``on_trigger``, the runner's otherwise); every other output through one ``Notifier``
(runtime/outputs/notifier.py): its hooks run one at a time, in the order of events, on the notifier's
thread. So a slow disk under the parts or events log, the snapshots or the evidence never delays a
PLC's trigger or the OK/NG it waits for; the PLC gets a part without its snapshot and evidence paths
(those files are written on the notifier's thread, before the other outputs send the record).

Hot swap and shadow runs work as in the frame loop: the detectors are a runtime/line/swap.py
``ModelSlots`` (the recipes' models among them, so SIGHUP / POST /reload load those again too); the
runner applies a staged model only between parts, so a part is judged by one model from its first
image to its verdict and its ``model_sha256`` names that model (the running one's hash, never the
file's current one: a refused file at the path changes nothing). A ``shadows`` candidate
(runtime/line/shadow.py) gets every image the live model judged, with the live score and decision.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

from mrkd.errors import MrkdError
from mrkd.runtime.clock_steps import ClockWatch
from mrkd.runtime.detector import Detector
from mrkd.runtime.ignore_mask import IgnoreMask, IgnoreMaskError, MapGeometry, load_ignore_mask, masked
from mrkd.runtime.line.alarms import is_anomalous
from mrkd.runtime.line.handover import MissedTriggers, StatusReport, Tell
from mrkd.runtime.line.loop import (Line, calibration_mismatches, camera_mask, line_detector, open_detectors,
                                    open_sources, source_summary)
from mrkd.runtime.line.stats import LatencyWindow
from mrkd.runtime.line.swap import ModelSlots, line_slots
from mrkd.runtime.line.trigger import CONTROL_CHARACTERS_REFUSAL, PartSettings, has_control_characters, printable_id
from mrkd.runtime.outputs.base import (CameraInfo, CameraJudgement, CameraStatus, FrameResult, LineObserver,
                                       PartResult, TriggerReceipt, Verdict, call_each, keeps_camera_bits,
                                       plc_and_others, stop_each)
from mrkd.runtime.outputs.events import new_event_id
from mrkd.runtime.outputs.notifier import Notifier
from mrkd.runtime.sources import Frame, Source
from mrkd.runtime.sources.gige import Grab

logger = logging.getLogger(__name__)

# PartResult.error_code: what a PLC reads when the verdict is ERROR (the first camera's reason).
ERROR_CODES = {"timeout": 1, "incomplete buffer": 2, "camera down": 3, "source ended": 4, "line stopped": 5,
               "inference failed": 6, "unusable image": 7, "ambiguous": 8, "late": 9}

# How long the stop waits for the outputs to take every part and trigger handed to them (a parts log on a
# stalled share); past it the rest is given up, counted (summary "outputs_given_up": calls, and
# "outputs_given_up_refused_triggers": the refused triggers their reports stood for, a folded one its
# count) and logged.
OUTPUTS_DRAIN_S = 30.0


class PartError(MrkdError, ValueError):
    """A triggered line that cannot run (no threshold, unknown recipe model, ...); names what."""


def error_code(reason: str) -> int:
    return next((code for prefix, code in ERROR_CODES.items() if reason.startswith(prefix)),
                ERROR_CODES["unusable image"])


def _mask_misfit(mask: Optional[IgnoreMask], frames: Sequence[Frame]) -> Optional[str]:
    """Why a camera's images cannot be judged under the ignore mask of its part's recipe (not the mask's
    size), else None."""
    for frame in frames if mask is not None else ():
        why = mask.misfit(frame.image.shape[:2])
        if why:
            return f"unusable image: {why}"
    return None


def _down_why(grabber) -> str:
    """What a camera that went down is told as: a folder or file that ran out of images is not a fault of
    the camera but of the run's settings, and every later part is ERROR for it."""
    source = getattr(grabber, "source", None)
    if isinstance(grabber, FrameGrabber) and not source.live and source.ended:
        return ("DOWN: its images ran out (a folder or video file, read once without --loop): every later "
                "part is ERROR 'source ended'")
    return "DOWN"


class FrameGrabber:
    """A source without a trigger input (folder, video file, stream, ``ArraySource``): each grab
    takes its next frame(s). A folder in triggered mode is a camera that photographs the next part."""

    def __init__(self, source: Source):
        self.source = source
        self.images = 0

    @property
    def up(self) -> bool:
        return not self.source.ended

    def grab(self, trigger_mono: float, timeout: float, count: int = 1,
             abort: Optional[threading.Event] = None, early: float = 0.0) -> Grab:
        """(``early`` is a hardware trigger's: a frame source has none.) A live source's frame that arrived
        before the trigger (``trigger_mono``, when mrkd heard of it) is not this part's: compared on the
        monotonic clock; on the wall clock, set back an hour between the trigger and its image, every frame
        was "before" it and the part timed out."""
        images: List[Frame] = []
        deadline = time.monotonic() + timeout
        while len(images) < count:
            if abort is not None and abort.is_set():
                return Grab(images, "line stopped")
            # read in short waits so that a stopping line is noticed (``abort``)
            frame = self.source.read(timeout=max(0.0, min(0.25, deadline - time.monotonic())))
            if frame is None:
                if self.source.ended:
                    return Grab(images, "source ended")
                if time.monotonic() >= deadline:
                    return Grab(images, f"timeout: no image within {timeout:g} s")
                continue
            if self.source.live and frame.arrived is not None and frame.arrived < trigger_mono:   # an earlier one
                continue
            if time.monotonic() > deadline:     # a source that blocks (a slow share, a generator): too late
                return Grab(images, f"timeout: no image within {timeout:g} s")
            images.append(frame)
            self.images += 1
        return Grab(images, None, time.monotonic())


def grabber_for(source: Source):
    """A GigE source in triggered mode grabs itself; any other source takes its next frames."""
    return source if callable(getattr(source, "grab", None)) and getattr(source, "trigger_mode", "free") != "free" \
        else FrameGrabber(source)


@dataclass
class _Pending:
    sequence: int
    part_id: str
    recipe: int
    wall: float
    mono: float


@dataclass
class _Camera:
    name: str
    grabber: object
    threshold_override: Optional[float]
    model: str
    mask: Optional[IgnoreMask] = None
    up: bool = False
    images: int = 0
    errors: Dict[str, int] = field(default_factory=dict)


class PartRunner:
    """Judges parts on trigger (module docstring); implements ``TriggerTarget``.

    ``start()`` begins (the runner's thread), ``trigger()`` from any thread, ``stop()`` finishes the
    part in hand and the queued ones (within ``drain_s``; any left are reported as ERROR "line
    stopped", never dropped) and returns the run summary.

    ``slots``: the line's ModelSlots (hot swap; the caller wires SIGHUP / POST /reload to it), whose
    ``detectors`` the runner judges with; the recipes' models are added to it (so the caller, who
    owns those detectors, closes them). Without it the runner makes its own over ``detectors`` (the
    same rule: recipe models are added to that mapping) or over detectors it opens and closes.
    ``shadows``: ShadowScorers fed every judged image (they are observers too).
    """

    def __init__(self, line: Line, sources: Mapping[str, Source], settings: Optional[PartSettings] = None,
                 detectors: Optional[Mapping[str, Detector]] = None,
                 observers: Sequence[LineObserver] = (), status_every: float = 0.0,
                 status: Callable[[str], None] = print, slots: Optional[ModelSlots] = None,
                 shadows: Sequence[LineObserver] = ()):
        self.line = line
        self.settings = (settings or line_part_settings(line)).check([c.name for c in line.cameras])
        names = self.settings.cameras or tuple(c.name for c in line.cameras)
        by_name = {c.name: c for c in line.cameras}
        self._own_detectors = detectors is None and slots is None
        if slots is None:
            slots = line_slots(line, detectors if detectors is not None else open_detectors(line))
        self.slots = slots
        self.detectors: Dict[str, Detector] = slots.detectors       # updated in place by a swap
        for camera in line.cameras:     # a slots object over other detectors than the line's: say so now
            if camera.name in names and str(Path(camera.model).resolve()) not in slots:
                raise PartError(f"camera {camera.name}: no detector for its model {camera.model}")
        self._recipe_models: Dict[int, str] = {}
        for number, model in self.settings.recipes:
            key = str(Path(model).resolve())
            if not Path(model).is_file():
                raise PartError(f"recipe {number}: model file not found: {model}")
            if key not in slots:
                slots.add(key, line_detector(line, model))
            self._recipe_models[number] = model
        self.cameras = [_Camera(n, grabber_for(sources[n]), by_name[n].threshold, str(by_name[n].model),
                                camera_mask(by_name[n])) for n in names]
        self._recipe_masks: Dict[Tuple[int, str], IgnoreMask] = {}
        for number, name, mask_path in self.settings.recipe_masks:
            try:
                self._recipe_masks[(number, name)] = load_ignore_mask(mask_path)
            except IgnoreMaskError as exc:
                raise PartError(f"recipe {number}, camera {name}: {exc}") from None
        for camera in self.cameras:      # scores depend on the frame size and the mask: before the first part
            for number in self.recipes:
                detector = self._detector(camera, number)
                for problem in calibration_mismatches(by_name[camera.name], detector, self._mask(camera, number)):
                    if number == 0:
                        logger.warning("camera %r: %s", camera.name, problem)
                    else:
                        logger.warning("camera %r, recipe %d: %s", camera.name, number, problem)
        for camera in self.cameras:      # a part is OK or NG against a threshold: every model needs one
            needed = [] if camera.threshold_override is not None else [camera.model]
            for model in [*needed, *self._recipe_models.values()]:
                if self.detectors[str(Path(model).resolve())].threshold is None:
                    raise PartError(f"camera {camera.name}: {model} has no calibrated threshold; a part needs one "
                                    f"to be OK or NG (mrkd calibrate, or --threshold)")
        self._sources = dict(sources)
        self.shadows = list(shadows)
        self.observers = list(observers) + [s for s in self.shadows if s not in observers]
        camera_bits = keeps_camera_bits(self.observers)     # camera bits only for an output that keeps them
        for source in self._sources.values():
            source.keep_camera_bits(camera_bits)
        self.status_every, self._status = status_every, status
        self._lock = threading.Condition()
        self._notify_lock = threading.Lock()     # orders the PLC's calls with the hand-overs to the notifier
        self._notifier = Notifier("parts-outputs")
        self._queue: Deque[_Pending] = deque()
        self._in_hand: Optional[_Pending] = None
        self._online = True
        self._active_recipe = 0
        self._stopping = threading.Event()
        self._abort = threading.Event()       # set when the drain is over: grabs still waiting end now
        self._thread: Optional[threading.Thread] = None
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.cameras)), thread_name_prefix="grab")
        self.triggers = self.missed = self.inspections = 0
        self.run_id = new_event_id()     # with an inspection id, names a part across restarts
        self.missed_by_reason: Dict[str, int] = {}
        self.verdicts = dict.fromkeys(Verdict.ALL, 0)
        self.parts_by_model: Dict[str, int] = {}     # model sha256 -> parts it judged (a swap splits them)
        self._clock = ClockWatch()     # a step of the wall clock (what parts are stamped with) is said, once
        self._clock.check()
        self.latency = {"trigger_to_verdict": LatencyWindow(4096), "trigger_to_images": LatencyWindow(4096),
                        "model": LatencyWindow(4096)}
        self._started_at = 0.0
        self._shown: Dict[str, CameraInfo] = {}     # camera -> the CameraInfo the outputs were last told
        self._hardware = any(not self._asked_for(c) for c in self.cameras)    # a hardware-triggered camera
        self._last_accepted: Optional[float] = None  # monotonic time of the last accepted trigger
        self._spacing_warned = False
        self._late_warned = False
        self._overtaken_warned = False

    # ------------------------------------------------------------ TriggerTarget
    def trigger(self, part_id: Optional[str] = None, recipe: Optional[int] = None) -> TriggerReceipt:
        wall, mono = time.time(), time.monotonic()
        # The sequence is taken and the trigger handed over under one hold of the notify lock: two triggers
        # at once reach the outputs (the parts log's missed lines) in sequence order. Lock order: the
        # notify lock, then ``_lock``, which is a leaf (nothing is taken under it), as under the notify
        # lock the PLC servers' hooks may read ``ready`` and ``busy``. No log record is written on this
        # thread (a PLC server's loop: a stalled stderr would stall it): the warnings go with the report,
        # on the notifier's thread.
        with self._notify_lock:
            return self._trigger(part_id, recipe, wall, mono)

    def _trigger(self, part_id: Optional[str], recipe: Optional[int], wall: float, mono: float) -> TriggerReceipt:
        """(``_notify_lock`` held.)"""
        with self._lock:
            self.triggers += 1
            sequence = self.triggers
            part_id = str(part_id) if part_id not in (None, "") else str(sequence)
            number = self._active_recipe if recipe is None else recipe
            reason = None
            if has_control_characters(part_id):        # reported escaped: the raw id would forge log lines
                reason, part_id = CONTROL_CHARACTERS_REFUSAL, printable_id(part_id)
            elif not self._online or self._stopping.is_set():
                reason = "offline"
            elif number not in self.recipes:
                reason = f"unknown recipe {number}"
            elif not self._has_room():
                reason = "queue full"
            if reason is None:
                self._queue.append(_Pending(sequence, part_id, number, wall, mono))
                self._lock.notify_all()
                # on the monotonic clock: a wall clock set back between two triggers made them "-3600 s apart"
                spacing = None if self._last_accepted is None else mono - self._last_accepted
                self._last_accepted = mono
            else:
                self.missed += 1
                self.missed_by_reason[reason] = self.missed_by_reason.get(reason, 0) + 1
            missed = self.missed
        receipt = TriggerReceipt(accepted=reason is None, sequence=sequence, part_id=part_id, reason=reason, time=wall)
        if reason is not None:       # its report (and warning) folds with the next ones past the bound
            self._emit_held(lambda o: o.on_trigger(receipt),
                            handed=lambda tell: MissedTriggers(receipt, tell, missed))
            return receipt
        if self._hardware and spacing is not None and spacing < self.settings.timeout and not self._spacing_warned:
            # A camera that skips a hardware trigger would answer the waiting part with the next part's
            # image as long as that comes within the timeout (README, "a part"): say so once.
            self._spacing_warned = True
            self._notifier.put(functools.partial(
                logger.warning, "hardware trigger: parts %.3g s apart, shorter than the part timeout %g s: a camera "
                "that skips a trigger would answer its part with the next part's image; set [part] timeout "
                "(--part-timeout) below the time between parts", spacing, self.settings.timeout))
        self._emit_held(lambda o: o.on_trigger(receipt))
        return receipt

    def _has_room(self) -> bool:
        """One more trigger fits: the part in hand (or the first accepted while the runner is idle)
        does not count against the queue bound, the ones waiting behind it do."""
        waiting = len(self._queue) - (0 if self._in_hand is not None else 1)
        return waiting + 1 <= self.settings.queue

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._online and not self._stopping.is_set() and self._has_room()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._in_hand is not None or bool(self._queue)

    @property
    def online(self) -> bool:
        return self._online

    def set_online(self, online: bool) -> None:
        with self._lock:
            self._online = bool(online)

    @property
    def recipes(self) -> Sequence[int]:
        return (0, *sorted(self._recipe_models))

    def _mask(self, camera: _Camera, recipe: int) -> Optional[IgnoreMask]:
        """The ignore mask ``camera``'s images are judged under in a part of ``recipe``: the recipe's own
        for that camera ([recipes.N] ignore_mask), else the camera's."""
        return self._recipe_masks.get((recipe, camera.name), camera.mask)

    @property
    def active_recipe(self) -> int:
        return self._active_recipe

    def select_recipe(self, recipe: int) -> None:
        """The recipe parts are judged with when their trigger names none (ValueError if unknown)."""
        if recipe not in self.recipes:
            raise PartError(f"recipe {recipe}: not in the line file's recipes {list(self.recipes)}")
        self._active_recipe = recipe

    # ------------------------------------------------------------ running
    def _info(self, camera: _Camera) -> CameraInfo:
        """The camera as its recipe-0 model judges it now (on_start; on_model after a hot swap)."""
        detector = self._detector(camera, 0)
        return CameraInfo(name=camera.name, source=str(getattr(self._sources[camera.name], "uri", "")),
                          model=camera.model, model_sha256=self.slots.sha256_of(self._key(camera, 0)),
                          backend=detector.backend.name, precision=detector.precision,
                          threshold=float(self._threshold(camera, 0, detector)),
                          threshold_source=("camera setting (line file or --threshold)"
                                            if camera.threshold_override is not None else detector.threshold_source),
                          triggered=True, ignore_mask=camera.mask.short() if camera.mask is not None else "",
                          map_geometry=MapGeometry.of(detector.metadata))

    def start(self) -> "PartRunner":
        infos = [self._info(camera) for camera in self.cameras]
        self._shown = {info.name: info for info in infos}
        self._emit(lambda o: o.see_outputs(self.observers))
        self._emit(lambda o: o.on_start(infos))
        self._notifier.wait_idle()       # every output has started before the first trigger is taken
        self._started_at = time.monotonic()
        self._check_status(force=True)
        self._thread = threading.Thread(target=self._run, name="parts", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain_s: float = 10.0) -> dict:
        """Refuse new triggers, judge what was accepted (within ``drain_s``), release; the summary."""
        self._stopping.set()
        self._notifier.release_room()     # a stalled output must not hold the last parts (and the stop) back
        with self._lock:
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=drain_s)
        with self._lock:
            left = list(self._queue)
            self._queue.clear()
        if self._thread is not None and self._thread.is_alive():
            # The part in hand still waits for an image past the drain: its grabs end now ("line stopped",
            # error code 5) and it is reported first, so trigger order holds. A stop never waits out a
            # part timeout (up to 600 s per image).
            self._abort.set()
            self._thread.join(timeout=30.0)
        for pending in left:     # never silent: each is reported
            self._report(pending, {c.name: Grab([], "line stopped") for c in self.cameras}, {}, 0.0)
        self._pool.shutdown(wait=False)
        # The PLC servers stop first: they may linger for the PLC's last acknowledgement, and a trigger
        # then (refused: the line is stopping) still reaches the other outputs as a missed one. Then every
        # part and trigger so far reaches them (within OUTPUTS_DRAIN_S: a stalled disk or share must not
        # hang the stop; what is given up is counted in the summary and logged). No output is called
        # after this but the PLC servers, told of a late trigger on the spot, so on_stop needs no lock.
        plc, others = plc_and_others(self.observers)
        stop_each(plc)
        self._notifier.close(OUTPUTS_DRAIN_S)
        stop_each(others)
        for source in self._sources.values():
            source.close()
        if self._own_detectors:
            for detector in self.detectors.values():
                detector.close()
        return self.summary()

    def run(self, stop: threading.Event, max_parts: Optional[int] = None) -> dict:
        """Start, wait for ``stop`` (or ``max_parts`` judged parts), stop; the summary."""
        self.start()
        try:
            while not stop.wait(0.05):
                if max_parts is not None and self.inspections >= max_parts:
                    break
        finally:
            summary = self.stop()
        return summary

    def _run(self) -> None:
        last_status = time.monotonic()
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._queue or self._stopping.is_set(), 0.25)
                if not self._queue:
                    if self._stopping.is_set():
                        return
                    pending = None
                else:
                    pending = self._in_hand = self._queue.popleft()
            # A reloaded model takes over here: between parts (the part just taken has no image yet),
            # never inside one; a model staged before a trigger judges that part.
            if self.slots.apply():      # the outputs show the model that judges from now on
                for info in [self._info(camera) for camera in self.cameras]:
                    if info != self._shown[info.name]:
                        self._shown[info.name] = info
                        self._emit(lambda o, info=info: o.on_model(info))   # called later: bind it now
            if pending is not None:
                try:
                    self._judge(pending)
                except Exception as exc:     # a bug must cost one part (reported), not the line
                    logger.exception("part %s: judging failed", pending.part_id)
                    self._report(pending, {c.name: Grab([], f"inference failed: {exc}") for c in self.cameras},
                                 {}, 0.0)
                finally:
                    with self._lock:
                        self._in_hand = None
            self._check_status()
            if self.status_every and time.monotonic() - last_status >= self.status_every:
                last_status = time.monotonic()
                self._check_status(force=True)
                self._status(self.status_line())

    # ------------------------------------------------------------ one part
    def _key(self, camera: _Camera, recipe: int) -> str:
        """The resolved model path (the slots' key) judging ``camera``'s images under ``recipe``."""
        return str(Path(camera.model if recipe == 0 else self._recipe_models[recipe]).resolve())

    def _detector(self, camera: _Camera, recipe: int) -> Detector:
        return self.detectors[self._key(camera, recipe)]

    @staticmethod
    def _threshold(camera: _Camera, recipe: int, detector: Detector) -> float:
        if recipe == 0 and camera.threshold_override is not None:
            return camera.threshold_override
        return float(detector.threshold)

    def _judge(self, pending: _Pending) -> None:
        asked = time.monotonic()     # a software trigger is sent (a free run's next frame read) from here
        waited = asked - pending.mono
        late = self._late(waited, "waited")
        futures = {c.name: self._pool.submit(c.grabber.grab, pending.mono, self.settings.timeout,
                                             self.settings.images, self._abort, self.settings.early)
                   for c in self.cameras if not (late and self._asked_for(c) and not self._sequence(c))}
        grabs = {name: future.result() for name, future in futures.items()}
        for camera in self.cameras:      # the ones asked too late, and images that came too late
            grab = grabs.get(camera.name)
            if grab is None or (late and grab.error is None and self._asked_for(camera)):
                grabs[camera.name] = Grab([], late)     # not asked; a sequence's image read and dropped
            elif grab.error is None and self._asked_for(camera):
                taken = self._late(grab.acquired_at - pending.mono, "its image came")
                if taken:
                    grabs[camera.name] = Grab([], taken)
                elif self.settings.max_delay is None:
                    self._warn_unbounded(pending, camera.name, grab.acquired_at - pending.mono, asked)
            grab = grabs[camera.name]
            misfit = _mask_misfit(self._mask(camera, pending.recipe), grab.frames) if grab.error is None else None
            if misfit:
                grabs[camera.name] = Grab([], misfit)
        acquired = max((g.acquired_at for g in grabs.values() if g.error is None), default=time.monotonic())
        groups: Dict[str, List[Tuple[_Camera, Frame]]] = {}      # model path -> its images
        for camera in self.cameras:
            grab = grabs[camera.name]
            if grab.error is None:
                camera.images += len(grab.frames)
                groups.setdefault(self._key(camera, pending.recipe), []).extend(
                    (camera, frame) for frame in grab.frames)
            else:
                kind = next((k for k in ERROR_CODES if grab.error.startswith(k)), "other")
                camera.errors[kind] = camera.errors.get(kind, 0) + 1
        scored: Dict[str, List[FrameResult]] = {}       # camera -> each of its images as judged, in order
        judged: List[FrameResult] = []      # each image as a free run's frame (the per-camera metrics)
        first_index = {c.name: c.images - len(grabs[c.name].frames) for c in self.cameras}
        model_s = 0.0
        for key, members in groups.items():
            result = self.detectors[key]([frame.image for _, frame in members])
            model_s += sum(result.timings.values())
            done = time.monotonic()
            infer_share = result.timings.get("infer", 0.0) / len(members)     # as the frame loop shares a batch
            sha256, detector = self.slots.sha256_of(key), self.detectors[key]
            for i, (camera, frame) in enumerate(members):
                self.slots.note(key, frame.image, float(result.scores[i]))     # the model's own score: a swap's check
                mask = self._mask(camera, pending.recipe)
                amap, score = masked(mask, result.maps[i], float(result.scores[i]), frame.image.shape[:2],
                                     detector.metadata)
                threshold = self._threshold(camera, pending.recipe, self.detectors[key])
                index = first_index[camera.name] + len(scored.get(camera.name, ()))
                judged.append(FrameResult(
                    camera=camera.name, frame_index=index, frame_time=pending.wall, image=frame.image,
                    amap=amap, score=score, threshold=threshold,
                    anomalous=bool(is_anomalous(score, threshold)), infer_s=infer_share,
                    latency_s=max(0.0, done - (grabs[camera.name].acquired_at or done)), model_sha256=sha256,
                    backend=detector.backend.name, precision=detector.precision, raw=frame.raw,
                    ignore_mask=mask))
                scored.setdefault(camera.name, []).append(judged[-1])
        self._report(pending, grabs, scored, model_s, acquired, judged)
        for camera in self.cameras:      # the candidates score the same images, on their own threads
            threshold = self._threshold(camera, pending.recipe, self._detector(camera, pending.recipe))
            live_sha = self.slots.sha256_of(self._key(camera, pending.recipe))
            for one in scored.get(camera.name, ()):
                for shadow in self.shadows:
                    shadow.offer(camera.name, one.image, one.score, bool(is_anomalous(one.score, threshold)),
                                 live_sha, one.ignore_mask)

    @staticmethod
    def _asked_for(camera: _Camera) -> bool:
        """A camera that takes a part's image when mrkd asks (software trigger, free-running): a part's wait
        in the queue delays its image. A hardware-triggered one exposed at the edge already."""
        return getattr(camera.grabber, "trigger_mode", "") != "hardware"

    @staticmethod
    def _sequence(camera: _Camera) -> bool:
        """A folder, video file or array: its next image is the next part's whenever it is read, so a late
        part still reads its image (and drops it); skipping it would judge every later part on the image
        of the part before it."""
        return isinstance(camera.grabber, FrameGrabber) and not camera.grabber.source.live

    def _late(self, seconds: float, what: str) -> Optional[str]:
        """The ERROR reason when ``seconds`` after the trigger is past [part] max_delay; None otherwise."""
        bound = self.settings.max_delay
        if bound is None or seconds <= bound:
            return None
        return f"late: {what} {seconds:.3g} s after its trigger, over part.max_delay {bound:g} s"

    def _warn_unbounded(self, pending: _Pending, camera: str, delay: float, asked: float) -> None:
        """No max_delay, and a camera that takes its image when asked was asked at ``asked`` (monotonic):
        warned once each, when a later part's trigger had come by then (the part waited behind slower
        parts: the image may show that later part, however short the delay), and when the image came later
        after its trigger than a camera may take to deliver one (the part timeout). The delay of every part
        is its acquired_s in the parts log and events."""
        if not self._overtaken_warned:
            with self._lock:
                later = next((p for p in self._queue if p.mono <= asked), None)
            if later is not None:
                self._overtaken_warned = True
                self._notifier.put(functools.partial(
                    logger.warning, "part %s: camera %s was asked for its image after part %s's trigger had come "
                    "(parts come faster than they are judged); on a moving line that image may show part %s: "
                    "set [part] max_delay (--part-max-delay) to judge such parts ERROR 'late' instead",
                    pending.part_id, camera, later.part_id, later.part_id))
        if delay <= self.settings.timeout or self._late_warned:
            return
        self._late_warned = True
        self._notifier.put(functools.partial(
            logger.warning, "part %s: its image from camera %s came %.3g s after its trigger (it waited for the "
            "parts before it); on a moving line that image may show another part: set [part] max_delay "
            "(--part-max-delay) to judge such parts ERROR 'late' instead", pending.part_id, camera, delay))

    def _report(self, pending: _Pending, grabs: Mapping[str, Grab],
                scored: Mapping[str, List[FrameResult]], model_s: float,
                acquired: Optional[float] = None, judged: Sequence[FrameResult] = ()) -> None:
        """Build the part's record (verdict, deciding camera, event for NG/ERROR) and tell every observer
        (``judged``: each scored image, told first through ``on_part_image``)."""
        judgements, views, errors = [], {}, []
        for camera in self.cameras:
            detector = self._detector(camera, pending.recipe)
            threshold = self._threshold(camera, pending.recipe, detector)
            grab = grabs[camera.name]
            images = scored.get(camera.name, [])
            if grab.error is not None or not images:
                reason = grab.error or "unusable image"
                errors.append(f"{camera.name}: {reason}")
                judgements.append(CameraJudgement(camera.name, math.nan, threshold, False, 0, reason))
                continue
            view = max(images, key=lambda one: one.score)       # its threshold is this one (same detector)
            views[camera.name] = view
            mask = view.ignore_mask          # the one its score was taken under
            judgements.append(CameraJudgement(camera.name, view.score, threshold,
                                              bool(is_anomalous(view.score, threshold)), len(images),
                                              ignore_mask_sha256=mask.sha256 if mask is not None else None))
        if errors:
            verdict = Verdict.ERROR
        else:
            verdict = Verdict.NG if any(j.anomalous for j in judgements) else Verdict.OK
        deciding = max((j for j in judgements if not math.isnan(j.score)), key=_severity, default=judgements[0])
        done = time.monotonic()
        self._clock.check()
        deciding_camera = next(c for c in self.cameras if c.name == deciding.camera)
        first_error = next((j.error for j in judgements if j.error), None)
        deciding_key = self._key(deciding_camera, pending.recipe)
        model_sha256 = self.slots.sha256_of(deciding_key)   # the model that judged, and what it ran on:
        judged_by = self.detectors[deciding_key]             # the slots swap both only between parts
        with self._lock:
            self.inspections += 1
            inspection_id = self.inspections
            self.parts_by_model[model_sha256] = self.parts_by_model.get(model_sha256, 0) + 1
        part = PartResult(inspection_id=inspection_id, part_id=pending.part_id, verdict=verdict,
                          score=deciding.score, threshold=deciding.threshold, cameras=tuple(judgements),
                          model_sha256=model_sha256, backend=judged_by.backend.name, precision=judged_by.precision,
                          recipe=pending.recipe, trigger_time=pending.wall,
                          acquired_s=max(0.0, (acquired or done) - pending.mono), verdict_s=done - pending.mono,
                          error_code=error_code(first_error) if first_error else 0,
                          error="; ".join(errors) or None, sequence=pending.sequence, run_id=self.run_id)
        if verdict != Verdict.OK:
            part = replace(part, event_id=new_event_id())
        self.verdicts[verdict] += 1
        self.latency["trigger_to_verdict"].add(part.verdict_s)
        if not errors:
            self.latency["trigger_to_images"].add(part.acquired_s)
            self.latency["model"].add(model_s)
        self._emit(lambda o: o.on_part(part),
                   handed=lambda tell: lambda: self._tell_outputs(tell, part, views, judged))
        # The outputs far behind: the images waiting for them are bounded. Waited for after the PLC has
        # this part's verdict, so the bound holds back the next part, never an answer.
        self._notifier.wait_for_room()

    @staticmethod
    def _tell_outputs(tell: Tell, part: PartResult, views: Mapping[str, FrameResult],
                      judged: Sequence[FrameResult] = ()) -> None:
        """(The notifier's thread; ``tell``: _emit's, to every output but the PLC servers.) Each image the
        part's cameras had scored (``judged``: ``on_part_image``, what the per-camera metrics count); the
        outputs that write files of a part (``part_fields``: snapshots and evidence of an NG/ERROR part,
        which has its event id; the evidence's sample of OK parts; ``views``: camera -> its image that
        decided, as judged) write them before any of them sends the record, which then carries each camera's
        paths (and the evidence's sha256); then every output's ``on_part``."""
        for image in judged:
            tell(lambda o, image=image: o.on_part_image(image))
        fields: Dict[str, Dict[str, object]] = {}

        def collect(output: LineObserver) -> None:
            for camera, values in (output.part_fields(part, views) or {}).items():
                fields.setdefault(camera, {}).update(values)
        tell(collect)
        if fields:
            part = replace(part, cameras=tuple(replace(j, **fields.get(j.camera, {})) for j in part.cameras))
        tell(lambda o: o.on_part(part))

    def _tell_each(self, outputs: Sequence[LineObserver], call: Callable[[LineObserver], object]) -> None:
        """(The notifier's thread.) base.call_each, but no output once the notifier is closed: past the
        stop's drain deadline (behind a stalled output) their on_stop is running, and a hook after it
        would reopen a closed log or post to a stopped web hook."""
        call_each(outputs, lambda output: None if self._notifier.closed else call(output))

    # ------------------------------------------------------------ status and summary
    def _emit(self, call: Callable[[LineObserver], object],
              handed: Optional[Callable[[Tell], Callable[[], object]]] = None) -> None:
        """``call(observer)`` for every output (typed calls, base.call_each: one broken output is logged
        and must not stop judging): the PLC servers now, on this thread, the others later on the
        notifier's, in the order of the calls (``call`` must not read a variable that changes after).
        ``handed(tell)``, where given, is the call handed over instead, ``tell(each)`` calling ``each`` for
        those others: a part's (its files first), or one the notifier may fold (handover.py)."""
        with self._notify_lock:
            self._emit_held(call, handed)

    def _emit_held(self, call: Callable[[LineObserver], object],
                   handed: Optional[Callable[[Tell], Callable[[], object]]] = None) -> None:
        """``_emit`` with ``_notify_lock`` already held."""
        plc, others = plc_and_others(self.observers)
        call_each(plc, call)

        def tell(each: Callable[[LineObserver], object]) -> None:
            self._tell_each(others, each)
        self._notifier.put(handed(tell) if handed is not None else (lambda: tell(call)))

    def _camera_status(self, camera: _Camera) -> CameraStatus:
        source = self._sources[camera.name]
        stats = source.stats
        extra = {"images": float(camera.images), "incomplete_buffers": float(getattr(stats, "incomplete", 0)),
                 "trigger_timeouts": float(getattr(stats, "timeouts", 0)),
                 "unclaimed_images": float(getattr(stats, "unclaimed", 0))}
        return CameraStatus(camera=camera.name, up=camera.up, frames=camera.images, dropped=stats.dropped,
                            bad_frames=stats.bad_frames, reconnects=stats.reconnects, extra=extra,
                            features=dict(getattr(source, "features_applied", {})))

    def _check_status(self, force: bool = False) -> None:
        for camera in self.cameras:
            up = bool(camera.grabber.up)
            if force or up != camera.up:
                changed = up != camera.up
                camera.up = up
                if changed and not force:
                    logger.warning("camera %s: %s", camera.name, "up" if up else _down_why(camera.grabber))
                status = self._camera_status(camera)
                # called later: bind it now; a newer status replaces it while the outputs are far behind
                self._emit(lambda o, status=status: o.on_status(status),
                           handed=lambda tell, status=status: StatusReport({status.camera: status}, tell))

    def status_line(self) -> str:
        p = self.latency["trigger_to_verdict"].percentiles_ms()
        cameras = " | ".join(f"{c.name}: {'up' if c.up else 'DOWN'} {c.images} images" for c in self.cameras)
        latency = (f"trigger->verdict p50/p99 {p['p50']:.1f}/{p['p99']:.1f} ms" if self.inspections
                   else "no part judged yet")
        return (f"{self.inspections} parts (OK {self.verdicts['OK']} NG {self.verdicts['NG']} ERROR "
                f"{self.verdicts['ERROR']}), {self.missed} missed triggers, {latency} || {cameras}")

    def summary(self) -> dict:
        cameras = {}
        for camera in self.cameras:
            source = self._sources[camera.name]
            cameras[camera.name] = {"source": source_summary(source), "images": camera.images, "up": camera.up,
                                    "errors": dict(camera.errors), "model": camera.model,
                                    "features": dict(getattr(source, "features_applied", {})),
                                    "ignore_mask": camera.mask.summary() if camera.mask is not None else None,
                                    "recipe_ignore_masks": {str(number): mask.summary() for (number, name), mask
                                                            in sorted(self._recipe_masks.items())
                                                            if name == camera.name}}
        elapsed = time.monotonic() - self._started_at if self._started_at else 0.0
        return {"mode": "parts", "run_id": self.run_id, "parts": self.inspections, "verdicts": dict(self.verdicts),
                "triggers": self.triggers, "missed_triggers": self.missed,
                "missed_by_reason": dict(self.missed_by_reason),
                "latency_ms": {k: w.percentiles_ms() for k, w in self.latency.items()},
                "parts_per_s": self.inspections / elapsed if elapsed > 0 else 0.0,
                "events": self.verdicts[Verdict.NG] + self.verdicts[Verdict.ERROR], "cameras": cameras,
                "parts_by_model": dict(self.parts_by_model),
                "outputs_given_up": self._notifier.given_up,
                "outputs_given_up_refused_triggers": self._notifier.given_up_refused_triggers}


def _severity(judgement: CameraJudgement) -> float:
    """How close a camera came to NG: score/threshold (the one that decides an NG is the highest)."""
    if judgement.threshold > 0:
        return judgement.score / judgement.threshold
    return judgement.score - judgement.threshold


def line_part_settings(line: Line) -> PartSettings:
    return getattr(line, "part", None) or PartSettings()


def open_part_sources(line: Line, settings: PartSettings, timeout: float = 5.0) -> Dict[str, Source]:
    """Open the sources of the part's cameras in their trigger mode (a failure names the camera)."""
    return open_sources(line, timeout, cameras=settings.cameras or None, triggered=True)
