"""Read images and masks from disk into one canonical form: uint8 HxWx3 BGR (masks: bool HxW).

Factory data is messy: grayscale JPEGs, 16-bit TIFFs, PNGs with alpha, odd sizes, paths with
non-ASCII characters. Everything is decoded here, once, so the rest of mrkd sees a single format.
numpy + OpenCV only (the runtime never imports torch).
"""

from __future__ import annotations

import glob as globlib
import os
from pathlib import Path
from typing import List, Optional, Union

import cv2
import numpy as np

from mrkd.errors import MrkdError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

PathLike = Union[str, os.PathLike]


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


def list_images(folder_or_glob: PathLike, recursive: bool = False) -> List[Path]:
    """The image files a folder, a glob or one image file names: the one rule every command uses.

    * a folder: the image files directly in it (in its sub-folders too when ``recursive``);
    * a glob such as ``'cam1/*.png'`` (``**`` spans folders when ``recursive``): the matching
      image files;
    * an image file: that file alone.
    Image files are regular files with one of IMAGE_EXTENSIONS (any case); hidden files (and, when
    recursive, anything in a hidden folder) are skipped; the list is sorted by path. An empty list
    means the folder or glob holds no images. ImageListError when the argument is none of the three
    (a missing path, a file that is not an image).
    """
    text = os.fspath(folder_or_glob)
    path = Path(text)
    if path.is_dir():
        candidates = path.rglob("*") if recursive else path.iterdir()
        return sorted(p for p in candidates if p.is_file() and is_image_file(p) and not _hidden(p, path))
    if path.is_file() and is_image_file(path):
        return [path]
    if is_glob_pattern(text):
        return sorted(Path(p) for p in globlib.glob(text, recursive=recursive)
                      if os.path.isfile(p) and is_image_file(p) and not _hidden(Path(p)))
    what = "a file that is not an image" if path.is_file() else "not found"
    raise ImageListError(f"{text}: {what} (expected a folder of images, a glob like 'dir/*.png' or an image "
                         f"file; extensions: {', '.join(e[1:] for e in IMAGE_EXTENSIONS)})")


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
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ImageReadError(path, "not a decodable image (corrupt, truncated or unsupported format)")
    return image


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
        # Float images are 0..1 by convention; anything larger is taken as 0..255.
        scale = 255.0 if finite.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(finite * scale + 0.5, 0, 255).astype(np.uint8)
    raise ImageReadError(path, f"unsupported pixel type {image.dtype}")


def read_image(path: PathLike) -> np.ndarray:
    """Read ``path`` as uint8 HxWx3 BGR.

    Grayscale is replicated to three channels, alpha is dropped, 16-bit and float images are
    scaled to 8 bits over their full range. Raises ImageReadError (naming the path) when the file
    is missing, empty, corrupt or has an unsupported layout.
    """
    image = _to_uint8(_decode(path), path)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ImageReadError(path, f"unexpected array shape {image.shape}")
    channels = image.shape[2]
    if channels in (1, 2):          # gray, gray+alpha
        image = np.repeat(image[:, :, :1], 3, axis=2)
    elif channels == 4:             # BGRA
        image = image[:, :, :3]
    elif channels != 3:
        raise ImageReadError(path, f"unsupported channel count {channels}")
    return np.ascontiguousarray(image)


def read_mask(path: PathLike) -> np.ndarray:
    """Read a ground-truth mask as bool HxW: any non-zero pixel (in any colour channel) is True.

    Accepts 8/16-bit, gray or colour masks; an alpha channel is ignored.
    """
    mask = _decode(path)
    if mask.ndim == 3:
        colour = mask[:, :, :3] if mask.shape[2] >= 3 else mask[:, :, :1]
        return np.any(colour != 0, axis=2)
    if mask.ndim != 2:
        raise ImageReadError(path, f"unexpected mask shape {mask.shape}")
    return mask != 0
