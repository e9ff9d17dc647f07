"""Review labels against the events they are about: contradictions refused before they are written
and settled by labelling events together, paths that hold from any working folder, evidence checked
against the sha256 its event recorded, torn events logs, a label file given as the events log, and
the reviewer's name.

The events and evidence come from a real `mrkd run` (subprocess, the tiny exported model, relative
--events/--evidence paths as an operator types them); `mrkd review` runs as a subprocess from another
folder; POST /review goes through the page's LineControl. Hashes are recomputed here with hashlib.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime_fixtures import defective_frame, export_tiny_model, normal_frame
from test_review import by_event
from mrkd.runtime.review import DEFECT, GOOD, LABEL_SCHEMA_VERSION, ReviewError, ReviewLabel, UnlabellableError, \
    find_conflicts, label_image, last_per_image, latest_labels, make_label, now_iso, read_labels, read_review_events

TOKEN = "review-rules-token-0123"


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def mrkd(*args, cwd=None, timeout=120):
    code = f"import sys\nfrom mrkd.cli import main\nsys.argv[0] = 'mrkd'\nmain({list(map(str, args))!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def one_error(done, *needles) -> str:
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, done.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """`mrkd run` started in its own folder with relative --events/--evidence (10 frames, every third
    defective). mrkd now records each event's evidence by its absolute path; the log is then rewritten
    with the paths relative to that folder, as mrkd wrote them before, which these rules must still
    follow (a log written by an older version)."""
    root = tmp_path_factory.mktemp("rules")
    run = root / "line"
    (run / "frames").mkdir(parents=True)
    export_tiny_model(run / "model.onnx")
    rng = np.random.default_rng(0)
    for i in range(10):
        cv2.imwrite(str(run / "frames" / f"f{i:02d}.png"), defective_frame(rng) if i % 3 == 2 else normal_frame(rng))
    done = mrkd("run", "model.onnx", "--source", "frames", "--cooldown", "0", "--events", "events.jsonl",
                "--evidence", "evidence", "--status-every", "0", cwd=run, timeout=300)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert len(events) == 3 and all(Path(e["evidence"]) == run.resolve() / "evidence" / e["camera"] /
                                    f"{e['event_id']}.png" for e in events), events
    events = [{**e, "evidence": str(Path(e["evidence"]).relative_to(run.resolve()))} for e in events]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run, events


def copy_run(run: Path, into: Path) -> Path:
    """A copy of the run's folder (each test changes its own)."""
    shutil.copytree(run, into, ignore=shutil.ignore_patterns("frames", "model.onnx*"))
    return into


def with_twin(folder: Path, event: dict) -> dict:
    """Append to the copy's events log a second event whose evidence is a byte copy of ``event``'s
    (the same image, as when one part passes the camera twice)."""
    twin = dict(event, event_id=event["event_id"] + "-twin",
                evidence=str(Path(event["evidence"]).with_name(event["event_id"] + "-twin.png")))
    shutil.copy(folder / event["evidence"], folder / twin["evidence"])
    with open(folder / "events.jsonl", "a") as log:
        log.write(json.dumps(twin) + "\n")
    return twin


def twinned_run(run_dir, tmp_path):
    """A copy of the run whose first event has a twin (same image): (folder, first event, its id, the
    twin's id, events log, label file)."""
    folder = copy_run(run_dir[0], tmp_path / "run")
    first = run_dir[1][0]
    twin = with_twin(folder, first)
    return folder, first, first["event_id"], twin["event_id"], folder / "events.jsonl", folder / "labels.jsonl"


def test_a_contradicting_mark_is_refused_unwritten_and_marking_both_together_settles_it(run_dir, tmp_path):
    folder, first, a, b, log, labels = twinned_run(run_dir, tmp_path)
    assert mrkd("review", log, "--labels", labels, "--mark", a, "--as", "good").returncode == 0
    before = labels.read_bytes()
    error = one_error(mrkd("review", log, "--labels", labels, "--mark", b, "--as", "defect"),
                      "nothing written", f"under event {a}", f"--mark {b} --mark {a} --as defect")
    assert sha(folder / first["evidence"])[:12] in error
    assert labels.read_bytes() == before                         # refused before anything was written
    # the hint's command (it changes a's standing label, so it says --replace) settles it
    done = mrkd("review", log, "--labels", labels, "--mark", b, "--mark", a, "--as", "defect", "--replace")
    assert done.returncode == 0, done.stderr
    latest = by_event(latest_labels(read_labels(labels)))        # usable: no contradiction left
    assert {latest[a].label, latest[b].label} == {DEFECT} and latest[a].image_sha256 == latest[b].image_sha256


def test_a_file_that_holds_a_contradiction_is_listed_refit_refuses_it_one_mark_settles_it(run_dir, tmp_path):
    folder, first, a, b, log, labels = twinned_run(run_dir, tmp_path)
    image = folder / first["evidence"]
    # written by hand (or an older mrkd): the same image good under one event, defect under the other
    lines = [make_label(a, image, GOOD, who="ann"), make_label(b, image, DEFECT, who="bob")]
    labels.write_text("".join(json.dumps(label.__dict__) + "\n" for label in lines))
    with pytest.raises(ReviewError, match=f"labelled 'good' \\(event {a}\\) and 'defect' \\(event {b}\\)"):
        latest_labels(read_labels(labels))                       # what refit reads
    listed = mrkd("review", log, "--labels", labels)
    assert listed.returncode == 0, listed.stderr
    row_b = next(line for line in listed.stdout.splitlines() if line.startswith(b + " "))
    assert "CONFLICT" in row_b and a in row_b
    assert f"--mark {a} --mark {b} --as good|defect --replace" in listed.stdout
    # relabelling one side settles it (confirmed: it changes b's label): accepted although the file held a
    # contradiction
    done = mrkd("review", log, "--labels", labels, "--mark", b, "--as", "good", "--who", "carl", "--replace")
    assert done.returncode == 0, done.stderr
    assert not find_conflicts(last_per_image(read_labels(labels)))
    assert by_event(latest_labels(read_labels(labels)))[b].who == "carl"


def test_page_review_refuses_a_contradiction_with_409_and_settles_a_list_of_events(run_dir, tmp_path):
    from mrkd.runtime.control import LineControl
    folder = copy_run(run_dir[0], tmp_path / "run")
    first = run_dir[1][0]
    twin = with_twin(folder, first)
    labels = tmp_path / "labels.jsonl"
    control = LineControl(TOKEN, labels, folder / "events.jsonl", folder / "evidence")

    def post(body) -> tuple:
        return control.handle_post("/review", {"Authorization": f"Bearer {TOKEN}"}, json.dumps(body).encode())
    assert post({"event_id": first["event_id"], "label": "good"})[0] == 200
    code, answer = post({"event_id": twin["event_id"], "label": "defect"})
    assert code == 409 and first["event_id"] in answer["error"] and "nothing written" in answer["error"]
    assert len(read_labels(labels)) == 1
    # settling changes first's standing label: asked first (409 naming it), then confirmed with replace
    code, answer = post({"event_id": [twin["event_id"], first["event_id"]], "label": "defect"})
    assert code == 409 and [e["event_id"] for e in answer["existing"]] == [first["event_id"]], answer
    code, answer = post({"event_id": [twin["event_id"], first["event_id"]], "label": "defect", "replace": True})
    assert code == 200 and [s["event_id"] for s in answer["saved"]] == [twin["event_id"], first["event_id"]]
    assert {l.label for l in latest_labels(read_labels(labels)).values()} == {DEFECT}
    for who in ("ann\nforged line", "x" * 101, "\t"):
        code, answer = post({"event_id": first["event_id"], "label": "good", "who": who})
        assert code == 400 and "who" in answer["error"], (who, answer)
    assert post({"event_id": [], "label": "good"})[0] == 400
    assert len(read_labels(labels)) == 3                          # nothing of the refused ones


def test_labels_made_from_another_folder_find_their_images_from_any_folder(run_dir, tmp_path):
    """The events name evidence relative to where `mrkd run` ran; `mrkd review` runs elsewhere, the
    label file lives in a subfolder: the label keeps the image's absolute path."""
    run, events = run_dir
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    labels = tmp_path / "review" / "labels.jsonl"
    log = run / "events.jsonl"
    listed = mrkd("review", log, "--labels", labels, "--evidence", tmp_path / "no-such-folder", cwd=elsewhere)
    assert listed.returncode == 0, listed.stderr
    assert "NO EVIDENCE IMAGE" not in listed.stdout
    assert f"image {run / events[1]['evidence']}" in listed.stdout
    done = mrkd("review", log, "--labels", labels, "--mark", events[1]["event_id"], "--as", "good", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    [label] = read_labels(labels)
    assert Path(label.image) == run / events[1]["evidence"] and label.image_sha256 == events[1]["evidence_sha256"]


def test_an_older_label_files_relative_image_is_found_beside_the_labels_or_the_events_log(run_dir, tmp_path,
                                                                                            monkeypatch):
    run, events = run_dir
    monkeypatch.chdir(tmp_path)
    made = make_label(events[0]["event_id"], run / events[0]["evidence"], GOOD, who="ann")
    old = ReviewLabel(**{**made.__dict__, "image": events[0]["evidence"]})     # as an older mrkd wrote it
    assert label_image(old, run / "labels.jsonl") == run / events[0]["evidence"]
    found = label_image(old, tmp_path / "sub" / "labels.jsonl", run / "events.jsonl")
    assert found == run / events[0]["evidence"] and found.is_file()
    assert not label_image(old, tmp_path / "sub" / "labels.jsonl").is_file()      # no events log: not found


def test_a_labels_absolute_image_is_found_after_the_work_folder_moved(run_dir, tmp_path):
    """Labels name images by absolute path: a line's folder moved (or copied to another machine) keeps
    working, the image found by its last parts beside the labels; one with other bytes there is still
    caught by the label's sha256 (its reader's check)."""
    run, events = run_dir
    made = make_label(events[0]["event_id"], run / events[0]["evidence"], GOOD, who="ann")
    assert Path(made.image).is_absolute()
    moved = copy_run(run, tmp_path / "elsewhere" / "line")
    gone = ReviewLabel(**{**made.__dict__, "image": str(tmp_path / "old-place" / events[0]["evidence"])})
    found = label_image(gone, moved / "labels.jsonl")
    assert found == moved / events[0]["evidence"] and sha(found) == made.image_sha256
    assert not label_image(gone, tmp_path / "nowhere" / "labels.jsonl").is_file()   # not found: the old path


def test_evidence_changed_since_the_run_is_listed_and_cannot_be_labelled(run_dir, tmp_path):
    from mrkd.runtime.control import LineControl
    folder = copy_run(run_dir[0], tmp_path / "run")
    event = run_dir[1][2]
    image = folder / event["evidence"]
    image.write_bytes(image.read_bytes() + b"\0")                 # touched after the run
    log, labels = folder / "events.jsonl", folder / "labels.jsonl"
    listed = mrkd("review", log, "--labels", labels)
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[:-1]}
    assert "CHANGED SINCE THE RUN" in rows[event["event_id"]]
    assert "CHANGED" not in rows[run_dir[1][0]["event_id"]]
    one_error(mrkd("review", log, "--labels", labels, "--mark", event["event_id"], "--as", "good"),
              "changed since the run", sha(image)[:12], event["evidence_sha256"][:12])
    control = LineControl(TOKEN, labels, log, folder / "evidence")
    code, answer = control.handle_post("/review", {"Authorization": f"Bearer {TOKEN}"},
                                       json.dumps({"event_id": event["event_id"], "label": "good"}).encode())
    assert code == 409 and "changed since the run" in answer["error"]
    with pytest.raises(UnlabellableError, match="changed since the run"):
        make_label(event["event_id"], image, GOOD, expected_sha256=event["evidence_sha256"])
    assert not labels.exists() or not read_labels(labels)


def test_events_log_with_a_torn_last_line_is_read_garbage_elsewhere_and_label_files_are_refused(run_dir, tmp_path,
                                                                                               caplog):
    run, events = run_dir
    whole = (run / "events.jsonl").read_bytes()
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(whole + b'{"event_id": "2026-cut-off", "sco')     # `mrkd run` killed mid-write
    with caplog.at_level("WARNING"):
        assert [e["event_id"] for e in read_review_events(torn)] == [e["event_id"] for e in events]
    assert "torn last line" in caplog.text
    listed = mrkd("review", torn, "--labels", tmp_path / "labels.jsonl")
    assert listed.returncode == 0 and "3 of 3 event(s)" in listed.stdout, listed.stderr
    middle = tmp_path / "middle.jsonl"
    lines = whole.decode().splitlines()
    middle.write_text(lines[0] + "\n{\"event_id\": \"cut\n" + "\n".join(lines[1:]) + "\n")
    one_error(mrkd("review", middle, "--labels", tmp_path / "labels.jsonl"), "middle.jsonl:2: not a JSON line")
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps(make_label(events[0]["event_id"], run / events[0]["evidence"], GOOD,
                                            who="ann").__dict__) + "\n")
    one_error(mrkd("review", labels, "--labels", tmp_path / "other.jsonl"), "labels.jsonl", "label file")
    assert not (tmp_path / "other.jsonl").exists()


def test_who_is_one_printable_line_and_an_older_files_odd_who_is_listed_escaped(run_dir, tmp_path):
    run, events = run_dir
    log, labels = run / "events.jsonl", tmp_path / "labels.jsonl"
    for who in ("ann\nbob", "x" * 101, " "):
        one_error(mrkd("review", log, "--labels", labels, "--mark", events[0]["event_id"], "--as", "good",
                       "--who", who), "who must be one printable line")
    assert not labels.exists() or not read_labels(labels)
    made = make_label(events[0]["event_id"], run / events[0]["evidence"], GOOD, who="ann")
    odd = {**made.__dict__, "who": "ann\nbob", "when": now_iso()}
    labels.write_text(json.dumps(odd) + "\n")
    listed = mrkd("review", log, "--labels", labels)
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 4 and "by ann\\nbob]" in listed.stdout


def test_the_page_finds_the_events_a_review_names_as_a_full_parse_of_the_log_does(tmp_path):
    """POST /review looks only into log lines that hold a wanted id's JSON text; checked against parsing
    every line, on a log with decoys: the id inside another field, a torn last line, lines that are
    not JSON or not objects, ids JSON may spell two ways, and one id given twice."""
    from mrkd.runtime.control import LineControl
    rng = np.random.default_rng(5)
    odd = ['a"b', "a\\b", "é-1", "x/y", "tab\there"]
    ids = [f"20261205T1200{i:05d}-{rng.integers(1 << 30):x}" for i in range(300)] + odd
    lines = []
    for i, event_id in enumerate(ids):
        lines.append(json.dumps({"event_id": event_id, "time": "t", "camera": "cam", "score": float(i)},
                                ensure_ascii=bool(i % 2)))
        lines.append(json.dumps({"event_id": f"other-{i}", "note": f"see {event_id}"}))     # the id elsewhere
    lines += ["not json", "[1, 2]", '"just text"', json.dumps({"event_id": ids[3]})[:-5]]   # torn last line
    log = tmp_path / "events.jsonl"
    log.write_text("\n".join(lines), encoding="utf-8")
    control = LineControl(TOKEN, tmp_path / "labels.jsonl", log, tmp_path / "evidence")

    def every_line(wanted):
        found = {}
        for line in log.read_bytes().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event_id") in set(wanted):
                found[event["event_id"]] = event
        return found

    picks = [[ids[0]], [ids[7], ids[250], ids[7]], odd[:2], [odd[2], ids[3]], odd[3:], ["missing"], [], ids[::37]]
    for wanted in picks:
        assert control._find_events(list(wanted)) == every_line(wanted), wanted
    assert control._find_events([ids[3]])[ids[3]]["score"] == 3.0


def test_labels_from_mrkd_review_and_the_page_record_their_events_log_by_path_and_first_event(run_dir, tmp_path):
    """A label said which event it was about but not which events log, so refit could check the id only
    when given --events. Both writers now record the log: its absolute path and its first event's id
    (what names the log when its folder moved or another run's log took its path)."""
    from mrkd.runtime.control import LineControl
    folder = copy_run(run_dir[0], tmp_path / "run")
    events = run_dir[1]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    labels = tmp_path / "labels.jsonl"
    done = mrkd("review", os.path.relpath(folder / "events.jsonl", elsewhere), "--labels", labels, "--mark",
                events[1]["event_id"], "--as", "good", cwd=elsewhere)      # a relative path, as typed
    assert done.returncode == 0, done.stderr
    control = LineControl(TOKEN, labels, folder / "events.jsonl", folder / "evidence")
    code, answer = control.handle_post("/review", {"Authorization": f"Bearer {TOKEN}"},
                                       json.dumps({"event_id": events[2]["event_id"], "label": "good"}).encode())
    assert code == 200, answer
    first_in_log = json.loads((folder / "events.jsonl").read_text().splitlines()[0])["event_id"]
    assert first_in_log == events[0]["event_id"]
    written = [json.loads(line) for line in labels.read_text().splitlines()]
    for record in written:
        assert record["schema_version"] == LABEL_SCHEMA_VERSION
        assert record["events_log"] == str(folder / "events.jsonl")
        assert record["events_log_first_event"] == first_in_log
    assert answer["saved"]["events_log_first_event"] == first_in_log
    assert [label.log_ref.path for label in read_labels(labels)] == [str(folder / "events.jsonl")] * 2


def test_labelling_many_events_reads_the_events_logs_identity_once(run_dir, tmp_path, monkeypatch):
    """Every label records which log its event came from (its first event); POST /review and `mrkd review
    --mark` label up to MAX_MARKS events at once and read that once, not once per event."""
    import mrkd.runtime.review as review
    from mrkd.review_cli import mark_events
    from mrkd.runtime.control import LineControl
    folder = copy_run(run_dir[0], tmp_path / "run")
    log = folder / "events.jsonl"
    first = json.loads(log.read_text().splitlines()[0])["event_id"]
    ids = [e["event_id"] for e in run_dir[1]]
    reads = []
    real = review.first_event_id
    monkeypatch.setattr(review, "first_event_id", lambda path: reads.append(path) or real(path))

    control = LineControl(TOKEN, tmp_path / "page.jsonl", log, folder / "evidence")
    code, answer = control.handle_post("/review", {"Authorization": f"Bearer {TOKEN}"},
                                       json.dumps({"event_id": ids, "label": "good"}).encode())
    assert code == 200 and [s["event_id"] for s in answer["saved"]] == ids, answer
    assert {s["events_log_first_event"] for s in answer["saved"]} == {first}
    assert len(reads) == 1, reads

    reads.clear()
    mark_events(log, tmp_path / "cli.jsonl", folder / "evidence", ids, "defect", "", "ann", None)
    made = read_labels(tmp_path / "cli.jsonl")
    assert [l.event_id for l in made] == ids and {l.events_log_first_event for l in made} == {first}
    assert len(reads) == 1, reads


def next_days_log(run_dir, tmp_path) -> tuple:
    """The line restarted with a new events log (a new day's file, a rotated log) that keeps the old
    label file: its one event judged the same image as the first day's first event. (first day's log,
    its first event, the new log, its event, the label file)."""
    day1 = copy_run(run_dir[0], tmp_path / "day1")
    first = run_dir[1][0]
    day2 = tmp_path / "day2"
    (day2 / "evidence" / first["camera"]).mkdir(parents=True)
    again = dict(first, event_id=first["event_id"] + "-day2",
                 evidence=str(day2 / "evidence" / first["camera"] / f"{first['event_id']}-day2.png"))
    shutil.copy(day1 / first["evidence"], again["evidence"])
    (day2 / "events.jsonl").write_text(json.dumps(again) + "\n")
    return day1 / "events.jsonl", first, day2 / "events.jsonl", again, tmp_path / "labels.jsonl"


def test_a_contradiction_with_a_label_of_an_earlier_events_log_is_settled_by_the_command_it_prints(
        run_dir, tmp_path):
    """The label file outlives the events log (a new log per day, logrotate). The refusal of a label that
    contradicts the same image's label under the earlier log names both events and the command that labels
    them together; that command, given the new log, answered "no event" for the earlier log's event: the
    advice could not be followed. The event is found in the log its standing label recorded."""
    day1, first, day2, again, labels = next_days_log(run_dir, tmp_path)
    assert mrkd("review", day1, "--labels", labels, "--mark", first["event_id"], "--as", "good").returncode == 0
    error = one_error(mrkd("review", day2, "--labels", labels, "--mark", again["event_id"], "--as", "defect"),
                      "nothing written", f"under event {first['event_id']}")
    advice = error.split("label them together: ", 1)[1].split()
    assert advice[:2] == ["mrkd", "review"], error
    done = mrkd(*advice[1:])
    assert done.returncode == 0, done.stderr
    latest = by_event(latest_labels(read_labels(labels)))
    assert {latest[first["event_id"]].label, latest[again["event_id"]].label} == {DEFECT}
    # each label records the log its own event is in, and its own image
    assert latest[first["event_id"]].events_log == str(day1)
    assert latest[again["event_id"]].events_log == str(day2)
    assert latest[again["event_id"]].image == again["evidence"]


def test_the_pages_together_list_may_name_an_event_of_an_earlier_events_log(run_dir, tmp_path):
    """POST /review's 409 names the events to label together, one of them from the label file's earlier
    events log; the list sent back (the page's "label them together" button) was answered 404."""
    from mrkd.runtime.control import LineControl
    day1, first, day2, again, labels = next_days_log(run_dir, tmp_path)
    control = LineControl(TOKEN, labels, day2, day2.parent / "evidence")

    def post(body) -> tuple:
        return control.handle_post("/review", {"Authorization": f"Bearer {TOKEN}"}, json.dumps(body).encode())
    assert mrkd("review", day1, "--labels", labels, "--mark", first["event_id"], "--as", "good").returncode == 0
    code, answer = post({"event_id": again["event_id"], "label": "defect"})
    assert code == 409 and answer["together"] == [again["event_id"], first["event_id"]], answer
    code, answer = post({"event_id": answer["together"], "label": "defect", "replace": True})
    assert code == 200, answer
    assert [(s["event_id"], s["events_log"]) for s in answer["saved"]] == [(again["event_id"], str(day2)),
                                                                          (first["event_id"], str(day1))]
    assert post({"event_id": [again["event_id"], "no-such-event"], "label": "good"})[0] == 404
