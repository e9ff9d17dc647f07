"""Read images and masks from disk into one canonical form: uint8 HxWx3 BGR (masks: bool HxW).

Factory data is messy: grayscale JPEGs, 16-bit TIFFs, PNGs with alpha, odd sizes, paths with
non-ASCII characters, phone JPEGs stored turned with an EXIF Orientation tag (turned upright here,
as a viewer shows them). Everything is decoded here, once, so the rest of mrkd sees a single format.
numpy + OpenCV only (the runtime never imports torch).
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Tuple, Union

import cv2
import numpy as np

from mrkd.errors import MrkdError
from mrkd.runtime.image_notes import note_alpha, note_pages
from mrkd.runtime.raw_image import RAW_SUFFIX
from mrkd.runtime.tiff import first_directory, read_header

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

PathLike = Union[str, os.PathLike]

# The most pixels an image may declare: 2**28 (16384 x 16384; 0.8 GB as 8-bit colour, twice that at 16
# bits). A file of a few KB can declare 60000 x 60000 (a "decompression bomb"): decoding it would take
# tens of GB, or OpenCV refuses with an exception of its own (cv2.error, over its 2**30 limit).
MAX_IMAGE_PIXELS = 2 ** 28


class ImageReadError(MrkdError, ValueError):
    """An image or mask file cannot be read; the message names the path and the reason."""

    def __init__(self, path: PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path!r}: {reason}")


class ImageListError(MrkdError, ValueError):
    """A folder-or-glob argument names no folder, glob pattern or image file."""


def is_image_file(path: PathLike) -> bool:
    """True when ``path``'s extension is one of IMAGE_EXTENSIONS (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_glob_pattern(text: PathLike) -> bool:
    """True when ``text`` holds a glob wildcard (``*``, ``?``, ``[``)."""
    return any(char in os.fspath(text) for char in "*?[")


def _hidden(path: Path, below: Optional[Path] = None) -> bool:
    """A dot-file, or (below ``below``) a file inside a dot-folder: editor, OS and VCS litter."""
    parts = path.relative_to(below).parts if below is not None else (path.name,)
    return any(part.startswith(".") for part in parts)


@dataclass(frozen=True)
class FolderFiles:
    """The visible regular files of a folder, split by list_images' rule."""
    images: Tuple[Path, ...]        # image files (IMAGE_EXTENSIONS, any case), sorted by path
    others: Tuple[Path, ...]        # the other visible files (notes, formats mrkd does not read, an
                                    # evidence frame's camera bits), sorted


def list_folder(folder: PathLike, recursive: bool = False) -> FolderFiles:
    """The files directly in ``folder`` (in its sub-folders too when ``recursive``), listed once: the
    images list_images takes and the other visible files, for callers that count or look at what was
    left out. Hidden files, anything in a hidden folder below ``folder`` (.git, .ipynb_checkpoints) and
    anything that is not a regular file are in neither. A recursive listing reads a linked folder as a
    folder (walk_files), as the glob form does."""
    folder = Path(folder)
    found = walk_files(folder) if recursive else folder.iterdir()
    visible = [p for p in found if p.is_file() and not _hidden(p, folder)]
    images = _without_camera_bits(p for p in visible if is_image_file(p))
    return FolderFiles(images=tuple(images), others=tuple(sorted(set(visible) - set(images))))


def _without_camera_bits(images: Iterable[Path]) -> List[Path]:
    """``images`` sorted, less each evidence frame's camera bits: mrkd's evidence of a GigE camera in
    Mono10-16 or Bayer keeps ``<name>.raw.png`` beside the judged ``<name>.png`` (runtime/raw_image.py),
    the same picture in values the model never sees (16-bit, or the mosaic read as grey): a folder of OK
    samples given to calibrate, refit or run would count each twice. Only where the frame is listed too."""
    images = sorted(images)
    listed = set(images)
    return [p for p in images
            if not (p.name.endswith(RAW_SUFFIX) and p.with_name(p.name[:-len(RAW_SUFFIX)] + ".png") in listed)]


def walk_files(folder: Path) -> Iterator[Path]:
    """Every entry below ``folder`` that is not a folder, at any depth, hidden folders not entered. Links to
    folders are followed (``ln -s /data/batch2 calib/batch2`` is read like a copy; pathlib's rglob skipped
    it without a word), each real folder once, under the first path that reaches it in sorted order, so a
    link back up (calib/loop -> calib) neither lists images twice nor walks forever."""
    entered = set()
    for below, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(below)
        if real in entered:
            folders[:] = []
            continue
        entered.add(real)
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        yield from (Path(below) / name for name in names)


def _glob_recursive(pattern: str) -> List[str]:
    """glob.glob(pattern, recursive=True) for a pattern with ``**``, over walk_files: the same matches
    (fnmatch per name, case-sensitive; ``**`` spans any number of folders; a wildcard does not match a
    hidden name unless that part of the pattern starts with a dot), but every real folder entered once.
    glob's own walk follows a link back up until the system refuses the path (a folder with one such
    link listed each image 40 times; two links, 2**40 paths: a hang)."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if is_glob_pattern(part) or part == "**")
    base, wanted = Path(*parts[:fixed]) if fixed else Path("."), parts[fixed:]
    if not base.is_dir():
        return []
    found = []
    for path in walk_files(base):
        relative = path.relative_to(base).parts
        if _parts_match(wanted, relative):
            found.append(str(path) if fixed else os.path.join(*relative))
    return found


def _parts_match(wanted: Tuple[str, ...], parts: Tuple[str, ...]) -> bool:
    if not wanted:
        return not parts
    if wanted[0] == "**":
        return _parts_match(wanted[1:], parts) or (
            bool(parts) and not parts[0].startswith(".") and _parts_match(wanted, parts[1:]))
    return (bool(parts) and (not parts[0].startswith(".") or wanted[0].startswith("."))
            and fnmatch.fnmatchcase(parts[0], wanted[0]) and _parts_match(wanted[1:], parts[1:]))


def visible_subfolders(folder: PathLike) -> List[Path]:
    """The folders directly in ``folder``, sorted by path, hidden ones (.thumbs, .ipynb_checkpoints, .git)
    left out as list_folder leaves out their files; a link to a folder counts, as a link to a file
    counts as a file. Every reader of one sub-folder per defect type, label or category uses this, so a
    thumbnail folder never becomes a defect type."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _hidden(p, folder))


def list_images(folder_or_glob: PathLike, recursive: bool = False) -> List[Path]:
    """The image files a folder, a glob or one image file names: the one rule every command uses.

    * a folder: the image files directly in it (in its sub-folders too when ``recursive``);
    * a glob such as ``'cam1/*.png'`` (``**`` spans folders when ``recursive``): the matching
      image files;
    * an image file: that file alone.
    Image files are regular files with one of IMAGE_EXTENSIONS (any case); hidden files (and, when
    recursive, anything in a hidden folder) are skipped, and so is an evidence frame's ``<name>.raw.png``
    listed beside its ``<name>.png`` (the camera's bits, runtime/raw_image.py); the list is sorted by path. An empty list
    means the folder or glob holds no images. ImageListError when the argument is none of the three
    (a missing path, a file that is not an image).
    """
    text = os.fspath(folder_or_glob)
    path = Path(text)
    if path.is_dir():
        return list(list_folder(path, recursive).images)
    if path.is_file() and is_image_file(path):
        return [path]
    if is_glob_pattern(text):
        matches = _glob_recursive(text) if recursive and "**" in text else globlib.glob(text)
        return _without_camera_bits(Path(p) for p in matches if os.path.isfile(p) and is_image_file(p)
                                    and not _hidden(Path(p)))
    what = "a file that is not an image" if path.is_file() else "not found"
    raise ImageListError(f"{text}: {what} (expected a folder of images, a glob like 'dir/*.png' or an image "
                         f"file; extensions: {', '.join(e[1:] for e in IMAGE_EXTENSIONS)})")


def declared_size(head) -> Optional[Tuple[int, int]]:
    """(width, height) a PNG, JPEG, BMP or TIFF (classic or Big) header declares, read from the file's bytes
    without decoding; None for other formats or a header not found there (OpenCV then decides)."""
    try:
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
        if head[:2] == b"BM":
            width, height = struct.unpack("<ii", head[18:26])
            return abs(width), abs(height)
        if read_header(head) is not None:        # classic or Big TIFF
            return _tiff_size(head)
        if head[:2] == b"\xff\xd8":
            return _jpeg_size(head)
    except struct.error:              # a header cut short: the decoder says what is wrong
        return None
    return None


def declared_sample_bits(head) -> Optional[int]:
    """Bits per sample a PNG, JPEG, BMP or WebP header declares (BMP and WebP: always 8 or fewer), read
    without decoding; None for other formats (TIFF among them) or a header not found in ``head``."""
    try:
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            return head[24]
        if head[:2] == b"BM" or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
            return 8
        if head[:2] == b"\xff\xd8":
            frame = _jpeg_frame(head)
            return None if frame is None else head[frame + 4]
    except (struct.error, IndexError):        # a header cut short: the decoder says what is wrong
        return None
    return None


def _jpeg_frame(head: bytes) -> Optional[int]:
    """Where the frame header (SOF0-SOF15 but DHT, JPG and DAC) begins, walking the markers before it."""
    at = 2
    while at + 4 <= len(head):
        if head[at] != 0xFF:
            return None
        marker = head[at + 1]
        if marker == 0xFF:                # fill byte
            at += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return at
        at += 2 + struct.unpack(">H", head[at + 2:at + 4])[0]
    return None


def _jpeg_size(head: bytes) -> Optional[Tuple[int, int]]:
    """The frame header's size."""
    at = _jpeg_frame(head)
    if at is None:
        return None
    height, width = struct.unpack(">HH", head[at + 5:at + 9])
    return width, height


def _tiff_size(head) -> Optional[Tuple[int, int]]:
    """ImageWidth (256) and ImageLength (257) of the first image file directory."""
    directory = first_directory(head)
    if directory is None:
        return None
    width, height = directory.value(256), directory.value(257)
    return None if width is None or height is None else (width, height)


# TIFF PhotometricInterpretation values of the CIE L*a*b* family (CIELab, ICCLab, ITULab): OpenCV's
# decoder hands their L, a, b samples on as if they were colours, a silently wrong image.
TIFF_LAB_PHOTOMETRICS = (8, 9, 10)


def _tiff_lab(head) -> bool:
    """True for a TIFF whose first image stores CIE L*a*b* samples."""
    directory = first_directory(head)        # None for other formats and damaged headers: the decoder decides
    return directory is not None and directory.value(262) in TIFF_LAB_PHOTOMETRICS


# ---------------------------------------------------------------- EXIF orientation

EXIF_ORIENTATION_TAG = 0x0112


def exif_orientation(data) -> int:
    """The EXIF Orientation (1-8) a JPEG (APP1), PNG (eXIf) or WebP (EXIF chunk) file carries, read
    from its bytes; 1 (as stored) when there is none or it is unreadable. TIFF files are not read
    here: OpenCV's TIFF decoder turns them upright itself."""
    try:
        head = bytes(data[:12])
        if head[:2] == b"\xff\xd8":
            exif = _jpeg_exif(data)
        elif head[:8] == b"\x89PNG\r\n\x1a\n":
            exif = _png_exif(data)
        elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            exif = _webp_exif(data)
        else:
            return 1
        value = _tiff_orientation(exif) if exif is not None else None
    except (struct.error, IndexError, ValueError):    # a damaged EXIF block: the pixels as stored
        return 1
    return value if value in range(1, 9) else 1


def _jpeg_exif(data) -> Optional[bytes]:
    """The TIFF block of the first APP1 "Exif" segment, walking the markers up to the scan."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:                # fill byte
            at += 1
            continue
        if marker in (0xD9, 0xDA):        # end of image, start of scan: no EXIF before the pixels
            return None
        length = struct.unpack(">H", data[at + 2:at + 4])[0]
        if marker == 0xE1 and bytes(data[at + 4:at + 10]) == b"Exif\x00\x00":
            return bytes(data[at + 10:at + 2 + length])
        at += 2 + length
    return None


def _png_exif(data) -> Optional[bytes]:
    at = 8
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind == b"eXIf":
            return bytes(data[at + 8:at + 8 + length])
        if kind == b"IEND":
            return None
        at += 12 + length
    return None


def _webp_exif(data) -> Optional[bytes]:
    at = 12
    while at + 8 <= len(data):
        kind, length = struct.unpack("<4sI", data[at:at + 8])
        if kind == b"EXIF":
            exif = bytes(data[at + 8:at + 8 + length])
            return exif[6:] if exif.startswith(b"Exif\x00\x00") else exif
        at += 8 + length + (length & 1)
    return None


def _tiff_orientation(exif: bytes) -> Optional[int]:
    """Tag 0x0112 of the first image file directory of a TIFF-structured EXIF block."""
    directory = first_directory(exif)
    return None if directory is None else directory.value(EXIF_ORIENTATION_TAG)


def orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels as a viewer shows an image stored with EXIF ``orientation`` (2-8 mirror and/or turn it;
    6 is stored turned 90 degrees counter-clockwise, so it is turned clockwise here)."""
    if orientation in (5, 6, 7, 8):
        image = np.rot90(image, -1 if orientation in (5, 6) else 1)
    if orientation in (2, 4, 5, 7):       # mirrored: left-right, or (4) top-bottom
        image = image[::-1] if orientation == 4 else image[:, ::-1]
    elif orientation == 3:
        image = image[::-1, ::-1]
    return np.ascontiguousarray(image)


def _decode(path: PathLike) -> np.ndarray:
    """Decode a file as stored (any depth, any channel count); ImageReadError on failure."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if not path.is_file():
        raise ImageReadError(path, "not a regular file")
    try:
        # np.fromfile + imdecode instead of cv2.imread: imread cannot open non-ASCII paths on Windows.
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(path, f"cannot open file ({exc})") from exc
    if data.size == 0:
        raise ImageReadError(path, "file is empty")
    size = declared_size(memoryview(data))       # the header alone, no copy
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ImageReadError(path, f"declares {size[0]} x {size[1]} pixels, over the {MAX_IMAGE_PIXELS} "
                                   f"mrkd decodes (a decompression bomb, or not an image for inspection)")
    if _tiff_lab(memoryview(data)):
        raise ImageReadError(path, "a CIE L*a*b* TIFF, which OpenCV would read as if L, a and b were colours; "
                                   "save it as RGB or grayscale")
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:      # e.g. over OpenCV's own pixel limit, in a format not sized above
        raise ImageReadError(path, f"OpenCV refused it ({' '.join(str(exc).split())})") from exc
    if image is None or image.size == 0:
        raise ImageReadError(path, "not a decodable image (corrupt, truncated or unsupported format)")
    note_pages(path, memoryview(data), image)     # page 1 of several, said once per file
    # IMREAD_UNCHANGED keeps depth and channels but not the EXIF orientation that every viewer (the
    # operator page's browser too) applies: a phone's JPEG would be judged, and trained on, turned.
    return orient(image, exif_orientation(memoryview(data)))


def read_stored(path: PathLike) -> np.ndarray:
    """The pixels of ``path`` as stored (any depth, any channel count), turned upright; ImageReadError
    on failure. For looking at what a file holds (its depth, its range); read_image is what mrkd judges."""
    return _decode(path)


def _to_uint8(image: np.ndarray, path: PathLike) -> np.ndarray:
    """Scale any integer/float depth to uint8 over the type's full range."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        # 65535 -> 255 exactly (65535 / 257 = 255); rounding keeps the mapping unbiased.
        return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if image.dtype == np.int8:
        return (image.astype(np.int16) + 128).astype(np.uint8)
    if image.dtype == np.int16:
        return ((image.astype(np.int32) + 32768 + 128) // 257).clip(0, 255).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        finite = np.nan_to_num(image.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(finite.min(initial=0.0)), float(finite.max(initial=0.0))
        # Outside 0..255 no scale is known (a 12-bit 0..4095 or a signed -1..1 image): clipping it
        # would train and judge a saturated image without a word.
        if low < 0.0 or high > 255.0:
            raise ImageReadError(path, f"float pixels range from {low:g} to {high:g}; mrkd reads float images as "
                                       f"0..1 or 0..255 (save it as 8- or 16-bit integers, scaled to their range)")
        # Float images are 0..1 by convention; anything larger is taken as 0..255.
        scale = 255.0 if high <= 1.0 else 1.0
        return np.clip(finite * scale + 0.5, 0, 255).astype(np.uint8)
    raise ImageReadError(path, f"unsupported pixel type {image.dtype} (mrkd reads 8- and 16-bit integer and float "
                               f"images; save it as 8 or 16 bits per channel)")


def read_image(path: PathLike) -> np.ndarray:
    """Read ``path`` as uint8 HxWx3 BGR.

    Grayscale is replicated to three channels, alpha is dropped (said once per file where it is below
    255 anywhere, as a file of several pages or frames is, read as its first), 16-bit images are scaled
    to 8 bits over their full range, float images from 0..1 (or, past 1, 0..255; outside 0..255 an error).
    Raises ImageReadError (naming the path) when the file is missing, empty, corrupt or has an
    unsupported layout.
    """
    image = _to_uint8(_decode(path), path)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ImageReadError(path, f"unexpected array shape {image.shape}")
    channels = image.shape[2]
    if channels in (2, 4):          # what a viewer shows differs where the dropped alpha is not opaque
        note_alpha(path, image[:, :, -1])
    if channels in (1, 2):          # gray, gray+alpha
        image = np.repeat(image[:, :, :1], 3, axis=2)
    elif channels == 4:             # BGRA
        image = image[:, :, :3]
    elif channels != 3:
        raise ImageReadError(path, f"unsupported channel count {channels}")
    return np.ascontiguousarray(image)


def read_mask(path: PathLike) -> np.ndarray:
    """Read a ground-truth mask as bool HxW: any non-zero pixel (in any colour channel) is True.

    Accepts 8/16-bit, gray or colour masks. A mask with alpha is read as it looks flattened onto
    black, MVTec's background: a transparent pixel (alpha 0) is background whatever colour an editor
    left under it, so a defect painted on a transparent layer is read as painted. One whose marks are
    in its alpha alone (black, or nothing, where the alpha varies) is refused: whether the opaque or
    the transparent part is the defect cannot be told.
    """
    mask = _decode(path)
    if mask.ndim == 2:
        return mask != 0
    if mask.ndim != 3:
        raise ImageReadError(path, f"unexpected mask shape {mask.shape}")
    colour = mask[:, :, :3] if mask.shape[2] >= 3 else mask[:, :, :1]
    marked = np.any(colour != 0, axis=2)
    if mask.shape[2] not in (2, 4):
        return marked
    alpha = mask[:, :, -1]
    marked &= alpha != 0
    if not marked.any() and alpha.min() != alpha.max():
        raise ImageReadError(path, "a mask marked in its alpha channel only (black or no colour where it is "
                                   "opaque, transparent elsewhere), so which part is the defect cannot be told; "
                                   "save it without alpha, the defect white on black")
    return marked
