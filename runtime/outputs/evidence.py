"""``--evidence DIR``: the image exactly as the camera delivered it, lossless, for every alarm and NG
part, plus a sample of OK frames: what an operator reviews (``mrkd review``) and what ``mrkd refit``
learns from. The annotated snapshot (snapshots.py) is for looking; this is the record.

Layout: ``DIR/<camera>/<event_id>.png`` for an alarm or an NG/ERROR part (an alarm's event carries
``evidence``, the absolute path, and ``evidence_sha256``, a part's event each camera's in its ``cameras``),
``DIR/<camera>/ok/<frame index>.png`` (free run) or ``ok/part<inspection id>.png`` (triggered) for the
OK samples (one of every ``ok_every`` OK frames or parts per camera; 0: none). Files are PNG (lossless),
written to a temporary file, fsync'd and linked into place, never over an existing file; the temporary
files of a run killed mid-write are removed at the next start (``_remove_abandoned_staged_files``).

The PNG is the frame the model judged (8-bit BGR): what review and refit read. Where that frame is not
the camera's own pixels (a GigE camera in Mono10/12/16, whose frame keeps the top 8 bits, or in Bayer,
whose frame is demosaiced: ``FrameResult.raw``), those pixels are kept beside it as ``<name>.raw.png``:
a 16-bit grayscale PNG or the 8-bit mosaic, named by ``evidence_raw``, ``evidence_raw_sha256`` and
``evidence_raw_pixel_format`` (an OK sample: its path and format). Mono16 is kept as delivered; Mono10/12
as PNG keeps a sample of fewer bits than its bit depth (``encode_raw_png``): scaled to 16 bits, with an
sBIT chunk of 10/12, so viewers show it at its brightness and ``value >> 6`` / ``>> 4`` is the camera's.
Every other source has none and its evidence is as before. The raw file counts in the budget like its
frame and an OK sample's is deleted with it.

Counting (the health's sent/failed, ``mrkd_output_sent_total{output="evidence"}``): one item per alarm, per
camera of an NG/ERROR part and per OK sample, whatever files it has. An item is sent when all its files
are written; one whose frame or camera bits could not be written is failed (once, naming the file), not
sent: its other file stays on disk and named (``evidence_raw`` None when only the bits are missing).

Retention (``max_bytes`` for the whole folder, counted from what is there at the start):
1. OK samples go first, oldest first, until the folder fits again;
2. alarm/NG evidence is NEVER deleted: when only evidence is left and the folder is over its budget,
   new OK samples are skipped (counted as dropped), evidence is still written, and the output's
   health says "over budget" with a warning (rate-limited) naming the folder; an OK sample larger than
   the budget leaves beside the evidence is skipped too (dropped), never written and then deleted.
   Over budget, the folder is counted again (at most every ``recount_every_s``), so evidence moved
   away meanwhile (an archive job) stops counting;
3. on a full disk, alarm/NG evidence that does not fit deletes the oldest OK samples (as many as it
   takes) and is written again; only when no OK sample is left is it lost: counted and warned about
   naming the file. The line goes on, also when the disk is full at the start.

Off the frame loop: the PNG encode and the fsync take tens of milliseconds for a megapixel frame, so
in a free run neither runs on the loop's thread. An alarm's evidence is written by ``event_fields``,
which the loop calls on its alarm notifier's thread (runtime/line/loop.py), before any output sends
the event: the event names the file and its sha256 only once the file is on disk. A free run's OK
samples (``on_frame``) go to a worker of their own (``background``, as ``build_outputs`` makes the
writer) through a bounded queue: while ``OK_SAMPLES_WAITING`` wait (a disk slower than the line), a
due sample is dropped, counted in the health's ``dropped`` and warned about (rate-limited). In a
triggered run ``part_fields`` writes on the part runner's notifier thread, as before.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Deque, Dict, List, Mapping, Optional, Tuple, Union

import cv2
import numpy as np

from mrkd.errors import SettingError
from mrkd.runtime.clock_steps import utc_text
from mrkd.runtime.outputs.base import FrameResult, LineObserver, OutputHealth, PartResult
from mrkd.runtime.outputs.delivery import DISK_FULL, Delivery
from mrkd.runtime.outputs.events import EVENT_ID_NAME
from mrkd.runtime.outputs.notifier import DroppingWorker
from mrkd.runtime.outputs.snapshots import write_new_file
from mrkd.runtime.outputs.staged_files import camera_folders, remove_abandoned_in, staged_pattern
from mrkd.runtime.raw_image import RAW_SUFFIX, RawImage     # DIR/<camera>/<event_id>.raw.png beside its .png


logger = logging.getLogger(__name__)

EVIDENCE_SCHEMA_VERSION = 1
DEFAULT_MAX_BYTES = 2 << 30       # 2 GiB
OK_FOLDER = "ok"
# The names _ok_sample writes (a frame index or "part" + inspection id, the "_pid_n" of a second run's
# sample of the same name, and RAW_SUFFIX for the camera's bits beside it): only such files are ever
# deleted; any other PNG in a given folder is someone's.
OK_SAMPLE_NAME = re.compile(r"(part)?\d{10,}(_\d+_\d+)?(\.raw)?\.png")
# The staged files write_new_file leaves when a run is killed mid-write (staged_files.py), in the places and
# under the names this store writes: DIR/<camera>/.<event id>[.raw].png.*.tmp (an event id as new_event_id
# makes it) and DIR/<camera>/ok/.<OK sample name>.*.tmp. Removed at the start when abandoned; nothing else.
STAGED_EVIDENCE = re.compile(staged_pattern(rf"{EVENT_ID_NAME}(\.raw)?\.png"))
STAGED_OK_SAMPLE = re.compile(staged_pattern(OK_SAMPLE_NAME.pattern))
# A free run's OK samples waiting for the worker (each holds its frame): past it a due sample is dropped.
OK_SAMPLES_WAITING = 8
# An OK sample dated further than this after the clock (a clock behind, or ahead when it was written) is said
CLOCK_LEEWAY_S = 86400
OK_SAMPLES_DRAIN_S = 10.0        # the stop waits this long for the samples still queued, then counts them dropped


class OkSamples:
    """The OK samples on disk, oldest first: (their files, their bytes) each, and the bytes of them all kept
    as they come and go. The budget is checked after every write, and a sum over the list each time cost
    O(samples) per write (a 2 GB budget of small samples holds ~200,000)."""

    def __init__(self) -> None:
        self._samples: Deque[Tuple[Tuple[Path, ...], int]] = deque()
        self.bytes = 0

    def append(self, sample: Tuple[Tuple[Path, ...], int]) -> None:
        self._samples.append(sample)
        self.bytes += sample[1]

    def popleft(self) -> Tuple[Tuple[Path, ...], int]:
        sample = self._samples.popleft()
        self.bytes -= sample[1]
        return sample

    def clear(self) -> None:
        self._samples.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._samples)

    def __iter__(self):
        return iter(self._samples)


@dataclass(frozen=True)
class EvidenceSettings:
    folder: str
    ok_every: int = 0                  # keep one OK frame of every N per camera (0: none)
    max_bytes: int = DEFAULT_MAX_BYTES
    schema_version: int = EVIDENCE_SCHEMA_VERSION

    def __post_init__(self):
        if isinstance(self.ok_every, bool) or not isinstance(self.ok_every, int) or self.ok_every < 0:
            raise SettingError(f"evidence ok_every must be a whole number >= 0, got {self.ok_every!r}")
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise SettingError(f"evidence max_bytes must be a whole number >= 1, got {self.max_bytes!r}")


def encode_png(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"OpenCV cannot encode a {image.shape} {image.dtype} image as PNG")
    return encoded.tobytes()


def encode_raw_png(raw: RawImage) -> bytes:
    """The camera's bits as PNG. PNG has no 10- or 12-bit samples: it asks the encoder to scale them to
    the bit depth (PNG 1.2 section 9.1; left bit replication: 4095 becomes 65535) and to say how many bits
    are significant in an sBIT chunk before IDAT (section 4.2.6), so that ``value >> (16 - bits)`` is the
    camera's value again. Values past their bits (a camera breaking PFNC's zero padding) are kept at the
    largest, as the judged frame keeps them at 255."""
    bits = raw.significant_bits
    if bits is None:
        return encode_png(raw.pixels)
    values = np.minimum(raw.pixels, (1 << bits) - 1)
    encoded = encode_png((values << (16 - bits)) | (values >> (2 * bits - 16)))
    header_end = 8 + 8 + 13 + 4          # the signature, then IHDR, which PNG puts first
    if encoded[12:16] != b"IHDR":
        raise OSError("OpenCV's PNG does not start with IHDR")
    significant = b"sBIT" + bytes([bits])
    chunk = struct.pack(">I", 1) + significant + struct.pack(">I", zlib.crc32(significant))
    return encoded[:header_end] + chunk + encoded[header_end:]


class EvidenceWriter(LineObserver):
    """Writes the lossless evidence (see the module's notes) and adds its path and sha256 to events."""

    recount_every_s = 10.0      # over budget: how often the folder is counted again (files moved away)
    keeps_camera_bits = True    # <name>.raw.png: the line's GigE sources keep them for this output

    def __init__(self, settings: EvidenceSettings, background: bool = False):
        """``background``: a free run's OK samples are encoded and written on a worker thread (bounded
        queue); without it ``on_frame`` writes them on the caller's thread."""
        self.settings = settings
        self.folder = Path(settings.folder)
        self.delivery = Delivery("evidence", str(self.folder))
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            # a full disk at the start: the line runs, each write is tried (and counted) as it comes
            self.delivery.set_failing(f"{self.folder}: cannot create it ({exc.strerror or exc})")
        self._ok_files = OkSamples()      # each OK sample's files and their bytes, oldest first
        self._ok_seen: Dict[str, int] = {}
        self.ok_written = self.ok_deleted = self.ok_skipped = 0
        self._ahead_said = False       # OK samples dated after the clock: said once (_warn_if_dated_ahead)
        # The folder's accounting (OK sample list, byte counts) is shared by the OK samples' worker and the
        # thread that writes alarm evidence (the loop's alarm notifier); it is held across a write, so a
        # stalled disk holds it: the loop's own hook (on_frame) and health() never take it, only the
        # counts' lock, which no file operation is ever done under.
        self._lock = threading.RLock()
        self._counts_lock = threading.Lock()
        # due OK samples past OK_SAMPLES_WAITING are dropped (the worker counts them: the health's dropped)
        self._ok_worker = DroppingWorker(
            "evidence-ok-samples", OK_SAMPLES_WAITING, f"output evidence ({self.folder}): the disk is slower than "
            "the line; OK samples are dropped, alarm evidence is still written") if background else None
        self._remove_abandoned_staged_files()
        self._recount()

    def _remove_abandoned_staged_files(self) -> None:
        """Remove the staged files an earlier run killed mid-write left (never counted, never removed
        otherwise; one killed between the link and the unlink left its evidence a second name, which the
        page refuses to serve): only this store's staged names in its own places whose writer is gone
        (staged_files.remove_abandoned_in). Said once, with the count and bytes."""
        cameras = camera_folders(self.folder)
        remove_abandoned_in([(camera, STAGED_EVIDENCE) for camera in cameras] +
                            [(camera / OK_FOLDER, STAGED_OK_SAMPLE) for camera in cameras], "evidence", self.folder)

    def _recount(self) -> None:
        """Count the folder from what is there now: at the start (what an earlier run left), and again
        over budget (an archive job may have moved evidence away: this run's own count only grows)."""
        self._evidence_bytes = 0
        self._ok_files.clear()
        self._scan()
        self._scanned_at = time.monotonic()

    def _scan(self) -> None:
        """What an earlier run left counts against the budget (OK samples, oldest first; a sample's
        camera bits, ``<name>.raw.png``, go with its ``<name>.png``)."""
        samples: Dict[Path, list] = {}       # the sample's frame -> [oldest mtime, its files, their bytes]
        for path in (self.folder.rglob("*.png") if self.folder.is_dir() else ()):
            try:
                stat = path.stat()
            except OSError:
                continue
            # DIR/<camera>/ok/<name>.png only: DIR/ok/<event>.png is the evidence of a camera named "ok"; a
            # folder of the user's own images (DIR/<product>/ok/img_1.png) is counted, never deleted
            parts = path.relative_to(self.folder).parts
            if len(parts) == 3 and parts[1] == OK_FOLDER and OK_SAMPLE_NAME.fullmatch(parts[2]):
                frame = path.with_name(raw_of_name(path.name)) if path.name.endswith(RAW_SUFFIX) else path
                sample = samples.setdefault(frame, [stat.st_mtime_ns, [], 0])
                sample[0] = min(sample[0], stat.st_mtime_ns)
                sample[1].append(path)
                sample[2] += stat.st_size
            else:
                self._evidence_bytes += stat.st_size
        for _, (_, files, size) in sorted(samples.items(), key=lambda item: (item[1][0], item[0])):
            self._ok_files.append((tuple(files), size))
        self._warn_if_dated_ahead([mtime for mtime, _, _ in samples.values()])

    def _warn_if_dated_ahead(self, mtimes_ns: List[int]) -> None:
        """OK samples go oldest first by their files' dates, which are the wall clock's when written: a
        device whose clock was ahead then (or is behind now: booted at 1970) deletes these last, whatever
        their age. That cannot be put right here; it is said, once per count (the start), naming the folder."""
        now_ns = time.time_ns()
        ahead = [mtime for mtime in mtimes_ns if mtime > now_ns + CLOCK_LEEWAY_S * 10**9]
        if ahead and not self._ahead_said:
            self._ahead_said = True
            logger.warning("%s: %d OK sample(s) are dated after this machine's clock (the latest %s, the clock says "
                           "%s): the clock is behind, or was ahead when they were written; OK samples are deleted "
                           "oldest first by these dates, so these go last", self.folder, len(ahead),
                           utc_text(max(ahead) / 1e9), utc_text(now_ns / 1e9))

    @property
    def used_bytes(self) -> int:
        return self._evidence_bytes + self._ok_files.bytes

    @staticmethod
    def _encode(image: Union[np.ndarray, RawImage]) -> bytes:
        """The judged frame or the camera's bits as PNG; NotWritten when it cannot be encoded."""
        try:
            return encode_raw_png(image) if isinstance(image, RawImage) else encode_png(image)
        except OSError as exc:
            raise NotWritten(str(exc)) from None

    def _write(self, path: Path, data: bytes, make_room: bool = False,
               or_else: Optional[Path] = None) -> Path:
        """Write the PNG ``data``; the path written, or NotWritten naming why. ``make_room`` (alarm/NG
        evidence): a full disk deletes the oldest OK samples and tries again while there are any.
        ``or_else``: the name to take when ``path`` is taken meanwhile (an OK sample of another run on the
        same folder, created between our look and our write). The caller counts the item (``_counted``)."""
        while True:
            try:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except FileExistsError:      # mkdir's word for "there is a file of that name"
                    raise NotWritten(f"{path.parent}: not a folder (a file of that name is in the way)") from None
                write_new_file(path, data)
                return path
            except FileExistsError:
                if or_else is not None:
                    path, or_else = or_else, None
                    continue
                raise NotWritten(f"{path}: exists; evidence is never overwritten") from None
            except OSError as exc:
                if not (make_room and exc.errno in DISK_FULL and self._delete_ok_samples(len(data))):
                    raise NotWritten(str(exc)) from None

    def _delete_ok_samples(self, need: int) -> bool:
        """Delete the oldest OK samples, at least ``need`` bytes of them (a full disk); False when there
        were none left to delete."""
        if not self._ok_files:
            return False
        freed = 0
        while self._ok_files and freed < need:
            freed += self._drop_oldest_ok_sample()
        return True

    def _drop_oldest_ok_sample(self) -> int:
        """Delete the oldest OK sample, its frame and camera bits (it leaves the list either way); the
        bytes freed, 0 when the delete failed (said in the health, not counted as deleted)."""
        paths, size = self._ok_files.popleft()
        for path in paths:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.delivery.set_failing(f"{path}: cannot delete an old OK sample ({exc.strerror or exc})")
                return 0
        self.ok_deleted += 1
        return size

    def _counted(self, failure: Optional[str]) -> None:
        """One evidence item (an alarm, a part's camera, an OK sample: its frame and camera bits together)
        counted: sent, or failed naming the file that could not be written (``failure``). Sent: the output
        is healthy again only if the folder fits its budget (else it would swing between "over budget" and
        "delivering again" on every write)."""
        if failure is None:
            self.delivery.delivered(recover=self._keep_budget())
        else:
            self.delivery.failed_one(failure)

    def _evidence(self, camera: str, event_id: str, image: np.ndarray,
                  raw: Optional[RawImage]) -> Dict[str, object]:
        """An alarm's or NG part's files: the frame judged and, where it is not them, the camera's bits;
        the fields that name them. One item, counted once."""
        failures = []
        path, sha = self._evidence_file(self.folder / camera / f"{event_id}.png", image, failures)
        fields: Dict[str, object] = {"evidence": path, "evidence_sha256": sha}
        if raw is not None:
            path, sha = self._evidence_file(self.folder / camera / f"{event_id}{RAW_SUFFIX}", raw, failures)
            fields.update(evidence_raw=path, evidence_raw_sha256=sha, evidence_raw_pixel_format=raw.pixel_format)
        with self._lock:
            self._counted("; ".join(failures) or None)
        return fields

    def _evidence_file(self, path: Path, image: Union[np.ndarray, RawImage],
                       failures: List[str]) -> Tuple[Optional[str], Optional[str]]:
        """Write one file of an alarm's evidence: its name and sha256, or (None, None) with why appended
        to ``failures``."""
        try:
            data = self._encode(image)      # the slow part, outside the lock: the OK samples' worker goes on
            with self._lock:
                self._write(path, data, make_room=True)
                self._evidence_bytes += path.stat().st_size
        except NotWritten as exc:
            failures.append(str(exc))
            return None, None
        return _as_named(path), hashlib.sha256(data).hexdigest()

    def _keep_budget(self) -> bool:
        """Delete the oldest OK samples until the folder fits; False when only evidence is left and it
        is still over budget (never deleted: said in the health and a warning)."""
        budget = self.settings.max_bytes
        while self.used_bytes > budget and self._ok_files:
            self._drop_oldest_ok_sample()
        if self.used_bytes > budget and time.monotonic() - self._scanned_at >= self.recount_every_s:
            self._recount()
            while self.used_bytes > budget and self._ok_files:
                self._drop_oldest_ok_sample()
        if self.used_bytes > budget:
            self.delivery.set_failing(f"{self.folder}: over its budget of {budget} bytes with alarm/NG evidence only "
                                      f"({self.used_bytes} bytes); evidence is never deleted: free space or raise "
                                      f"the budget; OK samples are skipped", state="over budget")
            return False
        return True

    # ------------------------------------------------------------ hooks
    def event_fields(self, result: FrameResult) -> Mapping[str, object]:
        return self._evidence(result.camera, str(result.event["event_id"]), result.image, result.raw)

    def part_fields(self, part: PartResult, views: Mapping[str, FrameResult]) -> Mapping[str, Mapping[str, object]]:
        fields = {}
        for camera, view in views.items():
            if part.event_id is None:          # an OK part: one of every ok_every per camera is kept
                seen = self._ok_turn(camera)
                kept = None if seen is None else self._ok_sample(camera, f"part{part.inspection_id:010d}", seen,
                                                                 view.image, view.raw)
                if kept is not None:
                    fields[camera] = kept
                continue
            fields[camera] = self._evidence(camera, str(part.event_id), view.image, view.raw)
        return fields

    def on_frame(self, result: FrameResult) -> None:
        if result.event is not None or result.anomalous:
            return
        seen = self._ok_turn(result.camera)
        if seen is None:
            return
        name = f"{result.frame_index:010d}"
        if self._ok_worker is None:
            self._ok_sample(result.camera, name, seen, result.image, result.raw)
        else:       # the frame is not modified after delivery (FrameResult), so the worker may hold it
            self._ok_worker.offer(functools.partial(self._ok_sample, result.camera, name, seen, result.image,
                                                    result.raw))

    def _ok_turn(self, camera: str) -> Optional[int]:
        """Counts an OK image of ``camera``; its number when a sample of it is due (one of every
        ``ok_every``), else None."""
        every = self.settings.ok_every
        if not every:
            return None
        with self._counts_lock:
            seen = self._ok_seen.get(camera, 0)
            self._ok_seen[camera] = seen + 1
        return None if seen % every else seen

    def _ok_sample(self, camera: str, name: str, seen: int, image: np.ndarray,
                   raw: Optional[RawImage] = None) -> Optional[Dict[str, object]]:
        """Keep the OK image (frames in free run, parts when triggered; ``seen``: its number from
        ``_ok_turn``) as ``ok/<name>.png``, and its camera bits (``raw``) as ``ok/<name>.raw.png``; the
        fields that name them, or None when not kept (no room, not written)."""
        with self._lock:
            if self.used_bytes > self.settings.max_bytes and not self._keep_budget():
                self.ok_skipped += 1
                return None
        try:
            data = self._encode(image)
        except NotWritten as exc:
            with self._lock:
                self._counted(str(exc))
            return None
        raw_data, raw_failure = None, None
        if raw is not None:
            try:
                raw_data = self._encode(raw)
            except NotWritten as exc:
                raw_failure = str(exc)
        with self._lock:
            if self._evidence_bytes + len(data) + len(raw_data or b"") > self.settings.max_bytes:
                # no room even with every older OK sample gone: written, the budget check would delete this
                # very sample, and its part would name a file that is gone
                self.ok_skipped += 1
                return None
            path = self.folder / camera / OK_FOLDER / f"{name}.png"
            own_name = path.with_name(f"{name}_{os.getpid()}_{seen}.png")
            if path.exists():          # an earlier run's sample of the same name: keep both
                path = own_name
            try:
                path = self._write(path, data, or_else=None if path == own_name else own_name)
            except NotWritten as exc:
                self._counted(str(exc))
                return None
            files, fields = [path], {"evidence": _as_named(path)}
            if raw is not None:
                raw_path = None
                if raw_data is not None:
                    try:
                        raw_path = self._write(path.with_name(raw_of_name(path.name, raw=True)), raw_data)
                        files.append(raw_path)
                    except NotWritten as exc:
                        raw_failure = str(exc)
                fields.update(evidence_raw=None if raw_path is None else _as_named(raw_path),
                              evidence_raw_pixel_format=raw.pixel_format)
            self.ok_written += 1
            self._ok_files.append((tuple(files), sum(f.stat().st_size for f in files)))
            self._counted(raw_failure)
        return fields

    def on_stop(self) -> None:
        """The OK samples still queued get OK_SAMPLES_DRAIN_S to be written; the rest count as dropped."""
        if self._ok_worker is not None:
            self._ok_worker.close(OK_SAMPLES_DRAIN_S)

    def health(self) -> OutputHealth:
        # no lock held across a write is taken here: a scrape of /metrics must answer on a stalled disk
        queue_dropped = self._ok_worker.dropped if self._ok_worker is not None else 0
        return self.delivery.health(dropped=self.ok_skipped + queue_dropped)


class NotWritten(Exception):
    """A file of an evidence item could not be encoded or written; the message names it and why."""


def raw_of_name(name: str, raw: bool = False) -> str:
    """The name of the camera's bits beside frame ``name`` (``raw``), or of the frame beside bits ``name``."""
    return name[:-len(".png")] + RAW_SUFFIX if raw else name[:-len(RAW_SUFFIX)] + ".png"


def _as_named(path: Path) -> str:
    """An image's path as its event names it: absolute, so that `mrkd review` and `mrkd refit` find it
    from any folder (relative, it meant "from where `mrkd run` ran", which nothing records)."""
    return os.path.abspath(path)


def outputs_from(settings) -> list:
    """``--evidence DIR`` (OutputSettings.evidence: an EvidenceSettings or a folder)."""
    evidence = getattr(settings, "evidence", None)
    if not evidence:
        return []
    return [EvidenceWriter(evidence if isinstance(evidence, EvidenceSettings) else EvidenceSettings(str(evidence)),
                           background=True)]
