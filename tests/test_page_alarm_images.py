"""An alarm row's image after a restart: the page no longer holds the alarm's frame, so /alarm/<id>.jpg is
made from the evidence file the event names (a JPEG of at most THUMBNAIL_MAX_SIDE a side), read only
below the run's --evidence folder through served_folder.py and only with the event's sha256; a row
with no image shows a "no image" placeholder, never a broken image.

The line's real outputs (events log, evidence writer, the page) as test_review_page_labels.Line builds
them; images decoded by Pillow (not OpenCV, which the page encodes with), the page by headless Chromium.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from peers import require_program
from test_operator_page import CHROMIUM
from test_review_page_labels import Line, open_review_page


def smooth_frame(height: int, width: int, phase: float) -> np.ndarray:
    """A frame JPEG keeps well (waves, no noise), different for each ``phase``: BGR uint8."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [128 + 100 * np.sin(x / (23 + 7 * c) + phase + c) * np.cos(y / (31 + 5 * c) - phase)
                for c in range(3)]
    return np.clip(np.stack(channels, axis=2), 0, 255).astype(np.uint8)


def get(url: str):
    """(status, Content-Type, body) of a GET, as any HTTP client sends it."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers.get("Content-Type"), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), exc.read()


def pil_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def logged(events: Path) -> dict:
    return {record["event_id"]: record for record in map(json.loads, events.read_text().splitlines())}


def test_a_restarted_page_serves_each_alarm_from_its_evidence_file_as_a_bounded_jpeg(tmp_path):
    from mrkd.runtime.outputs.alarm_images import THUMBNAIL_MAX_SIDE
    small = [smooth_frame(120, 160, phase) for phase in (0.0, 1.3)]
    big = smooth_frame(2 * THUMBNAIL_MAX_SIDE * 3 // 4, 2 * THUMBNAIL_MAX_SIDE, 2.1)   # twice the bound, 4:3
    line = Line(tmp_path)
    try:
        ids = [line.alarm(frame) for frame in small] + [line.alarm(big)]
        unasked = line.alarm(smooth_frame(120, 160, 3.0))
    finally:
        line.stop()
    again = Line(tmp_path)          # the same files, a new run: no frame in memory
    try:
        records = logged(again.events)
        for event_id, frame in zip(ids, small + [big]):
            status, content_type, body = get(f"{again.server.url}/alarm/{event_id}.jpg")
            assert (status, content_type) == (200, "image/jpeg"), body[:200]
            assert body[:2] == b"\xff\xd8"
            served = pil_rgb(body)
            evidence = Path(records[event_id]["evidence"]).read_bytes()     # the lossless frame, as Pillow reads it
            assert hashlib.sha256(evidence).hexdigest() == records[event_id]["evidence_sha256"]
            reference = Image.open(io.BytesIO(evidence)).convert("RGB")
            assert np.array_equal(np.asarray(reference), frame[:, :, ::-1])
            if max(reference.size) > THUMBNAIL_MAX_SIDE:         # a box average of 2x2, Pillow's own
                reference = reference.reduce(2)
            expected = np.asarray(reference, dtype=np.float32)
            assert served.shape == expected.shape and max(served.shape[:2]) <= THUMBNAIL_MAX_SIDE
            error = np.abs(served - expected)
            assert error.mean() < 3.0 and np.percentile(error, 99) < 20, (error.mean(), np.percentile(error, 99))
        # another alarm's frame is far from it: the comparison above can tell images apart
        first = pil_rgb(get(f"{again.server.url}/alarm/{ids[0]}.jpg")[2])
        assert np.abs(first - small[1][:, :, ::-1].astype(np.float32)).mean() > 20
        # the evidence file gone (the thumbnail cached or not): the row's image is still the one it was
        Path(records[ids[0]]["evidence"]).unlink()
        assert get(f"{again.server.url}/alarm/{ids[0]}.jpg")[0] == 200
        # an evidence file removed before it was ever asked for: none
        Path(records[unasked]["evidence"]).unlink()
        status, _, body = get(f"{again.server.url}/alarm/{unasked}.jpg")
        assert status == 404 and b"no image" in body
    finally:
        again.stop()


def test_an_event_line_naming_a_file_outside_the_evidence_folder_is_not_served(tmp_path, caplog):
    """A hostile line appended to the events log names /etc/passwd, a file beside the folder (plainly,
    through '..', a link and a hard link inside it), an image in it with another sha256 or none, or a
    PNG declaring 60000 x 60000 pixels: 404 each, for its own reason (logged), while the line's own
    alarm is served."""
    line = Line(tmp_path)
    try:
        own = line.alarm(smooth_frame(90, 120, 0.5))
    finally:
        line.stop()
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    secret.write_bytes(open(logged(line.events)[own]["evidence"], "rb").read())     # a real PNG, not evidence
    camera_folder = line.evidence / "cam0"
    os.symlink(secret, camera_folder / "link.png")
    os.link(secret, camera_folder / "hard.png")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(camera_folder / "stranger.png")
    bomb = camera_folder / "bomb.png"            # a header alone: 60000 x 60000 RGB, never decoded
    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + header + b"\0" * 4)
    sha = lambda path: hashlib.sha256(Path(path).read_bytes()).hexdigest()    # noqa: E731
    hostile = {
        "passwd": ("/etc/passwd", sha("/etc/passwd")),
        "beside": (str(secret), sha(secret)),
        "dotdot": (f"{line.evidence}/cam0/../../outside/secret.png", sha(secret)),
        "link": (str(camera_folder / "link.png"), sha(secret)),
        "hard": (str(camera_folder / "hard.png"), sha(secret)),
        "othersha": (str(camera_folder / "stranger.png"), "0" * 64),
        "nosha": (str(camera_folder / "stranger.png"), None),
        "bomb": (str(bomb), sha(bomb)),
    }
    why = {"passwd": "/etc/passwd is outside", "beside": "secret.png is outside", "dotdot": "is not a plain path below",
           "link": "is a link, which the page does not follow", "hard": "names (a hard link",
           "othersha": "is not the file its event names", "bomb": "declares 60000 x 60000 pixels"}
    with open(line.events, "a") as log:
        for name, (path, digest) in hostile.items():
            log.write(json.dumps({"event_id": f"evil-{name}", "time": "2026-01-01T00:00:00.000+00:00",
                                  "camera": "cam0", "score": 1.0, "threshold": 0.1, "evidence": path,
                                  "evidence_sha256": digest, "snapshot": path}) + "\n")
        log.write(json.dumps({"event_id": "evil-part", "time": "2026-01-01T00:00:00.000+00:00", "kind": "part",
                              "part_id": "p", "verdict": "NG", "cameras": [
                                  {"camera": "cam0", "images": 1, "score": 1.0, "threshold": 0.1,
                                   "evidence": "/etc/passwd", "evidence_sha256": sha("/etc/passwd")}]}) + "\n")
    again = Line(tmp_path)
    try:
        shown = {a["event_id"] for a in again.server._hello()["alarms"]}
        assert {f"evil-{name}" for name in hostile} | {"evil-part", own} <= shown     # all rebuilt as rows
        for name in hostile:
            status, _, body = get(f"{again.server.url}/alarm/evil-{name}.jpg")
            assert status == 404 and b"root:" not in body, (name, status)
        assert get(f"{again.server.url}/alarm/evil-part.jpg?camera=cam0")[0] == 404
        refusals = [r.getMessage() for r in caplog.records if "not served" in r.getMessage()]
        for name, reason in {**why, "part": "/etc/passwd is outside"}.items():
            assert any(f"alarm evil-{name} not served: " in m and reason in m for m in refusals), (name, refusals)
        assert get(f"{again.server.url}/alarm/{own}.jpg")[0] == 200
    finally:
        again.stop()


def test_the_page_shows_a_rebuilt_rows_image_and_a_placeholder_where_there_is_none(tmp_path):
    """Chromium, after a restart: the row whose evidence is on disk shows it (naturalWidth > 0); the row
    whose evidence is gone shows "no image", not a broken image."""
    require_program(CHROMIUM, ["chromium"])
    from playwright.sync_api import sync_playwright
    line = Line(tmp_path)
    try:
        kept, gone = line.alarm(smooth_frame(120, 160, 0.0)), line.alarm(smooth_frame(120, 160, 1.0))
    finally:
        line.stop()
    Path(logged(line.events)[gone]["evidence"]).unlink()
    again = Line(tmp_path)
    try:
        with sync_playwright() as playwright:
            browser, page = open_review_page(playwright, again.server.url)
            row = page.locator(f'.alarm[data-event-id="{kept}"]')
            row.wait_for(timeout=10000)
            page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=row.locator("img").element_handle(),
                                   timeout=10000)
            assert row.locator("img").evaluate("el => [el.naturalWidth, el.naturalHeight]") == [160, 120]
            assert row.locator(".no-image").count() == 0
            missing = page.locator(f'.alarm[data-event-id="{gone}"]')
            missing.locator(".no-image").wait_for(timeout=10000)
            assert missing.locator(".no-image").inner_text() == "no image"
            assert missing.locator("img").count() == 0
            browser.close()
    finally:
        again.stop()
