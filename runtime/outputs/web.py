"""The ``--http HOST:PORT`` server of a line: ``/metrics`` and ``/healthz`` (runtime/outputs/metrics.py; /metrics
rendered at most once per 0.5 s and shared by every scrape within it: a scrape shows every change made 0.5 s
or more before it) and a read-only operator page.

* ``/``: one card per camera with its annotated live view, its status (up/down, fps, latency,
  threshold and where it came from) and the latest alarms with their snapshots, updated live.
* ``/stream/<camera>.mjpg``: the annotated live view as MJPEG (multipart/x-mixed-replace); a triggered
  camera's is the last part's judged image, until the next part.
* ``/events``: Server-Sent Events: ``hello`` (cameras, recent alarms, outputs), ``alarm`` as each
  happens, ``status`` and ``outputs`` (every output's health: sent/failed, failing or not) once a second.
  With review on, every alarm carries its standing label from the label file (``review``: label, who,
  when, and the label a correction replaced; each camera's row of a part has its own), and ``labels``
  is sent when the file changed (the page's own POST /review, or `mrkd review` beside it). A run started
  on an existing events log shows its latest alarms from the log's end (recent_events.py), so a restart
  does not empty the review view.
  After a hot swap ``status`` (at once) and ``hello`` name the new model and threshold; every alarm
  names the ``model_sha256`` that judged it.
  Camera URIs are shown with their credentials redacted (CameraInfo.source). ``hello`` also says
  whether review is on (``review``) and, with ``--shadow``, ``shadow`` (sent once a second too): the
  candidate's hash, frames compared, disagreement rate and score correlation.
* ``/alarm/<event_id>.jpg``: an alarm's snapshot (the file written with the event; without
  ``--snapshots``, the annotated frame of the alarm, encoded on request; when the page no longer holds
  the frame, as after a restart, a bounded JPEG of the event's evidence file: alarm_images.py; else 404,
  and the page shows "no image"). In triggered mode an NG or ERROR part is shown as one alarm per camera
  that has an image (``?camera=NAME`` picks its image).
* ``/mask/<camera>``: an ignore-mask editor (mask_editor.html): rectangles dragged over the camera's latest
  judged image become a black/white PNG of that image's size, made and downloaded in the browser; the line
  is not changed. ``/frame/<camera>.png``: that image, lossless (encoded on request; 404 before the first),
  with ``X-Mask-Margin: X Y``, how far its model's smoothed map lets a bright area bleed (MapGeometry), and
  ``X-Ignore-Mask: SHA256`` when it was judged under a mask; ``/ignore_mask/<sha256>.png`` is that mask (white:
  not judged), so the editor starts from the mask in force. Named by hash, not camera: a recipe change
  between the two requests cannot pair an image with another image's mask.

Off the hot path by construction: the loop-thread hooks only store a reference to the newest result
and put small records on bounded queues. JPEG encoding for the browser happens on one thread per
camera, only while a client watches that camera, at most ``stream_fps`` times a second; every
watcher of a camera shares its one encoded frame. Nothing here can change the line (GET only) unless
the line was started with a control token: then ``POST /review`` and ``/reload`` (runtime/control.py)
take ``Authorization: Bearer TOKEN``; the page's review view (page.html) sends it from a token the
operator types in (kept in the tab's sessionStorage, never in a URL).

Clients that misbehave are bounded (OperatorServer): a whole request within ``request_timeout_s`` (a POST
body within a few seconds, at 1 KB/s at least), at most ``max_connections`` at once, and requests addressed
to this machine only: bound to loopback, to a loopback name; bound beyond it, to an IP address, localhost or
a name allowed with ``--http-allow-host`` (a DNS-rebinding page is refused, never served). HEAD is GET
without the body; any other method is 405 with ``Allow``. A snapshot is served only as a regular file
with one name (no hard link) below the ``--snapshots`` folder, reached through no link: neither the file,
nor a camera folder, nor the folder itself replaced by a link after the page started is followed
(served_folder.py); an evidence file likewise below the ``--evidence`` folder, and only with the sha256
its event names.
``tls`` (``--http-cert``/``--http-key``) serves HTTPS only; a token from the network needs it
(runtime/control.py).
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import queue
import re
import select
import socket
import ssl
import sys
import threading
import time
from collections import deque
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple
from urllib.parse import parse_qs, quote

import cv2
import numpy as np

from mrkd.errors import SettingError
from mrkd.runtime.ignore_mask import IgnoreMask
from mrkd.runtime.addresses import is_loopback_host
from mrkd.runtime.outputs.events import DropOldestQueue, part_event, wants_event
from mrkd.runtime.outputs.recent_events import latest_events
from mrkd.runtime.outputs.base import (CameraInfo, CameraStatus, FrameResult, LineObserver, OutputHealth, PartResult,
                                       call_each)
from mrkd.runtime.outputs.video import annotate
from mrkd.runtime.outputs.served_folder import Refused, ServedFolder
from mrkd.runtime.outputs.alarm_images import EvidenceRef, EvidenceThumbnails
from mrkd.runtime.review import LabelStatesOfFile, label_summary, review_rows, standing_label

logger = logging.getLogger(__name__)

PAGE_SCHEMA_VERSION = 1
_STREAM_PATH = re.compile(r"^/stream/([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\.mjpg$")
_ALARM_PATH = re.compile(r"^/alarm/([A-Za-z0-9_.:-]{1,80})\.jpg$")
_MASK_EDITOR_PATH = re.compile(r"^/mask/([A-Za-z0-9][A-Za-z0-9_.-]{0,63})$")
_FRAME_PATH = re.compile(r"^/frame/([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\.png$")
_IGNORE_MASK_PATH = re.compile(r"^/ignore_mask/([0-9a-f]{64})\.png$")
# A POST body must arrive at this rate at least, or within the floor (whichever is longer; never past the
# request's own deadline): a body that trickles cannot hold a connection for the whole request timeout.
BODY_MIN_BYTES_PER_S = 1024
BODY_FLOOR_S = 5.0
_GUARD_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                  "Content-Security-Policy": "frame-ancestors 'none'"}


def parse_address(text: str) -> Tuple[str, int]:
    """'HOST:PORT' (or ':PORT' = 127.0.0.1, as --modbus: the whole network only when asked for) -> (host, port);
    SettingError naming the text."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
        raise SettingError(f"--http must look like HOST:PORT (e.g. 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080), "
                          f"got {text!r}")
    return (host.strip("[]") or "127.0.0.1"), int(port)


class _CameraView:
    """What the page knows of one camera. The loop thread writes ``latest`` and appends to the windows;
    the encoder and ticker threads read them."""

    def __init__(self, info: CameraInfo):
        self.info = info
        self.latest: Optional[FrameResult] = None
        self.frames = 0
        self.alarms = 0
        self.up: Optional[bool] = None
        self.latencies: Deque[float] = deque(maxlen=200)
        self.arrivals: Deque[float] = deque(maxlen=200)       # monotonic time of each result, for fps
        self.cond = threading.Condition()
        self.jpeg: Optional[bytes] = None
        self.jpeg_seq = 0
        self.watchers = 0
        self.encoder: Optional[threading.Thread] = None
        self.encoded = 0

    def status(self, now: float) -> dict:
        recent = [t for t in list(self.arrivals) if now - t <= 2.0]
        fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] else 0.0
        latencies = sorted(self.latencies)
        latest = self.latest
        return {"camera": self.info.name, "up": bool(self.up), "frames": self.frames, "alarms": self.alarms,
                "fps": round(fps, 2),
                "latency_ms_p50": round(1000 * latencies[len(latencies) // 2], 2) if latencies else None,
                "latency_ms_p99": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2)
                if latencies else None,
                "score": None if latest is None else round(latest.score, 6),
                # the model that judges now (a hot swap replaces ``info``, see on_model)
                "model": self.info.model, "model_sha256": self.info.model_sha256, "backend": self.info.backend,
                "precision": self.info.precision,
                "threshold": self.info.threshold, "threshold_source": self.info.threshold_source,
                "ignore_mask": self.info.ignore_mask}


class OperatorServer(LineObserver):
    """The HTTP server (started at construction, so a busy port fails before the run starts).

    metrics: a MetricsObserver for /metrics and /healthz (default: the one among the line's outputs,
    seen through ``see_outputs``). allowed_hosts: names a request may be addressed to besides IP
    addresses and localhost (on loopback: besides loopback names). snapshots: the folder snapshot files are
    served from (default: the SnapshotWriter's, seen through ``see_outputs``). evidence: the folder an
    alarm's evidence file is read from when the page no longer holds its frame (default: the
    EvidenceWriter's, likewise). stream_fps: the most live-view frames a second per camera; max_alarms:
    alarms kept for the page (with their frames, for snapshots).
    request_timeout_s: the longest a request may take to arrive, headers and body together, however slowly
    its bytes trickle in (and the longest a stream may go unread) before its connection is closed.
    max_connections: connections served at once (live streams included); past it a few more are kept
    for one /metrics or /healthz request each (the rest of the page answers them 503), and one past
    those is answered 503 at once, without a thread, so a flood of connections cannot take the
    process's threads or file handles, nor blind the scraper.
    tls: (certificate, private key) PEM files: HTTPS only, TLS 1.2 or newer; each connection's handshake
    runs on its own thread within the request timeout, so a client that never finishes it holds no one up.
    ``reload_certificate`` reads the two files again (`mrkd run` does it on SIGHUP): new connections get
    the new certificate, open ones keep theirs; a pair that does not load is refused and the old one stays.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, metrics=None, stream_fps: float = 10.0,
                 max_alarms: int = 20, jpeg_quality: int = 80, request_timeout_s: float = 30.0,
                 max_connections: int = 64, tls: Optional[Tuple[str, str]] = None,
                 allowed_hosts: Sequence[str] = (), snapshots: Optional[str] = None, events: Optional[str] = None,
                 evidence: Optional[str] = None):
        self.metrics = metrics
        self.events = Path(events) if events else None     # the run's --events log (else the control's)
        self._label_states = None           # review.LabelStatesOfFile of the control's label file, once known
        self._labels_sent = 0               # its version last sent to the pages (``labels``)
        self.request_timeout_s = request_timeout_s
        # Bound to loopback, the page answers only requests addressed to a loopback name: a web page
        # whose own host name was re-pointed at 127.0.0.1 (DNS rebinding) is then refused, not served.
        self.loopback_only = is_loopback_host(host)
        # Beyond loopback the same attack works on the line's LAN address, so a name must be allowed by hand.
        self.allowed_hosts = frozenset(name.lower().rstrip(".") for name in allowed_hosts)
        # Snapshot files are served from this folder only (default: the line's SnapshotWriter, see_outputs).
        self.snapshot_folder: Optional[ServedFolder] = None
        self.snapshots = snapshots
        self.stream_fps, self.jpeg_quality = stream_fps, jpeg_quality
        # An alarm's image once its frame is gone from memory: its evidence file (default: the EvidenceWriter's)
        self.evidence_images: Optional[EvidenceThumbnails] = None
        self.evidence = evidence
        self.page = PAGE_HTML_FILE.read_bytes()
        self.mask_editor = MASK_EDITOR_HTML_FILE.read_bytes()
        self.outputs: List[LineObserver] = []
        self.shadows: List[LineObserver] = []         # runtime/line/shadow.py ShadowScorer: comparison()
        self.views: Dict[str, _CameraView] = {}
        self._masks: Dict[str, IgnoreMask] = {}      # sha256 -> every ignore mask a shown image was judged under
        self.cameras: List[CameraInfo] = []
        self.alarms: Deque[dict] = deque(maxlen=max_alarms)     # newest first: {"event", "camera", "result"}
        self._part_views: Dict[str, dict] = {}     # NG part's event id -> camera -> its view (FrameResult)
        # An alarm's frame whose event has not come yet (the loop sends events from its alarm notifier,
        # after the frame): id(event) -> the FrameResult, which keeps the event, so the id stays its own.
        self._frames_before_event: Dict[int, FrameResult] = {}
        self._alarm_lock = threading.Lock()
        self._clients: List[DropOldestQueue] = []
        self._clients_lock = threading.Lock()
        self.closed = threading.Event()
        self.control = None                   # runtime/control.py LineControl: POST commands with a token
        self.started = threading.Event()      # on_start has run: the cameras are known
        self.httpd = _BoundedHTTPServer((host, port), _handler_for(self), max_connections)
        self.scheme = "http"
        self.tls_files = tuple(tls) if tls is not None else None
        self.certificate_reloads, self.certificate_error = 0, ""
        self._reload_lock = threading.Lock()
        if tls is not None:
            self.httpd.tls = _tls_context(*tls)
            self.scheme = "https"
        self._serve = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="http", daemon=True)
        self._serve.start()
        self._ticker = threading.Thread(target=self._tick, name="http-status", daemon=True)
        self._ticker.start()

    def reload_certificate(self, reason: str = "request") -> bool:
        """Load ``--http-cert``/``--http-key`` again for new connections. False (the old pair stays, the
        reason logged in one line and shown in health()) when they do not load; False without TLS."""
        if self.tls_files is None:
            return False
        with self._reload_lock:
            try:
                context = _tls_context(*self.tls_files)
            except SettingError as exc:
                self.certificate_error = f"certificate reload ({reason}) REFUSED, the previous one stays: {exc}"
                logger.warning("page %s", self.certificate_error)
                return False
            self.httpd.tls = context          # read once per accepted connection
            self.certificate_reloads += 1
            self.certificate_error = ""
        logger.warning("page certificate reloaded (%s) from %s", reason, self.tls_files[0])
        return True

    @property
    def snapshots(self) -> Optional[Path]:
        """The folder snapshot files are served from (resolved when the page learnt it), or None."""
        return self.snapshot_folder.path if self.snapshot_folder is not None else None

    @snapshots.setter
    def snapshots(self, folder) -> None:
        self.snapshot_folder = ServedFolder.of(folder) if folder else None

    @property
    def evidence(self) -> Optional[Path]:
        """The folder evidence files are read from (resolved when the page learnt it), or None."""
        return self.evidence_images.folder.path if self.evidence_images is not None else None

    @evidence.setter
    def evidence(self, folder) -> None:
        self.evidence_images = EvidenceThumbnails(ServedFolder.of(folder), self.jpeg_quality) if folder else None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
        return f"{self.scheme}://{f'[{host}]' if ':' in host and not host.startswith('[') else host}:{port}"

    # -- hooks (loop thread): store references, queue small records, return
    def see_outputs(self, outputs: Sequence[LineObserver]) -> None:
        from mrkd.runtime.outputs.evidence import EvidenceWriter
        from mrkd.runtime.outputs.metrics import MetricsObserver
        from mrkd.runtime.outputs.snapshots import SnapshotWriter
        self.outputs = [o for o in outputs if o is not self]
        if self.snapshot_folder is None:
            self.snapshots = next((o.folder for o in outputs if isinstance(o, SnapshotWriter)), None)
        if self.evidence_images is None:
            self.evidence = next((o.folder for o in outputs if isinstance(o, EvidenceWriter)), None)
        self.shadows = [o for o in self.outputs if callable(getattr(o, "comparison", None))]
        if self.metrics is None:
            self.metrics = next((o for o in outputs if isinstance(o, MetricsObserver)), None)

    def health(self) -> OutputHealth:
        # Stopped is how a run ends, not a failure: the page has nothing it could not deliver.
        closed = self.closed.is_set()
        return OutputHealth(name="page", ok=True, state="stopped" if closed else "listening",
                            target=self.url, detail=self.certificate_error)

    def _output_health(self) -> List[dict]:
        found: List[OutputHealth] = []
        call_each(self.outputs, lambda output: found.append(output.health()))
        return [asdict(h) for h in found if h is not None]

    def on_start(self, cameras: Sequence[CameraInfo]) -> None:
        self.cameras = list(cameras)
        self.views = {info.name: _CameraView(info) for info in cameras}
        self._alarms_from_log()
        self.started.set()
        self._broadcast("hello", self._hello())

    def _shown(self, result: FrameResult) -> Optional[_CameraView]:
        """``result`` is its camera's newest frame on the page (its view, None for an unknown camera)."""
        view = self.views.get(result.camera)
        if view is not None:
            view.latest = result
            if result.ignore_mask is not None:       # a handful per run (a camera's, its recipes')
                self._masks[result.ignore_mask.sha256] = result.ignore_mask
            view.frames += 1
            view.latencies.append(result.latency_s)
            view.arrivals.append(time.monotonic())
        return view

    def on_frame(self, result: FrameResult) -> None:
        if self._shown(result) is None:
            return
        if result.event is not None:
            with self._alarm_lock:
                for alarm in self.alarms:
                    if alarm["event"] is result.event:
                        alarm["result"] = result      # its frame, for a snapshot without --snapshots
                        break
                else:
                    while len(self._frames_before_event) >= (self.alarms.maxlen or 20):
                        self._frames_before_event.pop(next(iter(self._frames_before_event)))
                    self._frames_before_event[id(result.event)] = result

    def on_part_image(self, result: FrameResult) -> None:
        """A triggered camera's judged image is its live view's newest frame: the view shows the last part's
        image and heat map until the next part (it had nothing to show: free-run frames only), and its
        frames, latency and rate count the part's images."""
        self._shown(result)

    def on_event(self, camera: str, event: dict) -> None:
        view = self.views.get(camera)
        if view is not None:
            view.alarms += 1
        with self._alarm_lock:
            result = self._frames_before_event.pop(id(event), None)
            self.alarms.appendleft({"event": event, "camera": camera,
                                    "result": result if result is not None and result.event is event else None})
        self._broadcast("alarm", self._alarm_record(camera, event))

    def part_fields(self, part: PartResult, views) -> Dict[str, Dict[str, object]]:
        """Keeps an NG/ERROR part's images (references) for its thumbnails; writes nothing."""
        if part.event_id is not None:
            while len(self._part_views) >= (self.alarms.maxlen or 20):
                self._part_views.pop(next(iter(self._part_views)))
            self._part_views[part.event_id] = dict(views)
        return {}

    def on_part(self, result: PartResult) -> None:
        """An NG/ERROR part (with an event): one alarm on the page per camera that has an image, top to
        bottom in the order the event lists the cameras, as the rows rebuilt from the events log after a
        restart (_alarms_from_log) and `mrkd review`'s listing: each goes on top, so the last first."""
        if not wants_event(result):
            return
        event = part_event(result)
        views = self._part_views.pop(result.event_id, {})
        for camera, record in reversed(review_rows(event)):
            view = self.views.get(camera)
            if view is not None:
                view.alarms += 1
            with self._alarm_lock:
                self.alarms.appendleft({"event": record, "camera": camera, "result": None,
                                        "view": views.get(camera)})
            self._broadcast("alarm", self._alarm_record(camera, record))

    def on_status(self, status: CameraStatus) -> None:
        view = self.views.get(status.camera)
        if view is not None and view.up != status.up:
            view.up = status.up
            self._broadcast("status", self._statuses())

    def on_model(self, info: CameraInfo) -> None:
        """A hot swap: the card, ``hello`` and ``status`` name the model that judges from now on (each
        alarm keeps the ``model_sha256`` of its own event)."""
        view = self.views.get(info.name)
        if view is None:
            return
        view.info = info
        self.cameras = [info if known.name == info.name else known for known in self.cameras]
        self._broadcast("status", self._statuses())

    def on_stop(self) -> None:
        self.close()

    # -- server side
    def _hello(self) -> dict:
        with self._alarm_lock:
            shown = [(a["camera"], a["event"]) for a in self.alarms]
        states = self._labels()
        alarms = [_alarm_record(camera, event, states) for camera, event in shown]
        return {"schema_version": PAGE_SCHEMA_VERSION,
                "cameras": [asdict(info) for info in self.cameras],
                "alarms": alarms, "status": self._statuses(), "outputs": self._output_health(),
                "review": self._review_state(), "shadow": self._shadow()}

    def _alarms_from_log(self) -> None:
        """(on_start) The latest alarms of the events log this run appends to, when the page has none
        yet: a restarted run (or a page opened after it) shows what is still to be reviewed. Read from
        the log's end, at most a few MB of it (recent_events.py)."""
        path = self.events or getattr(self.control, "events_path", None)
        if path is None or self.alarms:
            return
        rows: List[dict] = []
        for event in latest_events(path, self.alarms.maxlen or 20):
            rows += [{"event": record, "camera": camera, "result": None} for camera, record in review_rows(event)
                     if isinstance(camera, str)]
        with self._alarm_lock:
            if not self.alarms:       # newest first, as appendleft keeps them
                self.alarms.extend(rows[:self.alarms.maxlen])

    def _labels(self) -> dict:
        """(event, camera) -> review.LabelState of the control's label file ({} without review)."""
        path = getattr(self.control, "labels_path", None)
        if path is None:
            return {}
        if self._label_states is None or self._label_states.path != Path(path):
            self._label_states = LabelStatesOfFile(path)
        return self._label_states.states()

    def labels_changed(self) -> None:
        """Send ``labels`` (every alarm row's standing label) when the label file changed since the last."""
        states = self._labels()
        version = self._label_states.version if self._label_states is not None else 0
        with self._alarm_lock:
            if version == self._labels_sent:
                return
            self._labels_sent = version
            shown = [(a["camera"], a["event"]) for a in self.alarms]
        self._broadcast("labels", [{"event_id": event.get("event_id"), "camera": camera,
                                    "review": _review_of(event, camera, states)} for camera, event in shown])

    def _alarm_record(self, camera: str, event: dict) -> dict:
        return _alarm_record(camera, event, self._labels())

    def _review_state(self) -> dict:
        """Whether POST /review can record labels here (a token and a label file were configured)."""
        control = self.control
        if control is None:
            return {"enabled": False, "why": "review is off: start the line with --control-token-env VAR "
                                             "and --review-labels FILE"}
        token_set = control.authorized({})[1] != 403       # no token configured: 403; else a missing one: 401
        if not token_set or getattr(control, "labels_path", None) is None:
            return {"enabled": False, "why": "review is off: start the line with --control-token-env VAR "
                                             "and --review-labels FILE"}
        return {"enabled": True, "why": ""}

    def _shadow(self) -> List[dict]:
        """Each shadow run's comparison so far (runtime/line/shadow.py), for the page's shadow panel."""
        found: list = []
        call_each(self.shadows, lambda shadow: found.append(shadow.comparison()))
        # the path as given (a refit's version is <parent>.vN/model.onnx, named like the live model) and the
        # live model it is compared with: after a promotion that is the candidate itself
        return [{"candidate": c.candidate, "candidate_sha256": c.candidate_sha256,
                 "live_sha256": c.live_sha256, "candidate_is_live": c.candidate_sha256 == c.live_sha256,
                 "threshold": c.threshold, "frames": c.frames, "disagreements": c.disagreements,
                 "candidate_only": c.candidate_only, "live_only": c.live_only,
                 "disagreement_rate": c.disagreement_rate, "score_correlation": c.score_correlation,
                 "dropped": c.dropped, "errors": c.errors} for c in found]

    def _statuses(self) -> List[dict]:
        now = time.monotonic()
        return [view.status(now) for view in list(self.views.values())]

    def _broadcast(self, kind: str, body) -> None:
        with self._clients_lock:
            for client in self._clients:
                client.put((kind, body))

    def _tick(self) -> None:
        while not self.closed.wait(1.0):
            if self._clients:
                self.labels_changed()
                self._broadcast("status", self._statuses())
                self._broadcast("outputs", self._output_health())
                if self.shadows:
                    self._broadcast("shadow", self._shadow())

    def _encode_loop(self, view: _CameraView) -> None:
        """One camera's live-view encoder; runs while someone watches it. It polls for the newest result
        at the stream rate rather than being woken per frame, so the loop thread never hands it the GIL."""
        interval = 1.0 / self.stream_fps if self.stream_fps > 0 else 0.02
        encoded_result = None
        next_at = time.monotonic()
        while view.watchers > 0 and not self.closed.is_set():
            wait = next_at - time.monotonic()
            if wait > 0:
                self.closed.wait(wait)
            next_at = max(next_at + interval, time.monotonic())
            result = view.latest
            if result is None or result is encoded_result:
                continue
            encoded_result = result
            image = annotate(result.image, result.amap, result.score, result.threshold, result.event is not None)
            ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
            if not ok:
                continue
            with view.cond:
                view.jpeg, view.jpeg_seq = encoded.tobytes(), view.jpeg_seq + 1
                view.encoded += 1
                view.cond.notify_all()
        with view.cond:
            view.encoder = None

    def watch(self, view: _CameraView) -> None:
        with view.cond:
            view.watchers += 1
            if view.encoder is None:
                view.encoder = threading.Thread(target=self._encode_loop, args=(view,),
                                                name=f"mjpeg:{view.info.name}", daemon=True)
                view.encoder.start()

    def unwatch(self, view: _CameraView) -> None:
        with view.cond:
            view.watchers -= 1

    def latest_image(self, camera: str) -> Optional[Tuple[bytes, Optional[Tuple[int, int]], Optional[str]]]:
        """The latest image ``camera`` judged, as it was judged (after its ``size``: an ignore mask's size), as
        a lossless PNG for the mask editor, with the blur margin (x, y) of its model's map in that image's
        pixels (MapGeometry.blur_margin; None when not known) and the sha256 of the ignore mask it was judged
        under (None without one); None for an unknown camera or one that judged nothing yet."""
        view = self.views.get(camera)
        latest = view.latest if view is not None else None
        if latest is None:
            return None
        ok, png = cv2.imencode(".png", latest.image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        geometry = view.info.map_geometry
        margin = geometry.blur_margin(latest.image.shape[:2]) if geometry else None
        mask = latest.ignore_mask.sha256 if latest.ignore_mask is not None else None
        return (png.tobytes(), margin, mask) if ok else None

    def ignore_mask_image(self, sha256: str) -> Optional[bytes]:
        """An ignore mask a shown image was judged under, by its sha256, as a black/white PNG (white: not
        judged); None for one not seen."""
        mask = self._masks.get(sha256)
        if mask is None:
            return None
        ok, png = cv2.imencode(".png", np.where(mask.ignored, 255, 0).astype(np.uint8))
        return png.tobytes() if ok else None

    def alarm_image(self, event_id: str, camera: Optional[str] = None) -> Optional[Tuple[bytes, str]]:
        with self._alarm_lock:
            found = next((a for a in self.alarms if a["event"].get("event_id") == event_id
                          and (camera is None or a["camera"] == camera)), None)
        if found is None:
            return None
        snapshot = found["event"].get("snapshot")
        written = _snapshot_bytes(snapshot, self.snapshot_folder, event_id) if snapshot else None
        if written is not None:
            return written, "image/png" if Path(snapshot).suffix.lower() == ".png" else "image/jpeg"
        result, part_view = found["result"], found.get("view")
        if result is not None:
            image = annotate(result.image, result.amap, result.score, result.threshold, True)
        elif part_view is not None:
            image = annotate(part_view.image, part_view.amap, float(found["event"].get("score") or 0.0),
                             part_view.threshold, True)
        else:
            return self._evidence_image(found["event"], event_id)
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        return (encoded.tobytes(), "image/jpeg") if ok else None

    def _evidence_image(self, event: dict, event_id: str) -> Optional[Tuple[bytes, str]]:
        """(A frame no longer in memory.) The event's evidence file as a bounded JPEG, or None."""
        evidence = EvidenceRef.of_event(event)
        if evidence is None or self.evidence_images is None:
            return None
        encoded = self.evidence_images.jpeg(evidence, f"evidence of alarm {event_id}")
        return (encoded, "image/jpeg") if encoded is not None else None

    def add_client(self) -> DropOldestQueue:
        client = DropOldestQueue(200)
        with self._clients_lock:
            self._clients.append(client)
        return client

    def remove_client(self, client: DropOldestQueue) -> None:
        with self._clients_lock:
            if client in self._clients:
                self._clients.remove(client)

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self._broadcast("stopped", {})
        for view in self.views.values():
            with view.cond:
                view.cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()


def _alarm_record(camera: str, event: dict, states: Optional[dict] = None) -> dict:
    keys = ("event_id", "time", "score", "threshold", "frame_index", "boxes", "kind", "part_id", "verdict",
            "model_sha256")
    image = None
    if event.get("event_id"):
        image = f"/alarm/{event.get('event_id')}.jpg"
        if event.get("kind") == "part":
            image += "?camera=" + quote(camera, safe="")
    return {"camera": camera, **{k: event.get(k) for k in keys}, "image": image,
            "review": _review_of(event, camera, states or {})}


def _review_of(event: dict, camera: str, states: dict) -> Optional[dict]:
    """The standing label of the alarm row of ``camera``'s image (review.label_summary, with
    ``replaced``: the label a correction replaced), or None when it has none. Each camera of a part
    has its own row and label."""
    state = standing_label(states, event, camera)
    if state is None:
        return None
    return {**label_summary(state.current),
            "replaced": label_summary(state.replaced) if state.replaced is not None else None}


def _snapshot_bytes(path: str, folder: Optional[ServedFolder], event_id: str) -> Optional[bytes]:
    """A snapshot file's bytes, or None unless it is a regular file below ``folder`` reached through no
    link (served_folder.py; no folder known: none) and a whole image (``whole_image``). A refusal is logged
    in one line; a file that is gone, or no whole image, is not (the alarm's frame is shown instead, when the
    page still has it, else its evidence)."""
    if folder is None:
        return None
    try:
        data = folder.read(path)
    except Refused as reason:
        folder.log_refusal(f"snapshot of alarm {event_id}", reason)
    except (OSError, ValueError):
        pass
    else:
        return data if whole_image(data) else None
    return None


def whole_image(data: bytes) -> bool:
    """Whether ``data`` is a whole JPEG or PNG as the snapshot writer encodes it, from its signature to its
    end marker: a power cut can leave a file whose size reached the disk and whose data did not (zeros, at
    its end or all through) or of size 0, and served as it is that showed a broken image."""
    return (data.startswith(b"\xff\xd8\xff") and data.endswith(b"\xff\xd9")) or \
        (data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82"))


def _has_body(headers) -> bool:
    """Whether a request's headers announce a body (RFC 9112 6.3: chunked, or a Content-Length other than 0)."""
    lengths = headers.get_all("Content-Length") or []
    return "Transfer-Encoding" in headers or any(length.strip() != "0" for length in lengths)


def _host_allowed(header: Optional[str], loopback_only: bool, allowed_names: frozenset) -> bool:
    """Whether a request's Host header names this server. No header (HTTP/1.0; browsers always send one):
    yes. A name allowed by hand: yes. Bound to loopback: loopback names only. Beyond it: any IP address
    (a rebinding page can only use a name of its own) and localhost."""
    if header is None:
        return True
    name = _host_name(header)
    if name.rstrip(".") in allowed_names or is_loopback_host(name):
        return True
    if loopback_only:
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name in a Host header, without its port: "127.0.0.1:8080" -> "127.0.0.1", "[::1]:80" -> "::1"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _BoundedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on connections served at once (a thread each).

    A few connections past the cap (PROBE_RESERVE) are kept for /metrics and /healthz alone, one
    request each: a page full of live views (or of stalled clients) must not make the scraper and the
    health check see the line as down. When the page's places are taken, a new connection takes the place
    of the one that has waited longest for its request to arrive whole (idle, or trickling it in), which
    is closed; when every connection is taken, likewise the reserve's: connections that send nothing cannot
    hold the page (slowloris) nor the reserve against a scrape, whose request comes at once."""

    daemon_threads = True
    BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 5\r\n"
            b"Connection: close\r\n\r\n")
    PROBE_RESERVE = 8
    PROBE_PATHS = ("/metrics", "/healthz")

    def __init__(self, address, handler, max_connections: int):
        self.max_connections = max_connections
        self.probes_only: set = set()      # connections admitted from the reserve
        self._active = 0
        self._waiting: Dict[Any, float] = {}   # connection -> since when it waits for a whole request
        self._evicted: set = set()             # closed to make room, their threads not yet ended
        self._active_lock = threading.Lock()
        self.tls: Optional[ssl.SSLContext] = None       # HTTPS: each accepted connection is wrapped in it
        if ":" in address[0]:       # an IPv6 address ([::1]:8080): the class's IPv4 socket cannot bind it
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def get_request(self):
        # Wrapped per connection (not the listening socket), so a reloaded certificate takes effect at once;
        # the handshake itself runs on the connection's thread (_handshake_within).
        connection, address = self.socket.accept()
        context = self.tls
        if context is not None:
            try:
                connection = context.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
            except OSError:
                connection.close()
                raise
        return connection, address

    def process_request(self, request, client_address):
        with self._active_lock:
            taken = self._active - len(self._evicted)
            page_places = taken - len(self.probes_only - self._evicted)
            # every page place taken: one whose connection still waits for its request goes to the newcomer
            # (else connections that never finish a request kept the page and its commands away for good)
            waiting = [r for r in self._waiting if r not in self.probes_only]
            if page_places >= self.max_connections and waiting:
                self._evict(min(waiting, key=self._waiting.get))
                taken, page_places = taken - 1, page_places - 1
            elif taken >= self.max_connections + self.PROBE_RESERVE and self._waiting:
                self._evict(min(self._waiting, key=self._waiting.get))
                taken -= 1
            admitted = taken < self.max_connections + self.PROBE_RESERVE
            if admitted and page_places >= self.max_connections:
                self.probes_only.add(request)
            self._active += admitted
            if admitted:
                self._waiting[request] = time.monotonic()
        if not admitted:
            try:
                if not isinstance(request, ssl.SSLSocket):   # over TLS a reply needs a handshake first: just close
                    request.settimeout(1.0)
                    request.sendall(self.BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request) -> None:
        with self._active_lock:
            self._active -= 1
            self.probes_only.discard(request)
            self._waiting.pop(request, None)
            self._evicted.discard(request)

    def waiting(self, request, waits: bool) -> bool:
        """(The connection's thread.) Whether ``request`` now waits for a request to arrive whole; False
        when it was closed to make room (what it read before is not a request to act on)."""
        with self._active_lock:
            if request in self._evicted:
                return False
            if waits:     # since its admission, or since its last answer (kept alive)
                self._waiting.setdefault(request, time.monotonic())
            else:
                self._waiting.pop(request, None)
            return True

    def _evict(self, request) -> None:
        """(Lock held.) Close a connection still waiting for its request; its thread sees the end of the
        stream and ends. The socket's own shutdown, not SSLSocket's (which drops its TLS state under
        the reading thread)."""
        del self._waiting[request]
        self._evicted.add(request)
        try:
            socket.socket.shutdown(request, socket.SHUT_RDWR)
        except OSError:
            pass

    def handle_error(self, request, client_address) -> None:
        """A connection's handler raised (socketserver prints the traceback on stderr by default): a client
        that went away (reset, timed out, broken TLS) is routine and says nothing; anything else is one
        line in the log. Either way only that connection ends."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError, ssl.SSLError)):
            return
        logger.warning("page: a request from %s failed: %s: %s", client_address[0], type(error).__name__, error)


def _tls_context(certificate: str, private_key: str) -> ssl.SSLContext:
    """A server context for ``--http-cert``/``--http-key`` (SettingError naming the files when they do not load)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certificate, private_key)
    except (OSError, ssl.SSLError) as exc:
        raise SettingError(f"--http-cert {certificate} / --http-key {private_key}: cannot load them ({exc})") from None
    return context


def _handshake_within(connection: ssl.SSLSocket, seconds: float) -> bool:
    """Complete a server-side TLS handshake within ``seconds`` in all (not per byte); False when it fails."""
    deadline = time.monotonic() + seconds
    timeout = connection.gettimeout()
    connection.setblocking(False)
    try:
        while True:
            try:
                connection.do_handshake()
                return True
            except ssl.SSLWantReadError:
                wait = ([connection], [])
            except ssl.SSLWantWriteError:
                wait = ([], [connection])
            left = deadline - time.monotonic()
            if left <= 0 or not any(select.select(*wait, [], left)[:2]):
                return False
    except (OSError, ValueError):       # ssl.SSLError is an OSError
        return False
    finally:
        try:
            connection.settimeout(timeout)
        except OSError:
            pass


def _client_closed(connection: socket.socket) -> bool:
    """Whether a stream's client has closed its connection (or reset it). A browser sends nothing after
    a live view's request, so its connection turning readable means the end of the stream (over TLS its
    close_notify just before): a stream with no frame to write (a triggered camera, a camera that is down)
    would otherwise hold its thread and socket, and one of the page's places, until the run ends."""
    try:
        poller = select.poll()
        poller.register(connection, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    except AttributeError:          # no poll() (Windows): select, which is limited to low descriptors there too
        return bool(select.select([connection], [], [], 0)[0])
    except (OSError, ValueError):   # the socket is already closed
        return True


class _DeadlineReader(io.RawIOBase):
    """A socket's reading side whose every receive waits only until the request's deadline: a client
    sending a byte now and then, each within the socket timeout, still cannot hold its thread longer.
    Writes keep the plain socket timeout (a stream's reader may be slow for a whole run)."""

    def __init__(self, sock: socket.socket, timeout_s: float):
        super().__init__()
        self.sock, self.timeout_s = sock, timeout_s
        self.deadline = time.monotonic() + timeout_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(min(left, self.timeout_s))
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.timeout_s)


def _handler_for(server: OperatorServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "mrkd"
        # A socket timeout: a client that stops sending (a body shorter than its Content-Length, an idle
        # or half-sent request) or stops reading a stream frees its thread instead of holding it forever.
        timeout = server.request_timeout_s

        def log_message(self, *args):      # the line's log is for the line, not for page views
            pass

        def setup(self):
            super().setup()
            self._unusable = False
            if isinstance(self.connection, ssl.SSLSocket):
                # plain HTTP, a scanner, a stall: closed, nothing served
                self._unusable = not _handshake_within(self.connection, server.request_timeout_s)
            self._reader = _DeadlineReader(self.connection, server.request_timeout_s)
            self.rfile = io.BufferedReader(self._reader)

        def handle(self):
            if not self._unusable:
                super().handle()

        def handle_one_request(self):
            # Each request (the idle wait before it included) must arrive whole within the timeout.
            self._reader.deadline = time.monotonic() + server.request_timeout_s
            self.server.waiting(self.request, True)
            super().handle_one_request()

        def _over_the_cap(self, path: str) -> bool:
            """A connection from the probes' reserve serves one /metrics or /healthz request; anything
            else there is answered 503 (the page is full), as a connection past the reserve is."""
            if self.request not in self.server.probes_only:
                return False
            self.close_connection = True
            if path in _BoundedHTTPServer.PROBE_PATHS:
                return False
            self._send(503, b"the page serves its most connections now; try again\n", "text/plain",
                       {"Retry-After": "5", "Connection": "close"})
            return True

        def parse_request(self) -> bool:
            if not super().parse_request():
                return False
            if not self.server.waiting(self.request, False):    # headers whole: no longer the one to close
                self.close_connection = True                     # unless it was, and they were cut short
                return False
            if not _host_allowed(self.headers.get("Host"), server.loopback_only, server.allowed_hosts):
                self.close_connection = True
                also = b" or a name given with --http-allow-host" if server.allowed_hosts else b""
                why = (b"this server answers requests for 127.0.0.1 or localhost" + also + b" only\n"
                       if server.loopback_only else
                       b"this server answers requests for its IP address, localhost or a name given with "
                       b"--http-allow-host only\n")
                self._send(421, why, "text/plain")
                return False
            if self.command != "POST" and _has_body(self.headers):
                # no route but POST reads a body: left unread it would be taken for the next request
                # (a request smuggled past a proxy in front of the page), so the connection ends after this one
                self.close_connection = True
            return True

        def _send_guards(self) -> None:
            # a browser must take every answer for its Content-Type (a snapshot is never sniffed into a
            # page) and never show the page inside another site's frame (its review buttons under a lure)
            for key, value in _GUARD_HEADERS.items():
                self.send_header(key, value)

        def _send(self, code: int, body: bytes, content_type: str, extra: Optional[dict] = None):
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self._send_guards()
            extra = dict(extra or {})
            if self.close_connection:       # the client is told the connection ends with this answer
                extra.setdefault("Connection", "close")
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None):
            """Python's own refusals (a malformed request line, headers too long, a method without a do_
            method: 501) as every other answer: one plain line with the guard headers, then closed; an
            unknown method is 405 with Allow."""
            self.close_connection = True
            if self.request_version == "HTTP/0.9":     # a request line without a version: no headers possible
                return
            if code == 501:
                return self._refuse()
            line = message or self.responses.get(code, ("error",))[0]
            try:
                self._send(code, f"{line}\n".encode("utf-8", "replace"), "text/plain", {"Connection": "close"})
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass

        def do_HEAD(self):      # a GET route's status and headers, no body (_send and the streams check)
            self.do_GET()

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            try:
                if self._over_the_cap(path):
                    return
                if path in ("/", "/index.html"):
                    self._send(200, server.page, "text/html; charset=utf-8")
                elif path == "/metrics" and server.metrics is not None:
                    body, content_type = server.metrics.scrape()      # rendered at most once per 0.5 s
                    self._send(200, body, content_type)
                elif path == "/healthz" and server.metrics is not None:
                    healthy, details = server.metrics.line_health()
                    self._send(200 if healthy else 503, json.dumps(details).encode(), "application/json")
                elif path == "/events":
                    self._events()
                elif _STREAM_PATH.match(path):
                    self._mjpeg(_STREAM_PATH.match(path).group(1))
                elif _MASK_EDITOR_PATH.match(path):
                    known = _MASK_EDITOR_PATH.match(path).group(1) in server.views
                    self._send(200 if known else 404, server.mask_editor if known else b"no such camera\n",
                               "text/html; charset=utf-8" if known else "text/plain")
                elif _FRAME_PATH.match(path):
                    found = server.latest_image(_FRAME_PATH.match(path).group(1))
                    if found is None:
                        self._send(404, b"no image of this camera (yet)\n", "text/plain")
                    else:
                        png, margin, mask = found
                        extra = {"X-Mask-Margin": f"{margin[0]} {margin[1]}"} if margin else {}
                        if mask is not None:
                            extra["X-Ignore-Mask"] = mask
                        self._send(200, png, "image/png", extra)
                elif _IGNORE_MASK_PATH.match(path):
                    mask_png = server.ignore_mask_image(_IGNORE_MASK_PATH.match(path).group(1))
                    if mask_png is None:
                        self._send(404, b"no such ignore mask on this line\n", "text/plain")
                    else:
                        self._send(200, mask_png, "image/png")
                elif _ALARM_PATH.match(path):
                    query = parse_qs(self.path.partition("?")[2])
                    found = server.alarm_image(_ALARM_PATH.match(path).group(1), (query.get("camera") or [None])[0])
                    if found is None:
                        self._send(404, b"no image of this alarm here (only the latest alarms are kept, "
                                        b"and their files while they are on disk)\n", "text/plain")
                    else:
                        self._send(200, found[0], found[1])
                else:
                    self._send(404, b"not found\n", "text/plain")
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass

        def _refuse(self):
            self.close_connection = True      # its body is left unread: it must not be taken for a next request
            if server.control is None:
                body, allow = b"read-only: GET and HEAD only\n", "GET, HEAD"
            else:
                body, allow = b"GET, HEAD and POST only\n", "GET, HEAD, POST"
            self._send(405, body, "text/plain", {"Allow": allow, "Connection": "close"})

        def _refuse_post(self, code: int, why: str):
            self.close_connection = True      # as _refuse: the body (if any) is not read
            self._send(code, json.dumps({"error": why}).encode("utf-8"), "application/json",
                       {"Connection": "close"})

        def do_POST(self):     # commands with a token (runtime/control.py); read-only without one
            if self._over_the_cap(None):     # the probes' reserve is for GET /metrics and /healthz only
                return
            control = server.control
            if control is None:
                return self._refuse()
            ok, code, why = control.authorized(self.headers)
            if not ok:      # on the headers alone: a stranger never makes a thread wait for a body
                return self._refuse_post(code, why)
            if "Transfer-Encoding" in self.headers:   # a chunked body would be left unread and taken for a request
                return self._refuse_post(411, "send the body with a Content-Length")
            lengths = self.headers.get_all("Content-Length") or ["0"]
            if len(lengths) > 1:    # two framings of one body (RFC 9112 6.3): which one a proxy took is unknown
                return self._refuse_post(400, "Content-Length given more than once")
            length = lengths[0].strip()
            # ASCII digits only: "\u00b2".isdigit() is true but int() refuses it
            if not (length.isascii() and length.isdigit()):
                return self._refuse_post(400, "Content-Length is not a whole number of bytes")
            length = int(length)
            if length > 16384:
                return self._refuse_post(413, "body too large")
            left = max(BODY_FLOOR_S, length / BODY_MIN_BYTES_PER_S)
            self._reader.deadline = min(self._reader.deadline, time.monotonic() + left)
            try:
                body = self.rfile.read(length)
            except TimeoutError:      # stalled or trickling: the connection is not kept for it
                return self._refuse_post(408, "the body did not arrive in time")
            if len(body) != length:
                return self._refuse_post(400, "body shorter than its Content-Length")
            code, answer = control.handle_post(self.path, self.headers, body)
            self._send(code, json.dumps(answer).encode("utf-8"), "application/json")
            if code == 200 and self.path.split("?", 1)[0] == "/review":
                server.labels_changed()      # every open page shows the new label now, not at the next tick

        do_PUT = do_DELETE = do_PATCH = _refuse

        def _start_stream(self, content_type: str) -> None:
            """Headers of an endless response (SSE, MJPEG): no length, closed when either side stops."""
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Cache-Control", "no-store")
            self._send_guards()
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

        def _events(self):
            if self.command == "HEAD":
                return self._start_stream("text/event-stream")
            client = server.add_client()
            try:
                self._start_stream("text/event-stream")
                self._sse("hello", server._hello())
                while not server.closed.is_set():
                    try:
                        kind, body = client.get(timeout=1.0)
                    except queue.Empty:
                        self.wfile.write(b": keep-alive\n\n")
                        self.wfile.flush()
                        continue
                    client.done()
                    self._sse(kind, body)
                    if kind == "stopped":
                        break
            finally:
                server.remove_client(client)

        def _sse(self, kind: str, body) -> None:
            self.wfile.write(f"event: {kind}\ndata: {json.dumps(body)}\n\n".encode("utf-8"))
            self.wfile.flush()

        def _mjpeg(self, camera: str):
            server.started.wait(10.0)      # a page opened while the line is still loading its models
            view = server.views.get(camera)
            if view is None:
                self._send(404, b"no such camera\n", "text/plain")
                return
            self._start_stream("multipart/x-mixed-replace; boundary=frame")
            if self.command == "HEAD":
                return
            server.watch(view)
            seen = 0
            try:
                while not server.closed.is_set():
                    with view.cond:
                        view.cond.wait_for(lambda: view.jpeg_seq != seen or server.closed.is_set(), timeout=1.0)
                        jpeg, seq = view.jpeg, view.jpeg_seq
                    if jpeg is None or seq == seen:
                        if _client_closed(self.connection):   # else, with no frame to write, it is never seen
                            break
                        continue
                    seen = seq
                    self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                     + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n")
                    self.wfile.flush()
            finally:
                server.unwatch(view)

    return Handler


PAGE_HTML_FILE = Path(__file__).with_name("page.html")   # package data (setup.py)
MASK_EDITOR_HTML_FILE = Path(__file__).with_name("mask_editor.html")   # likewise: /mask/<camera>


def outputs_from(settings) -> list:
    """``--http HOST:PORT`` (OutputSettings.http): the server (it serves the MetricsObserver built beside it)."""
    if not settings.http:
        return []
    host, port = parse_address(settings.http)
    tls = (settings.http_cert, settings.http_key) if settings.http_cert else None
    if not is_loopback_host(host):      # allowed (read-only), but the operator should know who can watch
        logger.warning("page: --http %s listens beyond this machine: whoever reaches it sees the live views, "
                       "the alarms with their snapshots and /metrics (the page has no login)%s", settings.http,
                       "" if tls else ", over plain HTTP")
    try:
        evidence = getattr(settings, "evidence", None)       # an EvidenceSettings or a folder, as evidence.py takes it
        return [OperatorServer(host, port, tls=tls, allowed_hosts=settings.http_allowed_hosts,
                               snapshots=settings.snapshots, events=settings.events,
                               evidence=getattr(evidence, "folder", evidence))]
    except OSError as exc:
        raise OSError(exc.errno, f"--http {settings.http}: cannot listen there ({exc.strerror or exc})") from None
