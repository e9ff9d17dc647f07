"""Alarm events: a JSON-lines log, a snapshot per alarm, an optional HTTP webhook.

Every event has an ``event_id`` (UTC time + random suffix: sortable, unique across runs and
machines); snapshot file names carry it and are created exclusively, so a restarted run never
overwrites an earlier run's images and old log lines keep pointing at their own snapshots.

The log is append-only and crash-safe: each event is one ``os.write`` of a whole line on an
O_APPEND descriptor followed by fsync, and a torn last line left by a crash (power loss mid-write)
is cut off when the log is reopened. The webhook posts on a background thread from a bounded queue
(oldest dropped when full) with a timeout and retries, so a dead or slow receiver never stalls the
stream. Posts may carry custom headers and an HMAC-SHA256 signature of the body
(``X-Mrkd-Signature: sha256=<hex>``); ``X-Mrkd-Event-Id`` lets receivers drop a retried duplicate.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import queue
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import cv2
import numpy as np

from mrkd.runtime.line.alarms import Alarm
from mrkd.runtime.outputs.overlay import heatmap_overlay

logger = logging.getLogger(__name__)


def regions_from_map(amap: np.ndarray, threshold: float, frame_hw, min_area: int = 1) -> List[Dict[str, int]]:
    """Bounding boxes (x, y, w, h, area in map pixels) of the connected regions where ``amap`` >= threshold,
    scaled from the map's size to the frame's (h, w), largest first (8-connectivity)."""
    mask = (np.asarray(amap) >= threshold).astype(np.uint8)
    count, _, boxes, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    scale_y = frame_hw[0] / amap.shape[0]
    scale_x = frame_hw[1] / amap.shape[1]
    regions = []
    for x, y, w, h, area in boxes[1:count]:          # label 0 is the background
        if area < min_area:
            continue
        x0, y0 = int(np.floor(x * scale_x)), int(np.floor(y * scale_y))
        x1 = min(int(np.ceil((x + w) * scale_x)), frame_hw[1])
        y1 = min(int(np.ceil((y + h) * scale_y)), frame_hw[0])
        regions.append({"x": x0, "y": y0, "w": x1 - x0, "h": y1 - y0, "area": int(area)})
    return sorted(regions, key=lambda r: -r["area"])


class EventLog:
    """Append-only JSON-lines file; ``write`` returns once the line is on disk."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._repair_torn_tail()
        self._lock = threading.Lock()
        self.written = 0

    def _repair_torn_tail(self) -> None:
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as handle:
            data = handle.read()
        keep = data.rfind(b"\n") + 1
        if keep < size:
            logger.warning("%s: cutting a torn last line (%d bytes) left by an earlier crash", self.path, size - keep)
            os.ftruncate(self._fd, keep)

    def write(self, event: dict) -> None:
        line = (json.dumps(event, sort_keys=True) + "\n").encode("utf-8")
        with self._lock:
            written = os.write(self._fd, line)
            if written != len(line):     # disk full: drop the partial line rather than leave it
                os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
                raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes)")
            os.fsync(self._fd)
            self.written += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_events(path: str | os.PathLike) -> List[dict]:
    """Every event of a JSON-lines log (raises ValueError naming the line on a malformed one)."""
    events = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON line ({exc})") from exc
    return events


def write_snapshot(path: str | os.PathLike, frame_bgr: np.ndarray, amap: np.ndarray, threshold: float,
                   boxes: Sequence[Dict[str, int]] = ()) -> Path:
    """Side by side: the frame as the camera saw it with the alarm's boxes in red, and the frame with
    the anomaly heat-map blended over it (blue = 0, red = threshold and above); written atomically as
    PNG or JPEG (by suffix), never over an existing file (FileExistsError). An operator sees the part
    itself and where the model looked."""
    path = Path(path)
    boxed = frame_bgr.copy()
    thickness = max(1, round(min(frame_bgr.shape[:2]) / 160))
    for box in boxes:
        cv2.rectangle(boxed, (box["x"], box["y"]), (box["x"] + box["w"] - 1, box["y"] + box["h"] - 1),
                      (0, 0, 255), thickness)
    overlay = heatmap_overlay(frame_bgr, amap, vmin=0.0, vmax=max(threshold, 1e-12))
    ok, encoded = cv2.imencode(path.suffix or ".jpg", np.hstack([boxed, overlay]))
    if not ok:
        raise ValueError(f"{path}: OpenCV cannot encode a {path.suffix!r} image")
    write_new_file(path, encoded.tobytes())
    return path


def write_new_file(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file, fsync, then hard-link it to ``path``: a reader never sees a
    half file, and an existing ``path`` is never replaced (FileExistsError)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: exists; snapshots are never overwritten")
    fd, staged = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(staged, path)       # fails if path appeared meanwhile: no silent overwrite
        except FileExistsError:
            raise FileExistsError(f"{path}: exists; snapshots are never overwritten") from None
        except OSError:                 # no hard links (e.g. FAT): rename, after the check above
            os.rename(staged, path)
    finally:
        if os.path.exists(staged):
            os.unlink(staged)


class DropOldestQueue:
    """A bounded FIFO between the frame loop and a background sender: ``put`` never blocks; when full,
    the oldest item is dropped and counted (the newest news matters most on a line)."""

    def __init__(self, maxsize: int):
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.dropped = 0

    def put(self, item: Any) -> None:
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                if self._take_nowait() is not _EMPTY:
                    self.dropped += 1

    def get(self, timeout: Optional[float] = None) -> Any:
        """The next item; raises queue.Empty after ``timeout`` seconds. Call ``done()`` once it is handled."""
        return self._queue.get(timeout=timeout)

    def done(self) -> None:
        self._queue.task_done()

    def _take_nowait(self) -> Any:
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            return _EMPTY
        self._queue.task_done()
        return item

    def drain(self) -> int:
        """Drop everything waiting (counted as dropped); returns how many."""
        count = 0
        while self._take_nowait() is not _EMPTY:
            count += 1
        self.dropped += count
        return count

    def wait_empty(self, deadline: float) -> bool:
        """Wait until every item put has been handled, or the monotonic ``deadline`` passes."""
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self._queue.unfinished_tasks

    def __len__(self) -> int:
        return self._queue.qsize()


_EMPTY = object()


SIGNATURE_HEADER = "X-Mrkd-Signature"
EVENT_ID_HEADER = "X-Mrkd-Event-Id"


def sign_body(body: bytes, secret: bytes) -> str:
    """The signature header value for ``body``: ``sha256=`` + hex HMAC-SHA256 with ``secret``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, secret: bytes, header_value: Optional[str]) -> bool:
    """True when ``header_value`` is the signature of ``body`` (constant-time comparison)."""
    return bool(header_value) and hmac.compare_digest(sign_body(body, secret), header_value)


def parse_header(text: str) -> tuple:
    """'Name: value' -> (name, value); ValueError naming the text otherwise."""
    name, sep, value = str(text).partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not name or any(c in name for c in " \t\r\n") or "\n" in value or "\r" in value:
        raise ValueError(f"webhook header must look like 'Name: value', got {text!r}")
    return name, value


class WebhookSender:
    """POSTs event JSON to ``url`` from a background thread.

    queue_size bounds memory: when full, the oldest waiting event is dropped (and counted). Each post
    has ``timeout`` seconds and ``retries`` retries with exponential backoff from ``backoff`` seconds.
    headers: extra HTTP headers (e.g. Authorization); secret: key of the HMAC-SHA256 body signature.
    Every retry of one event sends the same body, event id and signature.
    """

    def __init__(self, url: str, timeout: float = 2.0, retries: int = 2, backoff: float = 0.5,
                 queue_size: int = 100, headers: Optional[Mapping[str, str]] = None,
                 secret: Optional[bytes] = None):
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.headers = dict(headers or {})
        self.secret = secret
        self._queue = DropOldestQueue(queue_size)
        self._stop = threading.Event()
        self.sent = self.failed = 0
        self._thread = threading.Thread(target=self._worker, name="webhook", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        return self._queue.dropped

    def post(self, event: dict) -> None:
        """Queue an event; never blocks."""
        self._queue.put(event)

    def request_headers(self, event: dict, body: bytes) -> Dict[str, str]:
        headers = {"Content-Type": "application/json", **self.headers}
        if event.get("event_id"):
            headers[EVENT_ID_HEADER] = str(event["event_id"])
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign_body(body, self.secret)
        return headers

    def _send(self, event: dict) -> bool:
        body = json.dumps(event).encode("utf-8")
        headers = self.request_headers(event, body)
        for attempt in range(self.retries + 1):
            if attempt and self._stop.wait(self.backoff * 2 ** (attempt - 1)):
                return False     # closing: no more retries
            request = urllib.request.Request(self.url, data=body, method="POST", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    if 200 <= response.status < 300:
                        return True
            except Exception as exc:   # refused, timed out, HTTP error: retry
                logger.debug("webhook %s attempt %d failed: %s", self.url, attempt + 1, exc)
        return False

    def _worker(self) -> None:
        while True:
            event = self._queue.get()
            try:
                if event is None:
                    return
                if self._send(event):
                    self.sent += 1
                else:
                    self.failed += 1
            finally:
                self._queue.done()

    def close(self, deadline_s: float = 5.0) -> None:
        """Give queued events until ``deadline_s`` to go out, then stop (the rest count as dropped)."""
        end = time.monotonic() + deadline_s
        self._queue.wait_empty(end)
        self._stop.set()
        self._queue.drain()          # whatever did not make it is dropped, then the sentinel ends the worker
        self._queue.put(None)
        self._thread.join(timeout=max(0.0, end - time.monotonic()) + self.timeout + 1)

    def stats(self) -> dict:
        return {"sent": self.sent, "failed": self.failed, "dropped": self.dropped}


def new_event_id(now: Optional[dt.datetime] = None) -> str:
    """UTC time to the millisecond + 8 random hex digits, e.g. ``20261201T060512.345Z-3f9a1c2b``:
    sorts by time, unique across runs, cameras and machines, safe in a file name."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S.") + f"{now.microsecond // 1000:03d}Z-" + uuid.uuid4().hex[:8]


def make_event(alarm: Alarm, source: str, boxes: List[Dict[str, int]], snapshot: Optional[Path],
               camera: Optional[str] = None, event_id: Optional[str] = None,
               now: Optional[dt.datetime] = None) -> dict:
    """The event record of one alarm (the JSON-lines and webhook payload)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return {
        "event_id": event_id or new_event_id(now),
        "time": now.isoformat(timespec="milliseconds"),
        "camera": camera,
        "source": source,
        "frame_index": alarm.frame_index,
        "frame_time": alarm.timestamp,
        "score": alarm.score,
        "threshold": alarm.threshold,
        "anomalous_in_window": alarm.anomalous_in_window,
        "boxes": boxes,
        "snapshot": str(snapshot) if snapshot else None,
    }


class EventSinks:
    """Where an alarm goes: the JSON-lines log, a snapshot folder and a webhook (each optional)."""

    def __init__(self, events_path=None, snapshots_dir=None, webhook_url=None, snapshot_format: str = ".jpg",
                 webhook_timeout: float = 2.0, webhook_headers: Optional[Mapping[str, str]] = None,
                 webhook_secret: Optional[bytes] = None):
        self.log = EventLog(events_path) if events_path else None
        self.snapshots_dir = Path(snapshots_dir) if snapshots_dir else None
        if self.snapshots_dir:
            self.snapshots_dir.mkdir(parents=True, exist_ok=True)
        self.snapshot_format = snapshot_format
        self.webhook = (WebhookSender(webhook_url, timeout=webhook_timeout, headers=webhook_headers,
                                      secret=webhook_secret) if webhook_url else None)
        self.events = 0

    def emit(self, alarm: Alarm, source: str, frame_bgr: np.ndarray, amap: np.ndarray,
             camera: Optional[str] = None) -> dict:
        """Snapshot, log line and webhook post for one alarm; returns the event. With ``camera``, the
        event is tagged with it and the snapshot goes into the camera's own sub-folder."""
        snapshot = None
        boxes = regions_from_map(amap, alarm.threshold, frame_bgr.shape[:2])
        now = dt.datetime.now(dt.timezone.utc)
        event_id = new_event_id(now)
        if self.snapshots_dir:
            folder = self.snapshots_dir / camera if camera else self.snapshots_dir
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(3):      # a clash of 32 random bits in the same millisecond: draw again
                name = f"alarm_{event_id}_frame{alarm.frame_index:08d}{self.snapshot_format}"
                try:
                    snapshot = write_snapshot(folder / name, frame_bgr, amap, alarm.threshold, boxes)
                    break
                except FileExistsError:
                    event_id = new_event_id(now)
        event = make_event(alarm, source, boxes, snapshot, camera, event_id, now)
        if self.log:
            self.log.write(event)
        if self.webhook:
            self.webhook.post(event)
        self.events += 1
        return event

    def emit_part(self, part, views: Mapping[str, tuple]) -> tuple:
        """One event for an NG or ERROR part (``part``: its PartResult as judged, event_id not yet
        set): a snapshot per camera that has an image (``views``: camera -> (image, anomaly map,
        threshold)) in that camera's folder, the log line and the webhook post. Returns (event_id,
        {camera: snapshot path})."""
        from dataclasses import asdict
        now = dt.datetime.now(dt.timezone.utc)
        event_id = new_event_id(now)
        snapshots: Dict[str, str] = {}
        boxes: Dict[str, list] = {}
        for camera, (image, amap, threshold) in views.items():
            boxes[camera] = regions_from_map(amap, threshold, image.shape[:2])
            if self.snapshots_dir:
                folder = self.snapshots_dir / camera
                folder.mkdir(parents=True, exist_ok=True)
                name = f"part_{event_id}_{part.inspection_id:08d}{self.snapshot_format}"
                snapshots[camera] = str(write_snapshot(folder / name, image, amap, threshold, boxes[camera]))
        record = asdict(part)
        finite = lambda value: value if isinstance(value, float) and np.isfinite(value) else None  # noqa: E731
        record["score"], record["threshold"] = finite(record["score"]), finite(record["threshold"])
        for judgement in record["cameras"]:   # a camera without an image has no score: null, not NaN
            judgement["score"], judgement["threshold"] = finite(judgement["score"]), finite(judgement["threshold"])
            judgement["snapshot"] = snapshots.get(judgement["camera"])
            judgement["boxes"] = boxes.get(judgement["camera"], [])
        event = {"event_id": event_id, "time": now.isoformat(timespec="milliseconds"), "kind": "part",
                 **{k: v for k, v in record.items() if k != "event_id"}}
        if self.log:
            self.log.write(event)
        if self.webhook:
            self.webhook.post(event)
        self.events += 1
        return event_id, snapshots

    def close(self, webhook_deadline_s: float = 5.0) -> dict:
        """Flush the webhook queue (within the deadline), close the log; returns webhook stats."""
        stats = {}
        if self.webhook:
            self.webhook.close(webhook_deadline_s)
            stats = self.webhook.stats()
        if self.log:
            self.log.close()
        return stats
