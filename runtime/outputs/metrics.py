"""Prometheus metrics of a line (prometheus-client, the ``line`` extra), served at ``/metrics`` by the
``--http`` server (runtime/outputs/web.py), and the ``/healthz`` verdict.

Per camera (label ``camera``): ``mrkd_frames_total``, ``mrkd_frames_dropped_total``,
``mrkd_bad_frames_total``, ``mrkd_alarms_total``, ``mrkd_source_up``, ``mrkd_source_reconnects_total``;
histograms ``mrkd_inference_seconds`` (each frame's share of its batch), ``mrkd_end_to_end_latency_seconds``
(frame arrival to result) and ``mrkd_image_score_ratio`` (score / the camera's threshold, so 1.0 is
the alarm level for every camera: good parts drifting towards it show here long before alarms do);
``mrkd_threshold``; ``mrkd_build_info`` (1, labelled with model hash, backend, precision, version);
``mrkd_mqtt_failures_total`` and ``mrkd_webhook_failures_total`` read from those senders at scrape time.

The hooks run on the loop thread and only bump counters (a few microseconds per frame).
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

from mrkd.deps import require
from mrkd.runtime.outputs.base import CameraInfo, CameraStatus, FrameResult, LineObserver

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
SCORE_RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0)


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("mrkd")
    except Exception:
        return "unknown"


class MetricsObserver(LineObserver):
    """Keeps a line's Prometheus metrics in its own registry; ``exposition()`` is the /metrics body.

    mqtt_failures: returns {camera: failures} (MqttObserver.failures); webhook_stats: returns the
    webhook sender's {"failed", "dropped", ...} (EventSinks.webhook.stats). stale_s: /healthz
    reports a camera as failing when it has scored no frame for this long.
    """

    def __init__(self, mqtt_failures: Optional[Callable[[], Mapping[str, int]]] = None,
                 webhook_stats: Optional[Callable[[], Mapping[str, int]]] = None, stale_s: float = 10.0):
        prom = require("prometheus_client")
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        self.stale_s = stale_s
        r, cam = self.registry, ["camera"]
        self.frames = prom.Counter("mrkd_frames", "Frames scored", cam, registry=r)
        self.dropped = prom.Counter("mrkd_frames_dropped", "Frames dropped before scoring (a newer one arrived)",
                                    cam, registry=r)
        self.bad = prom.Counter("mrkd_bad_frames", "Frames that could not be decoded or had the wrong shape",
                                cam, registry=r)
        self.alarms = prom.Counter("mrkd_alarms", "Alarm events raised", cam, registry=r)
        self.reconnects = prom.Counter("mrkd_source_reconnects", "Times the source was reopened after it dropped",
                                       cam, registry=r)
        self.source_up = prom.Gauge("mrkd_source_up", "1 while the camera delivers frames", cam, registry=r)
        self.inference = prom.Histogram("mrkd_inference_seconds", "Model time per frame (its share of the batch)",
                                        cam, buckets=LATENCY_BUCKETS, registry=r)
        self.latency = prom.Histogram("mrkd_end_to_end_latency_seconds", "From a frame's arrival to its result",
                                      cam, buckets=LATENCY_BUCKETS, registry=r)
        self.score_ratio = prom.Histogram("mrkd_image_score_ratio",
                                          "Image score divided by the camera's alarm threshold (1 = alarm level)",
                                          cam, buckets=SCORE_RATIO_BUCKETS, registry=r)
        self.threshold = prom.Gauge("mrkd_threshold", "Alarm threshold on the image score", cam, registry=r)
        self.build_info = prom.Gauge("mrkd_build_info", "The model and runtime a camera runs (always 1)",
                                     ["camera", "model_sha256", "backend", "precision", "version"], registry=r)
        self.last_frame = prom.Gauge("mrkd_last_frame_timestamp_seconds", "Unix time of the last scored frame",
                                     cam, registry=r)
        self._failures = _FailureCollector(mqtt_failures, webhook_stats)
        r.register(self._failures)
        self._children: Dict[str, tuple] = {}
        self._status: Dict[str, Tuple[int, int, int]] = {}     # camera -> (dropped, bad, reconnects) seen
        self._up: Dict[str, bool] = {}
        self._last_frame_at: Dict[str, float] = {}
        self._state = "starting"

    # -- hooks
    def on_start(self, cameras: Sequence[CameraInfo]) -> None:
        version = _version()
        for info in cameras:
            name = info.name
            self._children[name] = (self.frames.labels(name), self.inference.labels(name), self.latency.labels(name),
                                    self.score_ratio.labels(name), self.last_frame.labels(name))
            for metric in (self.dropped, self.bad, self.alarms, self.reconnects):
                metric.labels(name)            # present at 0 from the start: rate() needs a first sample
            self.source_up.labels(name).set(0)
            self.threshold.labels(name).set(info.threshold)
            self.build_info.labels(name, info.model_sha256, info.backend, info.precision, version).set(1)
            self._status[name] = (0, 0, 0)
            self._up[name] = False
        self._state = "running"

    def on_frame(self, result: FrameResult) -> None:
        frames, inference, latency, ratio, last = self._children[result.camera]
        frames.inc()
        inference.observe(result.infer_s)
        latency.observe(result.latency_s)
        if result.threshold > 0:
            ratio.observe(result.score / result.threshold)
        now = time.time()
        last.set(now)
        self._last_frame_at[result.camera] = now

    def on_event(self, camera: str, event: dict) -> None:
        self.alarms.labels(camera).inc()

    def on_status(self, status: CameraStatus) -> None:
        name = status.camera
        dropped, bad, reconnects = self._status.get(name, (0, 0, 0))
        # The loop reports running totals; counters only go up, so add what is new.
        for counter, before, now in ((self.dropped, dropped, status.dropped), (self.bad, bad, status.bad_frames),
                                     (self.reconnects, reconnects, status.reconnects)):
            if now > before:
                counter.labels(name).inc(now - before)
        self._status[name] = (max(dropped, status.dropped), max(bad, status.bad_frames),
                              max(reconnects, status.reconnects))
        self.source_up.labels(name).set(1 if status.up else 0)
        self._up[name] = status.up

    def on_stop(self) -> None:
        self._state = "stopped"
        for name in self._up:
            self._up[name] = False
            self.source_up.labels(name).set(0)

    # -- serving
    def exposition(self) -> Tuple[bytes, str]:
        """(body, content type) of /metrics."""
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST

    def health(self) -> Tuple[bool, dict]:
        """(healthy, details): healthy while running and every camera is up and scored a frame within stale_s."""
        now = time.time()
        cameras = {}
        for name, up in self._up.items():
            last = self._last_frame_at.get(name)
            age = None if last is None else round(now - last, 3)
            cameras[name] = {"source_up": up, "last_frame_age_s": age,
                             "ok": bool(up and age is not None and age <= self.stale_s)}
        healthy = self._state == "running" and bool(cameras) and all(c["ok"] for c in cameras.values())
        return healthy, {"status": "ok" if healthy else ("failing" if self._state == "running" else self._state),
                         "cameras": cameras}


class _FailureCollector:
    """Reads the MQTT and webhook senders' own failure counts at scrape time (no copy to keep in sync)."""

    def __init__(self, mqtt_failures, webhook_stats):
        self._core = require("prometheus_client.core")
        self.mqtt_failures, self.webhook_stats = mqtt_failures, webhook_stats

    def describe(self):
        return []          # unknown label sets until the first scrape; registering must not call collect

    def collect(self):
        core = self._core
        if self.mqtt_failures is not None:
            family = core.CounterMetricFamily("mrkd_mqtt_failures", "MQTT messages dropped or failed to publish",
                                              labels=["camera"])
            for camera, count in sorted(self.mqtt_failures().items()):
                family.add_metric([camera], float(count))
            yield family
        if self.webhook_stats is not None:
            stats = self.webhook_stats() or {}
            family = core.CounterMetricFamily("mrkd_webhook_failures",
                                              "Webhook events that failed after their retries or were dropped")
            family.add_metric([], float(stats.get("failed", 0) + stats.get("dropped", 0)))
            yield family
