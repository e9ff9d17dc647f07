"""Operator review labels: what a person said about an alarm, kept as an append-only JSON-lines file.

One line per decision (``ReviewLabel``): the event and camera whose image it is about (``LabelKey``:
a part of two cameras has two images, each with a label of its own), the sha256 of the image the
operator looked at (the lossless evidence PNG, ``runtime/outputs/evidence.py``), the label
("good": a good part, a false alarm; "defect": a defect confirmed), who, when, an optional note,
the events log the event came from (schema 2, ``EventsLogRef``: its path and its first event id) and
the record's schema version (3: the label is of its camera's image; 1 and 2, written by an older mrkd:
of the event, see below). Lines are only ever appended (one ``os.write`` of a whole line on an
O_APPEND descriptor, then fsync), so the file is the history of every decision and a crash leaves at
most a torn last line.

Reading (``read_labels``) validates every line. Rules, stated once here and used by ``mrkd refit``:

* a torn LAST line (no newline at the end, not valid JSON: a crash mid-write) is skipped with a
  warning; a malformed line anywhere else is an error naming the file and line;
* the same image (event and camera) labelled twice: the LAST line wins (a correction is a new line;
  nothing is edited). A new label that CHANGES an image's label (good -> defect or back) is written
  only when asked for explicitly (``append_checked(replace=True)``: `mrkd review --replace`, POST
  /review's ``"replace": true``); otherwise it is refused (``AlreadyLabelled``, the page's 409) naming
  the label that stands, so two reviewers never overwrite each other unawares. Another camera's image
  of the same part is another image: its label changes nothing. ``label_states`` gives each image's
  standing label and, for a correction, the one it replaced (listing and page);
* older files keep their meaning: a label of schema 1 or 2 was the EVENT's one label, so it replaces
  whatever its event had (another camera's label too), and one naming no camera is of the event's one
  flagged camera (``standing_label`` puts it on that camera's row; a later label of that image, the
  same sha256, takes its place);
* the same image (sha256) ending up both "good" and "defect" under different events is refused by
  ``latest_labels`` (an operator contradicting themselves is a question, not a training signal). A
  new label that would do so is refused before it is written (``append_checked``); a file that holds
  such a conflict anyway (hand-edited, older mrkd) can still be listed (``find_conflicts``) and is
  settled by labelling the events together.

Paths: a label's ``image`` is the evidence image's absolute path when it was made; an older file's
relative path is looked up beside the label file, then beside the events log, then in the current
folder (``label_image``). An event's ``evidence`` is the absolute path the run wrote (mrkd before
c55174d wrote it relative to the folder ``mrkd run`` ran in): it is looked up as written, then (relative)
beside the events log, then as ``<camera>/<event_id>.png`` in the evidence folder (``find_evidence``: the
folder moved, or the run started elsewhere), then (relative) below the log's upper folders, that one only
with the sha256 the event recorded. A label is only made of evidence whose sha256 is the one the event
recorded.

The runtime never imports torch; this module is numpy-free too.
"""

from __future__ import annotations

import contextlib
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
from typing import Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, TypeVar

from mrkd.atomic import append_whole
from mrkd.errors import MrkdError
from mrkd.runtime.metadata import file_sha256

try:
    import fcntl
except ImportError:          # not POSIX: the in-process lock only
    fcntl = None

logger = logging.getLogger(__name__)

LABEL_SCHEMA_VERSION = 3        # 2: a label records its events log (events_log, events_log_first_event)
PER_CAMERA_SCHEMA = 3           # from 3 on a label is one camera's image's (LabelKey), before it was its event's
GOOD, DEFECT = "good", "defect"
LABELS = (GOOD, DEFECT)
LABEL_WORDS = {GOOD: "good part (false alarm)", DEFECT: "defect confirmed"}
SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_NOTE = 1000
MAX_WHO = 100
MAX_MARKS = 100                # events one call (`mrkd review --mark`, POST /review) may label together
LABEL_KEYS = ("event_id", "image_sha256", "label", "who", "when")     # what every label line has


class ReviewError(MrkdError, ValueError):
    """A label file or a review decision that cannot be used; the message names the file, line or field."""


class EventsLogGivenAsLabels(ReviewError):
    """read_labels was given an events log (`mrkd run --events`) instead of a label file; its caller may
    say which of its own options each file belongs to."""


class UnlabellableError(ReviewError):
    """The event cannot be labelled as asked: no evidence image, evidence changed since the run, or a
    label that contradicts another (POST /review answers 409). ``together``: for a contradiction, the
    events that would settle it when labelled as asked in one call (the page offers that)."""

    def __init__(self, message: str, together: Sequence[str] = ()):
        super().__init__(message)
        self.together = list(together)


class AlreadyLabelled(UnlabellableError):
    """A new label would change the label an event already has; nothing was written. ``existing``: the
    standing labels of those events (POST /review answers 409 with them; the page asks before it
    sends the label again with ``replace``)."""

    def __init__(self, message: str, existing: Sequence["ReviewLabel"]):
        super().__init__(message)
        self.existing = list(existing)


class LabelKey(NamedTuple):
    """What a label is about: the image of ``camera`` in event ``event_id`` (a frame alarm's camera, or
    one camera of a part). ``camera`` "": a label that names none (an older file): the event's one
    flagged camera."""

    event_id: str
    camera: str


@dataclass(frozen=True)
class ReviewLabel:
    """One operator decision about one camera's image of one alarm event."""

    event_id: str
    image_sha256: str            # sha256 of the evidence image the operator saw
    label: str                   # "good" (false alarm) | "defect" (confirmed)
    who: str
    when: str                    # ISO 8601 UTC
    note: str = ""
    image: str = ""              # the evidence image's path as the reviewer found it
    camera: str = ""
    events_log: str = ""             # the events log's absolute path when labelled (schema 2; "" = not recorded)
    events_log_first_event: str = ""  # ... and its identity: the id of its first event (EventsLogRef)
    schema_version: int = LABEL_SCHEMA_VERSION

    @property
    def key(self) -> LabelKey:
        return LabelKey(self.event_id, self.camera)

    @property
    def log_ref(self) -> Optional["EventsLogRef"]:
        """The events log this label's event came from; None when the label does not say (schema 1)."""
        return EventsLogRef(self.events_log, self.events_log_first_event) if self.events_log else None

    def validate(self, where: str = "label") -> "ReviewLabel":
        for name in ("event_id", "image_sha256", "label", "who", "when", "note", "image", "camera", "events_log",
                     "events_log_first_event"):
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
        if bool(self.events_log) != bool(self.events_log_first_event):
            raise ReviewError(f"{where}: fields events_log and events_log_first_event go together (both or neither)")
        if self.events_log and (self.schema_version < 2 or not os.path.isabs(self.events_log)):
            raise ReviewError(f"{where}: field events_log must be an absolute path, in a label of schema_version 2 "
                              f"or later")
        return self

    @classmethod
    def from_dict(cls, data, where: str) -> "ReviewLabel":
        if not isinstance(data, dict):
            raise ReviewError(f"{where}: a label must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in LABEL_KEYS if n not in data]
        if missing:
            raise ReviewError(f"{where}: field {missing[0]} is missing")
        unknown = sorted(set(data) - names)
        if unknown:
            raise ReviewError(f"{where}: unknown field {unknown[0]!r}")
        return cls(**{"schema_version": 1, **data}).validate(where)      # no version: written before there were two


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def default_who() -> str:
    try:
        return getpass.getuser() or "operator"
    except Exception:   # no user database entry (containers)
        return "operator"


image_sha256 = file_sha256     # an evidence image is named by its file's hash


def check_label_file(path: Path, data: Optional[bytes] = None) -> None:
    """Refuse (ReviewError, the file left unchanged) a file that is not an mrkd label file, by the events
    log's rule (events.foreign_line): its complete lines must all be labels, and a last line without a
    newline is cut only as the torn start of a label after at least one whole one. Before, notes or an
    image given as --labels lost their last line (or bytes) to the torn-line repair. ``data``: the file's
    bytes, when the caller read them (default: read here)."""
    from mrkd.runtime.outputs.events import foreign_line
    foreign = foreign_line(path.read_bytes() if data is None else data, _is_label_line, blank_ok=True)
    if foreign == "tail":
        raise ReviewError(f"{path}: does not end in a newline and its last line is not a torn label, so this is not "
                          "an mrkd label file; it is left unchanged")
    if foreign is not None:
        raise ReviewError(f"{path}:{foreign}: not a review label, so this is not an mrkd label file; it is left "
                          "unchanged (give a new file or one `mrkd review` wrote as --labels)")


def _is_label_line(raw: bytes) -> bool:
    try:
        return _is_label_record(json.loads(raw.decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


class LabelFile:
    """Appends labels to a JSON-lines file: each ``append`` is one whole-line write, fsync'd, before it
    returns. Opening cuts a torn last line left by a crash (with a warning), as the events log does."""

    def __init__(self, path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise ReviewError(f"{self.path}: is not a file")
        self._created = not self.path.exists()     # an empty file left by a failed first label is removed
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise ReviewError(f"{self.path}: cannot open the label file ({exc.strerror or exc}); "
                              "label not saved") from None
        self._lock = threading.RLock()      # locked() holds it around extend()
        try:
            # Under the file's lock: another writer (the page, a second `mrkd review`) writes under it,
            # and a write of many labels can be seen half done; judged or cut then, its label was lost.
            with self._flocked():
                data = self.path.read_bytes()      # once, for the check and the repair
                if not self._created:
                    check_label_file(self.path, data)
                size = len(data)
                if size:
                    keep = data.rfind(b"\n") + 1
                    if keep < size:
                        from mrkd.runtime.outputs.events import mend_torn_tail
                        mend_torn_tail(self._fd, self.path, keep, data[keep:], _is_label_line)
        except BaseException:
            os.close(self._fd)
            raise

    def append(self, label: ReviewLabel) -> ReviewLabel:
        self.extend([label])
        return label

    def extend(self, labels: Sequence[ReviewLabel]) -> None:
        """Append ``labels`` in ONE write, so a set of events relabelled together lands together."""
        for label in labels:
            label.validate(str(self.path))
        data = b"".join((json.dumps(dataclasses.asdict(label), sort_keys=True) + "\n").encode("utf-8")
                        for label in labels)
        with self._lock:
            try:
                append_whole(self._fd, data)      # disk full: never leave half a line behind
            except OSError as exc:
                raise ReviewError(f"{self.path}: {exc.strerror or exc}; label not saved") from None

    @contextlib.contextmanager
    def locked(self) -> Iterator["LabelFile"]:
        """Hold the file (flock, and this object's lock) from a check to the write it allows: another
        writer (the page, a second `mrkd review`) cannot slip a contradicting label in between."""
        with self._lock, self._flocked():
            yield self

    @contextlib.contextmanager
    def _flocked(self) -> Iterator[None]:
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            empty = os.fstat(self._fd).st_size == 0
            os.close(self._fd)
            self._fd = None
            if self._created and empty:
                try:
                    self.path.unlink()
                except OSError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _json_lines(path: Path, kind: str, data: Optional[bytes] = None) -> Iterator[Tuple[str, object]]:
    """(``file:line``, record) of every non-blank JSON line of ``path`` (``data``: its bytes, read by the
    caller). A torn LAST line (no newline after it, not JSON: a crash mid-write) is skipped with a
    warning; a malformed line elsewhere is a ReviewError."""
    data = path.read_bytes() if data is None else data
    from mrkd.runtime.outputs.events import power_cut_zeros, torn_tail_said
    zeros = power_cut_zeros(data)        # a power cut's: the record before them may be whole (its newline lost)
    data = data[:len(data) - zeros]
    lines = data.split(b"\n")
    torn_tail = (not data.endswith(b"\n") and data != b"") or zeros > 0
    if zeros and not lines[-1]:          # only zeros after the last newline: nothing of a record to read
        logger.warning("%s: skipping a torn last line of the %s (%s)", path, kind,
                       torn_tail_said(b"\0" * zeros, emptied=not data))
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            if number == len(lines) and torn_tail:
                said = torn_tail_said(raw + b"\0" * zeros) if zeros else f"{len(raw)} bytes, a crash mid-write?"
                logger.warning("%s: skipping a torn last line of the %s (%s)", where, kind, said)
                continue
            raise ReviewError(f"{where}: not a JSON line ({exc})") from exc


def read_labels(path, data: Optional[bytes] = None) -> List[ReviewLabel]:
    """Every label of the file, in order (see the module's rules for torn and malformed lines).
    ``data``: the file's bytes as the caller read them (refit hashes the very bytes it uses)."""
    path = Path(path)
    if data is None and not path.is_file():
        raise ReviewError(f"{path}: label file not found")
    labels = []
    for where, record in _json_lines(path, "label file", data):
        if _is_event_record(record):     # its first error would be "field image_sha256 is missing"
            raise EventsLogGivenAsLabels(f"{where}: an mrkd event, not a review label: {path} is an events log "
                                         f"(`mrkd run --events`); give the label file `mrkd review` or the "
                                         f"operator page writes")
        labels.append(ReviewLabel.from_dict(record, where))
    return labels


def _is_event_record(record) -> bool:
    # an `mrkd run --events` line: an event id and its "time" (labels have "when"), no label
    return isinstance(record, dict) and "event_id" in record and "time" in record and "label" not in record


def _is_label_record(record) -> bool:
    # events carry "time", labels "when": a label line is never mistaken for an event
    return isinstance(record, dict) and all(k in record for k in LABEL_KEYS) and "time" not in record


def read_review_events(path) -> List[dict]:
    """The events (records with an ``event_id``) of an `mrkd run --events` log, by the label file's
    rules for torn and malformed lines (a run killed mid-write leaves a torn last line). A label
    file given instead is refused."""
    path = Path(path)
    if not path.is_file():
        raise ReviewError(f"{path}: events log not found")
    events, records = [], 0
    for where, record in _json_lines(path, "events log"):
        if _is_label_record(record):
            raise ReviewError(f"{where}: a review label, not an event: {path} is a label file; give the events "
                              f"log of `mrkd run --events` (and this file as --labels)")
        if isinstance(record, dict) and record.get("event_id"):
            events.append(record)
        records += 1
    if records and not events:     # e.g. another tool's JSON lines: "0 of 0 events" would read as a quiet run
        raise ReviewError(f"{path}: none of its {records} JSON line(s) is an mrkd event (no event_id): give the "
                          f"events log of `mrkd run --events`")
    return events


# ---------------------------------------------------------------- which events log a label came from

# What names an events log: the id of its FIRST event, kept with its path. The path alone breaks both ways:
# a folder moved (or copied to another machine) loses it, and a new run's log written at the same path
# takes it over. The log's records carry no run id, and the model hash is shared by every run of a model
# and changes within one log at a hot swap. An event id is unique across runs and machines (UTC time + 32
# random bits, events.new_event_id), and a log is only ever appended to (EventLog refuses any file that
# is not all events and cuts only a torn LAST line), so the first event id is fixed for the log's life,
# travels with it, and differs between two runs' logs. A copy of the log has it too: rightly, it holds
# the same events. A log rotated by truncation begins with another event: it is another log.

@dataclass(frozen=True)
class EventsLogRef:
    """The events log a label's event came from: its absolute path when labelled, and its identity."""

    path: str
    first_event: str


def first_event_id(path) -> Optional[str]:
    """The event id of the first event of the events log ``path`` (lines that are not events are passed
    over); None when it holds none. OSError when it cannot be read."""
    with open(path, "rb") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("event_id"), str) and record["event_id"] \
                    and not _is_label_record(record):
                return record["event_id"]
    return None


def events_log_ref(events_path) -> Optional[EventsLogRef]:
    """What a new label records of the events log it was made from (None when the log cannot be read)."""
    try:
        first = first_event_id(events_path)
    except OSError:
        return None
    return EventsLogRef(os.path.abspath(events_path), first) if first else None


@dataclass(frozen=True)
class RecordedLog:
    """A label's recorded events log as found now: ``path`` and its ``events`` (id -> event) when a file
    with its identity was found; else ``problem``, one line (gone, replaced, unreadable)."""

    ref: EventsLogRef
    path: Optional[Path] = None
    events: Optional[Dict[str, dict]] = None
    problem: str = ""


def find_recorded_log(ref: EventsLogRef, labels_path) -> RecordedLog:
    """The log ``ref`` names: at its recorded path, else a file of its name beside the label file (the
    folder moved with both in it); only a file whose first event is the recorded one counts."""
    recorded = Path(ref.path)
    # absolute, so a label file given relative does not make its own log a second candidate (named twice)
    beside = Path(os.path.abspath(Path(labels_path).parent / recorded.name))
    candidates = list(dict.fromkeys([recorded, beside]))
    others = []
    for candidate in candidates:
        try:
            first = first_event_id(candidate) if candidate.is_file() else None
        except OSError as exc:
            return RecordedLog(ref, problem=f"cannot be read ({candidate}: {exc.strerror or exc})")
        if first == ref.first_event:
            try:
                return RecordedLog(ref, candidate, {str(e["event_id"]): e for e in read_review_events(candidate)})
            except (ReviewError, OSError) as exc:
                return RecordedLog(ref, problem=f"cannot be read ({exc})")
        if candidate.is_file():
            others.append(f"{candidate} begins with event {first!r}")
    if others:
        return RecordedLog(ref, problem=f"was replaced by another log ({'; '.join(others)})")
    return RecordedLog(ref, problem=f"is gone (not at {recorded}, nor beside the label file)")


def recorded_logs(labels: Sequence[ReviewLabel], labels_path) -> Dict[EventsLogRef, RecordedLog]:
    """Each events log the labels record, looked up once."""
    refs = dict.fromkeys(label.log_ref for label in labels if label.log_ref is not None)
    return {ref: find_recorded_log(ref, labels_path) for ref in refs}


@dataclass(frozen=True)
class LoggedEvent:
    """An event and the events log it is in (with the evidence folder to look in for its image)."""

    event: dict
    events_path: Path
    evidence_dir: Optional[Path] = None


def events_of_earlier_logs(labels_path, event_ids: Sequence[str]) -> Dict[str, LoggedEvent]:
    """The events of ``event_ids`` found in the events logs their standing labels in ``labels_path``
    recorded. A label file outlives an events log (a new log per day, logrotate): settling a contradiction
    with an image labelled under the earlier log labels that log's event too."""
    path = Path(labels_path)
    if not path.is_file():
        return {}
    wanted = set(event_ids)
    labelled = [label for label in read_labels(path) if label.event_id in wanted and label.log_ref is not None]
    found: Dict[str, LoggedEvent] = {}
    for log in recorded_logs(labelled, path).values():
        if log.events is None or log.path is None:
            continue
        for event_id in sorted(wanted & log.events.keys()):
            found.setdefault(event_id, LoggedEvent(log.events[event_id], log.path, log.path.parent / "evidence"))
    return found


def events_to_label(event_ids: Sequence[str], in_log: Mapping[str, dict], events_path, evidence_dir,
                    labels_path) -> Dict[str, LoggedEvent]:
    """The events of ``event_ids`` a labelling names: those of the given log (``in_log``: its events by id,
    at ``events_path``, images in ``evidence_dir``), the others from the earlier logs their standing labels
    in ``labels_path`` recorded (events_of_earlier_logs). An id in neither is left out (the caller says so)."""
    found = {event_id: LoggedEvent(in_log[event_id], Path(events_path), evidence_dir)
             for event_id in event_ids if event_id in in_log}
    elsewhere = [event_id for event_id in event_ids if event_id not in found]
    if elsewhere:       # an event of an earlier log the label file holds a label of (a contradiction's other side)
        found.update(events_of_earlier_logs(labels_path, elsewhere))
    return found


def label_logged_events(events: Sequence[LoggedEvent], label: str, **how) -> List[ReviewLabel]:
    """label_events for events of one or more logs (each label records its own event's log), in the
    order given; ``how``: label_events' keywords but the log and the evidence folder."""
    groups: Dict[Tuple[Path, Optional[Path]], List[dict]] = {}
    for logged in events:
        groups.setdefault((logged.events_path, logged.evidence_dir), []).append(logged.event)
    made: Dict[str, ReviewLabel] = {}
    for (events_path, evidence_dir), group in groups.items():
        for made_label in label_events(group, label, events_path=events_path, evidence_dir=evidence_dir, **how):
            made[made_label.event_id] = made_label
    return [made[str(logged.event.get("event_id"))] for logged in events]


# ---------------------------------------------------------------- last labels and contradictions

@dataclass(frozen=True)
class Conflict:
    """One image (sha256) that the last labels of its events call both good and defect."""

    image_sha256: str
    good: Tuple[str, ...]        # events whose last label says good
    defect: Tuple[str, ...]      # ... and defect

    @property
    def events(self) -> Tuple[str, ...]:
        return self.good + self.defect

    def describe(self) -> str:
        def events(ids):
            return ("event " if len(ids) == 1 else "events ") + ", ".join(ids)
        return (f"image {self.image_sha256[:12]} is labelled {GOOD!r} ({events(self.good)}) and {DEFECT!r} "
                f"({events(self.defect)})")


def last_per_image(labels: Sequence[ReviewLabel]) -> Dict[LabelKey, ReviewLabel]:
    """(event, camera) -> its last label, in the order of the deciding lines (no check)."""
    return {key: state.current for key, state in label_states(labels).items()}


def find_conflicts(latest: Mapping[LabelKey, ReviewLabel]) -> List[Conflict]:
    """Every image whose events' last labels disagree."""
    by_image: Dict[str, Dict[str, List[str]]] = {}
    for label in latest.values():
        by_image.setdefault(label.image_sha256, {GOOD: [], DEFECT: []})[label.label].append(label.event_id)
    return [Conflict(sha, tuple(found[GOOD]), tuple(found[DEFECT]))
            for sha, found in by_image.items() if found[GOOD] and found[DEFECT]]


def mark_command(event_ids: Sequence[str], label: str = f"{GOOD}|{DEFECT}", events_path="EVENTS",
                 labels_path="LABELS") -> str:
    """The `mrkd review` call that labels ``event_ids`` together (how a contradiction is settled: it
    changes a standing label, so it says --replace)."""
    marks = " ".join(f"--mark {event_id}" for event_id in event_ids)
    return f"mrkd review {events_path} --labels {labels_path} {marks} --as {label} --replace"


def latest_labels(labels: Sequence[ReviewLabel], source: str = "labels") -> Dict[LabelKey, ReviewLabel]:
    """(event, camera) -> its last label. Refuses an image (sha256) that ends up both good and defect."""
    latest = last_per_image(labels)
    conflicts = find_conflicts(latest)
    if conflicts:
        more = f" (and {len(conflicts) - 1} more such image(s))" if len(conflicts) > 1 else ""
        raise ReviewError(f"{source}: {conflicts[0].describe()}{more}; settle it by labelling those events "
                          f"together: {mark_command(conflicts[0].events, labels_path=source)}")
    return latest


def new_conflicts(after: Mapping[LabelKey, ReviewLabel], new: Sequence[ReviewLabel]) -> List[Conflict]:
    """The contradictions that ``new`` labels, standing in ``after``, bring about or leave standing on
    their images (one that only other images have is not theirs to settle)."""
    images = {label.image_sha256 for label in new}
    return [c for c in find_conflicts(after) if c.image_sha256 in images]


@dataclass(frozen=True)
class LabelState:
    """An image's standing label (its last line) and, when that line changed the image's label, the
    label it replaced (a correction; None otherwise)."""

    current: ReviewLabel
    replaced: Optional[ReviewLabel] = None


def changes(old: ReviewLabel, new: ReviewLabel) -> bool:
    """Whether ``new`` changes what ``old`` says: the other label, or another image (an older file's
    label of another camera of the part). The same label of the same image again (a note added) is no
    change."""
    return (old.label, old.image_sha256) != (new.label, new.image_sha256)


class StandingLabels:
    """The labels that stand, line by line, by the module's rules: a label takes the place of the one
    of its (event, camera), and of one naming no camera with the same image (either way round); a label
    of schema 1 or 2 (one label per event then) takes the place of every label its event has. ``states``:
    LabelKey -> LabelState, in the order of the deciding lines."""

    def __init__(self, labels: Sequence[ReviewLabel] = ()):
        self.states: Dict[LabelKey, LabelState] = {}
        self._keys_of: Dict[str, List[LabelKey]] = {}    # event id -> its standing keys, oldest decision first
        for label in labels:
            self.add(label)

    def add(self, label: ReviewLabel) -> Optional[LabelState]:
        """Let ``label`` stand; the state it took the place of (the same image's, else the last of its
        event's that it replaced), None when there was none."""
        keys = self._keys_of.setdefault(label.event_id, [])
        if label.schema_version < PER_CAMERA_SCHEMA:
            taken = list(keys)
        else:
            taken = [k for k in keys if k == label.key or ("" in (k.camera, label.camera) and
                                                          self.states[k].current.image_sha256 == label.image_sha256)]
        olds = {k: self.states.pop(k) for k in taken}
        keys[:] = [k for k in keys if k not in olds]
        same = [k for k, state in olds.items() if state.current.image_sha256 == label.image_sha256]
        # a label naming no camera is of the camera whose label of that image it follows (or is followed by)
        key = label.key if label.camera else next((k for k in same if k.camera), label.key)
        # what it corrects: that image's label, else (an older file's change of camera) the event's last
        before = olds.get(key) or next((olds[k] for k in reversed(same or list(olds))), None)
        if before is None:
            state = LabelState(label)
        elif changes(before.current, label):
            state = LabelState(label, before.current)
        else:       # the same again: a correction it follows still stands as one
            state = LabelState(label, before.replaced)
        self.states[key] = state
        keys.append(key)
        return before

    def latest(self) -> Dict[LabelKey, ReviewLabel]:
        return {key: state.current for key, state in self.states.items()}


def label_states(labels: Sequence[ReviewLabel]) -> Dict[LabelKey, LabelState]:
    """(event, camera) -> its LabelState, by the rule refit reads (the last line wins; no check)."""
    return StandingLabels(labels).states


S = TypeVar("S")


def standing_label(states: Mapping[LabelKey, S], event: dict, camera: Optional[str]) -> Optional[S]:
    """What ``states`` (label_states, last_per_image) hold for the image of ``camera`` in ``event`` (a
    frame alarm, or a part and one of its cameras): its own, else a label naming no camera (an older
    file) when ``camera`` is the event's one flagged camera."""
    event_id, camera = str(event.get("event_id")), camera or ""
    own = states.get(LabelKey(event_id, camera))
    if own is not None or not camera:
        return own
    unnamed = states.get(LabelKey(event_id, ""))
    if unnamed is None:
        return None
    if is_part(event):
        return unnamed if part_camera(event, None)[0] == camera else None
    return unnamed if event.get("camera") in (camera, None) else None      # a frame alarm: its one image


class LabelStatesOfFile:
    """A label file's ``label_states``, read again only when the file changed (its identity, size or
    time): the page asks every second, the file changes a few times an hour. ``version`` counts the
    changes read, so each caller tells for itself whether there is news. A file that cannot be read
    keeps the last states read (said once per change)."""

    def __init__(self, path):
        self.path = Path(path)
        self.version = 0
        self._seen: Optional[Tuple[int, int, int, int]] = None
        self._states: Dict[LabelKey, LabelState] = {}
        self._lock = threading.Lock()

    def states(self) -> Dict[LabelKey, LabelState]:
        """(event, camera) -> LabelState, as the file is now."""
        with self._lock:
            try:
                info = os.stat(self.path)
                seen = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
            except FileNotFoundError:
                seen = None
            except OSError as exc:
                logger.warning("%s: cannot read the label file (%s)", self.path, exc.strerror or exc)
                return self._states
            if seen == self._seen:
                return self._states
            self._seen = seen
            try:
                states = label_states(read_labels(self.path)) if seen is not None else {}
            except (ReviewError, OSError) as exc:
                logger.warning("%s: %s (the page keeps the labels read before)", self.path, exc)
                return self._states
            if states != self._states:
                self._states, self.version = states, self.version + 1
            return self._states


def describe_label(label: ReviewLabel) -> str:
    """'defect confirmed by ann at 2026-01-02 10:11:12' (UTC, as the label's ``when``)."""
    when = label.when.replace("T", " ")[:19]
    return f"{LABEL_WORDS[label.label]} by {printable(label.who)} at {when}"


def label_summary(label: ReviewLabel) -> dict:
    """What the page shows of a label (POST /review's 409 ``existing``, the alarms' ``review``)."""
    return {"event_id": label.event_id, "camera": label.camera, "label": label.label,
            "words": LABEL_WORDS[label.label], "who": label.who, "when": label.when, "note": label.note}


def append_checked(path, new: Sequence[ReviewLabel], hint: Callable[[Sequence[str], str], str],
                   replace: bool = False, replace_hint: str = "give --replace") -> None:
    """Append ``new`` (one write) unless an image would end up both good and defect: then nothing is
    written and UnlabellableError names the other events; ``hint(event_ids, label)`` says how to
    label them together. Unless ``replace``, a label that changes an image's standing one is refused
    too (AlreadyLabelled, naming it; ``replace_hint`` says how to confirm); another camera's image of
    the same part is no change. The file is locked from the check to the write."""
    with LabelFile(path) as log, log.locked():
        standing = StandingLabels(read_labels(log.path))
        changed = []
        for label in new:
            before = standing.add(label)
            if before is not None and changes(before.current, label):
                changed.append((before.current, label))
        if changed and not replace:
            first, asked = changed[0]
            camera = f" (camera {printable(first.camera)}'s image)" if first.camera else ""
            more = f" (and {len(changed) - 1} more of these images)" if len(changed) > 1 else ""
            raise AlreadyLabelled(f"{log.path}: nothing written: event {first.event_id} is already labelled "
                                  f"{describe_label(first)}{camera}{more}; to change it to "
                                  f"{LABEL_WORDS[asked.label]!r}, {replace_hint}", [old for old, _ in changed])
        conflicts = new_conflicts(standing.latest(), new)
        if conflicts:
            raise UnlabellableError(*_refusal(conflicts[0], new, log.path, hint))
        log.extend(new)


def _refusal(conflict: Conflict, new: Sequence[ReviewLabel], path, hint) -> Tuple[str, List[str]]:
    """The refusal's message, and the events to label together to settle it."""
    label = new[0].label                  # one call gives all its events the same label
    asked = [n.event_id for n in new if n.image_sha256 == conflict.image_sha256]
    other = DEFECT if label == GOOD else GOOD
    opposing = [e for e in (conflict.defect if label == GOOD else conflict.good) if e not in asked]
    return (f"{path}: nothing written: event {', '.join(asked)} would be {label!r}, but its image "
            f"{conflict.image_sha256[:12]} is {other!r} under event {', '.join(opposing)} (one image is good or "
            f"defect, not both); label them together: {hint(asked + opposing, label)}"), asked + opposing


def label_image(label: ReviewLabel, labels_path, events_path=None, evidence_dir=None,
                hashes: Optional["FileHashes"] = None) -> Optional[Path]:
    """The image file a label names: its absolute path, or an older file's relative one beside the
    label file, then beside the events log, then in the current folder. An absolute path that is gone
    (the work folder was moved or copied to another machine) is looked for by its last parts (evidence
    folder, camera, file) in those folders too, then as ``<evidence_dir>/<camera>/<file>`` and
    ``<evidence_dir>/<file>`` (the evidence store's layout: an evidence folder moved on its own, given as
    refit's --evidence). Of the files found, the first with the label's sha256, else the first (its reader
    says it changed); none found: the first tried, for the message. None when the label names no image."""
    if not label.image:
        return None
    named = Path(label.image)
    if named.is_absolute() and named.is_file():
        return named
    folders = [Path(labels_path).parent] + ([Path(events_path).parent] if events_path else []) + [Path.cwd()]
    tails = [Path(*named.parts[-k:]) for k in (3, 2) if len(named.parts) > k] if named.is_absolute() else [named]
    candidates = [folder / tail for tail in tails for folder in folders]
    if evidence_dir is not None and _plain_name(named.name):
        candidates += _store_paths(Path(evidence_dir), label.camera, named.name)
    found = first_evidence(candidates, label.image_sha256, hashes)
    return found or (named if named.is_absolute() else candidates[0])


def _store_paths(folder: Path, camera, name: str) -> List[Path]:
    """Where the evidence store keeps the image ``name`` of ``camera`` below ``folder``: ``<camera>/<name>``,
    then (a frame alarm of an older layout) ``<name>``."""
    return ([folder / camera / name] if _plain_name(camera) else []) + [folder / name]


def first_evidence(candidates: Sequence[Path], recorded, hashes: Optional["FileHashes"] = None) -> Optional[Path]:
    """The first of ``candidates`` that is a file with the ``recorded`` sha256, else the first that is a
    file (its caller says it changed), else None. Only when several exist is any of them hashed here
    (``hashes``: the caller's, so a file it hashes too is read once): one file is taken as before."""
    present: List[Path] = []
    for candidate in candidates:
        if candidate.is_file() and not any(_same_file(candidate, seen) for seen in present):
            present.append(candidate)
    if len(present) > 1 and isinstance(recorded, str) and recorded:
        hashes = hashes if hashes is not None else FileHashes()
        for candidate in present:
            try:
                if hashes.sha256(candidate) == recorded:
                    return candidate
            except OSError:       # unreadable: not the image as far as anyone can tell
                continue
    return present[0] if present else None


def _same_file(one: Path, other: Path) -> bool:
    try:
        return os.path.samefile(one, other)
    except OSError:
        return False


# ---------------------------------------------------------------- events and their evidence

def is_part(event: dict) -> bool:
    """Whether ``event`` is a part's (triggered mode: one judgement per camera, ``cameras``; a list as
    read from the events log, a tuple as the outputs are given it), not a frame alarm's."""
    return isinstance(event.get("cameras"), (list, tuple))


ASK_CAMERA_HTTP = 'give "camera"'       # how POST /review's caller names a camera (a field of its body)


def part_camera(event: dict, asked: Optional[str], ask_camera: str = ASK_CAMERA_HTTP) -> Tuple[Optional[str], str]:
    """The camera of a part event whose image a review labels: ``asked``, else the one flagged camera
    (or the part's only one); (None, why) when that is not one camera. ``ask_camera``: how the caller
    says to name one (`mrkd review`: give --camera NAME)."""
    cameras = [c for c in event["cameras"] if isinstance(c, dict) and isinstance(c.get("camera"), str)]
    names = [c["camera"] for c in cameras]
    if asked is not None:
        return (asked, "") if asked in names else (None, f"the part has no camera {asked!r} (it has {names})")
    flagged = [c["camera"] for c in cameras if c.get("anomalous")] or names
    if len(flagged) != 1:
        return None, f"the part has the cameras {flagged}: {ask_camera}"
    return flagged[0], ""


def one_camera_event(event: dict, camera: Optional[str] = None,
                     ask_camera: str = ASK_CAMERA_HTTP) -> Tuple[Optional[dict], str]:
    """A part event (``cameras``) as the event of the one camera whose image a label is about
    (``camera``, else the flagged one), with that camera's ``score``, ``threshold``, ``snapshot``,
    ``evidence`` and ``evidence_sha256``; a frame alarm as it is. (None, why) when that is not one
    camera (``ask_camera``: part_camera's)."""
    if not is_part(event):
        if camera is not None and camera != event.get("camera"):
            return None, f"the alarm is camera {event.get('camera')!r}'s, not {camera!r}'s"
        return event, ""
    chosen, why = part_camera(event, camera, ask_camera)
    if chosen is None:
        return None, why
    judged = next(c for c in event["cameras"] if isinstance(c, dict) and c.get("camera") == chosen)
    return _camera_record(event, judged), ""


def _camera_record(event: dict, judged: dict) -> dict:
    # a part's event as one camera's alarm: its score, threshold, snapshot and evidence
    return dict(event, camera=judged["camera"], score=judged.get("score"), threshold=judged.get("threshold"),
                snapshot=judged.get("snapshot"), evidence=judged.get("evidence"),
                evidence_sha256=judged.get("evidence_sha256"), ignore_mask_sha256=judged.get("ignore_mask_sha256"))


def review_rows(event: dict) -> List[Tuple[Optional[str], dict]]:
    """The images of an alarm event that are reviewed, each labelled on its own: (camera, the event as
    that camera's alarm, one_camera_event's). A frame alarm: its one image; an NG/ERROR part: one per
    camera that has an image (none when no camera has one)."""
    if not is_part(event):
        return [(event.get("camera"), event)]
    return [(judged["camera"], _camera_record(event, judged)) for judged in event["cameras"]
            if isinstance(judged, dict) and isinstance(judged.get("camera"), str) and judged.get("images")]


def _plain_name(name) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def names_relative_evidence(event: dict) -> bool:
    """Whether ``event`` names its evidence by a relative path: an older mrkd's log (before c55174d),
    written relative to the folder ``mrkd run`` ran in (RELATIVE_EVIDENCE)."""
    named = event.get("evidence")
    return isinstance(named, str) and bool(named) and not Path(named).is_absolute()


def find_evidence(event: dict, evidence_dir, events_path=None,
                  hashes: Optional["FileHashes"] = None) -> Optional[Path]:
    """The lossless image of ``event`` (absolute): the path the event names (``evidence``: absolute, or
    an older run's relative to where `mrkd run` ran: as written, then beside the events log), else
    ``<evidence_dir>/<camera>/<event_id>.png`` or ``<evidence_dir>/<event_id>.png``: of those that exist,
    the first with the sha256 the event recorded, else the first (first_evidence), whose change the
    caller says ("changed since the run" in a listing) or refuses (make_label).
    Found nowhere, an older run's relative path is looked for from the events log's upper folders
    (that run's folder is one of them when its --events was relative, as a service's usually is), and
    taken only with the sha256 the event recorded: that file is the event's, never a guess.
    ``hashes``: the caller's FileHashes, so a file it hashes too is read once."""
    candidates: List[Path] = []
    named = event.get("evidence")
    relative = names_relative_evidence(event)
    if isinstance(named, str) and named:
        candidates.append(Path(named))
        if relative and events_path is not None:
            candidates.append(Path(events_path).parent / named)
    event_id = str(event.get("event_id", ""))
    if evidence_dir is not None and _plain_name(event_id):
        candidates += _store_paths(Path(evidence_dir), event.get("camera"), f"{event_id}.png")
    found = first_evidence(candidates, event.get("evidence_sha256"), hashes)
    if found is None and relative and events_path is not None:
        found = _found_upward(Path(named), Path(events_path), event.get("evidence_sha256"), hashes or FileHashes())
    return Path(os.path.abspath(found)) if found is not None else None


def _found_upward(named: Path, events_path: Path, recorded, hashes: "FileHashes") -> Optional[Path]:
    """``named`` (relative) below one of the events log's upper folders whose file has the ``recorded``
    sha256 (none recorded: nothing is taken), the nearest first; None when none has."""
    if not isinstance(recorded, str) or not recorded:
        return None
    for folder in Path(os.path.abspath(events_path)).parent.parents:
        candidate = folder / named
        try:
            if candidate.is_file() and hashes.sha256(candidate) == recorded:
                return candidate
        except OSError:           # unreadable: not the event's file as far as anyone can tell
            continue
    return None


RELATIVE_EVIDENCE = "relative to the folder that run ran in, which its log does not record"


class FileHashes:
    """image_sha256 of files, each read once while it stays the same file: what one listing or one
    refit keeps, so a file named by many rows or labels is read once. Keyed by its path and identity,
    size and modification time: a file replaced or rewritten meanwhile is read again."""

    def __init__(self):
        self._known: Dict[tuple, str] = {}
        self.reads = 0                  # files read (hashed), for the callers' accounts and tests

    def sha256(self, path) -> str:
        """image_sha256(path); OSError as open and stat raise it."""
        info = os.stat(path)
        key = (os.path.abspath(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        if key not in self._known:
            self._known[key] = image_sha256(path)
            self.reads += 1
        return self._known[key]


def evidence_changed(event: dict, image, hashes: Optional[FileHashes] = None) -> bool:
    """Whether ``image`` no longer has the sha256 the event recorded for its evidence (False when
    the event recorded none). ``hashes``: the caller's for one listing or refit, so a file named by
    many rows is read once."""
    recorded = event.get("evidence_sha256")
    if not isinstance(recorded, str) or not recorded:
        return False
    return (hashes.sha256(image) if hashes is not None else image_sha256(image)) != recorded


# ---------------------------------------------------------------- making a label

def check_who(who: str, where: str) -> str:
    """A reviewer's name: one printable line of at most MAX_WHO characters (it is listed as is)."""
    if not isinstance(who, str) or not who.strip() or len(who) > MAX_WHO or not who.isprintable():
        raise ReviewError(f"{where}: who must be one printable line of 1-{MAX_WHO} characters, got {who[:120]!r}"
                          if isinstance(who, str) else f"{where}: who must be text")
    return who


def printable(text: str) -> str:
    """``text`` for a one-line listing: control characters (a newline in an older file's who) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def make_label(event_id: str, image_path, label: str, who: Optional[str] = None, note: str = "",
               camera: str = "", expected_sha256: Optional[str] = None,
               events_log: Optional[EventsLogRef] = None) -> ReviewLabel:
    """A label for ``event_id`` whose evidence image is ``image_path`` (its sha256 is taken now and,
    given ``expected_sha256`` (the event's), must be that one; the label keeps the absolute path).
    ``events_log``: the log the event is in (refit checks the label against it)."""
    image_path = Path(image_path)
    if not image_path.is_file():
        raise UnlabellableError(f"{image_path}: evidence image of event {event_id} not found")
    sha = image_sha256(image_path)
    if expected_sha256 and sha != expected_sha256:
        raise UnlabellableError(f"{image_path}: evidence image of event {event_id} changed since the run (sha256 "
                                f"{sha[:12]}, the event recorded {expected_sha256[:12]}); a label must be about "
                                f"the image that was judged")
    who = check_who(who or default_who(), f"label of event {event_id}")
    return ReviewLabel(event_id=str(event_id), image_sha256=sha, label=label, who=who, when=now_iso(),
                       note=note or "", image=os.path.abspath(image_path), camera=camera or "",
                       events_log=events_log.path if events_log else "",
                       events_log_first_event=events_log.first_event if events_log else "",
                       ).validate(f"label of event {event_id}")


def label_events(events: Sequence[dict], label: str, *, who: Optional[str] = None, note: str = "",
                 camera: Optional[str] = None, evidence_dir=None, events_path=None,
                 ask_camera: str = ASK_CAMERA_HTTP, ask_evidence: str = "") -> List[ReviewLabel]:
    """The labels of ``events``, all of the log ``events_path``: each made of its event's evidence image
    (a part's: of ``camera``, else the flagged one) found by find_evidence and checked against the hash
    the event recorded; the log's identity, which every label records, is read once for them all.
    ``ask_camera``: how the caller says to name a camera when none was given and one is needed;
    ``ask_evidence``: how it says to name an evidence folder (`mrkd review`: give --evidence DIR)."""
    events_log = events_log_ref(events_path) if events_path is not None else None
    return [_label_one(event, label, who=who, note=note, camera=camera, evidence_dir=evidence_dir,
                       events_path=events_path, events_log=events_log, ask_camera=ask_camera,
                       ask_evidence=ask_evidence)
            for event in events]


def _label_one(event: dict, label: str, *, who: Optional[str], note: str, camera: Optional[str], evidence_dir,
               events_path, events_log: Optional[EventsLogRef], ask_camera: str, ask_evidence: str) -> ReviewLabel:
    event_id = str(event.get("event_id"))
    one, why = one_camera_event(event, camera, ask_camera)
    if one is None:
        raise ReviewError(f"event {event_id}: {why}")
    image = find_evidence(one, evidence_dir, events_path)
    if image is None:
        named = one.get("evidence")
        # an event that names its evidence had it written: the file went since (moved or deleted), or
        # (an older log's relative path) it is relative to a folder nobody recorded
        if names_relative_evidence(one):
            why = (f"its evidence image {named} is not found ({RELATIVE_EVIDENCE}; looked beside the events log, "
                   f"in its upper folders and in {evidence_dir})" + (f": {ask_evidence}" if ask_evidence else ""))
        elif named:
            why = f"its evidence image {named} no longer exists (looked in {evidence_dir} too)"
        else:
            why = f"no evidence image (looked in {evidence_dir}; was `mrkd run` started with --evidence?)"
        raise UnlabellableError(f"event {event_id}: {why}; a label must name the image it is about")
    return make_label(event_id, image, label, who=who, note=note, camera=str(one.get("camera") or ""),
                      expected_sha256=one.get("evidence_sha256"), events_log=events_log)
