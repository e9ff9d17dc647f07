"""Prometheus metrics of a line (prometheus-client, the ``line`` extra), served at ``/metrics`` by the
``--http`` server (runtime/outputs/web.py), and the ``/healthz`` verdict.

Per camera (label ``camera``; a frame is a scored frame in a free run, a judged image of a part in a
triggered one, ``on_part_image``): ``mrkd_frames_total``, ``mrkd_frames_dropped_total``,
``mrkd_bad_frames_total``, ``mrkd_alarms_total``, ``mrkd_source_up``, ``mrkd_source_reconnects_total``;
histograms ``mrkd_inference_seconds`` (each frame's share of its batch), ``mrkd_end_to_end_latency_seconds``
(frame arrival to result) and ``mrkd_image_score_ratio`` (score / the camera's threshold, so 1.0 is
the alarm level for every camera: good parts drifting towards it show here long before alarms do);
``mrkd_threshold``; ``mrkd_build_info`` (1, labelled with model hash, backend, precision, version; after a
hot swap only the model that judges now).
Per output of the line (label ``output``: events, snapshots, webhook, mqtt, video, page, PLC servers...),
read from each one's ``LineObserver.health()`` at scrape time: ``mrkd_output_up`` (1 while it
delivers), ``mrkd_output_sent_total``, ``mrkd_output_failures_total``, ``mrkd_output_dropped_total``.
A shadow run (``--shadow``, runtime/line/shadow.py), read from its ``comparisons()`` at scrape time,
labelled ``candidate_sha256`` and ``live_sha256``: the current pair of each live model judging now only.
A hot swap (a promotion, a roll back, a new calibration) starts the pair again: the replaced model's series
goes and the new model's counts start at 0 (a counter reset, where a roll back brings a hash back):
``mrkd_shadow_frames_total`` (frames both models scored),
``mrkd_shadow_disagreements_total`` (decisions that differ; ``mrkd_shadow_candidate_only_total`` /
``mrkd_shadow_live_only_total`` split them), ``mrkd_shadow_dropped_total`` and
``mrkd_shadow_score_correlation`` (Pearson, live vs candidate scores; absent until two frames differ).

The hooks run on the loop thread and only bump counters (a few microseconds per frame).

/metrics is rendered at most once per ``SCRAPE_CACHE_S`` (0.5 s) and every request within that time gets
the same bytes (``scrape``): a render holds the interpreter's lock for 2 ms or more per camera (a 2-core
machine), and 6 local threads scraping back to back took a Modbus PLC handshake from 4.6 to 27 ms (median);
a flood now costs two renders a second whatever its rate, as a scraper does. The staleness bound: a scrape begun
``SCRAPE_CACHE_S`` or more after a change (a part, a frame, an output's failure) shows it; one begun sooner may
show the exposition from before it. 0.5 s is half the shortest scrape interval Prometheus is commonly run with (1 s;
its default is 1 min, 15 s is common), so every scrape of a scraper gets a render of its own, and bounds a flood's
renders to 2 a second. Renders are one at a time: scrapes that come during one wait for it instead of starting
their own. /healthz is answered fresh on every request: it reads a few fields and each output's health()
(about 0.2 ms, no render), so a health check never sees an old verdict.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence, Tuple

from mrkd.deps import require
from mrkd.runtime.outputs.base import (CameraInfo, CameraStatus, FrameResult, LineObserver, OutputHealth, PartResult,
                                       TriggerReceipt, Verdict, call_each)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
SCORE_RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0)
SCRAPE_CACHE_S = 0.5      # /metrics renders at most once per this long (the module's docstring says why)


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("mrkd")
    except Exception:
        return "unknown"


class MetricsObserver(LineObserver):
    """Keeps a line's Prometheus metrics in its own registry; ``exposition()`` is the /metrics body.

    The line's other outputs come through ``see_outputs``; their ``health()`` is read at scrape time.
    stale_s: /healthz reports a camera as failing when it has scored no frame for this long.
    """

    def __init__(self, stale_s: float = 10.0, scrape_cache_s: float = SCRAPE_CACHE_S):
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
        # Triggered lines (runtime/line/parts.py): one count per judged part and per refused trigger.
        self.parts = prom.Counter("mrkd_parts", "Parts judged, by verdict (OK, NG, ERROR)", ["result"], registry=r)
        for verdict in Verdict.ALL:
            self.parts.labels(verdict)
        self.trigger_to_verdict = prom.Histogram("mrkd_trigger_to_verdict_seconds",
                                                 "From a part's trigger to its verdict (queue wait included)",
                                                 buckets=LATENCY_BUCKETS, registry=r)
        self.missed_triggers = prom.Counter("mrkd_missed_triggers", "Part triggers refused (queue full, offline, "
                                            "unknown recipe): parts not judged", registry=r)
        self.outputs: List[LineObserver] = []
        r.register(_OutputCollector(self))
        r.register(_ShadowCollector(self))
        self._children: Dict[str, tuple] = {}
        self._status: Dict[str, Tuple[int, int, int]] = {}     # camera -> (dropped, bad, reconnects) seen
        self._up: Dict[str, bool] = {}
        self._build_labels: Dict[str, tuple] = {}      # camera -> its mrkd_build_info labels now
        self._last_frame_at: Dict[str, float] = {}
        self._triggered: Dict[str, bool] = {}          # camera -> judged per part (no frames between parts)
        # Triggered cameras whose first status has not arrived: the parts runner queues it right after
        # on_start, and until then their state is unknown, not down.
        self._unreported: set = set()
        self._state = "starting"
        self.scrape_cache_s = scrape_cache_s
        self._scrape_lock = threading.Lock()
        self._scraped: Optional[Tuple[float, bytes]] = None     # (monotonic time its render began, body)

    # -- hooks
    def see_outputs(self, outputs: Sequence[LineObserver]) -> None:
        self.outputs = [o for o in outputs if o is not self]

    def shadow_comparisons(self) -> list:
        """Every shadow run's current ShadowComparisons (one per live model judging now), read now."""
        found: list = []
        call_each([o for o in self.outputs if callable(getattr(o, "comparisons", None))],
                  lambda shadow: found.extend(shadow.comparisons()))
        return found

    def output_health(self) -> List[OutputHealth]:
        """Every output's health now (outputs that deliver nothing report None and are left out)."""
        found: List[OutputHealth] = []
        call_each(self.outputs, lambda output: found.append(output.health()))
        return [h for h in found if h is not None]

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
            self._build_labels[name] = (name, info.model_sha256, info.backend, info.precision, version)
            self.build_info.labels(*self._build_labels[name]).set(1)
            self._status[name] = (0, 0, 0)
            self._up[name] = False
            self._triggered[name] = info.triggered
            if info.triggered:
                self._unreported.add(name)
        self._state = "running"

    def on_model(self, info: CameraInfo) -> None:
        """A hot swap: mrkd_build_info names the model that judges now (the old series goes) and
        mrkd_threshold its threshold."""
        old = self._build_labels.get(info.name)
        if old is None:
            return
        self.build_info.remove(*old)
        self._build_labels[info.name] = (info.name, info.model_sha256, info.backend, info.precision, old[-1])
        self.build_info.labels(*self._build_labels[info.name]).set(1)
        self.threshold.labels(info.name).set(info.threshold)

    def on_frame(self, result: FrameResult) -> None:
        frames, inference, latency, ratio, last = self._children[result.camera]
        frames.inc()
        inference.observe(result.infer_s)
        latency.observe(result.latency_s)
        if result.threshold > 0:
            ratio.observe(result.score / result.threshold)
        last.set(time.time())        # the gauge is Unix time; the health's age counts on the monotonic clock
        self._last_frame_at[result.camera] = time.monotonic()

    def on_part_image(self, result: FrameResult) -> None:
        """A triggered run's judged image counts as a free run's frame: frames, inference, latency, the
        score ratio (the drift signal) and the last frame's time, per camera."""
        self.on_frame(result)

    def on_event(self, camera: str, event: dict) -> None:
        self.alarms.labels(camera).inc()

    def on_trigger(self, receipt: TriggerReceipt) -> None:
        if not receipt.accepted:
            self.missed_triggers.inc(receipt.count)      # a folded report stands for count refusals

    def on_part(self, result: PartResult) -> None:
        self.parts.labels(result.verdict).inc()
        self.trigger_to_verdict.observe(result.verdict_s)

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
        self._unreported.discard(name)

    def on_stop(self) -> None:
        self._state = "stopped"
        for name in self._up:
            self._up[name] = False
            self.source_up.labels(name).set(0)

    # -- serving
    def exposition(self) -> Tuple[bytes, str]:
        """(body, content type) of /metrics, rendered now."""
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST

    def scrape(self) -> Tuple[bytes, str]:
        """(body, content type) of a /metrics request: the exposition rendered at most once per
        scrape_cache_s, shared by every request within it. Rendering holds the lock, so scrapes that come
        during a render wait for that one; the time taken is its start, so a scrape begun scrape_cache_s
        after a change sees it (any render it gets began after the change)."""
        with self._scrape_lock:
            now = time.monotonic()
            if self._scraped is None or now - self._scraped[0] >= self.scrape_cache_s:
                self._scraped = (now, self.exposition()[0])
            return self._scraped[1], self._prom.CONTENT_TYPE_LATEST

    def line_health(self) -> Tuple[bool, dict]:
        """(healthy, details): healthy while running, every camera is up and scored a frame within
        stale_s (a triggered camera: up, since it makes an image only when a part asks and a line may
        pause for minutes), and every output delivers (an output that cannot is a failing line: alarms go
        nowhere). "starting" until every triggered camera's first status has come. Ages count on the
        monotonic clock: a wall clock set back an hour made a dead camera's age negative, "fresh", for an hour."""
        now = time.monotonic()
        cameras = {}
        for name, up in self._up.items():
            last = self._last_frame_at.get(name)
            age = None if last is None else round(now - last, 3)
            fresh = self._triggered.get(name, False) or (age is not None and age <= self.stale_s)
            cameras[name] = {"source_up": up, "last_frame_age_s": age, "ok": bool(up and fresh)}
            if self._triggered.get(name, False):
                cameras[name]["triggered"] = True
        outputs = {h.name: asdict(h) for h in self.output_health()}
        state = "starting" if self._state == "running" and self._unreported else self._state
        healthy = (state == "running" and bool(cameras) and all(c["ok"] for c in cameras.values())
                   and all(o["ok"] for o in outputs.values()))
        return healthy, {"status": "ok" if healthy else ("failing" if state == "running" else state),
                         "cameras": cameras, "outputs": outputs}


class _OutputCollector:
    """Reads every output's own health at scrape time (no copy of its counts to keep in sync)."""

    def __init__(self, metrics: MetricsObserver):
        self._core = require("prometheus_client.core")
        self.metrics = metrics

    def describe(self):
        return []          # unknown label sets until the first scrape; registering must not call collect

    def collect(self):
        core, label = self._core, ["output"]
        up = core.GaugeMetricFamily("mrkd_output_up", "1 while the output delivers (0: failing, unreachable)",
                                    labels=label)
        sent = core.CounterMetricFamily("mrkd_output_sent", "Items the output delivered", labels=label)
        failed = core.CounterMetricFamily("mrkd_output_failures",
                                          "Items (or connection attempts) the output failed to deliver", labels=label)
        dropped = core.CounterMetricFamily("mrkd_output_dropped", "Items the output gave up unsent", labels=label)
        for health in sorted(self.metrics.output_health(), key=lambda h: h.name):
            up.add_metric([health.name], 1.0 if health.ok else 0.0)
            sent.add_metric([health.name], float(health.sent))
            failed.add_metric([health.name], float(health.failed))
            dropped.add_metric([health.name], float(health.dropped))
        yield from (up, sent, failed, dropped)


class _ShadowCollector:
    """Reads every shadow run's comparison at scrape time (runtime/line/shadow.py ShadowScorer)."""

    def __init__(self, metrics: MetricsObserver):
        self._core = require("prometheus_client.core")
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        core, label = self._core, ["candidate_sha256", "live_sha256"]
        counters = [(core.CounterMetricFamily(f"mrkd_shadow_{name}", text, labels=label), field)
                    for name, text, field in (
                        ("frames", "Frames the shadow candidate scored beside the live model", "frames"),
                        ("disagreements", "Frames on which the candidate's decision differs from the live model's",
                         "disagreements"),
                        ("candidate_only", "Frames only the candidate would have alarmed on", "candidate_only"),
                        ("live_only", "Frames the live model flagged and the candidate would not", "live_only"),
                        ("dropped", "Frames the candidate had no time for (not compared)", "dropped"))]
        correlation = core.GaugeMetricFamily("mrkd_shadow_score_correlation",
                                             "Pearson correlation of the live and candidate image scores",
                                             labels=label)
        comparisons = self.metrics.shadow_comparisons()
        for comparison in comparisons:
            for family, field in counters:
                family.add_metric([comparison.candidate_sha256, comparison.live_sha256], float(getattr(comparison, field)))
            if comparison.score_correlation is not None:
                correlation.add_metric([comparison.candidate_sha256, comparison.live_sha256],
                                       float(comparison.score_correlation))
        if comparisons:
            yield from (family for family, _ in counters)
            yield correlation


def outputs_from(settings) -> list:
    """``--http HOST:PORT`` (OutputSettings.http): the metrics the server's /metrics and /healthz show."""
    return [MetricsObserver()] if settings.http else []
