"""``mrkd run``'s log records go to stderr through a bounded queue: logging never blocks the thread
that logs.

On a line PC ``mrkd run`` often runs under a supervisor whose stderr is a pipe. When that reader
stalls, the pipe fills and a write to it blocks; every thread that logged then stopped inside the
handler's write, the PLC servers' event loops included (the PLC's handshake stalled: a hang on the
line). Here the thread that logs only formats the record and puts it in a bounded queue
(logging.handlers.QueueHandler); one writer thread (logging.handlers.QueueListener) writes the records
to stderr in order, in the format ``mrkd run`` always used. A record that finds the queue full is
dropped and counted (no exception, no traceback, no wait); the count is written as one line once the
writer has caught up (the queue empty again) and at exit. At exit the queue is written out within a
deadline, so a stderr that is not read cannot hang the exit either."""

from __future__ import annotations

import atexit
import functools
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from logging.handlers import QueueHandler, QueueListener
from typing import Callable, Optional, TextIO

FORMAT = "%(levelname)s %(name)s: %(message)s"
# Records waiting for the writer (a few MB at most). A healthy stderr takes thousands a second, so only
# a reader that has stopped fills it.
CAPACITY = 10_000
# How long the exit waits for the writer: a healthy stderr takes the whole queue in well under a second.
EXIT_DEADLINE_S = 3.0
DROPPED = "{} log records dropped: stderr was not being read"

logger = logging.getLogger(__name__)


class DropCount:
    """Records dropped since the count was last written; any thread adds, the writer takes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def add(self) -> None:
        with self._lock:
            self._count += 1

    def take(self) -> int:
        with self._lock:
            count, self._count = self._count, 0
            return count


class DroppingQueueHandler(QueueHandler):
    """The handler on the logging thread's side: a full queue drops the record and counts it."""

    def __init__(self, records: queue.Queue, dropped: DropCount) -> None:
        super().__init__(records)
        self.dropped = dropped

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped.add()

    def handleError(self, record: logging.LogRecord) -> None:
        # A record that cannot be formatted (a wrong argument): the stdlib prints a traceback to stderr on
        # this thread, which would block here. It is said through the queue instead, as an error record.
        error = sys.exc_info()[1]
        try:
            text = f"a log record could not be formatted ({error!r}): {record.msg!r} % {record.args!r}"
        except Exception:      # a repr that fails too
            text = f"a log record could not be formatted ({type(error).__name__})"
        self.enqueue(logging.makeLogRecord({"name": record.name, "levelno": logging.ERROR, "levelname": "ERROR",
                                            "msg": text, "args": None}))


@dataclass
class WrittenOut:
    """Put last at the exit: the writer has written everything queued before it once ``done`` is set."""

    done: threading.Event = field(default_factory=threading.Event)


class StderrWriter(logging.StreamHandler):
    """The writer thread's handler: writes each record, then the drop count once the queue is empty."""

    def __init__(self, stream: TextIO, records: queue.Queue, dropped: DropCount) -> None:
        super().__init__(stream)
        self.setFormatter(logging.Formatter(FORMAT))
        self.records, self.dropped = records, dropped

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "status_line", False):      # QueuedStderrLog.say's: as it is
            return record.getMessage()
        return super().format(record)

    def handle(self, record) -> bool:
        # Only the writer thread calls this, so the handler's lock is not taken: a write stalled on a full
        # pipe would hold it, and logging.shutdown takes every handler's lock at exit.
        marker = getattr(record, "written_out", None)
        if marker is None and self.filter(record):
            self.emit(record)
        if marker is not None or self.records.empty():
            self.write_dropped()
        if marker is not None:
            marker.done.set()
        return True

    def write_dropped(self) -> None:
        count = self.dropped.take()
        if count:
            self.emit(logging.makeLogRecord({"name": logger.name, "levelno": logging.WARNING,
                                             "levelname": "WARNING", "msg": DROPPED.format(count)}))


@dataclass
class QueuedStderrLog:
    """The root logger's queue, its handler and the writer thread behind it."""

    records: queue.Queue
    dropped: DropCount
    handler: DroppingQueueHandler
    writer: StderrWriter
    listener: QueueListener
    closed: Optional[bool] = None      # close's answer, once closed

    @classmethod
    def start(cls, stream: Optional[TextIO] = None, capacity: int = CAPACITY) -> "QueuedStderrLog":
        """The queue and its writer thread, started; ``stream`` defaults to sys.stderr."""
        records: queue.Queue = queue.Queue(maxsize=capacity)
        dropped = DropCount()
        writer = StderrWriter(stream if stream is not None else sys.stderr, records, dropped)
        listener = QueueListener(records, writer)
        listener.start()
        return cls(records, dropped, DroppingQueueHandler(records, dropped), writer, listener)

    def say(self, text: str) -> None:
        """A status line, written as it is: in order with the records, dropped and counted as they are."""
        self.handler.enqueue(logging.makeLogRecord({"msg": text, "args": None, "status_line": True}))

    def close(self, deadline_s: float = EXIT_DEADLINE_S) -> bool:
        """Write out what is queued (and the drop count) within ``deadline_s`` and stop the writer.
        False if stderr did not take everything in time: the writer is then left blocked (a daemon
        thread, holding no lock the exit needs), the root keeps this handler (later records are dropped
        when the queue is full) and a later close returns False at once."""
        if self.closed is not None:
            return self.closed
        end = time.monotonic() + deadline_s
        marker = WrittenOut()
        try:
            self.records.put(logging.makeLogRecord({"written_out": marker}), timeout=deadline_s)
            self.closed = marker.done.wait(max(0.0, end - time.monotonic()))
        except queue.Full:
            self.closed = False
        if self.closed:
            logging.getLogger().removeHandler(self.handler)
            try:     # the writer ends after what was queued meanwhile; not joined: stderr may stall again
                self.listener.enqueue_sentinel()
            except queue.Full:       # filled by other threads meanwhile: the writer stays, a daemon thread
                pass
        return self.closed


_installed: Optional[QueuedStderrLog] = None


def log_to_stderr_through_queue(level: int = logging.WARNING) -> Optional[QueuedStderrLog]:
    """Send the root logger's records (``level`` and above) to stderr through the queue, once per process
    and, as logging.basicConfig, only when the root has no handler yet (None then); written out by
    close (logging_through_queue calls it at the command's end) or at exit (atexit)."""
    global _installed
    root = logging.getLogger()
    if _installed is not None or root.handlers:
        return None
    _installed = QueuedStderrLog.start()
    root.addHandler(_installed.handler)
    root.setLevel(level)
    atexit.register(_installed.close)
    return _installed


def logging_through_queue(command: Callable) -> Callable:
    """Decorate a CLI command that serves a line: its log records go to stderr through the queue from
    its start and are written out (within the deadline) at its end, before an error's Error: line."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        installed = log_to_stderr_through_queue()
        try:
            return command(*args, **kwargs)
        finally:
            if installed is not None:
                installed.close()
    return wrapper


def status_to_stderr(text: str) -> None:
    """A status line from a line's thread (the frame loop's, the part runner's, a model reload's):
    through the queue while it is installed, so a stderr nobody reads stops no inspection; else
    written at once, as click.echo to stderr."""
    installed = _installed
    if installed is not None and installed.closed is None:
        installed.say(text)
    else:
        import click
        click.echo(text, err=True)
