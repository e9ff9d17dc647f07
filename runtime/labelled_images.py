"""The images of an MVTec-style test/ folder, labelled: good/ holds good parts (label 0), every other
visible sub-folder is one defect type (label 1).

The one statement of that rule for every reader of a test split (training's scan_category, `mrkd
calibrate --labelled`, the INT8 export's held-out defect images, the demo's clip and inspection cell),
so a folder one of them takes as a defect type is one for all. Each folder is listed by list_images'
rule (runtime.images.list_folder: its own files, not its sub-folders'; hidden ones left out), and
sub-folders by visible_subfolders (a .thumbs/ is no defect type). No torch: the runtime never
imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from mrkd.runtime.images import PathLike, list_folder, visible_subfolders

GOOD = "good"                   # the sub-folder of good parts; its name is compared exactly ("Good" is a defect type)
GOOD_LABEL, DEFECT_LABEL = 0, 1


@dataclass(frozen=True)
class LabelledFolder:
    """One visible sub-folder of test/: good/ or one defect type."""
    name: str                   # the folder's name: "good" or the defect type
    folder: Path
    images: Tuple[Path, ...]    # image files directly in it, sorted by path (list_images' rule)
    others: Tuple[Path, ...]    # its other visible files (notes, formats mrkd does not read), sorted

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
    ``others`` lets a reader warn about unread formats without listing a folder twice."""
    test_dir = Path(test_dir)
    subs = []
    for folder in visible_subfolders(test_dir):
        files = list_folder(folder)
        subs.append(LabelledFolder(folder.name, folder, files.images, files.others))
    return LabelledImages(test_dir, tuple(subs))
