"""What the frame loop tells the outside world: one small interface for every line output.

The loop (``mrkd.runtime.line.loop.run_line``; ``run_stream`` is its one-camera case) calls a
``LineObserver`` on the loop thread for every scored frame and every change in a camera's state, and
on its alarm notifier's thread for every alarm event (its record first). Observers (MQTT, Prometheus
metrics, the operator page, ...) must return at once: anything slow (network, encoding for a browser)
goes onto a bounded queue of their own, so a slow broker or browser never slows scoring.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from mrkd.runtime.raw_image import RawImage

if TYPE_CHECKING:
    from mrkd.runtime.ignore_mask import IgnoreMask, MapGeometry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CameraInfo:
    """A camera as the loop runs it (what a status topic, a metrics label or a page shows)."""

    name: str
    source: str                  # the URI, credentials redacted (mrkd.runtime.redact.redact_uri)
    model: str                   # model file path
    model_sha256: str            # hash of the model file, as checked against its metadata
    backend: str                 # "onnxruntime" / "tensorrt" / "openvino" (runtime.backends.REGISTRY)
    precision: str               # "fp32" / "fp16" / "int8", or "bf16" / "int8+bf16" (Detector.precision)
    threshold: float
    threshold_source: str        # where the threshold came from, e.g. "sidecar model.json (calibrated on line)"
    triggered: bool = False      # judged per part (runtime/line/parts.py): no frames between parts
    ignore_mask: str = ""        # what its ignore mask leaves out ("top.png, 3.1% not judged"), "" without one
    map_geometry: Optional["MapGeometry"] = None   # its model's map over the frame (the mask editor's margin)


@dataclass(frozen=True)
class FrameResult:
    """One scored frame of one camera."""

    camera: str
    frame_index: int             # increasing over the whole run (also across --loop passes)
    frame_time: float            # seconds, source clock, increasing
    image: np.ndarray            # HxWx3 uint8 BGR as judged: the camera's own pixels unless ``raw`` (do not modify)
    amap: np.ndarray             # anomaly map (model size), float32
    score: float
    threshold: float
    anomalous: bool              # score >= threshold
    event: Optional[dict] = None  # the alarm event this frame raised, if any (same dict as on_event)
    infer_s: float = 0.0         # this frame's share of the batch's inference time
    latency_s: float = 0.0       # from the frame's arrival to its result
    model_sha256: str = ""        # the live model that judged it (it changes on a hot swap)
    backend: str = ""             # what that model ran on (CameraInfo.backend, .precision): a swap may change
    precision: str = ""           # them, a new calibration of the same file too (bf16 comes and goes)
    raw: Optional[RawImage] = None  # the camera's own pixels where ``image`` is not them (GigE Mono10/12/16, Bayer)
    ignore_mask: Optional["IgnoreMask"] = None   # the mask ``score`` was taken under (a part's recipe may set its
                                                  # own); the shadow candidate scores under it too


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
    features: Dict[str, str] = field(default_factory=dict)   # GenICam settings as the camera reads them back


class LineObserver:
    """Base class with no-op hooks; every output of a line (events log, snapshots, webhook, video file,
    window, MQTT, metrics, page, PLC servers) is one, built by ``mrkd.runtime.outputs.build_outputs``.
    Hooks run on the loop thread and must not block; in a triggered run the part runner calls them on
    its output thread (runtime/outputs/notifier.py), the PLC servers' on the spot. Per alarm, on the
    loop's alarm notifier thread (so an output's file work never holds a frame back): ``event_fields``
    of every output (what they add to the record, e.g. the snapshot's path), then ``on_event``; the
    frame's ``on_frame`` runs on the loop thread meanwhile. Per part: ``on_part_image`` for each scored
    image, ``part_fields``, then ``on_part``."""

    def on_start(self, cameras: Sequence[CameraInfo]) -> None:
        pass

    def see_outputs(self, outputs: Sequence["LineObserver"]) -> None:
        """Every output of the line (self included), before ``on_start`` (build_outputs and the runner
        both tell it; the runner's list also holds outputs built elsewhere, e.g. PLC servers): outputs
        that report on the others (metrics, the page) keep the list and read each one's ``health()``."""

    def event_fields(self, result: FrameResult) -> Mapping[str, object]:
        """Fields this output adds to an alarm's event record before any output sends it (the
        snapshot writer adds ``snapshot``); ``result.event`` is the record so far."""
        return {}

    def on_frame(self, result: FrameResult) -> None:
        pass

    def on_event(self, camera: str, event: dict) -> None:
        pass

    def on_status(self, status: CameraStatus) -> None:
        pass

    def on_model(self, info: CameraInfo) -> None:
        """A hot swap (runtime/line/swap.py) replaced a camera's model between rounds (between parts):
        ``info`` is the camera as it is judged from now on (model hash, threshold, backend)."""

    def on_trigger(self, receipt: TriggerReceipt) -> None:
        """A part trigger arrived (accepted or refused) in triggered mode."""

    def part_fields(self, part: PartResult, views: Mapping[str, FrameResult]) -> Mapping[str, Mapping[str, object]]:
        """For every judged part, before any output sends it (an NG/ERROR part has ``part.event_id``
        set, an OK part None): camera -> the CameraJudgement fields this output fills (``snapshot``,
        ``evidence``, ``evidence_sha256``, ...) with what it wrote; ``views``: camera -> its image that
        decided (the highest score of its images: image, anomaly map, threshold, camera bits), for the
        cameras that have an image. The part's counterpart of ``event_fields``."""
        return {}

    def on_part_image(self, result: FrameResult) -> None:
        """In triggered mode, each image a part's camera had scored, as a free run's frame (``frame_index``
        counts the camera's images, ``frame_time`` is the trigger's wall clock, ``latency_s`` runs from the
        camera's images in hand to the score), told before its part's ``part_fields`` and ``on_part``.
        Outputs that count per camera image (metrics) take it; ``on_frame`` stays the free run's."""

    def on_part(self, result: PartResult) -> None:
        """A part was judged (OK, NG or ERROR) in triggered mode."""

    def stop_requested(self) -> bool:
        """True when this output asks the run to end (a window closed by the operator)."""
        return False

    def health(self) -> Optional[OutputHealth]:
        """This output's delivery state, or None for outputs that deliver nothing (a window)."""
        return None

    def on_stop(self) -> None:
        """The loop has ended (every event is written); flush within a short deadline and release."""

    # True for outputs whose on_stop may wait out a deadline for a peer (a broker, a web hook): stop_each
    # stops them side by side, so a stop with two unreachable peers waits one deadline, not their sum.
    stop_waits_for_peer: bool = False

    # True for the PLC servers (the handshake): the part runner tells them on the spot and the others
    # through its Notifier (plc_and_others), so a PLC's trigger and its OK/NG never wait for another
    # output's fsync (parts log, events log), file (snapshots, evidence) or peer. Their hooks must be
    # quick and thread-safe; they get a part without its snapshot and evidence paths.
    answers_plc: bool = False

    # True for outputs that keep a camera's own bits (``FrameResult.raw``: the evidence writer). The line
    # asks its sources for them only when one does (keeps_camera_bits): a 5 MP Mono16 frame's bits are
    # 10 MB, held by every queue a frame waits in (video, shadow) whether an output wants them or not.
    keeps_camera_bits: bool = False


def keeps_camera_bits(observers: Sequence[LineObserver]) -> bool:
    """Whether any of ``observers`` keeps a camera's own bits: the line tells its sources this
    (``Source.keep_camera_bits``) before the first frame is judged."""
    return any(getattr(observer, "keeps_camera_bits", False) for observer in observers)


def plc_and_others(observers: Sequence[LineObserver]) -> Tuple[list, list]:
    """``observers`` split into the PLC servers (``answers_plc``) and the others, each in their order."""
    plc = [observer for observer in observers if getattr(observer, "answers_plc", False)]
    return plc, [observer for observer in observers if observer not in plc]


def call_each(observers: Sequence[LineObserver], call: Callable[[LineObserver], object]) -> None:
    """``call(observer)`` for every observer; one that raises is logged (once per output and hook kind
    a minute) and the others still run: one broken output must not stop scoring."""
    for observer in observers:
        try:
            call(observer)
        except Exception:
            _log_broken(observer)


def stop_each(observers: Sequence[LineObserver]) -> None:
    """``on_stop`` for every observer, as call_each does; those that wait for a peer
    (``stop_waits_for_peer``) each on a thread of their own, the rest in order on this thread (a
    window must be closed by the thread that opened it). Returns when all have stopped."""
    waiting = [o for o in observers if getattr(o, "stop_waits_for_peer", False)]
    threads = [threading.Thread(target=call_each, args=([o], lambda x: x.on_stop()),
                                name=f"stop-{type(o).__name__}", daemon=True) for o in waiting]
    for thread in threads:
        thread.start()
    call_each([o for o in observers if o not in waiting], lambda o: o.on_stop())
    for thread in threads:
        thread.join()


_broken_logged: Dict[Tuple[str, int], float] = {}


def _log_broken(observer: LineObserver) -> None:
    key = (type(observer).__name__, id(observer))
    now = time.monotonic()
    if now - _broken_logged.get(key, -1e9) >= 60.0:
        _broken_logged[key] = now
        logger.exception("output %s failed (further failures of it are logged once a minute)",
                         type(observer).__name__)


# ---------------------------------------------------------------- parts and output health
# The records below are the contract between the part runner (runtime/line/parts.py), every output
# (outputs/) and the PLC adapters (runtime/plc/): each reads them, none re-derives them.

PART_SCHEMA_VERSION = 1


class Verdict:
    """A part's verdict: OK, NG, or ERROR (no image, a timeout, a lost-packet frame: never OK)."""

    OK = "OK"
    NG = "NG"
    ERROR = "ERROR"
    ALL = (OK, NG, ERROR)


@dataclass(frozen=True)
class CameraJudgement:
    """One camera's share of a part: its image(s) scored, or the reason there is none."""

    camera: str
    score: float                 # the highest of this camera's images; NaN when it has none
    threshold: float
    anomalous: bool              # score >= threshold (the one rule, runtime/line/alarms.py)
    images: int = 0              # images scored for this part
    error: Optional[str] = None  # why this camera has no verdict ("timeout", "incomplete buffer", ...)
    snapshot: Optional[str] = None
    ignore_mask_sha256: Optional[str] = None   # the mask its score was taken under (runtime/ignore_mask.py)
    evidence: Optional[str] = None         # the image as delivered, lossless (runtime/outputs/evidence.py)
    evidence_sha256: Optional[str] = None
    # The camera's own bits beside it, where the judged image is not them (a GigE camera in Mono10/12/16:
    # 16-bit PNG of the values as delivered; Bayer: the 8-bit mosaic); None for every other source.
    evidence_raw: Optional[str] = None
    evidence_raw_sha256: Optional[str] = None
    evidence_raw_pixel_format: Optional[str] = None


@dataclass(frozen=True)
class PartResult:
    """One part: one trigger -> one image (or N) from each camera of the part -> one verdict.

    inspection_id counts judged parts from 1 over the run (the PLC matches it); run_id names the run
    (PartRunner.run_id), so the two together name one part across restarts (``result_id``); part_id is
    the id given with the trigger, or the trigger's sequence number as text. score/threshold are those
    of the camera whose score/threshold ratio is highest (the one that decided an NG).
    """

    inspection_id: int
    part_id: str
    verdict: str                 # Verdict.OK / NG / ERROR
    score: float
    threshold: float
    cameras: Tuple[CameraJudgement, ...]
    model_sha256: str
    backend: str = ""            # what the deciding model ran on, named as CameraInfo names it
    precision: str = ""
    recipe: int = 0
    trigger_time: float = 0.0    # wall clock (time.time()) when the trigger arrived
    acquired_s: float = 0.0      # trigger -> every image in hand
    verdict_s: float = 0.0       # trigger -> verdict
    error_code: int = 0          # 0 none; see runtime/line/parts.py ERROR_CODES
    error: Optional[str] = None
    event_id: Optional[str] = None   # the NG/error event written for this part, if any
    sequence: int = 0            # the trigger's (TriggerReceipt.sequence): parts and missed triggers share it
    run_id: str = ""             # the run that judged it (PartRunner.run_id)
    schema_version: int = PART_SCHEMA_VERSION

    @property
    def ok(self) -> bool:
        return self.verdict == Verdict.OK

    @property
    def result_id(self) -> str:
        """``<run_id>-<inspection_id>``: unique across runs, as OPC 40100 asks of a ResultId (inspection
        ids start again at 1 each run: a client that asked for result "5" after a restart got another part)."""
        return f"{self.run_id}-{self.inspection_id}" if self.run_id else str(self.inspection_id)


@dataclass(frozen=True)
class TriggerReceipt:
    """The answer to one trigger: accepted (queued with ``sequence``) or refused with a reason.
    A refused trigger is a missed trigger: counted, reported to every observer, never silent."""

    accepted: bool
    sequence: int                # triggers received over the run, accepted or not, from 1
    part_id: str
    reason: Optional[str] = None  # why refused: "queue full", "offline", ...
    time: float = 0.0            # wall clock of the trigger
    # Refused triggers this receipt stands for, sequence .. sequence + count - 1: more than 1 only in a
    # report folded while the outputs were far behind (runtime/line/handover.py); the PLC servers get 1.
    count: int = 1


@dataclass(frozen=True)
class OutputHealth:
    """An output's state as every health signal shows it (summary, /metrics, /healthz, the page)."""

    name: str                    # "mqtt", "webhook", "events", "snapshots", "modbus", ...
    ok: bool                     # delivering now
    state: str                   # "connected", "failing", "disconnected", "listening", ...
    sent: int = 0
    failed: int = 0
    detail: str = ""             # the last error, naming the target (never a credential)
    dropped: int = 0             # given up unsent (queue full while failing, or still queued at the stop)
    target: str = ""             # where it delivers: a path, a URL or host:port (credentials redacted)
