"""What a power cut leaves beside a line's files, met by the next `mrkd run` (real runs of the tiny model):
a file whose size reached the disk and whose data did not (all zeros), or one of size 0. Such a file
holds nothing of anyone's, so the run goes on with a one-line warning where it would have refused to
start forever (a supervised line restarting after every power cut); a file with data is still refused.
The append-only logs' zero-filled tails: test_power_cut_zero_tails.py."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime_fixtures import build_tiny_model, normal_frame, write_frames

MRKD = [sys.executable, "-c", "from mrkd.cli import main; main()"]


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """The tiny model and a folder of three good frames."""
    root = tmp_path_factory.mktemp("line")
    model = build_tiny_model(root / "m.onnx")
    rng = np.random.default_rng(0)
    frames = write_frames(root / "frames", [normal_frame(rng) for _ in range(3)], "{}.png")
    return model, frames


def run(line, *extra) -> subprocess.CompletedProcess:
    model, frames = line
    return subprocess.run(MRKD + ["run", str(model), "--source", f"cam={frames}", "--status-every", "0", *extra],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("left", [b"", b"\0" * 2048], ids=["size 0", "all zeros"])
def test_a_summary_left_empty_or_zero_filled_is_replaced_with_a_warning(line, tmp_path, left):
    summary = tmp_path / "summary.json"
    summary.write_bytes(left)
    done = run(line, "--summary", str(summary))
    assert done.returncode == 0, done.stderr
    said = [text for text in done.stderr.splitlines() if text.startswith("warning: --summary")]
    assert len(said) == 1 and f"holds no data ({len(left)} bytes" in said[0], done.stderr
    assert json.loads(summary.read_text())["frames"] == 3


def test_a_summary_target_with_data_before_its_zeros_is_still_refused(line, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"shift notes\n" + b"\0" * 100)
    done = run(line, "--summary", str(notes))
    assert done.returncode != 0 and "never written over" in done.stderr and "Traceback" not in done.stderr
    assert notes.read_bytes() == b"shift notes\n" + b"\0" * 100


def test_a_staged_evidence_file_from_before_a_clock_set_back_is_removed(tmp_path, caplog):
    """A line PC whose clock starts behind after a power cut (no RTC battery, NTP not yet synced) finds the
    staged file the cut left with a modification time in its future: no writer holds it, so it goes."""
    from mrkd.runtime.outputs.evidence import EvidenceSettings, EvidenceWriter
    from mrkd.runtime.outputs.events import new_event_id
    folder = tmp_path / "evidence"
    (folder / "cam0").mkdir(parents=True)
    left = folder / "cam0" / f".{new_event_id()}.png.ab12cd34.tmp"
    left.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 500)
    ahead = time.time() + 86400             # the real time of the cut, a day ahead of the clock now
    os.utime(left, (ahead, ahead))
    caplog.set_level(logging.WARNING)
    EvidenceWriter(EvidenceSettings(str(folder), max_bytes=1 << 30))
    assert not left.exists()
    assert any("removed 1 unfinished evidence file (508 bytes)" in r.getMessage() for r in caplog.records)


def test_the_page_passes_over_a_snapshot_a_power_cut_left_unwritten_and_shows_the_evidence(line, tmp_path):
    """A snapshot all zeros, one of size 0 and one whose end is zeros are no images: a restarted page serves
    each row's alarm from its evidence file (a whole JPEG), as for a row with no snapshot, never the zeros."""
    from line_fixtures import http_get, wait_for
    from mrkd.benchmarks.mosquitto import free_port
    from runtime_fixtures import defective_frame
    model, good = line
    rng = np.random.default_rng(1)
    bad = write_frames(tmp_path / "bad", [defective_frame(rng) for _ in range(3)], "{}.png")
    outputs = ["--status-every", "0", "--cooldown", "0", "--events", str(tmp_path / "events.jsonl"),
               "--evidence", str(tmp_path / "evidence"), "--snapshots", str(tmp_path / "snapshots")]
    first = subprocess.run(MRKD + ["run", str(model), "--source", f"cam={bad}", *outputs], capture_output=True,
                           text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    events = [json.loads(text) for text in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert len(events) == 3 and all(event["snapshot"] for event in events)
    for event, left in zip(events, (lambda data: b"\0" * len(data), lambda data: b"",
                                    lambda data: data[:len(data) // 2] + b"\0" * (len(data) - len(data) // 2))):
        snapshot = Path(event["snapshot"])
        snapshot.write_bytes(left(snapshot.read_bytes()))
    port = free_port()
    page = subprocess.Popen(MRKD + ["run", str(model), "--source", f"cam={good}", "--loop", "--fps", "5",
                                    "--http", f"127.0.0.1:{port}", *outputs],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        up = wait_for(lambda: _answers(http_get, url + "/healthz"), 30, 0.1)
        assert up, page.stderr.read() if page.poll() is not None else "the page never answered"
        for event in events:
            status, body = http_get(f"{url}/alarm/{event['event_id']}.jpg")
            assert status == 200 and body[:3] == b"\xff\xd8\xff" and body.endswith(b"\xff\xd9"), body[:40]
            assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR) is not None
    finally:
        page.terminate()
        page.wait(30)


def _answers(http_get, url: str) -> bool:
    try:
        return http_get(url)[0] in (200, 503)
    except OSError:
        return False


def test_a_model_folder_an_export_left_mixed_names_the_files_it_kept(tmp_path):
    """A power cut while `mrkd export --overwrite` moved its set into the line's model folder: the new sidecar
    reached the disk, the new graph is still in the export's staging folder and the earlier set in the one it
    keeps beside it (export/file_set.py). The run refuses the pair in one line, as before, and now says where
    both sets' files are, so the operator can put one back or export again."""
    from mrkd.export.file_set import STAGING_PREFIX
    for name in ("earlier", "new"):
        (tmp_path / name).mkdir()
    earlier = build_tiny_model(tmp_path / "earlier" / "model.onnx")
    new = build_tiny_model(tmp_path / "new" / "model.onnx", uint8_input=True)
    folder = tmp_path / "line"
    staging, kept = folder / f"{STAGING_PREFIX}k3j2h1g0", folder / f"{STAGING_PREFIX}earlier-a1b2c3d4"
    for place in (staging, kept):
        place.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(earlier.read_bytes())                      # the graph's rename was lost
    (folder / "model.onnx.json").write_bytes(Path(f"{new}.json").read_bytes())      # the sidecar's was not
    (staging / "model.onnx").write_bytes(new.read_bytes())
    for name in ("model.onnx", "model.onnx.json"):
        os.link(folder / name if name == "model.onnx" else Path(f"{earlier}.json"), kept / name)
    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "0.png"), normal_frame(np.random.default_rng(0)))
    done = subprocess.run(MRKD + ["run", str(folder / "model.onnx"), "--source", f"cam={frames}", "--status-every",
                                  "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    error = [text for text in done.stderr.splitlines() if text.startswith("Error:")]
    assert len(error) == 1 and "this sidecar describes another model" in error[0], done.stderr
    assert f"{STAGING_PREFIX}earlier-a1b2c3d4" in error[0] and f"{STAGING_PREFIX}k3j2h1g0" in error[0], error[0]


def test_mrkd_calibrate_syncs_the_folder_once_the_new_sidecar_has_its_name(line, tmp_path):
    """The sidecar (the threshold) is written to a staged file, fsynced and renamed over the old one. Until the
    folder is synced too, a power cut after "threshold ... -> model.onnx" can leave the old sidecar there: the
    line then runs on the old threshold, saying nothing. Seen from outside (strace of a real `mrkd calibrate`):
    the rename is followed by an fsync of the folder."""
    model, good = line
    folder = tmp_path / "model"
    folder.mkdir()
    for name in (model.name, f"{model.name}.json"):
        (folder / name).write_bytes((model.parent / name).read_bytes())
    calls = traced(MRKD + ["calibrate", str(folder / model.name), str(good), "--accept-shift"], tmp_path)
    assert str(folder) in folders_synced_after_rename(calls, folder / f"{model.name}.json")


def traced(command, tmp_path) -> list:
    """The opens, renames and fsyncs of ``command`` and its children (strace), once it succeeded."""
    from peers import require_program
    strace = require_program("strace", ("strace",))
    trace = tmp_path / "trace.txt"
    done = subprocess.run([strace, "-f", "-qq", "-e", "trace=openat,rename,renameat,renameat2,fsync", "-o", str(trace),
                           *map(str, command)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return trace.read_text().splitlines()


def folders_synced_after_rename(calls: list, target) -> list:
    """The paths fsynced (through a descriptor opened after it) after the one rename onto ``target``."""
    renamed = [i for i, call in enumerate(calls) if "rename" in call and f'"{target}"' in call]
    assert len(renamed) == 1, calls[-20:]
    opened, synced = {}, []          # descriptor -> the path it was opened on
    for call in calls[renamed[0] + 1:]:
        opening = re.search(r'openat\(AT_FDCWD, "([^"]*)", [^)]*\) = (\d+)', call)
        if opening:
            opened[opening.group(2)] = opening.group(1)
        syncing = re.search(r"fsync\((\d+)\) += 0", call)
        if syncing and syncing.group(1) in opened:
            synced.append(opened[syncing.group(1)])
    return synced


@pytest.mark.parametrize("left", [b"", b"\0" * 700], ids=["size 0", "all zeros"])
def test_a_sidecar_left_empty_or_zero_filled_is_said_so_in_one_line(line, tmp_path, left):
    """Not "metadata is not valid JSON (Expecting value: line 1 column 1 (char 0))": the operator is told the
    file holds nothing and what to do."""
    model, frames = line
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / model.name).write_bytes(model.read_bytes())
    (folder / f"{model.name}.json").write_bytes(left)
    done = subprocess.run(MRKD + ["run", str(folder / model.name), "--source", f"cam={frames}", "--status-every",
                                  "0"], capture_output=True, text=True, timeout=120)
    error = [text for text in done.stderr.splitlines() if text.startswith("Error:")]
    assert done.returncode != 0 and "Traceback" not in done.stderr and len(error) == 1, done.stderr
    assert f"holds no data ({len(left)} bytes" in error[0] and "export or copy it again" in error[0], error[0]
