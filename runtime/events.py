"""Alarm events: a JSON-lines log, a snapshot per alarm, an optional HTTP webhook.

The log is append-only and crash-safe: each event is one ``os.write`` of a whole line on an
O_APPEND descriptor followed by fsync, and a torn last line left by a crash (power loss mid-write)
is cut off when the log is reopened. The webhook posts on a background thread from a bounded queue
(oldest dropped when full) with a timeout and retries, so a dead or slow receiver never stalls the
stream.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import queue
import threading
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np

from mrkd.atomic import atomic_write_bytes
from mrkd.runtime.alarms import Alarm
from mrkd.runtime.overlay import heatmap_overlay

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
    PNG or JPEG (by suffix). An operator sees the part itself and where the model looked."""
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
    atomic_write_bytes(path, encoded.tobytes())
    return path


class WebhookSender:
    """POSTs event JSON to ``url`` from a background thread.

    queue_size bounds memory: when full, the oldest waiting event is dropped (and counted). Each post
    has ``timeout`` seconds and ``retries`` retries with exponential backoff from ``backoff`` seconds.
    """

    def __init__(self, url: str, timeout: float = 2.0, retries: int = 2, backoff: float = 0.5,
                 queue_size: int = 100):
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self.sent = self.failed = self.dropped = 0
        self._thread = threading.Thread(target=self._worker, name="webhook", daemon=True)
        self._thread.start()

    def post(self, event: dict) -> None:
        """Queue an event; never blocks."""
        while True:
            try:
                self._queue.put_nowait(event)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self._queue.task_done()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def _send(self, event: dict) -> bool:
        body = json.dumps(event).encode("utf-8")
        for attempt in range(self.retries + 1):
            if attempt and self._stop.wait(self.backoff * 2 ** (attempt - 1)):
                return False     # closing: no more retries
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
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
                self._queue.task_done()

    def close(self, deadline_s: float = 5.0) -> None:
        """Give queued events until ``deadline_s`` to go out, then stop (the rest count as dropped)."""
        end = time.monotonic() + deadline_s
        while self._queue.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.02)
        self._stop.set()
        while True:   # whatever did not make it is dropped, then the sentinel ends the worker
            try:
                self._queue.get_nowait()
                self._queue.task_done()
                self.dropped += 1
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join(timeout=max(0.0, end - time.monotonic()) + self.timeout + 1)

    def stats(self) -> dict:
        return {"sent": self.sent, "failed": self.failed, "dropped": self.dropped}


def make_event(alarm: Alarm, source: str, boxes: List[Dict[str, int]], snapshot: Optional[Path]) -> dict:
    """The event record of one alarm (the JSON-lines and webhook payload)."""
    return {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
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
                 webhook_timeout: float = 2.0):
        self.log = EventLog(events_path) if events_path else None
        self.snapshots_dir = Path(snapshots_dir) if snapshots_dir else None
        if self.snapshots_dir:
            self.snapshots_dir.mkdir(parents=True, exist_ok=True)
        self.snapshot_format = snapshot_format
        self.webhook = WebhookSender(webhook_url, timeout=webhook_timeout) if webhook_url else None
        self.events = 0

    def emit(self, alarm: Alarm, source: str, frame_bgr: np.ndarray, amap: np.ndarray) -> dict:
        """Snapshot, log line and webhook post for one alarm; returns the event."""
        snapshot = None
        boxes = regions_from_map(amap, alarm.threshold, frame_bgr.shape[:2])
        if self.snapshots_dir:
            name = f"alarm_{self.events:06d}_frame{alarm.frame_index:08d}{self.snapshot_format}"
            snapshot = write_snapshot(self.snapshots_dir / name, frame_bgr, amap, alarm.threshold, boxes)
        event = make_event(alarm, source, boxes, snapshot)
        if self.log:
            self.log.write(event)
        if self.webhook:
            self.webhook.post(event)
        self.events += 1
        return event

    def close(self, webhook_deadline_s: float = 5.0) -> dict:
        """Flush the webhook queue (within the deadline), close the log; returns webhook stats."""
        stats = {}
        if self.webhook:
            self.webhook.close(webhook_deadline_s)
            stats = self.webhook.stats()
        if self.log:
            self.log.close()
        return stats
