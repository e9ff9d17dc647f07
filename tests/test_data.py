"""scan_category errors and the torch datasets."""

import cv2
import numpy as np
import pytest
import torch

from mrkd.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD
from mrkd.train.augment import PRESETS, PatchSwap
from mrkd.train.data import (DataError, TestDataset, TrainDataset, list_categories, scan_category,
                             scan_folder)


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, array)
    buf.tofile(str(path))


def _category(root, name="part", n_train=4, size=(20, 30)):
    rng = np.random.default_rng(0)
    base = root / name
    for i in range(n_train):
        _png(base / "train" / "good" / f"{i:03d}.png", rng.integers(0, 256, size + (3,), dtype=np.uint8))
    _png(base / "test" / "good" / "000.png", rng.integers(0, 256, size + (3,), dtype=np.uint8))
    _png(base / "test" / "hole" / "000.png", rng.integers(0, 256, size + (3,), dtype=np.uint8))
    mask = np.zeros(size, np.uint8)
    mask[5:10, 10:20] = 255
    _png(base / "ground_truth" / "hole" / "000_mask.png", mask)
    (base / "train" / "good" / "notes.txt").write_text("not an image")
    return base


def test_scan_category_layout(tmp_path):
    _category(tmp_path)
    data = scan_category(tmp_path, "part")
    assert len(data.train_paths) == 4 and data.skipped_other == 1
    assert [(i.label, i.defect_type, i.mask_path is None) for i in data.test_items] == [
        (0, "good", True), (1, "hole", False)]
    assert list_categories(tmp_path) == ["part"]


def test_missing_folders_name_what_is_missing(tmp_path):
    with pytest.raises(DataError, match="missing folder .*nothing.*layout"):
        scan_category(tmp_path, "nothing")
    (tmp_path / "part" / "test").mkdir(parents=True)
    with pytest.raises(DataError, match=r"train[/\\]good"):
        scan_category(tmp_path, "part")


def test_empty_train_set(tmp_path):
    (tmp_path / "part" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no training images"):
        scan_category(tmp_path, "part")


def test_defect_without_mask(tmp_path):
    base = _category(tmp_path)
    (base / "ground_truth" / "hole" / "000_mask.png").unlink()
    with pytest.raises(DataError, match="000.png has no mask"):
        scan_category(tmp_path, "part", require_masks=True)
    # Without --require-masks: labelled per image, warned about once with the file named.
    with pytest.warns(UserWarning, match=r"1 defect image\(s\) have no mask.*hole.000\.png"):
        data = scan_category(tmp_path, "part")
    defect = [i for i in data.test_items if i.label == 1]
    assert len(defect) == 1 and defect[0].mask_path is None and not defect[0].pixel_labelled
    assert data.unmasked == [defect[0].path]


def test_defect_type_without_ground_truth_folder_loads_silently(tmp_path, recwarn):
    base = _category(tmp_path)
    _png(base / "test" / "crack" / "000.png", np.zeros((20, 30, 3), np.uint8))
    data = scan_category(tmp_path, "part")
    assert not [w for w in recwarn if "no mask" in str(w.message)]
    assert [(i.defect_type, i.pixel_labelled) for i in data.test_items] == [
        ("crack", False), ("good", True), ("hole", True)]
    with pytest.raises(DataError, match=r"crack.000\.png has no mask"):
        scan_category(tmp_path, "part", require_masks=True)


def test_corrupt_file_with_and_without_skip(tmp_path):
    base = _category(tmp_path)
    bad = base / "train" / "good" / "002.png"
    bad.write_bytes(b"garbage")
    data = scan_category(tmp_path, "part")
    with pytest.raises(DataError, match="002.png"):
        TrainDataset(data.train_paths, 16)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        data = scan_category(tmp_path, "part", skip_unreadable=True)
    assert data.skipped_unreadable == [str(bad)] and len(data.train_paths) == 3
    assert len(TrainDataset(data.train_paths, 16)) == 3


def test_scan_folder_and_glob(tmp_path):
    base = _category(tmp_path)
    folder = base / "train" / "good"
    assert len(scan_folder(folder)) == 4
    assert len(scan_folder(str(folder / "00[01].png"))) == 2
    with pytest.raises(DataError, match="no image files"):
        scan_folder(str(tmp_path / "*.jpg"))


def test_train_dataset_shapes_and_masked_difference(tmp_path):
    _category(tmp_path, n_train=5)
    data = scan_category(tmp_path, "part")
    plain = TrainDataset(data.train_paths, 24)
    clean, student = plain[0]
    assert clean.shape == (3, 24, 24) and clean.dtype == torch.float32
    assert torch.equal(clean, student)

    augmented = TrainDataset(data.train_paths, 24, augment=PatchSwap(PRESETS["texture"]), seed=3)
    for index in range(len(augmented)):
        clean_u8, student_u8, mask = augmented.augmented_pair(index)
        assert mask.any()
        outside = ~mask.astype(bool)
        np.testing.assert_array_equal(student_u8[outside], clean_u8[outside])
        assert (student_u8[mask.astype(bool)] != clean_u8[mask.astype(bool)]).any(axis=1).all()
    clean, student = augmented[1]
    expected = (torch.from_numpy(augmented.images[1][..., ::-1].copy()).permute(2, 0, 1) / 255.0
                - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(clean, expected.float(), atol=1e-5, rtol=0)
    assert not torch.equal(clean, student)


def test_workers_get_different_streams(tmp_path):
    _category(tmp_path, n_train=4)
    data = scan_category(tmp_path, "part")
    ds = TrainDataset(data.train_paths * 2, 16, augment=PatchSwap(PRESETS["texture"]))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2,
                                         generator=torch.Generator().manual_seed(0))
    first, second = [student for _, student in loader]
    # workers 0 and 1 see the same 4 clean images; independent streams make different patches
    assert not torch.equal(first, second)


def test_test_dataset_items(tmp_path):
    _category(tmp_path)
    data = scan_category(tmp_path, "part")
    ds = TestDataset(data.test_items, 10)
    image, mask, label, path = ds[1]
    assert image.shape == (3, 10, 10) and image.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.shape == (10, 10) and label == 1 and path.endswith("000.png")
    # mask rows 5:10 of 20 -> 2.5:5 of 10, cols 10:20 of 30 -> 3.3:6.7 of 10 (nearest sampling)
    assert mask[3:5, 4:6].all() and not mask[:2].any() and not mask[:, 8:].any()
    _, good_mask, good_label, _ = ds[0]
    assert good_label == 0 and not good_mask.any()


def test_a_killed_loader_worker_is_reported_without_torchs_sigchld_handler(tmp_path):
    """sigchld_kept keeps torch from installing its SIGCHLD handler while loaders run: a worker that
    dies is still reported (the loader's own polling) as an error, not a hang."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent('''
        import os, signal, sys, time, torch
        from mrkd.child_signal import sigchld_kept
        class Dying(torch.utils.data.Dataset):
            def __len__(self): return 8
            def __getitem__(self, i):
                if i == 3: os.kill(os.getpid(), signal.SIGKILL)
                return i      # no tensor: a tensor's storage goes over a file descriptor that the killed
                              # worker can leave half-passed (EOFError, not the loader's own report)
        started = time.monotonic()
        with sigchld_kept():
            assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
            try:
                for _ in torch.utils.data.DataLoader(Dying(), batch_size=1, num_workers=1, collate_fn=list):
                    pass
            except RuntimeError as exc:
                print("reported", round(time.monotonic() - started, 1), "|", exc)
            assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
    ''')
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("reported") and "exited unexpectedly" in done.stdout, done.stdout
    assert float(done.stdout.split()[1]) < 30


def test_16bit_images_in_low_12_bits_are_warned_about(tmp_path):
    # A 12-bit camera's frames saved as they came (0..4095 in 16 bits) read as 0..16 of 255: they trained
    # nearly black without a word. Full-range 16-bit and 8-bit images are not warned about.
    rng = np.random.default_rng(3)
    for i in range(3):
        _png(tmp_path / "low" / f"{i}.png", rng.integers(0, 4096, (16, 16), dtype=np.uint16))
        _png(tmp_path / "full" / f"{i}.png", rng.integers(0, 4096, (16, 16), dtype=np.uint16) << 4)
        _png(tmp_path / "bytes" / f"{i}.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    with pytest.warns(UserWarning, match=r"use only 12 of their 16 bits .*max 40\d\d\).*value << 4"):
        scan_folder(tmp_path / "low")
    base = _category(tmp_path / "data")
    for i in range(4):
        _png(base / "train" / "good" / f"{i:03d}.png", rng.integers(0, 1024, (20, 30), dtype=np.uint16))
    with pytest.warns(UserWarning, match="use only 10 of their 16 bits"):
        scan_category(tmp_path / "data", "part")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan_folder(tmp_path / "full")
        scan_folder(tmp_path / "bytes")


def test_the_16bit_check_decodes_only_files_whose_header_does_not_say_8_bits(tmp_path, monkeypatch):
    # Opening a folder decoded its first 8 images for this check alone, and again when they were used:
    # PNG, JPEG, BMP and WebP headers say 8 bits without decoding; a TIFF (or 16-bit PNG) is still decoded.
    from mrkd.runtime.images import declared_sample_bits, read_stored
    from mrkd.runtime.sources import open_source
    rng = np.random.default_rng(4)
    gray, colour = rng.integers(0, 256, (16, 16), dtype=np.uint8), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for name, array in [("a.png", gray), ("b.png", colour), ("c.jpg", colour), ("d.bmp", gray), ("e.webp", colour),
                        ("f.tif", gray)]:
        _png(tmp_path / "bytes" / name, array)
    _png(tmp_path / "low" / "a.png", rng.integers(0, 4096, (16, 16), dtype=np.uint16))
    _png(tmp_path / "low" / "b.jpg", colour)
    for path in [*sorted((tmp_path / "bytes").iterdir()), *sorted((tmp_path / "low").iterdir())]:
        bits = declared_sample_bits(path.read_bytes())
        expected = None if path.suffix == ".tif" else read_stored(path).dtype.itemsize * 8    # what OpenCV decodes
        assert bits == expected, (path.name, bits)

    decoded = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda data, flags: decoded.append(len(data)) or real(data, flags))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(scan_folder(tmp_path / "bytes")) == 6
        open_source(str(tmp_path / "bytes")).close()
    assert len(decoded) == 2                     # the TIFF, once per opening
    decoded.clear()
    with pytest.warns(UserWarning, match="use only 12 of their 16 bits"):
        scan_folder(tmp_path / "low")
    assert len(decoded) == 1                     # the 16-bit PNG, not the JPEG


def test_a_folder_is_listed_once_for_its_images_other_files_and_unread_formats(tmp_path, monkeypatch):
    # _image_files listed each train/test folder three times (images, other files, unread formats).
    from pathlib import Path
    from mrkd.runtime.images import list_images
    from mrkd.train.data import _image_files
    folder = tmp_path / "good"
    for name in ("a.png", "B.JPG", "c.tiff", ".hidden.png", "sub/d.png"):
        _png(folder / name, np.zeros((8, 8), np.uint8))
    (folder / "notes.txt").write_text("x")
    (folder / "phone.GIF").write_bytes(b"GIF89a")
    listings = []
    real = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: listings.append(self) or real(self))
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) in a format mrkd does not read \(e.g. 'phone.GIF'\)"):
        images, others = _image_files(folder)
    assert listings == [folder]
    monkeypatch.setattr(Path, "iterdir", real)
    assert images == list_images(folder) == [folder / "B.JPG", folder / "a.png", folder / "c.tiff"]
    assert others == 2                                              # notes.txt and the GIF


def test_images_in_formats_mrkd_does_not_read_are_warned_about(tmp_path):
    # A GIF among PNGs was left out of training, calibration and evaluation without a word; notes stay silent.
    base = _category(tmp_path / "data")
    (base / "train" / "good" / "phone shot.gif").write_bytes(b"GIF89a")
    with pytest.warns(UserWarning, match=r"good: skipped 1 image\(s\) in a format mrkd does not read \(e.g. "
                                         r"'phone shot.gif'\); convert them to PNG"):
        data = scan_category(tmp_path / "data", "part")
    assert len(data.train_paths) == 4 and data.skipped_other == 2
    (tmp_path / "folder").mkdir()
    _png(tmp_path / "folder" / "a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "folder" / "b.PGM").write_bytes(b"P5")
    with pytest.warns(UserWarning, match="b.PGM"):
        assert len(scan_folder(tmp_path / "folder")) == 1
    (tmp_path / "folder" / "b.PGM").unlink()
    (tmp_path / "folder" / "notes.txt").write_text("not an image")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan_folder(tmp_path / "folder")


def test_a_mask_without_its_test_image_is_warned_about(tmp_path):
    # ground_truth/<defect>/NNN_mask.png whose image was renamed or deleted (or whose defect folder was)
    # was ignored without a word: the evaluation covered fewer defects than the folder shows.
    import warnings
    base = _category(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan_category(tmp_path, "part")
    mask = np.zeros((20, 30), np.uint8)
    _png(base / "ground_truth" / "hole" / "001_mask.png", mask)
    _png(base / "ground_truth" / "scratch" / "000_mask.png", mask)
    with pytest.warns(UserWarning, match=r"part: 2 mask\(s\) in ground_truth/ have no test image and are not "
                                         r"evaluated \(a renamed or deleted image\?\): .*hole/001_mask.png, "
                                         r".*scratch/000_mask.png$"):
        data = scan_category(tmp_path, "part")
    assert [item.mask_path for item in data.test_items if item.label] == [str(base / "ground_truth" / "hole" /
                                                                            "000_mask.png")]


def test_hidden_folders_are_no_defect_types_categories_or_mask_folders(tmp_path, recwarn):
    # test/.thumbs/ became a defect type ".thumbs" (its images scored as defects), ground_truth/.thumbs/
    # held "orphan" masks, and data/.backup/train/ a category: hidden folders are skipped as hidden files are.
    rng = np.random.default_rng(1)
    base = _category(tmp_path)
    _png(base / "test" / ".thumbs" / "000.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    _png(base / "ground_truth" / ".thumbs" / "001_mask.png", np.zeros((20, 30), np.uint8))
    _png(tmp_path / ".backup" / "train" / "good" / "000.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    data = scan_category(tmp_path, "part")
    assert [(i.label, i.defect_type) for i in data.test_items] == [(0, "good"), (1, "hole")]
    assert not [w for w in recwarn if "thumbs" in str(w.message)]
    assert list_categories(tmp_path) == ["part"]
