"""``mrkd run``'s log records go to stderr through a bounded queue: logging never blocks the thread
that logs.

On a line PC ``mrkd run`` often runs under a supervisor whose stderr is a pipe. When that reader
stalls, the pipe fills and a write to it blocks; every thread that logged then stopped inside the
handler's write, the PLC servers' event loops included (the PLC's handshake stalled: a hang on the
line). Here the thread that logs only formats the record and puts it in a bounded queue
(logging.handlers.QueueHandler); one writer thread (logging.handlers.QueueListener) writes the records
to stderr in order, in the format ``mrkd run`` always used; ``mrkd run``'s own lines (status, start-up
and exit lines: ``status_to_stderr``) take the same queue, written as they are: one way to stderr
during a run. A record that finds the queue full is dropped and counted (no exception, no traceback,
no wait); the count is written as one line once the writer has caught up (the queue empty again) and
at exit. At exit the queue is written out within a
deadline, so a stderr that is not read cannot hang the exit either.

A record is handed over without a lock a thread could wait for while holding it itself: mrkd run's
Ctrl-C / SIGTERM handler logs on the main thread, between any two steps of what it was doing, maybe the
hand-over of its own record. So the queue is a queue.SimpleQueue (its put is reentrant, in C; a
queue.Queue's lock, taken twice by one thread, hung the run) kept within its capacity by its size, and
the drop count a deque (append and popleft are atomic, no lock)."""

from __future__ import annotations

import atexit
import functools
import logging
import queue
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from logging.handlers import QueueHandler, QueueListener
from typing import Callable, Deque, Optional, TextIO

FORMAT = "%(levelname)s %(name)s: %(message)s"
# Records waiting for the writer (a few MB at most). A healthy stderr takes thousands a second, so only
# a reader that has stopped fills it.
CAPACITY = 10_000
# How long the exit waits for the writer: a healthy stderr takes the whole queue in well under a second.
EXIT_DEADLINE_S = 3.0
DROPPED = "{} log records dropped: stderr was not being read"

logger = logging.getLogger(__name__)


class DropCount:
    """Records dropped since the count was last written; any thread adds (a signal handler too: no lock),
    the writer takes."""

    def __init__(self) -> None:
        self._drops: Deque[None] = deque()

    def add(self) -> None:
        self._drops.append(None)

    def take(self) -> int:
        count = len(self._drops)      # the ones added meanwhile stay for the next take
        for _ in range(count):
            self._drops.popleft()
        return count


class DroppingQueueHandler(QueueHandler):
    """The handler on the logging thread's side: a full queue drops the record and counts it."""

    def __init__(self, records: "queue.SimpleQueue", dropped: DropCount, capacity: int) -> None:
        super().__init__(records)
        self.dropped, self.capacity = dropped, capacity

    def enqueue(self, record: logging.LogRecord) -> None:
        # Size, then put: threads logging at once may take it a few records past the capacity, no more.
        if self.queue.qsize() >= self.capacity:
            self.dropped.add()
        else:
            self.queue.put_nowait(record)

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

    def __init__(self, stream: TextIO, records: "queue.SimpleQueue", dropped: DropCount) -> None:
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


class AfterCloseWriter(logging.StreamHandler):
    """What the root writes with once a queue is closed in time (a thread the command left, a second
    command's start): each record at once, in mrkd run's format; before, such records fell to Python's
    last resort, the message alone. The handler's lock is not taken, as for StderrWriter (a write
    stalled on a full pipe would hold it, and logging.shutdown takes every handler's lock at exit): each
    record is one write. A queue installed later replaces it. It writes to sys.stderr as it is at each
    record (as Python's last resort does), not as it was at the close: a caller that swapped stderr for
    the command (click's CliRunner) has closed its stream since."""

    def __init__(self) -> None:
        super().__init__()
        self.setLevel(logging.WARNING)               # as the last resort it stands in for
        self.setFormatter(logging.Formatter(FORMAT))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass

    def handle(self, record) -> bool:
        if self.filter(record):
            self.emit(record)
        return True


@dataclass
class QueuedStderrLog:
    """The root logger's queue, its handler and the writer thread behind it."""

    records: "queue.SimpleQueue"
    dropped: DropCount
    handler: DroppingQueueHandler
    writer: StderrWriter
    listener: QueueListener
    closed: Optional[bool] = None      # close's answer, once closed

    @classmethod
    def start(cls, stream: Optional[TextIO] = None, capacity: int = CAPACITY) -> "QueuedStderrLog":
        """The queue and its writer thread, started; ``stream`` defaults to sys.stderr."""
        records: "queue.SimpleQueue" = queue.SimpleQueue()     # bounded by DroppingQueueHandler
        dropped = DropCount()
        writer = StderrWriter(stream if stream is not None else sys.stderr, records, dropped)
        listener = QueueListener(records, writer)
        listener.start()
        return cls(records, dropped, DroppingQueueHandler(records, dropped, capacity), writer, listener)

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
        marker = WrittenOut()
        self.records.put(logging.makeLogRecord({"written_out": marker}))     # past the capacity: one record
        self.closed = marker.done.wait(deadline_s)
        if self.closed:
            root = logging.getLogger()
            root.removeHandler(self.handler)
            root.addHandler(AfterCloseWriter())
            # the writer ends after what was queued meanwhile; not joined: stderr may stall again
            self.listener.enqueue_sentinel()
        return self.closed


_installed: Optional[QueuedStderrLog] = None


def log_to_stderr_through_queue(level: int = logging.WARNING) -> Optional[QueuedStderrLog]:
    """Send the root logger's records (``level`` and above) to stderr through the queue, once at a time
    and, as logging.basicConfig, only when the root has no handler yet (None then); written out by
    close (logging_through_queue calls it at the command's end) or at exit (atexit)."""
    global _installed
    root = logging.getLogger()
    for after in [h for h in root.handlers if isinstance(h, AfterCloseWriter)]:   # an earlier queue's: replaced
        root.removeHandler(after)
    if _installed is not None or root.handlers:
        return None
    _installed = QueuedStderrLog.start()
    root.addHandler(_installed.handler)
    root.setLevel(level)
    atexit.register(_installed.close)
    return _installed


def logging_through_queue(command: Callable) -> Callable:
    """Decorate a CLI command that serves a line: its log records go to stderr through the queue from
    its start and are written out (within the deadline) at its end, before an error's Error: line.
    Closed in time, the queue is taken off the root, so a later command in the same process (a caller
    of the CLI's main, twice) installs one again: else its records found no handler, and Python's
    last resort wrote them without the level and logger name."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        global _installed
        installed = log_to_stderr_through_queue()
        try:
            return command(*args, **kwargs)
        finally:
            if installed is not None and installed.close() and _installed is installed:
                _installed = None
    return wrapper


def status_to_stderr(text: str) -> None:
    """A line of ``mrkd run`` for stderr, written as it is: a status line from a line's thread (the frame
    loop's, the part runner's, a model reload's) and the main thread's own start-up and exit lines (the
    model, a threshold given, the PLC servers, outputs that did not deliver). Through the queue while it
    is installed, so a stderr nobody reads stops no inspection and holds no start or exit, and the lines
    come out in the order they were written, records included; else written at once, as click.echo to
    stderr."""
    installed = _installed
    if installed is not None and installed.closed is None:
        installed.say(text)
    else:
        import click
        click.echo(text, err=True)
