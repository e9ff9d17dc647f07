"""An export's files as one set: written and checked in a staging folder, then moved into the output
folder together, replacing an earlier export's set only when asked (``overwrite``).

A line may run the model in the output folder (`mrkd run` loads it again on SIGHUP), so that folder
never holds half of a new set, a new graph beside an older export's sidecar, nor an older export's INT8
graph or engine beside a new model.onnx as if they belonged to it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, List, Tuple

from mrkd.atomic import sync_folder, temporary_folder
from mrkd.export.onnx_graph import ExportError
from mrkd.runtime.metadata import sidecar_path

FP32_NAME, FP16_NAME, INT8_NAME, ENGINE_NAME = "model.onnx", "model_fp16.onnx", "model_int8.onnx", "model.engine"
MODEL_NAMES = (FP32_NAME, FP16_NAME, INT8_NAME, ENGINE_NAME)
STAGING_PREFIX = ".export-"


def set_files(folder: Path) -> List[Path]:
    """The exported files (graphs, engine and their sidecars) in ``folder``: sidecars first."""
    sidecars = [sidecar_path(folder / name) for name in MODEL_NAMES]
    return [path for path in sidecars + [folder / name for name in MODEL_NAMES] if path.is_file()]


def refuse_earlier_set(out_dir: Path) -> None:
    """ExportError (one line, before anything is written) when ``out_dir`` holds an exported model."""
    found = set_files(out_dir) if out_dir.is_dir() else []
    if found:
        raise ExportError(f"{out_dir} already holds an exported model ({', '.join(p.name for p in found)}): "
                          f"export into a new folder (-o), or pass --overwrite to replace that set")


def leftover_staging(out_dir: Path) -> List[Path]:
    """Staging folders in ``out_dir`` that an earlier export left (only SIGKILL or a power cut skips the
    clean-up; or one running now), sorted."""
    try:
        return sorted(p for p in out_dir.glob(f"{STAGING_PREFIX}*") if p.is_dir())
    except OSError:
        return []


@contextlib.contextmanager
def staging_folder(out_dir: Path) -> Iterator[Path]:
    """A fresh hidden folder inside ``out_dir`` (the same file system: a rename moves a file out of it),
    removed at the end whatever happens; ``out_dir`` itself is removed again if it was made for it and an
    error or a stop leaves it empty. Messages of errors raised inside name ``out_dir``, not the staging."""
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with temporary_folder(out_dir, STAGING_PREFIX) as staging:
            try:
                yield staging
            except BaseException as exc:
                exc.args = tuple(arg.replace(str(staging), str(out_dir)) if isinstance(arg, str) else arg
                                 for arg in exc.args)
                raise
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                out_dir.rmdir()        # only when empty
        raise


def move_into_place(staging: Path, out_dir: Path) -> List[Path]:
    """Move the set written in ``staging`` into ``out_dir``, after removing the files of an earlier set
    that the new one does not replace (returned). Sidecars are moved before their graphs: a reader never
    meets a new graph with an old sidecar. The caller holds Ctrl-C/SIGTERM back around it (stops_deferred).

    A rename or removal that fails half way (EACCES, EXDEV, a disk error) would leave the folder mixed, so
    the earlier set is first kept (hard links, copies where the file system has none) in a hidden folder
    beside it; the files already changed are put back from there and ExportError names the file that failed."""
    new = set_files(staging)
    names = {path.name for path in new}
    earlier = set_files(out_dir)
    stale = [path for path in earlier if path.name not in names]
    kept = _keep(earlier, out_dir)
    changed: List[str] = []       # names in out_dir that no longer hold the earlier set's file
    target, restored = None, True
    try:
        for target in stale:
            target.unlink()
            changed.append(target.name)
        for path in new:
            target = out_dir / path.name
            os.replace(path, target)
            changed.append(path.name)
    except OSError as exc:
        restored, outcome = _roll_back(changed, kept, out_dir)
        raise ExportError(f"{target}: could not be moved into place ({exc.strerror or exc}); {outcome}") from None
    finally:
        if restored:
            shutil.rmtree(kept, ignore_errors=True)
    sync_folder(out_dir)
    return stale


def _keep(files: List[Path], out_dir: Path) -> Path:
    """A hidden folder in ``out_dir`` (the same file system) with a second name, or a copy, of each of
    ``files``; ExportError before anything in ``out_dir`` changed when that cannot be made (a full disk)."""
    folder = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}earlier-", dir=out_dir))
    for path in files:
        try:
            try:
                os.link(path, folder / path.name)
            except OSError:          # FAT, some network shares: no hard links
                shutil.copy2(path, folder / path.name)
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise ExportError(f"{path}: could not keep a copy of the earlier export before replacing it "
                              f"({exc.strerror or exc}); nothing in {out_dir} was changed") from None
    return folder


def _roll_back(changed: List[str], kept: Path, out_dir: Path) -> Tuple[bool, str]:
    """Put the earlier set back where ``changed`` names were replaced or removed (a new file with no earlier
    one is removed); (whether all of it is back, the words that end the error line)."""
    failed = []
    for name in changed:
        try:
            if (kept / name).exists():
                os.replace(kept / name, out_dir / name)
            else:
                (out_dir / name).unlink()
        except OSError as exc:
            failed.append(f"{name}: {exc.strerror or exc}")
    sync_folder(out_dir)
    if not failed:
        return True, f"{out_dir} holds the earlier export again, as it was"
    return False, (f"putting the earlier export back failed too ({'; '.join(failed)}): {out_dir} is mixed, "
                   f"the earlier export's files are kept in {kept}")

