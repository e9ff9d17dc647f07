"""A camera's ignore mask (runtime/ignore_mask.py): white areas of its images are not judged. The map
pixels it ignores are checked against block averages written here (both resize modes), the masked
score against a brute force over the Detector's own map, and the whole through `mrkd run`: a free run
and a triggered cell (line file), the shadow candidate, and the mistakes a user makes with a mask."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime_fixtures import SIZE, build_tiny_model, normal_frame, write_frames

from mrkd.runtime.ignore_mask import load_ignore_mask, masked

H, W = 48, 64
MASKED_DEFECT = (slice(8, 20), slice(10, 22))        # inside the white area below
JUDGED_DEFECT = (slice(32, 44), slice(40, 52))       # outside it


def write_mask(path: Path, white, shape=(H, W)) -> Path:
    mask = np.zeros(shape, np.uint8)
    for rows, cols in white:
        mask[rows, cols] = 255
    cv2.imwrite(str(path), mask)
    return path


def frame_with(rng, *patches) -> np.ndarray:
    frame = normal_frame(rng, H, W)
    for rows, cols in patches:
        frame[rows, cols] = 255
    return frame


@pytest.fixture
def model(tmp_path):
    return str(build_tiny_model(tmp_path / "tiny.onnx"))


@pytest.fixture
def mask(tmp_path):
    return write_mask(tmp_path / "mask.png", [(slice(0, 30), slice(0, 32))])


def test_ignored_map_pixels_are_those_more_than_half_white_in_both_resize_modes():
    from mrkd.runtime.ignore_mask import IgnoreMask
    rng = np.random.default_rng(0)

    def random_mask(shape):
        ignored = np.zeros(shape, bool)
        for _ in range(6):
            top, left = rng.integers(0, shape[0] - 10), rng.integers(0, shape[1] - 10)
            ignored[top:top + rng.integers(3, 30), left:left + rng.integers(3, 40)] = True
        return IgnoreMask("m.png", "0" * 64, ignored)
    # resize: 96x128 -> 32x32, each map pixel the mean of a 3x4 block
    mask = random_mask((96, 128))
    blocks = mask.ignored.reshape(32, 3, 32, 4).mean(axis=(1, 3))
    assert np.array_equal(mask.grid((96, 128), 32, "resize"), blocks > 0.5)
    # center_crop: shorter side 96 -> 32, 126 -> 42 (3x3 blocks), then the centre 32 columns (from 5)
    mask = random_mask((96, 126))
    crop = mask.ignored.reshape(32, 3, 42, 3).mean(axis=(1, 3))[:, 5:37]
    assert np.array_equal(mask.grid((96, 126), 32, "center_crop"), crop > 0.5)


def test_the_masked_score_is_the_maximum_of_the_detectors_map_outside_the_mask(model, mask):
    from mrkd.runtime.detector import Detector
    rng = np.random.default_rng(1)
    frames = [frame_with(rng, MASKED_DEFECT), frame_with(rng, JUDGED_DEFECT), frame_with(rng),
              frame_with(rng, MASKED_DEFECT, JUDGED_DEFECT)]
    loaded = load_ignore_mask(mask)
    keep = ~(cv2.resize(cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
             .astype(np.float32) / 255 > 0.5)
    detector = Detector(model, backend="onnxruntime")
    try:
        result = detector(frames)
    finally:
        detector.close()
    for i, frame in enumerate(frames):
        amap, score = masked(loaded, result.maps[i], float(result.scores[i]), frame.shape[:2], detector.metadata)
        assert score == pytest.approx(float(result.maps[i][keep].max()), abs=1e-7)
        assert np.array_equal(amap[~keep], np.zeros((~keep).sum(), np.float32))
        assert np.array_equal(amap[keep], result.maps[i][keep]) and score <= result.scores[i] + 1e-7
    threshold = detector.threshold
    scores = [masked(loaded, result.maps[i], float(result.scores[i]), (H, W), detector.metadata)[1] for i in range(4)]
    # the masked defect no longer reaches the threshold, the other one still does
    assert [s >= threshold for s in scores] == [False, True, False, True]
    assert [s >= threshold for s in result.scores] == [True, True, False, True]


def run_mrkd(*args, stdin=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "mrkd.cli", "run", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=180, cwd=cwd)


def test_a_free_run_raises_no_alarm_where_the_mask_is_white(model, mask, tmp_path):
    rng = np.random.default_rng(2)
    frames = [frame_with(rng), frame_with(rng, MASKED_DEFECT), frame_with(rng), frame_with(rng, JUDGED_DEFECT),
              frame_with(rng, MASKED_DEFECT), frame_with(rng)]
    folder = write_frames(tmp_path / "frames", frames)
    common = ["--source", folder, "--cooldown", "0", "--status-every", "0"]
    unmasked = run_mrkd(model, *common, "--events", tmp_path / "all.jsonl", "--summary", tmp_path / "all.json")
    assert unmasked.returncode == 0, unmasked.stderr
    run = run_mrkd(model, *common, "--ignore-mask", mask, "--events", tmp_path / "ev.jsonl",
                   "--summary", tmp_path / "s.json")
    assert run.returncode == 0, run.stderr
    frames_alarmed = lambda log: [json.loads(line)["frame_index"] for line in log.read_text().splitlines()]
    assert frames_alarmed(tmp_path / "all.jsonl") == [1, 3, 4]
    assert frames_alarmed(tmp_path / "ev.jsonl") == [3]
    digest = hashlib.sha256(mask.read_bytes()).hexdigest()
    under = lambda log: [json.loads(line)["ignore_mask_sha256"] for line in log.read_text().splitlines()]  # noqa: E731
    assert under(tmp_path / "all.jsonl") == [None] * 3 and under(tmp_path / "ev.jsonl") == [digest]  # each event says
    entry = json.loads((tmp_path / "s.json").read_text())["cameras"]["cam0"]["ignore_mask"]
    assert entry["sha256"] == digest and entry["size"] == "64x48"
    assert entry["ignored_fraction"] == pytest.approx(30 * 32 / (48 * 64), abs=1e-4)
    assert f"camera cam0: ignore mask {mask} (64x48, 31.2% of its images not judged" in run.stderr


def test_a_shadow_candidate_judges_under_the_cameras_mask(model, mask, tmp_path):
    """The same model as live and shadow under a mask: the candidate must read the image as the live model
    does, or every masked defect counts as a disagreement."""
    rng = np.random.default_rng(3)
    folder = write_frames(tmp_path / "frames", [frame_with(rng, MASKED_DEFECT) for _ in range(4)] + [frame_with(rng)])
    shadow = tmp_path / "shadow.onnx"
    build_tiny_model(shadow)
    run = run_mrkd(model, "--source", folder, "--ignore-mask", mask, "--shadow", shadow, "--status-every", "0",
                   "--summary", tmp_path / "s.json")
    assert run.returncode == 0, run.stderr
    compared = json.loads((tmp_path / "s.json").read_text())["shadow"]
    assert compared["frames"] == 5 and compared["disagreements"] == 0, compared


def test_a_triggered_cell_judges_parts_under_the_line_files_mask(model, tmp_path):
    rng = np.random.default_rng(4)
    write_mask(tmp_path / "masks.png", [(slice(0, 30), slice(0, 32))])
    parts = write_frames(tmp_path / "parts", [frame_with(rng, MASKED_DEFECT), frame_with(rng, JUDGED_DEFECT),
                                              frame_with(rng)])
    cv2.imwrite(str(parts / "003.png"), normal_frame(rng, 40, 64))          # another size: not the mask's
    line = tmp_path / "line.toml"
    line.write_text(f'[[camera]]\nname = "top"\nsource = "parts"\nmodel = "{Path(model).name}"\n'
                    f'trigger = "software"\nignore_mask = "masks.png"\n')
    run = run_mrkd("--line", line, "--trigger-stdin", "--part-queue", "8", "--parts-log", tmp_path / "parts.jsonl",
                   "--status-every", "0", stdin="A\nB\nC\nD\n")
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in (tmp_path / "parts.jsonl").read_text().splitlines()]
    assert [r["verdict"] for r in records] == ["OK", "NG", "OK", "ERROR"], records
    digest = hashlib.sha256((tmp_path / "masks.png").read_bytes()).hexdigest()
    assert [r["cameras"][0]["ignore_mask_sha256"] for r in records] == [digest] * 3 + [None]   # ERROR: none judged
    error = records[3]["cameras"][0]["error"]
    assert error == (f"unusable image: ignore mask {tmp_path / 'masks.png'} is 64x48, the camera's images are "
                     f"64x40: draw it on one of its images (or set the camera's size to the mask's)"), error


def test_a_recipe_judges_its_parts_under_its_own_masks(model, tmp_path):
    """A variant whose date code sits elsewhere: [recipes.2] names its model and, for the camera, its own
    mask; parts of recipe 0 are judged under the camera's mask, parts of recipe 2 under the recipe's. The
    part records name the mask each was judged under, the summary lists the recipe's, and the shadow
    candidate (the same model) reads each image under the live judgement's mask: no disagreement."""
    from mrkd.runtime.detector import Detector
    rng = np.random.default_rng(6)
    write_mask(tmp_path / "own.png", [(slice(0, 30), slice(0, 32))])          # over MASKED_DEFECT
    write_mask(tmp_path / "variant.png", [(slice(26, 48), slice(34, 64))])    # over JUDGED_DEFECT instead
    frames = [frame_with(rng, JUDGED_DEFECT), frame_with(rng, JUDGED_DEFECT), frame_with(rng, MASKED_DEFECT),
              frame_with(rng, MASKED_DEFECT)]
    write_frames(tmp_path / "parts", frames)
    variant = build_tiny_model(tmp_path / "variant.onnx")
    shadow = build_tiny_model(tmp_path / "shadow.onnx")
    line = tmp_path / "line.toml"
    line.write_text(f'[[camera]]\nname = "top"\nsource = "parts"\nmodel = "{Path(model).name}"\n'
                    f'trigger = "software"\nignore_mask = "own.png"\n'
                    f'[recipes.2]\nmodel = "variant.onnx"\nignore_mask = {{top = "variant.png"}}\n')
    run = run_mrkd("--line", line, "--trigger-stdin", "--part-queue", "8", "--parts-log", tmp_path / "parts.jsonl",
                   "--summary", tmp_path / "s.json", "--shadow", shadow, "--status-every", "0",
                   stdin="A\nB@2\nC\nD@2\n")
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in (tmp_path / "parts.jsonl").read_text().splitlines()]
    assert [(r["part_id"], r["recipe"], r["verdict"]) for r in records] == [
        ("A", 0, "NG"), ("B", 2, "OK"), ("C", 0, "OK"), ("D", 2, "NG")], records
    own, other = (hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in ("own.png", "variant.png"))
    assert [r["cameras"][0]["ignore_mask_sha256"] for r in records] == [own, other, own, other]
    detector = Detector(str(variant), backend="onnxruntime")
    try:
        result = detector(frames[1])
    finally:
        detector.close()
    expected = masked(load_ignore_mask(tmp_path / "variant.png"), result.maps[0], float(result.scores[0]), (H, W),
                      detector.metadata)[1]
    assert records[1]["cameras"][0]["score"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["cameras"]["top"]["recipe_ignore_masks"]["2"]["sha256"] == other, summary["cameras"]["top"]
    assert summary["shadow"]["frames"] == 4 and summary["shadow"]["disagreements"] == 0, summary["shadow"]


@pytest.mark.parametrize("body, expected", [
    ('[recipes.2]\nmodel = "tiny.onnx"\nignore_mask = {side = "m.png"}', "recipes.2.ignore_mask.side: not a camera"),
    ('[recipes.2]\nmodel = "tiny.onnx"\nignore_mask = "m.png"', "recipes.2.ignore_mask: expected a table of camera"),
    ('[recipes.2]\nmodel = "tiny.onnx"\nmask = {top = "m.png"}', "recipes.2.mask: unknown field"),
    ('[recipes.2]\nignore_mask = {top = "m.png"}', "recipes.2: expected a recipe number"),
    ('[recipes.2]\nmodel = "tiny.onnx"\nignore_mask = {top = "gone.png"}',
     "recipes.2.ignore_mask.top: ignore mask {folder}/gone.png: cannot read it"),
    ('[recipes.2]\nmodel = "tiny.onnx"\nignore_mask = {top = "small.png"}',
     "recipes.2.ignore_mask.top: ignore mask {folder}/small.png is 32x24, the camera's frames are resized to 64x48"),
])
def test_a_recipes_mask_mistakes_are_one_line_errors_naming_the_field(model, tmp_path, body, expected):
    write_frames(tmp_path / "frames", [normal_frame(np.random.default_rng(5), H, W)])
    write_mask(tmp_path / "m.png", [(slice(0, 4), slice(0, 4))])
    write_mask(tmp_path / "small.png", [(slice(0, 4), slice(0, 4))], shape=(24, 32))
    line = tmp_path / "line.toml"
    line.write_text(f'[[camera]]\nname = "top"\nsource = "frames"\nmodel = "{Path(model).name}"\n'
                    f'trigger = "software"\nsize = "64x48"\n{body}\n')
    run = run_mrkd("--line", line, "--trigger-stdin", stdin="")
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected.format(folder=tmp_path) in errors[0], run.stderr


@pytest.mark.parametrize("case", ["missing", "folder", "not_an_image", "all_white", "size_field", "line_type"])
def test_mask_mistakes_are_one_line_errors(model, tmp_path, case):
    folder = write_frames(tmp_path / "frames", [normal_frame(np.random.default_rng(5), H, W)])
    mask = tmp_path / "mask.png"
    extra, expected = [], ""
    if case == "missing":
        expected = f"ignore mask {mask}: cannot read it (No such file or directory)"
    elif case == "folder":
        mask.mkdir()
        expected = f"ignore mask {mask}: is a folder; name the mask image"
    elif case == "not_an_image":
        mask.write_text("white on black")
        expected = f"ignore mask {mask}: not an image OpenCV can read"
    elif case == "all_white":
        write_mask(mask, [(slice(None), slice(None))])
        expected = f"ignore mask {mask}: every pixel is white (ignored), so nothing would be judged"
    elif case == "size_field":
        write_mask(mask, [(slice(0, 4), slice(0, 4))])
        extra = ["--size", "32x24"]
        expected = f"ignore mask {mask} is 64x48, its frames are resized to 32x24: draw it at that size"
    if case == "line_type":
        line = tmp_path / "line.toml"
        line.write_text(f'[[camera]]\nname = "c"\nsource = "{folder}"\nmodel = "{model}"\nignore_mask = 3\n')
        run = run_mrkd("--line", line)
        expected = "ignore_mask: expected the path of a mask image"
    else:
        run = run_mrkd(model, "--source", folder, "--ignore-mask", mask, *extra)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], run.stderr


@pytest.mark.parametrize("size", [None, (64, 48)])
def test_a_cameras_unreadable_mask_is_refused_when_the_line_is_checked_with_or_without_a_size(model, tmp_path, size):
    """check_cameras (a line file's or the command line's cameras, before any camera or model opens) reads
    every mask: a tidy once read it only for cameras that set a size, and the others' mistake came later."""
    from mrkd.runtime.line.loop import Camera, LineError, check_cameras
    camera = Camera("top", str(tmp_path), str(model), size=size, ignore_mask=str(tmp_path / "nope.png"))
    with pytest.raises(LineError, match=r"nope\.png: cannot read it"):
        check_cameras([camera])


def test_a_mask_read_at_another_size_than_the_frames_ends_a_free_run_in_one_line(model, tmp_path):
    """A free-running camera's frames of another size than its mask: nothing it judges would be right."""
    folder = write_frames(tmp_path / "frames", [normal_frame(np.random.default_rng(6), 40, 64)])
    mask = write_mask(tmp_path / "mask.png", [(slice(0, 4), slice(0, 4))])
    run = run_mrkd(model, "--source", folder, "--ignore-mask", mask)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
    assert f"Error: camera 'cam0': ignore mask {mask} is 64x48, the camera's images are 64x40" in run.stderr


def test_sixteen_bit_and_colour_masks_read_white_as_ignored(tmp_path):
    """White is at least half of full scale, in any channel of a colour mask (its alpha is not read)."""
    deep = np.zeros((8, 8), np.uint16)
    deep[:3] = 65535
    deep[3:, :2] = 30000                    # below half of 65535: judged
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    expected = np.zeros((8, 8), bool)
    expected[:3] = True
    assert np.array_equal(load_ignore_mask(tmp_path / "deep.png").ignored, expected)
    colour = np.zeros((8, 8, 4), np.uint8)
    colour[:, :, 3] = 255                   # opaque everywhere: alpha says nothing
    colour[5:, 4:, 2] = 200                 # red paint
    cv2.imwrite(str(tmp_path / "colour.png"), colour)
    expected = np.zeros((8, 8), bool)
    expected[5:, 4:] = True
    assert np.array_equal(load_ignore_mask(tmp_path / "colour.png").ignored, expected)


def run_calibrate(*args):
    return subprocess.run([sys.executable, "-m", "mrkd.cli", "calibrate", *map(str, args)], capture_output=True,
                          text=True, timeout=180)


def test_calibrating_under_a_mask_sets_the_threshold_on_masked_scores_and_runs_say_a_mismatch(mask, tmp_path):
    """Good parts whose date code (here a bright patch in the white area) differs from part to part: whole,
    their scores set the threshold above the date code's, blind to weaker defects elsewhere. Calibrated
    under the mask, the threshold is set on the masked scores (checked against the scores computed here
    from the Detector's own maps), the mask's sha256 is recorded, and a camera judging under another mask
    or none is warned about at the start."""
    from mrkd.runtime.calibration import calibration_from_scores
    from mrkd.runtime.detector import Detector
    from mrkd.runtime.metadata import ModelMetadata, sidecar_path
    rng = np.random.default_rng(7)
    good = [frame_with(rng, (slice(8 + i % 5, 20), slice(10, 22 - i % 4))) for i in range(24)]
    for i, frame in enumerate(good):        # the good parts' own faint marks, where they are judged
        frame[34 + i % 6:38 + i % 6, 40:44] = 160 + i % 12
    folder = write_frames(tmp_path / "good", good)
    whole_model, masked_model = (str(build_tiny_model(tmp_path / f"{name}.onnx")) for name in ("whole", "masked"))
    assert run_calibrate(whole_model, folder, "--accept-shift").returncode == 0
    run = run_calibrate(masked_model, folder, "--ignore-mask", mask)
    assert run.returncode == 0, run.stderr
    whole = ModelMetadata.load(sidecar_path(whole_model)).calibration
    calibration = ModelMetadata.load(sidecar_path(masked_model)).calibration
    assert calibration.ignore_mask == hashlib.sha256(mask.read_bytes()).hexdigest() and whole.ignore_mask is None
    keep = ~(cv2.resize(cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
             .astype(np.float32) / 255 > 0.5)
    detector = Detector(masked_model, backend="onnxruntime")
    try:
        maps = detector(good).maps
    finally:
        detector.close()
    masked_good = np.array([m[keep].max() for m in maps], np.float64)
    assert masked_good.min() > 0
    expected = calibration_from_scores(masked_good, calibration.quantile, None, None, calibration.method)
    assert calibration.threshold == pytest.approx(expected.threshold, rel=1e-6)
    assert calibration.threshold < whole.threshold
    # a camera judging whole images with the masked threshold is warned about; one under the mask is not
    frames = write_frames(tmp_path / "frames", good[:2])
    warned = run_mrkd(masked_model, "--source", frames, "--status-every", "0")
    assert warned.returncode == 0, warned.stderr
    assert (f"camera 'cam0': the threshold {calibration.threshold:.6g} was calibrated under the ignore mask sha256 "
            f"{calibration.ignore_mask[:12]}, this camera judges whole images") in warned.stderr
    quiet = run_mrkd(masked_model, "--source", frames, "--ignore-mask", mask, "--status-every", "0")
    assert quiet.returncode == 0 and "was calibrated under" not in quiet.stderr, quiet.stderr
    # calibrated again without the mask: said, since the camera's threshold goes back to whole images
    again = run_calibrate(masked_model, folder, "--accept-shift")
    assert again.returncode == 0 and "its threshold was set under an ignore mask (sha256 " in again.stderr, again.stderr
    assert ModelMetadata.load(sidecar_path(masked_model)).calibration.ignore_mask is None


def test_the_operator_page_names_each_cameras_mask(model, mask, tmp_path):
    """The page's camera card (from the SSE hello and every status) says the camera's ignore mask, so an
    operator who sees a blemish pass knows that area is not judged."""
    import urllib.request
    from line_fixtures import PageRun
    from peers import require_program
    from test_operator_page import CHROMIUM, CHROMIUM_ARGS
    require_program(CHROMIUM, ["chromium"])
    from playwright.sync_api import sync_playwright
    rng = np.random.default_rng(8)
    parts = write_frames(tmp_path / "parts", [frame_with(rng), frame_with(rng, MASKED_DEFECT)])
    run = PageRun(model, "--source", parts, "--loop", "--trigger", "software", "--trigger-stdin",
                  "--ignore-mask", mask, "--status-every", "0")
    try:
        url = run.url
        with urllib.request.urlopen(url + "/events", timeout=10) as stream:
            hello = None
            while hello is None:         # a hello before the line started names no camera yet; one follows
                line = stream.readline().decode()
                if line.startswith("data: ") and '"cameras"' in line and json.loads(line[6:])["cameras"]:
                    hello = json.loads(line[len("data: "):])
        with sync_playwright() as playwright:       # what the card shows, in a real browser
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(url + "/")
                card = page.locator("#cam-cam0 dd[data-key=threshold]")
                card.wait_for(timeout=10000)
                page.wait_for_function("document.querySelector('#cam-cam0 dd[data-key=threshold]')"
                                       ".textContent.includes('ignore mask')", timeout=10000)
                shown = card.inner_text()
            finally:
                browser.close()
    finally:
        status = run.close()
    assert status == 0, run.stderr
    assert [c["ignore_mask"] for c in hello["cameras"]] == ["mask.png, 31.2% not judged"], hello["cameras"]
    assert shown.endswith(" · ignore mask mask.png, 31.2% not judged"), shown
