"""Prometheus /metrics and /healthz: the hooks' counters checked against numbers counted by the test,
the histogram buckets against a brute-force count of the same scores, and the text scraped during
a live run checked by Prometheus' own ``promtool check metrics``."""

import hashlib
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from line_fixtures import DrivenFrames, LineRun, Recorder, http_get, wait_for
from peers import require_program
from runtime_fixtures import build_tiny_model

from mrkd.runtime import OutputSettings, build_outputs
from mrkd.runtime.outputs.metrics import SCORE_RATIO_BUCKETS, SCRAPE_CACHE_S, MetricsObserver
from mrkd.runtime.outputs.base import CameraInfo, CameraStatus, FrameResult, LineObserver, OutputHealth
from mrkd.runtime.outputs.web import OperatorServer


def samples(text: str) -> dict:
    """{(sample name, sorted labels): value} parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _info(name="a", threshold=0.5):
    return CameraInfo(name=name, source="memory", model="m.onnx", model_sha256="ab" * 32, backend="onnxruntime",
                      precision="int8", threshold=threshold, threshold_source="sidecar m.json")


def _frame(camera, i, score, threshold=0.5, latency=0.01):
    image = np.zeros((4, 4, 3), np.uint8)
    return FrameResult(camera, i, i / 10, image, np.zeros((4, 4), np.float32), score, threshold, score >= threshold,
                       infer_s=latency / 2, latency_s=latency)


class FixedHealth(LineObserver):
    """An output whose health() is the given record (the contract metrics reads at scrape time)."""

    def __init__(self, health):
        self._health = health

    def health(self):
        return self._health


def test_hook_counts_and_score_histogram_match_a_brute_force_count():
    metrics = MetricsObserver()
    metrics.see_outputs([metrics, FixedHealth(OutputHealth("mqtt", False, "unreachable", sent=5, failed=2)),
                         FixedHealth(OutputHealth("webhook", True, "delivering", sent=7, failed=1, dropped=3)),
                         FixedHealth(None)])
    metrics.on_start([_info("a", 0.5), _info("b", 2.0)])
    rng = np.random.default_rng(0)
    scores = {"a": rng.uniform(0, 1.2, 300), "b": rng.uniform(0, 5, 120)}
    for camera, values in scores.items():
        for i, score in enumerate(values):
            metrics.on_frame(_frame(camera, i, float(score), 0.5 if camera == "a" else 2.0, latency=0.004))
    for _ in range(4):
        metrics.on_event("a", {"event_id": "x"})
    for dropped, bad, reconnects in ((0, 0, 0), (5, 1, 0), (5, 1, 0), (9, 1, 2)):   # running totals
        metrics.on_status(CameraStatus("a", up=True, dropped=dropped, bad_frames=bad, reconnects=reconnects))
    metrics.on_status(CameraStatus("b", up=False))
    got = samples(metrics.exposition()[0].decode())
    a, b = (("camera", "a"),), (("camera", "b"),)
    assert got[("mrkd_frames_total", a)] == 300 and got[("mrkd_frames_total", b)] == 120
    assert got[("mrkd_alarms_total", a)] == 4 and got[("mrkd_alarms_total", b)] == 0
    assert (got[("mrkd_frames_dropped_total", a)], got[("mrkd_bad_frames_total", a)],
            got[("mrkd_source_reconnects_total", a)]) == (9, 1, 2)
    assert got[("mrkd_source_up", a)] == 1 and got[("mrkd_source_up", b)] == 0
    assert got[("mrkd_threshold", b)] == 2.0
    for camera, threshold in (("a", 0.5), ("b", 2.0)):
        ratios = scores[camera] / threshold
        for le in SCORE_RATIO_BUCKETS:
            key = ("mrkd_image_score_ratio_bucket", (("camera", camera), ("le", repr(float(le)))))
            assert got[key] == int(np.sum(ratios <= le)), (camera, le)
        assert got[("mrkd_image_score_ratio_sum", (("camera", camera),))] == pytest.approx(ratios.sum())
    assert got[("mrkd_end_to_end_latency_seconds_bucket", (("camera", "a"), ("le", "0.0025")))] == 0
    assert got[("mrkd_end_to_end_latency_seconds_bucket", (("camera", "a"), ("le", "0.005")))] == 300
    build = [k for k in got if k[0] == "mrkd_build_info" and ("camera", "a") in k[1]]
    assert len(build) == 1 and ("precision", "int8") in build[0][1] and ("model_sha256", "ab" * 32) in build[0][1]
    mqtt, webhook = (("output", "mqtt"),), (("output", "webhook"),)
    assert got[("mrkd_output_failures_total", mqtt)] == 2 and got[("mrkd_output_up", mqtt)] == 0
    assert got[("mrkd_output_failures_total", webhook)] + got[("mrkd_output_dropped_total", webhook)] == 4
    assert got[("mrkd_output_sent_total", webhook)] == 7 and got[("mrkd_output_up", webhook)] == 1
    healthy, details = metrics.line_health()
    assert details["outputs"]["mqtt"]["ok"] is False and details["outputs"]["webhook"]["failed"] == 1
    assert not healthy and details["cameras"]["b"]["ok"] is False and details["cameras"]["a"]["ok"] is True


class FixedShadow(LineObserver):
    """A shadow run whose comparison() is the given record (what metrics reads at scrape time)."""

    def __init__(self, comparison):
        self.comparison_now = comparison

    def comparisons(self):
        return [self.comparison_now]


def test_shadow_comparison_is_exported_per_candidate_and_correlation_only_once_known():
    from mrkd.runtime.line.shadow import ShadowComparison
    metrics = MetricsObserver()
    metrics.see_outputs([metrics])
    metrics.on_start([_info("a")])
    assert not any(k[0].startswith("mrkd_shadow") for k in samples(metrics.exposition()[0].decode()))
    first = ShadowComparison("c.onnx", "cd" * 32, 0.3, frames=1, disagreements=1, candidate_only=1, live_only=0,
                             score_correlation=None, dropped=2, errors=0, live_sha256="ab" * 32)
    shadow = FixedShadow(first)
    metrics.see_outputs([metrics, shadow])
    got = samples(metrics.exposition()[0].decode())
    key = (("candidate_sha256", "cd" * 32), ("live_sha256", "ab" * 32))
    assert (got[("mrkd_shadow_frames_total", key)], got[("mrkd_shadow_disagreements_total", key)],
            got[("mrkd_shadow_candidate_only_total", key)], got[("mrkd_shadow_live_only_total", key)],
            got[("mrkd_shadow_dropped_total", key)]) == (1, 1, 1, 0, 2)
    assert ("mrkd_shadow_score_correlation", key) not in got          # one frame: no correlation yet
    shadow.comparison_now = ShadowComparison("c.onnx", "cd" * 32, 0.3, 40, 7, 3, 4, -0.25, 2, 0, "ab" * 32)
    got = samples(metrics.exposition()[0].decode())                   # read at scrape time, not copied
    assert got[("mrkd_shadow_frames_total", key)] == 40 and got[("mrkd_shadow_live_only_total", key)] == 4
    assert got[("mrkd_shadow_score_correlation", key)] == -0.25


def test_scraped_during_a_run_promtool_accepts_it_and_healthz_follows_the_camera(tmp_path):
    promtool = require_program("promtool", ["prometheus"])
    model = build_tiny_model(tmp_path / "m.onnx")
    frames, recorder = DrivenFrames(fps=50), Recorder()
    sinks = build_outputs(OutputSettings(events=str(tmp_path / "events.jsonl")))
    metrics = MetricsObserver(stale_s=5.0)
    server = OperatorServer("127.0.0.1", 0, metrics=metrics)
    metrics.see_outputs([*sinks, metrics, server])
    run = LineRun(model, {"press": frames}, [recorder, metrics, server], sinks, stale_after_s=0.5)
    assert wait_for(lambda: len(recorder.frames) >= 20, 10)
    frames.defects(3)
    assert wait_for(lambda: len(recorder.events) == 3, 10)
    code, first = http_get(server.url + "/metrics")
    assert code == 200
    time.sleep(SCRAPE_CACHE_S + 0.1)          # a scrape within SCRAPE_CACHE_S may get the same bytes
    second = http_get(server.url + "/metrics")[1]
    key = ("mrkd_frames_total", (("camera", "press"),))
    assert samples(second.decode())[key] > samples(first.decode())[key] > 0      # live, not a snapshot at start
    check = subprocess.run([promtool, "check", "metrics"], input=second, capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    code, body = http_get(server.url + "/healthz")
    assert code == 200 and json.loads(body)["cameras"]["press"]["source_up"] is True
    # The camera goes silent: down in the metrics and a failing health check, then back.
    frames.pause()
    assert wait_for(lambda: http_get(server.url + "/healthz")[0] == 503, 5)
    time.sleep(SCRAPE_CACHE_S)                 # the scrape below shows every frame scored before the pause
    text = http_get(server.url + "/metrics")[1].decode()
    got = samples(text)
    assert got[("mrkd_source_up", (("camera", "press"),))] == 0
    # Everything scored so far is counted, and the score histogram holds exactly those scores.
    scores = np.array([r.score / r.threshold for r in recorder.frames])
    assert got[key] == len(scores) == got[("mrkd_image_score_ratio_count", (("camera", "press"),))]
    for le in SCORE_RATIO_BUCKETS:
        assert got[("mrkd_image_score_ratio_bucket", (("camera", "press"), ("le", repr(float(le)))))] == \
            int(np.sum(scores <= le))
    assert got[("mrkd_alarms_total", (("camera", "press"),))] == 3
    sha = hashlib.sha256(Path(model).read_bytes()).hexdigest()
    from mrkd.runtime.backends import resolve_backend_name     # what --backend auto runs here
    assert any(k[0] == "mrkd_build_info" and ("model_sha256", sha) in k[1]
               and ("backend", resolve_backend_name(model)) in k[1] for k in got)
    frames.resume()
    assert wait_for(lambda: http_get(server.url + "/healthz")[0] == 200, 5)
    summary = run.stop()
    assert summary["cameras"]["press"]["alarms"] == 3


def test_a_page_full_of_live_views_still_answers_the_scraper_and_the_health_check(tmp_path):
    """Every connection the page serves held by a live view of the camera: the page itself is
    answered 503, but Prometheus' scrape (checked by promtool) and /healthz still are, from the few
    connections kept for them."""
    import socket
    promtool = require_program("promtool", ["prometheus"])
    model = build_tiny_model(tmp_path / "m.onnx")
    frames, recorder = DrivenFrames(fps=30), Recorder()
    metrics = MetricsObserver(stale_s=5.0)
    server = OperatorServer("127.0.0.1", 0, metrics=metrics, max_connections=4)
    metrics.see_outputs([metrics, server])
    run = LineRun(model, {"press": frames}, [recorder, metrics, server], [], stale_after_s=2.0)
    viewers = []
    try:
        assert wait_for(lambda: len(recorder.frames) >= 5, 10)
        for _ in range(4):
            viewer = socket.create_connection(server.httpd.server_address[:2], timeout=5)
            viewer.sendall(b"GET /stream/press.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert viewer.recv(4096).startswith(b"HTTP/1.1 200"), "a live view was not served"
            viewers.append(viewer)
        assert http_get(server.url + "/")[0] == 503                 # the page is full
        for _ in range(3):       # one request per reserved connection, each given back
            code, body = http_get(server.url + "/metrics")
            assert code == 200
            check = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
            assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
            code, body = http_get(server.url + "/healthz")
            assert code == 200 and json.loads(body)["cameras"]["press"]["source_up"] is True
    finally:
        for viewer in viewers:
            viewer.close()
        run.stop()


@pytest.mark.slow
def test_mrkd_run_http_serves_metrics_health_and_the_page(tmp_path):
    import os
    import signal
    import sys
    from runtime_fixtures import normal_then_defective, write_video
    from mrkd.benchmarks.mosquitto import free_port

    video = write_video(tmp_path / "v.avi", [f for s in range(30) for f in normal_then_defective(9, 1, seed=s)])
    model = build_tiny_model(tmp_path / "m.onnx")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", "from mrkd.cli import main; main()", "run", str(model),
                             "--source", f"belt={video}", "--fps", "25", "--cooldown", "0", "--status-every", "0",
                             "--http", f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        def scraped():
            try:
                return samples(http_get(url + "/metrics")[1].decode()).get(("mrkd_alarms_total", (("camera", "belt"),)), 0) >= 1
            except OSError:
                return False
        assert wait_for(scraped, 30, 0.1), proc.stderr.read1().decode() if proc.poll() is not None else ""
        assert http_get(url + "/healthz")[0] == 200
        code, page = http_get(url + "/")
        assert code == 200 and b"EventSource" in page
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert b"operator page http://127.0.0.1" in err
    assert b"did not deliver" not in err, err.decode()          # a page stopped with the run is not a failure
    summary = json.loads(out.decode())
    assert summary["outputs"]["page"]["ok"] and summary["outputs"]["page"]["state"] == "stopped"


def test_http_address_without_a_host_listens_on_localhost_only():
    """`--http :PORT` serves this machine only (as `--modbus :PORT`); the network only when named."""
    from mrkd.runtime.outputs.web import parse_address
    assert parse_address(":8080") == ("127.0.0.1", 8080)
    assert parse_address("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert parse_address("[::1]:8080") == ("::1", 8080)


def test_line_outputs_never_import_torch():
    import sys
    code = ("import sys\nimport mrkd.runtime.outputs.mqtt, mrkd.runtime.outputs.metrics, mrkd.runtime.outputs.web, mrkd.runtime.cli\n"
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\nassert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _page_hello(url: str) -> dict:
    """The first Server-Sent Event of the page's /events (what a page opened now is shown)."""
    import http.client
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request("GET", "/events")
        response = connection.getresponse()
        while True:
            line = response.readline().decode()
            if line.startswith("data:"):
                return json.loads(line[5:])
    finally:
        connection.close()


class PageShadow(FixedShadow):
    """A shadow run as the page reads it: the current pair's comparison()."""

    def comparison(self):
        return self.comparison_now


def test_the_pages_shadow_panel_names_the_candidate_as_given_and_the_live_model_it_is_compared_with():
    """After a promotion the candidate is compared with itself (0 differ, correlation 1.0); the page's
    panel showed only the candidate's file name ("model.onnx", as is the live model's: a refit writes
    <parent>.vN/model.onnx) and never which live model it was compared with, so the trivial agreement
    read as the candidate's merit. The page now gets the candidate's path as given, the live model's
    hash and whether the candidate is the live model."""
    from mrkd.runtime.line.shadow import ShadowComparison
    server = OperatorServer("127.0.0.1", 0)
    shadow = PageShadow(ShadowComparison("run1/last.v2/model.onnx", "cd" * 32, 0.3, 40, 7, 3, 4, 0.8, 0, 0,
                                          "ab" * 32))
    server.see_outputs([server, shadow])
    server.on_start([_info("a")])
    try:
        panel = _page_hello(server.url)["shadow"]
        assert [(p["candidate"], p["live_sha256"], p["candidate_is_live"]) for p in panel] == \
            [("run1/last.v2/model.onnx", "ab" * 32, False)]
        shadow.comparison_now = ShadowComparison("run1/last.v2/model.onnx", "cd" * 32, 0.3, 9, 0, 0, 0, 1.0, 0, 0,
                                                 "cd" * 32)                  # promoted
        panel = _page_hello(server.url)["shadow"]
        assert [(p["live_sha256"], p["candidate_is_live"]) for p in panel] == [("cd" * 32, True)]
    finally:
        server.on_stop()
        server.close()
    page = (Path(__file__).resolve().parents[1] / "runtime" / "outputs" / "page.html").read_text()
    assert "s.live_sha256" in page and "s.candidate_is_live" in page        # the panel shows both


def test_a_triggered_camera_is_starting_until_its_first_status_then_ok():
    """The parts runner tells the outputs of the start, then of each camera's state (its first status,
    queued right after). A /healthz between the two said "failing" with source_up false for a healthy
    triggered cell (seen once in CI); it is "starting" until that first status arrives."""
    from dataclasses import replace
    metrics = MetricsObserver()
    metrics.on_start([replace(_info("cam0"), triggered=True)])
    healthy, details = metrics.line_health()
    assert (healthy, details["status"]) == (False, "starting"), details
    metrics.on_status(CameraStatus("cam0", up=True))
    healthy, details = metrics.line_health()
    assert (healthy, details["status"]) == (True, "ok"), details
    metrics.on_status(CameraStatus("cam0", up=False))        # a later DOWN is failing, not starting
    healthy, details = metrics.line_health()
    assert (healthy, details["status"]) == (False, "failing"), details


def test_a_free_running_camera_without_frames_is_failing_once_started():
    """A free-run camera reports nothing until its state changes: a dead one at the start must read
    "failing", not "starting" for ever."""
    metrics = MetricsObserver()
    metrics.on_start([_info("cam0")])
    healthy, details = metrics.line_health()
    assert (healthy, details["status"]) == (False, "failing"), details
