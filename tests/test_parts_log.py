"""--parts-log: one JSON line per judged part (OK included) of a triggered `mrkd run`, checked on a real
subprocess against its summary and its events log; a file that is not a parts log (or the events log)
is refused; a full disk is counted while the line goes on; a torn last line is cut at the next start."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from runtime_fixtures import build_tiny_model, defective_frame, fill_up, normal_frame, small_tmpfs, write_frames

from mrkd.runtime.metadata import file_sha256
from mrkd.runtime.outputs.events import read_events

MRKD = [sys.executable, "-c", "from mrkd.cli import main; main()"]
DEFECTIVE = (1, 4)          # of the folder's six images; a seventh trigger finds the folder ended: ERROR


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    """The tiny model (threshold 0.1) and a folder of six parts, two of them defective."""
    root = tmp_path_factory.mktemp("cell")
    model = build_tiny_model(root / "tiny.onnx")
    rng = np.random.default_rng(3)
    folder = write_frames(root / "parts", [defective_frame(rng) if i in DEFECTIVE else normal_frame(rng)
                                           for i in range(6)])
    return model, folder


def run_parts(cell, tmp_path, parts_log, triggers, *extra, name="s.json"):
    model, folder = cell
    summary = tmp_path / name
    done = subprocess.run(MRKD + ["run", str(model), "--source", f"cam={folder}", "--trigger", "software",
                                  "--trigger-stdin", "--part-queue", "64", "--status-every", "0",
                                  "--parts-log", str(parts_log), "--summary", str(summary), *extra],
                          input="".join(f"{t}\n" for t in triggers), capture_output=True, text=True, timeout=180)
    return done, (json.loads(summary.read_text()) if summary.exists() else None)


def test_every_part_ok_ng_and_error_is_one_line_in_order(cell, tmp_path):
    model, _ = cell
    parts_log, events = tmp_path / "parts.jsonl", tmp_path / "events.jsonl"
    triggers = [f"P{i}" for i in range(7)]
    done, summary = run_parts(cell, tmp_path, parts_log, triggers, "--events", str(events),
                              "--evidence", str(tmp_path / "ev"))
    assert done.returncode == 0, done.stderr
    assert summary["parts"] == 7 and summary["verdicts"] == {"OK": 4, "NG": 2, "ERROR": 1}, summary
    raw = parts_log.read_bytes()
    assert raw.endswith(b"\n")
    lines = [json.loads(line) for line in raw.splitlines()]
    assert [r["part_id"] for r in lines] == triggers                 # one line per part, in order
    assert [r["inspection_id"] for r in lines] == list(range(1, 8))
    verdicts = [r["verdict"] for r in lines]
    assert verdicts == ["OK", "NG", "OK", "OK", "NG", "OK", "ERROR"]
    assert {v: verdicts.count(v) for v in ("OK", "NG", "ERROR")} == summary["verdicts"]
    sha = file_sha256(model)
    for record in lines:
        assert record["log"] == "parts" and record["kind"] == "part" and record["schema_version"] == 1
        assert record["model_sha256"] == sha and record["recipe"] == 0 and record["time"] and record["trigger_time"] > 0
        [camera] = record["cameras"]
        assert camera["camera"] == "cam" and camera["threshold"] == 0.1
        if record["verdict"] == "ERROR":
            assert record["score"] is None and camera["score"] is None and "source ended" in record["error"]
        else:     # the verdict follows the score it records
            assert (record["score"] >= 0.1) == (record["verdict"] == "NG") == camera["anomalous"]
            assert camera["score"] == record["score"] and camera["images"] == 1
    # the NG/ERROR parts' event ids are those of the events log, in order; OK parts have none
    logged = read_events(events)
    assert [e["event_id"] for e in logged] == [r["event_id"] for r in lines if r["verdict"] != "OK"]
    assert all(r["event_id"] is None for r in lines if r["verdict"] == "OK")
    for record in lines:       # an NG part names its evidence, as the events log does
        if record["verdict"] == "NG":
            evidence = record["cameras"][0]["evidence"]
            assert evidence and Path(evidence).is_file() and record["cameras"][0]["evidence_sha256"]
    health = summary["outputs"]["parts_log"]
    assert health["ok"] and health["sent"] == 7 and health["failed"] == 0 and health["target"] == str(parts_log)

    # a second run appends to its own log; the first run's lines stay as they were
    done, summary = run_parts(cell, tmp_path, parts_log, ["Q0", "Q1"], name="s2.json")
    assert done.returncode == 0, done.stderr
    after = parts_log.read_bytes()
    assert after.startswith(raw)
    assert [json.loads(line)["part_id"] for line in after[len(raw):].splitlines()] == ["Q0", "Q1"]


FOREIGN = {
    "csv": b"part,score\n17,0.3\n",
    "json lines of something else": b'{"a": 1}\n',
    "an events log of parts": json.dumps({"event_id": "x", "time": "t", "kind": "part", "inspection_id": 1,
                                          "part_id": "A", "verdict": "NG"}).encode() + b"\n",
}


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_a_file_that_is_not_a_parts_log_is_refused_and_kept(cell, tmp_path, kind):
    path = tmp_path / "data.jsonl"
    path.write_bytes(FOREIGN[kind])
    done, summary = run_parts(cell, tmp_path, path, ["A"])
    assert done.returncode == 1 and summary is None and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"--parts-log {path}: line 1 is not an mrkd part record" in errors[0], done.stderr
    assert "left unchanged" in errors[0] and path.read_bytes() == FOREIGN[kind]


def test_the_events_log_refuses_a_parts_log(cell, tmp_path):
    """An OK part's line has event_id and time too, but it is no event: --events does not take a parts log."""
    parts_log = tmp_path / "parts.jsonl"
    done, _ = run_parts(cell, tmp_path, parts_log, ["A"])
    assert done.returncode == 0 and len(parts_log.read_bytes().splitlines()) == 1, done.stderr
    kept = parts_log.read_bytes()
    done, _ = run_parts(cell, tmp_path, tmp_path / "other.jsonl", ["B"], "--events", str(parts_log), name="s2.json")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"Error: --events {parts_log}: line 1 is not an mrkd event" in done.stderr
    assert parts_log.read_bytes() == kept


@pytest.mark.parametrize("args, message", [
    ([], "Error: --parts-log records judged parts: it needs --trigger software or hardware"),
    (["--trigger", "software", "--trigger-stdin", "--events", "same.jsonl"],
     "Error: --parts-log and --events name the same file (same.jsonl)"),
])
def test_option_errors_are_one_line(cell, tmp_path, monkeypatch, args, message):
    from mrkd.cli import main
    model, folder = cell
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", str(model), "--source", str(folder), "--parts-log", "same.jsonl",
                                       *args], input="A\n")
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "same.jsonl").exists()


def test_help_names_the_option():
    from mrkd.cli import main
    result = CliRunner().invoke(main, ["run", "--help"])
    assert "--parts-log" in result.output and "every judged part, OK included" in " ".join(result.output.split())


def test_a_full_disk_is_counted_and_the_line_goes_on(cell, tmp_path):
    events = tmp_path / "events.jsonl"
    with small_tmpfs(tmp_path / "full", "size=256k") as disk:
        fill_up(disk)
        parts_log = disk / "parts.jsonl"
        done, summary = run_parts(cell, tmp_path, parts_log, [f"P{i}" for i in range(6)], "--events", str(events))
        assert done.returncode == 0, done.stderr
        assert summary["parts"] == 6 and summary["verdicts"]["NG"] == 2       # judging went on
        health = summary["outputs"]["parts_log"]
        assert health["ok"] is False and health["sent"] == 0 and health["failed"] == 6, health
        assert str(parts_log) in health["detail"] and "No space left" in health["detail"]
        assert summary["outputs"]["events"]["sent"] == 2 and len(read_events(events)) == 2   # the others deliver
        warnings = [line for line in done.stderr.splitlines() if "output parts_log (" in line]
        assert 1 <= len(warnings) <= 2 and str(parts_log) in warnings[0], done.stderr
        assert any(line.startswith("warning: outputs that did not deliver everything: parts_log (6 failed")
                   for line in done.stderr.splitlines()), done.stderr
        assert not parts_log.exists() or parts_log.read_bytes() == b""        # no half line either


def test_a_torn_last_line_is_cut_and_the_log_goes_on(cell, tmp_path):
    """A kill mid-write can leave at most the start of a line (each is one write + fsync, cut back on a
    failure); the next start cuts it, says so, and appends whole lines after the last whole one."""
    parts_log = tmp_path / "parts.jsonl"
    done, _ = run_parts(cell, tmp_path, parts_log, ["A"])
    assert done.returncode == 0, done.stderr
    whole = parts_log.read_bytes()
    torn = b'{"acquired_s": 0.01, "cameras": [{"anomalous": fal'
    parts_log.write_bytes(whole + torn)
    done, _ = run_parts(cell, tmp_path, parts_log, ["B"], name="s2.json")
    assert done.returncode == 0, done.stderr
    assert f"cutting a torn last line left by an earlier crash ({len(torn)} bytes" in done.stderr
    after = parts_log.read_bytes()
    assert after.startswith(whole) and torn not in after
    assert [json.loads(line)["part_id"] for line in after.splitlines()] == ["A", "B"]


def test_every_refused_trigger_is_a_missed_line_among_the_parts(tmp_path):
    """A queue of 0 overrun from stdin (the triggers come faster than the model judges), plus one trigger
    naming a recipe the line lacks: the log holds one line per trigger sent, a part or a missed trigger,
    every sequence number once; a missed line names its reason and has no verdict. A second run appends
    to the log that holds both kinds."""
    model = build_tiny_model(tmp_path / "tiny.onnx")
    rng = np.random.default_rng(5)
    folder = write_frames(tmp_path / "parts", [normal_frame(rng) for _ in range(30)])
    # one trigger, then (that part judged: the line runs) bursts of three 0.1 s apart; empty lines: the
    # part id is the trigger's sequence
    bursts = [[""]] + [["", "", ""]] * 4 + [["R@9", "", ""]] + [["", "", ""]] * 4 + [["", ""]]
    parts_log, summary_path = tmp_path / "parts.jsonl", tmp_path / "s.json"
    run = subprocess.Popen(MRKD + ["run", str(model), "--source", f"cam={folder}", "--trigger", "software",
                                   "--trigger-stdin", "--part-queue", "0", "--status-every", "0",
                                   "--parts-log", str(parts_log), "--summary", str(summary_path)],
                           stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for number, burst in enumerate(bursts):
        run.stdin.write("".join(f"{t}\n" for t in burst))
        run.stdin.flush()
        deadline = time.monotonic() + 120
        while number == 0 and not (parts_log.exists() and parts_log.read_bytes()):
            assert run.poll() is None and time.monotonic() < deadline, "the first part was not judged"
            time.sleep(0.05)
        time.sleep(0.1)
    _, stderr = run.communicate(timeout=180)
    assert run.returncode == 0, stderr
    summary = json.loads(summary_path.read_text())
    assert summary["triggers"] == 30 and summary["parts"] + summary["missed_triggers"] == 30, summary
    assert summary["missed_by_reason"].get("queue full", 0) >= 1, summary       # the queue was overrun
    lines = [json.loads(line) for line in parts_log.read_bytes().splitlines()]
    assert len(lines) == 30 and summary["outputs"]["parts_log"]["sent"] == 30
    parts = [r for r in lines if r["kind"] == "part"]
    missed = [r for r in lines if r["kind"] == "missed"]
    assert len(parts) == summary["parts"] and len(missed) == summary["missed_triggers"]
    assert sorted(r["sequence"] for r in lines) == list(range(1, 31))            # every trigger, once
    assert all(r["part_id"] == str(r["sequence"]) for r in parts)
    assert [r["inspection_id"] for r in parts] == list(range(1, len(parts) + 1))
    reasons = {}
    for record in missed:
        assert record["log"] == "parts" and "verdict" not in record and "inspection_id" not in record
        assert record["reason"] in ("queue full", "unknown recipe 9"), record
        reasons[record["reason"]] = reasons.get(record["reason"], 0) + 1
        stamp = dt.datetime.fromisoformat(record["time"])       # the part lines' format: UTC, milliseconds
        assert stamp.utcoffset() == dt.timedelta(0) and len(record["time"]) == len(parts[0]["time"])
    assert reasons == summary["missed_by_reason"] and reasons["unknown recipe 9"] == 1
    assert [r["part_id"] for r in missed if r["reason"].startswith("unknown")] == ["R"]
    for position, record in enumerate(lines):    # written when refused: before every later trigger's part
        if record["kind"] == "missed":
            assert all(p["sequence"] < record["sequence"] for p in lines[:position] if p["kind"] == "part")

    kept = parts_log.read_bytes()
    done, summary = run_parts((model, folder), tmp_path, parts_log, ["A", "B@9"], name="s2.json")
    assert done.returncode == 0, done.stderr
    added = [json.loads(line) for line in parts_log.read_bytes()[len(kept):].splitlines()]
    assert parts_log.read_bytes().startswith(kept)
    assert sorted((r["kind"], r["part_id"], r["sequence"]) for r in added) == [("missed", "B", 2), ("part", "A", 1)]


MISSED = {"time": "2026-01-02T03:04:05.678+00:00", "log": "parts", "kind": "missed", "sequence": 2, "part_id": "B",
          "reason": "queue full", "trigger_time": 1.0, "schema_version": 1}


@pytest.mark.parametrize("records, accepted, foreign_line", [
    ([MISSED], True, None),
    ([{**MISSED, "verdict": "OK"}], False, 1),                     # a missed trigger has no verdict
    ([{k: v for k, v in MISSED.items() if k != "reason"}], False, 1),
    ([{**MISSED, "log": None}], False, 1),
    ([MISSED, {"event_id": "e", "time": "t", "camera": "cam", "score": 0.3}], False, 2),    # an events line
    ([MISSED, {"a": 1}], False, 2),
])
def test_the_file_check_takes_missed_lines_and_refuses_mixed_files(tmp_path, records, accepted, foreign_line):
    """PartsLog opens a file of part and missed lines and refuses one with another line among them, left
    unchanged; the events log refuses a missed line as it refuses a part line."""
    from mrkd.runtime.outputs.events import EventLog, EventLogError
    from mrkd.runtime.outputs.parts_log import PartsLog, PartsLogError
    path = tmp_path / "log.jsonl"
    data = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    path.write_bytes(data)
    if accepted:
        PartsLog(path).close()
    else:
        with pytest.raises(PartsLogError, match=f"line {foreign_line} is not an mrkd part record"):
            PartsLog(path)
    with pytest.raises(EventLogError, match="line 1 is not an mrkd event"):
        EventLog(path)
    assert path.read_bytes() == data
