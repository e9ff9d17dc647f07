"""Calibration that looks wrong says so (issue 20.6), and one Calibration record everywhere (issue 19.4).

A recalibration whose good scores lie far from the good scores the model recorded (the median beyond
mean ± SHIFT_STDS·std, or the threshold moving by more than SHIFT_FACTOR) is refused without
--accept-shift; the frame size of `mrkd calibrate --size` is recorded and `mrkd run` at another size
warns. The rule is checked against a reading of it written here; the commands as subprocesses.
"""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from cli_errors import assert_one_line_error
from runtime_fixtures import defective_frame, export_tiny_model, normal_frame

from mrkd.runtime.calibration import (SHIFT_FACTOR, SHIFT_STD_FLOOR, SHIFT_STDS, Calibration,
                                     calibration_shift)
from mrkd.runtime.metadata import ModelMetadata, sidecar_path

TIMEOUT_S = 120


def mrkd(*args) -> subprocess.CompletedProcess:
    code = f"import sys\nfrom mrkd.cli import main\nsys.argv[0] = 'mrkd'\nmain({list(map(str, args))!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def looks_wrong(mean, std, old, scores, new) -> bool:
    """The rule as stated, written out again: the middle of the sorted scores, the floored spread, the ratio."""
    ordered = sorted(scores)
    half = len(ordered) // 2
    middle = ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2
    spread = max(std, SHIFT_STD_FLOOR * abs(mean))
    far = spread > 0 and abs(middle - mean) > SHIFT_STDS * spread
    moved = old > 0 and new > 0 and (new > SHIFT_FACTOR * old or old > SHIFT_FACTOR * new)
    return far or moved


def test_the_shift_rule_as_stated():
    rng = np.random.default_rng(7)
    flagged = 0
    for _ in range(400):
        mean, std = rng.uniform(0.5, 100), rng.uniform(0, 10)
        old = mean + rng.uniform(0, 4) * std
        scores = rng.normal(mean + rng.normal(0, 3) * std, std + 1e-3, size=int(rng.integers(1, 30)))
        new = float(max(scores.max(), 0)) * rng.uniform(0.3, 3)
        previous = Calibration(threshold=old, good_mean=mean, good_std=std, n_good=12)
        expected = looks_wrong(mean, std, old, scores.tolist(), new)
        assert (calibration_shift(previous, scores, new) is not None) == expected
        flagged += expected
    assert 40 < flagged < 360          # both sides of the rule were exercised
    # The reported case: good mean 49.6, threshold 49.7 -> 103.3 from 10 defective images.
    reported = Calibration(threshold=49.7, good_mean=49.6, good_std=1.2, n_good=20)
    message = calibration_shift(reported, np.full(10, 95.0), 103.3)
    assert "49.7 -> 103.3" in message and "--accept-shift" in message
    assert calibration_shift(None, np.full(10, 95.0), 103.3) is None      # nothing recorded: nothing to compare


@pytest.fixture
def model_and_folders(tmp_path):
    model = export_tiny_model(tmp_path / "model.onnx")
    rng = np.random.default_rng(3)
    folders = {}
    for name, make in (("good", normal_frame), ("defective", defective_frame)):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(10):
            cv2.imwrite(str(folder / f"{i:02d}.png"), make(rng))
        folders[name] = folder
    return model, folders


def test_calibrating_on_defective_parts_is_refused_unless_accepted(model_and_folders):
    from mrkd.runtime import Detector
    from mrkd.runtime.images import list_images, read_image
    model, folders = model_and_folders
    sidecar = sidecar_path(model)
    before = sidecar.read_bytes()
    old = ModelMetadata.load(sidecar).calibration

    line = assert_one_line_error(mrkd("calibrate", model, folders["defective"]))
    assert "--accept-shift" in line and str(model) in line and "nothing was written" in line
    assert sidecar.read_bytes() == before

    done = mrkd("calibrate", model, folders["defective"], "--accept-shift")
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "written because of --accept-shift" in line]
    assert len(warned) == 1 and warned[0].startswith(f"warning: {model}: threshold "), done.stderr
    new = ModelMetadata.load(sidecar).calibration
    detector = Detector(model)
    try:
        scores = detector([read_image(p) for p in list_images(folders["defective"])]).scores.astype(np.float64)
    finally:
        detector.close()
    assert new.previous_threshold == old.threshold
    assert new.threshold == pytest.approx(np.quantile(scores, 0.99), rel=1e-6)     # 10 images: the quantile rule
    assert new.threshold > SHIFT_FACTOR * old.threshold


def test_good_parts_pass_and_the_frame_size_is_recorded_and_checked(model_and_folders, tmp_path):
    model, folders = model_and_folders
    done = mrkd("calibrate", model, folders["good"], "--size", "32x24")
    assert done.returncode == 0, done.stderr
    assert "warning: " not in done.stderr.lower()
    assert ModelMetadata.load(sidecar_path(model)).calibration.frame_size == "32x24"

    other = mrkd("run", model, "--source", f"belt={folders['good']}", "--max-frames", "2", "--status-every", "0")
    assert other.returncode == 0, other.stderr
    warned = [line for line in other.stderr.splitlines() if "calibrated on frames at 32x24" in line]
    assert len(warned) == 1 and "'belt'" in warned[0] and "--size 32x24" in warned[0], other.stderr

    same = mrkd("run", model, "--source", f"belt={folders['good']}", "--max-frames", "2", "--status-every", "0",
                "--size", "32x24")
    assert same.returncode == 0, same.stderr
    assert "calibrated on frames at" not in same.stderr


def test_frame_size_in_a_sidecar_is_validated(tmp_path):
    from mrkd.runtime.calibration import CalibrationError
    assert Calibration.from_dict({"threshold": 1.0, "frame_size": "640X480"}).frame_size == "640x480"
    # "\u00b2x480": isdigit() is true of the superscript two, which int() refuses (it was a ValueError traceback)
    for bad in ("640", "0x480", "axb", 640, "\u00b2x480"):
        with pytest.raises(CalibrationError, match="frame_size"):
            Calibration.from_dict({"threshold": 1.0, "frame_size": bad}, "m.json")


def test_an_older_checkpoints_calibration_dict_becomes_the_record(tmp_path):
    import torch
    from mrkd.train.checkpoint import load_checkpoint
    from mrkd.train.model import build_model
    model = build_model("resnet18", teacher_weights="random", image_size=64)
    model.save(tmp_path / "new.ckpt")
    raw = torch.load(tmp_path / "new.ckpt", weights_only=True)
    assert raw["calibration"] == {}                      # uncalibrated: an empty entry, as before
    # What training wrote before the record existed: a plain dict, with a nested entry since dropped.
    raw["calibration"] = {"threshold": 0.42, "threshold_method": "quantile", "quantile": 0.99, "n_good": 7,
                          "good_mean": 0.3, "good_std": 0.05, "score_norm": {"good_min": 0.2}}
    torch.save(raw, tmp_path / "old.ckpt")
    loaded = load_checkpoint(tmp_path / "old.ckpt")
    assert isinstance(loaded.calibration, Calibration)
    assert (loaded.calibration.threshold, loaded.calibration.method, loaded.calibration.n_good) == (0.42, "quantile", 7)
    loaded.save(tmp_path / "again.ckpt")                 # written back in the record's own form
    again = torch.load(tmp_path / "again.ckpt", weights_only=True)["calibration"]
    assert again == Calibration.from_dict(raw["calibration"]).to_dict() and "score_norm" not in again
    raw["calibration"] = {"threshold": "high"}
    torch.save(raw, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="bad.ckpt.*threshold"):
        load_checkpoint(tmp_path / "bad.ckpt")
