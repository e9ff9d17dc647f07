"""`mrkd review`'s listing of a long events log, the CLI's own wording, and one order of a part's rows.

The part events are the real outputs' (the Line of test_review_page_labels: events log, evidence
writer, the page's OperatorServer, fed through their hooks); a long log is that log's part event
repeated under new event ids (as a QE probe did: 600 parts naming one evidence file). Hashing is
counted by wrapping runtime/review.py's ``image_sha256`` (the one function the listing and a label
hash an evidence image with); the hashes the tests compare with are hashlib's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import urllib.request
from pathlib import Path

import pytest

from test_review import mrkd, one_error
from test_review_page import hello
from test_review_page_labels import Line, mrkd_review

from mrkd import review_cli
from mrkd.runtime import review

PARTS = 600


def _counted_hashes(monkeypatch) -> dict:
    """path -> how many times the listing hashed it (the real hash is still taken)."""
    counts: dict = {}
    real = review.image_sha256

    def counting(path):
        counts[str(path)] = counts.get(str(path), 0) + 1
        return real(path)
    monkeypatch.setattr(review, "image_sha256", counting)
    return counts


def _long_log(tmp_path: Path) -> tuple:
    """A line's part event (two cameras, right flagged), then PARTS copies of it naming one evidence
    file for both cameras (as the probe's log), then 3 parts of their own: one whose image changed
    since the run, one whose image is gone, one as written. (events, labels, evidence, shared file,
    changed file, gone file)."""
    line = Line(tmp_path, cameras=("left", "right"))
    try:
        line.part("part-ev-0", flagged=("right",))
    finally:
        line.stop()
    [part] = [json.loads(text) for text in line.events.read_text().splitlines()]
    shared = line.evidence / "right" / "part-ev-0.png"
    sha = hashlib.sha256(shared.read_bytes()).hexdigest()
    changed, gone = tmp_path / "changed.png", tmp_path / "gone.png"
    shutil.copy(shared, changed)
    records = [part]
    for n in range(PARTS):
        copy = json.loads(json.dumps(part))
        copy["event_id"] = f"long-{n:04d}"
        for judged in copy["cameras"]:
            judged["evidence"], judged["evidence_sha256"] = str(shared), sha
        records.append(copy)
    for event_id, image in (("part-changed", changed), ("part-gone", gone)):
        copy = json.loads(json.dumps(part))
        copy["event_id"] = event_id
        for judged in copy["cameras"]:
            judged["evidence"], judged["evidence_sha256"] = str(image), sha
        records.append(copy)
    mine = json.loads(json.dumps(part))
    mine["event_id"] = "part-ev-last"
    for judged in mine["cameras"]:        # its images copied: the same as the run's, files of their own
        own = tmp_path / f"last-{judged['camera']}.png"
        shutil.copy(line.evidence / judged["camera"] / "part-ev-0.png", own)
        judged["evidence"] = str(own)
    records.append(mine)
    line.events.write_text("".join(json.dumps(r) + "\n" for r in records))
    changed.write_bytes(changed.read_bytes() + b"\0")      # after the run: its sha256 is not the recorded one
    return line.events, line.labels, line.evidence, shared, changed, gone


def _rows(output: str) -> dict:
    """(event id, camera) -> its row of the listing."""
    rows = {}
    for text in output.splitlines():
        words = text.split()
        if len(words) > 2 and words[2] == "score":
            rows[(words[0], words[1])] = text
    return rows


def test_the_listing_hashes_each_evidence_file_once_and_still_shows_changed_and_gone_images(tmp_path, monkeypatch):
    """600 two-camera parts naming one evidence file: the listing hashes that file once (before, 1200
    times: 30 s with 15 MB images), and a changed image and a gone one are still shown as such."""
    events, labels, evidence, shared, changed, gone = _long_log(tmp_path)
    counts = _counted_hashes(monkeypatch)
    code, output = mrkd_review(events, "--labels", labels, "--evidence", evidence, "--last", "0")
    assert code == 0, output
    assert counts and max(counts.values()) == 1, {p: n for p, n in counts.items() if n > 1}
    rows = _rows(output)
    assert len(rows) == 2 * (PARTS + 4), output[-2000:]
    long_rows = [text for (event_id, _), text in rows.items() if event_id.startswith("long-")]
    assert len(long_rows) == 2 * PARTS and all(f"image {shared}  [unlabelled]" in t for t in long_rows)
    for camera in ("left", "right"):
        assert f"image {changed}  CHANGED SINCE THE RUN" in rows[("part-changed", camera)]
        assert f"EVIDENCE IMAGE GONE ({gone}; cannot be labelled)" in rows[("part-gone", camera)]
        own = tmp_path / f"last-{camera}.png"
        assert f"image {own}  [unlabelled]" in rows[("part-ev-last", camera)]
    # a label is made of the image it names, hashed when it is made: the changed one is refused
    code, output = mrkd_review(events, "--labels", labels, "--evidence", evidence, "--mark", "part-changed",
                               "--as", "good")
    assert code != 0 and "changed since the run" in output and not labels.exists(), output
    code, output = mrkd_review(events, "--labels", labels, "--evidence", evidence, "--mark", "long-0007",
                               "--as", "good")
    assert code == 0, output
    assert json.loads(labels.read_text())["image_sha256"] == hashlib.sha256(shared.read_bytes()).hexdigest()


def test_last_n_lists_the_last_rows_and_hashes_only_their_images(tmp_path, monkeypatch):
    """--last N: the last N rows (after --unlabelled), and only their images are read."""
    events, labels, evidence, shared, changed, gone = _long_log(tmp_path)
    counts = _counted_hashes(monkeypatch)
    code, output = mrkd_review(events, "--labels", labels, "--evidence", evidence, "--last", "5")
    assert code == 0, output
    rows = _rows(output)
    assert list(rows) == [("part-changed", "right"), ("part-gone", "left"), ("part-gone", "right"),
                          ("part-ev-last", "left"), ("part-ev-last", "right")], output
    assert "CHANGED SINCE THE RUN" in rows[("part-changed", "right")]
    assert counts == {str(changed): 1, str(tmp_path / "last-left.png"): 1, str(tmp_path / "last-right.png"): 1}, \
        counts
    assert "5 of 1208 image(s) of 604 event(s)" in output and "--last 5" in output, output
    # labelled rows are left out before the last N are taken
    code, output = mrkd_review(events, "--labels", labels, "--evidence", evidence, "--mark", "part-ev-last",
                               "--camera", "left", "--as", "good")
    assert code == 0, output
    code, output = mrkd_review(events, "--labels", labels, "--evidence", evidence, "--unlabelled", "--last", "2")
    assert code == 0, output
    assert list(_rows(output)) == [("part-gone", "right"), ("part-ev-last", "right")], output
    one_error(mrkd("review", events, "--labels", labels, "--last", "-1"), "--last")


def test_the_listing_shows_the_last_50_rows_by_default_and_says_how_to_see_all(tmp_path, monkeypatch):
    """A log of 10,000 alarms listed 10,000 rows (3.3 s with 20 kB files; its summary scrolled away, and
    each row's image was read: minutes with full-size evidence). By default the last 50 rows now, only
    their images read, and a line says how many rows were left out and how to list them all (--last 0)."""
    events, labels, evidence, shared, changed, gone = _long_log(tmp_path)
    counts = _counted_hashes(monkeypatch)
    code, output = mrkd_review(events, "--labels", labels, "--evidence", evidence)
    assert code == 0, output
    rows = _rows(output)
    assert len(rows) == review_cli.DEFAULT_LAST == 50, output[-2000:]
    assert list(rows)[-2:] == [("part-ev-last", "left"), ("part-ev-last", "right")], output[-2000:]
    assert list(rows)[0] == (f"long-{PARTS - 22:04d}", "left"), list(rows)[:2]
    assert sum(counts.values()) == len(counts) == 4, counts       # shared, changed, last-left, last-right
    assert output.splitlines()[-1] == (
        f"50 of 1208 image(s) of 604 event(s) (the last 50 by default: 1158 earlier row(s) not listed; "
        f"--last 0 lists all); labels in {labels}"), output.splitlines()[-1]
    code, output = mrkd_review(events, "--labels", labels, "--evidence", evidence, "--last", "0")
    assert code == 0 and len(_rows(output)) == 1208, output[-2000:]
    assert output.splitlines()[-1] == f"1208 of 1208 image(s) of 604 event(s); labels in {labels}", output[-300:]


def test_mrkd_review_asks_for_camera_in_its_own_words(tmp_path):
    """A part both cameras flagged: the CLI says to give --camera NAME (before: the HTTP body's field,
    'give "camera" (--camera NAME)'); POST /review keeps its own wording."""
    from test_review_page_labels import post_review
    line = Line(tmp_path, cameras=("left", "right"))
    try:
        line.part("part-ev-2", flagged=("left", "right"))
        status, answer = post_review(line.server.url, {"event_id": "part-ev-2", "label": "good"})
    finally:
        line.stop()
    assert status == 400 and answer["error"].endswith("give \"camera\""), answer
    done = mrkd("review", line.events, "--labels", line.labels, "--evidence", line.evidence, "--mark", "part-ev-2",
                "--as", "good")
    one_error(done)
    [error] = [text for text in done.stderr.splitlines() if text.startswith("Error:")]
    assert error == "Error: event part-ev-2: the part has the cameras ['left', 'right']: give --camera NAME", error


def _alarms_as_sent(url: str, count: int, started) -> list:
    """(event id, camera) of the next ``count`` ``alarm`` records on /events, as they arrive; ``started``
    is called once the stream is open."""
    got = []
    with urllib.request.urlopen(url + "/events", timeout=10) as stream:
        started()
        for text in iter(stream.readline, b""):
            if text.startswith(b"data: "):
                record = json.loads(text[len(b"data: "):])
                if isinstance(record, dict) and "part_id" in record and record.get("event_id"):
                    got.append((record["event_id"], record["camera"]))
            if len(got) == count:
                return got
    return got


@pytest.mark.parametrize("cameras", [("left", "right"), ("right", "left")])
def test_a_parts_rows_are_in_one_order_live_and_after_a_restart(tmp_path, cameras):
    """A part's rows, top to bottom, are its cameras in the order its event lists them, on the live
    page (hello; and the alarms as sent, each put on top as page.html does) and on the page of a
    restarted run rebuilt from the events log, as `mrkd review` lists them. Before, the live page
    had them the other way round."""
    import threading
    line = Line(tmp_path, cameras=cameras)
    sent: list = []
    opened = threading.Event()
    reader = threading.Thread(target=lambda: sent.extend(_alarms_as_sent(line.server.url, 4, opened.set)),
                              daemon=True)
    try:
        hello(line.server.url)
        reader.start()
        assert opened.wait(10)
        line.part("part-ev-a", flagged=cameras)
        line.part("part-ev-b", flagged=cameras[:1])
        reader.join(10)
        live = [(a["event_id"], a["camera"]) for a in hello(line.server.url)["alarms"]]
    finally:
        line.stop()
    listed = [tuple(r) for r in _rows(mrkd_review(line.events, "--labels", line.labels, "--evidence",
                                                  line.evidence)[1])]
    restarted = Line(tmp_path, cameras=("left", "right"))       # a later run: its cameras named otherwise
    try:
        rebuilt = [(a["event_id"], a["camera"]) for a in hello(restarted.server.url)["alarms"]]
    finally:
        restarted.stop()
    newest_first = [("part-ev-b", cameras[0]), ("part-ev-b", cameras[1]),
                    ("part-ev-a", cameras[0]), ("part-ev-a", cameras[1])]
    assert live == newest_first, live
    assert list(reversed(sent)) == newest_first, sent        # each alarm sent goes on top of the page
    assert rebuilt == newest_first, rebuilt
    assert listed == newest_first[2:] + newest_first[:2], listed     # the listing: oldest first, same order


def test_an_unlabelled_row_whose_image_another_event_labelled_says_so(tmp_path):
    """A log that repeats an image (a looped folder, a part judged twice) listed its other events as plain
    "[unlabelled]" after one was labelled, inviting the same review again (and a conflict if answered
    otherwise). Such a row now names the label the image has and under which event; rows of a changed
    or gone image, or of another image, stay plain."""
    events, labels, evidence, shared, changed, gone = _long_log(tmp_path)
    code, output = mrkd_review(events, "--labels", labels, "--evidence", evidence, "--mark", "long-0003",
                               "--as", "good")
    assert code == 0, output
    code, output = mrkd_review(events, "--labels", labels, "--evidence", evidence, "--last", "0")
    assert code == 0, output
    rows = _rows(output)
    same = "[unlabelled; the same image is labelled good part (false alarm) under event long-0003]"
    assert "[good part (false alarm) by" in rows[("long-0003", "right")]
    for event_id in ("part-ev-0", "long-0000", "long-0599"):
        assert rows[(event_id, "right")].endswith(same), rows[(event_id, "right")]
    assert "CHANGED SINCE THE RUN" in rows[("part-changed", "right")] and \
        rows[("part-changed", "right")].endswith("[unlabelled]")
    assert rows[("part-gone", "right")].endswith("[unlabelled]")
    left = hashlib.sha256((evidence / "left" / "part-ev-0.png").read_bytes()).hexdigest()
    right = hashlib.sha256(shared.read_bytes()).hexdigest()
    if left != right:            # the left camera's own image: another image, plain
        assert rows[("part-ev-0", "left")].endswith("[unlabelled]"), rows[("part-ev-0", "left")]
