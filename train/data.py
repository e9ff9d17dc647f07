"""Data sets for training and evaluation: MVTec AD layout scanning and the torch Datasets.

Layout of one category (MVTec AD; the embedded synthetic set writes the same):

    <root>/<category>/train/good/*.png            good images for training
    <root>/<category>/test/good/*                 good test images (label 0)
    <root>/<category>/test/<defect>/*             defective test images (label 1)
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png   (optional: see below)

Image-level labels are enough: a defect type without ground_truth/<defect>/ (or a defect image
without its mask) loads; it counts in the image metrics, and pixel metrics use the images that have
masks. ``require_masks=True`` makes a missing mask an error again.

A plain folder (or glob) of good images also works for training: scan_folder().
Images are decoded and pre-processed by mrkd.runtime (the same code the edge runtime runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from mrkd.console import warn_for_all_ranks
from mrkd.errors import MrkdError, SettingError
from mrkd.deps import require
from mrkd.runtime.image_folders import warn_left_out, warn_narrow_16bit, warn_unread_images
from mrkd.runtime.images import (ImageReadError, is_glob_pattern, list_folder, list_images, read_image, read_mask,
                                  visible_subfolders)
from mrkd.runtime.labelled_images import labelled_images, misnamed_good_text
from mrkd.runtime.preprocess import (CENTER_CROP_DIRECT_PIXELS, IMAGENET_MEAN, IMAGENET_STD, center_crop_geometry,
                                     normalize, resize_square)

torch = require("torch")
from torch.utils.data import Dataset, get_worker_info  # noqa: E402

LAYOUT_HELP = ("expected MVTec AD layout: <root>/<category>/train/good/<images>, "
               "<root>/<category>/test/<good|defect>/<images>, "
               "<root>/<category>/ground_truth/<defect>/<stem>_mask.png")


# Where image-level masking takes its patches from: the image itself (the official main.py passes
# same=True to its patch swap) or another random training image.
ILM_SOURCES = ("same", "other")


# Where a reader meets an unreadable image: the option that skips such files, for the CLI and for Python.
SKIP_UNREADABLE_HINT = ("take it out of the folder (training: mrkd train --skip-unreadable skips such files; "
                        "Python: skip_unreadable=True)")


class DataError(MrkdError, ValueError):
    """The data on disk does not match what mrkd needs; the message names the path."""


@dataclass(frozen=True)
class TestItem:
    __test__ = False              # not a pytest test class
    path: str
    label: int                    # 0 good, 1 defective
    defect_type: str              # "good" or the test/ sub-folder name
    mask_path: Optional[str]      # None for good images and for defect images labelled per image only

    @property
    def pixel_labelled(self) -> bool:
        """Whether every pixel's label is known: good images (all defect-free) and masked defects."""
        return self.label == 0 or self.mask_path is not None


@dataclass
class CategoryData:
    """What scan_category found for one category."""

    root: str
    category: str
    train_paths: List[str]
    test_items: List[TestItem]
    skipped_unreadable: List[str] = field(default_factory=list)
    skipped_other: int = 0        # files without an image extension (notes, thumbnails, ...)
    unmasked: List[str] = field(default_factory=list)   # defect images without a mask (image label only)

    @property
    def defect_types(self) -> List[str]:
        return sorted({item.defect_type for item in self.test_items if item.label == 1})


def _image_files(folder: Path) -> Tuple[List[Path], int]:
    """Image files directly in folder (list_images' rule) and the number of other files ignored; images
    in a format mrkd does not read are warned about, naming one."""
    listed = list_folder(folder)          # one listing for all three (a network share lists slowly)
    warn_unread_images(folder, files=listed.others)
    return list(listed.images), len(listed.others)


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        where = f"{path} is a file, not a folder" if path.exists() else f"missing folder {path}"
        raise DataError(f"{where} ({what}); {LAYOUT_HELP}")


def require_category_folders(root, category: str) -> None:
    """The folders scan_category needs (the category, train/good, test/), each a DataError naming the path:
    an evaluation of several categories checks them all before it evaluates any."""
    base = Path(root) / check_category(category)
    _require_dir(base, f"category {category!r}")
    _require_dir(base / "train" / "good", "good training images")
    _require_dir(base / "test", "test images")


def list_categories(root) -> List[str]:
    """Sub-folders of ``root`` that hold a train/ folder, sorted."""
    root = Path(root)
    _require_dir(root, "the data root")
    names = [p.name for p in visible_subfolders(root) if (p / "train").is_dir()]
    if not names:
        raise DataError(f"no categories under {root}: no <category>/train folder found; {LAYOUT_HELP}")
    return names


def _find_mask(gt_dir: Path, stem: str) -> Optional[Path]:
    for name in (f"{stem}_mask", stem):
        for extension in (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg", ".webp"):
            candidate = gt_dir / f"{name}{extension}"
            if candidate.is_file():
                return candidate
    return None


def _orphan_masks(gt_root: Path, test_items: Sequence["TestItem"]) -> List[str]:
    """Mask files under gt_root/<defect>/ that no test image takes as its mask: a renamed or deleted
    image (or defect folder) leaves its mask behind, and the evaluation covers fewer defects than the
    folder shows."""
    if not gt_root.is_dir():
        return []
    used = {item.mask_path for item in test_items}
    return [str(p) for gt_dir in visible_subfolders(gt_root)
            for p in list_images(gt_dir) if str(p) not in used]


def _readable(path: Path, reader) -> bool:
    try:
        reader(path)
        return True
    except ImageReadError:
        return False


def require_readable(paths: Sequence[str], role: str) -> None:
    """Decode each of ``paths`` now; the first that cannot be read is a DataError naming it and its
    ``role``. Training reads its held-out images only after the last epoch, so one broken file there
    left a long run uncalibrated (exit 0) where the same file among the fitted images stopped it at once."""
    for path in paths:
        try:
            read_image(path)
        except ImageReadError as exc:
            raise DataError(f"{exc}, {role} ({SKIP_UNREADABLE_HINT})") from exc


def check_category(category: str) -> str:
    """``category`` if it names one folder; a SettingError otherwise. It is joined to DATA_ROOT to read
    and to --out to write: "../other/washer" or an absolute path put last.ckpt and metrics outside --out
    (into the data folder itself)."""
    name = str(category)
    if not name.strip() or name in (".", "..") or Path(name).name != name:     # a separator, or a root
        raise SettingError(f"category {name!r}: a category is the name of one folder in DATA_ROOT, not a path "
                           f"(give DATA_ROOT as the folder above it)")
    return name


def scan_category(root, category: str, skip_unreadable: bool = False, require_test: bool = True,
                  require_masks: bool = False) -> CategoryData:
    """List the train and test files of one MVTec-layout category.

    Raises DataError (naming the path) for a missing folder or an empty train set, and with
    ``require_masks`` for a defect image without its mask. Without it such an image is labelled per
    image only (``mask_path`` None, listed in ``unmasked``); a defect type whose ground_truth/ folder
    exists but lacks some masks is warned about once, naming the files, and so are masks without their
    test image. skip_unreadable=True decodes every file now, and skips (with a warning) the ones that
    cannot be read instead of failing later.
    """
    base = Path(root) / check_category(category)
    _require_dir(base, f"category {category!r}")
    train_dir = base / "train" / "good"
    _require_dir(train_dir, "good training images")
    train_paths, skipped_other = _image_files(train_dir)
    if not train_paths:
        raise DataError(f"no training images in {train_dir} (extensions: png, jpg, jpeg, bmp, tif, tiff, webp)")

    test_items: List[TestItem] = []
    partly_masked: List[str] = []
    test_dir = base / "test"
    if test_dir.is_dir():
        split = labelled_images(test_dir)
        misnamed = misnamed_good_text(split)
        if misnamed:        # its good parts would count as defects in the AUROC: refused before training too
            raise DataError(misnamed)
        for sub in split.sub_folders:     # .thumbs/ is no defect type
            warn_left_out(sub)
            skipped_other += len(sub.others)
            for path in sub.images:
                mask_path = None
                if not sub.good:
                    gt_dir = base / "ground_truth" / sub.name
                    mask_path = _find_mask(gt_dir, path.stem)
                    if mask_path is None and (require_masks or gt_dir.is_dir()):
                        expected = gt_dir / (path.stem + '_mask.png')
                        if require_masks:
                            raise DataError(f"defect image {path} has no mask: expected {expected} "
                                            f"(without --require-masks it counts in the image metrics only)")
                        partly_masked.append(str(path))
                test_items.append(TestItem(str(path), sub.label, sub.name,
                                           None if mask_path is None else str(mask_path)))
    elif require_test:
        _require_dir(test_dir, "test images")
    if partly_masked:
        warn_for_all_ranks(f"{category}: {len(partly_masked)} defect image(s) have no mask in ground_truth/ and "
                           f"count in the image metrics only: {_some(partly_masked)}")
    orphans = _orphan_masks(base / "ground_truth", test_items)
    if orphans:
        warn_for_all_ranks(f"{category}: {len(orphans)} mask(s) in ground_truth/ have no test image and are not "
                           f"evaluated (a renamed or deleted image?): {_some(orphans)}")

    skipped: List[str] = []
    if skip_unreadable:
        readable = [_readable(p, read_image) for p in train_paths]
        skipped += [str(p) for p, ok in zip(train_paths, readable) if not ok]
        train_paths = [p for p, ok in zip(train_paths, readable) if ok]
        kept_test = []
        for item in test_items:
            ok = _readable(Path(item.path), read_image) and (
                item.mask_path is None or _readable(Path(item.mask_path), read_mask))
            (kept_test if ok else skipped).append(item if ok else item.path)
        test_items = kept_test
        if skipped:
            warn_for_all_ranks(f"{category}: skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}")
        if not train_paths:
            raise DataError(f"no readable training images in {train_dir}")
    warn_narrow_16bit(train_paths, str(train_dir))
    unmasked = [item.path for item in test_items if not item.pixel_labelled]
    return CategoryData(str(root), category, [str(p) for p in train_paths], test_items, skipped, skipped_other,
                        unmasked)


def _some(paths: Sequence[str], count: int = 3) -> str:
    """The first few paths of a list, for one-line messages."""
    shown = ", ".join(str(p) for p in paths[:count])
    return shown + (f" and {len(paths) - count} more" if len(paths) > count else "")


def scan_folder(folder, skip_unreadable: bool = False) -> List[str]:
    """Good images directly inside ``folder`` (not recursive), or matching a glob such as 'cam1/*.jpg'.
    skip_unreadable=True decodes every file now and skips (with a warning) those that cannot be read."""
    text = str(folder)
    if is_glob_pattern(text) and not Path(text).exists():
        paths = [str(p) for p in list_images(text)]
        if not paths:
            raise DataError(f"no image files match {text!r}")
    else:
        folder = Path(folder)
        if not folder.is_dir():
            # an image file given for its folder was called a "missing folder"
            where = f"{folder} is a file, not a folder" if folder.exists() else f"missing folder {folder}"
            raise DataError(f"{where} (a folder of good images, or a glob like 'dir/*.png')")
        found, _ = _image_files(folder)
        if not found:
            raise DataError(f"no image files in {folder} (extensions: png, jpg, jpeg, bmp, tif, tiff, webp)")
        paths = [str(p) for p in found]
    if skip_unreadable:
        readable = [p for p in paths if _readable(Path(p), read_image)]
        if len(readable) < len(paths):
            warn_for_all_ranks(f"{text}: skipped {len(paths) - len(readable)} unreadable file(s), e.g. "
                               f"{next(p for p in paths if p not in set(readable))}")
        if not readable:
            raise DataError(f"no readable training images in {text}")
        paths = readable
    warn_narrow_16bit(paths, text)
    return paths


def _nearest_sources(source: int, resized: int, start: int, count: int) -> np.ndarray:
    """The source lines cv2.resize(INTER_NEAREST) copies to output lines start .. start + count - 1
    when ``source`` lines become ``resized`` (floor of the output index times the inverse scale)."""
    inverse = 1.0 / (resized / source)
    return np.minimum(np.floor(np.arange(start, start + count) * inverse).astype(np.int64), source - 1)


def resize_mask(mask: np.ndarray, size: int, mode: str = "resize") -> np.ndarray:
    """A bool H×W defect mask on the model's square (the geometry of resize_square); never loses a defect.

    A pixel is defect when defect pixels cover at least half of it (area resize, close to the official
    bilinear resize + 0.5 threshold). A defect too small for that (a region of the touched pixels with
    none at half cover) keeps every pixel it touches, so a one-pixel defect of a large image stays
    one pixel at any size. In "center_crop" mode a defect outside the crop is outside the view.
    """
    import cv2
    from scipy import ndimage
    if mask.ndim != 2:
        raise ValueError(f"resize_mask expects an HxW mask, got shape {mask.shape}")
    height, width = mask.shape
    if mode == "resize":
        resized, (top, left) = (size, size), (0, 0)
    else:
        resized, (top, left) = center_crop_geometry(height, width, size)
    # One axis at a time, so a shrinking axis is always an exact area filter (covered share of each
    # output pixel) and an enlarging one copies the nearest value (which skips no source pixel).
    cover = mask.astype(np.float32)
    # A thin image's centre crop enlarges it past CENTER_CROP_DIRECT_PIXELS (a 1 x 16384 mask at 256: 4.3 GB
    # of cover for 256 x 256 of it): an enlarged axis then takes only the window's nearest source lines.
    direct = mode != "resize" and resized[0] * resized[1] > CENTER_CROP_DIRECT_PIXELS
    if direct and resized[0] > height:
        cover, top = cover[_nearest_sources(height, resized[0], top, size)], 0
    elif resized[0] != height:
        cover = cv2.resize(cover, (width, resized[0]),
                           interpolation=cv2.INTER_AREA if resized[0] < height else cv2.INTER_NEAREST)
    if direct and resized[1] > width:
        cover, left = cover[:, _nearest_sources(width, resized[1], left, size)], 0
    elif resized[1] != width:
        cover = cv2.resize(cover, (resized[1], cover.shape[0]),
                           interpolation=cv2.INTER_AREA if resized[1] < width else cv2.INTER_NEAREST)
    cover = cover[top:top + size, left:left + size]
    half, touched = cover >= 0.5, cover > 0
    regions, count = ndimage.label(touched, structure=np.ones((3, 3), bool))
    if count:
        has_half = np.zeros(count + 1, bool)
        has_half[regions[half]] = True
        half |= touched & ~has_half[regions]
    return np.ascontiguousarray(half)


def load_square(path, image_size: int, resize_mode: str) -> np.ndarray:
    """read_image + resize_square, with a DataError naming the file when it cannot be read."""
    try:
        return resize_square(read_image(path), image_size, resize_mode)
    except ImageReadError as exc:
        raise DataError(f"{exc} ({SKIP_UNREADABLE_HINT})") from exc


class _WorkerRandom:
    """A numpy Generator that is re-seeded in each DataLoader worker from torch's worker seed, so
    workers never share a random stream (and runs with a seeded DataLoader repeat)."""

    def __init__(self, seed: int):
        self.seed = seed
        self._owner = None
        self._rng = np.random.default_rng(seed)

    def get(self) -> np.random.Generator:
        info = get_worker_info()
        owner = None if info is None else (info.id, info.seed)
        if owner != self._owner:
            self._owner = owner
            self._rng = np.random.default_rng(self.seed if info is None else [self.seed, info.seed])
        return self._rng


class TrainDataset(Dataset):
    """Good training images -> (clean, student_input) float32 3×H×W tensors.

    All images are decoded once and kept as uint8 squares in memory. With ``augment`` (a PatchSwap),
    student_input is the clean image with patches swapped in (MRKD's image-level masking), taken from
    the image itself (``ilm_source="same"``, the official choice) or from another random training image
    (``"other"``); without it, student_input is the clean image.
    """

    def __init__(self, paths: Sequence[str], image_size: int, resize_mode: str = "resize",
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 augment=None, seed: int = 0, progress: bool = True, ilm_source: str = "same"):
        if len(paths) == 0:
            raise DataError("TrainDataset needs at least one image")
        if ilm_source not in ILM_SOURCES:
            raise SettingError(f"ilm_source must be one of {ILM_SOURCES}, got {ilm_source!r}")
        self.ilm_source = ilm_source
        from tqdm import tqdm
        self.paths = [str(p) for p in paths]
        self.image_size, self.resize_mode = image_size, resize_mode
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = augment
        self.images = [load_square(p, image_size, resize_mode)
                       for p in tqdm(self.paths, desc="loading images", unit="img", leave=False,
                                     disable=not progress or len(self.paths) < 100)]
        self._random = _WorkerRandom(seed)

    def set_epoch_seed(self, seed: int) -> None:
        """Restart the augmentation stream from ``seed`` (the trainer seeds each epoch, so a resumed
        run repeats the epochs it replays exactly)."""
        self._random = _WorkerRandom(seed)

    def __len__(self) -> int:
        return len(self.images)

    def augmented_pair(self, index: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(clean uint8, student-input uint8, changed-pixel mask uint8) for one image."""
        clean = self.images[index]
        if self.augment is None:
            return clean, clean, np.zeros(clean.shape[:2], np.uint8)
        rng = self._random.get()
        other = index
        if self.ilm_source == "other" and len(self.images) > 1:   # another image: draw from the others
            other = int(rng.integers(len(self.images) - 1))
            other += other >= index
        student, mask = self.augment(clean, self.images[other], rng)
        return clean, student, mask

    def __getitem__(self, index: int):
        clean, student, _ = self.augmented_pair(index)
        clean_t = torch.from_numpy(normalize(clean, self.mean, self.std))
        student_t = clean_t if student is clean else torch.from_numpy(normalize(student, self.mean, self.std))
        return clean_t, student_t


class TestDataset(Dataset):
    """Test items -> (image float32 3×H×W, mask bool H×W, label int, path str); loaded lazily."""

    __test__ = False              # not a pytest test class

    def __init__(self, items: Sequence[TestItem], image_size: int, resize_mode: str = "resize",
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.items = list(items)
        self.image_size, self.resize_mode = image_size, resize_mode
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """(uint8 square BGR image, bool square mask) for one item."""
        item = self.items[index]
        try:
            image = read_image(item.path)
            mask = np.zeros(image.shape[:2], bool) if item.mask_path is None else read_mask(item.mask_path)
        except ImageReadError as exc:
            raise DataError(f"{exc} ({SKIP_UNREADABLE_HINT})") from exc
        if mask.shape != image.shape[:2]:
            raise DataError(f"mask {item.mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {item.path} "
                            f"is {image.shape[1]}x{image.shape[0]}")
        return (resize_square(image, self.image_size, self.resize_mode),
                resize_mask(mask, self.image_size, self.resize_mode))

    def __getitem__(self, index: int):
        image, mask = self.load(index)
        item = self.items[index]
        return (torch.from_numpy(normalize(image, self.mean, self.std)), torch.from_numpy(mask),
                item.label, item.path)
