"""The part runner without a camera: a folder (or a slow frame source) in triggered mode, each trigger
judging the next image. Verdicts against the tiny model's numpy reference, the bounded queue, refused
triggers, recipes, events per NG part, metrics, the line file's [part]/[recipes] and the CLI."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from runtime_fixtures import SIZE, SlowFrames, build_tiny_model, defective_frame, normal_frame, reference_map

from mrkd.runtime.line.linefile import LineFileError, parse_line
from mrkd.runtime.line.loop import Camera, Line
from mrkd.runtime.line.parts import ERROR_CODES, PartError, PartRunner, open_part_sources
from mrkd.runtime.line.trigger import PartSettings, trigger_lines
from mrkd.runtime.metadata import file_sha256
from mrkd.runtime.outputs.base import LineObserver, Verdict
from mrkd.runtime.outputs.events import EventLogOutput, read_events
from mrkd.runtime.outputs.snapshots import SnapshotWriter
from mrkd.runtime.sources import ArraySource


class Recorder(LineObserver):
    def __init__(self):
        self.parts, self.receipts, self.stopped = [], [], 0

    def on_part(self, result):
        self.parts.append(result)

    def on_trigger(self, receipt):
        self.receipts.append(receipt)

    def on_stop(self):
        self.stopped += 1


def reference_score(frame):
    square = cv2.resize(frame, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    return float(reference_map(square[None]).max())


@pytest.fixture
def model(tmp_path):
    return str(build_tiny_model(tmp_path / "tiny.onnx"))


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(3)
    frames = [defective_frame(rng) if i in (1, 4) else normal_frame(rng) for i in range(6)]
    path = tmp_path / "parts"
    path.mkdir()
    for i, frame in enumerate(frames):
        cv2.imwrite(str(path / f"{i:03d}.png"), frame)
    return path, frames


def wait_idle(runner, timeout=20.0):
    deadline = time.monotonic() + timeout
    while runner.busy:
        assert time.monotonic() < deadline, "parts not finished"
        time.sleep(0.01)


def test_folder_parts_match_the_reference_and_ng_parts_have_events(model, folder, tmp_path):
    path, frames = folder
    line = Line((Camera("cam", str(path), model, trigger="software"),))
    recorder = Recorder()
    outputs = [SnapshotWriter(tmp_path / "snaps"), EventLogOutput(tmp_path / "events.jsonl"), recorder]
    runner = PartRunner(line, open_part_sources(line, PartSettings()), PartSettings(queue=10),
                        observers=outputs).start()
    for i in range(6):
        assert runner.trigger(f"part-{i}").accepted
    wait_idle(runner)
    extra = runner.trigger("part-6")                   # the folder has ended: an ERROR part, not OK
    wait_idle(runner)
    summary = runner.stop()
    parts = recorder.parts
    assert extra.accepted and parts[-1].verdict == Verdict.ERROR
    assert parts[-1].error_code == ERROR_CODES["source ended"] and "source ended" in parts[-1].error
    sha = file_sha256(model)
    for i, (part, frame) in enumerate(zip(parts, frames)):
        expected = reference_score(frame)
        assert part.inspection_id == i + 1 and part.part_id == f"part-{i}"
        assert part.score == pytest.approx(expected, abs=1e-5)
        assert part.verdict == (Verdict.NG if expected >= 0.1 else Verdict.OK)
        assert part.model_sha256 == sha and part.threshold == 0.1 and part.recipe == 0
        assert 0 <= part.acquired_s <= part.verdict_s and part.trigger_time > 0 and part.schema_version == 1
        assert (part.event_id is not None) == (part.verdict == Verdict.NG)
    assert [p.verdict for p in parts[:6]].count(Verdict.NG) == 2
    events = read_events(tmp_path / "events.jsonl")
    assert [e["part_id"] for e in events] == ["part-1", "part-4", "part-6"]
    ng = events[0]
    assert ng["verdict"] == "NG" and ng["event_id"] == parts[1].event_id and ng["kind"] == "part"
    snapshot = Path(ng["cameras"][0]["snapshot"])
    assert snapshot.is_file() and snapshot.parent.name == "cam" and parts[1].cameras[0].snapshot == str(snapshot)
    assert events[2]["verdict"] == "ERROR" and events[2]["score"] is None
    assert summary["verdicts"] == {"OK": 4, "NG": 2, "ERROR": 1} and recorder.stopped == 1


def test_queue_bound_refuses_and_counts_and_never_mixes_results(model):
    line = Line((Camera("cam", "memory", model, trigger="software"),))
    recorder = Recorder()
    runner = PartRunner(line, {"cam": ArraySource(SlowFrames(0.1))}, PartSettings(queue=2),
                        observers=[recorder]).start()
    assert runner.ready and not runner.busy
    receipts = [runner.trigger(f"Q{i}") for i in range(6)]
    assert runner.busy and not runner.ready
    wait_idle(runner)
    runner.set_online(False)
    offline = runner.trigger("late")
    assert not runner.ready
    runner.set_online(True)
    unknown = runner.trigger("R", recipe=7)
    wait_idle(runner)
    summary = runner.stop()
    assert [r.accepted for r in receipts] == [True, True, True, False, False, False]
    assert {r.reason for r in receipts[3:]} == {"queue full"}
    assert [r.sequence for r in receipts] == [1, 2, 3, 4, 5, 6]
    assert (offline.accepted, offline.reason) == (False, "offline")
    assert (unknown.accepted, unknown.reason) == (False, "unknown recipe 7")
    assert [p.part_id for p in recorder.parts] == ["Q0", "Q1", "Q2"]
    assert [r.part_id for r in recorder.receipts] == [f"Q{i}" for i in range(6)] + ["late", "R"]
    assert summary["missed_triggers"] == 5 and summary["missed_by_reason"] == {
        "queue full": 3, "offline": 1, "unknown recipe 7": 1}


def test_timeout_and_stop_report_every_accepted_part(model):
    line = Line((Camera("cam", "memory", model, trigger="software"),))
    recorder = Recorder()
    runner = PartRunner(line, {"cam": ArraySource(SlowFrames(1.0))}, PartSettings(queue=3, timeout=0.2),
                        observers=[recorder]).start()
    for i in range(3):
        runner.trigger(f"T{i}")
    summary = runner.stop(drain_s=0.5)       # T0 in hand (its image comes too late), T1 and T2 waiting
    parts = recorder.parts
    assert [(p.part_id, p.inspection_id) for p in parts] == [("T0", 1), ("T1", 2), ("T2", 3)]   # none dropped
    assert parts[0].verdict == Verdict.ERROR and parts[0].error_code == ERROR_CODES["timeout"]
    assert all(p.verdict == Verdict.ERROR and p.error_code == ERROR_CODES["line stopped"] for p in parts[1:])
    assert all(math.isnan(p.score) for p in parts)
    assert summary["verdicts"] == {"OK": 0, "NG": 0, "ERROR": 3}


def test_recipe_judges_with_its_model(model, folder, tmp_path):
    path, frames = folder
    strict = str(build_tiny_model(tmp_path / "strict.onnx", threshold=1e-6))
    text = f"""
[[camera]]
name = "cam"
source = "{path}"
trigger = "software"
[part]
queue = 8
timeout = 1.5
[recipes]
3 = "{strict}"
"""
    line = parse_line(text, str(tmp_path / "line.toml"), defaults={"model": model})
    assert line.part == PartSettings(queue=8, timeout=1.5, recipes=((3, strict),))
    recorder = Recorder()
    runner = PartRunner(line, open_part_sources(line, line.part), observers=[recorder]).start()
    assert list(runner.recipes) == [0, 3]
    runner.trigger("a", recipe=3)     # frame 0: normal, score 0 >= 1e-6? no: OK even when strict
    runner.trigger("b", recipe=3)     # frame 1: defective
    runner.select_recipe(3)
    runner.trigger("c")               # the active recipe: 3
    wait_idle(runner)
    runner.stop()
    a, b, c = recorder.parts
    assert (a.recipe, b.recipe, c.recipe) == (3, 3, 3)
    assert a.threshold == b.threshold == 1e-6 and a.model_sha256 == file_sha256(strict)
    assert b.verdict == Verdict.NG
    with pytest.raises(ValueError, match="recipe 9"):
        runner.select_recipe(9)


@pytest.mark.parametrize("body, message", [
    ('[part]\ncameras = ["nope"]', r"part.cameras: 'nope' is not a camera"),
    ('[part]\nqueue = -1', r"part.queue: expected 0..1000"),
    ('[part]\nearly = "soon"', r"part.early: expected seconds"),
    ('[part]\nearly = 11', r"part.early: expected seconds in \[0, 10\]"),
    ('[part]\nspeed = 3', r"part.speed: unknown field"),
    ('[recipes]\nx = "a.onnx"', r"recipes.x: expected a recipe number"),
    ('[recipes]\n2 = "missing.onnx"', r"recipes.2: model file not found"),
    # camera fields: the text lands inside the [[camera]] table
    ('trigger = "sometimes"', r"camera\[0\] \('cam'\).trigger: expected \"free\", \"software\" or \"hardware\""),
    ('features = 5', r"\.features: expected a table of GenICam features"),
    ('features = {Gain = [1, 2]}', r"\.features\.Gain: expected a number, text or true/false"),
])
def test_line_file_part_camera_and_recipe_errors_name_the_field(model, tmp_path, body, message):
    text = f'[[camera]]\nname = "cam"\nsource = "x.png"\n{body}\n'
    with pytest.raises(LineFileError, match=message):
        parse_line(text, str(tmp_path / "line.toml"), defaults={"model": model})


def test_hardware_early_window_from_the_line_file_and_the_command_line(model, tmp_path):
    from mrkd.runtime.cli import part_settings
    text = '[[camera]]\nname = "cam"\nsource = "x.png"\n[part]\nearly = 0.1\ntimeout = 1.5\n'
    line = parse_line(text, str(tmp_path / "line.toml"), defaults={"model": model})
    assert (line.part.early, line.part.timeout) == (0.1, 1.5)
    options = {"part_queue": None, "part_images": None, "part_timeout": None, "part_early": 0.05,
               "part_max_delay": None}
    assert part_settings(line, options).early == 0.05                 # the command line over the file
    assert PartSettings().early == 0.25


def test_a_line_file_part_table_without_a_part_trigger_is_refused(model, folder, tmp_path):
    """[part] in a line file whose cameras run free was ignored: the line scored frames with no word."""
    from mrkd.runtime.cli import run_command
    line_file = tmp_path / "line.toml"
    line_file.write_text(f'[[camera]]\nname = "cam"\nsource = "{folder[0]}"\nmodel = "{model}"\n[part]\ntimeout = 1.5\n')
    result = CliRunner().invoke(run_command, ["--line", str(line_file)])
    assert result.exit_code != 0 and "[part]/[recipes] in the line file judge parts: they need --trigger" in \
        result.output and "Traceback" not in result.output, result.output
    # with the trigger on the command line the same file runs its parts
    result = CliRunner().invoke(run_command, ["--line", str(line_file), "--trigger", "software", "--trigger-stdin"],
                                input="P1\n")
    assert result.exit_code == 0, result.output


def test_line_file_features_table(model, tmp_path):
    text = ('[[camera]]\nname = "cam"\nsource = "gige://10.0.0.9"\ntrigger = "hardware"\n'
            '[camera.features]\nExposureTime = 5000\nReverseX = true\nPixelFormat = "BayerRG8"\n')
    camera = parse_line(text, str(tmp_path / "line.toml"), defaults={"model": model}).cameras[0]
    assert camera.trigger == "hardware"
    assert camera.features == (("ExposureTime", "5000"), ("ReverseX", "true"), ("PixelFormat", "BayerRG8"))


def test_features_on_a_folder_are_refused(model, folder):
    from mrkd.runtime.sources import SourceError, open_source
    with pytest.raises(SourceError, match="features .* apply to gige:// cameras only"):
        open_source(str(folder[0]), features=[("ExposureTime", "5")])


def test_no_threshold_is_refused(tmp_path, folder):
    uncalibrated = str(build_tiny_model(tmp_path / "raw.onnx", threshold=None))
    line = Line((Camera("cam", str(folder[0]), uncalibrated, trigger="software"),))
    with pytest.raises(PartError, match="no calibrated threshold"):
        PartRunner(line, open_part_sources(line, PartSettings()))


def test_metrics_count_parts_and_missed_triggers(model):
    prometheus = pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families
    from mrkd.runtime.outputs.metrics import MetricsObserver
    metrics = MetricsObserver()
    line = Line((Camera("cam", "memory", model, trigger="software"),))
    rng = np.random.default_rng(1)
    frames = [normal_frame(rng), defective_frame(rng)]
    runner = PartRunner(line, {"cam": ArraySource(frames)}, PartSettings(queue=0, timeout=0.5),
                        observers=[metrics]).start()
    first = runner.trigger("1")
    refused = runner.trigger("2")         # queue 0: nothing may wait behind the part in hand
    wait_idle(runner)
    runner.trigger("3")
    wait_idle(runner)
    runner.trigger("4")                   # no frame left: ERROR
    wait_idle(runner)
    runner.stop()
    assert first.accepted and not refused.accepted
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics.exposition()[0].decode())
               for s in family.samples}
    assert samples[("mrkd_parts_total", (("result", "OK"),))] == 1
    assert samples[("mrkd_parts_total", (("result", "NG"),))] == 1
    assert samples[("mrkd_parts_total", (("result", "ERROR"),))] == 1
    assert samples[("mrkd_missed_triggers_total", ())] == 1
    assert samples[("mrkd_trigger_to_verdict_seconds_count", ())] == 3
    assert prometheus


def test_cli_triggers_from_stdin(model, folder, tmp_path):
    from mrkd.runtime.cli import run_command
    result = CliRunner().invoke(run_command, [model, "--source", str(folder[0]), "--trigger", "software",
                                              "--trigger-stdin", "--status-every", "0",
                                              "--summary", str(tmp_path / "s.json")],
                                input="A\nB\n\nD\n", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["parts"] == 4 and summary["triggers"] == 4 and summary["verdicts"]["NG"] == 1


def test_a_folder_that_runs_out_says_why_every_later_part_is_error(model, folder, tmp_path, caplog):
    """A triggered folder read once (no --loop) runs out of images and every later part is ERROR 'source
    ended'. The old code told it as "camera cam: DOWN", the words of a camera fault, with nothing on why
    every part from then on was an error; it names the folder's end and --loop now, once."""
    from mrkd.runtime.cli import run_command
    with caplog.at_level("WARNING", logger="mrkd.runtime.line.parts"):
        result = CliRunner().invoke(run_command, [model, "--source", str(folder[0]), "--trigger", "software",
                                                  "--trigger-stdin", "--status-every", "0", "--part-queue", "16",
                                                  "--summary", str(tmp_path / "s.json")],
                                    input="".join(f"P{i}\n" for i in range(9)), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["parts"] == 9 and summary["verdicts"]["ERROR"] == 3, summary["verdicts"]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("camera ")]
    assert said == ["camera cam0: DOWN: its images ran out (a folder or video file, read once without --loop): "
                    "every later part is ERROR 'source ended'"], said


def test_part_ids_with_control_characters_are_refused_and_reported_escaped(model, folder, tmp_path, caplog):
    """A part id travels into every log line of its part: an escape sequence from stdin rewrote the
    operator's terminal, a NUL or NEL (U+0085) went into the parts log as it came. Such a trigger is
    refused (counted, reason named) and reported with the characters escaped; the other lines are parts."""
    from mrkd.runtime.cli import run_command
    log = tmp_path / "parts.jsonl"
    result = CliRunner().invoke(run_command, [model, "--source", str(folder[0]), "--trigger", "software",
                                              "--trigger-stdin", "--status-every", "0", "--parts-log", str(log),
                                              "--summary", str(tmp_path / "s.json")],
                                input="A\nB\x1b[2J\nC\x00D\nE\x85F\nG\n", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["parts"] == 2 and summary["triggers"] == 5, summary
    assert summary["missed_by_reason"] == {"control characters in the part id": 3}, summary
    lines = [json.loads(text) for text in log.read_text().splitlines()]
    assert [(r["kind"], r["part_id"]) for r in lines if r["kind"] == "missed"] == [
        ("missed", "B\\x1b[2J"), ("missed", "C\\x00D"), ("missed", "E\\x85F")]
    assert sorted(r["part_id"] for r in lines if r["kind"] != "missed") == ["A", "G"]
    said = result.output + caplog.text
    assert not {"\x1b", "\x00", "\x85"} & set(said), said
    assert "trigger 2 (part B\\x1b[2J) refused: control characters in the part id" in caplog.text, caplog.text


def test_fps_with_a_trigger_is_refused_not_dropped(model, folder, tmp_path):
    """--fps (or fps in a line file) on a triggered camera was dropped without a word when the part runner
    opened it (README: "with --trigger it is refused"); a free-running camera keeps it."""
    from mrkd.runtime.cli import run_command
    from mrkd.runtime.line.loop import LineError
    result = CliRunner().invoke(run_command, [model, "--source", str(folder[0]), "--fps", "10", "--trigger",
                                              "software", "--trigger-stdin"], input="A\n")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "Error: camera 'cam0': fps 10 sets a free-running camera's rate; with trigger software it makes one " \
           "image per trigger" in result.output and "parts" not in result.output, result.output
    line_file = tmp_path / "line.toml"
    line_file.write_text(f'[[camera]]\nname = "top"\nsource = "{folder[0]}"\nmodel = "{model}"\n'
                         f'trigger = "hardware"\nfps = 5\n')
    result = CliRunner().invoke(run_command, ["--line", str(line_file), "--trigger-stdin"], input="A\n")
    assert result.exit_code == 1 and f"{line_file}: camera 'top': fps 5 sets a free-running" in result.output, \
        result.output
    with pytest.raises(LineError, match="with trigger software it makes one image per trigger"):
        Line((Camera("cam", str(folder[0]), model, trigger="software", fps=2.0),))
    assert Line((Camera("cam", str(folder[0]), model, fps=2.0),)).cameras[0].fps == 2.0


@pytest.mark.parametrize("source", ["stdin", "every", "both"])
def test_cli_max_parts_judges_that_many_parts(model, folder, tmp_path, source):
    """--max-parts N judges N parts: stdin lines after the Nth accepted one are not read (all five were
    judged), and --trigger-every counts accepted triggers (refused ones, queue full, made it end short)."""
    from mrkd.runtime.cli import run_command
    # both drivers at once share the one budget: each counted its own, and 2 + 2 parts were judged
    trigger = {"stdin": ["--trigger-stdin"], "every": ["--trigger-every", "0.001", "--part-queue", "0"],
               "both": ["--trigger-stdin", "--trigger-every", "0.05"]}[source]
    result = CliRunner().invoke(run_command, [model, "--source", str(folder[0]), "--trigger", "software",
                                              *trigger, "--max-parts", "2", "--status-every", "0",
                                              "--summary", str(tmp_path / "s.json")],
                                input="A\nB\nC\nD\nE\n", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["parts"] == 2, summary


def test_cli_keeps_a_sample_of_ok_parts_as_evidence(model, folder, tmp_path):
    """--evidence-ok-every in triggered mode: one of every N OK parts per camera is kept, lossless, as
    ok/part<inspection id>.png (it was free run only); NG parts keep theirs as always."""
    import cv2
    import numpy as np
    from mrkd.runtime.cli import run_command
    evidence, events = tmp_path / "ev", tmp_path / "ev.jsonl"
    images = sorted(p for p in folder[0].iterdir())
    result = CliRunner().invoke(run_command, [model, "--source", f"cam={folder[0]}", "--trigger", "software",
                                              "--trigger-stdin", "--status-every", "0", "--evidence", str(evidence),
                                              "--evidence-ok-every", "1", "--events", str(events), "--part-queue", "64",
                                              "--summary", str(tmp_path / "s.json")],
                                input="".join(f"P{i}\n" for i in range(len(images))), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s.json").read_text())
    ng = [json.loads(line) for line in events.read_text().splitlines()]
    kept = sorted((evidence / "cam" / "ok").iterdir())
    assert len(kept) == summary["verdicts"]["OK"] >= 1 and len(ng) == summary["verdicts"]["NG"] >= 1
    ng_ids = {int(e["part_id"][1:]) for e in ng}
    ok_parts = [i for i in range(len(images)) if i not in ng_ids]
    assert [p.name for p in kept] == [f"part{i + 1:010d}.png" for i in ok_parts]   # inspection ids from 1
    for i, path in zip(ok_parts, kept):       # the image the part was judged on, lossless
        assert np.array_equal(cv2.imread(str(path)), cv2.imread(str(images[i])))


@pytest.mark.parametrize("args, message", [
    (["--trigger", "software"], "give a trigger source"),
    (["--trigger-every", "1"], "need --trigger software or hardware"),
    # every part-only option without a part trigger is refused by name, 0 included (was ignored silently)
    (["--part-queue", "0"], "--part-queue judge parts: they need --trigger software or hardware"),
    (["--part-timeout", "1", "--part-images", "2"], "--part-images, --part-timeout judge parts"),
    (["--part-early", "0.5"], "--part-early judge parts"),
    # a triggered run offers them no frames: the file was never created, exit 0
    (["--trigger", "software", "--trigger-every", "1", "--save-video", "parts.avi"], "--save-video and --show show a "
     "free run's frames"),
    (["--feature", "Gain"], "--feature 'Gain': expected NAME=VALUE"),
    (["--trigger", "hardware", "--part-early", "nan"], "'nan' is not a finite number"),
    (["--trigger", "hardware", "--part-early", "11"], "--part-early"),
])
def test_cli_part_option_errors(model, folder, args, message):
    from mrkd.runtime.cli import run_command
    result = CliRunner().invoke(run_command, [model, "--source", str(folder[0]), *args])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_trigger_lines_ends_like_the_end_of_input_when_the_input_fails(model, folder):
    """--trigger-stdin typed in an ssh session that drops: reading the terminal fails (EIO). The trigger
    thread died with a traceback and never stopped the run, which then waited for ever; now the parts
    read so far are judged and the run ends as at the end of input."""
    def dropped_terminal():
        yield "T-1\n"
        raise OSError(5, "Input/output error")
    line = Line((Camera("cam", str(folder[0]), model, trigger="software"),))
    recorder = Recorder()
    runner = PartRunner(line, open_part_sources(line, PartSettings()), PartSettings(queue=10),
                        observers=[recorder]).start()
    stop = threading.Event()
    driver = trigger_lines(runner, dropped_terminal(), stop)
    driver.join(10)
    assert stop.is_set() and not driver.is_alive()
    runner.stop()
    assert [r.part_id for r in recorder.receipts] == ["T-1"] and runner.inspections == 1


def test_trigger_lines_driver_parses_ids_and_recipes(model, folder):
    line = Line((Camera("cam", str(folder[0]), model, trigger="software"),))
    recorder = Recorder()
    runner = PartRunner(line, open_part_sources(line, PartSettings()), PartSettings(queue=10),
                        observers=[recorder]).start()
    stop = threading.Event()
    # int() reads the Arabic-Indic "\u0660" as 0 and "0_0" as 0: neither is a recipe number a line file or OPC UA takes
    trigger_lines(runner, ["X-1\n", "X-2@0\n", "X-3@5\n", "X-4@one\n", "X-5@1.0\n", "X-6@\u0660\n", "X-7@0_0\n",
                           "X-8@ 0 \n"], stop).join(10)
    assert stop.is_set()
    runner.stop()
    assert [(r.part_id, r.accepted, r.reason) for r in recorder.receipts] == [
        ("X-1", True, None), ("X-2", True, None), ("X-3", False, "unknown recipe 5"),
        ("X-4", False, "unknown recipe one"), ("X-5", False, "unknown recipe 1.0"),
        ("X-6", False, "unknown recipe \u0660"), ("X-7", False, "unknown recipe 0_0"), ("X-8", True, None)]
