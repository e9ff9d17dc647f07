"""The ELPV layout: fixed hash split, uncertain cells left out, validation never touching the test split."""

import hashlib
import os

import numpy as np
import pytest

pytest.importorskip("elpv_dataset")

from mrkd.train.elpv import ElpvError, layout_elpv, package_labels_file  # noqa: E402


def _independent_labels():
    # The package's own reader (elpv_dataset.utils.load_dataset) parses labels.csv this way.
    data = np.genfromtxt(package_labels_file(), dtype=["|S19", "<f8", "|S4"], names=["path", "probability", "type"])
    names = [os.path.basename(p) for p in np.char.decode(data["path"])]
    return names, data["probability"], list(np.char.decode(data["type"]))


def _files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_layout_follows_the_documented_rule(tmp_path):
    names, probs, types = _independent_labels()
    test_layout = layout_elpv(tmp_path / "t", split="test")
    val_layout = layout_elpv(tmp_path / "v", split="validation")
    for module_type, category in (("mono", "elpv_mono"), ("poly", "elpv_poly")):
        expected = {"train_good": [], "test_good": [], "val_train": [], "val_good": [], "test_defect": [],
                    "val_defect": []}
        uncertain = 0
        for name, p, t in zip(names, probs, types):
            if t != module_type:
                continue
            h = int(hashlib.sha1(name.encode()).hexdigest(), 16) >> (160 - 32)
            h %= 100
            if p == 0:
                if h < 20:
                    expected["test_good"].append(name)
                else:
                    expected["train_good"].append(name)
                    (expected["val_good"] if h < 30 else expected["val_train"]).append(name)
            elif p == 1:
                (expected["val_defect"] if h < 20 else expected["test_defect"]).append(name)
            else:
                uncertain += 1
        t_root, v_root = tmp_path / "t" / category, tmp_path / "v" / category
        assert _files(t_root / "train" / "good") == sorted(expected["train_good"])
        assert _files(t_root / "test" / "good") == sorted(expected["test_good"])
        assert _files(t_root / "test" / "defect") == sorted(expected["test_defect"])
        assert _files(v_root / "train" / "good") == sorted(expected["val_train"])
        assert _files(v_root / "test" / "good") == sorted(expected["val_good"])
        assert _files(v_root / "test" / "defect") == sorted(expected["val_defect"])
        assert not (t_root / "ground_truth").exists()
        assert test_layout.uncertain[category] == val_layout.uncertain[category] == uncertain > 0
        assert test_layout.counts[category]["test_defect"] == len(expected["test_defect"])
        # validation images never appear in the test split's test folders
        test_images = set(expected["test_good"]) | set(expected["test_defect"])
        assert not test_images & (set(expected["val_good"]) | set(expected["val_defect"]))
    assert os.path.realpath(tmp_path / "t" / "elpv_mono" / "test" / "defect" / _files(
        tmp_path / "t" / "elpv_mono" / "test" / "defect")[0]).endswith(".png")


def test_subset_is_fixed_and_reusable(tmp_path):
    first = layout_elpv(tmp_path / "a", max_per_class=5, link="copy")
    second = layout_elpv(tmp_path / "b", max_per_class=5)
    for category in first.categories:
        for folder in ("train/good", "test/good", "test/defect"):
            a = _files(tmp_path / "a" / category / folder)
            assert a == _files(tmp_path / "b" / category / folder) and len(a) == 5
    assert not os.path.islink(tmp_path / "a" / "elpv_mono" / "train" / "good" / a[0])
    assert layout_elpv(tmp_path / "a", max_per_class=5, link="copy").counts == first.counts   # reused
    with pytest.raises(ElpvError, match="other settings"):
        layout_elpv(tmp_path / "a", max_per_class=6, link="copy")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.txt").write_text("x")
    with pytest.raises(ElpvError, match="not empty"):
        layout_elpv(tmp_path / "c")
    capped = layout_elpv(tmp_path / "e", max_train=7)
    assert capped.counts["elpv_poly"]["train_good"] == 7 and capped.counts["elpv_poly"]["test_defect"] > 300
    with pytest.raises(ElpvError, match="split"):
        layout_elpv(tmp_path / "d", split="train")
