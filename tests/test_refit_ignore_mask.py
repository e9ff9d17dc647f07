"""`mrkd refit --ignore-mask`: a camera that judges under an ignore mask gets a refit whose threshold is set
on its masked scores, not on whole images (which take in what the mask leaves out, e.g. a date code that
differs on every part, so the threshold would sit above the camera's scores and let defects pass).

The refit's masked threshold is checked against the runtime: the exported refit model run by the
Detector (ONNX Runtime), its maps masked as `mrkd run` masks them, and the calibration rule restated
here. Real ELPV cells through test_refit's fixture."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cli_errors import assert_one_line_error  # noqa: E402
from test_refit import good_marks, one_thread, parent, write_labels  # noqa: E402,F401

from mrkd.runtime.metadata import file_sha256  # noqa: E402
from mrkd.train.refit import RefitError, refit_checkpoint  # noqa: E402

CELL = 300                          # ELPV cells are 300 x 300
CODE = (slice(10, 110), slice(10, 150))   # where the "date code" is printed: rows, columns of the frame


def write_mask(path, shape=(CELL, CELL), area=CODE):
    """White over ``area`` (with a margin for the map's blur), black elsewhere."""
    import cv2
    mask = np.zeros(shape, np.uint8)
    rows, cols = area
    mask[max(rows.start - 20, 0):rows.stop + 20, max(cols.start - 20, 0):cols.stop + 20] = 255
    cv2.imwrite(str(path), mask)
    return path


def coded_good(parent, folder):
    """The fixture's held-out good cells, each with another 'date code' (random bright blocks) in CODE:
    what varies from part to part where the mask is drawn."""
    import cv2
    folder.mkdir()
    rng = np.random.default_rng(7)
    for path in sorted((parent / "good").iterdir()):
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        rows, cols = CODE
        block = rng.integers(0, 2, size=(10, 14)).repeat(10, 0).repeat(10, 1).astype(np.uint8) * 255
        image[rows, cols] = block
        cv2.imwrite(str(folder / path.name), image)
    return folder


def rule(scores):
    """The calibration rule for fewer than 10 good images, restated: max + 10 % of the range."""
    scores = np.asarray(scores, np.float64)
    return scores.max() + 0.1 * (scores.max() - scores.min())


def test_a_refit_under_a_mask_sets_the_threshold_on_the_scores_the_camera_takes(parent, tmp_path):
    from mrkd.runtime.calibrate import masked_scores as runtime_masked_scores
    from mrkd.runtime.calibration import ignore_mask_mismatch
    from mrkd.runtime.detector import Detector
    from mrkd.runtime.ignore_mask import load_ignore_mask
    from mrkd.runtime.images import read_image
    from mrkd.runtime.metadata import ModelMetadata, sidecar_path
    mask_path = write_mask(tmp_path / "mask.png")
    good = coded_good(parent, tmp_path / "good")
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 2))
    lines = []
    masked = refit_checkpoint(parent / "parent.ckpt", labels, str(good), tmp_path / "v2", echo=lines.append,
                              ignore_mask=mask_path)
    assert any("under ignore mask" in line and str(mask_path) in line for line in lines), lines
    # the runtime's judgement of the same held-out frames under the same mask, by the exported refit model
    frames = [read_image(p) for p in sorted(good.iterdir())]
    detector = Detector(tmp_path / "v2" / "model.onnx", backend="onnxruntime")
    try:
        camera_scores = runtime_masked_scores(detector, frames, load_ignore_mask(mask_path))
        whole_scores = detector(frames).scores
    finally:
        detector.close()
    assert masked.threshold_after == pytest.approx(rule(camera_scores), rel=2e-3, abs=1e-4)
    # the date code raised the whole images' scores: set on them the threshold is clearly higher
    assert rule(whole_scores) > 1.05 * masked.threshold_after, (rule(whole_scores), masked.threshold_after)
    # recorded with the threshold, in the checkpoint and the sidecar, so `mrkd run` can tell a camera without it
    sha256 = file_sha256(mask_path)
    assert masked.calibration["ignore_mask"] == sha256
    sidecar = ModelMetadata.load(sidecar_path(tmp_path / "v2" / "model.onnx"))
    assert sidecar.calibration.ignore_mask == sha256
    assert ignore_mask_mismatch(sidecar.calibration, sha256) is None
    assert "whole images" in ignore_mask_mismatch(sidecar.calibration, None)


def masked_run(parent, run, mask_sha256, count=2):
    """What `mrkd run --ignore-mask` leaves: alarm events recording the mask their scores were taken under,
    their evidence, and labels made from the log (as `mrkd review` makes them)."""
    from mrkd.runtime.review import LabelFile, label_events
    (run / "evidence").mkdir(parents=True)
    events = []
    for i, (_, image, _) in enumerate(good_marks(parent, count)):
        stored = run / "evidence" / f"m{i}.png"
        shutil.copy(image, stored)
        events.append({"event_id": f"m{i}", "time": "2026-12-07T18:00:00.000+00:00", "camera": "top",
                       "evidence": str(stored), "evidence_sha256": file_sha256(stored),
                       "ignore_mask_sha256": mask_sha256})
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    labels = run / "labels.jsonl"
    with LabelFile(labels) as handle:
        handle.extend(label_events(events, "good", who="tester", events_path=run / "events.jsonl"))
    return labels


def test_a_refit_without_the_mask_its_alarms_were_judged_under_is_refused_in_one_line(parent, tmp_path):
    from click.testing import CliRunner
    from mrkd.refit_cli import refit_command
    mask_path = write_mask(tmp_path / "mask.png")
    labels = masked_run(parent, tmp_path / "run", file_sha256(mask_path))
    good = str(parent / "good")
    runner = CliRunner()
    outcome = runner.invoke(refit_command, [str(parent / "parent.ckpt"), "--reviewed", str(labels), "--good", good,
                                            "--no-export", "-o", str(tmp_path / "v2")])
    assert_one_line_error(outcome, "--ignore-mask", file_sha256(mask_path)[:12], "camera top", "nothing written")
    assert not (tmp_path / "v2").exists()
    # with it: written, and nothing to warn about
    outcome = runner.invoke(refit_command, [str(parent / "parent.ckpt"), "--reviewed", str(labels), "--good", good,
                                            "--no-export", "-o", str(tmp_path / "v2"), "--ignore-mask", str(mask_path)])
    assert outcome.exit_code == 0, outcome.output
    assert "is not the mask" not in outcome.output
    # a mask drawn again (another file): said, and the threshold is set under the given one
    redrawn = write_mask(tmp_path / "redrawn.png", area=(slice(0, 120), slice(0, 160)))
    outcome = runner.invoke(refit_command, [str(parent / "parent.ckpt"), "--reviewed", str(labels), "--good", good,
                                            "--no-export", "-o", str(tmp_path / "v3"), "--ignore-mask", str(redrawn)])
    assert outcome.exit_code == 0, outcome.output
    assert "is not the mask the reviewed alarms" in outcome.output and file_sha256(mask_path)[:12] in outcome.output
    # a refit of the masked refit: its threshold was set under the mask, so a refit of it needs it too
    more = write_labels(tmp_path / "more.jsonl", good_marks(parent, 4)[2:])
    with pytest.raises(RefitError, match="the parent's threshold was set under an ignore mask"):
        refit_checkpoint(tmp_path / "v2" / "model.ckpt", more, good, tmp_path / "v4", export=False,
                         echo=lambda line: None)


def test_a_part_events_camera_record_names_the_mask_that_camera_judged_under():
    from mrkd.runtime.review import one_camera_event, review_rows
    part = {"event_id": "p1", "time": "2026-12-07T18:00:00.000+00:00", "verdict": "NG",
            "cameras": [{"camera": "left", "anomalous": True, "score": 3.0, "images": 1,
                         "ignore_mask_sha256": "a" * 64},
                        {"camera": "right", "anomalous": False, "score": 1.0, "images": 1,
                         "ignore_mask_sha256": None}]}
    assert one_camera_event(part)[0]["ignore_mask_sha256"] == "a" * 64
    assert one_camera_event(part, "right")[0]["ignore_mask_sha256"] is None
    assert [row[1]["ignore_mask_sha256"] for row in review_rows(part)] == ["a" * 64, None]


def test_images_of_another_size_than_the_mask_are_refused_naming_the_image(parent, tmp_path):
    from click.testing import CliRunner
    from mrkd.refit_cli import refit_command
    small = write_mask(tmp_path / "small.png", shape=(240, 320), area=(slice(20, 60), slice(20, 60)))
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 1))
    outcome = CliRunner().invoke(refit_command, [str(parent / "parent.ckpt"), "--reviewed", str(labels), "--good",
                                                 str(parent / "good"), "--no-export", "-o", str(tmp_path / "v2"),
                                                 "--ignore-mask", str(small)])
    assert_one_line_error(outcome, "small.png is 320x240", "is 300x300")
    outcome = CliRunner().invoke(refit_command, [str(parent / "parent.ckpt"), "--reviewed", str(labels), "--good",
                                                 str(parent / "good"), "--ignore-mask", str(tmp_path / "missing.png")])
    assert_one_line_error(outcome, "missing.png", "cannot read")
    assert not (tmp_path / "v2").exists()


def test_reweightings_component_maps_under_a_mask_give_the_masked_scores(parent, tmp_path):
    """--reweight chooses MRKD's share on component maps: under a mask their share-0.5 sum must score as
    the masked map does (the re-weighting compares the scores the camera would take)."""
    from mrkd.runtime.ignore_mask import load_ignore_mask
    from mrkd.train.checkpoint import load_checkpoint
    from mrkd.train.calibrate import score_images
    from mrkd.train.refit import DecodedImages, component_maps, masked_maps, share_scores
    model = load_checkpoint(parent / "parent.ckpt").eval()
    mask = load_ignore_mask(write_mask(tmp_path / "mask.png"))
    paths = [str(p) for p in sorted(coded_good(parent, tmp_path / "good").iterdir())]
    images = DecodedImages.of(model)
    camera = score_images(model, paths, 4, square=images.square, mask=mask, frame_hw=images.frame_hw)
    parts = masked_maps(component_maps(model, paths, None, 4, images), paths, mask, images, model)
    assert np.allclose(share_scores(*parts, 0.5), camera, rtol=1e-4, atol=1e-5)
    # and the mask took something away: unmasked, the date codes score higher
    unmasked = share_scores(*component_maps(model, paths, None, 4, images), 0.5)
    assert (unmasked >= camera - 1e-4).all() and (unmasked > camera * 1.05).any(), (unmasked, camera)


def test_calibrating_a_checkpoint_under_a_mask_sets_the_threshold_on_the_masked_maps(parent, tmp_path, monkeypatch):
    """`mrkd calibrate model.ckpt GOOD --ignore-mask MASK` (it was refused before: exported models only):
    the threshold is set on each map's maximum outside the mask, computed here from the checkpoint's own
    maps and the mask resized by area (more than half white: ignored), and the mask's sha256 is recorded.
    Calibrated again without it, the checkpoint says its threshold was set under a mask."""
    import cv2
    from click.testing import CliRunner
    from mrkd.calibrate_cli import calibrate_command
    from mrkd.runtime.calibration import Calibration
    from mrkd.train.calibrate import _as_batches
    from mrkd.train.checkpoint import load_checkpoint
    mask_path = write_mask(tmp_path / "mask.png")
    good = coded_good(parent, tmp_path / "good")
    import collections
    import mrkd.runtime.images as images
    decodes, real_decode = collections.Counter(), images._decode

    def counting(path):       # the one function that decodes a file
        decodes[str(path)] += 1
        return real_decode(path)
    monkeypatch.setattr(images, "_decode", counting)
    runner = CliRunner()
    outcome = runner.invoke(calibrate_command, [str(parent / "parent.ckpt"), str(good), "--ignore-mask", str(mask_path),
                                                "--out", str(tmp_path / "masked.ckpt"), "--accept-shift"])
    assert outcome.exit_code == 0, outcome.output
    # each image decoded once for its size (the mask) and its square (the model): it was three times
    assert sorted(decodes.values()) == [1] * len(list(good.iterdir())), decodes
    monkeypatch.undo()
    model = load_checkpoint(tmp_path / "masked.ckpt").eval()
    calibration = Calibration.of(model.calibration)
    assert calibration.ignore_mask == file_sha256(mask_path)
    size = model.config.image_size
    keep = ~(cv2.resize(cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE), (size, size), interpolation=cv2.INTER_AREA)
             .astype(np.float32) / 255 > 0.5)
    paths = [str(p) for p in sorted(good.iterdir())]
    with torch.no_grad():
        maps = torch.cat([model.anomaly_map(x) for x in _as_batches(paths, model, 8)])[:, 0].numpy()
    masked, whole = [m[keep].max() for m in maps], [m.max() for m in maps]
    assert calibration.threshold == pytest.approx(rule(masked), rel=1e-5)
    assert rule(whole) > 1.05 * calibration.threshold
    outcome = runner.invoke(calibrate_command, [str(tmp_path / "masked.ckpt"), str(good), "--accept-shift",
                                                "--out", str(tmp_path / "whole.ckpt")])
    assert outcome.exit_code == 0, outcome.output
    assert "its threshold was set under an ignore mask" in outcome.output
    assert Calibration.of(load_checkpoint(tmp_path / "whole.ckpt").calibration).ignore_mask is None
    small = write_mask(tmp_path / "small.png", shape=(240, 320), area=(slice(20, 60), slice(20, 60)))
    outcome = runner.invoke(calibrate_command, [str(parent / "parent.ckpt"), str(good), "--ignore-mask", str(small),
                                                "--out", str(tmp_path / "small.ckpt")])
    assert_one_line_error(outcome, "small.png is 320x240", "is 300x300")
    assert not (tmp_path / "small.ckpt").exists()
