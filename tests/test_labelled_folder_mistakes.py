"""Two labelled-folder mistakes that gave silent wrong answers, said now by every reader of a test/
split: good parts in a folder named good in another case (Good/, GOOD/: read as a defect type, so the
F1 threshold and the AUROC were computed with good parts labelled defective) is refused, and images in
folders below a defect type's (or good/'s) folder, which no reader takes, are counted in a warning.
The user-facing commands run as a user runs them (a subprocess: one "Error:" line, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from cli_errors import assert_one_line_error
from runtime_fixtures import export_tiny_model, normal_frame

TIMEOUT_S = 120


def mrkd(*args) -> subprocess.CompletedProcess:
    """``mrkd ARGS`` in a process of its own, warnings shown as the CLI shows them."""
    code = f"import sys\nfrom mrkd.cli import main\nsys.argv[0] = 'mrkd'\nmain({list(map(str, args))!r})"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S, env=env)


def images(folder: Path, count: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        cv2.imwrite(str(folder / f"{i:03d}.png"), normal_frame(rng))
    return folder


@pytest.fixture()
def model(tmp_path):
    path = export_tiny_model(tmp_path / "model.onnx")
    return path, (tmp_path / "model.onnx.json").read_text()


# beside good/ (two sources merged: calibrated without a word), or alone (refused before as "0 good, 5 defective")
@pytest.mark.parametrize("name, beside_good", [("Good", True), ("GOOD", True), ("Good", False)])
def test_calibrate_refuses_good_parts_in_a_folder_named_good_in_another_case(model, tmp_path, name, beside_good):
    path, sidecar = model
    good = images(tmp_path / "line", 4)
    test = tmp_path / "test"
    images(test / name, 3, seed=1)
    if beside_good:
        images(test / "good", 3, seed=5)
    images(test / "crack", 2, seed=2)
    error = assert_one_line_error(mrkd("calibrate", path, good, "--labelled", test), f"{test / name}/",
                                  "named exactly good/", "rename")
    assert "defect type" in error
    assert (tmp_path / "model.onnx.json").read_text() == sidecar          # nothing written


def test_calibrate_says_once_how_many_images_below_a_labelled_sub_folder_it_does_not_read(model, tmp_path):
    path, sidecar = model
    good = images(tmp_path / "line", 4)
    test = tmp_path / "test"
    images(test / "good", 3, seed=1)
    images(test / "crack", 2, seed=2)
    images(test / "crack" / "batch2", 5, seed=3)          # read by nothing before, said by nothing
    images(test / "crack" / "batch2" / "late", 1, seed=4)
    done = mrkd("calibrate", path, good, "--labelled", test)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    said = [line for line in done.stderr.splitlines() if "batch2" in line]
    assert len(said) == 1, done.stderr
    assert said[0].startswith(f"warning: {test / 'crack'}: 6 image(s) in folders below it are not read"), said[0]
    assert "good" not in {Path(line.split(":")[1].strip()).name for line in done.stderr.splitlines()
                          if line.startswith("warning:") and "folders below" in line}
    assert (tmp_path / "model.onnx.json").read_text() != sidecar           # calibrated all the same


def test_labelled_folder_for_a_checkpoint_refuses_the_same_way(tmp_path):
    # mrkd calibrate CKPT ... --labelled and an exported model's calibration read the folder through one function
    from mrkd.runtime.calibrate import CalibrationError, labelled_folder
    test = tmp_path / "test"
    images(test / "good", 2)
    images(test / "Good", 2)
    images(test / "crack", 2)
    with pytest.raises(CalibrationError, match=r"Good/: good parts go in a folder named exactly good/"):
        labelled_folder(test)


def _category(root: Path, good_name: str = "good") -> Path:
    """A category with test/good/ and test/crack/, and ``good_name``/ (more good parts) where it is another."""
    base = root / "cat"
    images(base / "train" / "good", 4)
    images(base / "test" / "good", 3, seed=1)
    images(base / "test" / good_name, 3, seed=3)
    images(base / "test" / "crack", 2, seed=2)
    return base


def test_evaluation_refuses_good_parts_in_a_folder_named_good_in_another_case(tmp_path):
    from mrkd.train.checkpoint import save_checkpoint
    from export_fixtures import small_model
    checkpoint = tmp_path / "model.ckpt"
    save_checkpoint(small_model(), checkpoint)
    base = _category(tmp_path / "data", "Good")
    assert_one_line_error(mrkd("eval", checkpoint, tmp_path / "data", "-c", "cat"), f"{base / 'test' / 'Good'}/",
                          "named exactly good/")


def test_scan_category_refuses_a_misnamed_good_folder_and_counts_nested_images(tmp_path):
    from mrkd.train.data import DataError, scan_category
    _category(tmp_path / "bad", "GOOD")
    with pytest.raises(DataError, match=r"GOOD/: good parts go in a folder named exactly good/"):
        scan_category(tmp_path / "bad", "cat", require_test=False)       # training reads test/ too: refused first
    base = _category(tmp_path / "data")
    images(base / "test" / "good" / "day1", 4, seed=5)
    images(base / "test" / "good" / ".thumbs", 2, seed=6)            # hidden: left out, not counted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = scan_category(tmp_path / "data", "cat")
    said = [str(w.message) for w in caught if "below it" in str(w.message)]
    assert said == [f"{base / 'test' / 'good'}: 4 image(s) in folders below it are not read (e.g. "
                    f"{str(Path('day1') / '000.png')!r}); mrkd reads the images directly in good/ only: move "
                    f"them up to use them"]
    assert len(data.test_items) == 5                      # the nested images are still not read
    assert sum(1 for w in caught if "below it" in str(w.message)) == 1      # crack/ has none: no word of it


def test_int8_defect_check_skips_a_split_with_a_misnamed_good_folder_saying_why(tmp_path):
    # its good parts would be checked as defect images; the export goes on with the good images' check
    from mrkd.export.int8 import held_out_defect_paths
    _category(tmp_path / "data", "Good")
    paths, where = held_out_defect_paths({"data_root": str(tmp_path / "data"), "category": "cat",
                                          "layout": "mvtec"})
    assert paths == [] and "Good/: good parts go in a folder named exactly good/" in where
