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


def test_a_given_folder_with_the_users_own_ok_images_loses_none_of_them(tmp_path):
    """`--evidence` given a folder that already holds someone's images in an ``<x>/ok/`` folder (an OK/NG
    data set): over the budget, only the OK samples an earlier run wrote are deleted (the old code took
    every ``*/ok/*.png`` for one and deleted the user's images, oldest first, without a word)."""
    model = build_tiny_model(tmp_path / "m.onnx")
    video = write_video(tmp_path / "v.avi", normal_then_defective(2, 3), fps=25)
    folder = tmp_path / "parts"
    theirs = [folder / "washer" / "ok" / f"img_{i}.png" for i in range(3)]
    for i, path in enumerate(theirs):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(400_000))                 # 1.2 MB: over the 1 MiB budget on their own
        os.utime(path, (1_000_000 + i, 1_000_000 + i))        # older than anything mrkd writes
    earlier_sample = folder / "cam0" / "ok" / "0000000007.png"
    earlier_sample.parent.mkdir(parents=True)
    earlier_sample.write_bytes(os.urandom(1000))
    summary_path = tmp_path / "summary.json"
    done = subprocess.run(MRKD + ["run", str(model), "--source", str(video), "--cooldown", "0", "--status-every", "0",
                                  "--evidence", str(folder), "--evidence-max-mb", "1", "--summary", str(summary_path)],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert all(path.is_file() and path.stat().st_size == 400_000 for path in theirs), list(folder.rglob("*"))
    assert not earlier_sample.exists()                        # mrkd's own OK sample still goes first
    assert len(list((folder / "cam0").glob("*.png"))) == 3    # every alarm's evidence written
    assert json.loads(summary_path.read_text())["outputs"]["evidence"]["state"] == "over budget"
