"""The images of an MVTec-style test/ folder, labelled: good/ holds good parts (label 0), every other
visible sub-folder is one defect type (label 1).

The one statement of that rule for every reader of a test split (training's scan_category, `mrkd
calibrate --labelled`, the INT8 export's held-out defect images, the demo's clip and inspection cell),
so a folder one of them takes as a defect type is one for all. Each folder is listed by list_images'
rule (runtime.images.list_folder: its own files, not its sub-folders'; hidden ones left out), and
sub-folders by visible_subfolders (a .thumbs/ is no defect type). No torch: the runtime never
imports it.

Two mistakes in such a folder give a wrong answer without a word, so they are found here, once, for
every reader to say in its own way: good parts in a folder named good in another case (Good/, GOOD/, as
a Windows or macOS tool may write it) are read as a defect type (``misnamed_good``; the F1 threshold
and the AUROC then count good parts as defects), and images in folders below a sub-folder
(test/crack/batch2/) are read by no reader (``nested_images``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

from mrkd.runtime.images import PathLike, list_folder, visible_subfolders

# The sub-folder of good parts, its name compared exactly: "Good" is a defect type by the rule, which every
# reader refuses (LabelledImages.misnamed_good) rather than count good parts as defects.
GOOD = "good"
GOOD_LABEL, DEFECT_LABEL = 0, 1


@dataclass(frozen=True)
class LabelledFolder:
    """One visible sub-folder of test/: good/ or one defect type."""
    name: str                   # the folder's name: "good" or the defect type
    folder: Path
    images: Tuple[Path, ...]    # image files directly in it, sorted by path (list_images' rule)
    others: Tuple[Path, ...]    # its other visible files (notes, formats mrkd does not read), sorted
    nested_images: Tuple[Path, ...]  # images in its visible folders below (any depth), sorted: no reader takes them

    @property
    def good(self) -> bool:
        return self.name == GOOD

    @property
    def label(self) -> int:
        return GOOD_LABEL if self.good else DEFECT_LABEL


@dataclass(frozen=True)
class LabelledImages:
    """A test/ folder's images by sub-folder. ``sub_folders`` keeps good/ where it sorts among the
    defect types, as the readers have always listed them (training's test items, calibration's
    labels and the demo cell's shuffle depend on that order)."""
    folder: Path
    sub_folders: Tuple[LabelledFolder, ...]     # every visible sub-folder, sorted by path (visible_subfolders)
    # the sub-folders named good in another case (Good/, GOOD/): defect types by the rule, most likely
    # good parts; set from sub_folders
    misnamed_good: Tuple[LabelledFolder, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "misnamed_good", tuple(sub for sub in self.sub_folders
                                                        if sub.name.lower() == GOOD and not sub.good))

    @property
    def good_folder(self) -> Optional[LabelledFolder]:
        """good/, or None where there is no such folder (missing, or a file of that name)."""
        return next((sub for sub in self.sub_folders if sub.good), None)

    @property
    def good(self) -> Tuple[Path, ...]:
        """The good images, sorted by path; none without a good/ folder."""
        good = self.good_folder
        return good.images if good is not None else ()

    @property
    def defect_types(self) -> Tuple[LabelledFolder, ...]:
        """The defect types' folders, sorted by path; an empty one is listed too."""
        return tuple(sub for sub in self.sub_folders if not sub.good)

    @property
    def defects(self) -> Tuple[Path, ...]:
        """Every defect image, one defect type after the other (the same as sorted by path)."""
        return tuple(path for sub in self.defect_types for path in sub.images)


def labelled_images(test_dir: PathLike) -> LabelledImages:
    """The labelled images of the MVTec-style ``test_dir`` (good/ and one sub-folder per defect type).
    ``test_dir`` must be a folder (FileNotFoundError / NotADirectoryError otherwise, as iterdir raises):
    each reader says in its own words what a missing test split means to it. Nothing is warned here;
    ``others``, ``nested_images`` and ``misnamed_good`` let a reader warn or refuse without listing a
    folder twice."""
    test_dir = Path(test_dir)
    subs = []
    for folder in visible_subfolders(test_dir):
        # one walk for the folder's own files and the images below it (a network share lists slowly)
        files = list_folder(folder, recursive=True)
        images = tuple(p for p in files.images if p.parent == folder)
        others = tuple(p for p in files.others if p.parent == folder)
        nested = tuple(p for p in files.images if p.parent != folder)
        subs.append(LabelledFolder(folder.name, folder, images, others, nested))
    return LabelledImages(test_dir, tuple(subs))


def misnamed_good_text(split: LabelledImages) -> Optional[str]:
    """The one line every reader refuses (or skips) a test folder with when good parts may sit in a
    folder named good in another case; None when there is no such folder."""
    if not split.misnamed_good:
        return None
    names = ", ".join(f"{sub.folder}/" for sub in split.misnamed_good)
    return (f"{names}: good parts go in a folder named exactly {GOOD}/ (a folder named "
            f"{split.misnamed_good[0].name}/ is read as a defect type otherwise); rename it")
