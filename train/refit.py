"""Refit from false alarms: operator-confirmed good parts join the memory bank; MRKD's weights stay.

``refit_model`` works on a loaded MRKD model with a memory bank (``--score knn|both``):

1. The teacher's stride-8/16 patches (mrkd.train.memory_bank.patch_features) of every image an
   operator marked "good" are candidates. Only those: a bank fed with frames nobody looked at learns
   the line's defects as normal.
2. The bank grows by farthest-first (k-center) selection among the candidates: the candidate farthest
   from the bank (and from what was added) goes in first, until every candidate lies within
   ``radius`` of the bank — the median nearest-bank distance of the held-out good images' patches,
   the spacing a good part's patches already have. So a flagged image's unusual patches go in, its
   ordinary ones (already covered) do not, and the bank (and the graph's kNN cost) grows little.
   Past the bank's cap (config.knn_max_patches) the whole bank is re-selected within the cap by the
   same greedy coreset (a warning says so).
3. The threshold is set again (runtime/calibration.py's rules, the checkpoint's method and quantile)
   on held-out good images that did not go into the bank.
   Defect guard: before that, a candidate patch within ``GUARD_SCALE`` x radius of one of the
   ``GUARD_TOP`` most anomalous patches (by nearest-bank distance) of any image marked "defect" is
   dropped, so the bank cannot learn those defect patterns as normal (a flagged good cell's patches
   can lie near a defect's).
4. Images marked "defect" are the check: each must still score >= the new threshold.

The MRKD map's normalisation (the "both" weights) is left as trained, so scores stay comparable.
``refit_checkpoint`` does the file work: reads the labels (runtime/review.py), checks every reviewed
image against the sha256 the operator saw, writes a NEW folder (never the parent's files) with the
checkpoint and, on request, its ONNX export; both carry the lineage (version, parent model sha256,
label file sha256).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mrkd.errors import MrkdError
from mrkd.runtime.calibration import DEFAULT_CONFIDENCE, DEFAULT_METHOD, DEFAULT_QUANTILE, Calibration, \
    calibration_from_scores
from mrkd.runtime.metadata import file_sha256
from mrkd.runtime.review import DEFECT, GOOD, ReviewError, image_sha256, labels_file_sha256, latest_labels, \
    read_labels

logger = logging.getLogger(__name__)

LINEAGE_KEY = "lineage"
LINEAGE_SCHEMA_VERSION = 1
CHECKPOINT_NAME = "model.ckpt"
RADIUS_QUANTILE = 0.5          # the held-out good patches' median nearest-bank distance
GUARD_TOP = 16                 # defect guard: each confirmed defect's most anomalous patches kept out of reach
GUARD_SCALE = 1.25             # ... a candidate within GUARD_SCALE x radius of one of them stays out of the bank


class RefitError(MrkdError, ValueError):
    """A refit that cannot be done or would not be safe; the message names the file or image."""


@dataclass(frozen=True)
class Lineage:
    """Where a refit model comes from (in the checkpoint under ``lineage`` and the export's extra)."""

    version: int
    parent_sha256: str
    labels_sha256: str
    parent: str
    labels: str
    good_images: Tuple[str, ...]
    defect_images: Tuple[str, ...]
    bank_before: int
    bank_after: int
    created: str
    schema_version: int = LINEAGE_SCHEMA_VERSION

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["good_images"], data["defect_images"] = list(self.good_images), list(self.defect_images)
        return data


@dataclass
class RefitResult:
    """What one refit changed and measured."""

    bank_before: int
    bank_after: int
    added_patches: int
    reselected: bool
    radius: float
    threshold_before: Optional[float]
    threshold_after: float
    calibration: dict
    good_scores_before: List[float]
    good_scores_after: List[float]
    defect_scores_after: List[float]
    defects_missed: List[str]            # defect-confirmed images the new model no longer flags
    seconds: float = 0.0
    files: dict = field(default_factory=dict)
    lineage: Optional[dict] = None
    guarded_patches: int = 0             # candidate patches kept out by the defect guard


# ---------------------------------------------------------------- the computation

def _batches(model, paths: Sequence[str], batch_size: int):
    from mrkd.train.calibrate import _as_batches
    return _as_batches(list(paths), model, batch_size)


def image_patches(model, paths: Sequence[str], batch_size: int = 8) -> torch.Tensor:
    """Every stride-8 patch feature (rows) of ``paths``, as the memory bank holds them."""
    from mrkd.train.memory_bank import training_patches
    return training_patches(model, _batches(model, paths, batch_size)).rows


def nearest_distance(rows: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """L2 distance of each row to its nearest bank row (the MemoryBank's formula, clamped at 0)."""
    rows, bank = rows.float(), bank.float()
    row_sq = rows.pow(2).sum(1, keepdim=True)
    best = torch.full((len(rows),), float("inf"))
    for start in range(0, len(bank), chunk):
        part = bank[start:start + chunk]
        d2 = (row_sq - 2.0 * rows @ part.t() + part.pow(2).sum(1)).amin(1)
        best = torch.minimum(best, d2)
    return best.clamp_min(0).sqrt()


def farthest_first(candidates: torch.Tensor, bank: torch.Tensor, radius: float) -> torch.Tensor:
    """Indices of candidates to add: repeatedly the one farthest from bank + added, while it lies
    farther than ``radius`` (greedy k-center extension of the bank)."""
    distance = nearest_distance(candidates, bank)
    points = candidates.float()
    squared = points.pow(2).sum(1)
    chosen: List[int] = []
    while len(chosen) < len(points):
        index = int(torch.argmax(distance))
        if not float(distance[index]) > radius:
            break
        chosen.append(index)
        to_new = (squared - 2.0 * points @ points[index] + squared[index]).clamp_min(0).sqrt()
        torch.minimum(distance, to_new, out=distance)
    return torch.tensor(chosen, dtype=torch.long)


def defect_patches(rows: torch.Tensor, images: int, bank: torch.Tensor, top: int) -> torch.Tensor:
    """The ``top`` patches of each image farthest from ``bank`` (``rows``: the images' patches in
    order, the same count per image): where the confirmed defects look least like the bank."""
    if images <= 0 or len(rows) == 0 or top <= 0:
        return rows[:0]
    per_image = rows.reshape(images, -1, rows.shape[1])
    distance = nearest_distance(rows, bank).reshape(images, -1)
    keep = distance.topk(min(top, distance.shape[1]), dim=1).indices
    return torch.cat([per_image[i, keep[i]] for i in range(images)])


def guard_mask(candidates: torch.Tensor, guard: torch.Tensor, reach: float) -> torch.Tensor:
    """True for the candidates farther than ``reach`` from every ``guard`` patch: only those may join
    the bank (one within reach would make that defect patch look normal)."""
    if len(guard) == 0 or len(candidates) == 0:
        return torch.ones(len(candidates), dtype=torch.bool)
    return nearest_distance(candidates, guard) > reach


def refit_model(model, good_paths: Sequence[str], calibration_paths: Sequence[str],
                defect_paths: Sequence[str] = (), *, quantile: Optional[float] = None,
                method: Optional[str] = None, confidence: Optional[float] = None, radius: Optional[float] = None,
                seed: int = 0, batch_size: int = 8, guard_top: int = GUARD_TOP,
                guard_scale: float = GUARD_SCALE) -> RefitResult:
    """Grow ``model``'s memory bank from ``good_paths`` and calibrate again on ``calibration_paths``
    (see the module's notes). Changes only the head's bank and ``model.calibration``. Defect guard:
    a candidate within ``guard_scale`` x radius of one of the ``guard_top`` most anomalous patches of
    any ``defect_paths`` image is not added (``guard_scale`` 0 turns the guard off)."""
    from mrkd.train.calibrate import score_images
    from mrkd.train.memory_bank import MemoryBank, greedy_coreset
    started = time.perf_counter()
    head = model.head
    if getattr(head, "memory_bank", None) is None:
        raise RefitError(f"the model has no memory bank (trained with --score {model.config.score}); refit "
                         f"adds reviewed good parts to the bank of a --score both or knn model")
    if not good_paths:
        raise RefitError("no image marked good to add to the memory bank")
    if not calibration_paths:
        raise RefitError("no held-out good images to set the threshold on")
    model.eval()
    previous = Calibration.of(model.calibration, "model calibration")
    quantile = quantile if quantile is not None else (previous.quantile if previous and previous.quantile
                                                      else DEFAULT_QUANTILE)
    method = method or (previous.method if previous and previous.method in ("quantile", "tolerance")
                        else DEFAULT_METHOD)
    confidence = confidence if confidence is not None else (previous.confidence if previous and previous.confidence
                                                            else DEFAULT_CONFIDENCE)
    good_before = score_images(model, list(good_paths), batch_size)
    bank = head.memory_bank.bank.detach().cpu()
    before = len(bank)
    with torch.no_grad():
        if radius is None:
            held_out = image_patches(model, calibration_paths, batch_size)
            radius = float(torch.quantile(nearest_distance(held_out, bank), RADIUS_QUANTILE))
        candidates = image_patches(model, good_paths, batch_size)
        guarded = 0
        if defect_paths and guard_scale > 0 and guard_top > 0:
            guard = defect_patches(image_patches(model, defect_paths, batch_size), len(defect_paths), bank,
                                   guard_top)
            allowed = guard_mask(candidates, guard, guard_scale * radius)
            guarded = int((~allowed).sum())
            candidates = candidates[allowed]
        added = farthest_first(candidates, bank, radius)
        grown = torch.cat([bank, candidates[added]]) if len(added) else bank
    cap = int(getattr(model.config, "knn_max_patches", 0) or 0)
    reselected = cap > 0 and len(grown) > cap
    if reselected:
        logger.warning("memory bank would hold %d patches, over its cap of %d: re-selecting %d by greedy "
                       "coreset over the old bank and the reviewed patches", len(grown), cap, cap)
        grown = grown[greedy_coreset(grown, cap, seed)].contiguous()
    device = next(model.parameters()).device
    head.set_memory_bank(MemoryBank(grown).to(device), head.knn_weight)
    good_scores = score_images(model, list(calibration_paths), batch_size)
    calibration = calibration_from_scores(good_scores, quantile, method=method, confidence=confidence,
                                          previous_threshold=previous.threshold if previous else None,
                                          source=f"refit: {len(calibration_paths)} held-out good image(s)")
    model.calibration = calibration.to_dict()
    defect_scores = score_images(model, list(defect_paths), batch_size) if defect_paths else np.zeros(0)
    missed = [str(p) for p, s in zip(defect_paths, defect_scores) if not s >= calibration.threshold]
    return RefitResult(bank_before=before, bank_after=len(grown), added_patches=int(len(added)),
                       reselected=reselected, radius=float(radius),
                       threshold_before=previous.threshold if previous else None,
                       threshold_after=calibration.threshold, calibration=calibration.to_dict(),
                       good_scores_before=[float(s) for s in good_before],
                       good_scores_after=[float(s) for s in score_images(model, list(good_paths), batch_size)],
                       defect_scores_after=[float(s) for s in defect_scores], defects_missed=missed,
                       seconds=time.perf_counter() - started, guarded_patches=guarded)


# ---------------------------------------------------------------- files

@dataclass(frozen=True)
class ReviewedImages:
    good: Tuple[str, ...]
    defect: Tuple[str, ...]
    skipped: Tuple[str, ...]           # one line per label left out, with the reason


def reviewed_images(labels_path, known_events: Optional[set] = None,
                    warn: Callable[[str], None] = logger.warning) -> ReviewedImages:
    """The labels' images, each checked: present, and with the sha256 the operator saw. A label whose
    image is missing or changed, or whose event is not in ``known_events`` (when given), is skipped
    with a warning; the rest is read by runtime/review.py's rules (last label of an event wins)."""
    labels_path = Path(labels_path)
    latest = latest_labels(read_labels(labels_path), str(labels_path))
    good, defect, skipped = [], [], []
    for label in latest.values():
        image = Path(label.image) if label.image else None
        if image is not None and not image.is_absolute():
            image = labels_path.parent / image
        reason = None
        if known_events is not None and label.event_id not in known_events:
            reason = "is not in the events log"
        elif image is None:
            reason = "names no image"
        elif not image.is_file():
            reason = f"image {image} no longer exists"
        elif image_sha256(image) != label.image_sha256:
            reason = f"image {image} changed since it was reviewed (sha256 differs)"
        if reason:
            skipped.append(f"{labels_path}: event {label.event_id} ({label.label}) skipped: {reason}")
            warn(skipped[-1])
            continue
        (good if label.label == GOOD else defect).append(str(image))
    return ReviewedImages(tuple(dict.fromkeys(good)), tuple(dict.fromkeys(defect)), tuple(skipped))


def parent_version(data: dict) -> int:
    lineage = data.get(LINEAGE_KEY)
    version = lineage.get("version") if isinstance(lineage, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) and version >= 1 else 1


def default_out_dir(model_path, version: int) -> Path:
    model_path = Path(model_path)
    return model_path.parent / f"{model_path.stem}.v{version}"


def refit_checkpoint(model_path, labels_path, good, out_dir=None, *, force: bool = False, export: bool = True,
                     events=None, quantile: Optional[float] = None, method: Optional[str] = None,
                     batch_size: int = 8, guard_scale: float = GUARD_SCALE,
                     echo: Callable[[str], None] = print) -> RefitResult:
    """Refit the checkpoint ``model_path`` from the labels at ``labels_path``; calibrate on the good
    images ``good`` (a folder, glob or list). Writes ``out_dir`` (default: beside the model,
    ``<stem>.v<N>``), which must not exist: model.ckpt (+ model.onnx and its sidecar with ``export``),
    built in a temporary folder and renamed into place at the end. ``events``: an events log whose
    ids the labels must name. Raises RefitError when a confirmed defect is no longer flagged, unless
    ``force``."""
    from mrkd.train.checkpoint import checkpoint_dict, model_from_dict, read_checkpoint, save_checkpoint
    from mrkd.train.data import scan_folder
    model_path, labels_path = Path(model_path), Path(labels_path)
    if model_path.suffix.lower() in (".onnx", ".engine", ".plan"):
        raise RefitError(f"{model_path}: refit needs the checkpoint (.ckpt) the model was exported from; the "
                         f"teacher's features come from it")
    data = read_checkpoint(model_path)
    model = model_from_dict(data, source=str(model_path))
    known = None
    if events is not None:
        from mrkd.runtime.outputs.events import read_events
        try:
            known = {str(e.get("event_id")) for e in read_events(events) if isinstance(e, dict)}
        except (OSError, ValueError) as exc:
            raise RefitError(f"{events}: cannot read the events log ({exc})") from exc
    reviewed = reviewed_images(labels_path, known, warn=echo)
    if not reviewed.good:
        raise RefitError(f"{labels_path}: no usable image marked good (of {len(reviewed.skipped)} skipped); "
                         f"nothing to refit")
    calibration_paths = list(good) if isinstance(good, (list, tuple)) else [str(p) for p in scan_folder(good)]
    reviewed_hashes = {image_sha256(p) for p in reviewed.good}
    held_out = [p for p in calibration_paths if image_sha256(p) not in reviewed_hashes]
    if len(held_out) < len(calibration_paths):
        echo(f"warning: {len(calibration_paths) - len(held_out)} of the --good images were reviewed as good and "
             f"go into the bank; they are left out of the threshold")
    if not held_out:
        raise RefitError(f"{good}: no held-out good image left to set the threshold on")
    version = parent_version(data) + 1
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(model_path, version)
    if out_dir.exists():
        raise RefitError(f"{out_dir}: exists; a refit writes a new model version into a new folder (never over "
                         f"an earlier one)")
    result = refit_model(model, reviewed.good, held_out, reviewed.defect, quantile=quantile, method=method,
                         batch_size=batch_size, guard_scale=guard_scale)
    echo(f"memory bank {result.bank_before} -> {result.bank_after} patches ({result.added_patches} added from "
         f"{len(reviewed.good)} reviewed good image(s), radius {result.radius:.4g}, {result.guarded_patches} kept out "
         f"by the defect guard"
         f"{', re-selected within the cap' if result.reselected else ''}); threshold "
         f"{result.threshold_before} -> {result.threshold_after:.6g} on {len(held_out)} held-out good image(s)")
    if result.defects_missed:
        message = (f"{len(result.defects_missed)} of {len(reviewed.defect)} confirmed defect(s) no longer flagged "
                   f"by the refit model (first: {result.defects_missed[0]})")
        if not force:
            raise RefitError(message + "; nothing written (--force writes it anyway)")
        echo(f"WARNING: {message}; written anyway (--force)")
    lineage = Lineage(version=version, parent_sha256=file_sha256(model_path),
                      labels_sha256=labels_file_sha256(labels_path), parent=str(model_path),
                      labels=str(labels_path), good_images=reviewed.good, defect_images=reviewed.defect,
                      bank_before=result.bank_before, bank_after=result.bank_after,
                      created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    result.lineage = lineage.to_dict()
    kept = {k: v for k, v in data.items() if k not in checkpoint_dict(model) and k not in ("train_state",)}
    kept[LINEAGE_KEY] = result.lineage
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_checkpoint(model.cpu(), staging / CHECKPOINT_NAME, extra=kept)
        if export:
            _export_with_lineage(staging / CHECKPOINT_NAME, staging, result.lineage, echo)
        try:
            os.rename(staging, out_dir)       # atomic; fails when out_dir appeared meanwhile
        except OSError as exc:
            raise RefitError(f"{out_dir}: cannot be created ({exc}); nothing written") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    result.files = {p.name: str(out_dir / p.name) for p in sorted(out_dir.iterdir())}
    return result


def _export_with_lineage(checkpoint: Path, out_dir: Path, lineage: dict, echo) -> None:
    """ONNX export of the refit checkpoint; the sidecar's ``extra`` carries the lineage."""
    from mrkd.export.pipeline import FP32_NAME, export_checkpoint
    from mrkd.runtime.metadata import ModelMetadata, sidecar_path
    export_checkpoint(checkpoint, out_dir, echo=echo)
    sidecar = sidecar_path(out_dir / FP32_NAME)
    meta = ModelMetadata.load(sidecar)
    meta.extra = dict(meta.extra, model_version=lineage["version"], parent_sha256=lineage["parent_sha256"],
                      labels_sha256=lineage["labels_sha256"])
    meta.save(sidecar)
