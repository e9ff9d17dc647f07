"""A power cut on ext4 (delayed allocation) can leave an append-only file's size on disk and its last
block(s) never written: the file ENDS IN NUL BYTES (whole lines, maybe the start of one, then zeros with
no newline), or is all zeros when the cut came soon after its first write. The events log, the parts log
and the label file cut such a tail at the next start, saying it was zeros and how many bytes: refused, a
supervised `mrkd run` refused to start after every power cut. What remains is judged by the torn-line
rules as before, so another tool's file with zeros at its end is still refused and left unchanged."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from runtime_fixtures import build_tiny_model, normal_frame, write_frames
from test_events_torn_first_write import RECORDS, marked, written_line
from test_parts_log import cell, run_parts  # noqa: F401 (cell: a fixture)

from mrkd.runtime.outputs.events import EventLog, EventLogError, power_cut_zeros, read_events
from mrkd.runtime.outputs.parts_log import PartsLog, PartsLogError
from mrkd.runtime.review import LabelFile, ReviewError, ReviewLabel, read_labels

MRKD = [sys.executable, "-c", "from mrkd.cli import main; main()"]
ZEROS_SAID = "zero bytes: a power cut before the data reached the disk"


def label(event_id: str) -> ReviewLabel:
    return ReviewLabel(event_id=event_id, image_sha256="ab" * 32, label="good", who="ann",
                       when="2026-12-07T06:00:00+00:00", camera="cam0")


def two_whole_lines(log_class, record, path) -> bytes:
    one = written_line(log_class, record(), path)
    return one + one


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("zeros", [4096 - 37, 70000])       # within the last 64 KiB read, and beyond it
@pytest.mark.parametrize("kind", sorted(RECORDS))
def test_a_zero_filled_tail_after_whole_lines_is_cut_whole_and_the_log_goes_on(tmp_path, caplog, kind, zeros):
    log_class, record = RECORDS[kind]
    path = tmp_path / "log.jsonl"
    whole = two_whole_lines(log_class, record, path)
    torn = whole[:37]                 # the start of the line being written when the power went
    path.write_bytes(whole + torn + b"\0" * zeros)
    caplog.set_level(logging.WARNING)
    log = log_class(path)
    assert path.read_bytes() == whole
    said = warnings_of(caplog)
    assert len(said) == 1 and "cutting a torn last line left by an earlier crash (37 bytes: " in said[0], said
    assert f"then {zeros} {ZEROS_SAID}" in said[0], said
    log.write(record())
    log.close()
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3 and all(log_class.is_record(line) for line in lines)


@pytest.mark.parametrize("log_class", [EventLog, PartsLog])
def test_zeros_right_after_a_newline_are_cut_and_a_record_whose_newline_was_lost_is_kept(tmp_path, caplog,
                                                                                          log_class):
    """A whole record followed by zeros is one whose newline (and what came after) the power cut lost: it
    was cut with the zeros, an alarm or part gone from the log; it is kept and its newline put back."""
    caplog.set_level(logging.WARNING)
    record = RECORDS["events: an NG part" if log_class is EventLog else "parts: a part"][1]
    path = tmp_path / "log.jsonl"
    whole = two_whole_lines(log_class, record, path)
    path.write_bytes(whole + b"\0" * 512)
    log_class(path).close()
    assert path.read_bytes() == whole
    assert ZEROS_SAID in warnings_of(caplog)[0]
    third = whole[:len(whole) // 2 - 1]                                  # a whole line, its newline a zero
    path.write_bytes(whole + third + b"\0" * 300)
    caplog.clear()
    log_class(path).close()
    assert path.read_bytes() == whole + third + b"\n"
    said = warnings_of(caplog)
    assert len(said) == 1 and "the record is kept, the 300 zero bytes cut" in said[0], said


@pytest.mark.parametrize("log_class", [EventLog, PartsLog])
def test_a_file_of_only_zeros_holds_no_data_and_is_cut_to_empty(tmp_path, caplog, log_class):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"\0" * 100000)
    caplog.set_level(logging.WARNING)
    log_class(path).close()
    assert path.read_bytes() == b""
    said = warnings_of(caplog)
    assert len(said) == 1 and f"100000 {ZEROS_SAID}" in said[0] and "cut to empty" in said[0], said


FOREIGN_WITH_ZEROS = {
    "csv": b"part;score\nP1;0.3\nP2;0.4",
    "csv ending in a newline": b"part;score\nP1;0.3\n",
    "json of another tool": b'{"model": "grain"}\n{"model": "oat", "thr',
    "a binary with a NUL inside": b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
}


@pytest.mark.parametrize("log_class, error", [(EventLog, EventLogError), (PartsLog, PartsLogError)])
@pytest.mark.parametrize("kind", sorted(FOREIGN_WITH_ZEROS))
def test_another_tools_file_with_zeros_at_its_end_is_still_refused_unchanged(tmp_path, log_class, error, kind):
    path = tmp_path / "data.txt"
    data = FOREIGN_WITH_ZEROS[kind] + b"\0" * 300
    path.write_bytes(data)
    with pytest.raises(error, match="is not an mrkd|does not end in a newline"):
        log_class(path)
    assert path.read_bytes() == data


def test_the_label_file_cuts_a_zero_filled_tail_and_its_readers_skip_it(tmp_path, caplog):
    path = tmp_path / "labels.jsonl"
    with LabelFile(path) as labels:
        labels.extend([label("e1"), label("e2")])
    whole = path.read_bytes()
    for tail, zeros in ((whole[:30] + b"\0" * 70000, 70000), (b"\0" * 4096, 4096)):
        path.write_bytes(whole + tail)
        assert [one.event_id for one in read_labels(path)] == ["e1", "e2"]       # a reader skips it
        caplog.clear()
        caplog.set_level(logging.WARNING)
        with LabelFile(path) as labels:
            assert path.read_bytes() == whole
            said = warnings_of(caplog)
            assert len(said) == 1 and f"{zeros} {ZEROS_SAID}" in said[0], said
    with LabelFile(path) as labels:
        labels.append(label("e3"))
    assert [one.event_id for one in read_labels(path)] == ["e1", "e2", "e3"]
    whole = path.read_bytes()
    path.write_bytes(whole[:-1] + b"\0" * 200)               # the last label whole, its newline a zero
    assert [one.event_id for one in read_labels(path)] == ["e1", "e2", "e3"]      # read, not skipped
    with LabelFile(path):
        assert path.read_bytes() == whole                    # kept: an operator's label is not lost


def test_a_label_file_of_only_zeros_is_cut_to_empty_and_a_foreign_one_still_refused(tmp_path, caplog):
    path = tmp_path / "labels.jsonl"
    path.write_bytes(b"\0" * 8192)
    caplog.set_level(logging.WARNING)
    with LabelFile(path) as labels:
        assert path.read_bytes() == b""
        labels.append(label("e1"))
    assert "cut to empty" in warnings_of(caplog)[0]
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"remember the belt\n" + b"\0" * 100)
    with pytest.raises(ReviewError, match="left unchanged"):
        LabelFile(notes)
    assert notes.read_bytes() == b"remember the belt\n" + b"\0" * 100


def test_mrkd_run_starts_again_on_an_events_log_its_power_cut_left_zero_filled(tmp_path):
    """End to end: a real run writes its alarms, the power goes mid-line (the line's start reached the
    disk, then 70000 zeros), a second real run starts, says what it cut, and appends after the whole lines."""
    model = build_tiny_model(tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    folder = write_frames(tmp_path / "frames", [marked(normal_frame(rng)) for _ in range(3)])   # every one alarms
    events = tmp_path / "events.jsonl"
    run = MRKD + ["run", str(model), "--source", f"cam={folder}", "--status-every", "0", "--events", str(events)]
    first = subprocess.run(run, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr
    whole = events.read_bytes()
    alarms = len(read_events(events))
    assert whole.endswith(b"\n") and alarms >= 1
    events.write_bytes(whole + whole[:50] + b"\0" * 70000)
    second = subprocess.run(run, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr
    assert "cutting a torn last line left by an earlier crash (50 bytes: " in second.stderr
    assert f"then 70000 {ZEROS_SAID}" in second.stderr
    after = events.read_bytes()
    assert after.startswith(whole) and b"\0" not in after
    assert len(read_events(events)) == 2 * alarms


def test_readers_of_an_events_log_skip_a_zero_filled_tail(tmp_path, caplog):
    """`mrkd review`, the label's log identity and the page's restart rows read the log as a power cut left
    it (nothing is cut until a run opens it): the zeros are passed over, never an error; `mrkd review`
    says what it skipped."""
    from mrkd.runtime.outputs.recent_events import latest_events
    from mrkd.runtime.review import first_event_id, read_review_events
    path = tmp_path / "events.jsonl"
    whole = two_whole_lines(*RECORDS["events: an alarm"], path)
    ids = [json.loads(line)["event_id"] for line in whole.splitlines()]
    for tail in (whole[:40] + b"\0" * 70000, b"\0" * 100):
        path.write_bytes(whole + tail)
        caplog.clear()
        assert [event["event_id"] for event in read_review_events(path)] == ids
        said = warnings_of(caplog)
        assert len(said) == 1 and f"{power_cut_zeros(tail)} {ZEROS_SAID}" in said[0], said
        assert [event["event_id"] for event in latest_events(path, 5)] == ids[::-1]
        assert first_event_id(path) == ids[0]
    path.write_bytes(whole + whole[:len(whole) // 2 - 1] + b"\0")     # a whole record, its newline a zero: read
    assert [event["event_id"] for event in read_review_events(path)] == ids + ids[:1]
    assert [event["event_id"] for event in latest_events(path, 5)] == (ids + ids[:1])[::-1]
    path.write_bytes(b"\0" * 4096)
    assert read_review_events(path) == [] and latest_events(path, 5) == [] and first_event_id(path) is None


def test_mrkd_run_starts_on_a_parts_log_of_only_zeros(cell, tmp_path):
    """The power went soon after a new parts log's first write: its size reached the disk, no data did."""
    parts_log = tmp_path / "parts.jsonl"
    parts_log.write_bytes(b"\0" * 4096)
    done, summary = run_parts(cell, tmp_path, parts_log, ["A"])
    assert done.returncode == 0, done.stderr
    assert f"4096 {ZEROS_SAID}; the file held no data, cut to empty" in done.stderr
    assert [json.loads(line)["part_id"] for line in parts_log.read_bytes().splitlines()] == ["A"]
