"""The page's ignore-mask editor (/mask/<camera>), in headless Chromium against a live `mrkd run`: the camera's
latest judged image comes back lossless at its own size (/frame/<camera>.png), rectangles dragged over it on a
page shown smaller than the image become white in a downloaded PNG of the image's size, and that PNG is a mask
`mrkd run --ignore-mask` takes. The mask the image was judged under comes back by its hash and is kept in the
download unless unticked. Nothing on the line changes (GET only)."""

from __future__ import annotations

import hashlib
import math
import signal
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest

from runtime_fixtures import build_tiny_model, normal_frame, write_frames

H, W = 240, 320


def fetch(url, header="Content-Type"):
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.status, answer.headers.get(header), answer.read()


def white_of(path):
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image.shape[:2] == (H, W), image.shape
    return (image[:, :, :3] if image.ndim == 3 else image[:, :, None]).min(axis=2) > 127


def download_mask(page, ready, path):
    """The page's mask once it is made for ``ready`` (what went into it: shapes, +margin, +current)."""
    page.wait_for_function(f"document.getElementById('download').dataset.ready === '{ready}'", timeout=10000)
    with page.expect_download() as waiting:
        page.locator("#download").click()
    waiting.value.save_as(path)
    assert waiting.value.suggested_filename == "cam0-ignore-mask.png"
    return path


def test_a_mask_drawn_on_the_page_is_a_png_of_the_cameras_image_with_the_dragged_areas_white(tmp_path):
    from line_fixtures import PageRun, wait_for
    from peers import require_program
    from test_operator_page import CHROMIUM, CHROMIUM_ARGS
    require_program(CHROMIUM, ["chromium"])
    from playwright.sync_api import sync_playwright
    from mrkd.runtime.ignore_mask import load_ignore_mask
    from mrkd.runtime.metadata import ModelMetadata, sidecar_path
    rng = np.random.default_rng(11)
    frames = [normal_frame(rng, H, W) for _ in range(3)]
    folder = write_frames(tmp_path / "frames", frames)
    model = build_tiny_model(tmp_path / "tiny.onnx")
    in_force = np.zeros((H, W), np.uint8)
    in_force[180:230, 250:310] = 255              # the mask the line runs under: a corner the drags stay out of
    cv2.imwrite(str(tmp_path / "in_force.png"), in_force)
    in_force_sha = hashlib.sha256((tmp_path / "in_force.png").read_bytes()).hexdigest()
    run = PageRun(model, "--source", folder, "--loop", "--fps", "20", "--status-every", "0",
                  "--ignore-mask", tmp_path / "in_force.png")
    try:
        url = run.url

        def latest():
            try:
                return fetch(url + "/frame/cam0.png")
            except urllib.error.HTTPError:
                return None
        assert wait_for(lambda: latest() is not None, 30), run.stderr
        status, kind, body = latest()
        # the blur's reach in frame pixels: two sigmas of the model's map, scaled from its side to the frame's
        metadata = ModelMetadata.load(sidecar_path(model))
        assert metadata.resize_mode == "resize"
        margin = [math.ceil(2 * metadata.sigma * side / metadata.image_size) for side in (W, H)]
        assert margin[0] > margin[1] > 0
        image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
        # lossless, as judged: exactly one of the frames
        assert kind == "image/png" and image.shape == (H, W, 3)
        assert any(np.array_equal(image, frame) for frame in frames)
        # the mask it was judged under, by its hash, white where not judged
        assert fetch(url + "/frame/cam0.png", "X-Ignore-Mask")[1] == in_force_sha
        status, kind, body = fetch(url + f"/ignore_mask/{in_force_sha}.png")
        served = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
        assert kind == "image/png" and np.array_equal(served, in_force)
        for missing in ("/frame/nope.png", "/mask/nope", f"/ignore_mask/{'0' * 64}.png", "/ignore_mask/cam0.png"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                fetch(url + missing)
            assert refused.value.code == 404
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                # narrower than the image: the page shows it scaled down, the mask must still be at its size
                page = browser.new_page(viewport={"width": 240, "height": 1600}, accept_downloads=True)
                page.goto(url + "/")
                page.locator("#cam-cam0 a.mask-link").click()
                page.wait_for_function("document.getElementById('frame').naturalWidth > 0", timeout=10000)
                page.locator("#frame").scroll_into_view_if_needed()
                box = page.locator("#frame").bounding_box()
                assert box["width"] < W - 50, box

                def drag(fx0, fy0, fx1, fy1):
                    points = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
                              for fx, fy in ((fx0, fy0), (fx1, fy1))]
                    page.mouse.move(*points[0])
                    page.mouse.down()
                    page.mouse.move((points[0][0] + points[1][0]) / 2, (points[0][1] + points[1][1]) / 2)
                    page.mouse.move(*points[1])
                    page.mouse.up()
                    return [round((x - box["x"]) * W / box["width"]) for x, _ in points], \
                        [round((y - box["y"]) * H / box["height"]) for _, y in points]
                first = drag(0.1, 0.2, 0.4, 0.5)
                drag(0.6, 0.6, 0.9, 0.9)
                page.locator("#undo").click()                 # the second one taken back

                def download(ready, name):
                    return download_mask(page, ready, tmp_path / name)
                assert page.locator("#current-size").inner_text() == f"{(in_force > 0).mean():.1%} not judged"
                kept = download("1+margin+current", "kept.png")  # the margin and the mask in force: on by default
                page.locator("#mode-judge").check()               # judge part of the mask in force again
                judged_again = drag(0.75, 0.70, 0.875, 0.99)
                edited = download("2+margin+current", "edited.png")
                page.locator("#undo").click()
                page.locator("#mode-ignore").check()
                assert download("1+margin+current", "kept_again.png").read_bytes() == kept.read_bytes()
                page.locator("#current").uncheck()
                widened = download("1+margin", "widened.png")
                assert page.locator("#margin-size").inner_text() == f"{margin[0]}×{margin[1]}"
                page.locator("#margin").uncheck()
                saved = download("1", "drawn.png")
                # a mask in force that cannot be read is said, and the download cannot count on it
                unread = browser.new_page()
                unread.route("**/ignore_mask/**", lambda route: route.fulfill(status=404, body="gone"))
                unread.goto(url + "/mask/cam0")
                unread.wait_for_function("document.getElementById('current-size').textContent.length > 0",
                                         timeout=10000)
                assert unread.locator("#current-size").inner_text() == "the mask in force could not be read: not kept"
                assert unread.locator("#current").is_disabled() and not unread.locator("#current").is_checked()
            finally:
                browser.close()
        (x0, x1), (y0, y1) = first
        # one rectangle, where the pointer went (to a pixel: the page's layout is fractional), and with the
        # margin that rectangle widened by the blur's reach on every side
        for path, (mx, my) in ((saved, (0, 0)), (widened, margin)):
            white = white_of(path)
            rows, cols = np.nonzero(white)
            assert abs(cols.min() - (x0 - mx)) <= 1 and abs(cols.max() + 1 - (x1 + mx)) <= 1, (path, cols.min(), first)
            assert abs(rows.min() - (y0 - my)) <= 1 and abs(rows.max() + 1 - (y1 + my)) <= 1, (path, rows.min(), first)
            assert white.sum() == (cols.max() - cols.min() + 1) * (rows.max() - rows.min() + 1)
        assert np.array_equal(white_of(kept), white_of(widened) | (in_force > 0))
        # judged again: black inside the dragged rectangle (as drawn, no margin), the rest as kept (to a pixel)
        (jx0, jx1), (jy0, jy1) = judged_again
        inside, outside = np.zeros((H, W), bool), np.ones((H, W), bool)
        inside[jy0 + 1:jy1 - 1, jx0 + 1:jx1 - 1] = True
        outside[max(jy0 - 1, 0):jy1 + 1, max(jx0 - 1, 0):jx1 + 1] = False
        assert white_of(kept)[inside].any() and not white_of(edited)[inside].any()
        assert np.array_equal(white_of(edited)[outside], white_of(kept)[outside])
        loaded = load_ignore_mask(saved)
        assert loaded.misfit((H, W)) is None and 0.05 < loaded.ignored_fraction < 0.15
    finally:
        if run.proc.poll() is None:
            run.proc.send_signal(signal.SIGTERM)      # a looping free run ends on a stop, not on its input
        status = run.close()
    assert status == 0, run.stderr
    # the run takes it (a folder without --loop: it ends after its frames)
    masked = PageRun(model, "--source", folder, "--ignore-mask", saved, "--status-every", "0")
    assert masked.close() == 0, masked.stderr
    assert f"ignore mask {saved} (320x240" in masked.stderr, masked.stderr


def centre_distances(corners) -> np.ndarray:
    """Each pixel centre's signed distance to the polygon ``corners`` (x, y on pixel edges; > 0 inside),
    by OpenCV's point-polygon test: the reference the page's canvas fill is checked against."""
    contour = np.array(corners, np.float32).reshape(-1, 1, 2)
    return np.array([[cv2.pointPolygonTest(contour, (x + 0.5, y + 0.5), True) for x in range(W)] for y in range(H)])


def test_a_polygon_drawn_on_the_page_is_white_in_the_mask_to_within_a_pixel_of_its_edge(tmp_path):
    """A concave polygon clicked corner by corner (closed on its first corner) on a page shown smaller
    than the image, with and without the blur's margin (the polygon widened by a box of the margin, as a
    rectangle is), a judge-again triangle inside it (closed by a double-click), and a polygon begun, its
    last corner undone and dropped with Escape. The reference is OpenCV's point-polygon distance of each
    pixel centre and scipy's box dilation; only pixels within 1.5 px of an edge may go either way."""
    from scipy.ndimage import binary_dilation
    from line_fixtures import PageRun
    from peers import require_program
    from test_operator_page import CHROMIUM, CHROMIUM_ARGS
    require_program(CHROMIUM, ["chromium"])
    from playwright.sync_api import sync_playwright
    rng = np.random.default_rng(12)
    folder = write_frames(tmp_path / "frames", [normal_frame(rng, H, W) for _ in range(3)])
    model = build_tiny_model(tmp_path / "tiny.onnx")
    run = PageRun(model, "--source", folder, "--loop", "--fps", "20", "--status-every", "0")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 240, "height": 1600}, accept_downloads=True)
                page.goto(run.url + "/mask/cam0")
                page.wait_for_function("document.getElementById('frame').naturalWidth > 0", timeout=30000)
                page.locator("#frame").scroll_into_view_if_needed()
                box = page.locator("#frame").bounding_box()
                assert box["width"] < W - 50, box
                margin = [int(v) for v in page.locator("#margin-size").inner_text().split("×")]
                assert margin[0] > 0 and margin[1] > 0

                def screen(fx, fy):
                    return box["x"] + fx * box["width"], box["y"] + fy * box["height"]

                def corner(fx, fy):            # as the page rounds a pointer position to image pixels
                    x, y = screen(fx, fy)
                    return round((x - box["x"]) * W / box["width"]), round((y - box["y"]) * H / box["height"])

                def download(ready, name):
                    return download_mask(page, ready, tmp_path / name)
                page.locator("#shape-polygon").check()
                l_shape = [(0.15, 0.15), (0.7, 0.15), (0.7, 0.4), (0.4, 0.4), (0.4, 0.8), (0.15, 0.8)]
                for fx, fy in l_shape:
                    page.mouse.click(*screen(fx, fy))
                page.mouse.click(*screen(*l_shape[0]))          # on the first corner: closed
                widened = download("1+margin", "widened.png")
                page.locator("#margin").uncheck()
                drawn = download("1", "drawn.png")
                page.mouse.click(*screen(0.8, 0.5))             # begun, a corner undone, dropped
                page.mouse.click(*screen(0.9, 0.6))
                page.locator("#undo").click()
                page.keyboard.press("Escape")
                assert download("1", "drawn_again.png").read_bytes() == drawn.read_bytes()
                page.locator("#mode-judge").check()
                triangle = [(0.2, 0.3), (0.35, 0.3), (0.2, 0.7)]
                page.mouse.click(*screen(*triangle[0]))
                page.mouse.click(*screen(*triangle[1]))
                page.mouse.dblclick(*screen(*triangle[2]))      # a double-click closes it
                judged_again = download("2", "judged_again.png")
            finally:
                browser.close()
    finally:
        run.proc.send_signal(signal.SIGTERM)
        assert run.close() == 0, run.stderr
    band = 1.5
    distance = centre_distances([corner(fx, fy) for fx, fy in l_shape])
    sure_in, maybe_in = distance > band, distance > -band
    assert sure_in.sum() > 0.1 * H * W
    for path, (mx, my) in ((drawn, (0, 0)), (widened, margin)):
        white = white_of(path)
        box_of_margin = np.ones((2 * my + 1, 2 * mx + 1), bool)
        must = binary_dilation(sure_in, box_of_margin) if mx else sure_in
        may = binary_dilation(maybe_in, box_of_margin) if mx else maybe_in
        assert white[must].all() and not white[~may].any(), (path, (white & ~may).sum(), (must & ~white).sum())
        assert (may & ~must).sum() < 0.2 * must.sum()      # the undecided band is thin
    assert white_of(widened).sum() > white_of(drawn).sum() + 100
    # the triangle judged again, as drawn (no margin): black inside it, the rest as before
    inside = centre_distances([corner(fx, fy) for fx, fy in triangle])
    before, after = white_of(drawn), white_of(judged_again)
    assert before[inside > band].all() and not after[inside > band].any()
    assert np.array_equal(after[inside < -band], before[inside < -band])
