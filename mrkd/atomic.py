"""Atomic file writes: a reader (or a crash) never sees half a checkpoint, engine or event log.

The file written has the mode any new file would get (0666 minus the umask: 0644 under umask 022),
not the temporary file's private 0600, so another account on the line PC can read the model it runs.
An error (a full disk) names the file being written.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Iterator

from mrkd.stopping import stops_deferred

_umask_lock = threading.Lock()
logger = logging.getLogger(__name__)

# A staging file of the same target untouched (or dated ahead) this long is no write in progress: a crash
# or power cut left it. The next write of that file removes it, so a partial checkpoint is not kept for ever.
STALE_STAGING_S = 3600.0


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc/self/status), else
    set and restored at once under a lock."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permission bits a file created now with open() would get: 0o666 & ~umask."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it, rename it over ``path`` and fsync the
    folder (the rename too must reach the disk before the caller says it is written).
    OSError from the file system (ENOSPC, EACCES...) is raised again naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):   # a file where a folder should be ("File exists" said)
            above = next((p for p in (path.parent, *path.parent.parents) if p.exists()), path.parent)
            raise NotADirectoryError(errno.ENOTDIR, f"{path}: {above} is a file, not a folder") from None
        fd, tmp = None, None
        while fd is None:
            # named before it is made (mkstemp's name came back only after the file existed, so a stop landing
            # in between left a file nobody knew of): a stop at any point finds the name here to remove
            tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
            except FileExistsError:     # another write's name: never removed as ours
                tmp = None
        with os.fdopen(fd, mode) as handle:
            os.fchmod(handle.fileno(), new_file_mode())
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        sync_folder(path.parent)
        remove_stale_staging(path)
    except OSError as exc:
        _remove(tmp)
        if str(path) in str(exc):
            raise
        raise OSError(exc.errno, f"{path}: {exc.strerror or exc}") from exc
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def temporary_folder(parent: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """A fresh private folder in ``parent`` (mkdtemp), removed at the end whatever happens, unless the
    caller renamed it away. It is made while Ctrl-C and SIGTERM wait (stops_deferred): a stop landing
    between mkdtemp's mkdir and its return left a folder nobody knew the name of (seen in CI)."""
    folder = None
    try:
        with stops_deferred():
            folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        yield folder
    finally:
        if folder is not None and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)


def sync_folder(folder: str | os.PathLike) -> None:
    """fsync ``folder`` so a rename or link in it survives a power cut: until then the old file can be the
    one found after it (where the OS allows it: nothing is said when it does not)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_staging(path: Path, stale_s: float = STALE_STAGING_S) -> None:
    """Remove the staging files ``atomic_open`` made for ``path`` (``.NAME.XXXXXXXX.tmp`` beside it) that no
    write has touched for ``stale_s`` (or dated more than that ahead): left by a crash, a SIGKILL or a power
    cut."""
    prefix, now = f".{path.name}.", time.time()
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        for entry in entries:
            # 8 random characters (atomic_open's; mkstemp's before), not another file's name
            middle = entry.name[len(prefix):-len(".tmp")]
            if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp") and len(middle) == 8
                    and "." not in middle):
                continue
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and \
                        abs(now - entry.stat(follow_symlinks=False).st_mtime) > stale_s:
                    os.unlink(entry.path)
                    logger.info("%s: removed %s, left by an interrupted write", path, entry.name)


def _remove(tmp) -> None:
    if tmp is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def append_whole(fd: int, data: bytes) -> None:
    """Append ``data`` (whole JSON lines) to the open append-mode file ``fd`` and fsync it, or leave the
    file as it was: a short write (disk full) or a failed fsync is cut back, so a reader never meets half
    a line. Raises the OSError (errno kept; ENOSPC for a short write)."""
    before = os.fstat(fd).st_size
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
        os.fsync(fd)
    except OSError:
        try:
            os.ftruncate(fd, before)
        except OSError:
            pass
        raise
