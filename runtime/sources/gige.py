"""GigE Vision (GenICam) cameras through Aravis 0.8: ``gige://ADDRESS-or-SERIAL-or-DEVICE-ID``.

One ``GigeSource`` per camera. Free run (``trigger="free"``) behaves like every live source (a reader
thread keeps the newest frame). In triggered mode (``"software"``: mrkd triggers the camera for each
part; ``"hardware"``: the line's I/O does) the part runner calls ``grab`` per part and gets exactly
the image(s) of that trigger or the reason there are none (timeout, incomplete buffer, camera down).

Pixel formats (``to_bgr``): Mono8; Mono10/12/16 (little-endian 16-bit containers) shifted right by
bits-8 (Mono12 4095 -> 255: the top 8 bits, no rounding, no rescaling); Bayer RG/GR/GB/BG 8-bit
demosaiced by OpenCV (bilinear); RGB8/BGR8. Anything else is one SourceError naming camera and format.
Where the frame judged is not the camera's own pixels (Mono10/12/16, Bayer), ``decode`` keeps those
too, and the frames carry them (``Frame.raw``, runtime/raw_image.py) when the line asks for them for
an output that keeps them (the evidence: ``keep_camera_bits``); otherwise no frame holds a copy.

Aravis 0.8 does not range-check feature values, so ``apply_features`` does: an unknown feature, a
value outside the camera's bounds, an enumeration entry it lacks or a value that does not read back
is one GigeError naming camera, feature and value. The values read back are ``features_applied``.

Software trigger, image to trigger: the camera numbers its images (the GVSP block id, 16-bit ids
wrapping from 65535 to 1, or GigE Vision 2's 64-bit ones) and sends one per trigger it takes, so once
one image has been matched, each trigger the camera took is owed the next number (hardware trigger:
each trigger the PLC reported; the start of ``grab``'s ``early`` window stands in for the send time).
An image numbered before the trigger's is an earlier trigger's (one delayed by packet resends or a busy camera, however
late it lands): discarded and counted as unclaimed, never taken for a later part. Until a number is
known (the first trigger after a connect) and for a buffer whose leader packet was lost (no number), an
image belongs to the trigger only if its leader came after that trigger was sent, compared on the
monotonic clock (Aravis stamps the leader's arrival with the host's wall clock; the stamp is moved onto
the monotonic clock when the buffer is popped, so a wall clock stepped between a trigger and its image
costs no part). After a trigger that got no image in time, the next trigger waits ``LATE_IMAGE_S`` for
its late image to land first. A camera that made one image for two triggers (taken while busy) leaves
the count one ahead; ``SHIFTED_TRIGGERS`` triggers in a row that see only earlier numbers take it again.

A camera that stops answering (unplugged, power-cycled: Aravis' ``control-lost``, a failed trigger)
is down; the reader reconnects with backoff and re-applies the features and trigger mode, to the same
camera only (its serial number is checked: another camera at the same address stays refused). So is a
software-triggered camera whose images stop arriving (``SILENT_TRIGGERS`` timeouts in a row in which
no image, not even an earlier trigger's late one, landed).

A software trigger is a GVCP command that Aravis retries until the camera answers (5 tries of 0.5 s
against a camera that just died; 2.5-4.6 s were seen), and Aravis 0.8.26 has no setting for that
(its retries and timeout are fixed when the device opens). So the command runs on a thread of its
own and the part waits for it only until its deadline: past it the part is a timeout, on time. The
next trigger is not sent before that command has returned (within the next part's own deadline);
one that was taken after its part gave up may still bring an image, so the next trigger waits
``LATE_IMAGE_S`` after it, and the image is discarded, never given to a later part. Closing does
not wait for such a command either: the camera is let go of on a thread of its own, which ends (like
the command's) only when Aravis gives up; no Python call can wake a command inside Aravis.
Images come over Aravis' UDP-socket receiver, never its packet socket (see ``_setup``).
The Python binding is PyGObject with Debian's ``gir1.2-aravis-0.8`` (imported lazily).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from mrkd.errors import MrkdError
from mrkd.runtime.raw_image import RawImage
from mrkd.runtime.sources import Frame, LatestFrameSource, SourceError, SourceStats

logger = logging.getLogger(__name__)

SCHEME = "gige://"
TRIGGER_MODES = ("free", "software", "hardware")
# How long opening waits for a camera another application controls to be let go: GigE Vision's default
# heartbeat timeout (3 s, after which a camera drops a controller that stopped talking), and a margin.
CONTROL_WAIT_S = 6.0
INSTALL_HINT = ("apt install gir1.2-aravis-0.8 python3-gi (Debian/Ubuntu/Jetson), and in a virtual environment "
                "pip install 'PyGObject<3.50' (needs libgirepository1.0-dev libcairo2-dev pkg-config)")

# GenICam PFNC codes (the values Aravis' ARV_PIXEL_FORMAT_* constants carry) -> name.
PIXEL_FORMATS = {
    0x01080001: "Mono8", 0x01100003: "Mono10", 0x01100005: "Mono12", 0x01100007: "Mono16",
    0x01080008: "BayerGR8", 0x01080009: "BayerRG8", 0x0108000A: "BayerGB8", 0x0108000B: "BayerBG8",
    0x02180014: "RGB8", 0x02180015: "BGR8",
}
MONO_BITS = {"Mono8": 8, "Mono10": 10, "Mono12": 12, "Mono16": 16}
# GenICam names a Bayer pattern by its first two pixels (row 0: R G for BayerRG); OpenCV names it by
# the second row's second and third pixels, so each GenICam pattern is OpenCV's diagonal opposite.
BAYER_TO_OPENCV = {"BayerRG8": cv2.COLOR_BayerBG2BGR, "BayerGR8": cv2.COLOR_BayerGB2BGR,
                   "BayerGB8": cv2.COLOR_BayerGR2BGR, "BayerBG8": cv2.COLOR_BayerRG2BGR}
SUPPORTED_FORMATS = tuple(PIXEL_FORMATS.values())


class GigeError(SourceError):
    """A GigE camera cannot be opened or set up; the message names the camera (and feature, value)."""


class FeatureSyntaxError(MrkdError, ValueError):
    """A --feature that is not NAME=VALUE."""


def aravis():
    """The Aravis 0.8 GObject binding (lazily: the runtime runs without it unless gige:// is used)."""
    from mrkd.deps import MissingDependencyError
    try:
        import gi
        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis
    except (ImportError, ValueError) as exc:
        raise MissingDependencyError(f"gige:// cameras need Aravis 0.8 through PyGObject ({exc}). "
                                     f"To install: {INSTALL_HINT}") from exc
    return Aravis


def glib_error():
    from gi.repository import GLib
    return GLib.Error


# ---------------------------------------------------------------- pixel formats

def to_bgr(data, width: int, height: int, pixel_format: str, camera: str = "camera") -> np.ndarray:
    """One camera buffer as uint8 H×W×3 BGR (see the module docstring for each format's rule)."""
    return decode(data, width, height, pixel_format, camera, with_raw=False)[0]


def decode(data, width: int, height: int, pixel_format: str, camera: str = "camera",
           with_raw: bool = True) -> Tuple[np.ndarray, Optional[RawImage]]:
    """One camera buffer as the frame the model judges (``to_bgr``) and, where that frame is not the
    camera's own pixels (Mono10/12/16: shifted to 8 bits; Bayer: demosaiced), those pixels as
    delivered (a copy: the buffer goes back to Aravis); None for Mono8, RGB8 and BGR8, and without
    ``with_raw`` (no copy is made)."""
    if pixel_format not in SUPPORTED_FORMATS:
        raise SourceError(f"{camera}: pixel format {pixel_format} is not supported "
                          f"(supported: {', '.join(SUPPORTED_FORMATS)}; set PixelFormat)")
    raw = np.frombuffer(data, dtype=np.uint8)
    wide = pixel_format in MONO_BITS and MONO_BITS[pixel_format] > 8
    channels = 3 if pixel_format in ("RGB8", "BGR8") else 1
    needed = width * height * channels * (2 if wide else 1)
    if width < 1 or height < 1 or raw.size < needed:
        raise SourceError(f"{camera}: {pixel_format} buffer of {raw.size} bytes is too small for {width}x{height}")
    raw = raw[:needed]
    if pixel_format == "Mono8":
        return cv2.cvtColor(raw.reshape(height, width), cv2.COLOR_GRAY2BGR), None
    if wide:
        values = raw.view("<u2").reshape(height, width).astype(np.uint16)     # native order, a copy
        shifted = np.minimum(values >> (MONO_BITS[pixel_format] - 8), 255).astype(np.uint8)
        return cv2.cvtColor(shifted, cv2.COLOR_GRAY2BGR), RawImage(values, pixel_format) if with_raw else None
    if pixel_format in BAYER_TO_OPENCV:
        mosaic = raw.reshape(height, width)
        bgr = cv2.cvtColor(mosaic, BAYER_TO_OPENCV[pixel_format])
        return bgr, RawImage(mosaic.copy(), pixel_format) if with_raw else None
    image = raw.reshape(height, width, 3)
    return (cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if pixel_format == "RGB8" else image.copy()), None


def format_name(code: int) -> str:
    return PIXEL_FORMATS.get(int(code), f"0x{int(code):08x}")


# ---------------------------------------------------------------- finding and setting up cameras

@dataclass(frozen=True)
class CameraEntry:
    """A GigE camera as discovery lists it (``mrkd cameras``)."""

    device_id: str
    address: str
    serial: str
    vendor: str
    model: str
    protocol: str

    @property
    def uri(self) -> str:
        return SCHEME + self.address


def list_cameras() -> List[CameraEntry]:
    """The GenICam cameras Aravis discovers now (GigE Vision on every interface, USB3 Vision)."""
    Arv = aravis()
    Arv.update_device_list()
    return [CameraEntry(Arv.get_device_id(i), Arv.get_device_address(i) or "", Arv.get_device_serial_nbr(i) or "",
                        Arv.get_device_vendor(i) or "", Arv.get_device_model(i) or "", Arv.get_device_protocol(i) or "")
            for i in range(Arv.get_n_devices())]


def open_camera(device: str):
    """An Aravis.Camera by IP address, device id, or (through discovery) serial number."""
    Arv, error = aravis(), glib_error()
    try:
        return Arv.Camera.new(device)
    except error as first:
        for entry in list_cameras():
            if device in (entry.serial, entry.device_id, entry.address):
                try:
                    return Arv.Camera.new(entry.device_id)
                except error as exc:
                    raise GigeError(f"gige://{device}: found as {entry.device_id} but cannot open it "
                                    f"({exc.message})") from None
        raise GigeError(f"gige://{device}: no GigE Vision camera answers at that address, serial or device id "
                        f"({first.message}; `mrkd cameras` lists those found)") from None


def _controls(camera) -> bool:
    """Whether this process holds the camera's control channel (GigE Vision; other cameras, and Aravis
    builds without ``is_controller``, count as held)."""
    device = camera.get_device()
    is_controller = getattr(device, "is_controller", None)
    return not (isinstance(device, aravis().GvDevice) and is_controller is not None and not is_controller())


def parse_feature(text: str) -> Tuple[str, str]:
    """"NAME=VALUE" -> (NAME, VALUE) (--feature); FeatureSyntaxError naming the text otherwise."""
    name, sep, value = str(text).partition("=")
    if not sep or not name.strip() or not value.strip():
        raise FeatureSyntaxError(f"--feature {text!r}: expected NAME=VALUE, e.g. ExposureTime=5000")
    return name.strip(), value.strip()


TRIGGER_FEATURES = ("TriggerMode", "TriggerSelector", "TriggerSoftware", "AcquisitionMode")


def check_trigger_features(name: str, trigger: str, features: Sequence[Tuple[str, str]]) -> None:
    """mrkd sets the camera's trigger and acquisition from ``trigger`` (``_setup``): features that set them
    otherwise are refused (TriggerMode=On in free run waited for triggers that never came; TriggerMode=Off
    with --trigger software took free-run images no trigger made). TriggerSource may name the input line
    of --trigger hardware, nothing else."""
    for feature, value in features:
        source_ok = feature == "TriggerSource" and trigger == "hardware" and value != "Software"
        if feature in TRIGGER_FEATURES or (feature == "TriggerSource" and not source_ok):
            raise GigeError(f"camera {name}: feature {feature} = {value}: mrkd sets the trigger and acquisition "
                            f"from --trigger ({trigger} here); leave {feature} out of the features "
                            f"(TriggerSource may only name the input line of --trigger hardware)")


def check_frame_rate(name: str, trigger: str, fps: Optional[float], features: Sequence[Tuple[str, str]]) -> None:
    """--fps is a free-running camera's frame rate (set through AcquisitionFrameRate, ``_set_frame_rate``);
    a triggered camera makes one image per trigger, so a rate there would be ignored without a word."""
    if fps is None:
        return
    if trigger != "free":
        raise GigeError(f"camera {name}: --fps {fps:g} sets a free-running camera's rate; with --trigger "
                        f"{trigger} the camera makes one image per trigger: leave --fps out")
    if any(feature == "AcquisitionFrameRate" for feature, _ in features):
        raise GigeError(f"camera {name}: --fps and the feature AcquisitionFrameRate both set the frame rate; "
                        f"give one of them")


def _set_frame_rate(camera, where: str, fps: float) -> float:
    """Set a free-running camera's frame rate (Aravis sets AcquisitionFrameRate and its enable flag as
    the camera names them) and return the rate it reads back. A rate outside the camera's bounds is
    refused, not clamped: Aravis would quietly run at the nearest bound."""
    if not camera.is_frame_rate_available():
        raise GigeError(f"{where}: the camera has no frame rate setting (AcquisitionFrameRate): leave --fps out")
    low, high = camera.get_frame_rate_bounds()
    if not low <= fps <= high:
        raise GigeError(f"{where}: --fps {fps:g} is outside the camera's frame rates ({low:g} to {high:g})")
    camera.set_frame_rate(fps)
    rate = camera.get_frame_rate()
    if not math.isclose(rate, fps, rel_tol=0.01):
        raise GigeError(f"{where}: asked for {fps:g} frames/s, the camera runs at {rate:g}")
    return rate


def _number(text: str, kind, where: str) -> float:
    try:
        value = kind(float(text)) if kind is int and float(text).is_integer() else kind(text)
    except (TypeError, ValueError):
        raise GigeError(f"{where}: expected {'a whole number' if kind is int else 'a number'}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise GigeError(f"{where}: expected a finite number")
    return value


def apply_features(camera, name: str, features: Sequence[Tuple[str, str]]) -> Dict[str, str]:
    """Set GenICam features in order; returns {feature: value read back}. GigeError names camera,
    feature and value for an unknown feature, a value out of the camera's bounds or refused."""
    device, error = camera.get_device(), glib_error()
    applied: Dict[str, str] = {}
    for feature, text in features:
        where = f"camera {name}: feature {feature} = {text}"
        node = device.get_feature(feature)
        if node is None:
            raise GigeError(f"camera {name}: unknown feature {feature} (value {text}); the camera does not "
                            f"expose it (feature names are the camera's GenICam names, case-sensitive)")
        kind = type(node).__name__
        try:
            if kind == "GcIntegerNode":
                value = _number(text, int, where)
                low, high = device.get_integer_feature_bounds(feature)
                step = device.get_integer_feature_increment(feature) or 1
                if not low <= value <= high or (value - low) % step:
                    raise GigeError(f"{where}: refused, the camera takes {low}..{high}"
                                    + (f" in steps of {step}" if step > 1 else ""))
                device.set_integer_feature_value(feature, value)
                back = device.get_integer_feature_value(feature)
                ok = back == value
            elif kind == "GcFloatNode":
                value = _number(text, float, where)
                low, high = device.get_float_feature_bounds(feature)
                if not low <= value <= high:
                    raise GigeError(f"{where}: refused, the camera takes {low:g}..{high:g}")
                device.set_float_feature_value(feature, value)
                back = device.get_float_feature_value(feature)
                ok = math.isclose(back, value, rel_tol=1e-3, abs_tol=1e-6)
            elif kind == "GcEnumeration":
                entries = list(device.dup_available_enumeration_feature_values_as_strings(feature) or [])
                if text not in entries:
                    raise GigeError(f"{where}: refused, the camera offers {', '.join(entries) or 'no entries'}")
                device.set_string_feature_value(feature, text)
                back = device.get_string_feature_value(feature)
                ok = back == text
            elif kind == "GcBoolean":
                if text.lower() not in ("true", "false", "1", "0", "on", "off"):
                    raise GigeError(f"{where}: expected true or false")
                value = text.lower() in ("true", "1", "on")
                device.set_boolean_feature_value(feature, value)
                back = device.get_boolean_feature_value(feature)
                ok = back == value
            elif kind == "GcStringNode":
                device.set_string_feature_value(feature, text)
                back = device.get_string_feature_value(feature)
                ok = back == text
            else:
                raise GigeError(f"{where}: a {kind.replace('Gc', '').replace('Node', '')} feature cannot be "
                                f"set from a value")
        except error as exc:
            raise GigeError(f"{where}: refused by the camera ({exc.message})") from None
        if not ok:
            raise GigeError(f"{where}: refused, the camera kept {back}")
        applied[feature] = str(back)
        logger.info("camera %s: %s = %s", name, feature, back)
    return applied


# ---------------------------------------------------------------- the source

@dataclass
class GigeStats(SourceStats):
    """SourceStats plus what a GigE camera adds: incomplete buffers (lost packets, never scored),
    triggers without an image in time, and images no part claimed (late images, stray hardware triggers)."""

    incomplete: int = 0
    timeouts: int = 0
    unclaimed: int = 0

    def as_dict(self) -> dict:
        return super().as_dict() | {"incomplete_buffers": self.incomplete, "trigger_timeouts": self.timeouts,
                                    "unclaimed_images": self.unclaimed}


@dataclass
class Grab:
    """What one part trigger got from one camera: its frames (BGR images, each with the camera's own
    bits where they differ, ``Frame.raw``) or why there are none."""

    frames: List[Frame]
    error: Optional[str] = None
    acquired_at: float = 0.0          # time.monotonic() of the last image

    @property
    def images(self) -> List[np.ndarray]:
        return [frame.image for frame in self.frames]


@dataclass
class _TriggerCommand:
    """One software-trigger command, sent on a thread of its own (``GigeSource._send_trigger``)."""

    generation: int                   # the connection it went out on
    done: threading.Event = field(default_factory=threading.Event)
    error: Optional[str] = None       # Aravis' message when the camera did not take it
    answered_at: float = 0.0          # time.monotonic() when Aravis returned
    abandoned: bool = False           # its part stopped waiting for it (deadline or stop)


@dataclass
class _Arrival:
    wall: float                       # time.time() when the buffer was popped (the frame's timestamp)
    image: Optional[np.ndarray]       # None: an incomplete buffer
    popped: float                     # time.monotonic() when the buffer was popped
    reason: str = ""
    started: Optional[float] = None   # time.monotonic() scale: when its leader packet arrived (None: unknown)
    index: int = 0
    raw: Optional[RawImage] = None    # the camera's own bits where the image is not them (decode)
    block_id: int = 0                 # the camera's number for the image (GVSP block id); 0: unknown

    @property
    def arrived(self) -> float:
        """When it began to arrive (monotonic): the leader packet's time, else when it was popped."""
        return self.popped if self.started is None else self.started


# A buffer is popped within this long of its leader packet (a frame's packets and their resends); a
# converted leader time outside it means the wall clock stepped in between: the pop time stands instead.
LEADER_TO_POP_MAX_S = 5.0


def leader_monotonic(stamp_ns: int, wall: float, popped: float) -> Optional[float]:
    """Aravis' leader stamp (ns of the host's wall clock; 0: none) on the monotonic clock, by the two
    clocks' offset read when the buffer was popped (``wall``, ``popped``); None where it cannot be had."""
    if stamp_ns <= 0:
        return None
    started = popped - (wall - stamp_ns / 1e9)
    return started if popped - LEADER_TO_POP_MAX_S <= started <= popped else None


# GVSP numbers a camera's images: 16-bit block ids run 1..65535 and then 1 again (0 is not a block id);
# GigE Vision 2's extended ids are 64-bit and do not wrap in practice.
SHORT_BLOCK_IDS = 65535


def block_id_after(block_id: int) -> int:
    """The id of the image a camera sends after ``block_id``."""
    return 1 if block_id == SHORT_BLOCK_IDS else block_id + 1


def block_ids_apart(got: int, wanted: int) -> int:
    """How many images after ``wanted`` ``got`` comes (negative: before it), across the 16-bit wrap."""
    if got > SHORT_BLOCK_IDS or wanted > SHORT_BLOCK_IDS:
        return got - wanted
    apart = (got - wanted) % SHORT_BLOCK_IDS
    return apart - SHORT_BLOCK_IDS if apart > SHORT_BLOCK_IDS // 2 else apart


class GigeSource(LatestFrameSource):
    """A GigE Vision camera (module docstring). ``device``: IP, serial or Aravis device id."""

    live = True
    paced = False
    BUFFERS = 8
    POP_US = 100_000                  # the reader's wait for a buffer: a stop is seen within this
    LATE_IMAGE_S = 0.2                # after a timeout, how long a late image may still take to land
    SILENT_TRIGGERS = 2               # software triggers in a row without any image: reopen the stream
    SHIFTED_TRIGGERS = 3              # triggers in a row seeing only earlier ids: count again

    def __init__(self, uri: str, device: str, features: Sequence[Tuple[str, str]] = (), trigger: str = "free",
                 size: Optional[Tuple[int, int]] = None, reconnect: bool = True,
                 backoff: Tuple[float, float] = (0.1, 5.0), name: Optional[str] = None,
                 fps: Optional[float] = None, **_ignored):
        if trigger not in TRIGGER_MODES:
            raise GigeError(f"{uri}: trigger {trigger!r}: use one of {', '.join(TRIGGER_MODES)}")
        super().__init__(uri, size=size)
        self.stats = GigeStats()
        self.device, self.trigger_mode, self.name = device, trigger, name or uri
        check_trigger_features(self.name, trigger, features)
        check_frame_rate(self.name, trigger, fps, features)
        self.fps = fps
        self.features = tuple(features)
        self._reconnect, self._backoff = reconnect, backoff
        self.features_applied: Dict[str, str] = {}
        self._camera = self._stream = None
        self._lost = threading.Event()            # control lost: reconnect
        self._signals = _SignalGate()             # the control-lost handlers on Aravis' heartbeat thread
        self._lost_signal: Optional[Tuple[object, int]] = None   # (device, handler id) of the camera set up last
        self._generation = 0                      # counts connections
        self._timed_out = False                   # the last software trigger got no image in time
        self._silent = 0                          # software triggers in a row that got no image at all
        self._arrived = 0                         # counts the images (whole or not) of triggered mode
        self._next_block_id: Optional[int] = None  # the id the next trigger's image gets (None: unknown)
        self._shifted = 0                         # triggers in a row that saw only earlier triggers' images
        self._earlier_after_sent = False          # this trigger saw an earlier trigger's image land after it
        self._command: Optional[_TriggerCommand] = None   # the last software trigger until it is settled
        self._lost_why = "control lost"           # what the reader says when it reconnects
        self._cond = threading.Condition()
        self._arrivals: Deque[_Arrival] = deque(maxlen=self.BUFFERS)
        self._latest: Optional[Frame] = None
        self._stop = threading.Event()
        self._reopening = False                   # the reader is inside _connect (Aravis' open: seconds)
        self._ended = False
        self._buffer_warned = False
        self.serial: Optional[str] = None          # of the camera found at the first connect (_check_same_camera)
        self._connect()                           # errors here (bad feature, no camera) end the start
        self._thread = threading.Thread(target=self._reader, name=f"gige:{device}", daemon=True)
        self._thread.start()

    # -- connection
    def _connect(self) -> None:
        aravis()        # the binding, or one clear error before the camera is opened
        camera = self._open_when_free()
        if self._stop.is_set():      # closed while Aravis opened it (close() does not wait for an open)
            self._release(camera, wait=False)
            camera = None
            return
        try:
            self._check_same_camera(camera)
            self._setup(camera)
        except BaseException as exc:
            self._release(camera)
            camera = None
            # The traceback's frames (and those of the error it was raised from) hold the camera:
            # a caller that keeps the error would keep the camera in control of the device (no one
            # else can open it), and a reference cycle through it would leave the camera to the
            # garbage collector, which finalises it on whatever thread runs then; finalising waits
            # seconds for a camera that is gone (a 5 s stall of the part runner was seen). Raise the
            # error alone: its message says what went wrong.
            exc.__context__ = exc.__cause__ = None
            raise exc.with_traceback(None)
        self._camera = camera
        self._lost.clear()

    def _open_when_free(self):
        """The camera, opened; while another application controls it, opened again (Aravis itself asks
        for control for about 2.5 s per open) until CONTROL_WAIT_S have passed. A run killed a moment ago
        (a supervisor restarting it at once) holds the camera until its heartbeat timeout runs out
        (GigE Vision's default 3 s), so a restart that came sooner was refused. Past the wait, _setup's
        check names who is in the way."""
        deadline = time.monotonic() + CONTROL_WAIT_S
        said = False
        while True:
            camera = open_camera(self.device)
            if _controls(camera) or time.monotonic() >= deadline or self._stop.is_set():
                return camera
            self._release(camera)
            camera = None
            if not said:
                said = True
                logger.warning("camera %s (%s): another application controls the camera; waiting up to %g s for "
                               "it to let go (a run stopped a moment ago does within its heartbeat timeout)",
                               self.name, self.uri, CONTROL_WAIT_S)
            self._stop.wait(0.5)

    def _check_same_camera(self, camera) -> None:
        """A reconnect must find the camera the run started with: another one answering at the same
        address (a swapped camera, another's IP) would be judged with this camera's model and features
        without a word. Its serial number (else its device id) is compared; the first connect records it."""
        try:
            identity = camera.get_device_serial_number() or camera.get_device_id() or ""
        except glib_error():
            identity = ""
        if self.serial is None:
            self.serial = identity
        elif identity and self.serial and identity != self.serial:
            raise GigeError(f"camera {self.name} ({self.uri}): another camera answers there now (serial {identity}, "
                            f"the run started with {self.serial}); it stays down until camera {self.serial} is back")

    @staticmethod
    def _check_control(camera, where: str) -> None:
        """A GigE Vision camera takes orders from one application at a time (its control channel
        privilege). Aravis opens a camera that another application holds without a word, and every
        write then times out ("write_register timeout"), which reads like a network fault: say who is
        in the way instead. (Aravis builds without ``is_controller`` are not checked.)"""
        if not _controls(camera):
            raise GigeError(f"{where}: another application controls the camera (a viewer such as arv-viewer, "
                            f"another mrkd, or another camera of this run naming the same camera): a camera takes "
                            f"orders from one application at a time; close the other one")

    def _setup(self, camera) -> None:
        Arv, error = aravis(), glib_error()
        where = f"camera {self.name} ({self.uri})"
        self._check_control(camera, where)
        try:
            # A run killed while acquiring leaves the camera acquiring, its stream going to the dead run's
            # socket; AcquisitionStart on a camera already acquiring changes nothing, so a run restarted
            # at once got no image until it gave the camera up as lost (first parts ERROR "timeout").
            # Stopped first, the camera takes this run's stream channel from the next AcquisitionStart.
            try:
                camera.stop_acquisition()
            except error:
                pass            # a camera that refuses AcquisitionStop while idle: nothing to stop
            camera.set_acquisition_mode(Arv.AcquisitionMode.CONTINUOUS)
            if self.trigger_mode == "free":
                if camera.get_device().get_feature("TriggerMode") is not None:
                    camera.get_device().set_string_feature_value("TriggerMode", "Off")
            elif self.trigger_mode == "software":
                if not camera.is_software_trigger_supported():
                    raise GigeError(f"{where}: no software trigger (TriggerSoftware); use --trigger hardware or free")
                camera.set_trigger("Software")
            else:
                sources = list(camera.dup_available_trigger_sources() or [])
                hardware = next((s for s in sources if s != "Software"), None)
                if hardware is None:
                    raise GigeError(f"{where}: no hardware trigger source (it offers {', '.join(sources) or 'none'})")
                camera.set_trigger(hardware)     # TriggerSource in the features may name another line
        except error as exc:
            raise GigeError(f"{where}: cannot set trigger mode {self.trigger_mode} ({exc.message})") from None
        self.features_applied = apply_features(camera, self.name, self.features)
        if self.fps is not None:
            try:
                rate = _set_frame_rate(camera, where, self.fps)
            except error as exc:
                raise GigeError(f"{where}: cannot set the frame rate to {self.fps:g} ({exc.message})") from None
            self.features_applied["AcquisitionFrameRate"] = f"{rate:g}"
        try:
            device = camera.get_device()
            self._generation += 1
            generation = self._generation    # a dropped connection's late signal must not touch this one
            with self._cond:                 # a camera opened again may number its images afresh
                self._next_block_id = None
                self.stats.unclaimed += len(self._arrivals)
                self._arrivals.clear()
            self._lost_signal = (device, device.connect("control-lost", self._on_control_lost, generation))
            gige = isinstance(device, Arv.GvDevice)
            if gige:
                # Aravis' packet-socket receiver (used when the process may open raw sockets, e.g. as
                # root) captures every IP packet on the interface until its filter is attached; one
                # stray packet parsed as GVSP set its last frame id to garbage and the camera's next
                # ~100 frames were dropped as "late" (seen against the simulator; Aravis 0.8.26 and
                # master attach the filter after bind). The plain UDP socket sees only its own port.
                device.set_stream_options(Arv.GvStreamOption.PACKET_SOCKET_DISABLED)
            stream = camera.create_stream(None, None)
            if stream is None:
                raise GigeError(f"{where}: cannot create a stream")
            payload = camera.get_payload()
            if gige:
                self._size_receive_buffer(stream, payload)
            for _ in range(self.BUFFERS):
                stream.push_buffer(Arv.Buffer.new_allocate(payload))
            camera.start_acquisition()
        except error as exc:
            raise GigeError(f"{where}: cannot start acquisition ({exc.message})") from None
        self._stream = stream
        self.pixel_format = camera.get_pixel_format_as_string()

    def _on_control_lost(self, _device, generation: int) -> None:
        """(Aravis' heartbeat thread.) Marks the camera down, inside the gate that keeps the camera from
        being let go of until this handler and its reference to the device are gone (_SignalGate)."""
        with self._signals:
            if generation == self._generation:
                self._lost.set()

    def _size_receive_buffer(self, stream, payload: int) -> None:
        """A frame comes as one burst of packets, so the stream socket must hold about two frames
        before the first one arrives. Aravis sizes it only when a frame has begun (too late for that
        frame: the kernel's default, ~208 KiB, drops most of a 512x512 image), so it is sized here.
        Warn once when the kernel grants less than a frame (net.core.rmem_max, without root)."""
        Arv = aravis()
        granted = set_receive_buffer(stream.get_port(), 2 * payload)
        if granted is None:      # not found (no /proc?): let Aravis size it from the first frame on
            stream.set_property("socket-buffer", Arv.GvStreamSocketBuffer.AUTO)
            return
        if granted // 2 < payload and not self._buffer_warned:     # the kernel reports twice the data room
            self._buffer_warned = True
            logger.warning("camera %s: a frame is %d bytes but the stream socket holds only %d; images may "
                           "arrive incomplete (sudo sysctl -w net.core.rmem_max=%d)", self.name, payload,
                           granted // 2, 4 * payload)

    def _release(self, camera=None, wait: bool = True) -> None:
        """Stop and drop a camera. A lost one is dropped on a thread of its own: finalising an Aravis
        device asks the camera to give up control and waits seconds for a camera that is gone."""
        owned = camera is None or camera is self._camera
        # The handler goes with its camera: the reader connects again only after letting go, so a handler
        # still connected is the one of the camera let go of here (set up, or whose setup failed).
        signal, self._lost_signal = self._lost_signal, None
        doomed = [camera or self._camera, self._stream if owned else None, signal]
        if owned:
            self._camera = self._stream = None
        camera = None
        if wait:
            _drop(doomed, self._signals)
        else:
            threading.Thread(target=_drop, args=(doomed, self._signals), name="gige-release", daemon=True).start()

    @property
    def up(self) -> bool:
        return self._camera is not None and not self._lost.is_set()

    # -- reading
    def _reader(self) -> None:
        delay = self._backoff[0]
        refused = None      # the last reason a reconnect failed, said once (a swapped camera stays down by design)
        while not self._stop.is_set():
            if self._camera is None or self._lost.is_set():
                if self._camera is not None:
                    self.stats.last_error = f"camera lost ({self._lost_why})"
                    logger.warning("camera %s (%s): lost (%s); reconnecting with backoff", self.name, self.uri,
                                   self._lost_why)
                    self._lost_why = "control lost"
                    self._release(wait=False)
                    with self._cond:
                        self._cond.notify_all()
                if not self._reconnect:
                    break
                self._reopening = True
                try:
                    self._connect()
                except SourceError as exc:
                    self.stats.last_error = str(exc)
                    if str(exc) != refused:     # each new reason once: the stats alone reach no status or log
                        refused = str(exc)
                        logger.warning("camera %s: not reconnected: %s; trying again", self.name, refused)
                    self._stop.wait(delay)
                    delay = min(delay * 2, self._backoff[1])
                    continue
                finally:
                    self._reopening = False
                if self._stop.is_set():
                    break
                delay, refused = self._backoff[0], None
                self.stats.reconnects += 1
                logger.warning("camera %s: reconnected%s", self.name, f", features re-applied {self.features_applied}"
                               if self.features_applied else "")
                with self._cond:
                    self._cond.notify_all()
                continue
            stream = self._stream
            buffer = stream.timeout_pop_buffer(self.POP_US)
            if buffer is not None:
                try:
                    self._take(buffer)
                finally:
                    # Aravis sets a buffer's block id and leader time only when the leader packet comes:
                    # a buffer whose leader is lost would carry the ones of its last use.
                    buffer.set_frame_id(0)
                    buffer.set_system_timestamp(0)
                    stream.push_buffer(buffer)
            del stream, buffer     # the reader must not keep a lost camera's stream alive
        # A camera that is down, or whose trigger command is still inside Aravis (it holds the device's
        # command lock through its retries), would keep the reader, and close() with it, waiting
        # seconds to stop acquisition: let go of it on a thread of its own.
        self._release(wait=self.up and not self._command_running())
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def keep_camera_bits(self, keep: bool) -> None:
        with self._cond:
            self.keeps_camera_bits = keep
            if keep and self._latest is not None and self._latest.raw is None:
                # decoded before the line asked (between the open and the run's start): the next frame
                # is judged instead, so an alarm's evidence has the camera bits from the first frame
                self._latest = None

    def _take(self, buffer) -> None:
        Arv = aravis()
        index = self._next_index
        self._next_index += 1
        status = buffer.get_status()
        image, raw, reason = None, None, ""
        with_raw = self.keeps_camera_bits
        if status != Arv.BufferStatus.SUCCESS:
            self.stats.incomplete += 1
            self.stats.bad_frames += 1
            reason = f"incomplete buffer ({status.value_nick})"
            self.stats.last_error = f"frame {index}: {reason}"
            self._warnings.warn("incomplete", "camera %s: %s (%d so far)", self.name, reason, self.stats.incomplete)
        else:
            try:
                bgr, raw = decode(buffer.get_image_data(), buffer.get_image_width(), buffer.get_image_height(),
                                  format_name(buffer.get_image_pixel_format()), f"camera {self.name}",
                                  with_raw=with_raw)
            except SourceError as exc:
                bgr, reason = None, str(exc)
            image = self._deliverable(bgr, index, reason or None) if bgr is not None else None
            if bgr is None:
                self.stats.bad_frames += 1
                self.stats.last_error = reason
                self._warnings.warn("format", "%s", reason)
        with self._cond:
            if self.trigger_mode == "free":
                if image is not None and with_raw != self.keeps_camera_bits:
                    pass        # decoded while keep_camera_bits changed: the next frame is judged instead
                elif image is not None:
                    if self._latest is not None:
                        self.stats.dropped += 1
                    self._latest = Frame(index, image, time.time(), self.uri, raw, arrived=time.monotonic())
            else:
                wall, popped = time.time(), time.monotonic()
                started = leader_monotonic(buffer.get_system_timestamp(), wall, popped)
                self._arrivals.append(_Arrival(wall, image, popped, reason, started, index, raw,
                                               buffer.get_frame_id()))
                self._arrived += 1
            self._cond.notify_all()

    # -- triggered mode
    def grab(self, trigger_mono: float, timeout: float, count: int = 1,
             abort: Optional[threading.Event] = None, early: float = 0.25) -> Grab:
        """The ``count`` image(s) of one part trigger (``trigger_mono``: when mrkd heard of it, on the
        monotonic clock), waiting at most
        ``timeout`` seconds for each. Software: the camera is triggered once per image, and its image
        is the one numbered as that trigger's, or where no number is known, one whose leader packet
        arrived after the trigger was sent (module docstring; earlier ones are stale: counted as
        unclaimed). Hardware: an image whose leader arrived up to ``early`` seconds
        before mrkd heard of the trigger belongs to it (the camera's I/O may beat the PLC's message);
        older ones are unclaimed. More than ``count`` images in that early window is a stray trigger
        among them: the part is an ERROR ("ambiguous") and they are all unclaimed, rather than one taken
        for this part and the next part judged on this one's image. ``abort`` (the line stopping) ends
        the wait at once with "line stopped"."""
        if self.trigger_mode == "free":
            raise GigeError(f"camera {self.name}: grab needs --trigger software or hardware")
        images: List[Frame] = []
        acquired = time.monotonic()
        for _ in range(count):
            if self.trigger_mode == "software" and self._timed_out:
                # The image of a trigger that timed out may still be on its way (packet resends): let it
                # land and discard it. The whole LATE_IMAGE_S, whatever the part timeout: a shorter wait
                # let such an image start after the next trigger, where its timestamp cannot tell them apart.
                self._stop.wait(self.LATE_IMAGE_S)
                self._timed_out = False
            deadline = time.monotonic() + timeout     # the trigger command counts against it too
            if self.trigger_mode == "software":
                why = self._settle_command(deadline, timeout, abort)
                if why is not None:
                    return Grab(images, why)
            with self._cond:
                if not self.up:
                    return Grab(images, "camera down")
                if self.trigger_mode == "software":
                    for stale in self._arrivals:
                        self._learn(stale.block_id)
                    self.stats.unclaimed += len(self._arrivals)
                    self._arrivals.clear()
                    seen = self._arrived
                else:
                    while self._arrivals and self._arrivals[0].arrived < trigger_mono - early:
                        self._arrivals.popleft()
                        self.stats.unclaimed += 1
                    wanted = self._owe_block_id()
                    for late in [a for a in self._arrivals if self._earlier(a, wanted)]:
                        self._arrivals.remove(late)          # an earlier part's, landed late: not a stray
                        self.stats.unclaimed += 1
                        self._earlier_after_sent = True
                    if not images:
                        before = sum(1 for a in self._arrivals if a.arrived < trigger_mono)
                        if before > count:
                            self.stats.unclaimed += before
                            for _ in range(before):
                                self._arrivals.popleft()
                            return Grab(images, f"ambiguous: {before} images arrived in the {early:g} s before "
                                                f"the trigger, {count} expected (a stray hardware trigger?)")
            sent = trigger_mono - early       # hardware: the window's start, as _fresh takes it
            if self.trigger_mode == "software":
                sent = time.monotonic()
                why = self._send_trigger(deadline, timeout, abort)
                if why is not None:
                    return Grab(images, why)
                with self._cond:
                    wanted = self._owe_block_id()

            def ready() -> bool:
                return (self._fresh(sent, wanted) or not self.up or self._stop.is_set()
                        or (abort is not None and abort.is_set()))
            with self._cond:
                got = ready()
                while not got and time.monotonic() < deadline:   # in slices: ``abort`` does not notify _cond
                    got = self._cond.wait_for(ready, min(0.1, max(0.0, deadline - time.monotonic())))
                if not self._arrivals:
                    if got and not self.up:
                        return Grab(images, "camera down")
                    if abort is not None and abort.is_set():
                        return Grab(images, "line stopped")
                    self.stats.timeouts += 1
                    self._timed_out = True
                    self._count_shifted()
                    if self.trigger_mode == "software":
                        # images of earlier triggers still landing: the stream delivers, only late
                        self._silent = self._silent + 1 if self._arrived == seen else 0
                        if self._silent >= self.SILENT_TRIGGERS:
                            # The camera answers but its images never arrive (a stream that stopped
                            # delivering, e.g. one whose frame ids were thrown off by a stray packet):
                            # without a new stream every later part would be a timeout too.
                            self._silent = 0
                            self._lost_why = f"{self.SILENT_TRIGGERS} software triggers in a row without an image"
                            self._lost.set()
                    return Grab(images, f"timeout: no image within {timeout:g} s")
                arrival = self._arrivals.popleft()
                self._silent = 0
                self._learn(arrival.block_id)
                self._shifted = 0
            if arrival.image is None:
                return Grab(images, arrival.reason or "unusable image")
            images.append(Frame(arrival.index, arrival.image, arrival.wall, self.uri, arrival.raw))
            acquired = time.monotonic()
            self.stats.frames_read += 1
        return Grab(images, None, acquired)

    def _send_trigger(self, deadline: float, timeout: float, abort: Optional[threading.Event]) -> Optional[str]:
        """Trigger the camera and wait for Aravis to say the camera took it, until ``deadline``
        (time.monotonic()); None when it did, else why this part has no image. The command goes on
        its own thread: against a camera that just died Aravis waits out its retries (module docstring)."""
        camera = self._camera
        if camera is None:
            return "camera down"
        command = self._command = _TriggerCommand(self._generation)
        threading.Thread(target=self._run_trigger, args=(camera, command), name=f"gige-trigger:{self.device}",
                         daemon=True).start()
        del camera
        if not self._wait_command(command, deadline, abort):
            command.abandoned = True
            if self._stopping(abort):
                return "line stopped"
            self.stats.timeouts += 1
            self._timed_out = True
            logger.warning("camera %s: the trigger command got no answer within %g s", self.name, timeout)
            return f"timeout: the camera did not answer the trigger within {timeout:g} s"
        self._command = None
        if command.error is not None:
            return f"camera down (trigger failed: {command.error})"
        return None

    def _settle_command(self, deadline: float, timeout: float, abort: Optional[threading.Event]) -> Optional[str]:
        """Before a new trigger: the last one's command must have returned (Aravis sends one command
        at a time, and its answer decides whether the camera is down), waited for until ``deadline``.
        One that returned after its part gave up on it may still bring an image: let that land
        (``LATE_IMAGE_S`` after the answer; the image is then discarded before the trigger)."""
        previous = self._command
        if previous is None:
            return None
        if not self._wait_command(previous, deadline, abort):
            if self._stopping(abort):
                return "line stopped"
            self.stats.timeouts += 1
            return f"timeout: the camera did not answer the last trigger command within {timeout:g} s"
        if previous.abandoned and previous.error is None:
            with self._cond:     # the camera took that trigger: its image, if it comes, has the next id
                if self._next_block_id is not None and previous.generation == self._generation:
                    self._next_block_id = block_id_after(self._next_block_id)
            settled = previous.answered_at + self.LATE_IMAGE_S
            self._stop.wait(max(0.0, min(settled, deadline) - time.monotonic()))
            if time.monotonic() < settled:      # past the deadline first: the next part waits out the rest
                if self._stopping(abort):
                    return "line stopped"
                self.stats.timeouts += 1
                return f"timeout: an earlier trigger's late image may still come; none sent within {timeout:g} s"
        self._command = None
        return None

    def _wait_command(self, command: _TriggerCommand, deadline: float, abort: Optional[threading.Event]) -> bool:
        """Whether ``command`` returned by ``deadline``; in slices, so a stopping line ends the wait."""
        while not command.done.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping(abort):
                return False
            command.done.wait(min(0.1, left))
        return True

    def _command_running(self) -> bool:
        command = self._command
        return command is not None and not command.done.is_set()

    def _stopping(self, abort: Optional[threading.Event]) -> bool:
        return self._stop.is_set() or (abort is not None and abort.is_set())

    def _run_trigger(self, camera, command: _TriggerCommand) -> None:
        """(The command's thread.) It ends when Aravis returns; a failure marks the camera down, unless
        the reader has connected again meanwhile (that connection is not this command's to drop)."""
        try:
            camera.software_trigger()
        except Exception as exc:      # GLib.Error mostly; whatever it is, the camera did not take the trigger
            command.error = str(getattr(exc, "message", exc))
            if command.generation == self._generation:
                self._lost.set()
        finally:
            del camera        # a lost camera is finalised by whoever lets go of it last: never the part's thread
            command.answered_at = time.monotonic()
            command.done.set()

    def _fresh(self, sent: float, wanted: Optional[int]) -> bool:
        """(Lock held.) Whether an image of the trigger sent at ``sent`` (hardware: the start of its
        early window) is waiting, the image the camera numbers ``wanted`` (None: not known yet). Images
        of earlier triggers are dropped, counted: those numbered before ``wanted``, however late they
        land, and, where the number is not known, those whose leader came before ``sent``. (A buffer
        without a leader time, or whose time a clock step spoilt, is judged by when it was popped.)"""
        while self._arrivals:
            arrival = self._arrivals[0]
            if arrival.block_id and wanted is not None:
                apart = block_ids_apart(arrival.block_id, wanted)
                if apart == 0 or (apart > 0 and arrival.arrived >= sent):
                    return True      # ahead of the count: an image no trigger of ours asked for came first
                if apart < 0 and arrival.arrived >= sent:
                    self._earlier_after_sent = True
            elif arrival.arrived >= sent:
                return True
            self._arrivals.popleft()
            self.stats.unclaimed += 1
        return False

    def _owe_block_id(self) -> Optional[int]:
        """(Lock held; a trigger the camera took.) The id its image will have (None: not known); the
        next trigger is owed the one after."""
        wanted = self._next_block_id
        if wanted is not None:
            self._next_block_id = block_id_after(wanted)
        self._earlier_after_sent = False
        return wanted

    @staticmethod
    def _earlier(arrival: _Arrival, wanted: Optional[int]) -> bool:
        return bool(arrival.block_id) and wanted is not None and block_ids_apart(arrival.block_id, wanted) < 0

    def _learn(self, block_id: int) -> None:
        """(Lock held.) An image numbered ``block_id`` came: the next trigger's image comes after it."""
        if block_id and (self._next_block_id is None or block_ids_apart(block_id, self._next_block_id) >= 0):
            self._next_block_id = block_id_after(block_id)

    def _count_shifted(self) -> None:
        """(Lock held; a trigger timed out.) A camera that made one image for two triggers, or skipped one
        (a trigger while it was busy), numbers every later image one below the count: each trigger would see
        only the image "of the one before" and time out. After SHIFTED_TRIGGERS such triggers in a row
        the count is dropped and taken again from the next image."""
        self._shifted = self._shifted + 1 if self._earlier_after_sent else 0
        if self._shifted >= self.SHIFTED_TRIGGERS:
            self._shifted = 0
            self._next_block_id = None

    def close(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            # A reader inside Aravis' open of a camera that is down (about 2.5 s that nothing in Python
            # can cut short) is not waited for: it sees the stop when the open returns, lets go of what
            # it opened and ends on its own (_connect).
            deadline = time.monotonic() + 2.0
            while self._thread.is_alive() and not self._reopening and time.monotonic() < deadline:
                self._thread.join(timeout=0.05)
        self._closed = True
        with self._cond:
            self._cond.notify_all()
        super().close()


def set_receive_buffer(port: int, size: int) -> Optional[int]:
    """Set SO_RCVBUF to ``size`` on this process's UDP socket bound to ``port`` (found through /proc,
    Linux); root may exceed net.core.rmem_max (SO_RCVBUFFORCE). Returns what the kernel granted
    (it reports twice the data room), or None when there is no such socket."""
    try:
        inodes = set()
        for table in ("/proc/net/udp", "/proc/net/udp6"):
            if os.path.exists(table):
                with open(table) as rows:
                    for line in rows.read().splitlines()[1:]:
                        fields = line.split()
                        if int(fields[1].rsplit(":", 1)[1], 16) == port:
                            inodes.add(f"socket:[{fields[9]}]")
        if not inodes:
            return None
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}") not in inodes:
                    continue
            except OSError:        # closed meanwhile
                continue
            with socket.fromfd(int(fd), socket.AF_INET, socket.SOCK_DGRAM) as sock:     # a dup: same socket
                try:
                    sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), size)
                except OSError:    # not privileged: capped at net.core.rmem_max
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
                return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    except (OSError, ValueError, IndexError):
        return None
    return None


class _SignalGate:
    """Counts the control-lost handlers running on Aravis' heartbeat thread, so a lost camera is let go of
    only once none is inside and ``GRACE_S`` after the last one left. An Aravis device finalised on its
    own heartbeat thread joins that thread from itself, and GLib aborts the whole process ("GLib-ERROR
    ... g_system_thread_wait: error 'Resource deadlock avoided'", SIGTRAP). That happened when the
    reader, woken by the handler's ``_lost.set()``, let go of the camera before the handler had
    returned: PyGObject drops the handler's own reference to the device after it returns, and that
    reference was then the last. The grace covers the few steps between leaving the gate and that drop
    (no Python code runs there, but the GIL may be handed over once before it)."""
    GRACE_S = 0.5
    WAIT_S = 10.0        # a handler never takes this long; a stuck one must not keep a release forever

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inside = 0
        self._left_at = -math.inf

    def __enter__(self) -> "_SignalGate":
        with self._cond:
            self._inside += 1
        return self

    def __exit__(self, *_exc) -> None:
        with self._cond:
            self._inside -= 1
            self._left_at = time.monotonic()
            self._cond.notify_all()

    def settle(self) -> None:
        """Return once no handler is inside and the last one left at least GRACE_S ago (at once when
        none ran lately: a camera closed while up does not wait)."""
        with self._cond:
            self._cond.wait_for(lambda: self._inside == 0, self.WAIT_S)
            left = self._left_at + self.GRACE_S - time.monotonic()
        if left > 0:
            time.sleep(left)


def _drop(doomed: list, signals: Optional[_SignalGate] = None) -> None:
    """Stop acquisition and let go of [camera, stream, (device, control-lost handler)] (the last
    references: they finalise here). The handler is disconnected first: finalising a lost device takes
    seconds (it asks the camera to give up control), and a control-lost its heartbeat thread emitted
    meanwhile, handled in Python, gave the dying device a new reference that ended on that thread, which
    then finalised the device again and joined itself (GLib aborted the process; see _SignalGate)."""
    signal = doomed[2] if len(doomed) > 2 else None
    if signal is not None:
        device, handler = signal
        try:
            device.disconnect(handler)
        except Exception:   # already gone with its device: nothing left to call
            pass
        device = signal = None
    camera = doomed[0]
    if camera is not None:
        try:
            camera.stop_acquisition()
        except Exception:   # a camera that is gone cannot stop; letting go is all that is left
            pass
    camera = None
    if signals is not None:
        signals.settle()
    doomed.clear()


def open_gige(uri: str, options) -> GigeSource:
    """The ``gige://`` opener (``open_source`` dispatches by scheme)."""
    device = uri[len(SCHEME):].strip().strip("/")
    if not device:
        raise GigeError(f"{uri}: name the camera, e.g. gige://192.168.1.20, gige://SERIAL or gige://DEVICE-ID")
    return GigeSource(uri, device, features=options.features, trigger=options.trigger, size=options.size,
                      reconnect=options.reconnect, backoff=options.backoff, name=options.name or uri,
                      fps=options.fps)
