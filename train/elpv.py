"""Real images in the loop: the ELPV solar-cell set (PyPI ``elpv-dataset``) as MVTec-layout categories.

The package ships 2,624 electroluminescence images of solar cells (300×300, 8-bit grayscale) and a
``labels.csv`` with one row per cell: file name, defect probability (0, 1/3, 2/3 or 1, from expert
votes) and module type (``mono`` / ``poly``). ``layout_elpv`` lays them out as two categories,
``elpv_mono`` and ``elpv_poly``, with a fixed rule that every run on every machine reproduces:

* ``h = int(sha1(file name, e.g. b"cell0001.png").hexdigest()[:8], 16) % 100`` — a stable hash of
  the cell, independent of file order and of Python's randomised ``hash``;
* good (probability 0): ``h < 20`` → ``test/good``; otherwise training data. Of the training data,
  ``20 <= h < 30`` is the **validation** share (see ``split`` below), the rest ``train/good``;
* defective (probability 1): ``h < 20`` is reserved for validation and never appears in the test
  split; the rest → ``test/defect``;
* uncertain (probability 1/3 or 2/3): left out everywhere, and counted (``ElpvLayout.uncertain``).

There are no pixel masks: image-level labels only (no ``ground_truth/`` folder).

``split="test"`` (the default) writes the final-number layout: ``train/good`` = every training good
cell (validation share included), ``test`` = the held-out good cells and the test defects.
``split="validation"`` writes the tuning layout: ``train/good`` = training good cells without the
validation share, ``test/good`` = the validation share, ``test/defect`` = the reserved defects. So
settings are chosen on validation numbers, and the test split's labels are never looked at until the
final numbers are reported.

``max_per_class`` (CI quick mode) keeps, in each folder, the N cells with the smallest
``(h, file name)`` — a fixed subset, the same everywhere. ``max_train`` applies the same rule to
``train/good`` alone (a smaller, faster training set with the full test split).

    layout = layout_elpv("data/elpv")                 # data/elpv/elpv_mono/train/good/...
    print(layout.counts["elpv_mono"])                 # {"train_good": ..., "test_good": ..., ...}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from mrkd.atomic import atomic_write_text
from mrkd.errors import MrkdError

SCHEMA_VERSION = 1
CATEGORIES = {"mono": "elpv_mono", "poly": "elpv_poly"}
TEST_PERCENT = 20            # good cells with h < 20 are test images
VALIDATION_PERCENT = 10      # good cells with 20 <= h < 30 are the validation share of training
DEFECT_VALIDATION_PERCENT = 20  # defective cells with h < 20 are reserved for validation
SPLITS = ("test", "validation")
MANIFEST = "elpv_layout.json"


class ElpvError(MrkdError, ValueError):
    """The ELPV package or its labels file is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class ElpvCell:
    name: str            # e.g. "cell0001.png"
    path: str            # absolute path inside the package
    probability: float
    module_type: str     # "mono" | "poly"

    @property
    def hash_bucket(self) -> int:
        return cell_hash_bucket(self.name)


@dataclass
class ElpvLayout:
    """What layout_elpv wrote; also stored as ``<root>/elpv_layout.json``."""

    root: str
    split: str
    categories: List[str]
    counts: Dict[str, Dict[str, int]]            # category → train_good / test_good / test_defect
    uncertain: Dict[str, int]                    # category → cells with probability 1/3 or 2/3 left out
    max_per_class: Optional[int] = None
    link: str = "symlink"
    max_train: Optional[int] = None
    schema_version: int = SCHEMA_VERSION
    rule: str = field(default=(
        "h = int(sha1(name).hexdigest()[:8], 16) % 100; good: h<20 test, 20<=h<30 validation share "
        "of training, else train; defect (p=1): h<20 validation only, else test; p in {1/3, 2/3} left out"))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def cell_hash_bucket(name: str) -> int:
    """The stable 0..99 bucket of a cell's file name (see the module docstring)."""
    return int(hashlib.sha1(name.encode("utf-8")).hexdigest()[:8], 16) % 100


def package_labels_file() -> Path:
    """labels.csv of the installed elpv-dataset package (ElpvError if it is not installed)."""
    try:
        import elpv_dataset
    except ImportError:
        raise ElpvError("the ELPV images come from the PyPI package elpv-dataset: "
                        "pip install 'mrkd[bench]' (or pip install elpv-dataset)") from None
    labels = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    if not labels.is_file():
        raise ElpvError(f"{labels}: labels file missing from the elpv-dataset package")
    return labels


def read_labels(labels_file=None) -> List[ElpvCell]:
    """The cells listed in labels.csv (path, probability, type; whitespace-separated, as the package's
    own ``elpv_dataset.utils.load_dataset`` reads it, but without decoding 2,624 images)."""
    labels_file = Path(labels_file) if labels_file is not None else package_labels_file()
    base = labels_file.parent
    cells: List[ElpvCell] = []
    for number, line in enumerate(labels_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ElpvError(f"{labels_file}:{number}: expected 'path probability type', got {line!r}")
        rel, prob_text, module_type = parts
        try:
            probability = float(prob_text)
        except ValueError:
            raise ElpvError(f"{labels_file}:{number}: probability {prob_text!r} is not a number") from None
        if module_type not in CATEGORIES:
            raise ElpvError(f"{labels_file}:{number}: type {module_type!r} is not one of {sorted(CATEGORIES)}")
        path = base / rel
        cells.append(ElpvCell(Path(rel).name, str(path), probability, module_type))
    if not cells:
        raise ElpvError(f"{labels_file}: no cells listed")
    return cells


def assign(cell: ElpvCell, split: str) -> Optional[Tuple[str, str]]:
    """(folder under the category, kind) a cell goes to in ``split``, or None when it is left out."""
    h = cell.hash_bucket
    if cell.probability == 0.0:
        if h < TEST_PERCENT:
            return ("test/good", "test_good") if split == "test" else None
        if h < TEST_PERCENT + VALIDATION_PERCENT and split == "validation":
            return "test/good", "test_good"
        return "train/good", "train_good"
    if cell.probability == 1.0:
        if h < DEFECT_VALIDATION_PERCENT:
            return ("test/defect", "test_defect") if split == "validation" else None
        return ("test/defect", "test_defect") if split == "test" else None
    return None   # uncertain: counted by the caller


def _place(source: str, target: Path, link: str) -> None:
    if link == "symlink":
        try:
            os.symlink(source, target)
            return
        except OSError:     # file systems without symlinks (some Windows / network shares)
            pass
    shutil.copyfile(source, target)


def layout_elpv(root, split: str = "test", max_per_class: Optional[int] = None, link: str = "symlink",
                labels_file=None, max_train: Optional[int] = None) -> ElpvLayout:
    """Write ``<root>/elpv_mono`` and ``<root>/elpv_poly`` in MVTec layout (image labels only).

    ``root`` must be empty or a folder an earlier call wrote with the same arguments (then it is reused
    as is). ``link``: "symlink" (falls back to copying where symlinks fail) or "copy".
    """
    if split not in SPLITS:
        raise ElpvError(f"split {split!r}: expected one of {SPLITS}")
    if link not in ("symlink", "copy"):
        raise ElpvError(f"link {link!r}: expected 'symlink' or 'copy'")
    for name, value in (("max_per_class", max_per_class), ("max_train", max_train)):
        if value is not None and value < 1:
            raise ElpvError(f"{name} {value}: must be at least 1")
    root = Path(root)
    cells = read_labels(labels_file)

    placed: Dict[Tuple[str, str], List[ElpvCell]] = {}
    uncertain = {name: 0 for name in CATEGORIES.values()}
    for cell in cells:
        category = CATEGORIES[cell.module_type]
        where = assign(cell, split)
        if where is None:
            if cell.probability not in (0.0, 1.0):
                uncertain[category] += 1
            continue
        placed.setdefault((category, where[0]), []).append(cell)
    counts = {name: {"train_good": 0, "test_good": 0, "test_defect": 0} for name in CATEGORIES.values()}
    for (category, folder), members in placed.items():
        members.sort(key=lambda c: (c.hash_bucket, c.name))
        if max_per_class is not None:
            del members[max_per_class:]
        if max_train is not None and folder == "train/good":
            del members[max_train:]
        counts[category][folder.replace("/", "_")] = len(members)
    layout = ElpvLayout(str(root), split, sorted(CATEGORIES.values()), counts, uncertain, max_per_class, link,
                        max_train)

    manifest = root / MANIFEST
    if manifest.is_file():
        try:
            previous = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if previous == json.loads(layout.to_json()):
            return layout
        raise ElpvError(f"{root}: holds an ELPV layout written with other settings ({manifest}); "
                        f"use an empty folder")
    if root.exists() and any(root.iterdir()):
        raise ElpvError(f"{root}: folder is not empty; layout_elpv writes into an empty (or new) folder")
    for (category, folder), members in sorted(placed.items()):
        target_dir = root / category / folder
        target_dir.mkdir(parents=True, exist_ok=True)
        for cell in members:
            if not os.path.isfile(cell.path):
                raise ElpvError(f"{cell.path}: image listed in labels.csv is missing")
            _place(cell.path, target_dir / cell.name, link)
    atomic_write_text(manifest, layout.to_json())   # last: a half-written folder has no manifest
    return layout
