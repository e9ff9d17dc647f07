"""The review view as a line uses it: each alarm shows the label that stands in the label file (who,
when), the view is rebuilt from the events log and the label file after a reload or a restart, a row
the operator is writing a note in is not pushed out by new alarms, and a label that would change a
standing one is refused (409 naming it) until the operator confirms (``replace``).

The line's real outputs (events log, evidence writer, the page's OperatorServer with its LineControl)
get alarms through their hooks in the loop's order (every ``event_fields``, then ``on_event``); the
page is driven by headless Chromium, the HTTP rules by urllib, the listing by `mrkd review`, the labels
read back with runtime/review.py's reader (refit's rule) and the events log with json.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from click.testing import CliRunner

from peers import require_program
from runtime_fixtures import normal_frame
from test_operator_page import CHROMIUM
from test_review import by_event
from test_review_page import TOKEN, hello, launch

from mrkd.runtime.review import DEFECT, GOOD, latest_labels, read_labels


class Line:
    """The outputs of a line with --events, --evidence, --http and review on (no model: alarms are fed)."""

    def __init__(self, tmp: Path, cameras=("cam0",)):
        from mrkd.runtime import OutputSettings, build_outputs
        from mrkd.runtime.control import attach_control
        from mrkd.runtime.outputs.base import CameraInfo
        from mrkd.runtime.outputs.evidence import EvidenceSettings
        from mrkd.runtime.outputs.web import OperatorServer
        self.events, self.labels, self.evidence = tmp / "events.jsonl", tmp / "labels.jsonl", tmp / "evidence"
        settings = OutputSettings(events=str(self.events), evidence=EvidenceSettings(str(self.evidence)),
                                  http="127.0.0.1:0")
        self.outputs = build_outputs(settings)         # as `mrkd run` builds them, the page's control too
        attach_control(self.outputs, {"token": TOKEN, "labels": str(self.labels)}, settings)
        self.server = next(output for output in self.outputs if isinstance(output, OperatorServer))
        for output in self.outputs:
            output.see_outputs(self.outputs)
            output.on_start([CameraInfo(name, "memory", "m.onnx", "00" * 32, "onnxruntime", "fp32", 0.1, "test")
                             for name in cameras])
        self.cameras = tuple(cameras)
        self.rng = np.random.default_rng(len(list(tmp.iterdir())))
        self.frames = 0

    def alarm(self, image: Optional[np.ndarray] = None) -> str:
        """One alarm of camera cam0 (its frame ``image``, else a random one), through every output as the
        loop's alarm notifier gives it."""
        from mrkd.runtime.line.alarms import Alarm
        from mrkd.runtime.outputs.base import FrameResult
        from mrkd.runtime.outputs.events import make_event
        self.frames += 1
        image = normal_frame(self.rng) if image is None else image
        event = make_event(Alarm(self.frames, float(self.frames), 0.5, 0.1, 1), "memory", [], None, "cam0")
        result = FrameResult("cam0", self.frames, float(self.frames), image, np.zeros((8, 8), np.float32), 0.5, 0.1,
                             True, event=event)
        for output in self.outputs:
            output.on_frame(result)
        for output in self.outputs:
            event.update(output.event_fields(result))
        for output in self.outputs:
            output.on_event("cam0", event)
        return event["event_id"]

    def part(self, event_id: str, flagged: Sequence[str]) -> dict:
        """One NG part (event ``event_id``) of every camera of the line, each with a random image of its
        own; ``flagged``: the cameras that flagged it. Through the outputs' hooks in the part runner's
        order (part_fields, then on_part). camera -> its image."""
        import time
        from mrkd.runtime.outputs.base import CameraJudgement, PartResult
        from test_review_page import judge_part, part_views
        images = {name: normal_frame(self.rng) for name in self.cameras}
        self.frames += 1
        part = PartResult(inspection_id=self.frames, part_id=f"P-{event_id}", verdict="NG", score=0.4,
                          threshold=0.1, cameras=tuple(CameraJudgement(name, 0.4 if name in flagged else 0.02, 0.1,
                                                                       name in flagged, images=1)
                                                       for name in self.cameras),
                          model_sha256="00" * 32, trigger_time=time.time(), event_id=event_id)
        judge_part(self.outputs, part, part_views(images, 0.1))
        return images

    def stop(self) -> None:
        for output in self.outputs:
            output.on_stop()


def post_review(url: str, body: dict, token: str = TOKEN):
    """(status, JSON answer) of POST /review, as any HTTP client sends it."""
    request = urllib.request.Request(url + "/review", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def mrkd_review(*args) -> tuple:
    from mrkd.cli import main
    result = CliRunner().invoke(main, ["review", *map(str, args)])
    return result.exit_code, result.output


def logged_ids(path: Path) -> list:
    return [json.loads(line)["event_id"] for line in path.read_text().splitlines()]


def test_a_label_that_changes_a_standing_one_needs_replace_over_http_and_in_mrkd_review(tmp_path):
    line = Line(tmp_path)
    try:
        first, second = line.alarm(), line.alarm()
        url = line.server.url
        code, answer = post_review(url, {"event_id": first, "label": "good", "note": "dust"})
        assert code == 200 and answer["saved"]["label"] == GOOD
        before = line.labels.read_bytes()
        # good -> defect without confirming: refused, the standing label named, nothing written
        code, answer = post_review(url, {"event_id": first, "label": "defect"})
        assert code == 409, answer
        [standing] = answer["existing"]
        saved = read_labels(line.labels)[0]
        assert (standing["event_id"], standing["label"], standing["who"], standing["when"]) == \
            (first, GOOD, "operator (page)", saved.when)
        assert "already labelled good part (false alarm) by operator (page)" in answer["error"]
        assert '"replace": true' in answer["error"] and line.labels.read_bytes() == before
        assert post_review(url, {"event_id": first, "label": "defect", "replace": "yes"})[0] == 400
        # the same label again (a note added) is no change: accepted
        assert post_review(url, {"event_id": first, "label": "good", "note": "dust, checked"})[0] == 200
        code, answer = post_review(url, {"event_id": first, "label": "defect", "replace": True})
        assert code == 200 and answer["saved"]["label"] == DEFECT
        assert post_review(url, {"event_id": second, "label": "defect"})[0] == 200     # unlabelled: no question
    finally:
        line.stop()
    # refit's reader: the correction stands (last line wins), nothing else changed
    from mrkd.runtime.review import label_states
    latest = by_event(latest_labels(read_labels(line.labels)))
    assert (latest[first].label, latest[second].label) == (DEFECT, DEFECT)
    assert [label.label for label in read_labels(line.labels)] == [GOOD, GOOD, DEFECT, DEFECT]
    state = by_event(label_states(read_labels(line.labels)))[first]
    assert state.replaced is not None and (state.replaced.label, state.replaced.note) == (GOOD, "dust, checked")

    # `mrkd review` lists the same (who, when, the label corrected) and keeps the same rule
    base = (line.events, "--labels", line.labels, "--evidence", line.evidence)
    code, listed = mrkd_review(*base)
    assert code == 0, listed
    row = next(text for text in listed.splitlines() if text.startswith(first))
    assert f"[defect confirmed by operator (page)] at {state.current.when.replace('T', ' ')[:19]}" in row, row
    assert f"(corrected; was good part (false alarm) by operator (page) at {state.replaced.when.replace('T', ' ')[:19]})" \
        in row, row
    before = line.labels.read_bytes()
    code, said = mrkd_review(*base, "--mark", second, "--as", "good")
    assert code == 1 and said.count("\n") == 1 and said.startswith("Error: ") and "Traceback" not in said, said
    assert f"event {second} is already labelled defect confirmed by operator (page)" in said and "--replace" in said
    assert line.labels.read_bytes() == before
    code, said = mrkd_review(*base, "--mark", second, "--as", "good", "--replace", "--who", "lead")
    assert code == 0, said
    assert by_event(latest_labels(read_labels(line.labels)))[second].who == "lead"


def test_a_restarted_page_rebuilds_its_alarms_and_labels_from_the_events_log_and_the_label_file(tmp_path):
    line = Line(tmp_path)
    try:
        ids = [line.alarm() for _ in range(25)]
        assert post_review(line.server.url, {"event_id": ids[-3], "label": "good"})[0] == 200
    finally:
        line.stop()
    again = Line(tmp_path)          # the same files, a new run: nothing in memory
    try:
        shown = hello(again.server.url)["alarms"]
        logged = logged_ids(again.events)
        assert [a["event_id"] for a in shown] == logged[::-1][:20] == ids[::-1][:20]      # newest first
        labelled = {a["event_id"]: a["review"] for a in shown if a["review"]}
        [saved] = read_labels(again.labels)
        assert list(labelled) == [ids[-3]]
        assert (labelled[ids[-3]]["label"], labelled[ids[-3]]["who"], labelled[ids[-3]]["when"]) == \
            (GOOD, saved.who, saved.when)
        new = again.alarm()         # this run's own alarms come first, the log's stay below
        assert [a["event_id"] for a in hello(again.server.url)["alarms"]][:2] == [new, ids[-1]]
    finally:
        again.stop()


def test_latest_events_reads_a_bounded_tail_newest_first(tmp_path):
    from mrkd.runtime.outputs.recent_events import latest_events
    log = tmp_path / "events.jsonl"
    records = [{"event_id": f"e{i:03d}", "time": "2026-01-01T00:00:00", "pad": "x" * (50 + i)} for i in range(300)]
    text = "".join(json.dumps(r) + "\n" for r in records)
    log.write_text(text + '{"event_id": "torn", "ti')           # a crash mid-write
    assert [e["event_id"] for e in latest_events(log, 20)] == [r["event_id"] for r in records[::-1][:20]]
    assert [e["event_id"] for e in latest_events(log, 1000)] == [r["event_id"] for r in records[::-1]]
    # only the last max_bytes are read: the lines whose newline before them lies within (a line cut by the
    # window's edge is not taken), found here from the lines' offsets
    data = log.read_bytes()
    window = 5000
    window_start = len(data) - window
    starts, at = [], 0
    for record in records:
        starts.append(at)
        at += len(json.dumps(record)) + 1
    expected = [r["event_id"] for r, begin in zip(records, starts) if begin - 1 >= window_start][::-1]
    found = latest_events(log, 1000, max_bytes=window)
    assert [e["event_id"] for e in found] == expected and 10 < len(expected) < 300
    assert latest_events(tmp_path / "none.jsonl", 5) == []


def open_review_page(playwright, url: str):
    """Chromium on the page, the control token given."""
    browser = launch(playwright)
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(url + "/", wait_until="domcontentloaded")     # the live view is an endless MJPEG stream
    page.fill("#token", TOKEN)
    page.click("#token-use")
    return browser, page


@contextlib.contextmanager
def page_at_row(line: Line, event_id: str, camera: Optional[str] = None):
    """Chromium on the line's page (``open_review_page``) once alarm ``event_id``'s row (of ``camera``,
    for a part) shows there: (page, row); the browser is closed after."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser, page = open_review_page(playwright, line.server.url)
        row = page.locator(f'.alarm[data-event-id="{event_id}"]' + (f'[data-camera="{camera}"]' if camera else ""))
        row.wait_for(timeout=10000)
        yield page, row
        browser.close()


def press(page, item, selector: str) -> str:
    """Click a row's button and wait for the page's answer to it."""
    item.evaluate("el => { delete el.dataset.review; }")
    item.locator(selector).click()
    page.wait_for_function("el => el.dataset.review !== undefined", arg=item.element_handle(), timeout=10000)
    return item.locator(".answer").inner_text()


def test_the_page_shows_each_alarms_label_and_asks_before_changing_one(tmp_path):
    """Chromium: a label from the page and one from `mrkd review` show on their rows (who, when); a
    change asks first, and the row then says what it corrected; a reload shows the labels again."""
    require_program(CHROMIUM, ["chromium"])
    line = Line(tmp_path)
    try:
        ids = [line.alarm() for _ in range(3)]
        with page_at_row(line, ids[0]) as (page, row):
            assert row.locator(".labelled").inner_text() == "not reviewed yet"
            assert press(page, row, "button.mark-good").startswith("recorded: good part")
            page.wait_for_function("el => el.dataset.labelled === 'good'", arg=row.element_handle(), timeout=5000)
            good = read_labels(line.labels)[-1]
            shown = row.locator(".labelled").inner_text()
            assert shown == f"labelled: good part (false alarm) · by operator (page) · " \
                            f"{good.when.replace('T', ' ')[:19]} UTC", shown
            # relabelling asks first: 409 names the standing label, nothing written until confirmed
            refused = press(page, row, "button.mark-defect")
            assert refused.startswith("already labelled good part (false alarm) · by operator (page)"), refused
            assert len(read_labels(line.labels)) == 1
            assert press(page, row, "button.replace").startswith("recorded: defect confirmed")
            page.wait_for_function("el => el.dataset.labelled === 'defect'", arg=row.element_handle(), timeout=5000)
            assert "(corrected; was good part (false alarm)" in row.locator(".labelled").inner_text()
            assert [label.label for label in read_labels(line.labels)] == [GOOD, DEFECT]
            # a label given beside the page (`mrkd review`) shows on its row within the page's tick
            code, said = mrkd_review(line.events, "--labels", line.labels, "--evidence", line.evidence, "--mark",
                                     ids[1], "--as", "defect", "--who", "shift lead")
            assert code == 0, said
            other = page.locator(f'.alarm[data-event-id="{ids[1]}"] .labelled')
            page.wait_for_function("el => el.textContent.includes('by shift lead')", arg=other.element_handle(),
                                   timeout=5000)
            page.reload()            # the page's memory gone: the labels come from the label file
            row.wait_for(timeout=10000)
            assert row.locator(".labelled").inner_text().startswith("labelled: defect confirmed · by operator")
            assert other.inner_text().startswith("labelled: defect confirmed · by shift lead")
            assert page.locator(f'.alarm[data-event-id="{ids[2]}"] .labelled').inner_text() == "not reviewed yet"
    finally:
        line.stop()


def test_the_row_being_reviewed_stays_while_alarms_come_and_a_restart_shows_the_log(tmp_path):
    """Chromium: the row whose note is being written stays while 30 new alarms arrive (the list keeps 20
    rows: the 19 newest and that one); once the note is sent and left, it may go. A restarted line's page
    shows the latest alarms of the events log with their labels."""
    require_program(CHROMIUM, ["chromium"])
    line = Line(tmp_path)
    try:
        ids = [line.alarm() for _ in range(3)]
        with page_at_row(line, ids[0]) as (page, oldest):
            oldest.locator(".review input").fill("scratch near the edge?")        # focused, written
            newer = [line.alarm() for _ in range(30)]
            page.wait_for_selector(f'.alarm[data-event-id="{newer[-1]}"]', timeout=10000)
            shown_ids = page.eval_on_selector_all(".alarm", "els => els.map(e => e.dataset.eventId)")
            assert shown_ids == newer[::-1][:19] + [ids[0]], shown_ids
            assert oldest.locator(".review input").input_value() == "scratch near the edge?"
            assert press(page, oldest, "button.mark-good").startswith("recorded: good part")
            assert read_labels(line.labels)[-1].note == "scratch near the edge?"
            page.locator("#token").focus()                    # the note sent and left: the row may go now
            last = line.alarm()
            page.wait_for_selector(f'.alarm[data-event-id="{last}"]', timeout=5000)
            assert oldest.count() == 0 and page.locator(".alarm").count() == 20
        assert post_review(line.server.url, {"event_id": newer[-2], "label": "good"})[0] == 200
    finally:
        line.stop()
    again = Line(tmp_path)          # a restarted line: rows rebuilt from the log's end, labels from the file
    try:
        with page_at_row(again, newer[-2]) as (page, row):
            assert row.locator(".labelled").inner_text().startswith("labelled: good part (false alarm) · by operator")
            shown_ids = page.eval_on_selector_all(".alarm", "els => els.map(e => e.dataset.eventId)")
            assert shown_ids == logged_ids(again.events)[::-1][:20] == ([last] + newer[::-1])[:20]
    finally:
        again.stop()


def test_each_flagged_camera_of_a_part_gets_its_own_label_on_the_page(tmp_path):
    """Chromium: a part whose two cameras both flagged it has a row per camera; each row's buttons label
    that camera's image and each label stands on its own row (before, the second camera's label was
    taken as a change of the part's label: asked first, and with it the first camera's label was gone, so
    one of the two images could never be labelled). Changing one camera's label still asks first. Refit
    is offered both images."""
    require_program(CHROMIUM, ["chromium"])
    line = Line(tmp_path, cameras=("left", "right"))
    try:
        line.part("part-ev-2", flagged=("left", "right"))
        with page_at_row(line, "part-ev-2", "left") as (page, left):
            right = page.locator('.alarm[data-event-id="part-ev-2"][data-camera="right"]')
            assert left.locator(".labelled").inner_text() == right.locator(".labelled").inner_text() == \
                "not reviewed yet"
            assert press(page, left, "button.mark-good").startswith("recorded: good part")
            answer = press(page, right, "button.mark-defect")
            assert answer.startswith("recorded: defect confirmed"), answer
            page.wait_for_function("el => el.dataset.labelled === 'defect'", arg=right.element_handle(), timeout=5000)
            page.wait_for_function("el => el.dataset.labelled === 'good'", arg=left.element_handle(), timeout=5000)
            good, defect = read_labels(line.labels)
            assert left.locator(".labelled").inner_text() == \
                f"labelled: good part (false alarm) · by operator (page) · {good.when.replace('T', ' ')[:19]} UTC"
            assert right.locator(".labelled").inner_text() == \
                f"labelled: defect confirmed · by operator (page) · {defect.when.replace('T', ' ')[:19]} UTC"
            # changing one camera's standing label asks first; nothing written until confirmed
            refused = press(page, left, "button.mark-defect")
            assert refused.startswith("already labelled good part (false alarm) · by operator (page)"), refused
            assert len(read_labels(line.labels)) == 2 and left.locator("button.replace").count() == 1
            page.reload()            # the labels come from the label file, each on its camera's row
            right.wait_for(timeout=10000)
            page.wait_for_function("el => el.dataset.labelled === 'defect'", arg=right.element_handle(), timeout=5000)
            assert left.get_attribute("data-labelled") == "good"
    finally:
        line.stop()
    from mrkd.runtime.review import LabelKey, label_states
    from mrkd.train.refit import reviewed_images
    states = label_states(read_labels(line.labels))
    assert {key: (state.current.label, state.replaced) for key, state in states.items()} == {
        LabelKey("part-ev-2", "left"): (GOOD, None), LabelKey("part-ev-2", "right"): (DEFECT, None)}
    evidence = {camera: line.evidence / camera / "part-ev-2.png" for camera in ("left", "right")}
    assert [(l.camera, l.image_sha256) for l in read_labels(line.labels)] == \
        [(camera, hashlib.sha256(evidence[camera].read_bytes()).hexdigest()) for camera in ("left", "right")]
    reviewed = reviewed_images(line.labels)        # refit's reader: both images, each with its label
    assert [Path(p) for p in reviewed.good] == [evidence["left"]] and [Path(p) for p in reviewed.defect] == \
        [evidence["right"]] and not reviewed.skipped
