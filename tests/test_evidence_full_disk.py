"""Issue 23's evidence on a full disk through the command line: `mrkd run --evidence` into a real tmpfs
filled to the brim. The line goes on (every frame judged, every alarm logged), the evidence that could
not be written is counted in the summary's output health and said on stderr naming the folder, and
each event says it has no evidence rather than naming a file that is not there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from runtime_fixtures import build_tiny_model, fill_up, normal_then_defective, small_tmpfs, write_video

MRKD = [sys.executable, "-c", "from mrkd.cli import main; main()"]


@pytest.mark.slow
def test_evidence_on_a_full_disk_is_counted_and_said_and_the_line_goes_on(tmp_path):
    model = build_tiny_model(tmp_path / "m.onnx")
    video = write_video(tmp_path / "v.avi", normal_then_defective(4, 20), fps=25)     # 4 OK frames, 20 alarms
    summary_path, events = tmp_path / "summary.json", tmp_path / "events.jsonl"
    with small_tmpfs(tmp_path / "full", "size=256k") as disk:
        fill_up(disk)
        folder = disk / "evidence"
        done = subprocess.run(MRKD + ["run", str(model), "--source", str(video), "--cooldown", "0",
                                      "--status-every", "0", "--events", str(events), "--evidence", str(folder),
                                      "--evidence-ok-every", "1", "--summary", str(summary_path)],
                              capture_output=True, text=True, timeout=180,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        summary = json.loads(summary_path.read_text())
        assert summary["frames"] == 24 and summary["alarms"] == 20                # scoring went on
        health = summary["outputs"]["evidence"]
        assert health["ok"] is False and health["sent"] == 0
        assert health["failed"] == 20 + 4, health                                 # every NG image and OK sample
        assert str(folder) in health["detail"] and "No space left" in health["detail"], health
        said = [line for line in done.stderr.splitlines() if "evidence" in line and str(folder) in line]
        assert 1 <= len(said) <= 2, done.stderr                                   # said, not once per frame
        logged = [json.loads(line) for line in events.read_text().splitlines()]
        assert len(logged) == 20
        assert all(e["evidence"] is None and e["evidence_sha256"] is None for e in logged), logged[0]
        assert not list(folder.rglob("*.png")) if folder.exists() else True
