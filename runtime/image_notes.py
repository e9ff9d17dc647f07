"""What an image file holds that mrkd's reading leaves out, said once per file: pages or frames after the
first (a multi-page TIFF, an animated PNG or WebP) and transparency (an alpha channel that is dropped).

OpenCV decodes the first page of a multi-page file and mrkd drops alpha; both are kept as they are (the
same pixels for training and runtime), but never without a word: a stack of captures would be judged as
its first capture, and the colour under transparent pixels (often black, or what the editor left there)
is judged where a viewer shows the background (OpenCV reads an RGBA TIFF's colour multiplied by its alpha:
black where it is 0). The checks read the bytes and the array runtime/images.py
already holds: no second decoding. numpy only.
"""

from __future__ import annotations

import struct
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional, Set, Tuple

import numpy as np

from mrkd.console import speaks_for_all_ranks
from mrkd.runtime.tiff import directory_offsets, read_directory, read_header

# Files of one kind named one by one per folder before a single line says the rest of that folder are
# read the same way: a folder of 5000 transparent PNGs should not print 5000 warnings.
NAMED_PER_FOLDER = 10

_said: Set[Tuple[str, str]] = set()          # (kind, file): said once per file per process
_named: Counter = Counter()                  # (kind, folder): files named there so far

KIND_SAYS = {"pages": "more than one page or frame", "alpha": "transparent pixels",
             "dropped": "an alpha channel OpenCV does not read"}


def say_once(kind: str, path, message: str) -> None:
    """Warn ``message`` the first time ``path`` is read with ``kind`` (a key of KIND_SAYS); after
    NAMED_PER_FOLDER files of one folder, one more line stands for the rest of that folder."""
    key = (kind, str(path))
    if key in _said or not speaks_for_all_ranks():
        return
    _said.add(key)
    folder = str(Path(path).parent)
    _named[kind, folder] += 1
    if _named[kind, folder] <= NAMED_PER_FOLDER:
        warnings.warn(message)
    elif _named[kind, folder] == NAMED_PER_FOLDER + 1:
        warnings.warn(f"{folder}: more than {NAMED_PER_FOLDER} images with {KIND_SAYS[kind]}; the rest are read "
                      f"the same way, without a warning each")


# ---------------------------------------------------------------- pages and frames

# ExtraSamples (338) values that name an alpha sample: associated (1, premultiplied) or unassociated (2).
EXTRA_SAMPLES_TAG = 338
ALPHA_EXTRA_SAMPLES = (1, 2)


def _tiff_layout(data) -> Optional[Tuple[int, bool]]:
    """(pages, whether page 1 declares an alpha sample) of a classic or Big TIFF, walking its directory
    chain in the bytes (a looping or endless chain counts at most tiff.MAX_DIRECTORIES pages); None when the
    bytes are not a TIFF or its first directory is out of reach."""
    header = read_header(data)
    if header is None:
        return None
    pages = directory_offsets(data, header)
    first = read_directory(data, header, pages[0]) if pages else None
    if first is None:
        return None
    extra_samples = first.values(EXTRA_SAMPLES_TAG) or ()
    return len(pages), any(value in ALPHA_EXTRA_SAMPLES for value in extra_samples)


def _apng_frames(data) -> int:
    """The num_frames of an animated PNG's acTL chunk (before its pixels); 1 for a still PNG."""
    at = 8
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", bytes(data[at:at + 8]))
        if kind == b"acTL":
            return struct.unpack(">I", bytes(data[at + 8:at + 12]))[0]
        if kind in (b"IDAT", b"IEND"):
            return 1
        at += 12 + length
    return 1


def _webp_frames(data) -> int:
    """The ANMF (animation frame) chunks of an animated WebP; 1 for a still one."""
    frames, at = 0, 12
    while at + 8 <= len(data):
        kind, length = struct.unpack("<4sI", bytes(data[at:at + 8]))
        frames += kind == b"ANMF"
        at += 8 + length + (length & 1)
    return max(frames, 1)


def note_pages(path, data, image: np.ndarray) -> None:
    """Warn once when the file in ``data`` holds more pages or frames than the first, which ``image``
    (what OpenCV decoded) is; and when OpenCV left out a TIFF's alpha channel (a grey + alpha TIFF is
    read grey, so its transparency cannot be checked)."""
    try:
        head = bytes(data[:12])
        shape = f"{image.shape[1]} x {image.shape[0]}"
        if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            layout = _tiff_layout(data)
            if layout is None:
                return
            pages, alpha = layout
            if pages > 1:
                say_once("pages", path, f"{path}: a TIFF of {pages} pages; mrkd reads page 1 only ({shape}). Save "
                                        f"each page you mean as a file of its own")
            decoded = 1 if image.ndim == 2 else image.shape[2]
            if alpha and decoded not in (2, 4):      # OpenCV read its colour without the alpha
                say_once("dropped", path, f"{path}: a TIFF with an alpha channel that OpenCV does not read, so "
                                          f"mrkd cannot tell whether parts are transparent; where they are, it sees "
                                          f"colour a viewer does not show. Save it without alpha, flattened onto "
                                          f"its background")
        elif head[:8] == b"\x89PNG\r\n\x1a\n":
            frames = _apng_frames(data)
            if frames > 1:
                say_once("pages", path, f"{path}: an animated PNG of {frames} frames; mrkd reads its first image "
                                        f"only ({shape}). Save each frame you mean as a file of its own")
        elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            frames = _webp_frames(data)
            if frames > 1:
                say_once("pages", path, f"{path}: an animated WebP of {frames} frames; mrkd reads frame 1 only "
                                        f"({shape}). Save each frame you mean as a file of its own")
    except struct.error:          # a header cut short: the pixels decoded stand, unremarked
        return


# ---------------------------------------------------------------- transparency

def note_alpha(path, alpha: np.ndarray) -> None:
    """Warn once when ``alpha`` (uint8, the channel read_image drops) is below 255 anywhere; fully opaque
    alpha changes nothing a viewer shows, so it stays silent."""
    lowest = int(alpha.min(initial=255))
    if lowest == 255:
        return
    share = float(np.count_nonzero(alpha < 255)) / alpha.size
    say_once("alpha", path, f"{path}: {share:.1%} of its pixels are transparent or partly so (alpha down to {lowest} "
                            f"of 255); mrkd drops the alpha channel, so there it sees colour a viewer does not show. "
                            f"Save it without alpha, flattened onto its background")
