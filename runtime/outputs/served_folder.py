"""A folder the operator page reads files from on request (``--snapshots``, and ``--evidence`` for an alarm
whose frame it no longer holds: alarm_images.py), and the one way it reads them: every component from ``/``
down to the file is opened relative to the one before it, none of them followed if it is a link (``openat``
with ``O_NOFOLLOW``), the file itself without blocking and only if it is a regular file, and only if it has
one name: a hard link put in the folder is a file from elsewhere on the disk (a secret) under a name inside
it, which no walk of the path can tell apart. mrkd's own snapshots have one name once their event exists:
write_new_file (snapshots.py) links its staged file to the snapshot's name and removes the staged name
before it returns, so a second name is never mrkd's.

Why not "resolve the path, check it is inside, then open it by name": those are two looks at the disk, and
a folder swapped for a link between them was followed out of the folder. Here the look is the open, so a
folder (or a camera folder in it) replaced by a link after the page started is refused, whenever it
happens. Links in the configured path are resolved once, when the page starts (``/data`` may be a link to
a disk); after that the path must hold no link at all. A folder deleted and made again by the line (a
real folder, not a link) is served again.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

logger = logging.getLogger("mrkd.runtime.outputs.web")

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# O_PATH: a folder on the way needs search permission only (a 0711 home folder), as a path lookup would
_FOLDER_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _CLOEXEC
# O_NONBLOCK: a FIFO put in a file's place opens at once (and is then refused by fstat), never waits
_FILE_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | _CLOEXEC
CAN_OPEN_SAFELY = bool(_NOFOLLOW) and os.open in os.supports_dir_fd
REFUSAL_LOG_EVERY_S = 30.0        # the same refusal (a browser asking again) is logged once per this


class Refused(Exception):
    """A file the page will not read, with the one-line reason."""


@dataclass
class ServedFolder:
    """``path``: the folder, resolved when the page started; ``spellings``: the absolute ways a file's
    path (as an event names it) may begin with it: as configured, and resolved."""
    path: Path
    spellings: Tuple[Path, ...]
    _logged: Dict[str, float] = field(default_factory=dict, repr=False)
    _log_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def of(cls, folder) -> "ServedFolder":
        given = Path(os.path.abspath(folder))
        resolved = given.resolve()
        return cls(resolved, tuple(dict.fromkeys((given, resolved))))

    def parts_of(self, path: str) -> Tuple[str, ...]:
        """The names from the folder down to ``path``'s file; Refused when it is not a plain path below
        the folder (outside it, a ``..`` on the way, a NUL byte). A ``.`` or a doubled ``/`` is dropped."""
        if not isinstance(path, str) or not path or "\0" in path:
            raise Refused(f"{path!r} is not a file name")
        absolute = Path(os.path.join(os.getcwd(), path))     # lexical: a '..' stays to be refused
        for spelling in self.spellings:
            if absolute.parts[:len(spelling.parts)] == spelling.parts:
                below = absolute.parts[len(spelling.parts):]
                if not below or any(name in (".", "..") for name in below):
                    raise Refused(f"{path} is not a plain path below {self.path}")
                return below
        raise Refused(f"{path} is outside {self.path}")

    def read(self, path: str, max_bytes: Optional[int] = None) -> bytes:
        """The bytes of the regular file ``path`` below the folder; Refused (reason in one line) for a link
        anywhere on the way, a file that is not a regular one or has more than one name (a hard link), a
        file larger than ``max_bytes`` (when given), or a path outside; FileNotFoundError when it is
        simply not there."""
        if not CAN_OPEN_SAFELY:
            raise Refused("this system cannot open a file without following links on its way")
        below = self.parts_of(path)
        names = self.path.parts[1:] + below
        descriptor = os.open(self.path.anchor or "/", _FOLDER_FLAGS)
        try:
            for depth, name in enumerate(names):
                last = depth == len(names) - 1
                opened = self._open_in(descriptor, name, _FILE_FLAGS if last else _FOLDER_FLAGS, names[:depth + 1])
                os.close(descriptor)
                descriptor = opened
            found = os.fstat(descriptor)
            if not stat.S_ISREG(found.st_mode):
                raise Refused(f"{path} is not a regular file")
            if found.st_nlink > 1:
                raise Refused(f"{path} has {found.st_nlink} names (a hard link; it may be a file from outside "
                              f"{self.path})")
            if max_bytes is not None and found.st_size > max_bytes:
                raise Refused(f"{path} has {found.st_size} bytes, more than the {max_bytes} read for the page")
            chunks, size = [], 0
            while True:
                chunk = os.read(descriptor, 1 << 20)
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:     # it grew while being read
                    raise Refused(f"{path} grew past the {max_bytes} bytes read for the page")
                chunks.append(chunk)
        finally:
            os.close(descriptor)

    def _open_in(self, folder: int, name: str, flags: int, names: Tuple[str, ...]) -> int:
        """``name`` opened in the open folder ``folder``; Refused when it is a link."""
        try:
            return os.open(name, flags, dir_fd=folder)
        except OSError as exc:
            # ELOOP: a link (O_NOFOLLOW); ENOTDIR: a link (O_DIRECTORY|O_NOFOLLOW) or a file on the way
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                raise
            where = Path(self.path.anchor or "/", *names)
            kind = "a link, which the page does not follow" if os.path.islink(where) else "not a folder"
            raise Refused(f"{where} is {kind} (files are served from {self.path} only)") from None

    def log_refusal(self, what: str, reason: Refused) -> None:
        """One warning line per refusal, the same one at most once per REFUSAL_LOG_EVERY_S."""
        message = f"page: {what} not served: {reason}"
        now = time.monotonic()
        with self._log_lock:
            if now - self._logged.get(message, -REFUSAL_LOG_EVERY_S) < REFUSAL_LOG_EVERY_S:
                return
            if len(self._logged) > 256:
                self._logged.clear()
            self._logged[message] = now
        logger.warning("%s", message)
