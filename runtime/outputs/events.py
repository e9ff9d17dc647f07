"""Alarm events: the record of one alarm (or one NG/ERROR part) and the JSON-lines log output.

Every event has an ``event_id`` (UTC time + random suffix: sortable, unique across runs and
machines); snapshot file names carry it (snapshots.py). The loop builds the record (``make_event``),
every output may add to it (``LineObserver.event_fields``: the snapshot path), then every output
receives it (``on_event``): this log, the webhook (webhook.py), MQTT, the page.

The log is append-only and crash-safe: each event is one ``os.write`` of a whole line on an
O_APPEND descriptor followed by fsync. It only ever appends to a file it wrote: an existing file is
opened only when every complete line is an mrkd event, and a torn last line (a crash mid-write) is
then cut with a warning that shows it, also when it is all the file holds (a crash in the first write:
only a start these writers can leave, ``torn_first_write``); any other file (a CSV, a model, a binary)
is refused. Zeros at the file's end are what a power cut leaves (its size reached the disk, its last
blocks did not): they are set aside before the file is judged and cut with the torn line, a file of only
zeros to empty (``power_cut_zeros``). A write
that fails (a full disk) is counted and warned about; the line goes on.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import queue
import re
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from mrkd.atomic import append_whole
from mrkd.errors import MrkdError
from mrkd.runtime.line.alarms import Alarm
from mrkd.runtime.outputs.base import LineObserver, OutputHealth, PartResult, Verdict
from mrkd.runtime.outputs.delivery import DISK_FULL, Delivery

logger = logging.getLogger(__name__)

EVENT_KEYS = ("event_id", "time")     # what every mrkd event line has (alarm and part events alike)


class EventLogError(MrkdError):
    """--events names a file that is not an mrkd events log (it is refused, never changed)."""


EVENT_ID_NAME = r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{8}"     # new_event_id's ids, as a regular expression


def new_event_id(now: Optional[dt.datetime] = None) -> str:
    """UTC time to the millisecond + 8 random hex digits, e.g. ``20261201T060512.345Z-3f9a1c2b``:
    sorts by time, unique across runs, cameras and machines, safe in a file name."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S.") + f"{now.microsecond // 1000:03d}Z-" + uuid.uuid4().hex[:8]


def make_event(alarm: Alarm, source: str, boxes: List[Dict[str, int]], snapshot: Optional[Path],
               camera: Optional[str] = None, event_id: Optional[str] = None,
               now: Optional[dt.datetime] = None) -> dict:
    """The event record of one alarm (the JSON-lines and webhook payload). ``source``: the camera's
    URI with credentials already redacted."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return {
        "event_id": event_id or new_event_id(now),
        "time": now.isoformat(timespec="milliseconds"),
        "camera": camera,
        "source": source,
        "frame_index": alarm.frame_index,
        "frame_time": alarm.timestamp,
        "score": alarm.score,
        "threshold": alarm.threshold,
        "anomalous_in_window": alarm.anomalous_in_window,
        "boxes": boxes,
        "snapshot": str(snapshot) if snapshot else None,
    }


def part_event(part: PartResult) -> dict:
    """The event record of an NG/ERROR part (``part.event_id`` set by the part runner): the
    PartResult's fields, NaN scores (a camera without an image) as null."""
    record = asdict(part)
    finite = lambda value: value if isinstance(value, float) and math.isfinite(value) else None  # noqa: E731
    record["score"], record["threshold"] = finite(record["score"]), finite(record["threshold"])
    for judgement in record["cameras"]:
        judgement["score"], judgement["threshold"] = finite(judgement["score"]), finite(judgement["threshold"])
    return {"event_id": part.event_id, "time": record_time(part.trigger_time), "kind": "part",
            **{k: v for k, v in record.items() if k != "event_id"}}


def record_time(wall: float) -> str:
    """A record's ``time``: the wall clock ``wall`` (now when 0) as UTC ISO 8601 to the millisecond."""
    stamp = dt.datetime.fromtimestamp(wall or time.time(), dt.timezone.utc)
    return stamp.isoformat(timespec="milliseconds")


def wants_event(part: PartResult) -> bool:
    """An NG or ERROR part is an event (an OK part is not)."""
    return part.verdict != Verdict.OK and part.event_id is not None


class EventLog:
    """Append-only JSON-lines file of mrkd events; ``write`` returns once the line is on disk.
    The parts log (parts_log.py) is this file with its own kind of line (``option``, ``records``,
    ``is_record``), so both logs refuse, repair and append by one rule."""

    option = "--events"            # the option that names the file, in every refusal
    records = "mrkd event"         # what each of its lines is
    log_name = "mrkd events log"
    error = EventLogError
    # The first key of every line it writes (json.dumps sort_keys): an alarm's, an NG/ERROR part's. A file
    # holding only the torn start of such a line (a crash in its first write) is cut, not refused.
    first_keys = ("anomalous_in_window", "acquired_s")

    @staticmethod
    def is_record(line: bytes) -> bool:
        return _is_event_line(line)

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._check_existing()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)   # the umask applies
        except OSError as exc:       # a folder that cannot be, a read-only place: the user's to fix, said once
            if exc.errno in DISK_FULL:   # may fit later: the output runs and counts (EventLogOutput._open)
                raise OSError(exc.errno, f"{self.path}: {exc.strerror or exc}") from None
            raise self.error(f"{self.option} {self.path}: cannot open it ({exc.strerror or exc})") from None
        self._repair_torn_tail()
        self._lock = threading.Lock()
        self.written = 0

    def _check_existing(self) -> None:
        """Refuse (``error``) a file whose complete lines are not all this log's records."""
        if not self.path.exists():
            return
        if not self.path.is_file():
            raise self.error(f"{self.option} {self.path}: not a regular file")
        with open(self.path, "rb") as handle:
            foreign = foreign_line(handle.read(), self.is_record, first_keys=self.first_keys)
        if foreign == "tail":
            raise self.error(f"{self.option} {self.path}: does not end in a newline and its last line is not a "
                             f"torn {self.records}, so this is not an {self.log_name}; it is left unchanged")
        if foreign is not None:
            raise self.error(f"{self.option} {self.path}: line {foreign} is not an {self.records}, so this is not "
                             f"an {self.log_name}; it is left unchanged (give a new file or an {self.log_name})")

    def _repair_torn_tail(self) -> None:
        size = os.fstat(self._fd).st_size
        with open(self.path, "rb") as handle:
            keep = last_line_end(handle, size)
            handle.seek(keep)
            torn = handle.read(size - keep)
        if torn:
            mend_torn_tail(self._fd, self.path, keep, torn, self.is_record)

    def write(self, event: dict) -> None:
        """One line, fsynced; OSError (naming the file) when it cannot be written (a full disk): a
        partial line is cut off again, so the log stays valid."""
        line = (json.dumps(event, sort_keys=True) + "\n").encode("utf-8")
        with self._lock:
            self._reopen_if_gone()
            try:
                append_whole(self._fd, line)
            except OSError as exc:
                raise OSError(exc.errno, f"{self.path}: {exc.strerror or exc}") from None
            self.written += 1

    def _reopen_if_gone(self) -> None:
        """(Lock held.) A log deleted under the run (its folder too), or moved away (logrotate's default
        renames it, then may create an empty file at the path), is started again at its path: lines
        written into a moved file would go to the archive while readers of the path (the review page,
        ``mrkd review``) find nothing. The new file is opened before the old descriptor is closed, and a
        failed open leaves no descriptor (``_fd`` None, tried again at the next event): a closed number
        kept here would be reused by the next socket the process opens (a PLC's connection), and the
        next line written into it."""
        if self._fd is not None:
            held = os.fstat(self._fd)
            try:
                at_path = os.stat(self.path)
            except OSError:
                at_path = None
            if at_path is not None and (at_path.st_dev, at_path.st_ino) == (held.st_dev, held.st_ino):
                return
            if held.st_nlink > 0:
                logger.info("%s: the log was moved away (rotated?) while the line ran; going on in a new one "
                            "at its path", self.path)
            else:
                logger.warning("%s: the log was deleted while the line ran; starting a new one", self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        except OSError as exc:
            self.close()
            raise OSError(exc.errno, f"{self.path}: cannot start the log again ({exc.strerror or exc})") from None
        self.close()
        self._fd = fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def foreign_line(data: bytes, is_record: Callable[[bytes], bool], blank_ok: bool = False,
                 first_keys: Tuple[str, ...] = ()):
    """Why ``data`` is not a JSON-lines file of the records ``is_record`` accepts: the number of its first
    complete line that is not one, "tail" for a last line without a newline that is not the torn start
    of a record, or None. After at least one whole record any start of a JSON object is taken as torn
    (the file is surely ours); a file with no whole line only when ``tail`` is what its writer's first
    write can leave (``torn_first_write``, ``first_keys``): else a crash in that first write would keep
    every later start refused. The events log and the label file refuse files by this one rule.
    Zeros at the very end (``power_cut_zeros``) are set aside first: what remains is judged by these rules,
    a whole record then being one whose newline was among the bytes lost."""
    zeros = power_cut_zeros(data)
    data = data[:len(data) - zeros]
    complete = data[:data.rfind(b"\n") + 1]
    for number, line in enumerate(complete.splitlines(), 1):
        if not (blank_ok and not line.strip()) and not is_record(line):
            return number
    tail = data[len(complete):]
    if not tail or (zeros and is_record(tail)):
        return None
    if complete.strip():
        return "tail" if not tail.startswith(b'{"') or _parses(tail) else None
    return None if torn_first_write(tail, first_keys) else "tail"


def power_cut_zeros(data: bytes) -> int:
    """How many NUL bytes end ``data``: what a power cut leaves where a file's new size reached the disk and
    its last block(s) did not (ext4's delayed allocation). Our JSON-lines writers never write a NUL
    (json.dumps escapes it), so these are bytes lost, never data."""
    return len(data) - len(data.rstrip(b"\0"))


def last_line_end(handle, size: int, block: int = 65536) -> int:
    """The offset just after the last newline of the open binary file ``handle`` of ``size`` bytes (0: it
    has none), read backwards in blocks: a power cut's run of zeros can be longer than any one block."""
    end = size
    while end > 0:
        start = max(0, end - block)
        handle.seek(start)
        newline = handle.read(end - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def mend_torn_tail(fd: int, path, keep: int, torn: bytes, is_record: Callable[[bytes], bool]) -> None:
    """Cut ``torn`` (what follows the last newline, at offset ``keep``) off the open append-mode file ``fd``,
    saying what it held; but a whole record whose newline a power cut left as zeros (``is_record`` of what
    precedes them) is kept: the zeros go and its newline is put back, so no alarm or label is lost."""
    zeros = power_cut_zeros(torn)
    record = torn[:len(torn) - zeros]
    if zeros and record and is_record(record):
        os.ftruncate(fd, keep + len(record))
        append_whole(fd, b"\n")
        logger.warning("%s: its last record's newline was left as zeros by a power cut: the record is kept, the %d "
                       "zero bytes cut", path, zeros)
        return
    logger.warning("%s: cutting a torn last line left by an earlier crash (%s)", path,
                   torn_tail_said(torn, emptied=not keep))
    os.ftruncate(fd, keep)


def torn_tail_said(torn: bytes, emptied: bool = False) -> str:
    """What a torn tail holds, for a warning: the start of a line (its size and first bytes) and/or the
    zeros a power cut left (how many); ``emptied``: cutting it leaves the file empty."""
    zeros = power_cut_zeros(torn)
    text = torn[:len(torn) - zeros]
    line = f"{len(text)} bytes: {text[:120].decode('utf-8', 'replace')!r}{'...' if len(text) > 120 else ''}"
    lost = f"{zeros} zero bytes: a power cut before the data reached the disk"
    if not zeros:
        return line
    if text:
        return f"{line}, then {lost}"
    return f"{lost}; the file held no data, cut to empty" if emptied else lost


def torn_first_write(tail: bytes, first_keys: Tuple[str, ...]) -> bool:
    """Whether ``tail``, a file's only content, is a start of a line our JSON-lines writers write
    (``json.dumps(record, sort_keys=True)``): ASCII, ``{"`` and one of ``first_keys``, then keys in
    ascending order with json's separators, torn before the object closes. At least the first key's first
    letter must be there: ``{"`` alone could be anyone's."""
    if len(tail) < 3 or _parses(tail):
        return False
    try:
        text = tail.decode("ascii")
    except UnicodeDecodeError:          # json.dumps escapes every other character
        return False
    for key in first_keys:
        head = "{" + json.dumps(key) + ": "
        if head.startswith(text):
            return True                 # torn within the first key
        if text.startswith(head) and _sorted_pairs_torn(text, len(head), key):
            return True
    return False


_NUMBER_PART = re.compile(r"[0-9.eE+-]+")


def _sorted_pairs_torn(text: str, at: int, key: str) -> bool:
    """``text`` from ``at`` (just after ``key``'s colon) is a sort_keys object's value and pairs torn
    somewhere: the keys seen ascend, the separators are json.dumps' own."""
    decoder = json.JSONDecoder()
    while True:
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return True                 # torn within this value (a string, a list, true...)
        rest = text[at:]
        if not rest or (isinstance(value, (int, float)) and _NUMBER_PART.fullmatch(rest)):
            return True                 # torn after a value or within a number ("0." of 0.01)
        if not rest.startswith(", "):
            return ", ".startswith(rest)
        at += 2
        if at == len(text) or text[at] != '"':
            return at == len(text)
        try:
            following, at = decoder.raw_decode(text, at)
        except ValueError:
            return True                 # torn within the next key
        if following <= key:
            return False
        key = following
        rest = text[at:]
        if not rest.startswith(": "):
            return ": ".startswith(rest)
        at += 2


def _parses(data: bytes) -> bool:
    try:
        json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def _is_event_line(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return False
    # a parts log's line (parts_log.py) has these keys too, but its OK parts are no events
    return isinstance(record, dict) and all(key in record for key in EVENT_KEYS) and record.get("log") != "parts"


def read_events(path: str | os.PathLike) -> List[dict]:
    """Every event of a JSON-lines log (raises ValueError naming the line on a malformed one)."""
    events = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON line ({exc})") from exc
    return events


class EventLogOutput(LineObserver):
    """``--events FILE``: one line per alarm and per NG/ERROR part."""

    health_name = "events"         # its health's name (the summary's outputs, /metrics)
    log_class = EventLog

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.delivery = Delivery(self.health_name, str(self.path))
        self.log: Optional[EventLog] = None
        self._open(at_start=True)

    def _open(self, at_start: bool = False) -> bool:
        """Open the log. At the start, EventLogError (not an events log) and a wrong path or permission
        are errors; a full disk is not (the line runs, each event is counted as failed until it fits)."""
        try:
            self.log = self.log_class(self.path)
        except OSError as exc:
            if at_start and exc.errno not in DISK_FULL:
                raise
            self.delivery.set_failing(f"{self.path}: cannot open ({exc.strerror or exc})")
            return False
        return True

    def _write(self, event: dict) -> None:
        if self.log is None and not self._open():
            self.delivery.failed_one(f"{self.path}: cannot open the log")
            return
        try:
            self.log.write(event)
        except OSError as exc:
            self.delivery.failed_one(str(exc.strerror or exc))
        else:
            self.delivery.delivered()

    def on_event(self, camera: str, event: dict) -> None:
        self._write(event)

    def on_part(self, result: PartResult) -> None:
        if wants_event(result):
            self._write(part_event(result))

    def health(self) -> OutputHealth:
        return self.delivery.health()

    def on_stop(self) -> None:
        if self.log is not None:
            self.log.close()


class DropOldestQueue:
    """A bounded FIFO between the frame loop and a background sender: ``put`` never blocks; when full,
    the oldest item is dropped and counted (the newest news matters most on a line)."""

    def __init__(self, maxsize: int):
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.dropped = 0

    def put(self, item: Any) -> None:
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                if self._take_nowait() is not _EMPTY:
                    self.dropped += 1

    def get(self, timeout: Optional[float] = None) -> Any:
        """The next item; raises queue.Empty after ``timeout`` seconds. Call ``done()`` once it is handled."""
        return self._queue.get(timeout=timeout)

    def done(self) -> None:
        self._queue.task_done()

    def _take_nowait(self) -> Any:
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            return _EMPTY
        self._queue.task_done()
        return item

    def drain(self) -> int:
        """Drop everything waiting (counted as dropped); returns how many."""
        count = 0
        while self._take_nowait() is not _EMPTY:
            count += 1
        self.dropped += count
        return count

    def wait_empty(self, deadline: float) -> bool:
        """Wait until every item put has been handled, or the monotonic ``deadline`` passes."""
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self._queue.unfinished_tasks

    def __len__(self) -> int:
        return self._queue.qsize()


_EMPTY = object()


def outputs_from(settings) -> list:
    """``--events FILE`` (OutputSettings.events)."""
    return [EventLogOutput(settings.events)] if settings.events else []
