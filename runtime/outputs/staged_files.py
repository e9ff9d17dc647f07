"""The hidden staged file a new image is written to before it gets its name (snapshots.write_new_file),
and how a store removes the ones a killed run left behind.

A staged file is ``.<name>.<8 of [a-z0-9_]>.tmp`` beside ``<name>`` (tempfile.mkstemp's random part).
Its writer holds an exclusive flock on it from its creation until the staged name is gone, so a staged
file that no process holds is one whose writer died (a kill mid-write, or between the link to its name
and the unlink). The lock is what tells it from another live run's write on the same folder (two cells on
one evidence folder); the age guards the instant between the file's creation and its lock, and a writer
of an mrkd from before the lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional, Tuple

logger = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:           # not POSIX: no lock, so nothing is ever provably abandoned
    fcntl = None

STAGED_TAIL = r"\.[a-z0-9_]{8}\.tmp"    # after ".<name>": mkstemp's random part and the suffix
ABANDONED_AFTER_S = 30.0


def stage(path: Path) -> Tuple[int, str]:
    """A new staged file beside ``path``, locked: its descriptor (keep it open until the staged name is
    gone) and its name."""
    fd, staged = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if fcntl is not None:
        # a new file: no one else holds it. A file system without locks (ENOLCK) writes unlocked: the
        # sweep cannot lock it either, so it never takes one there
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
    return fd, staged


def staged_pattern(name: str) -> str:
    """The regular expression of the staged names of files named by the expression ``name``."""
    return rf"\.(?:{name}){STAGED_TAIL}"


def remove_if_abandoned(path: Path, now: Optional[float] = None) -> Optional[int]:
    """Remove the staged file ``path`` if its writer is gone: a regular file (not a link), unchanged for
    ABANDONED_AFTER_S (or changed that long after now), that no process holds locked. Its size when
    removed, else None."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:                  # a link, gone meanwhile, not ours to read
        return None
    try:
        held = os.fstat(fd)
        # how far from now, either way: a clock set back (a line PC's after a power cut, before NTP) puts the
        # staged files the cut left in its future, and a writer's own file is never far from its now
        if not stat.S_ISREG(held.st_mode) or abs((now or time.time()) - held.st_mtime) < ABANDONED_AFTER_S:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:              # its writer is still at work
            return None
        with contextlib.suppress(OSError):
            at_path = os.lstat(path)
            if (at_path.st_dev, at_path.st_ino) == (held.st_dev, held.st_ino):
                os.unlink(path)
                return held.st_size if held.st_nlink == 1 else 0     # a second name frees nothing
        return None
    finally:
        os.close(fd)


def remove_abandoned_in(places: Iterable[Tuple[Path, "re.Pattern[str]"]], what: str, store: Path) -> int:
    """At a store's start: remove in each (folder, staged name) of ``places`` the staged files of that
    name whose writer is gone (remove_if_abandoned; nothing below the folder, no other name), and say it
    once, with the count and bytes (``what``: "evidence", "snapshot"; ``store``: the folder named).
    The number removed."""
    removed = freed = 0
    now = time.time()
    for place, staged_name in places:
        try:
            names = [entry.name for entry in os.scandir(place) if staged_name.fullmatch(entry.name)]
        except OSError:          # no such folder, or one that cannot be read: nothing of ours to remove
            continue
        for name in names:
            size = remove_if_abandoned(place / name, now)
            if size is not None:
                removed, freed = removed + 1, freed + size
    if removed:
        logger.warning("%s: removed %d unfinished %s file%s (%d bytes) left by an earlier run killed mid-write",
                       store, removed, what, "" if removed == 1 else "s", freed)
    return removed


def camera_folders(store: Path) -> list:
    """The folders directly in ``store`` (its cameras'; links not followed); [] when it cannot be read."""
    try:
        return [Path(entry.path) for entry in os.scandir(store) if entry.is_dir(follow_symlinks=False)]
    except OSError:              # not made (a full disk), or not readable: the writes will say so
        return []
