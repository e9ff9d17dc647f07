"""The embedded synthetic data set: determinism, MVTec layout, exact masks, gray non-square JPEGs."""

import json

import cv2
import numpy as np
import pytest

from mrkd.runtime.images import read_mask
from mrkd.train.augment import PRESETS, preset_for
from mrkd.train.data import TestDataset, TrainDataset, scan_category
from mrkd.train.synthetic import CATEGORIES, DEFECT_TYPES, generate_dataset, render_defect, render_good

SMALL = dict(image_size=48, n_train=3, n_test_good=2, n_test_defect=2, progress=False)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_byte_identical(tmp_path):
    generate_dataset(tmp_path / "a", seed=7, **SMALL)
    generate_dataset(tmp_path / "b", seed=7, **SMALL)
    generate_dataset(tmp_path / "c", seed=8, categories=["grain"], **SMALL)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b
    assert a["grain/train/good/000.png"] != _files(tmp_path / "c")["grain/train/good/000.png"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    summary = generate_dataset(root, **SMALL)
    return root, summary


def test_layout_matches_mvtec(dataset):
    root, summary = dataset
    assert set(summary["categories"]) == set(CATEGORIES)
    for category in CATEGORIES:
        data = scan_category(root, category)
        assert len(data.train_paths) == 3
        defects = [item for item in data.test_items if item.label == 1]
        assert sorted({item.defect_type for item in defects}) == sorted(DEFECT_TYPES)
        assert len(defects) == 2 * len(DEFECT_TYPES)
        for item in defects:
            raw = cv2.imread(item.mask_path, cv2.IMREAD_UNCHANGED)
            assert set(np.unique(raw)) == {0, 255}
            assert read_mask(item.mask_path).sum() >= 12


def test_masks_are_exactly_the_changed_pixels():
    # Re-render with the same generator state: the clean image is the first draw, so a defect image
    # and a good image from twin generators differ exactly where the mask says.
    for category in ("grain", "washer"):
        for defect in DEFECT_TYPES:
            image, mask = render_defect(category, defect, np.random.default_rng(11), image_size=64)
            clean = render_good(category, np.random.default_rng(11), image_size=64)
            changed = (image != clean).any(axis=2)
            np.testing.assert_array_equal(mask, changed)
            # clearly visible: the mean absolute change inside the mask is large
            assert np.abs(image.astype(int) - clean.astype(int))[mask].mean() > 40


def test_washer_is_an_object_with_defects_on_it(dataset):
    root, _ = dataset
    assert json.loads((root / "washer" / "mrkd_category.json").read_text())["kind"] == "object"
    assert preset_for("washer", root) == PRESETS["object"]
    assert preset_for("grain", root) == PRESETS["texture"]
    data = scan_category(root, "washer")
    for item in data.test_items:
        if item.label:
            image = cv2.imread(item.path)
            clean_bg = image.mean(axis=2) < 40
            mask = read_mask(item.mask_path)
            # defects sit on the ring: some masked pixels are bright metal unless it is a hole
            if item.defect_type != "missing":
                assert not (mask & clean_bg).all()


def test_gray_tiles_are_grayscale_non_square_jpegs_that_load(dataset):
    root, _ = dataset
    data = scan_category(root, "gray_tiles")
    for path in data.train_paths + [item.path for item in data.test_items]:
        assert path.endswith(".jpg")
        raw = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        assert raw.ndim == 2 and raw.shape == (48, 60)
    train = TrainDataset(data.train_paths, 32)
    assert train[0][0].shape == (3, 32, 32)
    test = TestDataset(data.test_items, 32)
    for index in range(len(test)):
        image, mask, label, _ = test[index]
        assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
        assert bool(mask.any()) == bool(label)


def test_refuses_to_overwrite_foreign_data(tmp_path):
    (tmp_path / "grain").mkdir()
    with pytest.raises(FileExistsError, match="refusing"):
        generate_dataset(tmp_path, categories=["grain"], **SMALL)


def test_regenerating_replaces_previous_output(tmp_path):
    generate_dataset(tmp_path, categories=["grain"], **{**SMALL, "n_train": 5})
    generate_dataset(tmp_path, categories=["grain"], **SMALL)
    assert len(list((tmp_path / "grain" / "train" / "good").iterdir())) == 3
