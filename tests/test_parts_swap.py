"""Hot swap and shadow runs in triggered mode (runtime/line/parts.py with runtime/line/swap.py's
ModelSlots and runtime/line/shadow.py's ShadowScorer).

The models are the tiny ONNX graph written by the exporter's own writer (runtime_fixtures); two
versions differ in their calibrated threshold, so in their sha256 and in the threshold a part is
judged against. In-process tests hold a part "in hand" with a gated source to show that a staged
model takes over only between parts and that a recipe change counts from the next trigger; live
tests run `mrkd run --trigger software --trigger-stdin` as a subprocess and swap the model files
under it with SIGHUP (and POST /reload): every part's event names the model that judged it, the
parts before the swap the old one and those after it the new one, and no part is missing.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import runtime_fixtures
from runtime_fixtures import build_tiny_model, defective_frame, export_tiny_model, normal_frame, reference_map
from test_hot_swap import install
from mrkd.runtime.line.loop import Camera, Line, open_detectors
from mrkd.runtime.line.parts import PartRunner
from mrkd.runtime.line.shadow import ShadowScorer
from mrkd.runtime.line.swap import line_slots
from mrkd.runtime.line.trigger import PartSettings
from mrkd.runtime.metadata import file_sha256
from mrkd.runtime.outputs.base import LineObserver, Verdict
from mrkd.runtime.sources import ArraySource

CLI = "import sys\nfrom mrkd.cli import main\nsys.argv[0] = 'mrkd'\nmain(sys.argv[1:])"


class Recorder(LineObserver):
    def __init__(self):
        self.parts = []

    def on_part(self, result):
        self.parts.append(result)


class Gate:
    """Frames that arrive only when the test lets one through (``release``): the runner holds a
    part in hand, waiting for its image, for as long as the test wants."""

    def __init__(self, frames):
        self.frames, self.allowed = list(frames), threading.Semaphore(0)
        self.asked = 0          # frames the runner's grab has asked for (the last one may be waiting)

    def release(self, n=1):
        for _ in range(n):
            self.allowed.release()

    def __iter__(self):
        for frame in self.frames:
            self.asked += 1
            assert self.allowed.acquire(timeout=30), "the test never released this frame"
            yield frame


def wait_until(predicate, timeout=20.0, what="a condition", detail=None):
    """Poll ``predicate``; on a timeout the message ends with ``detail()`` (e.g. a live run's stderr)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f"\n{detail()}" if detail else ""))
        time.sleep(0.01)


def parts_done(recorder, n, timeout=20.0):
    wait_until(lambda: len(recorder.parts) >= n, timeout, f"{n} parts")


def reference_score(frame):
    square = cv2.resize(frame, (runtime_fixtures.SIZE, runtime_fixtures.SIZE), interpolation=cv2.INTER_AREA)
    return float(reference_map(square[None]).max())


def rng_frames(n, seed, defective=lambda i: i % 2 == 1):
    rng = np.random.default_rng(seed)
    return [defective_frame(rng) if defective(i) else normal_frame(rng) for i in range(n)]


@pytest.fixture
def deploy(tmp_path):
    live = tmp_path / "deploy" / "model.onnx"
    live.parent.mkdir()
    export_tiny_model(live, threshold=0.1)
    export_tiny_model(tmp_path / "v2.onnx", threshold=0.2)
    return live, tmp_path / "v2.onnx", file_sha256(live), file_sha256(tmp_path / "v2.onnx")


@pytest.fixture
def recipe_versions(tmp_path):
    """Recipe 2's model (threshold 0.3) at recipes/r2.onnx and its next version (0.35) beside it:
    (path, next version, sha256, next version's sha256)."""
    recipe = tmp_path / "recipes" / "r2.onnx"
    recipe.parent.mkdir()
    export_tiny_model(recipe, threshold=0.3)
    export_tiny_model(tmp_path / "r2.v2.onnx", threshold=0.35)
    return recipe, tmp_path / "r2.v2.onnx", file_sha256(recipe), file_sha256(tmp_path / "r2.v2.onnx")


def runner_with_slots(line, sources, settings, observers=(), messages=None, shadows=()):
    detectors = open_detectors(line)
    slots = line_slots(line, detectors, status=(messages.append if messages is not None else lambda text: None))
    runner = PartRunner(line, sources, settings, detectors=detectors, observers=observers, status=lambda t: None,
                        slots=slots, shadows=shadows)
    return runner, slots, detectors


# ---------------------------------------------------------------- in process

def test_a_staged_model_takes_over_only_between_parts(deploy):
    live, v2, sha_a, sha_b = deploy
    frames = rng_frames(4, seed=0, defective=lambda i: True)
    gate = Gate(frames)
    line = Line((Camera("cam", "memory", str(live), trigger="software"),))
    recorder = Recorder()
    runner, slots, detectors = runner_with_slots(line, {"cam": ArraySource(gate)}, PartSettings(queue=4, timeout=20),
                                                 [recorder])
    runner.start()
    try:
        gate.release()
        runner.trigger("P1")
        parts_done(recorder, 1)
        runner.trigger("P2")                      # in hand: its image waits at the gate
        wait_until(lambda: gate.asked == 2, what="P2 in hand")
        install(v2, live)
        assert slots.request_reload("SIGHUP")
        assert slots.wait_idle(30) and slots.staged() == [str(live)]
        runner.trigger("P3")                      # queued behind P2
        gate.release(2)
        parts_done(recorder, 3)
        runner.trigger("P4")
        gate.release()
        parts_done(recorder, 4)
    finally:
        summary = runner.stop()
    # P2 was in hand while the new model was staged: judged by the old one, against its threshold
    assert [p.model_sha256 for p in recorder.parts] == [sha_a, sha_a, sha_b, sha_b]
    assert [p.threshold for p in recorder.parts] == [0.1, 0.1, 0.2, 0.2]
    for part, frame in zip(recorder.parts, frames):      # the scores are the graph's (both versions share it)
        assert part.score == pytest.approx(reference_score(frame), abs=1e-5) and part.verdict == Verdict.NG
    assert summary["parts_by_model"] == {sha_a: 2, sha_b: 2} and summary["parts"] == 4
    [record] = [r for r in slots.records if r.outcome == "swapped"]
    assert (record.old_sha256, record.new_sha256, record.frames_before) == (sha_a, sha_b, 2)
    assert "checked on 1 recent frame(s)" in record.detail     # the candidate scored P1's image
    assert runner.detectors is detectors and detectors[str(live.resolve())].threshold == 0.2   # the new one
    for detector in detectors.values():
        detector.close()


def test_parts_log_and_events_name_the_backend_and_precision_that_judged_each_part(deploy, tmp_path):
    """A part line and a part's event named only the model's hash; a swap may change the backend (here) or
    the precision under it. Each line, read with json.loads, names those of the Detector that judged it."""
    from mrkd.runtime.backends import resolve_backend_name
    from mrkd.runtime.detector import Detector
    from mrkd.runtime.outputs.events import EventLogOutput
    from mrkd.runtime.outputs.parts_log import PartsLogOutput
    live, v2, sha_a, sha_b = deploy
    ran = resolve_backend_name(live, "auto")
    other = "onnxruntime" if ran == "openvino" else "openvino"
    if other == "openvino":
        pytest.importorskip("openvino")
    line = Line((Camera("cam", "memory", str(live), trigger="software"),))
    recorder = Recorder()
    parts_log, events_log = tmp_path / "parts.jsonl", tmp_path / "events.jsonl"
    frames = rng_frames(4, seed=2, defective=lambda i: True)          # NG parts: an event each too
    runner, slots, detectors = runner_with_slots(line, {"cam": ArraySource(frames)}, PartSettings(queue=4),
                                                 [recorder, PartsLogOutput(parts_log), EventLogOutput(events_log)])
    slots._opener = lambda path: Detector(path, backend=other)       # the new version runs on the other backend
    runner.start()
    try:
        for part_id in ("P1", "P2"):
            runner.trigger(part_id)
        parts_done(recorder, 2)
        install(v2, live)
        assert slots.request_reload("SIGHUP") and slots.wait_idle(30)
        for part_id in ("P3", "P4"):
            runner.trigger(part_id)
        parts_done(recorder, 4)
    finally:
        runner.stop()
    expected = {"P1": (sha_a, ran, "fp32"), "P2": (sha_a, ran, "fp32"),
                "P3": (sha_b, other, "fp32"), "P4": (sha_b, other, "fp32")}
    for path in (parts_log, events_log):
        lines = [json.loads(text) for text in path.read_text().splitlines()]
        assert {r["part_id"]: (r["model_sha256"], r["backend"], r["precision"]) for r in lines} == expected, path
    for detector in detectors.values():
        detector.close()


def test_recipe_change_counts_from_the_next_trigger_and_recipe_models_are_reloaded(deploy, recipe_versions, tmp_path):
    live, _, sha_a, _ = deploy
    recipe, recipe_v2, sha_r, sha_r2 = recipe_versions
    frames = rng_frames(6, seed=1, defective=lambda i: True)
    gate = Gate(frames)
    line = Line((Camera("cam", "memory", str(live), trigger="software"),))
    settings = PartSettings(queue=4, timeout=20, recipes=((2, str(recipe)),))
    recorder = Recorder()
    runner, slots, detectors = runner_with_slots(line, {"cam": ArraySource(gate)}, settings, [recorder])
    assert str(recipe.resolve()) in detectors          # the recipe's model is one of the slots
    runner.start()
    try:
        runner.trigger("X")                            # recipe 0 is active: X is judged with it ...
        wait_until(lambda: gate.asked == 1, what="X in hand")
        runner.select_recipe(2)                        # ... even though the change comes before its image
        runner.trigger("Y")
        gate.release(2)
        parts_done(recorder, 2)
        install(recipe_v2, recipe)       # a new version of the recipe's model, then SIGHUP
        slots.request_reload("SIGHUP")
        assert slots.wait_idle(30)
        runner.trigger("Z")
        runner.trigger("W", recipe=0)                  # a trigger that names its recipe
        gate.release(2)
        parts_done(recorder, 4)
    finally:
        runner.stop()
    assert [(p.part_id, p.recipe, p.model_sha256, p.threshold) for p in recorder.parts] == [
        ("X", 0, sha_a, 0.1), ("Y", 2, sha_r, 0.3), ("Z", 2, sha_r2, 0.35), ("W", 0, sha_a, 0.1)]
    outcomes = {Path(r.model).name: r.outcome for r in slots.records}
    assert outcomes == {"model.onnx": "unchanged", "r2.onnx": "swapped"}
    for detector in detectors.values():
        detector.close()


@pytest.mark.parametrize("broken, reason", [
    ("truncated", "cannot be loaded"),
    ("backbone", "backbone 'resnet18' differs"),
    ("image size", "image_size 64 differs"),
])
def test_a_broken_model_is_refused_and_the_old_one_keeps_judging(deploy, tmp_path, monkeypatch, broken, reason):
    live, v2, sha_a, _ = deploy
    frames = rng_frames(4, seed=2)
    line = Line((Camera("cam", "memory", str(live), trigger="software"),))
    recorder, messages = Recorder(), []
    runner, slots, detectors = runner_with_slots(line, {"cam": ArraySource(frames)}, PartSettings(queue=4),
                                                 [recorder], messages)
    runner.start()
    try:
        runner.trigger("before")
        parts_done(recorder, 1)
        if broken == "truncated":
            whole = v2.read_bytes()
            (live.parent / ".cut").write_bytes(whole[: len(whole) // 2])
            os.replace(live.parent / ".cut", live)
        elif broken == "backbone":
            build_tiny_model(tmp_path / "other.onnx", metadata_overrides={"backbone": "resnet18"})
            install(tmp_path / "other.onnx", live)
        else:
            monkeypatch.setattr(runtime_fixtures, "SIZE", 64)
            build_tiny_model(tmp_path / "big.onnx")
            install(tmp_path / "big.onnx", live)
        slots.request_reload("SIGHUP")
        runner.trigger("during")                       # parts go on while the new file is looked at
        assert slots.wait_idle(30)
        runner.trigger("after")
        parts_done(recorder, 3)
        time.sleep(0.3)                                # the runner's idle turn, where a swap would happen
        runner.trigger("later")
        parts_done(recorder, 4)
    finally:
        summary = runner.stop()
    assert file_sha256(live) != sha_a
    assert [p.model_sha256 for p in recorder.parts] == [sha_a] * 4       # the running model, not the file's
    for part, frame in zip(recorder.parts, frames):
        assert part.score == pytest.approx(reference_score(frame), abs=1e-5) and part.threshold == 0.1
    assert summary["parts_by_model"] == {sha_a: 4}
    [record] = slots.records
    assert record.outcome == "refused" and reason in record.detail
    [message] = [m for m in messages if "REFUSED" in m]
    assert "\n" not in message and message.startswith("model reload (SIGHUP) REFUSED") and reason in message
    for detector in detectors.values():
        detector.close()


def test_shadow_scores_every_part_image_without_verdicts_of_its_own(deploy, tmp_path):
    live, _, _, _ = deploy
    candidate = export_tiny_model(tmp_path / "candidate.onnx", threshold=0.5)    # same graph, a higher threshold
    frames = rng_frames(6, seed=3)
    line = Line((Camera("cam", "memory", str(live), trigger="software"),))
    recorder = Recorder()
    from mrkd.runtime.detector import Detector
    shadow = ShadowScorer(Detector(candidate))
    runner, _, detectors = runner_with_slots(line, {"cam": ArraySource(frames)}, PartSettings(queue=8),
                                             [recorder], shadows=[shadow])
    assert shadow in runner.observers               # its health and on_stop, as every output's
    runner.start()
    for i in range(6):
        runner.trigger(f"S{i}")
    parts_done(recorder, 6)
    # The stop, not drain(): a part reaches the recorder (the notifier's thread) before the scoring thread
    # has offered its image to the shadow; the stop joins that thread, then the shadow's on_stop drains.
    summary = runner.stop()
    comparison = shadow.comparison()
    live_scores = np.array([p.score for p in recorder.parts])
    reference = np.array([reference_score(f) for f in frames])
    live_ng = np.array([p.verdict == Verdict.NG for p in recorder.parts])
    assert summary["verdicts"]["NG"] == int(live_ng.sum()) == 3      # the live model's verdicts only
    expected = int(((reference >= 0.5) != live_ng).sum())
    assert comparison.frames == 6 and comparison.dropped == 0 and comparison.errors == 0
    assert comparison.disagreements == comparison.live_only == expected and comparison.candidate_only == 0
    assert comparison.score_correlation == pytest.approx(np.corrcoef(live_scores, reference)[0, 1], abs=1e-6)
    assert shadow.summary()["disagreement_rate"] == pytest.approx(expected / 6)
    for detector in detectors.values():
        detector.close()


def test_shadow_counts_images_left_unscored_at_the_stop_as_dropped(tmp_path):
    """A candidate slower than the stop's drain: the images still queued are counted as dropped, so frames +
    dropped is every image offered (before, they vanished from the summary without a count)."""
    from mrkd.runtime.detector import Detector
    gate = threading.Event()

    class Gated:            # the real candidate, held at the gate (a candidate far slower than the line)
        def __init__(self, detector):
            self.inner = detector
            self.threshold, self.model_path, self.metadata = detector.threshold, detector.model_path, detector.metadata

        def __call__(self, image):
            gate.wait(20)
            return self.inner(image)

        def close(self):
            self.inner.close()
    shadow = ShadowScorer(Gated(Detector(export_tiny_model(tmp_path / "candidate.onnx", threshold=0.5))))
    for frame in rng_frames(5, seed=8):
        shadow.offer("cam", frame, 0.2, False, "live")
    threading.Timer(0.5, gate.set).start()       # after the drain: the image in hand is finished, not cut
    shadow.on_stop(drain_s=0.2)
    comparison = shadow.comparison()
    # the worker holds one image at the gate (it may not have taken it yet on a loaded machine)
    assert comparison.frames + comparison.dropped == 5 and comparison.dropped >= 4 and comparison.errors == 0
    assert shadow.health().dropped == comparison.dropped


def test_shadow_of_a_triggered_line_starts_a_new_comparison_at_each_swap_a_roll_back_too(deploy, tmp_path):
    """Parts judged by A, then v2, then A again (rolled back): the comparison after the roll back went on from
    A's first parts. Each swap the runner applies between parts starts a new pair."""
    from mrkd.runtime.detector import Detector
    live, v2, sha_a, sha_b = deploy
    (tmp_path / "v1").mkdir()
    install(live, tmp_path / "v1" / "model.onnx")                 # kept to roll back to
    candidate = export_tiny_model(tmp_path / "candidate.onnx", threshold=0.5)
    frames = rng_frames(6, seed=6, defective=lambda i: True)      # NG for the live versions, OK for the candidate
    line = Line((Camera("cam", "memory", str(live), trigger="software"),))
    recorder = Recorder()
    detectors = open_detectors(line)
    slots = line_slots(line, detectors, status=lambda text: None)
    shadow = ShadowScorer(Detector(candidate), slots=slots)
    runner = PartRunner(line, {"cam": ArraySource(frames)}, PartSettings(queue=4), detectors=detectors,
                        observers=[recorder], status=lambda text: None, slots=slots, shadows=[shadow])
    runner.start()
    try:
        for n, version in enumerate((None, v2, tmp_path / "v1" / "model.onnx")):
            if version is not None:
                install(version, live)
                assert slots.request_reload("deploy") and slots.wait_idle(30)
            for part in range(2):
                runner.trigger(f"P{2 * n + part}")
            parts_done(recorder, 2 * n + 2)
        shadow.drain()
    finally:
        runner.stop()
    assert [p.model_sha256 for p in recorder.parts] == [sha_a, sha_a, sha_b, sha_b, sha_a, sha_a]
    assert [(c.live_sha256, c.frames, c.live_only, c.pair) for c in shadow.history()] == \
        [(sha_a, 2, 2, 1), (sha_b, 2, 2, 2), (sha_a, 2, 2, 3)]
    assert shadow.comparisons() == [shadow.comparison()] and shadow.comparison().pair == 3
    for detector in detectors.values():
        detector.close()


def test_cli_shadow_in_triggered_mode_reports_the_comparison(deploy, tmp_path):
    from click.testing import CliRunner
    from mrkd.runtime.cli import run_command
    live, _, _, _ = deploy
    candidate = export_tiny_model(tmp_path / "candidate.onnx", threshold=0.5)
    folder = tmp_path / "parts"
    folder.mkdir()
    for i, frame in enumerate(rng_frames(4, seed=4)):
        cv2.imwrite(str(folder / f"{i:02d}.png"), frame)
    result = CliRunner().invoke(run_command, [str(live), "--source", str(folder), "--trigger", "software",
                                              "--trigger-stdin", "--status-every", "0", "--shadow", str(candidate),
                                              "--summary", str(tmp_path / "s.json")],
                                input="a\nb\nc\nd\n", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s.json").read_text())
    shadow = summary["shadow"]
    assert summary["parts"] == shadow["frames"] == 4 and shadow["candidate_sha256"] == file_sha256(candidate)
    assert shadow["live_only"] == shadow["disagreements"] == summary["verdicts"]["NG"] == 2   # odd images
    assert shadow["candidate_only"] == 0 and shadow["score_correlation"] == pytest.approx(1.0)
    assert summary["outputs"]["shadow"]["sent"] == 4 and summary["model_swaps"] == []


# ---------------------------------------------------------------- a live `mrkd run` in triggered mode

def _events(path: Path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


class LiveRun:
    """`mrkd run ... --trigger software --trigger-stdin` in a subprocess; ``part()`` writes a trigger
    line; ``finish()`` closes stdin (the run ends once idle) and returns the summary."""

    def __init__(self, tmp_path, args, env=None):
        self.stderr_path = tmp_path / "stderr.txt"
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-c", CLI, "run", *args, "--trigger", "software",
                                          "--trigger-stdin", "--status-every", "0", "--part-queue", "1000",
                                          "--part-timeout", "30"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                         env=env)
        self.sent = 0

    def part(self, text):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        self.sent += 1

    def stderr(self):
        return self.stderr_path.read_text()

    def tail(self):
        """For a timeout's message: the end of the run's stderr."""
        return "mrkd run's stderr (end):\n" + self.stderr()[-4000:]

    def finish(self):
        out, _ = self.proc.communicate(timeout=60)      # closes stdin: the end of input
        assert self.proc.returncode == 0, self.stderr()
        return json.loads(out[out.index("{"):])

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _defective_folder(tmp_path, n=3):
    folder = tmp_path / "parts"
    folder.mkdir()
    for i, frame in enumerate(rng_frames(n, seed=5, defective=lambda i: True)):
        cv2.imwrite(str(folder / f"{i:02d}.png"), frame)
    return folder


def test_live_triggered_run_is_hot_swapped_by_sighup_between_parts_and_refuses_a_cut_model(deploy, tmp_path):
    live, v2, sha_a, sha_b = deploy
    folder = _defective_folder(tmp_path)          # every part NG: every part is an event naming its model
    events, parts_log = tmp_path / "events.jsonl", tmp_path / "parts.jsonl"
    run = LiveRun(tmp_path, [str(live), "--source", str(folder), "--loop", "--events", str(events),
                             "--parts-log", str(parts_log)])
    stop_feeding, fed = threading.Event(), queue.Queue()

    def feed():                                    # a steady line: a part every 20 ms, swaps or not
        i = 0
        while not stop_feeding.is_set():
            run.part(f"P{i}")
            i += 1
            time.sleep(0.02)
        fed.put(i)
    try:
        run.part("first")
        wait_until(lambda: len(_events(events)) >= 1, 30, "the first part", detail=run.tail)
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        wait_until(lambda: len(_events(events)) >= 5, 30, "parts of the first model", detail=run.tail)
        install(v2, live)
        run.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "swapped" in run.stderr(), 30, "the swap")
        wait_until(lambda: sum(e["model_sha256"] == sha_b for e in _events(events)) >= 5, 30, "parts of the new one",
                   detail=run.tail)
        whole = v2.read_bytes()
        (live.parent / ".cut").write_bytes(whole[: len(whole) // 3])
        os.replace(live.parent / ".cut", live)     # a half-written file in place
        run.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "REFUSED" in run.stderr(), 30, "the refusal")
        after_refusal = len(_events(events))
        wait_until(lambda: len(_events(events)) >= after_refusal + 5, 30, "parts after the refusal", detail=run.tail)
        stop_feeding.set()
        feeder.join(10)
        summary = run.finish()
    finally:
        stop_feeding.set()
        run.kill()
    sent = fed.get_nowait() + 1                    # the feeder's parts and the first one
    swaps = summary["model_swaps"]
    assert [s["outcome"] for s in swaps] == ["swapped", "refused"], swaps
    assert (swaps[0]["old_sha256"], swaps[0]["new_sha256"]) == (sha_a, sha_b)
    assert "cannot be loaded" in swaps[1]["detail"]
    refusal_lines = [line for line in run.stderr().splitlines() if "REFUSED" in line]
    assert len(refusal_lines) == 1 and "cannot be loaded" in refusal_lines[0]
    # no part lost: every trigger became a part, every part an NG event, inspection ids without a gap
    logged = _events(events)
    assert summary["triggers"] == summary["parts"] == sent == len(logged) and summary["missed_triggers"] == 0
    assert summary["verdicts"] == {"OK": 0, "NG": sent, "ERROR": 0}
    assert [e["inspection_id"] for e in logged] == list(range(1, sent + 1))
    assert [e["part_id"] for e in logged] == ["first"] + [f"P{i}" for i in range(sent - 1)]
    # the parts before the swap name the old model, the ones after the new one: one boundary
    boundary = swaps[0]["frames_before"]          # one camera, one image per part: parts judged by A
    assert 5 <= boundary <= sent - 10
    for event in logged:
        expected = (sha_a, 0.1) if event["inspection_id"] <= boundary else (sha_b, 0.2)
        assert (event["model_sha256"], event["threshold"]) == expected, (event, boundary)
    assert summary["parts_by_model"] == {sha_a: boundary, sha_b: sent - boundary}
    # the parts log (--parts-log) tells the same story, line for line: one per judged part, none
    # missing across the swap, each naming the model that judged it, linked to its event
    parts = [json.loads(line) for line in parts_log.read_text().splitlines()]
    assert len(parts) == summary["parts"] == summary["outputs"]["parts_log"]["sent"]
    assert [p["inspection_id"] for p in parts] == list(range(1, sent + 1))
    assert [p["part_id"] for p in parts] == [e["part_id"] for e in logged]
    assert [p["event_id"] for p in parts] == [e["event_id"] for e in logged]
    assert [p["model_sha256"] for p in parts] == [sha_a] * boundary + [sha_b] * (sent - boundary)
    assert [p["threshold"] for p in parts] == [0.1] * boundary + [0.2] * (sent - boundary)


def test_live_triggered_run_reloads_a_recipe_model_and_takes_post_reload_and_review(deploy, recipe_versions,
                                                                                  tmp_path):
    from test_review import _post
    from test_review_page import reload_took

    from mrkd.benchmarks.mosquitto import free_port
    live, v2, sha_a, sha_b = deploy
    recipe, recipe_v2, sha_r, sha_r2 = recipe_versions
    folder = _defective_folder(tmp_path)
    line_file = tmp_path / "line.toml"
    line_file.write_text(f'[[camera]]\nname = "cam"\nsource = "{folder}"\nloop = true\n'
                         f'[recipes]\n2 = "{recipe}"\n')
    port = free_port()
    url, token, events = f"http://127.0.0.1:{port}", "parts-line-control-token", tmp_path / "events.jsonl"
    labels, evidence, parts_log = tmp_path / "labels.jsonl", tmp_path / "evidence", tmp_path / "parts.jsonl"
    run = LiveRun(tmp_path, [str(live), "--line", str(line_file), "--events", str(events), "--evidence",
                             str(evidence), "--http", f"127.0.0.1:{port}", "--control-token-env", "MRKD_TEST_TOKEN",
                             "--review-labels", str(labels), "--parts-log", str(parts_log)],
                  env={**os.environ, "MRKD_TEST_TOKEN": token})

    def judged(n):
        wait_until(lambda: len(_events(events)) >= n, 30, f"{n} parts", detail=run.tail)
    try:
        run.part("a")
        run.part("b@2")                                # the recipe's model
        judged(2)
        install(recipe_v2, recipe)       # a new version of the recipe's model, then SIGHUP
        run.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "swapped" in run.stderr(), 30, "the recipe's swap")
        run.part("c@2")
        run.part("d")
        judged(4)
        install(v2, live)                              # the camera's model, over HTTP this time
        assert _post(url, "/reload", b"", "wrong-token-wrong-token")[0] == 401
        code, answer = _post(url, "/reload", b"", token)
        assert code == 200 and reload_took(answer, live, sha_b), answer
        run.part("e")
        judged(5)
        # the page names the camera's model that judges now, each NG part's row the model that judged it
        from test_review_page import hello
        page = {}

        def page_has_every_part() -> bool:      # the page hears of a part just after the events log
            nonlocal page
            page = hello(url)
            return len(page["alarms"]) >= 5
        wait_until(page_has_every_part, 10, "part e on the page", detail=run.tail)
        assert (page["cameras"][0]["model_sha256"], page["cameras"][0]["threshold"]) == (sha_b, 0.2)
        assert (page["status"][0]["model_sha256"], page["status"][0]["threshold"]) == (sha_b, 0.2)
        assert [(a["part_id"], a["model_sha256"]) for a in page["alarms"]] == [
            ("e", sha_b), ("d", sha_a), ("c", sha_r2), ("b", sha_r), ("a", sha_a)]
        first = _events(events)[0]
        code, answer = _post(url, "/review", json.dumps({"event_id": first["event_id"], "label": "good",
                                                         "note": "dust"}).encode(), token)
        assert code == 200, answer
        summary = run.finish()
    finally:
        run.kill()
    logged = _events(events)
    assert [(e["part_id"], e["recipe"], e["model_sha256"], e["threshold"]) for e in logged] == [
        ("a", 0, sha_a, 0.1), ("b", 2, sha_r, 0.3), ("c", 2, sha_r2, 0.35), ("d", 0, sha_a, 0.1),
        ("e", 0, sha_b, 0.2)]
    parts = [json.loads(line) for line in parts_log.read_text().splitlines()]     # the same, in the parts log
    assert [(p["inspection_id"], p["part_id"], p["recipe"], p["model_sha256"], p["threshold"], p["event_id"])
            for p in parts] == [(i + 1, e["part_id"], e["recipe"], e["model_sha256"], e["threshold"], e["event_id"])
                                for i, e in enumerate(logged)]
    # every reload looks at both model paths (a swap is recorded when it is applied, so not in load order)
    assert sorted((s["reason"], Path(s["model"]).name, s["outcome"]) for s in summary["model_swaps"]) == [
        ("SIGHUP", "model.onnx", "unchanged"), ("SIGHUP", "r2.onnx", "swapped"),
        ("http", "model.onnx", "swapped"), ("http", "r2.onnx", "unchanged")]
    assert summary["parts"] == 5 and sum(summary["parts_by_model"].values()) == 5
    [label] = [json.loads(line) for line in labels.read_text().splitlines()]
    assert label["event_id"] == first["event_id"] and label["label"] == "good" and label["camera"] == "cam"
    image = evidence / "cam" / f"{first['event_id']}.png"
    assert image.is_file() and label["image_sha256"] == file_sha256(image)


@pytest.mark.parametrize("asked, expected", [
    (None, ("right", "")),                     # the one flagged camera
    ("left", ("left", "")),
    ("nope", (None, "the part has no camera 'nope' (it has ['left', 'right'])")),
])
def test_review_of_a_part_names_one_camera(asked, expected):
    from mrkd.runtime.review import part_camera as _part_camera
    event = {"cameras": [{"camera": "left", "anomalous": False}, {"camera": "right", "anomalous": True}]}
    assert _part_camera(event, asked) == expected
    both = {"cameras": [{"camera": "left", "anomalous": True}, {"camera": "right", "anomalous": True}]}
    camera, why = _part_camera(both, None)
    assert camera is None and "give \"camera\"" in why and _part_camera(both, "left") == ("left", "")
