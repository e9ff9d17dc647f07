"""`mrkd review` of a log an older mrkd wrote (before c55174d an event named its evidence relative to the
folder `mrkd run` ran in, which nothing records), from another folder, the log in a subfolder of the run's
(`--events logs/ev.jsonl --evidence evidence`): every row said EVIDENCE IMAGE GONE and a mark "no longer
exists" for images that were there. The run's folder holds the log (its --events was relative), so the
path is looked up from the log's folders upward, and taken only with the sha256 the event recorded;
found nowhere, the row says where the path is relative to and to give --evidence.

A real `mrkd run` of the tiny model (tests/runtime_fixtures.py); its log rewritten as the older mrkd wrote it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from click.testing import CliRunner

from runtime_fixtures import build_tiny_model, normal_frame, normal_then_defective


def older_run(root: Path) -> tuple:
    """`mrkd run` in ``root/line`` with --events logs/ev.jsonl --evidence evidence; the log's evidence
    paths made relative to that folder, as mrkd before c55174d wrote them. (log, events)."""
    line = root / "line"
    (line / "frames").mkdir(parents=True)
    for i, frame in enumerate(normal_then_defective(1, 2)):
        cv2.imwrite(str(line / "frames" / f"f{i}.png"), frame)
    build_tiny_model(line / "tiny.onnx")
    run = subprocess.run([sys.executable, "-c", "from mrkd.cli import main; main()", "run", "tiny.onnx", "--source",
                          "frames", "--cooldown", "0", "--events", "logs/ev.jsonl", "--evidence", "evidence"],
                         cwd=line, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    log = line / "logs" / "ev.jsonl"
    events = [dict(e, evidence=os.path.relpath(e["evidence"], line))
              for e in map(json.loads, log.read_text().splitlines())]
    assert len(events) == 2 and all(e["evidence"].startswith("evidence/cam0/") for e in events)
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    return log, events


def review(*args: str):
    from mrkd.cli import main
    return CliRunner().invoke(main, ["review", *args])


def listed_from_elsewhere(log: Path, tmp_path: Path, monkeypatch):
    """`mrkd review` of ``log`` run from a new folder, tmp_path/elsewhere (the current folder from then on),
    naming the log relative to it: (that folder, the log as given, the listing, which succeeded)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    given = os.path.relpath(log, elsewhere)
    listed = review(given, "--labels", "labels.jsonl")
    assert listed.exit_code == 0, listed.output
    return elsewhere, given, listed


def test_an_older_logs_relative_evidence_is_found_from_another_folder(tmp_path, monkeypatch):
    log, events = older_run(tmp_path)
    elsewhere, given, listed = listed_from_elsewhere(log, tmp_path, monkeypatch)
    for event in events:
        assert f"image {tmp_path / 'line' / event['evidence']}  [unlabelled]" in listed.output, listed.output
    marked = review(given, "--labels", "labels.jsonl", "--mark", events[0]["event_id"], "--as", "defect")
    assert marked.exit_code == 0, marked.output
    label = json.loads((elsewhere / "labels.jsonl").read_text())
    assert (label["image"], label["image_sha256"]) == (str(tmp_path / "line" / events[0]["evidence"]),
                                                       events[0]["evidence_sha256"])


def test_a_file_found_upward_with_another_hash_is_not_taken_and_the_row_says_what_to_give(tmp_path, monkeypatch):
    """The file at the path relative to the log's upper folder is another image: not taken (not even as
    "changed since the run": it is not known to be the event's file); the row says the path is relative
    to the run's folder and to give --evidence, which finds the real one."""
    log, events = older_run(tmp_path)
    real = tmp_path / "line" / "evidence"
    os.rename(real, tmp_path / "archive")
    other = real / "cam0" / Path(events[0]["evidence"]).name
    other.parent.mkdir(parents=True)
    cv2.imwrite(str(other), normal_frame(np.random.default_rng(3)))
    elsewhere, given, listed = listed_from_elsewhere(log, tmp_path, monkeypatch)
    rows = listed.output.splitlines()[:2]
    assert all(f"EVIDENCE IMAGE NOT FOUND ({e['evidence']}, relative to the folder that run ran in, which its log "
               f"does not record: give --evidence DIR" in row for e, row in zip(events, rows)), listed.output
    marked = review(given, "--labels", "labels.jsonl", "--mark", events[0]["event_id"], "--as", "good")
    assert marked.exit_code != 0 and "give --evidence DIR" in marked.output, marked.output
    assert not (elsewhere / "labels.jsonl").exists()
    found = review(given, "--labels", "labels.jsonl", "--evidence", str(tmp_path / "archive"))
    assert found.output.count(f"image {tmp_path / 'archive' / 'cam0'}") == 2, found.output
