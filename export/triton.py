"""A Triton Inference Server model repository for an exported model.

``<repo>/<name>/config.pbtxt`` + ``<repo>/<name>/<version>/model.onnx`` (platform "onnxruntime_onnx"),
and ``<repo>/<name>_trt/…/<version>/model.plan`` (platform "tensorrt_plan") when an engine exists.
Inputs and outputs (names, dtypes, dims without the batch axis) are read from the ONNX graph itself.

Versions: a first export writes version 1; an export of another model into the same repository adds
the next version (Triton serves the newest by default; the earlier stay for a roll back), never
writes over one; the same model file again keeps its version.

Triton serves the newest version folder it finds, so a version folder appears whole or not at all: its
files are written in a hidden staging folder inside the model folder (``.export-*``, which Triton skips:
not a number) and the version folder is renamed into place, together with config.pbtxt, while Ctrl-C and
SIGTERM wait. An error or a stop before then leaves the repository as it was.

A new model's folder appears whole too: config.pbtxt and version 1 are written in a hidden staging folder
beside the repository (``<parent>/.export-*/<repo>/<name>/``; in the repository itself only where that
cannot be, see _add_model) and the model folder is renamed into place in one step; a polling Triton
(--model-control-mode=poll) never meets ``<name>/1/`` without the config that describes it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from mrkd.atomic import atomic_open, atomic_write_text, sync_folder
from mrkd.export.file_set import STAGING_PREFIX, leftover_staging, staging_folder
from mrkd.export.onnx_graph import ExportError, load_onnx
from mrkd.runtime.metadata import ModelMetadata, sidecar_path
from mrkd.stopping import stops_deferred

# ONNX TensorProto element type -> Triton data type
TRITON_DTYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 10: "TYPE_FP16", 3: "TYPE_INT8", 7: "TYPE_INT64"}
DEFAULT_QUEUE_DELAY_US = 500      # a camera frame waits at most 0.5 ms for batch partners


def graph_io(onnx_path) -> Tuple[List[dict], List[dict]]:
    """([inputs], [outputs]) as {name, data_type, dims (batch axis dropped)} from the ONNX graph."""
    proto = load_onnx(onnx_path)
    initializers = {i.name for i in proto.graph.initializer}

    def describe(value) -> dict:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim][1:]
        if tensor.elem_type not in TRITON_DTYPES:
            raise ExportError(f"{onnx_path}: tensor {value.name!r} has ONNX type {tensor.elem_type}, unknown to Triton")
        return {"name": value.name, "data_type": TRITON_DTYPES[tensor.elem_type], "dims": dims}

    inputs = [describe(v) for v in proto.graph.input if v.name not in initializers]
    return inputs, [describe(v) for v in proto.graph.output]


def _tensor_block(kind: str, tensors: Sequence[dict]) -> str:
    entries = []
    for t in tensors:
        # Triton wants non-empty dims: a per-image scalar (score, shape N) is [1] reshaped to [].
        dims = t["dims"] or [1]
        reshape = "\n    reshape: { shape: [ ] }" if not t["dims"] else ""
        entries.append(f'  {{\n    name: "{t["name"]}"\n    data_type: {t["data_type"]}\n'
                       f'    dims: [ {", ".join(str(d) for d in dims)} ]{reshape}\n  }}')
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def model_config(name: str, platform: str, inputs, outputs, max_batch_size: int,
                 preferred_batch_sizes: Sequence[int], max_queue_delay_us: int) -> str:
    """config.pbtxt text for one model."""
    preferred = ", ".join(str(b) for b in preferred_batch_sizes)
    return (f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {int(max_batch_size)}\n'
            + _tensor_block("input", inputs) + _tensor_block("output", outputs)
            + f"dynamic_batching {{\n  preferred_batch_size: [ {preferred} ]\n"
              f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}\n}}\n")


def preferred_sizes(batch_range: Sequence[int]) -> List[int]:
    """The profile's opt and max batch (Triton forms batches of these sizes when it can)."""
    _, opt, hi = batch_range
    return sorted({int(opt), int(hi)})


def _copy(src, dst) -> None:
    with open(src, "rb") as source, atomic_open(dst, "wb") as target:
        shutil.copyfileobj(source, target, 1 << 20)


def versions(folder: Path) -> List[int]:
    """The version numbers of a Triton model folder (its numeric subfolders), ascending."""
    if not folder.is_dir():
        return []
    return sorted(int(child.name) for child in folder.iterdir() if child.is_dir() and child.name.isascii()
                  and child.name.isdigit()
                  and int(child.name) > 0)


def version_for(folder: Path, filename: str, source: Path) -> str:
    """The version folder ``source`` goes to: the newest one when it already holds this very file,
    else one past the newest (1 for a new model)."""
    from mrkd.runtime.metadata import file_sha256
    found = versions(folder)
    if found:
        newest = folder / str(found[-1]) / filename
        if newest.is_file() and file_sha256(newest) == file_sha256(source):
            return str(found[-1])
    return str(found[-1] + 1 if found else 1)


def write_triton_repository(repo_dir, onnx_path, name: str = "mrkd", engine_path=None,
                            max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, metadata: Optional[ModelMetadata] = None,
                            engine_metadata: Optional[ModelMetadata] = None) -> Dict[str, Path]:
    """Write the model folder(s) into ``repo_dir``; returns model name -> config.pbtxt path.
    ``metadata`` / ``engine_metadata``: the models' metadata when the caller has it (else read from the sidecars)."""
    repo_dir = Path(repo_dir)
    meta = metadata or ModelMetadata.load(sidecar_path(onnx_path))
    inputs, outputs = graph_io(onnx_path)
    written = {}
    targets = [(name, "onnxruntime_onnx", Path(onnx_path), "model.onnx", meta)]
    if engine_path is not None and Path(engine_path).is_file():
        engine_meta = engine_metadata or ModelMetadata.load(sidecar_path(engine_path))
        targets.append((f"{name}_trt", "tensorrt_plan", Path(engine_path), "model.plan", engine_meta))
    for model_name, platform, source, filename, model_meta in targets:
        folder = repo_dir / model_name
        version = version_for(folder, filename, source)
        config = model_config(model_name, platform, inputs, outputs, model_meta.batch_range[2],
                              preferred_sizes(model_meta.batch_range), max_queue_delay_us)
        if (folder / version / filename).is_file():
            atomic_write_text(folder / "config.pbtxt", config)
        elif folder.is_dir():
            _add_version(folder, version, source, filename, model_meta, config)
        else:
            _add_model(repo_dir, folder, version, source, filename, model_meta, config)
        written[model_name] = folder / "config.pbtxt"
    return written


def _add_version(folder: Path, version: str, source: Path, filename: str, model_meta: ModelMetadata,
                 config: str) -> None:
    """Write ``<folder>/<version>/`` (the model file and its sidecar) whole, then config.pbtxt for it."""
    with staging_folder(folder) as staging:
        # staging/<version>: an error's message names <folder>/<version>/<file>, where it was going
        staged = staging / version
        staged.mkdir()            # the mode of any new folder (umask), which the rename keeps
        _copy(source, staged / filename)
        model_meta.save(staged / (filename + ".json"))
        with stops_deferred():    # the version folder and the config that describes it, or neither
            os.rename(staged, folder / version)
            try:
                atomic_write_text(folder / "config.pbtxt", config)
            except BaseException:
                os.rename(folder / version, staged)      # atomic too; the staging folder's clean-up removes it
                raise
        sync_folder(folder)       # the version's name on disk before the export says it is there (a power cut)


def _add_model(repo_dir: Path, folder: Path, version: str, source: Path, filename: str,
               model_meta: ModelMetadata, config: str) -> None:
    """Write the new model folder ``folder`` (config.pbtxt and ``<version>/``) whole, in one rename.

    Triton takes every subfolder of the repository for a model, hidden ones too (its core's
    model_repository_manager.cc, Poll): a poll logs "Poll failed for model directory" for a staging
    folder there, and at start-up one fails "failed to load all models" (fatal under the default
    --exit-on-error). So the model folder is staged beside the repository, where Triton never looks, and
    only where that cannot be (the repository's parent not writable, or another file system: a mount
    point) in the repository itself, for as long as this export writes it."""
    made_repo = not repo_dir.exists()
    repo_dir.mkdir(parents=True, exist_ok=True)
    beside = repo_dir.absolute().parent
    place = beside if _renames_into(beside, repo_dir) else repo_dir
    try:
        with staging_folder(place) as staging:
            # staged where an error's message, the staging folder replaced by ``place``, names the target
            staged = staging / repo_dir.name / folder.name if place == beside else staging / folder.name
            (staged / version).mkdir(parents=True)    # the mode of any new folder (umask), which the rename keeps
            _copy(source, staged / version / filename)
            model_meta.save(staged / version / (filename + ".json"))
            atomic_write_text(staged / "config.pbtxt", config)
            with stops_deferred():    # the model folder whole, or none
                try:
                    os.rename(staged, folder)
                except OSError:
                    if folder.exists():     # made meanwhile (another export, a person): never merged into
                        raise ExportError(f"{folder}: appeared while this export wrote it; nothing was changed "
                                          f"there, export again to add a version to it") from None
                    raise
            sync_folder(repo_dir)     # the model folder's name on disk before the export says it is there
    except BaseException:
        if made_repo:       # a repository made for this model and left empty goes again
            with contextlib.suppress(OSError):
                repo_dir.rmdir()
        raise


def _renames_into(beside: Path, repo_dir: Path) -> bool:
    """Whether a folder staged in ``beside`` can be renamed into ``repo_dir``: beside writable, and both
    on one file system."""
    try:
        return os.access(beside, os.W_OK | os.X_OK) and beside.stat().st_dev == repo_dir.stat().st_dev
    except OSError:
        return False


def leftover_version_staging(repo_dir) -> List[Path]:
    """Staging folders that an earlier export left (SIGKILL or a power cut skips their clean-up; or an
    export running now), sorted: a new model's in the repository itself, a new version's in its model
    folder."""
    repo_dir = Path(repo_dir)
    if not repo_dir.is_dir():
        return []
    in_models = [path for folder in repo_dir.iterdir()
                 if folder.is_dir() and not folder.name.startswith(STAGING_PREFIX) for path in leftover_staging(folder)]
    beside = [path for path in leftover_staging(repo_dir.absolute().parent) if (path / repo_dir.name).is_dir()]
    return sorted(leftover_staging(repo_dir) + in_models + beside)
