"""A part that waits in the queue is photographed late: a software-triggered or free-running camera takes
its image when the runner asks, so on a moving line the image of a part queued behind others shows what
is under the camera by then. [part] max_delay bounds trigger -> image: past it the part is ERROR "late"
(code 9), in order, and a camera's image is never asked for (test_gige: a stalled camera); a folder's or
an array's next image is still read and dropped, so the parts after keep their own. Without the bound
every part is judged, and warned about once each: the first part asked for its image after a later part's
trigger had come (triggers faster than the model), and the first whose image came later than the part
timeout (its delay is every part's acquired_s)."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import numpy as np

from runtime_fixtures import SlowFrames, build_tiny_model, defective_frame, normal_frame
from test_parts import Recorder, reference_score, wait_idle

from mrkd.runtime.detector import Detector
from mrkd.runtime.line.loop import Camera, Line
from mrkd.runtime.line.parts import ERROR_CODES, PartRunner
from mrkd.runtime.line.trigger import PartSettings
from mrkd.runtime.plc.handshake import error_codes
from mrkd.runtime.sources import ArraySource

FRAME_S = 0.5       # each image takes this long: the second part's image comes ~1.0 s after its trigger


class CountedFrames(SlowFrames):
    """SlowFrames that counts the images the runner asked for."""

    def __init__(self, delay):
        super().__init__(delay)
        self.taken = 0

    def __iter__(self):
        for frame in super().__iter__():
            self.taken += 1
            yield frame


@pytest.fixture
def model(tmp_path):
    return str(build_tiny_model(tmp_path / "tiny.onnx"))


def three_queued_parts(model, settings):
    frames = CountedFrames(FRAME_S)
    line = Line((Camera("cam", "memory", model, trigger="software"),))
    recorder = Recorder()
    runner = PartRunner(line, {"cam": ArraySource(iter(frames))}, settings, observers=[recorder]).start()
    receipts = [runner.trigger(f"P{i}") for i in range(3)]      # at once: two wait behind the first
    wait_idle(runner)
    summary = runner.stop()
    assert all(r.accepted for r in receipts)
    return recorder.parts, summary, frames


def test_parts_past_max_delay_are_late_errors_in_order(model):
    # P1's image comes >= 1.0 s after its trigger by the sleeps alone; P0's at ~0.5 s
    parts, summary, frames = three_queued_parts(model, PartSettings(queue=4, max_delay=2 * FRAME_S - 0.1))
    assert [p.part_id for p in parts] == ["P0", "P1", "P2"] and [p.sequence for p in parts] == [1, 2, 3]
    first, second, third = parts
    assert first.verdict != "ERROR" and first.acquired_s < 2 * FRAME_S - 0.1, first
    # asked for in time, but its image came ~1.0 s after the trigger
    assert second.verdict == "ERROR" and second.error.startswith("cam: late: its image came "), second.error
    assert second.error_code == ERROR_CODES["late"] == 9
    # waited ~1.0 s in the queue
    assert third.verdict == "ERROR" and third.error.startswith("cam: late: waited "), third.error
    assert "over part.max_delay 0.9 s" in third.error
    assert frames.taken == 3       # an array is a sequence: P2's image is read and dropped (the next part's own)
    assert summary["verdicts"]["ERROR"] == 2 and summary["parts"] == 3
    assert error_codes()[9] == "late"            # what a PLC reads, and docs/PLC.md lists (test_plc_docs)


def test_without_max_delay_every_part_is_judged_and_the_delay_is_warned_once(model, caplog):
    with caplog.at_level(logging.WARNING, logger="mrkd.runtime.line.parts"):
        parts, summary, frames = three_queued_parts(model, PartSettings(queue=4, timeout=FRAME_S + 0.4))
        time.sleep(0.2)     # the warning goes out on the notifier's thread
    assert [p.verdict != "ERROR" for p in parts] == [True, True, True] and frames.taken == 3
    assert parts[2].acquired_s > 2 * FRAME_S        # the third one's image: after both before it
    late = [r.getMessage() for r in caplog.records if "after its trigger" in r.getMessage()]
    assert len(late) == 1 and late[0].startswith("part P1: its image from camera cam came ") and "max_delay" in late[0], late
    # P1 at the latest was asked for its image with P2 waiting: the other warning, once too
    overtaken = [r.getMessage() for r in caplog.records if "was asked for its image after" in r.getMessage()]
    assert len(overtaken) == 1 and overtaken[0].startswith(("part P0: camera cam ", "part P1: camera cam ")), overtaken


class SlowDetector(Detector):
    """The real detector, slower than the parts come: each call takes ``delay`` s more."""

    def __init__(self, model, delay):
        super().__init__(model)
        self.delay = delay

    def __call__(self, frames):
        time.sleep(self.delay)
        return super().__call__(frames)


MODEL_S = 0.6       # the slow detector's time per part
TRIGGER_S = 0.1     # between triggers: P2's comes ~0.4 s before P1 is asked for its image


def slow_model_run(model, caplog, spaced):
    """Four parts of a software-triggered camera judged by a model slower than the triggers (TRIGGER_S apart),
    or each triggered once the one before is judged (``spaced``); the warnings of mrkd's parts module."""
    line = Line((Camera("cam", "memory", model, trigger="software"),))
    detector = SlowDetector(model, MODEL_S)
    rng = np.random.default_rng(7)
    recorder = Recorder()
    with caplog.at_level(logging.WARNING, logger="mrkd.runtime.line.parts"):
        runner = PartRunner(line, {"cam": ArraySource(iter([normal_frame(rng) for _ in range(4)]))},
                            PartSettings(queue=4), detectors={str(Path(model).resolve()): detector},
                            observers=[recorder]).start()
        try:
            for i in range(4):
                assert runner.trigger(f"P{i}").accepted
                if spaced:
                    wait_idle(runner)
                else:
                    time.sleep(TRIGGER_S)
            wait_idle(runner)
        finally:
            runner.stop()
            detector.close()
    assert [p.verdict != "ERROR" for p in recorder.parts] == [True] * 4
    # every image came well within the part timeout: the timeout rule alone says nothing
    assert max(p.acquired_s for p in recorder.parts) < PartSettings().timeout
    return recorder.parts, [r.getMessage() for r in caplog.records if "max_delay" in r.getMessage()]


def test_without_max_delay_an_image_asked_for_after_the_next_trigger_is_warned_once(model, caplog):
    """Triggers faster than the model: a part's image is asked for once the part before is judged, when
    the next part's trigger has come already, so on a moving line it may show that next part (a result
    one part late), however short its delay. Said once, naming the parts and the camera."""
    parts, warnings = slow_model_run(model, caplog, spaced=False)
    assert [p.part_id for p in parts] == ["P0", "P1", "P2", "P3"]
    assert len(warnings) == 1, warnings
    # P1 is asked for its image ~MODEL_S after P0's trigger, when P2's (2 * TRIGGER_S) has come; the part
    # named after it is the one right behind it (the first waiting)
    found = re.match(r"part P(\d): camera cam was asked for its image after part P(\d)'s trigger had come ", warnings[0])
    assert found and int(found[2]) == int(found[1]) + 1, warnings
    assert "[part] max_delay (--part-max-delay)" in warnings[0] and "\n" not in warnings[0]


def test_without_max_delay_parts_spaced_out_are_not_warned(model, caplog):
    parts, warnings = slow_model_run(model, caplog, spaced=True)
    assert [p.part_id for p in parts] == ["P0", "P1", "P2", "P3"] and warnings == []


@pytest.mark.parametrize("args, message", [
    (["--part-max-delay", "0"], "--part-max-delay"),
    (["--part-max-delay", "nan"], "--part-max-delay"),
])
def test_cli_max_delay_errors(model, tmp_path, args, message):
    from mrkd.runtime.cli import run_command
    (tmp_path / "parts").mkdir()
    result = CliRunner().invoke(run_command, [model, "--source", str(tmp_path / "parts"), "--trigger", "software",
                                              "--trigger-stdin", *args], input="A\n")
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output


def test_line_file_max_delay(model, tmp_path):
    from mrkd.runtime.line.linefile import LineFileError, parse_line
    body = f'[[camera]]\nname = "cam"\nsource = "{tmp_path}"\nmodel = "{model}"\ntrigger = "software"\n'
    assert parse_line(body + "[part]\nmax_delay = 0.3\n", str(tmp_path / "line.toml")).part.max_delay == 0.3
    for value, message in (('"fast"', r"part\.max_delay: expected seconds, got 'fast'"),
                           ("-1", r"part\.max_delay: expected seconds in \(0, 600\], got -1")):
        with pytest.raises(LineFileError, match=message):
            parse_line(body + f"[part]\nmax_delay = {value}\n", str(tmp_path / "line.toml"))


def test_a_late_part_on_a_folder_leaves_the_next_parts_their_own_images(model):
    """A folder, a video file or an array is a sequence: the next image is the next part's, whenever it is
    read. A late part must still take its image (and drop it), or every part after it is judged on the
    image of the part before it (a silent shift of the whole run)."""
    rng = np.random.default_rng(5)
    frames = [normal_frame(rng), normal_frame(rng), defective_frame(rng), normal_frame(rng), defective_frame(rng)]

    def slow_then_fast():        # P0's and P1's images take FRAME_S each: P2 waits >= 2 * FRAME_S
        for i, frame in enumerate(frames):
            if i < 2:
                time.sleep(FRAME_S)
            yield frame

    line = Line((Camera("cam", "memory", model, trigger="software"),))
    recorder = Recorder()
    settings = PartSettings(queue=4, max_delay=2 * FRAME_S - 0.1)
    runner = PartRunner(line, {"cam": ArraySource(slow_then_fast())}, settings, observers=[recorder]).start()
    for i in range(3):           # at once: P1's image comes late, P2 waits too long
        assert runner.trigger(f"P{i}").accepted
    wait_idle(runner)
    for i in range(3, 5):        # one at a time: neither waits
        assert runner.trigger(f"P{i}").accepted
        wait_idle(runner)
    runner.stop()
    parts = recorder.parts
    assert [p.part_id for p in parts] == [f"P{i}" for i in range(5)]
    assert [p.verdict == "ERROR" for p in parts] == [False, True, True, False, False], [p.error for p in parts]
    assert parts[2].error.startswith("cam: late: waited "), parts[2].error
    for i in (0, 3, 4):          # each judged on its own image, never the one before it
        assert parts[i].score == pytest.approx(reference_score(frames[i]), abs=1e-5), (i, parts[i].score)
