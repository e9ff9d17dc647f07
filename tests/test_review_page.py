"""The operator page's review view and shadow panel, against a real `mrkd run --http` subprocess.

* Review: headless Chromium (Debian's, driven by Playwright as in test_operator_page.py) presses the
  page's own buttons: without a token and with a wrong one the page shows the refusal and the label
  file stays absent; with the token one line is appended, read back by runtime/review.py's reader and
  checked against the event log and a hashlib sha256 of the evidence file.
* Event fields are shown as text: markup in a camera name / event id never becomes an element.
* Hot swap: a live run whose model is replaced over POST /reload (with the token; a wrong one
  changes nothing): the page's camera card, its hello/status JSON and every alarm row name the model
  that judges now / that judged that alarm (checked against the event log), and /metrics' build info
  names only the new model.
* Shadow runs: /metrics parsed by prometheus_client's text parser (and promtool), the counts and
  the correlation checked against numpy over both models' scores of the same frame sequence
  (computed here with the models, in loop order), and the summary JSON's "shadow" section.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from line_fixtures import http_get, wait_for
from peers import require_program
from runtime_fixtures import build_tiny_model, export_tiny_model, normal_frame
from test_metrics_http import samples
from test_operator_page import CHROMIUM, CHROMIUM_ARGS

from mrkd.benchmarks.mosquitto import free_port
from mrkd.runtime.review import GOOD, read_labels

TOKEN = "review-page-control-token"
# (patch size, brightness) per frame: scores of several sizes, so the two models' scores differ.
PATCHES = [(0, 0), (3, 255), (6, 200), (9, 230), (14, 180), (0, 0), (4, 250), (12, 160), (7, 255), (2, 255)]
LIVE_THRESHOLD, CANDIDATE_THRESHOLD = 0.1, 0.05


def write_frames(folder: Path) -> list:
    folder.mkdir()
    rng = np.random.default_rng(0)
    frames = []
    for i, (size, level) in enumerate(PATCHES):
        frame = normal_frame(rng)
        if size:
            frame[10:10 + size, 20:20 + size] = level
        cv2.imwrite(str(folder / f"f{i:02d}.png"), frame)
        frames.append(frame)
    return frames


class MrkdRun:
    """`mrkd run MODEL --source FOLDER --loop --http 127.0.0.1:PORT ...` as a subprocess; ``stop()``
    sends SIGTERM and returns the summary JSON (--summary)."""

    def __init__(self, tmp: Path, model: Path, folder: Path, *extra: str, fps: float = 8.0):
        self.port, self.tmp = free_port(), tmp
        self.url = f"http://127.0.0.1:{self.port}"
        self.summary_path, self.stderr_path = tmp / "summary.json", tmp / "stderr.txt"
        code = "import sys\nfrom mrkd.cli import main\nsys.argv[0] = 'mrkd'\nmain(sys.argv[1:])"
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, "run", str(model), "--source", str(folder), "--loop", "--fps", str(fps),
                 "--cooldown", "0", "--status-every", "0", "--http", f"127.0.0.1:{self.port}",
                 "--summary", str(self.summary_path), *extra],
                stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "MRKD_TEST_TOKEN": TOKEN,
                                                                 "PYTHONWARNINGS": "ignore"})
        up = wait_for(lambda: self.proc.poll() is not None or self._answers(), 60)
        assert up and self.proc.poll() is None, self.stderr_path.read_text()

    def _answers(self) -> bool:
        try:
            return http_get(self.url + "/healthz")[0] in (200, 503)
        except OSError:
            return False

    def stop(self) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.returncode == 0, self.stderr_path.read_text()
        return json.loads(self.summary_path.read_text())


def read_events(path: Path) -> list:
    """The complete lines of a log the live run may be appending to (a line being written is left out)."""
    if not path.is_file():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def review_run(tmp_path: Path, fps: float):
    """A live run of the looped frames with evidence, the control token and a label file:
    (run, events log, label file, evidence folder)."""
    folder = tmp_path / "frames"
    write_frames(folder)
    model = export_tiny_model(tmp_path / "model.onnx", threshold=LIVE_THRESHOLD)
    events, labels, evidence = tmp_path / "events.jsonl", tmp_path / "labels.jsonl", tmp_path / "evidence"
    run = MrkdRun(tmp_path, model, folder, "--events", str(events), "--evidence", str(evidence),
                  "--control-token-env", "MRKD_TEST_TOKEN", "--review-labels", str(labels), fps=fps)
    return run, events, labels, evidence


@pytest.mark.slow
def test_review_view_records_a_label_only_with_the_token(tmp_path):
    require_program(CHROMIUM, ["chromium"])
    from playwright.sync_api import sync_playwright
    run, events, labels, evidence = review_run(tmp_path, fps=6)
    try:
        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(run.url + "/")
            page.wait_for_selector(".alarm .review:not([hidden]) button.mark-good", timeout=15000)
            assert "review needs the control token" in page.locator("#review-state").inner_text()
            assert page.locator("#mode").inner_text() == "read-only"
            item = page.locator(".alarm").last            # the oldest shown: not pushed out while we work
            event_id = item.get_attribute("data-event-id")

            def press(button: str, note: str = "") -> str:
                item.locator(".review input").fill(note)
                item.locator(f"button.{button}").click()
                page.wait_for_function("el => el.dataset.review !== undefined", arg=item.element_handle(),
                                       timeout=10000)
                return item.locator(".answer").inner_text()

            assert press("mark-good") == "refused: wrong or missing token"     # no token
            assert item.get_attribute("data-review") == "refused" and not labels.exists()
            page.fill("#token", "not-the-" + TOKEN)
            page.click("#token-use")
            assert page.locator("#token").input_value() == ""             # not left in the field
            assert press("mark-defect") == "refused: wrong or missing token"
            assert not labels.exists()

            page.fill("#token", TOKEN)
            page.click("#token-use")
            assert "token set" in page.locator("#review-state").inner_text()
            note = 'dust on the lens <b id="injected">x</b>'
            answer = press("mark-good", note)
            assert answer.startswith("recorded: good part (false alarm)"), answer
            assert TOKEN not in page.url and page.evaluate("sessionStorage.getItem('mrkd-control-token')") == TOKEN
            assert page.locator("#injected").count() == 0
            # An event the log does not hold (the page's id swapped for one never written): the page's own
            # button gets the 404 and shows it; the label file keeps its one line.
            item.evaluate("el => { el.dataset.eventId = 'no-such-event'; }")
            assert press("mark-defect").startswith("refused: unknown event")
            assert item.get_attribute("data-review") == "refused"
            assert len(labels.read_text().splitlines()) == 1
            browser.close()
        saved = read_labels(labels)
        assert len(saved) == 1 and len(labels.read_text().splitlines()) == 1
        event = next(e for e in read_events(events) if e["event_id"] == event_id)
        label = saved[0]
        assert (label.event_id, label.label, label.note, label.camera) == (event_id, GOOD, note, "cam0")
        assert label.image_sha256 == event["evidence_sha256"] == \
            hashlib.sha256(Path(event["evidence"]).read_bytes()).hexdigest()
        assert label.who == "operator (page)"
    finally:
        run.stop()
    # The same label from the terminal (`mrkd review`) is the same record, field for field (but who/when).
    from test_review import mrkd
    by_cli = tmp_path / "cli_labels.jsonl"
    done = mrkd("review", events, "--labels", by_cli, "--mark", event_id, "--as", "good", "--note", note,
                "--who", "operator (page)", "--evidence", evidence)
    assert done.returncode == 0, done.stderr
    page_line, cli_line = json.loads(labels.read_text()), json.loads(by_cli.read_text())
    assert sorted(page_line) == sorted(cli_line)
    assert {k: v for k, v in page_line.items() if k not in ("time", "when")} == \
        {k: v for k, v in cli_line.items() if k not in ("time", "when")}


@pytest.mark.slow
def test_one_image_marked_good_and_defect_is_settled_from_the_page(tmp_path):
    """The looped folder alarms on the same frame in each loop: two events, one evidence image. Marked
    good under one and defect under the other, the page shows the refusal (409, nothing written) and a
    button that labels both events together; pressed, the label file holds no contradiction (read
    back by runtime/review.py, every event of that image ends defect)."""
    require_program(CHROMIUM, ["chromium"])
    from playwright.sync_api import sync_playwright
    from mrkd.runtime.review import DEFECT, find_conflicts, last_per_image
    from test_review import by_event
    run, events, labels, _ = review_run(tmp_path, fps=4)

    def twins():
        by_image = {}
        for event in read_events(events):
            by_image.setdefault(event.get("evidence_sha256"), []).append(event["event_id"])
        return next((ids[-2:] for sha, ids in by_image.items() if sha and len(ids) >= 2), None)
    try:
        # 2.5 s a loop at 4 fps; a CI machine under the whole suite's load once took more than 30 s
        assert wait_for(lambda: twins() is not None, 90), (
            "no frame alarmed twice: " + str([(e.get("frame_index"), e.get("evidence_sha256"))
                                              for e in read_events(events)]) + run.stderr_path.read_text()[-2000:])
        first, second = twins()
        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(run.url + "/")
            page.fill("#token", TOKEN)
            page.click("#token-use")
            items = {}
            for event_id in (first, second):
                items[event_id] = page.locator(f'.alarm[data-event-id="{event_id}"]')
                items[event_id].wait_for(timeout=15000)

            def press(item, selector: str) -> str:
                item.evaluate("el => { delete el.dataset.review; }")
                item.locator(selector).click()
                page.wait_for_function("el => el.dataset.review !== undefined", arg=item.element_handle(),
                                       timeout=10000)
                return item.locator(".answer").inner_text()

            assert press(items[first], "button.mark-good").startswith("recorded: good part")
            refused = press(items[second], "button.mark-defect")
            assert refused.startswith("error 409") and "label them together" in refused, refused
            assert len(labels.read_text().splitlines()) == 1             # nothing written by the refusal
            settle = items[second].locator("button.settle")
            assert settle.inner_text().startswith("mark all 2 events of this image")
            assert press(items[second], "button.settle").startswith("recorded: defect confirmed · 2 events")
            browser.close()
        latest = last_per_image(read_labels(labels))
        assert not find_conflicts(latest)
        latest = by_event(latest)
        assert {latest[first].label, latest[second].label} == {DEFECT}
        assert latest[first].image_sha256 == latest[second].image_sha256
    finally:
        run.stop()


def test_event_fields_are_shown_as_text_never_as_markup(tmp_path):
    """An event whose fields carry markup (a hostile or broken source of events) shows it literally."""
    require_program(CHROMIUM, ["chromium"])
    from playwright.sync_api import sync_playwright
    from mrkd.runtime.outputs.base import CameraInfo
    from mrkd.runtime.outputs.web import OperatorServer
    hostile = '<img id="pwn" src=x onerror="document.title=\'pwned\'">'
    server = OperatorServer("127.0.0.1", 0)
    server.on_start([CameraInfo(hostile, "memory", "m.onnx", "00" * 32, "onnxruntime", "fp32", 0.5, "test")])
    server.on_event(hostile, {"event_id": "ev-1", "time": "2026-01-01T00:00:00" + hostile, "score": 0.9,
                              "threshold": 0.5, "frame_index": hostile})
    try:
        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector('.alarm[data-event-id="ev-1"]', timeout=10000)
            text = page.locator('.alarm[data-event-id="ev-1"]').inner_text()
            assert hostile in text and page.locator("#pwn").count() == 0 and page.title() == "mrkd line"
            # no control on this server: the review view says so and shows no buttons
            assert "review is off" in page.locator("#review-state").inner_text()
            assert not page.locator(".alarm .review").first.is_visible()
            browser.close()
    finally:
        server.close()


def hello(url: str) -> dict:
    """The page's ``hello`` record (its JSON: cameras, status, alarms) read from /events as the page does."""
    import urllib.request
    with urllib.request.urlopen(url + "/events", timeout=10) as stream:
        lines = iter(stream.readline, b"")
        assert next(lines) == b"event: hello\n"
        return json.loads(next(lines)[len(b"data: "):])


def reload_took(answer: dict, model: Path, sha: str) -> bool:
    """POST /reload's answer names the new version of ``model``: staged, or already swapped in (the
    line applies a staged model between rounds / parts, which may come before the answer is sent)."""
    return answer.get("staged") == [str(model)] or any(
        (o["model"], o["outcome"], o["new_sha256"]) == (str(model), "swapped", sha) for o in answer.get("outcomes", []))


@pytest.mark.slow
def test_page_names_the_model_that_judges_now_after_a_hot_swap(tmp_path):
    """A page opened before the swap follows it live, a page opened after it starts from it, and
    every alarm row names the model that judged it (the event log's ``model_sha256``)."""
    require_program(CHROMIUM, ["chromium"])
    from playwright.sync_api import sync_playwright
    from mrkd.runtime.metadata import file_sha256
    from test_hot_swap import install
    from test_review import _post
    folder = tmp_path / "frames"
    frames = write_frames(folder)
    live = tmp_path / "deploy" / "model.onnx"
    live.parent.mkdir()
    export_tiny_model(live, threshold=LIVE_THRESHOLD)
    new_threshold = 0.2
    export_tiny_model(tmp_path / "v2.onnx", threshold=new_threshold)
    sha_a, sha_b = file_sha256(live), file_sha256(tmp_path / "v2.onnx")
    scores = _model_scores(live, frames)      # the same graph: both versions alarm, the new one less often
    assert sha_a != sha_b and (scores >= new_threshold).sum() >= 1 and (scores >= LIVE_THRESHOLD).sum() > \
        (scores >= new_threshold).sum()
    events = tmp_path / "events.jsonl"
    run = MrkdRun(tmp_path, live, folder, "--events", str(events), "--control-token-env", "MRKD_TEST_TOKEN", fps=8)
    card_model = "#cam-cam0 dd[data-key=model]"
    try:
        assert wait_for(lambda: hello(run.url)["cameras"], 30)      # the page answers before the line starts
        before = hello(run.url)
        assert before["cameras"][0]["model_sha256"] == sha_a and before["status"][0]["model_sha256"] == sha_a
        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(run.url + "/")
            page.wait_for_selector(".alarm", timeout=15000)
            assert sha_a[:12] in page.locator(card_model).inner_text()
            assert page.locator(".alarm").first.get_attribute("data-model") == sha_a

            install(tmp_path / "v2.onnx", live)
            assert _post(run.url, "/reload", b"", "not-the-" + TOKEN)[0] == 401
            assert _post(run.url, "/reload", b"")[0] == 401
            assert hello(run.url)["cameras"][0]["model_sha256"] == sha_a      # refused: nothing changed
            code, answer = _post(run.url, "/reload", b"", TOKEN)
            assert code == 200 and reload_took(answer, live, sha_b), answer
            assert wait_for(lambda: any(e["model_sha256"] == sha_b for e in read_events(events)), 30)

            # the page opened before the swap follows it without a reload
            page.wait_for_function("([sel, sha]) => document.querySelector(sel).textContent.includes(sha)",
                                   arg=[card_model, sha_b[:12]], timeout=10000)
            threshold_text = page.locator("#cam-cam0 dd[data-key=threshold]").inner_text()
            assert float(threshold_text.split()[0]) == pytest.approx(new_threshold)
            page.wait_for_selector(f'.alarm[data-model="{sha_b}"]', timeout=10000)
            rows = page.locator(".alarm")
            shown = [(rows.nth(i).get_attribute("data-event-id"), rows.nth(i).get_attribute("data-model"),
                      rows.nth(i).inner_text()) for i in range(rows.count())]
            assert wait_for(lambda: {e for e, _, _ in shown} <= {e["event_id"] for e in read_events(events)}, 10)
            logged = {e["event_id"]: e["model_sha256"] for e in read_events(events)}
            assert {model for _, model, _ in shown} == {sha_a, sha_b}, shown      # both sides of the swap
            for event_id, model, text in shown:      # each row: the model that judged that alarm
                assert logged[event_id] == model and "model " + model[:12] in text, (event_id, model, logged)

            # a page opened after the swap starts from the new model
            fresh = browser.new_page()
            fresh.goto(run.url + "/")
            fresh.wait_for_selector(card_model + ":not(:empty)", timeout=10000)
            assert sha_b[:12] in fresh.locator(card_model).inner_text() and sha_a[:12] not in \
                fresh.locator(card_model).inner_text()
            browser.close()
        after = hello(run.url)
        camera = after["cameras"][0]
        assert (camera["model_sha256"], camera["threshold"]) == (sha_b, pytest.approx(new_threshold))
        assert after["status"][0]["model_sha256"] == sha_b
        assert after["status"][0]["threshold"] == pytest.approx(new_threshold)
        logged = {e["event_id"]: e["model_sha256"] for e in read_events(events)}
        assert after["alarms"] and all(a["model_sha256"] == logged[a["event_id"]] for a in after["alarms"])
        # /metrics (prometheus_client's parser): the build info names only the model that judges now
        scraped = samples(http_get(run.url + "/metrics")[1].decode())
        built = {dict(labels)["model_sha256"]: value for (name, labels), value in scraped.items()
                 if name == "mrkd_build_info"}
        assert built == {sha_b: 1.0}
        assert scraped[("mrkd_threshold", (("camera", "cam0"),))] == pytest.approx(new_threshold)
    finally:
        summary = run.stop()
    assert [(s["reason"], s["outcome"], s["new_sha256"]) for s in summary["model_swaps"]] == \
        [("http", "swapped", sha_b)]


def _model_scores(model: Path, frames: list) -> np.ndarray:
    from mrkd.runtime.detector import Detector
    detector = Detector(model)
    try:
        return np.array([float(detector(frame).scores[0]) for frame in frames], dtype=np.float64)
    finally:
        detector.close()


@pytest.mark.slow
def test_shadow_run_on_metrics_and_page_matches_numpy_and_the_summary(tmp_path):
    from playwright.sync_api import sync_playwright
    from mrkd.runtime.metadata import file_sha256
    require_program(CHROMIUM, ["chromium"])
    promtool = require_program("promtool", ["prometheus"])
    folder = tmp_path / "frames"
    frames = write_frames(folder)
    live = export_tiny_model(tmp_path / "live.onnx", threshold=LIVE_THRESHOLD)
    candidate = build_tiny_model(tmp_path / "candidate.onnx", per_scale=True, threshold=CANDIDATE_THRESHOLD)
    sha = file_sha256(candidate)
    live_scores, candidate_scores = _model_scores(live, frames), _model_scores(candidate, frames)

    def expected(n: int):
        """numpy over the first n frames of the loop: (disagreements, candidate-only, live-only, r)."""
        order = np.arange(n) % len(frames)
        x, y = live_scores[order], candidate_scores[order]
        live_says, candidate_says = x >= LIVE_THRESHOLD, y >= CANDIDATE_THRESHOLD
        return (int((live_says != candidate_says).sum()), int((candidate_says & ~live_says).sum()),
                int((live_says & ~candidate_says).sum()), float(np.corrcoef(x, y)[0, 1]))

    assert 0.5 < expected(len(frames))[3] < 0.999 and expected(len(frames))[1] > 0     # a real difference
    run = MrkdRun(tmp_path, live, folder, "--shadow", str(candidate), fps=20)
    try:
        key = (("candidate_sha256", sha), ("live_sha256", file_sha256(live)))
        scraped = {}
        assert wait_for(lambda: scraped.update(samples(http_get(run.url + "/metrics")[1].decode())) or
                        scraped.get(("mrkd_shadow_frames_total", key), 0) >= 2 * len(frames), 30)
        body = http_get(run.url + "/metrics")[1]
        got = samples(body.decode())
        check = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
        n = int(got[("mrkd_shadow_frames_total", key)])
        disagree, candidate_only, live_only, r = expected(n)
        assert got[("mrkd_shadow_dropped_total", key)] == 0
        assert (got[("mrkd_shadow_disagreements_total", key)], got[("mrkd_shadow_candidate_only_total", key)],
                got[("mrkd_shadow_live_only_total", key)]) == (disagree, candidate_only, live_only)
        assert got[("mrkd_shadow_score_correlation", key)] == pytest.approx(r, abs=1e-6)
        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_page()
            page.goto(run.url + "/")
            panel = page.locator("#shadow-panel")
            panel.wait_for(state="visible", timeout=10000)
            assert sha[:12] in panel.locator("dd[data-key=candidate]").inner_text()
            assert str(candidate) in panel.locator("dd[data-key=candidate]").inner_text()      # as given
            assert panel.locator("dd[data-key=live]").inner_text() == f"the live model {file_sha256(live)[:12]}"
            assert int(panel.locator("dd[data-key=frames]").inner_text()) >= n
            shown = float(panel.locator("dd[data-key=correlation]").inner_text())
            assert 0.5 < shown < 0.999
            browser.close()
    finally:
        summary = run.stop()
    shadow = summary["shadow"]
    disagree, candidate_only, live_only, r = expected(shadow["frames"])
    assert shadow["candidate_sha256"] == sha and shadow["dropped"] == 0 and shadow["frames"] >= n
    assert (shadow["disagreements"], shadow["candidate_only"], shadow["live_only"]) == \
        (disagree, candidate_only, live_only)
    assert shadow["score_correlation"] == pytest.approx(r, abs=1e-6)
    assert shadow["frames"] == summary["frames"]


def part_views(images: dict, threshold: float) -> dict:
    """camera -> its judged image as the part runner hands it to part_fields (a FrameResult; flat map)."""
    from mrkd.runtime.outputs.base import FrameResult
    return {name: FrameResult(name, 0, 0.0, image, np.zeros(image.shape[:2], np.float32), 0.0, threshold, False)
            for name, image in images.items()}


def play_part(outputs: list, infos: list, part, views: dict) -> object:
    """One judged part through the outputs' hooks in the part runner's order: see_outputs and
    on_start, then every output's part_fields (``views``: camera -> its judged image, part_views), whose
    fields go into the part's camera judgements, then on_part with that part."""
    for output in outputs:
        output.see_outputs(outputs)
        output.on_start(infos)
    return judge_part(outputs, part, views)


def judge_part(outputs: list, part, views: dict) -> object:
    """One judged part through started outputs: every output's part_fields, their fields into the part's
    camera judgements, then on_part with that part (returned)."""
    from dataclasses import replace
    fields: dict = {}
    for output in outputs:
        for camera, values in output.part_fields(part, views).items():
            fields.setdefault(camera, {}).update(values)
    part = replace(part, cameras=tuple(replace(j, **fields.get(j.camera, {})) for j in part.cameras))
    for output in outputs:
        output.on_part(part)
    return part


def test_an_ng_part_is_reviewed_per_camera_from_the_page(tmp_path):
    """Triggered mode: an NG part of two cameras shows one alarm per camera (its own thumbnail); the
    button of camera "right" labels the right camera's evidence image (hooks called in the part
    runner's order: every output's part_fields, then on_part)."""
    require_program(CHROMIUM, ["chromium"])
    from playwright.sync_api import sync_playwright
    from mrkd.runtime import OutputSettings, build_outputs
    from mrkd.runtime.control import LineControl
    from mrkd.runtime.outputs.base import CameraInfo, CameraJudgement, PartResult
    from mrkd.runtime.outputs.evidence import EvidenceSettings
    from mrkd.runtime.outputs.web import OperatorServer
    events, labels = tmp_path / "events.jsonl", tmp_path / "labels.jsonl"
    outputs = build_outputs(OutputSettings(events=str(events), evidence=EvidenceSettings(str(tmp_path / "ev"))))
    server = OperatorServer("127.0.0.1", 0)
    server.control = LineControl(TOKEN, labels, events, tmp_path / "ev")
    outputs.append(server)
    infos = [CameraInfo(name, "memory", "m.onnx", "00" * 32, "onnxruntime", "fp32", 0.1, "test")
             for name in ("left", "right")]
    rng = np.random.default_rng(5)
    images = {"left": normal_frame(rng), "right": normal_frame(rng)}
    images["right"][5:15, 5:15] = 255
    views = part_views(images, 0.1)
    part = PartResult(inspection_id=1, part_id="P-7", verdict="NG", score=0.4, threshold=0.1,
                      cameras=(CameraJudgement("left", 0.02, 0.1, False, images=1),
                               CameraJudgement("right", 0.4, 0.1, True, images=1)),
                      model_sha256="00" * 32, trigger_time=time.time(), event_id="part-ev-1")
    play_part(outputs, infos, part, views)
    try:
        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_page()
            page.goto(server.url + "/")
            right = page.locator('.alarm[data-event-id="part-ev-1"][data-camera="right"]')
            right.wait_for(timeout=10000)
            assert page.locator('.alarm[data-event-id="part-ev-1"]').count() == 2
            assert "part P-7 NG" in right.inner_text()
            page.wait_for_function("[...document.querySelectorAll('.alarm img')].every(i => i.naturalWidth > 0)",
                                   timeout=5000)
            page.fill("#token", TOKEN)
            page.click("#token-use")
            right.locator("button.mark-defect").click()
            page.wait_for_function("el => el.dataset.review !== undefined", arg=right.element_handle(),
                                   timeout=10000)
            assert right.get_attribute("data-review") == "recorded", right.locator(".answer").inner_text()
            browser.close()
    finally:
        for output in outputs:
            output.on_stop()
    saved = read_labels(labels)
    evidence = tmp_path / "ev" / "right" / "part-ev-1.png"
    assert [(l.event_id, l.label, l.camera) for l in saved] == [("part-ev-1", "defect", "right")]
    assert saved[0].image_sha256 == hashlib.sha256(evidence.read_bytes()).hexdigest()
    assert np.array_equal(cv2.imread(str(evidence)), images["right"])


def test_review_labels_without_an_events_log_is_refused_at_start(tmp_path, monkeypatch):
    """POST /review looks the alarm up in the run's events log: a run started with --review-labels and no
    --events ran on, and every label from the page was refused 404 "no event '...' in None"."""
    from click.testing import CliRunner
    from mrkd.cli import main
    monkeypatch.setenv("MRKD_TEST_TOKEN", TOKEN)
    folder, labels = tmp_path / "frames", tmp_path / "labels.jsonl"
    write_frames(folder)
    model = build_tiny_model(tmp_path / "tiny.onnx")
    result = CliRunner().invoke(main, ["run", str(model), "--source", str(folder), "--http", "127.0.0.1:0",
                                       "--control-token-env", "MRKD_TEST_TOKEN", "--review-labels", str(labels)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.strip() == "Error: --review-labels needs --events LOG: a label names an alarm of the " \
                                    "events log", result.output
    assert not labels.exists()


def test_review_labels_without_an_evidence_folder_is_refused_at_start(tmp_path, monkeypatch):
    """A label names the lossless image its alarm was judged on, which only --evidence writes: a run
    started with --review-labels and --events but no --evidence ran on, and every label from the page was
    refused 409 "no evidence image ... was `mrkd run` started with --evidence?" (found walking the loop
    on an ELPV line)."""
    from click.testing import CliRunner
    from mrkd.cli import main
    monkeypatch.setenv("MRKD_TEST_TOKEN", TOKEN)
    folder, labels, events = tmp_path / "frames", tmp_path / "labels.jsonl", tmp_path / "events.jsonl"
    write_frames(folder)
    model = build_tiny_model(tmp_path / "tiny.onnx")
    result = CliRunner().invoke(main, ["run", str(model), "--source", str(folder), "--http", "127.0.0.1:0",
                                       "--control-token-env", "MRKD_TEST_TOKEN", "--review-labels", str(labels),
                                       "--events", str(events)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.strip() == "Error: --review-labels needs --evidence DIR: a label names the lossless " \
                                    "image its alarm was judged on, which --evidence writes", result.output
    assert not labels.exists() and not events.exists()
