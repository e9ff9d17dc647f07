"""/healthz and /metrics of a triggered cell, scraped from a real `mrkd run --trigger software
--trigger-stdin --http`: a triggered camera makes an image only when a part asks for one, so its
health cannot be "scored a frame in the last 10 s" (that answered 503 for a cell judging 20 parts a
second, and for every idle pause of the line): it is healthy while its camera is up."""

from __future__ import annotations

import json
import subprocess

import cv2
import numpy as np

from line_fixtures import PageRun, http_get, wait_for
from runtime_fixtures import build_tiny_model, defective_frame, normal_frame


def test_a_triggered_cell_is_healthy_between_parts_and_while_judging_them(tmp_path):
    model = build_tiny_model(tmp_path / "m.onnx")
    parts = tmp_path / "parts"
    parts.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        cv2.imwrite(str(parts / f"p{i}.png"), defective_frame(rng) if i % 2 else normal_frame(rng))
    parts_log = tmp_path / "parts.jsonl"
    run = PageRun(model, "--source", parts, "--loop", "--trigger", "software", "--trigger-stdin",
                  "--parts-log", parts_log, "--status-every", "0")
    try:
        url = run.url
        assert wait_for(lambda: json.loads(http_get(url + "/healthz")[1])["status"] != "starting", 30)
        code, body = http_get(url + "/healthz")            # up, no part yet: an idle line is a healthy one
        assert code == 200, body
        assert json.loads(body)["cameras"]["cam0"]["ok"] is True
        run.trigger(*(f"P-{i}" for i in range(4)))
        assert wait_for(lambda: parts_log.exists() and len(parts_log.read_text().splitlines()) == 4, 30)
        code, body = http_get(url + "/healthz")
        assert code == 200, body
    finally:
        status = run.close()
    assert status == 0, run.stderr
    verdicts = [json.loads(line)["verdict"] for line in parts_log.read_text().splitlines()]
    assert verdicts == ["OK", "NG", "OK", "NG"]


def test_a_triggered_run_counts_every_judged_image_in_the_per_camera_metrics(tmp_path):
    """A triggered run left mrkd_frames_total, mrkd_image_score_ratio (the drift signal),
    mrkd_inference_seconds and mrkd_last_frame_timestamp_seconds at 0: only the part metrics moved. Each
    judged camera image of a part now counts as a free run's frame does (a part of two images per
    camera: two), checked against prometheus_client's parser and promtool."""
    import time

    from peers import require_program
    from prometheus_client.parser import text_string_to_metric_families

    from mrkd.runtime.line.loop import Camera, Line
    from mrkd.runtime.line.parts import PartRunner
    from mrkd.runtime.line.trigger import PartSettings
    from mrkd.runtime.outputs.base import LineObserver
    from mrkd.runtime.outputs.metrics import MetricsObserver
    from mrkd.runtime.sources import ArraySource

    promtool = require_program("promtool", ["prometheus"])

    class Parts(LineObserver):
        def __init__(self):
            self.parts = []

        def on_part(self, result):
            self.parts.append(result)

    model = build_tiny_model(tmp_path / "m.onnx")
    rng = np.random.default_rng(3)
    frames = {"top": [normal_frame(rng), normal_frame(rng), defective_frame(rng), defective_frame(rng)],
              "side": [normal_frame(rng), normal_frame(rng), normal_frame(rng), normal_frame(rng)]}
    line = Line(tuple(Camera(name, "memory", str(model), threshold=0.1, trigger="software") for name in frames))
    metrics, parts = MetricsObserver(), Parts()
    started = time.time()
    runner = PartRunner(line, {name: ArraySource(images) for name, images in frames.items()},
                        PartSettings(images=2, timeout=0.5), observers=[metrics, parts]).start()
    for part_id in ("1", "2", "3"):              # the third finds no image left: ERROR, nothing scored
        runner.trigger(part_id)
        wait_for(lambda: not runner.busy, 20)
    runner.stop()
    text = metrics.exposition()[0].decode()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for family in text_string_to_metric_families(text) for s in family.samples}
    assert [p.verdict for p in parts.parts] == ["OK", "NG", "ERROR"]
    for name in frames:
        camera = (("camera", name),)
        assert got[("mrkd_frames_total", camera)] == 4                       # 2 judged parts x 2 images
        assert got[("mrkd_image_score_ratio_count", camera)] == 4
        assert got[("mrkd_inference_seconds_count", camera)] == 4 and got[("mrkd_inference_seconds_sum", camera)] > 0
        assert got[("mrkd_end_to_end_latency_seconds_count", camera)] == 4
        assert started <= got[("mrkd_last_frame_timestamp_seconds", camera)] <= time.time()
        # the part's camera score is the highest of its images: at least as high as each ratio's mean
        highest = [j.score / j.threshold for p in parts.parts[:2] for j in p.cameras if j.camera == name]
        assert got[("mrkd_image_score_ratio_sum", camera)] <= 2 * sum(highest) + 1e-6
    assert got[("mrkd_parts_total", (("result", "OK"),))] == 1
    check = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
