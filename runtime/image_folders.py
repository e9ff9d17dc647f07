"""Warnings about a folder of images that mrkd would read otherwise than its owner expects: files in a
format mrkd does not read, images in folders below a test split's sub-folder (read by no one), and
16-bit images that hold a 10- or 12-bit camera's values in their low bits.

One check for every reader of folders (training, calibration, evaluation, the INT8 export's images and
mrkd run's folder source),
so a folder is trained on and judged the same way and warned about in the same words (under torchrun by
rank 0 alone: every rank reads the same folder). numpy + OpenCV only (the runtime never imports torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from mrkd.console import warn_for_all_ranks
from mrkd.runtime.images import (IMAGE_EXTENSIONS, ImageReadError, PathLike, declared_sample_bits, list_folder,
                                 read_stored)

# Image formats a camera tool or a phone may save that mrkd does not read (OpenCV before 4.11 has no GIF,
# and none reads HEIC or raw files): skipped like notes and thumbnails, but said, since a folder that
# mixes them with PNGs would train, calibrate or be judged on fewer images than its owner counts.
UNREAD_IMAGE_EXTENSIONS = (".gif", ".pgm", ".ppm", ".pbm", ".pnm", ".jp2", ".j2k", ".exr", ".hdr", ".heic",
                           ".heif", ".avif", ".jxl", ".dng", ".raw", ".cr2", ".nef")

# A 16-bit file whose pixels all stay below 4096 most likely holds a 10- or 12-bit camera's values in its
# low bits (a frame saved as it came). Scaled over 0..65535, as every 16-bit image is, it reads as nearly
# black (4095 -> 16 of 255), and differs from the same camera through mrkd run's gige:// source.
NARROW_16BIT_LIMIT = 4096
NARROW_16BIT_SAMPLE = 8       # images looked at (the first of the list): a warning, not a second decoding pass
HEADER_BYTES = 64 * 1024      # enough for a JPEG's frame header after its EXIF (thumbnail included)


def unread_images(folder: PathLike, recursive: bool = False, files: Optional[Sequence[Path]] = None) -> List[Path]:
    """The visible files in ``folder`` (and its sub-folders with ``recursive``, as a reader that walks
    them) whose extension is one of UNREAD_IMAGE_EXTENSIONS, sorted. Visible as list_images has it
    (runtime.images.list_folder): a GIF in .git/ is no more left out than a PNG there is taken. ``files``:
    the folder's files that are not images (FolderFiles.others), where the caller has listed it already."""
    if files is None:
        files = list_folder(folder, recursive).others
    return sorted(p for p in files if p.suffix.lower() in UNREAD_IMAGE_EXTENSIONS)


def warn_unread_images(folder: PathLike, recursive: bool = False, files: Optional[Sequence[Path]] = None) -> None:
    """Warn once, naming one, when ``folder`` holds images in a format mrkd does not read; silent otherwise.
    ``files``: as for unread_images."""
    unread = unread_images(folder, recursive, files)
    if unread:
        warn_for_all_ranks(f"{folder}: skipped {len(unread)} image(s) in a format mrkd does not read (e.g. "
                           f"{str(unread[0].relative_to(folder))!r}); convert them to PNG to use them (read: "
                           f"{', '.join(e[1:] for e in IMAGE_EXTENSIONS)})")


def warn_nested_images(folder: PathLike, nested: Sequence[Path]) -> None:
    """Warn once, naming one, when images lie in folders below ``folder`` that a reader of its own files
    (a test/ split's good/ or defect type, runtime.labelled_images) does not take; silent otherwise.
    ``nested``: those images (LabelledFolder.nested_images)."""
    if nested:
        folder = Path(folder)
        warn_for_all_ranks(f"{folder}: {len(nested)} image(s) in folders below it are not read (e.g. "
                           f"{str(Path(nested[0]).relative_to(folder))!r}); mrkd reads the images directly in "
                           f"{folder.name}/ only: move them up to use them")


def warn_left_out(sub) -> None:
    """Both warnings for one sub-folder of a labelled test/ split (a runtime.labelled_images.LabelledFolder,
    listed once): images in a format mrkd does not read, and images in folders below it. What every
    reader of a test/ split says about the files it leaves out."""
    warn_unread_images(sub.folder, files=sub.others)
    warn_nested_images(sub.folder, sub.nested_images)


def warn_narrow_16bit(paths: Sequence[PathLike], where: str) -> None:
    """Warn once when the 16-bit images among the first NARROW_16BIT_SAMPLE of ``paths`` all stay below
    NARROW_16BIT_LIMIT, saying how they are read and how to save them; silent otherwise."""
    tops = []
    for path in list(paths)[:NARROW_16BIT_SAMPLE]:
        if not _may_hold_16bit(path):
            continue
        try:
            stored = read_stored(path)
        except ImageReadError:          # said where the image is read for use
            continue
        if stored.dtype == np.uint16:
            tops.append((int(stored.max()), str(path)))
    if not tops or max(top for top, _ in tops) >= NARROW_16BIT_LIMIT:
        return
    top, example = max(tops)
    bits = max(top.bit_length(), 1)
    warn_for_all_ranks(f"{where}: 16-bit images use only {bits} of their 16 bits (e.g. {example}: max {top}); mrkd "
                       f"scales 16-bit images over 0..65535, so these read nearly black (0..{(top + 128) // 257} of "
                       f"255). If a {bits}-bit camera wrote them, save its values shifted to the top bits (value << "
                       f"{16 - bits}), as mrkd run's gige:// source reads Mono10/12")



def _may_hold_16bit(path: PathLike) -> bool:
    """False for a file whose header declares 8 bits per sample or fewer (most folders: their images are
    decoded when they are used, not for this check too); True where only decoding can tell."""
    try:
        with open(path, "rb") as handle:
            bits = declared_sample_bits(handle.read(HEADER_BYTES))
    except OSError:                     # said where the image is read for use
        return False
    return bits is None or bits > 8
