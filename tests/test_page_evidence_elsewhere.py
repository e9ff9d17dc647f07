"""The evidence of a run's alarms, on the page of a later run of the same line started from another folder
with the same files named by other paths (a service's WorkingDirectory changed, an operator starting it by
hand, the line folder moved to another disk, a link in the path): the rows rebuilt from the events log
showed "no image" (/alarm/<id>.jpg 404, "... is outside <the --evidence folder>") though the files were in
the run's --evidence folder. An event's evidence that is not below that folder as written is looked up as
its <camera>/<file> inside it (evidence.py's layout), and served only with the sha256 the event recorded.

Two real `mrkd run`s of a tiny model (tests/runtime_fixtures.py); the page over HTTP; `mrkd review`.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from runtime_fixtures import build_tiny_model, normal_frame, normal_then_defective
from test_review_page import hello

HOST = "127.0.86.77"


def mrkd(*args: str) -> list:
    return [sys.executable, "-c", "from mrkd.cli import main; main()", *args]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def first_run(root: Path) -> tuple:
    """`mrkd run` of a line folder ``root/data/line`` named through the link ``root/srv`` (as /srv/line
    -> /data/line): 2 alarms, their evidence under srv/line/evidence as the run was told. (line, events)."""
    data, line = root / "data", root / "data" / "line"
    (line / "frames").mkdir(parents=True)
    (line / "calm").mkdir()
    os.symlink(data, root / "srv")
    for i, frame in enumerate(normal_then_defective(1, 2)):
        cv2.imwrite(str(line / "frames" / f"f{i}.png"), frame)
    cv2.imwrite(str(line / "calm" / "a.png"), normal_frame(np.random.default_rng(5)))   # no alarm: run 2's source
    build_tiny_model(line / "tiny.onnx")
    named = root / "srv" / "line"
    run = subprocess.run(mrkd("run", str(named / "tiny.onnx"), "--source", "frames", "--cooldown", "0",
                              "--events", str(named / "ev.jsonl"), "--evidence", str(named / "evidence")),
                         cwd=line, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    events = [json.loads(row) for row in (line / "ev.jsonl").read_text().splitlines()]
    assert len(events) == 2 and all(e["evidence"].startswith(str(named / "evidence")) for e in events)
    return line, events


def page_of_second_run(line: Path, elsewhere: Path, check) -> str:
    """`mrkd run` of ``line`` from ``elsewhere``, its files named relative to it, with --http; ``check``
    is called with the page's URL while it runs. The run's output."""
    port = free_port()
    given = os.path.relpath(line, elsewhere)
    run = subprocess.Popen(mrkd("run", f"{given}/tiny.onnx", "--source", f"{given}/calm", "--loop", "--fps", "2",
                                "--events", f"{given}/ev.jsonl", "--evidence", f"{given}/evidence",
                                "--http", f"{HOST}:{port}", "--status-every", "0"),
                           cwd=elsewhere, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 60
        while not (_listening(url) and hello(url)["alarms"]):      # the rows rebuilt from the log at the start
            if run.poll() is not None or time.monotonic() > deadline:
                run.kill()
                pytest.fail(f"the second run's page did not come up: {run.communicate()[0]}")
            time.sleep(0.2)
        check(url)
    finally:
        run.send_signal(2)
        output = run.communicate(timeout=60)[0]
    return output


def _listening(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/healthz", timeout=2).close()
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def served_as_evidence(url: str, event: dict, evidence: Path) -> None:
    """/alarm/<id>.jpg is the JPEG of the file ``evidence`` (which has the event's sha256)."""
    status, body = get(f"{url}/alarm/{event['event_id']}.jpg")
    assert status == 200, body[:200]
    served = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), np.float32)
    lossless = np.asarray(Image.open(evidence).convert("RGB"), np.float32)
    # the frames are noise, which JPEG keeps loosely: the same image correlates, another one does not
    correlation = np.corrcoef(served.ravel(), lossless.ravel())[0, 1]
    assert served.shape == lossless.shape and correlation > 0.8, correlation


@pytest.mark.parametrize("how", ["by its real path", "moved", "an older log's relative paths"])
def test_a_restart_from_another_folder_shows_the_earlier_alarms_evidence(tmp_path, how):
    line, events = first_run(tmp_path)
    if how == "moved":              # the line's folder on another disk: the paths the events name are gone
        shutil.move(str(line), str(tmp_path / "disk2"))
        line = tmp_path / "disk2"
    elif how == "an older log's relative paths":   # mrkd before c55174d: relative to where the run ran
        rows = [dict(e, evidence=os.path.relpath(e["evidence"], tmp_path / "srv" / "line")) for e in events]
        assert all(row["evidence"].startswith("evidence/cam0/") for row in rows)
        (line / "ev.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def check(url: str) -> None:
        shown = [alarm["event_id"] for alarm in hello(url)["alarms"]]
        assert sorted(shown) == sorted(e["event_id"] for e in events)      # the rows rebuilt from the log
        for event in events:
            served_as_evidence(url, event, line / "evidence" / "cam0" / f"{event['event_id']}.png")
    output = page_of_second_run(line, elsewhere, check)
    assert "not served" not in output, output
    listed = subprocess.run(mrkd("review", os.path.relpath(line / "ev.jsonl", elsewhere), "--labels", "labels.jsonl"),
                            cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    images = {row.split()[0]: Path(re.search(r"  image (\S+)  \[", row).group(1)).resolve()
              for row in listed.stdout.splitlines()[:-1]}
    assert images == {e["event_id"]: (line / "evidence" / "cam0" / f"{e['event_id']}.png").resolve() for e in events}, \
        listed.stdout


def test_a_file_of_the_same_name_with_another_hash_is_never_shown(tmp_path):
    """The file found as <camera>/<file> in the run's --evidence folder is another image (a folder of
    another line copied over): not served, and the warning says why."""
    line, events = first_run(tmp_path)
    shutil.move(str(line), str(tmp_path / "disk2"))
    line = tmp_path / "disk2"
    other = line / "evidence" / "cam0" / f"{events[0]['event_id']}.png"
    other.unlink()
    cv2.imwrite(str(other), normal_frame(np.random.default_rng(9)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def check(url: str) -> None:
        assert get(f"{url}/alarm/{events[0]['event_id']}.jpg")[0] == 404
        served_as_evidence(url, events[1], line / "evidence" / "cam0" / f"{events[1]['event_id']}.png")
    output = page_of_second_run(line, elsewhere, check)
    said = [row for row in output.splitlines() if "not served" in row]
    assert len(said) == 1 and events[0]["event_id"] in said[0] and "another sha256" in said[0], output


def test_each_camera_of_a_part_is_shown_from_its_own_camera_folder_after_the_line_folder_moved(tmp_path):
    """An NG part of two cameras (one row each): after the line's folder moved, each row's image is its
    own camera's file, looked up as <camera>/<event_id>.png below the new folder (the outputs of
    test_review_page_labels.Line, as `mrkd run` builds them)."""
    from test_review_page_labels import Line
    first = Line(tmp_path / "before", cameras=("top", "side"))
    try:
        images = first.part("P1", flagged=("top",))
    finally:
        first.stop()
    shutil.move(str(tmp_path / "before"), str(tmp_path / "after"))
    again = Line(tmp_path / "after", cameras=("top", "side"))
    try:
        event = json.loads((tmp_path / "after" / "events.jsonl").read_text())
        assert all(judged["evidence"].startswith(str(tmp_path / "before")) for judged in event["cameras"])
        for camera, image in images.items():
            status, body = get(f"{again.server.url}/alarm/{event['event_id']}.jpg?camera={camera}")
            assert status == 200, body[:200]
            served = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), np.float32).ravel()
            # faint noise, which JPEG keeps loosely (~0.4 with its own frame): its own camera's, not the other's
            own, other = (np.corrcoef(served, frame[:, :, ::-1].astype(np.float32).ravel())[0, 1]
                          for frame in (image, *(i for c, i in images.items() if c != camera)))
            assert own > 0.25 and abs(other) < 0.1, (camera, own, other)
    finally:
        again.stop()
