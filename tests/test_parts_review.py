"""Operator review of NG parts judged by a live triggered run (issue 23).

`mrkd run` runs as a subprocess against Aravis' GigE Vision simulator (arv-fake-gv-camera-0.8 over
UDP on loopback, as in test_gige.py), software-triggered from stdin, with --evidence, --http, a
control token and a label file. Its NG parts' lossless evidence is read back from disk: the runtime's
Detector scores each PNG to the score the live run logged (so it is the very image judged). Then
POST /review without a token and with a wrong one is refused and writes nothing; with the token one
part is labelled, and `mrkd review` labels another from the terminal. Each label line names its
part's event id, the camera and the sha256 of the evidence file on disk (hashlib, here).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import cv2
import pytest

from runtime_fixtures import build_tiny_model
from test_gige import simulator  # noqa: F401 - the fixture
from test_parts_swap import LiveRun, _events, wait_until
from test_review import _post, mrkd, one_error

from mrkd.benchmarks.mosquitto import free_port
from mrkd.runtime.detector import Detector
from mrkd.runtime.metadata import file_sha256
from mrkd.runtime.review import DEFECT, GOOD, read_labels

TOKEN = "gige-review-control-token"


def _page_says_up(url: str) -> bool:
    """The operator page lists the camera, up (the line has opened it and started)."""
    from test_review_page import hello
    try:
        status = hello(url)["status"]
    except OSError:
        return False
    return bool(status) and all(s["up"] for s in status)


@pytest.mark.slow
def test_an_ng_part_of_a_live_gige_run_is_labelled_with_the_token_only(simulator, tmp_path):  # noqa: F811
    camera = simulator("127.0.86.22", "REVIEWED")     # its own address (bench_parts has .30)
    # The tiny model's calibrated threshold is 0.1; the simulator's test pattern scores about 0.17 with
    # it, so every part is NG (checked below against the events, not assumed).
    model = build_tiny_model(tmp_path / "tiny.onnx")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    events, labels, evidence = tmp_path / "events.jsonl", tmp_path / "labels.jsonl", tmp_path / "evidence"
    run = LiveRun(tmp_path, [str(model), "--source", f"cam={camera.uri}", "--events", str(events), "--evidence",
                             str(evidence), "--http", f"127.0.0.1:{port}", "--control-token-env", "MRKD_TEST_TOKEN",
                             "--review-labels", str(labels)],
                  env={**os.environ, "MRKD_TEST_TOKEN": TOKEN, "PYTHONWARNINGS": "ignore"})
    try:
        wait_until(lambda: run.proc.poll() is not None or _page_says_up(url), 60, "the line up")   # then parts come
        assert run.proc.poll() is None, run.stderr()
        for i in range(4):
            run.part(f"G{i}")
        wait_until(lambda: len(_events(events)) >= 4, 60, "4 NG parts",
                   detail=lambda: f"{run.tail()}\nevents: {_events(events)}\nsimulator: {camera.messages()[-2000:]}")
        logged = _events(events)
        assert [(e["part_id"], e["verdict"], e["kind"]) for e in logged] == [(f"G{i}", "NG", "part") for i in range(4)]
        first, second = logged[1], logged[2]
        body = json.dumps({"event_id": first["event_id"], "label": "good", "note": "glare"}).encode()
        for token in (None, "not-the-" + TOKEN, TOKEN[:-1]):          # missing, wrong, a prefix
            code, answer = _post(url, "/review", body, token)
            assert code == 401 and "Bearer" in answer["error"], (token, code, answer)
        assert not labels.exists()                                   # refused: nothing written
        unknown = json.dumps({"event_id": "no-such-part", "label": "good"}).encode()
        assert _post(url, "/review", unknown, TOKEN)[0] == 404 and not labels.exists()
        code, answer = _post(url, "/review", body, TOKEN)
        assert code == 200, answer
        summary = run.finish()
    finally:
        run.kill()
    assert summary["parts"] == 4 and summary["verdicts"] == {"OK": 0, "NG": 4, "ERROR": 0}
    assert summary["cameras"]["cam"]["source"]["frames_read"] == 4
    # Every NG part's evidence: the lossless image the live model judged (the Detector scores it to the
    # logged score) under evidence/<camera>/<event id>.png.
    detector = Detector(model)
    try:
        for event in _events(events):
            image = cv2.imread(str(evidence / "cam" / f"{event['event_id']}.png"), cv2.IMREAD_UNCHANGED)
            assert image is not None and image.shape == (512, 512, 3)
            judged = event["cameras"][0]
            assert judged["camera"] == "cam" and judged["images"] == 1 and judged["anomalous"]
            # the part's event names its evidence as a frame alarm's does: path and the file's sha256
            path = evidence / "cam" / f"{event['event_id']}.png"
            assert judged["evidence"] == str(path)
            assert judged["evidence_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert float(detector(image).scores[0]) == pytest.approx(judged["score"], abs=1e-5)
            assert event["model_sha256"] == file_sha256(model)
    finally:
        detector.close()

    # The same review from the terminal, for another NG part of the same run (after the run, on its log).
    done = mrkd("review", events, "--labels", labels, "--mark", second["event_id"], "--as", "defect",
                "--who", "shift lead", "--evidence", evidence)
    assert done.returncode == 0, done.stderr
    listed = mrkd("review", events, "--labels", labels, "--evidence", evidence)
    assert listed.returncode == 0, listed.stderr
    ids = {e["event_id"] for e in logged}
    rows = {line.split()[0]: line for line in listed.stdout.splitlines() if line.split() and line.split()[0] in ids}
    assert sorted(rows) == sorted(ids), listed.stdout
    assert "NO EVIDENCE IMAGE" not in listed.stdout, listed.stdout
    assert "[good part (false alarm) by operator (page)]" in rows[first["event_id"]]
    assert "[defect confirmed by shift lead]" in rows[second["event_id"]]

    lines = labels.read_text().splitlines()
    assert len(lines) == 2                                            # one per accepted review, none for refusals
    saved = read_labels(labels)
    on_disk = {e["event_id"]: hashlib.sha256((evidence / "cam" / f"{e['event_id']}.png").read_bytes()).hexdigest()
               for e in (first, second)}
    assert [(s.event_id, s.label, s.camera, s.image_sha256) for s in saved] == [
        (first["event_id"], GOOD, "cam", on_disk[first["event_id"]]),
        (second["event_id"], DEFECT, "cam", on_disk[second["event_id"]])]
    assert (saved[0].who, saved[0].note, saved[1].who) == ("operator (page)", "glare", "shift lead")
    assert Path(saved[0].image) == Path(saved[1].image).parent / f"{first['event_id']}.png"
    assert on_disk[first["event_id"]] != on_disk[second["event_id"]]  # two images, not one labelled twice


def test_mrkd_review_labels_the_camera_of_a_part_it_is_told(tmp_path):
    """A part of two cameras, both flagged: `mrkd review --mark` needs --camera (one-line error without
    it or with an unknown one) and labels that camera's evidence (written by the real outputs' hooks,
    in the part runner's order: part_fields, then on_part)."""
    import time
    import numpy as np
    from runtime_fixtures import normal_frame
    from test_review_page import part_views, play_part
    from mrkd.runtime import OutputSettings, build_outputs
    from mrkd.runtime.outputs.base import CameraInfo, CameraJudgement, PartResult
    from mrkd.runtime.outputs.evidence import EvidenceSettings
    events, labels, evidence = tmp_path / "events.jsonl", tmp_path / "labels.jsonl", tmp_path / "ev"
    outputs = build_outputs(OutputSettings(events=str(events), evidence=EvidenceSettings(str(evidence))))
    rng = np.random.default_rng(9)
    images = {"left": normal_frame(rng), "right": normal_frame(rng)}
    part = PartResult(inspection_id=1, part_id="P-9", verdict="NG", score=0.4, threshold=0.1,
                      cameras=(CameraJudgement("left", 0.3, 0.1, True, images=1),
                               CameraJudgement("right", 0.4, 0.1, True, images=1)),
                      model_sha256="00" * 32, trigger_time=time.time(), event_id="part-ev-9")
    play_part(outputs, [CameraInfo(name, "memory", "m.onnx", "00" * 32, "onnxruntime", "fp32", 0.1, "test")
                        for name in images],
              part, part_views(images, 0.1))
    for output in outputs:
        output.on_stop()
    base = ("review", events, "--labels", labels, "--evidence", evidence, "--mark", "part-ev-9", "--as", "good")
    one_error(mrkd(*base), "part-ev-9", "'left', 'right'", "--camera")
    one_error(mrkd(*base, "--camera", "middle"), "no camera 'middle'")
    assert not labels.exists()
    done = mrkd(*base, "--camera", "left")
    assert done.returncode == 0, done.stderr
    [label] = read_labels(labels)
    image = evidence / "left" / "part-ev-9.png"
    assert (label.event_id, label.camera, label.label) == ("part-ev-9", "left", GOOD)
    assert label.image_sha256 == hashlib.sha256(image.read_bytes()).hexdigest()
    assert np.array_equal(cv2.imread(str(image)), images["left"])


def _listed_rows(events, labels, evidence, event_id: str) -> dict:
    """`mrkd review`'s listing: camera -> its row, of event ``event_id``'s rows."""
    listed = mrkd("review", events, "--labels", labels, "--evidence", evidence)
    assert listed.returncode == 0, listed.stderr
    return {line.split()[1]: line for line in listed.stdout.splitlines() if line.startswith(event_id + " ")}


def test_both_flagged_cameras_of_a_part_are_labelled_each_in_mrkd_review_and_refit_takes_both(tmp_path):
    """A part whose two cameras both flagged it: `mrkd review --mark E --camera left` and then `--camera
    right` label the two images (before, the second was refused as a change of the part's one label, and
    with --replace it took the first camera's label away). Both stand, each listed on its camera's row;
    changing one of them still needs --replace; refit's reader offers both images."""
    from test_review_page_labels import Line
    from mrkd.train.refit import reviewed_images
    line = Line(tmp_path, cameras=("left", "right"))
    try:
        line.part("part-ev-3", flagged=("left", "right"))
    finally:
        line.stop()
    events, labels, evidence = line.events, line.labels, line.evidence
    base = ("review", events, "--labels", labels, "--evidence", evidence, "--mark", "part-ev-3")
    done = mrkd(*base, "--camera", "left", "--as", "good")
    assert done.returncode == 0, done.stderr
    done = mrkd(*base, "--camera", "right", "--as", "defect", "--who", "shift lead")
    assert done.returncode == 0, done.stderr
    rows = _listed_rows(events, labels, evidence, "part-ev-3")
    assert sorted(rows) == ["left", "right"], rows
    assert "[good part (false alarm) by" in rows["left"] and "[defect confirmed by shift lead]" in rows["right"]
    assert all(str(evidence / camera / "part-ev-3.png") in rows[camera] for camera in rows), rows
    image = {camera: evidence / camera / "part-ev-3.png" for camera in ("left", "right")}
    assert [(l.camera, l.label, l.image_sha256) for l in read_labels(labels)] == [
        ("left", GOOD, hashlib.sha256(image["left"].read_bytes()).hexdigest()),
        ("right", DEFECT, hashlib.sha256(image["right"].read_bytes()).hexdigest())]
    reviewed = reviewed_images(labels)
    assert [Path(p) for p in reviewed.good] == [image["left"]] and [Path(p) for p in reviewed.defect] == \
        [image["right"]] and not reviewed.skipped
    # changing one camera's label still asks first (one line, nothing written); --replace changes that one only
    before = labels.read_bytes()
    one_error(mrkd(*base, "--camera", "left", "--as", "defect"),
              "event part-ev-3 is already labelled good part (false alarm)", "--replace")
    assert labels.read_bytes() == before
    done = mrkd(*base, "--camera", "left", "--as", "defect", "--replace")
    assert done.returncode == 0, done.stderr
    from mrkd.runtime.review import LabelKey, label_states
    states = label_states(read_labels(labels))
    assert {key: (s.current.label, s.replaced.label if s.replaced else None) for key, s in states.items()} == {
        LabelKey("part-ev-3", "left"): (DEFECT, GOOD), LabelKey("part-ev-3", "right"): (DEFECT, None)}
    assert sorted(Path(p) for p in reviewed_images(labels).defect) == sorted(image.values())


def _as_older_mrkd_wrote(labels: Path, schema_version: int) -> None:
    """The label file's lines as an older mrkd wrote them: ``schema_version`` 2, or 1 (no events log, and
    no camera: the event's one flagged camera)."""
    records = [json.loads(line) for line in labels.read_text().splitlines()]
    for record in records:
        record["schema_version"] = schema_version
        if schema_version == 1:
            for key in ("camera", "events_log", "events_log_first_event"):
                del record[key]
    labels.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_older_label_files_keep_their_meaning_one_label_per_event(tmp_path):
    """Schema 2 (one label per event): a part's label of camera right after one of camera left CHANGED
    the part's label (written with --replace), so left's stands no more. Schema 1 (no camera): the label
    is of the event's one flagged camera; its row shows it, relabelling that image asks first, the other
    camera's image is unlabelled."""
    from test_review_page import hello
    from test_review_page_labels import Line
    from mrkd.runtime.review import LabelKey, label_states
    from mrkd.train.refit import reviewed_images
    line = Line(tmp_path, cameras=("left", "right"))
    try:
        line.part("part-ev-4", flagged=("left", "right"))
        line.part("part-ev-5", flagged=("right",))
    finally:
        line.stop()
    events, labels, evidence = line.events, line.labels, line.evidence
    mark = ("review", events, "--labels", labels, "--evidence", evidence, "--mark")
    assert mrkd(*mark, "part-ev-4", "--camera", "left", "--as", "good").returncode == 0
    assert mrkd(*mark, "part-ev-4", "--camera", "right", "--as", "defect").returncode == 0
    _as_older_mrkd_wrote(labels, 2)
    states = label_states(read_labels(labels))
    [(key, state)] = states.items()
    assert key == LabelKey("part-ev-4", "right") and (state.current.label, state.replaced.camera) == (DEFECT, "left")
    right4 = evidence / "right" / "part-ev-4.png"
    reviewed = reviewed_images(labels)
    assert reviewed.good == () and [Path(p) for p in reviewed.defect] == [right4]
    rows = _listed_rows(events, labels, evidence, "part-ev-4")
    assert "[unlabelled]" in rows["left"] and "[defect confirmed by" in rows["right"], rows

    (tmp_path / "older").mkdir()
    older = Line(tmp_path / "older", cameras=("left", "right"))     # its own run, events and label file
    try:
        older.part("part-ev-5", flagged=("right",))
    finally:
        older.stop()
    events, labels, evidence = older.events, older.labels, older.evidence
    mark = ("review", events, "--labels", labels, "--evidence", evidence, "--mark", "part-ev-5")
    assert mrkd(*mark, "--as", "good").returncode == 0         # the flagged camera, right
    _as_older_mrkd_wrote(labels, 1)
    [label] = read_labels(labels)
    assert (label.camera, label.schema_version) == ("", 1)
    rows = _listed_rows(events, labels, evidence, "part-ev-5")
    assert "[good part (false alarm) by" in rows["right"] and "[unlabelled]" in rows["left"], rows
    restarted = Line(tmp_path / "older", cameras=("left", "right"))   # its page: rows from the log, labels from file
    try:
        shown = {a["camera"]: a["review"] for a in hello(restarted.server.url)["alarms"]}
    finally:
        restarted.stop()
    assert shown["left"] is None and (shown["right"]["label"], shown["right"]["who"]) == (GOOD, label.who), shown
    before = labels.read_bytes()
    one_error(mrkd(*mark, "--as", "defect"), "event part-ev-5 is already labelled good part (false alarm)", "--replace")
    one_error(mrkd(*mark, "--camera", "right", "--as", "defect"), "already labelled good part (false alarm)",
              "--replace")
    assert labels.read_bytes() == before
    done = mrkd(*mark, "--camera", "left", "--as", "defect")
    assert done.returncode == 0, done.stderr     # the other camera's image had no label
    reviewed = reviewed_images(labels, events={"part-ev-5": json.loads(events.read_text().splitlines()[0])})
    assert [Path(p) for p in reviewed.good] == [evidence / "right" / "part-ev-5.png"]
    assert [Path(p) for p in reviewed.defect] == [evidence / "left" / "part-ev-5.png"] and not reviewed.skipped


def test_a_label_that_names_no_image_of_its_event_is_left_out_of_refit(tmp_path):
    """Hand-written (or foreign) label lines whose camera is not one of the event's images: a camera the
    part does not have, a camera given for a free-run frame alarm of another camera, a schema 3 line
    naming no camera for a part whose two cameras flagged it. Their image (here a file that is no
    event's evidence, with its own sha256) cannot be checked against what the run recorded, and no row
    of the listing or the page shows them; refit's reader leaves them out, naming the label and why,
    whether the events log is the one each label records or the one given (--events). Before, each
    went into the bank unchecked."""
    import numpy as np
    from test_review_page_labels import Line
    from mrkd.runtime.review import events_log_ref
    from mrkd.train.refit import reviewed_images
    parts = Line(tmp_path / "parts", cameras=("left", "right"))
    try:
        parts.part("part-ev-6", flagged=("left", "right"))
    finally:
        parts.stop()
    (tmp_path / "free").mkdir()
    free = Line(tmp_path / "free")
    try:
        alarm = free.alarm()            # a frame alarm of camera cam0
    finally:
        free.stop()
    foreign = tmp_path / "foreign.png"
    cv2.imwrite(str(foreign), np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    sha = hashlib.sha256(foreign.read_bytes()).hexdigest()

    def line(events: Path, event_id: str, camera: str) -> str:
        ref = events_log_ref(events)
        return json.dumps({"event_id": event_id, "image_sha256": sha, "label": GOOD, "who": "someone",
                           "when": "2026-12-07T00:50:00.000+00:00", "note": "", "image": str(foreign),
                           "camera": camera, "events_log": ref.path, "events_log_first_event": ref.first_event,
                           "schema_version": 3}) + "\n"

    cases = {"an unknown camera": (parts.events, "part-ev-6", "top", "the part has no camera 'top'"),
             "no camera, two flagged": (parts.events, "part-ev-6", "", "the part has the cameras ['left', 'right']"),
             "another camera's frame alarm": (free.events, alarm, "cam9", "the alarm is camera 'cam0''s, not 'cam9''s")}
    for name, (events, event_id, camera, why) in cases.items():
        labels = tmp_path / f"{name}.jsonl"
        labels.write_text(line(events, event_id, camera))
        by_event = {json.loads(text)["event_id"]: json.loads(text) for text in events.read_text().splitlines()}
        for given in ({}, {"events": by_event, "events_path": events}):
            warned = []
            reviewed = reviewed_images(labels, warn=warned.append, **given)
            assert reviewed.good == () and reviewed.defect == (), (name, reviewed)
            [skipped] = reviewed.skipped
            assert (skipped.event_id, skipped.camera) == (event_id, camera) and why in skipped.reason, \
                (name, skipped.reason)
            assert any(why in warning for warning in warned), (name, warned)
