"""A part that waits in the queue is photographed late: a software-triggered or free-running camera takes
its image when the runner asks, so on a moving line the image of a part queued behind others shows what
is under the camera by then. [part] max_delay bounds trigger -> image: past it the part is ERROR "late"
(code 9), in order, and its image is never asked for; without it every part is judged and the first late
one is warned about once (its delay is in every part's acquired_s)."""

from __future__ import annotations

import logging
import time

import pytest
from click.testing import CliRunner

from runtime_fixtures import SlowFrames, build_tiny_model
from test_parts import Recorder, wait_idle

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


def test_parts_past_max_delay_are_late_errors_in_order_and_their_images_are_not_taken(model):
    # P1's image comes >= 1.0 s after its trigger by the sleeps alone; P0's at ~0.5 s
    parts, summary, frames = three_queued_parts(model, PartSettings(queue=4, max_delay=2 * FRAME_S - 0.1))
    assert [p.part_id for p in parts] == ["P0", "P1", "P2"] and [p.sequence for p in parts] == [1, 2, 3]
    first, second, third = parts
    assert first.verdict != "ERROR" and first.acquired_s < 2 * FRAME_S - 0.1, first
    # asked for in time, but its image came ~1.0 s after the trigger
    assert second.verdict == "ERROR" and second.error.startswith("cam: late: its image came "), second.error
    assert second.error_code == ERROR_CODES["late"] == 9
    # waited ~1.0 s in the queue: not photographed at all
    assert third.verdict == "ERROR" and third.error.startswith("cam: late: waited "), third.error
    assert "over part.max_delay 0.9 s" in third.error
    assert frames.taken == 2                     # P0's and P1's; none for P2
    assert summary["verdicts"]["ERROR"] == 2 and summary["parts"] == 3
    assert error_codes()[9] == "late"            # what a PLC reads, and docs/PLC.md lists (test_plc_docs)


def test_without_max_delay_every_part_is_judged_and_the_delay_is_warned_once(model, caplog):
    with caplog.at_level(logging.WARNING, logger="mrkd.runtime.line.parts"):
        parts, summary, frames = three_queued_parts(model, PartSettings(queue=4, timeout=FRAME_S + 0.4))
        time.sleep(0.2)     # the warning goes out on the notifier's thread
    assert [p.verdict != "ERROR" for p in parts] == [True, True, True] and frames.taken == 3
    assert parts[2].acquired_s > 2 * FRAME_S        # the third one's image: after both before it
    late = [r.getMessage() for r in caplog.records if "after its trigger" in r.getMessage()]
    assert len(late) == 1 and late[0].startswith("part P1: its image came ") and "max_delay" in late[0], late


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
