"""An alarm's image for the operator page when the page no longer holds its frame (a row rebuilt from the
events log after a restart, or an alarm past the frames kept): the evidence file the event names
(evidence.py: the lossless frame the model judged), as a JPEG of at most THUMBNAIL_MAX_SIDE pixels a side,
encoded once and kept (a few dozen, the newest asked for).

What is read, and only that: the path in the event's ``evidence``, below the ``--evidence`` folder the run
was started with, through served_folder.py (no link followed on the way, a regular file with one name, at
most MAX_FILE_BYTES), and only when its bytes have the event's ``evidence_sha256`` (mrkd's events always
name both): an event line written by someone else can name a file, but not make the page show a file it
does not hold, nor one beside the folder. A file that declares more than MAX_IMAGE_PIXELS is not decoded.

An event of an earlier run may name its file by a path this run's folder is not spelled as: the run was
started from another folder (an older mrkd wrote the path relative to it), the line's folder was moved, or
a link in the path was given one run and its target the next. Such a path (not below the folder, or not
there) is looked up as ``<camera>/<file>`` below the folder, the store's layout (evidence.py:
``DIR/<camera>/<event_id>.png``), the camera being the event's; the file found is served only with the
event's sha256, like any other, so it is the image the event recorded or nothing.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import PurePath
from typing import Optional, Tuple

import cv2
import numpy as np

from mrkd.runtime.images import MAX_IMAGE_PIXELS, declared_size
from mrkd.runtime.outputs.served_folder import Refused, ServedFolder

THUMBNAIL_MAX_SIDE = 800          # the page shows it 300 px wide (more on a zoomed or high-DPI screen)
MAX_FILE_BYTES = 256 << 20        # a 20 MP colour frame is ~60 MB as PNG; a larger file is not read for the page
CACHED_IMAGES = 64                # thumbnails kept (tens of KB each); the page lists 20 alarms


@dataclass(frozen=True)
class EvidenceRef:
    """The evidence file an event names: its path as written in the event, the sha256 of its bytes and
    the event's camera ("" when it names none)."""
    path: str
    sha256: str
    camera: str = ""

    @classmethod
    def of_event(cls, event: dict) -> Optional["EvidenceRef"]:
        """The event's ``evidence`` and ``evidence_sha256``, or None unless both are there as text."""
        path, sha256, camera = event.get("evidence"), event.get("evidence_sha256"), event.get("camera")
        if isinstance(path, str) and path and isinstance(sha256, str) and sha256:
            return cls(path, sha256.lower(), camera if isinstance(camera, str) else "")
        return None

    def in_store(self) -> Optional[str]:
        """``<camera>/<file>``, the path's last two names, when they are the event's camera and a plain
        file name (the store's layout), else None: where the file is looked for below the folder when
        the path as written is not there."""
        tail = PurePath(self.path).parts[-2:]
        if len(tail) != 2 or tail[0] != self.camera or not all(_plain_name(name) for name in tail):
            return None
        return "/".join(tail)


class EvidenceThumbnails:
    """Bounded JPEGs of evidence files below ``folder`` (a ServedFolder), cached by (path, sha256).

    One image is read and encoded at a time: a page of twenty rows opened after a restart asks for twenty
    at once, and each is decoded once (the others then find it cached)."""

    def __init__(self, folder: ServedFolder, jpeg_quality: int = 80, max_side: int = THUMBNAIL_MAX_SIDE):
        self.folder = folder
        self.jpeg_quality, self.max_side = jpeg_quality, max_side
        self._cache: "OrderedDict[EvidenceRef, bytes]" = OrderedDict()
        self._lock = threading.Lock()

    def jpeg(self, evidence: EvidenceRef, what: str) -> Optional[bytes]:
        """The JPEG of ``evidence``, or None when it is not there or is refused (a refusal is logged in one
        line naming ``what``, e.g. "evidence of alarm X")."""
        with self._lock:
            cached = self._cache.get(evidence)
            if cached is not None:
                self._cache.move_to_end(evidence)
                return cached
            try:
                path, data = self._read(evidence)
                encoded = self._encode(data, evidence, path)
            except Refused as reason:
                self.folder.log_refusal(what, reason)
                return None
            except (OSError, ValueError):         # gone (moved to an archive), or not a file name at all
                return None
            self._cache[evidence] = encoded
            while len(self._cache) > CACHED_IMAGES:
                self._cache.popitem(last=False)
            return encoded

    def _read(self, evidence: EvidenceRef) -> Tuple[str, bytes]:
        """(the path read, its bytes): the path as written, else (not below the folder, or not there)
        its ``<camera>/<file>`` below the folder. A file found there but not the event's (another sha256) is
        Refused for that; found nowhere, the path as written is Refused or not found as it was."""
        try:
            return evidence.path, self.folder.read(evidence.path, max_bytes=MAX_FILE_BYTES)
        except (Refused, FileNotFoundError) as as_written:
            tail = evidence.in_store()
            if tail is None or (isinstance(as_written, Refused) and self._below(evidence.path)):
                raise                  # not of the store's layout, or refused where it is (a link, a hard link)
            in_folder = str(self.folder.path / tail)
            try:
                data = self.folder.read(in_folder, max_bytes=MAX_FILE_BYTES)
            except FileNotFoundError:
                raise as_written from None
            if hashlib.sha256(data).hexdigest() != evidence.sha256:
                raise Refused(f"{in_folder} (looked up for {evidence.path}) is not the file its event names "
                              f"(another sha256)")
            return in_folder, data

    def _below(self, path: str) -> bool:
        try:
            self.folder.parts_of(path)
            return True
        except Refused:
            return False

    def _encode(self, data: bytes, evidence: EvidenceRef, path: Optional[str] = None) -> bytes:
        """``data`` (the file's bytes, read from ``path``: the event's own by default) as a JPEG of at
        most max_side a side; Refused when they are not the event's file or not an image the page will
        decode."""
        path = path or evidence.path
        if hashlib.sha256(data).hexdigest() != evidence.sha256:
            raise Refused(f"{path} is not the file its event names (another sha256)")
        size = declared_size(data)
        if size is None:
            raise Refused(f"{path} is not a PNG, JPEG, BMP or TIFF image")
        if size[0] * size[1] > MAX_IMAGE_PIXELS:
            raise Refused(f"{path} declares {size[0]} x {size[1]} pixels, more than the "
                          f"{MAX_IMAGE_PIXELS} decoded for the page")
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise Refused(f"{path} cannot be decoded")
        image = _fitted(image, self.max_side)
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            raise Refused(f"{path}: OpenCV cannot encode its {image.shape} image as JPEG")
        return encoded.tobytes()


def _fitted(image: np.ndarray, max_side: int) -> np.ndarray:
    """``image`` shrunk (area average) so that neither side exceeds ``max_side``; as it is when it fits."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return image
    size: Tuple[int, int] = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _plain_name(name: str) -> bool:
    # a name in a folder: not empty, no separator, not '.' or '..' (nor any hidden name: mrkd writes none)
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")
