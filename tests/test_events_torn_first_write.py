"""A crash during the very first write of a new events or parts log leaves a file holding only the torn
start of a record (no whole line). That file is cut with the torn-line warning at the next start, as a
torn last line after whole ones is: refused, a line under a supervisor (systemd Restart=always) refused
to start forever. Only a start these writers can have written is cut (their JSON is sort_keys, ASCII,
and begins with one of a few fixed keys); any other one-line file is refused and left unchanged."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import numpy as np
import pytest

from runtime_fixtures import build_tiny_model, normal_frame, write_frames

from mrkd.runtime.line.alarms import Alarm
from mrkd.runtime.outputs.base import CameraJudgement, PartResult, TriggerReceipt
from mrkd.runtime.outputs.events import EventLog, EventLogError, make_event, part_event, read_events
from mrkd.runtime.outputs.parts_log import PartsLog, PartsLogError, missed_record, part_record

MRKD = [sys.executable, "-c", "from mrkd.cli import main; main()"]


def alarm_event() -> dict:
    """An alarm's event as the loop writes it: make_event, then the fields the loop and the outputs add."""
    event = make_event(Alarm(17, 0.68, 0.41, 0.2, 3), "rtsp://cam/s", [{"x": 1, "y": 2, "w": 3, "h": 4}], None,
                       camera="cam0")
    event.update(model_sha256="ab" * 32, backend="onnxruntime-cpu", precision="fp32",
                 snapshot="/snap/a.jpg", evidence="/ev/cam0/a.png", evidence_sha256="cd" * 32)
    return event


def part(verdict: str = "NG") -> PartResult:
    judgement = CameraJudgement("cam0", 0.5, 0.2, True, images=1, evidence="/ev/cam0/p.png")
    return PartResult(inspection_id=7, part_id="P7", verdict=verdict, score=0.5, threshold=0.2, cameras=(judgement,),
                      model_sha256="ab" * 32, backend="onnxruntime-cpu", trigger_time=1.7e9, event_id="e-7",
                      sequence=7)


def missed(count: int) -> dict:
    return missed_record(TriggerReceipt(accepted=False, sequence=9, part_id="P9", reason="queue full", time=1.7e9,
                                        count=count))


# every kind of line each log writes
RECORDS = {
    "events: an alarm": (EventLog, alarm_event),
    "events: an NG part": (EventLog, lambda: part_event(part())),
    "parts: a part": (PartsLog, lambda: part_record(part("OK"))),
    "parts: a missed trigger": (PartsLog, lambda: missed(1)),
    "parts: missed triggers folded": (PartsLog, lambda: missed(3)),
}


def written_line(log_class, record: dict, path) -> bytes:
    """The bytes the log itself writes for ``record`` into a new file."""
    log = log_class(path)
    log.write(record)
    log.close()
    return path.read_bytes()


@pytest.mark.parametrize("kind", sorted(RECORDS))
def test_every_torn_start_of_a_first_line_is_cut_and_the_log_goes_on(tmp_path, caplog, kind):
    log_class, record = RECORDS[kind]
    path = tmp_path / "log.jsonl"
    line = written_line(log_class, record(), path)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    caplog.set_level(logging.WARNING)
    # from the first key's first letter to the last byte before the closing brace: every tear is cut
    for cut in range(3, len(line) - 2):
        torn = line[:cut]
        path.write_bytes(torn)
        caplog.clear()
        log = log_class(path)
        assert path.read_bytes() == b"", (cut, torn)
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 1 and "cutting a torn last line left by an earlier crash" in messages[0], messages
        assert f"({len(torn)} bytes" in messages[0]
        log.write(record())
        log.close()
        assert path.read_bytes().count(b"\n") == 1 and log_class.is_record(path.read_bytes().rstrip(b"\n"))


ONE_LINE_FOREIGN = {
    "json of something else, torn": b'{"model": "grain", "thr',
    "a key that is no first key of ours": b'{"anomaly": 1, "boxes": [',
    "keys out of order": b'{"anomalous_in_window": 1, "time": "t", "boxes": [',
    "a key repeated": b'{"acquired_s": 0.1, "acquired_s": 0.2, "back',
    "not ascii (json.dumps escapes)": '{"anomalous_in_window": 1, "camera": "Kamera-\u00fc'.encode(),
    "no space after the colon": b'{"anomalous_in_window":1, "bo',
    "a whole object, no newline": b'{"anomalous_in_window": 1, "event_id": "x", "time": "t"}',
    "a whole object and more": b'{"anomalous_in_window": 1} {"a',
    "csv": b"part;score;17;0.3",
    "text": b"anomalous_in_window",
    "two bytes": b'{"',
    "nul bytes, then text": b"\0" * 64 + b"x",     # only zeros at the end are a power cut's (test_power_cut_zero_tails)
}


@pytest.mark.parametrize("log_class, error", [(EventLog, EventLogError), (PartsLog, PartsLogError)])
@pytest.mark.parametrize("kind", sorted(ONE_LINE_FOREIGN))
def test_a_one_line_file_without_a_newline_that_is_not_our_torn_start_is_refused_unchanged(tmp_path, log_class,
                                                                                           error, kind):
    path = tmp_path / "data.txt"
    path.write_bytes(ONE_LINE_FOREIGN[kind])
    with pytest.raises(error, match="does not end in a newline .* left unchanged"):
        log_class(path)
    assert path.read_bytes() == ONE_LINE_FOREIGN[kind]


def test_each_log_cuts_only_its_own_kind_of_start(tmp_path):
    """A missed trigger's start is the parts log's, never the events log's: the events log refuses it."""
    path = tmp_path / "parts.jsonl"
    torn = written_line(PartsLog, missed(1), path)[:40]
    path.write_bytes(torn)
    with pytest.raises(EventLogError, match="left unchanged"):
        EventLog(path)
    assert path.read_bytes() == torn
    PartsLog(path).close()
    assert path.read_bytes() == b""


@pytest.mark.parametrize("kind", sorted(RECORDS))
def test_the_first_keys_are_what_the_writers_write(kind):
    """Each log's ``first_keys`` names the first key of every kind of line it writes (sort_keys)."""
    log_class, record = RECORDS[kind]
    assert next(iter(json.loads(json.dumps(record(), sort_keys=True)))) in log_class.first_keys


def marked(frame):
    """``frame`` with a white square at its top-left: the tiny model alarms on it."""
    frame[2:14, 2:14] = 255
    return frame


def test_mrkd_run_starts_on_an_events_log_torn_in_its_first_write(tmp_path):
    """The reported case end to end: `mrkd run --events FILE` on a file whose first write was torn starts,
    says what it cut, and the log then holds the run's alarms only."""
    model = build_tiny_model(tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    frames = [normal_frame(rng) for _ in range(4)]
    folder = write_frames(tmp_path / "frames", frames[:1] + [marked(frame) for frame in frames[1:]])
    events = tmp_path / "events.jsonl"
    torn = json.dumps(alarm_event(), sort_keys=True).encode()[:57]
    events.write_bytes(torn)
    done = subprocess.run(MRKD + ["run", str(model), "--source", f"cam={folder}", "--status-every", "0",
                                  "--events", str(events)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert f"cutting a torn last line left by an earlier crash ({len(torn)} bytes" in done.stderr
    written = read_events(events)
    assert written and all(math.isfinite(e["score"]) and e["camera"] == "cam" for e in written)
