"""What `mrkd refit` can refuse in milliseconds, before torch is imported and the checkpoint loads (about 5 s
on a line PC): an exported model given for the checkpoint, a label file that cannot be read or is an events
log, and a new-version folder that exists or cannot be made. Imports no torch: `mrkd refit` calls
``check_refit_args`` before it imports train/refit.py, and gives what it read (``CheckedRefitArgs``, the
label file's bytes and labels) to ``refit_checkpoint``, which checks only what it is not given: each check
runs once, and the label file is read once.

The default folder's name (MODEL's folder/<stem>.v<N>) needs the parent's version N-1, which the checkpoint's
lineage holds: ``checkpoint_lineage_version`` reads it from the archive torch.save writes without torch, by
an unpickler that builds no tensor and runs nothing the file names; where it cannot (torch's old pickle
format, a damaged file) refit checks the folder after the read, as before.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from mrkd.errors import MrkdError
from mrkd.runtime.review import EventsLogGivenAsLabels, ReviewLabel, read_labels

LINEAGE_KEY = "lineage"
EXPORTED_MODEL_SUFFIXES = (".onnx", ".engine", ".plan")
PICKLE_PEEK_LIMIT = 64 << 20      # data.pkl holds names and shapes (26 KB for ResNet-18); tensors are apart


class RefitError(MrkdError, ValueError):
    """A refit that cannot be done or would not be safe; the message names the file or image."""


def lineage_version(data: dict) -> int:
    """The model version a checkpoint dict's lineage records (1: no lineage, the first version)."""
    lineage = data.get(LINEAGE_KEY)
    version = lineage.get("version") if isinstance(lineage, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) and version >= 1 else 1


class _Unbuilt:
    """What a tensor, storage, dtype or any other torch object of the pickle becomes: nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _LineageUnpickler(pickle.Unpickler):
    # Only plain data comes out: torch's rebuild functions and classes are replaced by _Unbuilt, the
    # tensors' storages (persistent ids) by None, and any other global refuses the whole file.
    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" or module.startswith("torch."):
            return _Unbuilt
        raise pickle.UnpicklingError(f"{module}.{name} is not read here")

    def persistent_load(self, pid):
        return None


def checkpoint_lineage_version(path) -> Optional[int]:
    """The version the checkpoint at ``path`` records (1 without a lineage), read without torch; None
    when the file is not an archive of torch.save's zip format this reader understands."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [info for info in archive.infolist()
                       if info.filename.count("/") == 1 and info.filename.endswith("/data.pkl")]
            if len(pickles) != 1 or pickles[0].file_size > PICKLE_PEEK_LIMIT:
                return None
            data = _LineageUnpickler(io.BytesIO(archive.read(pickles[0]))).load()
    except Exception:       # noqa: BLE001 - a damaged pickle fails in many ways; the full read names the fault
        return None
    return lineage_version(data) if isinstance(data, dict) else None


def default_out_dir(model_path, version: int) -> Path:
    model_path = Path(model_path)
    return model_path.parent / f"{model_path.stem}.v{version}"


def check_out_dir(out_dir: Path) -> None:
    """RefitError naming ``out_dir`` when it cannot become a new folder: a file in its path, or a
    parent folder this process cannot write into."""
    above = next((p for p in out_dir.parents if p.exists()), None)
    if above is None:
        return
    if not above.is_dir():
        raise RefitError(f"{out_dir}: cannot be created: {above} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise RefitError(f"{out_dir}: cannot be created: {above} is not writable")


def check_new_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        raise RefitError(f"{out_dir}: exists; a refit writes a new model version into a new folder (never over "
                         f"an earlier one): name another with -o")
    check_out_dir(out_dir)


@dataclass(frozen=True)
class CheckedRefitArgs:
    """A refit's arguments as check_refit_args found them fit, with what it read: the label file's
    bytes and their labels are the refit's (its lineage's labels_sha256 names these bytes: the line's
    page may append to the file meanwhile)."""

    model_path: Path
    labels_path: Path
    out_dir: Optional[Path]           # -o's folder, or None for the default one
    labels_data: bytes
    labels: Tuple[ReviewLabel, ...]

    def same(self, model_path, labels_path, out_dir) -> bool:
        """Whether these are the checks of these arguments."""
        return (self.model_path, self.labels_path, self.out_dir) == \
            (Path(model_path), Path(labels_path), None if out_dir is None else Path(out_dir))


def read_label_file(labels_path: Path) -> Tuple[bytes, Tuple[ReviewLabel, ...]]:
    """The label file's bytes and labels (read once). RefitError when it cannot be read or is an events
    log; ReviewError for a malformed line."""
    try:
        data = labels_path.read_bytes()
    except OSError as exc:
        raise RefitError(f"{labels_path}: cannot read the label file ({exc.strerror or exc})") from exc
    try:
        return data, tuple(read_labels(labels_path, data))
    except EventsLogGivenAsLabels as exc:
        raise RefitError(f"{labels_path} is an events log (`mrkd run --events`), not a label file: give it as "
                         f"--events, and as --reviewed the label file `mrkd review` or the operator page "
                         f"writes") from exc


def check_refit_args(model_path, labels_path, out_dir=None) -> CheckedRefitArgs:
    """Refuse, in milliseconds, a refit that would be refused after the checkpoint's load: see the
    module. ``out_dir``: -o's folder, or None for the default one. Returns what it read, for
    refit_checkpoint (``checked=``)."""
    model_path, labels_path = Path(model_path), Path(labels_path)
    out_dir = None if out_dir is None else Path(out_dir)
    if model_path.suffix.lower() in EXPORTED_MODEL_SUFFIXES:
        raise RefitError(f"{model_path}: refit needs the checkpoint (.ckpt) the model was exported from; the "
                         f"teacher's features come from it")
    labels_data, labels = read_label_file(labels_path)
    checked = CheckedRefitArgs(model_path, labels_path, out_dir, labels_data, labels)
    new_folder = out_dir
    if new_folder is None:
        version = checkpoint_lineage_version(model_path)
        if version is None:      # known once the checkpoint is read; refit checks it then
            return checked
        new_folder = default_out_dir(model_path, version + 1)
    check_new_out_dir(new_folder)
    return checked
