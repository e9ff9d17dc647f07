"""Evaluation files and numbers; prediction outputs, decisions and skipped unreadable files."""

import csv
import functools
import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from mrkd.train.checkpoint import load_checkpoint
from mrkd.train.data import scan_category
from mrkd.cli import main
from mrkd.train.evaluate import evaluate, evaluate_all, find_checkpoints, format_table
from mrkd.train.predict import predict
from train_fixtures import CATEGORY, IMAGE_SIZE, temp_dir, tiny_data, trained_run

pytestmark = pytest.mark.slow


def _final():
    return load_checkpoint(Path(trained_run()["out_dir"]) / "last.ckpt")


@functools.lru_cache(maxsize=None)
def _evaluation(out_dir: str) -> dict:
    """One evaluate() of the run's final checkpoint, shared by the tests below (it is the slow part)."""
    return evaluate(_final(), tiny_data(), CATEGORY, out_dir=out_dir, progress=False)


EVAL_DIR = str(temp_dir("mrkd-eval-"))


def test_evaluate_writes_metrics_json_and_pngs():
    tmp_path = Path(EVAL_DIR)
    result = _evaluation(EVAL_DIR)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "aupro_paper", "precision", "recall", "f1", "threshold"):
        assert saved[key] == pytest.approx(result[key])
    assert saved["n_good"] == 12 and saved["n_defect"] == 15
    for name in ("roc.png", "score_histogram.png"):
        image = cv2.imread(str(tmp_path / name))
        assert image is not None and image.shape[0] > 100
    overlays = sorted((tmp_path / "overlays").glob("*.png"))
    assert len(overlays) == 8
    assert cv2.imread(str(overlays[0])).shape == (IMAGE_SIZE, IMAGE_SIZE, 3)

    table = format_table({CATEGORY: result})
    assert CATEGORY in table and f"{result['image_auroc']:.4f}" in table


def test_evaluate_all_on_a_run_folder_matches_single_evaluation(tmp_path):
    run_root = Path(trained_run()["out_dir"]).parent
    results = evaluate_all(run_root, tiny_data(), out_dir=tmp_path, progress=False)
    single = _evaluation(EVAL_DIR)
    assert list(results) == [CATEGORY]
    assert results[CATEGORY]["image_auroc"] == pytest.approx(single["image_auroc"])
    assert (tmp_path / CATEGORY / "metrics.json").is_file() and (tmp_path / "metrics.json").is_file()
    # the numbers say which model file they are of, in both files (hash computed here)
    checkpoint = find_checkpoints(run_root, [CATEGORY])[CATEGORY]
    sha = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    for saved in (json.loads((tmp_path / CATEGORY / "metrics.json").read_text()),
                  json.loads((tmp_path / "metrics.json").read_text())[CATEGORY]):
        assert saved["checkpoint"] == str(checkpoint) and saved["checkpoint_sha256"] == sha
        assert saved["data_root"] == str(Path(tiny_data()).resolve())
    # a second evaluation into the same folder is refused in one line, before it runs, and changes nothing
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    result = CliRunner().invoke(main, ["eval", str(run_root), str(tiny_data()), "-o", str(tmp_path)])
    assert result.exit_code != 0 and "holds an earlier evaluation" in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    (tmp_path / CATEGORY / "overlays" / "stale.png").write_bytes(b"x")
    evaluate_all(run_root, tiny_data(), out_dir=tmp_path, progress=False, replace=True)
    assert not (tmp_path / CATEGORY / "overlays" / "stale.png").exists()
    assert len(list((tmp_path / CATEGORY / "overlays").glob("*.png"))) == 8


def test_predict_scores_decisions_maps_and_skips_a_corrupt_file(tmp_path):
    items = scan_category(tiny_data(), CATEGORY).test_items
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    labels = {}
    for index, item in enumerate(items):
        target = inputs / f"{index:02d}_{item.defect_type}.png"
        shutil.copy(item.path, target)
        labels[str(target)] = item.label
    (inputs / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")

    model = _final()
    out = tmp_path / "out"
    summary = predict(model, inputs, out, batch_size=4, progress=False)
    assert summary["n_skipped"] == 1 and summary["skipped"][0][0].endswith("zz_corrupt.png")
    assert summary["n_scored"] == len(items)

    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(items)
    threshold = model.calibration.threshold
    for row in rows:
        score = float(row["score"])
        assert row["decision"] == ("anomalous" if score >= threshold else "good")
        amap = np.load(out / "maps" / f"{Path(row['path']).stem}.npy")
        assert amap.shape == (IMAGE_SIZE, IMAGE_SIZE) and amap.max() == pytest.approx(score, rel=1e-6)
        assert (out / "overlays" / f"{Path(row['path']).stem}.png").is_file()
    # predict reads files itself; evaluate goes through the test DataLoader: same image AUROC.
    scores = [float(row["score"]) for row in rows]
    expected = _evaluation(EVAL_DIR)["image_auroc"]
    assert roc_auc_score([labels[row["path"]] for row in rows], scores) == pytest.approx(expected)
    with open(out / "skipped.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 1
    # a second prediction into the same folder is refused before anything is written (it mixed two runs)
    from mrkd.errors import SettingError
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SettingError, match="holds an earlier prediction"):
        predict(model, items[0].path, out, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_predict_a_single_file(tmp_path):
    item = scan_category(tiny_data(), CATEGORY).test_items[0]
    summary = predict(_final(), item.path, tmp_path, progress=False, write_overlays=False)
    assert summary["n_scored"] == 1 and not (tmp_path / "overlays").exists()


def test_eval_command_warns_on_a_foreign_category_and_applies_test_time_masking(tmp_path):
    """`mrkd eval` is evaluate_all: a checkpoint trained on another category is named in a warning,
    and --test-time-mask changes the scores (so the override reached the model)."""
    from click.testing import CliRunner
    from mrkd.cli import main
    checkpoint = Path(trained_run()["out_dir"]) / "last.ckpt"
    data = tmp_path / "data"
    data.mkdir()
    (data / "washer").symlink_to(Path(tiny_data()) / CATEGORY, target_is_directory=True)
    warnings = []
    plain = evaluate_all(checkpoint, data, ["washer"], progress=False, warn=warnings.append)
    assert len(warnings) == 1 and f"trained on '{CATEGORY}'" in warnings[0] and "washer" in warnings[0]
    masked = evaluate_all(checkpoint, data, ["washer"], progress=False, test_time_mask=True)
    assert masked["washer"]["image_auroc"] != pytest.approx(plain["washer"]["image_auroc"], abs=1e-9) or \
        masked["washer"]["pixel_auroc"] != pytest.approx(plain["washer"]["pixel_auroc"], abs=1e-9)
    result = CliRunner().invoke(main, ["eval", str(checkpoint), str(data), "-c", "washer"])
    assert result.exit_code == 0, result.output
    assert f"trained on '{CATEGORY}'" in result.output and "washer" in result.output
