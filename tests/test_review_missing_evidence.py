"""Issue 23's hostile case "a reviewed image that no longer exists", at review time: an event whose
evidence image was written by the run and deleted since. `mrkd review` lists it as gone, refuses to
mark it in one line naming the missing file (it said "was `mrkd run` started with --evidence?", a
wrong lead for a run that was), the page's POST /review answers 409 with the same words, and no label
is written either way. (refit's side, a labelled image gone before the refit: tests/test_refit.py.)"""

from __future__ import annotations

import hashlib
import json

import cv2
import numpy as np

from test_review import mrkd, one_error
from mrkd.runtime.control import LineControl

TOKEN = "a-control-token-for-the-test"


def _run_folder(tmp_path):
    """An events log of two alarms, each with its evidence PNG as `mrkd run --evidence` writes it."""
    evidence = tmp_path / "evidence" / "cam0"
    evidence.mkdir(parents=True)
    lines = []
    for i, event_id in enumerate(("e1", "e2")):
        image = evidence / f"{event_id}.png"
        cv2.imwrite(str(image), np.full((16, 16, 3), 60 * i, np.uint8))
        lines.append(json.dumps({"event_id": event_id, "time": "2026-12-05T00:00:00Z", "camera": "cam0",
                                 "score": 2.0, "threshold": 1.0, "evidence": str(image),
                                 "evidence_sha256": hashlib.sha256(image.read_bytes()).hexdigest()}) + "\n")
    log = tmp_path / "events.jsonl"
    log.write_text("".join(lines))
    return log, evidence / "e1.png"


def test_evidence_deleted_since_the_run_is_listed_gone_and_cannot_be_labelled(tmp_path):
    log, gone = _run_folder(tmp_path)
    gone.unlink()
    labels = tmp_path / "labels.jsonl"
    listed = mrkd("review", log, "--labels", labels)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[:-1]}
    assert f"EVIDENCE IMAGE GONE ({gone}" in rows["e1"] and "GONE" not in rows["e2"], listed.stdout
    done = mrkd("review", log, "--labels", labels, "--mark", "e1", "--as", "good")
    one_error(done, "event e1", f"its evidence image {gone} no longer exists")
    assert "--evidence?" not in done.stderr
    assert not labels.exists()
    control = LineControl(TOKEN, labels, log, tmp_path / "evidence")
    code, answer = control.handle_post("/review", {"Authorization": f"Bearer {TOKEN}"},
                                       json.dumps({"event_id": "e1", "label": "defect"}).encode())
    assert code == 409 and f"its evidence image {gone} no longer exists" in answer["error"], (code, answer)
    assert not labels.exists()
    # the other event is labelled as usual
    assert mrkd("review", log, "--labels", labels, "--mark", "e2", "--as", "good").returncode == 0
    assert [json.loads(line)["event_id"] for line in labels.read_text().splitlines()] == ["e2"]


def test_the_listing_counts_labels_of_events_the_log_does_not_hold(tmp_path):
    """A label file that names events of another run (or a log given by mistake): the listing says how
    many of its labelled events this log does not hold, instead of passing over them in silence."""
    log, _ = _run_folder(tmp_path)
    labels = tmp_path / "labels.jsonl"
    assert mrkd("review", log, "--labels", labels, "--mark", "e2", "--as", "good").returncode == 0
    other = tmp_path / "other.jsonl"                 # another run's log: its events e7, e8 labelled too
    image = tmp_path / "other.png"
    cv2.imwrite(str(image), np.full((16, 16, 3), 200, np.uint8))
    other.write_text("".join(json.dumps({"event_id": e, "time": "2026-12-05T00:00:00Z", "camera": "cam0",
                                         "score": 2.0, "threshold": 1.0, "evidence": str(image)}) + "\n"
                             for e in ("e7", "e8")))
    assert mrkd("review", other, "--labels", labels, "--mark", "e7", "--mark", "e8", "--as", "good").returncode == 0
    listed = mrkd("review", log, "--labels", labels)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[-1].endswith(
        f"2 of 2 event(s); labels in {labels} (2 of its labelled event(s) are not in this log)"), listed.stdout
    alone = mrkd("review", other, "--labels", labels, "--unlabelled")
    assert alone.stdout.splitlines()[-1].endswith("(1 of its labelled event(s) are not in this log)"), alone.stdout


def test_evidence_of_a_run_started_elsewhere_is_found_from_any_folder(tmp_path):
    """`mrkd run` in a service's folder with a relative --evidence and the log in a subfolder; `mrkd
    review` from another folder. The event named the image relative to where the run ran, which nothing
    records: the listing said EVIDENCE IMAGE GONE for an image that was there, and it could not be
    labelled."""
    import subprocess
    import sys
    from runtime_fixtures import build_tiny_model, normal_then_defective
    line, elsewhere = tmp_path / "line", tmp_path / "elsewhere"
    (line / "frames").mkdir(parents=True)
    elsewhere.mkdir()
    for i, frame in enumerate(normal_then_defective(1, 2)):
        cv2.imwrite(str(line / "frames" / f"f{i}.png"), frame)
    model = build_tiny_model(line / "tiny.onnx")
    run = subprocess.run([sys.executable, "-c", "from mrkd.cli import main; main()", "run", str(model), "--source",
                          "frames", "--cooldown", "0", "--events", "logs/events.jsonl", "--evidence", "evidence"],
                         cwd=line, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    log = line / "logs" / "events.jsonl"
    events = [json.loads(row) for row in log.read_text().splitlines()]
    assert len(events) == 2 and all((line / "evidence" / "cam0" / f"{e['event_id']}.png").is_file() for e in events)
    labels = elsewhere / "labels.jsonl"
    listed = subprocess.run([sys.executable, "-c", "from mrkd.cli import main; main()", "review", str(log), "--labels",
                             str(labels)], cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "GONE" not in listed.stdout, listed.stdout + listed.stderr
    marked = subprocess.run([sys.executable, "-c", "from mrkd.cli import main; main()", "review", str(log), "--labels",
                             str(labels), "--mark", events[0]["event_id"], "--as", "good"],
                            cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert marked.returncode == 0, marked.stderr
    label = json.loads(labels.read_text())
    assert label["image"] == str(line / "evidence" / "cam0" / f"{events[0]['event_id']}.png")
    assert label["image_sha256"] == events[0]["evidence_sha256"]
