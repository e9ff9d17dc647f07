"""Threshold rules: the tolerance factor against simulation, and `mrkd calibrate` on a trained checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from mrkd.runtime.calibrate import CalibrationError, labelled_folder
from mrkd.runtime.calibration import threshold_from_good_scores, tolerance_factor


@pytest.mark.parametrize("n, coverage, confidence", [(6, 0.99, 0.95), (12, 0.95, 0.95), (40, 0.99, 0.95),
                                                     (6, 0.99, 0.75)])
def test_tolerance_factor_covers_as_promised(n, coverage, confidence):
    """Brute force: draw many samples of n normal scores; mean + k·s must lie above the true
    ``coverage`` quantile in a share ``confidence`` of them."""
    k = tolerance_factor(n, coverage, confidence=confidence)
    rng = np.random.default_rng(n)
    samples = rng.standard_normal((40_000, n))
    bounds = samples.mean(axis=1) + k * samples.std(axis=1, ddof=1)
    hit_rate = np.mean(bounds >= stats.norm.ppf(coverage))
    assert hit_rate == pytest.approx(confidence, abs=0.008)


@pytest.mark.parametrize("n", [2, 3, 6, 20, 200, 5000])
def test_tolerance_factor_matches_scipys_noncentral_t(n):
    """The runtime computes the noncentral t quantile itself (no SciPy on a Jetson); SciPy is the
    reference here, over coverages and confidences from the bulk to the far tail."""
    for coverage in (0.5, 0.9, 0.99, 0.999):
        for confidence in (0.05, 0.5, 0.75, 0.95, 0.999):
            reference = stats.nct.ppf(confidence, df=n - 1, nc=stats.norm.ppf(coverage) * np.sqrt(n)) / np.sqrt(n)
            assert tolerance_factor(n, coverage, confidence) == pytest.approx(reference, rel=1e-6, abs=1e-9)


def test_good_score_rules_refuse_non_finite_scores_and_bad_fractions():
    from mrkd.runtime.calibration import CalibrationError as RuleError
    with pytest.raises(RuleError, match="not finite"):
        threshold_from_good_scores([1.0, float("nan"), 2.0] * 5)
    with pytest.raises(RuleError, match="quantile"):
        threshold_from_good_scores(np.arange(20.0), quantile=1.5)
    with pytest.raises(RuleError, match="confidence"):
        threshold_from_good_scores(np.arange(20.0), method="tolerance", confidence=0.0)


def test_f1_rule_matches_brute_force():
    from mrkd.runtime.calibration import f1_optimal_threshold
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(labels, 0.8), 1)          # ties on purpose
    threshold, f1 = f1_optimal_threshold(labels, scores)
    best = max(((2 * np.sum((scores >= t) & (labels == 1)) /
                 (np.sum(scores >= t) + np.sum(labels == 1)), t) for t in np.unique(scores)),
               key=lambda pair: (pair[0], pair[1]))
    assert f1 == pytest.approx(best[0]) and threshold == best[1]


def test_tolerance_factor_shrinks_to_the_normal_quantile():
    ks = [tolerance_factor(n, 0.99) for n in (3, 6, 20, 100, 100_000)]
    assert all(a > b for a, b in zip(ks, ks[1:]))
    assert ks[-1] == pytest.approx(stats.norm.ppf(0.99), abs=0.02)
    with pytest.raises(ValueError):
        tolerance_factor(1, 0.99)


def test_tolerance_threshold_never_below_a_good_score():
    scores = np.r_[np.zeros(99), 100.0]      # one far outlier among 100 good scores
    threshold, method = threshold_from_good_scores(scores, 0.99, method="tolerance")
    assert method == "tolerance" and threshold == 100.0
    few = np.array([1.0, 1.2])               # too few for a standard deviation: max + 10% of the range
    assert threshold_from_good_scores(few, method="tolerance") == (pytest.approx(1.22), "max_margin")
    with pytest.raises(ValueError, match="threshold method 'median'"):
        threshold_from_good_scores(scores, method="median")


def test_labelled_folder_reads_mvtec_test_layout(tmp_path):
    import cv2
    for sub, count in (("good", 2), ("scratch", 1), ("hole", 2)):
        (tmp_path / sub).mkdir()
        for i in range(count):
            cv2.imwrite(str(tmp_path / sub / f"{i}.png"), np.zeros((8, 8, 3), np.uint8))
    paths, labels = labelled_folder(tmp_path)
    assert len(paths) == 5 and sorted(labels.tolist()) == [0, 0, 1, 1, 1]
    assert all((Path(p).parent.name == "good") == (label == 0) for p, label in zip(paths, labels))
    shutil.rmtree(tmp_path / "scratch")
    shutil.rmtree(tmp_path / "hole")
    with pytest.raises(CalibrationError, match=f"{tmp_path}: labelled calibration needs"):
        labelled_folder(tmp_path)


def test_labelled_folder_skips_hidden_folders_as_list_images_skips_hidden_files(tmp_path):
    # A viewer's .thumbs/ or Jupyter's .ipynb_checkpoints/ beside good/ was read as one more defect type:
    # its images (here thumbnails of good parts) were labelled defective without a word.
    import cv2
    for name in ("good/0.png", "crack/0.png", ".thumbs/0.png", ".ipynb_checkpoints/1.png", "good/.2.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / name), np.zeros((8, 8, 3), np.uint8))
    paths, labels = labelled_folder(tmp_path)
    assert paths == [str(tmp_path / "crack" / "0.png"), str(tmp_path / "good" / "0.png")]
    assert labels.tolist() == [1, 0]


@pytest.mark.slow
def test_calibrate_cli_rewrites_the_threshold_and_keeps_the_rest(tmp_path):
    import torch
    from click.testing import CliRunner
    from sklearn.metrics import f1_score

    from mrkd.train.checkpoint import load_checkpoint
    from mrkd.calibrate_cli import calibrate_command
    from train_fixtures import CATEGORY, tiny_data, trained_run

    source = Path(trained_run()["out_dir"]) / "last.ckpt"
    checkpoint = tmp_path / "last.ckpt"
    shutil.copy(source, checkpoint)
    category = Path(tiny_data()) / CATEGORY
    good, test = category / "train" / "good", category / "test"

    result = CliRunner().invoke(calibrate_command, [str(checkpoint), str(good), "--method", "tolerance",
                                                    "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "(tolerance, k " in result.output
    raw = torch.load(checkpoint, weights_only=True)
    assert raw["calibration"]["threshold_method"] == "tolerance"
    assert raw["calibration"]["n_good"] == len(list(good.iterdir()))
    assert raw["train_state"]["epoch"] == torch.load(source, weights_only=True)["train_state"]["epoch"]

    out = tmp_path / "f1.ckpt"
    result = CliRunner().invoke(calibrate_command, [str(checkpoint), str(good), "--labelled", str(test),
                                                    "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    model = load_checkpoint(out)
    assert model.calibration.method == "f1"
    # The F1 the file reports is the F1 sklearn measures at that threshold on the labelled images.
    paths, labels = labelled_folder(test)
    from mrkd.train.calibrate import score_images
    scores = score_images(model, paths)
    measured = f1_score(labels, scores >= model.calibration.threshold)
    assert model.calibration.f1_at_threshold == pytest.approx(measured, abs=1e-6)
    assert torch.load(checkpoint, weights_only=True)["calibration"]["threshold_method"] == "tolerance"  # untouched

    missing = CliRunner().invoke(calibrate_command, [str(checkpoint), str(tmp_path / "nope"), "--device", "cpu"])
    assert missing.exit_code != 0 and "nope" in missing.output

    # --out never writes over another file (the earlier run's output included); MODEL itself may be named
    before = out.read_bytes()
    again = CliRunner().invoke(calibrate_command, [str(checkpoint), str(good), "-o", str(out), "--device", "cpu"])
    assert again.exit_code == 2 and "exists" in again.output and out.read_bytes() == before
    keep = tmp_path / "notes.txt"
    keep.write_text("precious")
    again = CliRunner().invoke(calibrate_command, [str(checkpoint), str(good), "-o", str(keep), "--device", "cpu"])
    assert again.exit_code == 2 and keep.read_text() == "precious"
    same = CliRunner().invoke(calibrate_command, [str(checkpoint), str(good), "-o", str(checkpoint), "--device", "cpu"])
    assert same.exit_code == 0, same.output


def test_an_out_path_below_a_file_says_the_file_is_no_folder(tmp_path):
    """atomic_open made the folders above the file it writes; a file among them was reported as
    "<out>: File exists" (the file written did not exist), so `mrkd calibrate -o notes.txt/x.ckpt` read
    as a refusal to write over x.ckpt."""
    from mrkd.atomic import atomic_write_bytes
    (tmp_path / "notes.txt").write_text("a file")
    for target in (tmp_path / "notes.txt" / "x.ckpt", tmp_path / "notes.txt" / "deeper" / "x.ckpt"):
        with pytest.raises(NotADirectoryError) as raised:
            atomic_write_bytes(target, b"data")
        assert str(raised.value).endswith(f"{target}: {tmp_path / 'notes.txt'} is a file, not a folder")
    assert (tmp_path / "notes.txt").read_text() == "a file"


def test_labelled_folder_warns_like_training_about_unread_formats_and_12_bit_data(tmp_path):
    # Labelled calibration (mrkd calibrate --labelled) set a threshold on a folder with a GIF left out or
    # 12-bit frames read nearly black without a word, where training's folders warn.
    import warnings

    import cv2
    rng = np.random.default_rng(2)
    for sub in ("good", "hole"):
        (tmp_path / sub).mkdir()
        cv2.imwrite(str(tmp_path / sub / "0.png"), rng.integers(0, 4096, (8, 8), dtype=np.uint16) << 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labelled_folder(tmp_path)
    (tmp_path / "hole" / "1.gif").write_bytes(b"GIF89a")
    with pytest.warns(UserWarning, match=r"hole: skipped 1 image\(s\) in a format mrkd does not read"):
        assert len(labelled_folder(tmp_path)[0]) == 2
    (tmp_path / "hole" / "1.gif").unlink()
    for sub in ("good", "hole"):
        cv2.imwrite(str(tmp_path / sub / "0.png"), rng.integers(0, 1024, (8, 8), dtype=np.uint16))
    with pytest.warns(UserWarning, match=r"use only 10 of their 16 bits"):
        labelled_folder(tmp_path)
