"""What a power cut leaves beside a line's files, met by the next `mrkd run` (real runs of the tiny model):
a file whose size reached the disk and whose data did not (all zeros), or one of size 0. Such a file
holds nothing of anyone's, so the run goes on with a one-line warning where it would have refused to
start forever (a supervised line restarting after every power cut); a file with data is still refused.
The append-only logs' zero-filled tails: test_power_cut_zero_tails.py."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from runtime_fixtures import build_tiny_model, normal_frame

MRKD = [sys.executable, "-c", "from mrkd.cli import main; main()"]


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """The tiny model and a folder of three good frames."""
    root = tmp_path_factory.mktemp("line")
    model = build_tiny_model(root / "m.onnx")
    frames = root / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(frames / f"{i}.png"), normal_frame(rng))
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
