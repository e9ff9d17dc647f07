"""Operator review labels: what a person said about an alarm, kept as an append-only JSON-lines file.

One line per decision (``ReviewLabel``): the event it is about, the sha256 of the image the
operator looked at (the lossless evidence PNG, ``runtime/outputs/evidence.py``), the label
("good": a good part, a false alarm; "defect": a defect confirmed), who, when, an optional note and
the record's schema version. Lines are only ever appended (one ``os.write`` of a whole line on an
O_APPEND descriptor, then fsync), so the file is the history of every decision and a crash leaves at
most a torn last line.

Reading (``read_labels``) validates every line. Rules, stated once here and used by ``mrkd refit``:

* a torn LAST line (no newline at the end, not valid JSON: a crash mid-write) is skipped with a
  warning; a malformed line anywhere else is an error naming the file and line;
* the same event labelled twice: the LAST line wins (a correction is a new line; nothing is edited);
* the same image (sha256) ending up both "good" and "defect" under different events is refused by
  ``latest_labels`` (an operator contradicting themselves is a question, not a training signal).

The runtime never imports torch; this module is numpy-free too.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from mrkd.errors import MrkdError
from mrkd.runtime.metadata import file_sha256

logger = logging.getLogger(__name__)

LABEL_SCHEMA_VERSION = 1
GOOD, DEFECT = "good", "defect"
LABELS = (GOOD, DEFECT)
LABEL_WORDS = {GOOD: "good part (false alarm)", DEFECT: "defect confirmed"}
SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_NOTE = 1000
MAX_WHO = 100


class ReviewError(MrkdError, ValueError):
    """A label file or a review decision that cannot be used; the message names the file, line or field."""


@dataclass(frozen=True)
class ReviewLabel:
    """One operator decision about one alarm event."""

    event_id: str
    image_sha256: str            # sha256 of the evidence image the operator saw
    label: str                   # "good" (false alarm) | "defect" (confirmed)
    who: str
    when: str                    # ISO 8601 UTC
    note: str = ""
    image: str = ""              # the evidence image's path as the reviewer found it
    camera: str = ""
    schema_version: int = LABEL_SCHEMA_VERSION

    def validate(self, where: str = "label") -> "ReviewLabel":
        for name in ("event_id", "image_sha256", "label", "who", "when", "note", "image", "camera"):
            if not isinstance(getattr(self, name), str):
                raise ReviewError(f"{where}: field {name} must be a string, got {getattr(self, name)!r}")
        if not self.event_id.strip() or len(self.event_id) > 200:
            raise ReviewError(f"{where}: field event_id must be 1-200 characters, got {self.event_id!r}")
        if self.label not in LABELS:
            raise ReviewError(f"{where}: field label={self.label!r} must be one of {', '.join(LABELS)}")
        if not SHA256.match(self.image_sha256):
            raise ReviewError(f"{where}: field image_sha256 must be 64 lowercase hex digits, got "
                              f"{self.image_sha256[:80]!r}")
        if not self.who.strip() or len(self.who) > MAX_WHO:
            raise ReviewError(f"{where}: field who must be 1-{MAX_WHO} characters")
        if len(self.note) > MAX_NOTE:
            raise ReviewError(f"{where}: field note is longer than {MAX_NOTE} characters")
        try:
            dt.datetime.fromisoformat(self.when)
        except ValueError:
            raise ReviewError(f"{where}: field when={self.when!r} is not an ISO 8601 time") from None
        if isinstance(self.schema_version, bool) or not isinstance(self.schema_version, int) \
                or not 1 <= self.schema_version <= LABEL_SCHEMA_VERSION:
            raise ReviewError(f"{where}: field schema_version={self.schema_version!r} is not one this mrkd "
                              f"reads (1..{LABEL_SCHEMA_VERSION})")
        return self

    @classmethod
    def from_dict(cls, data, where: str) -> "ReviewLabel":
        if not isinstance(data, dict):
            raise ReviewError(f"{where}: a label must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in ("event_id", "image_sha256", "label", "who", "when") if n not in data]
        if missing:
            raise ReviewError(f"{where}: field {missing[0]} is missing")
        unknown = sorted(set(data) - names)
        if unknown:
            raise ReviewError(f"{where}: unknown field {unknown[0]!r}")
        return cls(**data).validate(where)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def default_who() -> str:
    try:
        return getpass.getuser() or "operator"
    except Exception:   # no user database entry (containers)
        return "operator"


image_sha256 = file_sha256     # an evidence image is named by its file's hash


class LabelFile:
    """Appends labels to a JSON-lines file: each ``append`` is one whole-line write, fsync'd, before it
    returns. Opening cuts a torn last line left by a crash (with a warning), as the events log does."""

    def __init__(self, path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise ReviewError(f"{self.path}: is not a file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(self._fd).st_size
        if size:
            data = self.path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep < size:
                logger.warning("%s: cutting a torn last line (%d bytes) left by an earlier crash",
                               self.path, size - keep)
                os.ftruncate(self._fd, keep)

    def append(self, label: ReviewLabel) -> ReviewLabel:
        label.validate(str(self.path))
        line = (json.dumps(dataclasses.asdict(label), sort_keys=True) + "\n").encode("utf-8")
        with self._lock:
            written = os.write(self._fd, line)
            if written != len(line):      # disk full: never leave half a line behind
                os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
                raise ReviewError(f"{self.path}: short write ({written} of {len(line)} bytes); label not saved")
            os.fsync(self._fd)
        return label

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_labels(path) -> List[ReviewLabel]:
    """Every label of the file, in order (see the module's rules for torn and malformed lines)."""
    path = Path(path)
    if not path.is_file():
        raise ReviewError(f"{path}: label file not found")
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn_tail = not data.endswith(b"\n") and data != b""
    labels: List[ReviewLabel] = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        last = number == len(lines)
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            if last and torn_tail:
                logger.warning("%s: skipping a torn last line (%d bytes, a crash mid-write?)", where, len(raw))
                continue
            raise ReviewError(f"{where}: not a JSON line ({exc})") from exc
        labels.append(ReviewLabel.from_dict(record, where))
    return labels


def latest_labels(labels: Sequence[ReviewLabel], source: str = "labels") -> Dict[str, ReviewLabel]:
    """event id -> its last label. Refuses an image (sha256) that ends up both good and defect."""
    latest: Dict[str, ReviewLabel] = {}
    for label in labels:
        latest.pop(label.event_id, None)      # re-insert: order = order of the deciding line
        latest[label.event_id] = label
    by_image: Dict[str, Tuple[str, str]] = {}
    for label in latest.values():
        seen = by_image.setdefault(label.image_sha256, (label.label, label.event_id))
        if seen[0] != label.label:
            raise ReviewError(f"{source}: image {label.image_sha256[:12]} is labelled {seen[0]!r} (event "
                              f"{seen[1]}) and {label.label!r} (event {label.event_id}); label it once more "
                              f"under both events to settle it")
    return latest


def labels_file_sha256(path) -> str:
    return image_sha256(path)


def make_label(event_id: str, image_path, label: str, who: Optional[str] = None, note: str = "",
               camera: str = "") -> ReviewLabel:
    """A label for ``event_id`` whose evidence image is ``image_path`` (its sha256 is taken now)."""
    image_path = Path(image_path)
    if not image_path.is_file():
        raise ReviewError(f"{image_path}: evidence image of event {event_id} not found")
    return ReviewLabel(event_id=str(event_id), image_sha256=image_sha256(image_path), label=label,
                       who=who or default_who(), when=now_iso(), note=note or "", image=str(image_path),
                       camera=camera or "").validate(f"label of event {event_id}")
