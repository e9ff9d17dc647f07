"""Data as users have it, through the CLI: image-level labels, empty / full / one-pixel masks, real ELPV
cells without masks, an evaluation that fails during training, and what a run hands on."""

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from mrkd.cli import main
from mrkd.train.data import resize_mask
from train_fixtures import CATEGORY, temp_dir

pytestmark = pytest.mark.slow

def _train_args(epochs: int = 2, eval_every: int = 1) -> list:
    return ["--backbone", "resnet18", "--teacher-weights", "random", "--image-size", "64", "--epochs", str(epochs),
            "--batch-size", "4", "--device", "cpu", "--eval-every", str(eval_every), "--seed", "3"]


TRAIN = _train_args(epochs=1)


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def _weights(path):
    data = torch.load(path, weights_only=True)
    return {f"{part}.{k}": v for part in ("bottleneck", "student") for k, v in data[part].items()}


def _awkward_data() -> Path:
    """grain at 64 px, then: 'crack' without ground_truth/ (image labels only), one 'spot' mask empty,
    one 'scratch' mask full, and a new 'speck' type: a 512 px image whose mask is one pixel."""
    from mrkd.train.synthetic import generate_dataset
    root = temp_dir("mrkd-awkward-") / "data"
    generate_dataset(root, [CATEGORY], image_size=64, n_train=16, n_test_good=8, n_test_defect=3, seed=1,
                     progress=False)
    base = root / CATEGORY
    shutil.rmtree(base / "ground_truth" / "crack")
    spot = sorted((base / "ground_truth" / "spot").iterdir())[0]
    _png(spot, np.zeros(cv2.imread(str(spot), cv2.IMREAD_GRAYSCALE).shape, np.uint8))
    scratch = sorted((base / "ground_truth" / "scratch").iterdir())[0]
    _png(scratch, np.full(cv2.imread(str(scratch), cv2.IMREAD_GRAYSCALE).shape, 255, np.uint8))
    good = cv2.imread(str(sorted((base / "test" / "good").iterdir())[0]))
    large = cv2.resize(good, (512, 512), interpolation=cv2.INTER_LINEAR)
    large[301, 77] = 255
    _png(base / "test" / "speck" / "000.png", large)
    mask = np.zeros((512, 512), np.uint8)
    mask[301, 77] = 255
    _png(base / "ground_truth" / "speck" / "000_mask.png", mask)
    return root


def test_one_pixel_defect_of_a_512_px_image_stays_at_64_px():
    mask = np.zeros((512, 512), bool)
    mask[301, 77] = True
    for mode in ("resize", "center_crop"):
        small = resize_mask(mask, 64, mode)
        assert small.sum() == 1 and small[301 // 8, 77 // 8], mode
    # Ordinary masks: an output pixel is defect when at least half of its 8x8 source block is.
    block = np.zeros((512, 512), bool)
    block[100:228, 40:203] = True
    block[400, 400] = True       # and a lone pixel elsewhere keeps its own output pixel
    cover = block.reshape(64, 8, 64, 8).mean(axis=(1, 3))
    expected = cover >= 0.5
    expected[50, 50] = True
    np.testing.assert_array_equal(resize_mask(block, 64), expected)


def test_centre_crop_of_a_line_scan_mask_takes_the_window_without_the_huge_cover():
    # A 1 x 16384 mask's shorter side scaled to 64 made a 64 x 1048576 float cover (268 MB; 4.3 GB at 256)
    # to keep 64 x 64 of it. Nearest-neighbour: the window's columns 524256.. take source columns
    # floor(column / 64), i.e. 8191 for the first 32 and 8192 for the last 32; every row is the mask's row.
    from runtime_fixtures import traced_peak
    mask = np.zeros((1, 16384), bool)
    mask[0, 8192] = True
    out, peak = traced_peak(lambda: resize_mask(mask, 64, "center_crop"))
    expected = np.zeros((64, 64), bool)
    expected[:, 32:] = True
    np.testing.assert_array_equal(out, expected)
    assert peak < 8 * 2 ** 20
    # below the limit the exact resize path is kept: the same mask 64 times smaller
    small = np.zeros((1, 256), bool)
    small[0, 128] = True
    np.testing.assert_array_equal(resize_mask(small, 64, "center_crop"), expected)


def test_awkward_masks_train_and_evaluate_with_counts(tmp_path):
    root = _awkward_data()
    result = CliRunner().invoke(main, ["train", str(root), "-c", CATEGORY, "--out", str(tmp_path / "run"), *TRAIN])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    run = tmp_path / "run" / CATEGORY
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert all("image_auroc" in row and "monitoring only" in row["monitoring"] for row in history)

    with pytest.warns(UserWarning) as warned:
        result = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), str(root), "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    messages = [str(w.message) for w in warned]
    spot, scratch = (str(root / CATEGORY / "test" / kind / "000.png") for kind in ("spot", "scratch"))
    assert [m for m in messages if "1 defect image(s) have an empty mask" in m and spot in m]   # files named
    assert [m for m in messages if "covering the whole image" in m and scratch in m]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())[CATEGORY]
    # 8 good; defects: 5 types x 3 + the speck; crack (3) has no masks, one spot mask is empty, one
    # scratch mask is full; the one-pixel speck keeps its defect at 64 px.
    assert (metrics["n_good"], metrics["n_defect"]) == (8, 16)
    assert metrics["n_defect_without_mask"] == 3 and metrics["n_defect_empty_mask"] == 1
    assert metrics["n_defect_full_mask"] == 1 and metrics["n_defect_with_regions"] == 11
    assert metrics["empty_masks"] == [spot] and metrics["full_masks"] == [scratch]
    assert "11/16" in result.output and "pixel metrics over 12 of 16" in result.output
    assert all(metrics[k] is not None for k in ("pixel_auroc", "aupro", "aupro_paper"))

    # Image AUROC over every image, recomputed here from the final checkpoint's maps.
    from mrkd.train.checkpoint import load_checkpoint
    from mrkd.train.data import scan_category
    from mrkd.train.evaluate import maps_on_test_split
    items = scan_category(root, CATEGORY).test_items
    arrays = maps_on_test_split(load_checkpoint(run / "last.ckpt"), items, progress=False)
    assert len(items) == 24
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score([i.label for i in items], arrays["scores"]))

    strict = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), str(root), "--require-masks"])
    assert strict.exit_code == 1 and "crack" in strict.output and "has no mask" in strict.output


def test_real_elpv_cells_train_and_evaluate(tmp_path):
    pytest.importorskip("elpv_dataset")
    from mrkd.train.elpv import layout_elpv
    root = tmp_path / "elpv"
    layout = layout_elpv(root, max_per_class=8)
    category = "elpv_mono"
    assert layout.counts[category]["test_defect"] > 0 and not (root / category / "ground_truth").exists()
    result = CliRunner().invoke(main, ["train", str(root), "-c", category, "--out", str(tmp_path / "run"),
                                       *_train_args(epochs=1)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), str(root), "-c", category,
                                       "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())[category]
    assert metrics["n_defect"] == layout.counts[category]["test_defect"]
    assert metrics["n_good"] == layout.counts[category]["test_good"]
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and metrics["pixel_auroc"] is None and metrics["aupro"] is None
    assert metrics["n_defect_without_mask"] == metrics["n_defect"]
    assert "pixel metrics n/a" in result.output and f"0/{metrics['n_defect']}" in result.output
    # calibrate --labelled takes image labels only too (good/ and defect/ folders)
    calibrated = tmp_path / "f1.ckpt"
    result = CliRunner().invoke(main, ["calibrate", str(tmp_path / "run" / category / "last.ckpt"),
                                       str(root / category / "train" / "good"), "--labelled",
                                       str(root / category / "test"), "-o", str(calibrated), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert torch.load(calibrated, weights_only=True)["calibration"]["threshold_method"] == "f1"


def test_a_failing_evaluation_still_leaves_the_final_checkpoint(tmp_path):
    """(A broken held-out image no longer fails the calibration after training: it is refused before the
    first epoch, tests/test_train.py.)"""
    from mrkd.train.synthetic import generate_dataset
    root = tmp_path / "data"
    generate_dataset(root, [CATEGORY], image_size=64, n_train=12, n_test_good=4, n_test_defect=1, seed=4,
                     progress=False)
    broken_test = sorted((root / CATEGORY / "test" / "good").iterdir())[0]
    broken_test.write_bytes(b"not a png")
    result = CliRunner().invoke(main, ["train", str(root), "-c", CATEGORY, "--out", str(tmp_path / "run"), *TRAIN])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "test-split evaluation failed" in result.output and str(broken_test) in result.output
    final = torch.load(tmp_path / "run" / CATEGORY / "last.ckpt", weights_only=True)
    assert final["train_state"]["epoch"] == 1 and final["calibration"]["threshold"] > 0
    history = [json.loads(line) for line in (tmp_path / "run" / CATEGORY / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1] and str(broken_test) in history[0]["monitoring_error"]


def test_what_a_run_hands_on_is_the_final_epoch_whatever_the_test_metrics(tmp_path, capsys):
    """Evaluating every epoch or never gives the same final weights, and eval / export of the run
    folder use exactly them."""
    from mrkd.train.evaluate import find_checkpoints, run_checkpoint
    from mrkd.train.trainer import TrainConfig, train
    from train_fixtures import TINY, tiny_data, trained_run
    monitored = Path(trained_run()["out_dir"]) / "last.ckpt"          # TINY: test metrics every epoch
    train(tiny_data(), CATEGORY, tmp_path / CATEGORY, TrainConfig(**{**TINY, "eval_every": 0}),
          backbone="resnet18", teacher_weights="random", resume=False)
    unmonitored = tmp_path / CATEGORY / "last.ckpt"
    history = [json.loads(line) for line in monitored.with_name("history.jsonl").read_text().splitlines()]
    assert len({row["image_auroc"] for row in history}) > 1        # the test metric moved between epochs
    reference, ours = _weights(unmonitored), _weights(monitored)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    assert sorted(p.name for p in monitored.parent.glob("*.ckpt")) == ["last.ckpt"]
    assert find_checkpoints(monitored.parent.parent) == {CATEGORY: monitored}
    assert run_checkpoint(monitored.parent) == (monitored, CATEGORY)

    pytest.importorskip("onnx")
    exported = tmp_path / "exported"
    result = CliRunner().invoke(main, ["export", str(monitored.parent), "-o", str(exported), "--simplify", "never"])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((exported / "model.onnx.json").read_text())
    assert hashlib.sha256(monitored.read_bytes()).hexdigest() in json.dumps(sidecar)
    from mrkd.train.checkpoint import category_mismatch, load_checkpoint
    model = load_checkpoint(monitored)
    assert "trained on 'grain'" in category_mismatch(model, "washer", monitored)
    assert category_mismatch(model, CATEGORY, monitored) is None

    from mrkd.export.cli import _checkpoint_of_run
    capsys.readouterr()
    assert _checkpoint_of_run(monitored, "washer") == str(monitored)
    assert "trained on 'grain', not 'washer'" in capsys.readouterr().err
    assert _checkpoint_of_run(monitored.parent, None) == str(monitored) and not capsys.readouterr().err
