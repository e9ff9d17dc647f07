"""Refit from false alarms: operator-confirmed good parts join the memory bank; MRKD's weights stay.

``refit_model`` works on a loaded MRKD model with a memory bank (``--score knn|both``):

1. The teacher's stride-8/16 patches (mrkd.train.memory_bank.patch_features) of every image an
   operator marked "good" are candidates. Only those: a bank fed with frames nobody looked at learns
   the line's defects as normal. With ``augment`` (default none), flipped / rotated copies of each of
   them (AUGMENTS) are candidates too, under the same growth stop and defect guard.
2. The bank grows by farthest-first (k-center) selection among the candidates: the candidate farthest
   from the bank (and from what was added) goes in first, until every candidate lies within
   ``radius`` of the bank — the RADIUS_QUANTILE (0.99) of the held-out good images' patches'
   nearest-bank distances: only what is rarer than 99 % of a good part's patches goes in. So a
   flagged image's unusual patches go in, its ordinary ones do not, and the bank (and the graph's
   kNN cost) grows little. A lower stop (the median, the default until 2026-12-04) adds 5-10x more
   of each reviewed image, and those patches also pull down the scores of unflagged, subtle defects
   that resemble them; on the line's validation half of 10 ELPV models it raised the mean
   false-alarm rate at the same catch by 9 % (3 models worse), where 0.99 lowered it by 15 % and
   harmed none (benchmarks/RESULTS.md, "refit").
   Past the bank's cap (config.knn_max_patches) the whole bank is re-selected within the cap by the
   same greedy coreset (a warning says so).
3. The threshold is set again (runtime/calibration.py's rules, the checkpoint's method and quantile)
   on held-out good images that did not go into the bank; under the camera's ignore mask where it has
   one (``ignore_mask``: every image score of the refit is then the masked one, as `mrkd run` takes it:
   train/calibrate.py score_images).
   Defect guard: before that, a candidate patch is dropped when it lies within ``GUARD_KEEP`` x the
   nearest-bank distance of one of the ``GUARD_TOP`` most anomalous patches (by nearest-bank distance)
   of any image marked "defect", so the bank cannot learn those defect patterns as normal (a flagged
   good cell's patches can lie near a defect's): each such patch's kNN distance stays >= GUARD_KEEP
   of what it was. 0.9, chosen on the line's validation half of 10 ELPV models: 1.0 (it never shrinks)
   kept 3-11 of each model's reviewed false alarms flagged after the refit; 0.5-0.75 let confirmed
   defects go unflagged in 4-5 of 10 refits, 0.9 in 1. (An earlier second rule, a reach of 1.25 bank
   radii, made no difference with the 0.99 growth stop and is gone.)
4. Images marked "defect" are the check: each must still score >= the new threshold.

The MRKD map's normalisation (the "both" weights) is left as trained, so scores stay comparable,
unless re-weighting is asked for (``reweight``, `mrkd refit --reweight`): then, after the growth, the
map becomes 2·s·MRKD + 2·(1−s)·kNN with MRKD's share s from MRKD_SHARE_GRID (0.5 = as trained), the
one that best separates the confirmed defects from the goods (reviewed goods scored against the bank
without their own patches, and the held-out goods; pair AUROC); s moves only with at least
REWEIGHT_MIN_GOOD reviewed goods and REWEIGHT_MIN_DEFECT defects and an AUROC gain of
REWEIGHT_MARGIN (choose_mrkd_share). The threshold is then set on the re-weighted map.
``refit_checkpoint`` does the file work: reads the labels (runtime/review.py), checks every reviewed
image against the sha256 the operator saw (and, given the events log, the one its event recorded),
writes a NEW folder (never the parent's files; mode as mkdir would give it) with the checkpoint and,
on request, its ONNX export; both carry the lineage (version, parent model sha256, label file
sha256), as does any later export of that checkpoint.
An image is named by its decoded pixels (``pixels_sha256``) wherever the question is "is this the same
image": the label's sha256 names the file the operator saw, but one cell saved twice (the source PNG and
the evidence PNG, another compression) is one image to the bank. The lineage records every reviewed image
its versions offered the bank (``BankImage``, carried from parent to child), so a refit of a refit offers
only images no ancestor took (offered again, an image's patches went in a second time as the bank's
radius shrank, and its near-duplicates scored ~0); with none new it refuses (``NothingNewToRefit``).
Images of the bank, and the confirmed defects, are found among the held-out good images by their pixels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from mrkd.atomic import current_umask, sync_folder, temporary_folder
from mrkd.errors import MrkdError, one_line, warning_line
from mrkd.runtime.calibration import DEFAULT_CONFIDENCE, DEFAULT_METHOD, DEFAULT_QUANTILE, Calibration, \
    calibration_from_scores
from mrkd.runtime.ignore_mask import IgnoreMask, load_ignore_mask
from mrkd.runtime.images import ImageReadError, read_image
from mrkd.runtime.metadata import file_sha256
from mrkd.runtime.review import DEFECT, GOOD, EventsLogRef, FileHashes, RecordedLog, ReviewLabel, \
    evidence_changed, label_image, latest_labels, one_camera_event, read_labels, read_review_events, recorded_logs
from mrkd.train.refit_args import LINEAGE_KEY, CheckedRefitArgs, RefitError, check_new_out_dir, check_refit_args, \
    default_out_dir, lineage_version as parent_version  # noqa: F401 - RefitError is this module's error too

logger = logging.getLogger(__name__)

LINEAGE_SCHEMA_VERSION = 2      # 2: bank_images (schema 1 named only its own refit's images, by path)
CHECKPOINT_NAME = "model.ckpt"
RADIUS_QUANTILE = 0.99         # growth stop: this quantile of the held-out good patches' nearest-bank distances
GUARD_TOP = 16                 # defect guard: each confirmed defect's most anomalous patches kept out of reach:
GUARD_KEEP = 0.9               # ... a candidate within GUARD_KEEP x that patch's own nearest-bank distance stays
                               #     out (added, it would pull the defect's score down); 0: no guard
MRKD_SHARE_GRID = (0.25, 0.35, 0.5, 0.65, 0.75)   # re-weighting: MRKD's share of the "both" map (0.5 = as trained)
REWEIGHT_MIN_GOOD = 5          # re-weighting moves only with at least this many reviewed good images ...
REWEIGHT_MIN_DEFECT = 5        # ... and this many confirmed defects ...
REWEIGHT_MARGIN = 0.02         # ... and when the best share's AUROC on the labels beats 0.5's by this much
REWEIGHT_CATCH = 0.9           # (reported) false alarms among the labelled goods at this catch of the defects
# augmented candidates: each reviewed image is also read as these copies of itself (on the model's square
# input), whose patches are candidates as the image's own are (the same growth stop and defect guard).
# For parts whose good appearance is symmetric under them (ELPV cells: flips; square cells: rot90 too).
AUGMENTS = {
    "hflip": lambda x: x.flip(-1),
    "vflip": lambda x: x.flip(-2),
    "rot180": lambda x: x.flip(-2, -1),
    "rot90": lambda x: torch.rot90(x, 1, (-2, -1)),
    "rot270": lambda x: torch.rot90(x, -1, (-2, -1)),
    "transpose": lambda x: x.transpose(-2, -1),
    "antitranspose": lambda x: x.transpose(-2, -1).flip(-2, -1),
}
AUGMENT_PRESETS = {                 # names for `augment` (the bench's --tune-augment settings)
    "none": (),
    "flips": ("hflip", "vflip", "rot180"),                      # the group the two flips make
    "flips+rot90": tuple(AUGMENTS),                             # ... with rot90: every symmetry of the square
}


class NothingNewToRefit(RefitError):
    """Every reviewed good image is in the memory bank already (taken by this model's lineage)."""


def pixels_sha256(path) -> str:
    """The sha256 of an image's decoded pixels with their shape and type (runtime/images.read_image: what
    the model is given). The same pixels saved as two files (other bytes) have one; ImageReadError when
    the file cannot be decoded."""
    return decoded_sha256(read_image(path))


def decoded_sha256(pixels: np.ndarray) -> str:
    """pixels_sha256 of the image read_image decoded as ``pixels``."""
    pixels = np.ascontiguousarray(pixels)
    digest = hashlib.sha256(f"{pixels.dtype.str}{pixels.shape}".encode())
    digest.update(pixels.data)
    return digest.hexdigest()


class DecodedImages:
    """The images of one refit, each file decoded once (read_image, about 10 ms for a large image): its
    pixels' sha256 (pixels_sha256) and the model's input square (load_square's) come from that one array
    and are kept by path (as given), so every pass of the refit over an image (the bank's radius, its
    candidates, the defect guard, re-weighting, the threshold, the scores) reads the square, not the
    file. Keeps image_size² x 3 bytes an image (192 KiB at 256 px), not the decoded image."""

    def __init__(self, image_size: int, resize_mode: str):
        self.image_size, self.resize_mode = image_size, resize_mode
        self._pixel_sha256: dict = {}     # path -> decoded_sha256 of its pixels
        self._squares: dict = {}
        self._frame_hw: dict = {}         # path -> (h, w) of the decoded image: an ignore mask's geometry
        self.on_square: Optional[Callable[[], None]] = None    # called per square handed out: refit's progress

    def pixels_sha256(self, path) -> str:
        """pixels_sha256(path); ImageReadError when the file cannot be decoded."""
        key = str(path)
        if key not in self._pixel_sha256:
            self._decode(key)
        return self._pixel_sha256[key]

    def square(self, path) -> np.ndarray:
        """load_square(path, ...), DataError (naming the file) included."""
        key = str(path)
        if key not in self._squares:
            from mrkd.train.data import DataError, SKIP_UNREADABLE_HINT
            try:
                self._decode(key)
            except ImageReadError as exc:
                raise DataError(f"{exc} ({SKIP_UNREADABLE_HINT})") from exc
        if self.on_square is not None:
            self.on_square()
        return self._squares[key]

    def frame_hw(self, path) -> Tuple[int, int]:
        """(h, w) of the image at ``path`` as decoded (ImageReadError when it cannot be)."""
        key = str(path)
        if key not in self._frame_hw:
            self._decode(key)
        return self._frame_hw[key]

    def _decode(self, key: str) -> None:
        from mrkd.runtime.preprocess import resize_square
        pixels = read_image(key)
        self._pixel_sha256[key] = decoded_sha256(pixels)
        self._frame_hw[key] = tuple(int(v) for v in pixels.shape[:2])
        self._squares[key] = resize_square(pixels, self.image_size, self.resize_mode)

    @classmethod
    def of(cls, model) -> "DecodedImages":
        return cls(model.config.image_size, model.config.resize_mode)


@dataclass(frozen=True)
class BankImage:
    """A reviewed good image that a refit of the lineage offered the memory bank (its patches were the
    candidates): a later refit does not offer its pixels again."""

    pixels_sha256: str        # pixels_sha256: what a later refit compares
    file_sha256: str          # the file the label named (its image_sha256), as it was then
    path: str
    version: int              # the model version whose refit offered it

    @classmethod
    def from_dict(cls, data, where: str) -> "BankImage":
        """Validated: RefitError naming ``where`` and the field."""
        if not isinstance(data, dict):
            raise RefitError(f"{where} must be a mapping, got {type(data).__name__}")
        for name, kind in (("pixels_sha256", str), ("file_sha256", str), ("path", str), ("version", int)):
            value = data.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise RefitError(f"{where}: field {name} is missing or not a {kind.__name__}")
        return cls(data["pixels_sha256"], data["file_sha256"], data["path"], data["version"])


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
    reweight: Optional[dict] = None      # Reweight.to_dict() when the refit was asked to re-weight
    augment: Tuple[str, ...] = ()        # the transforms whose copies of the reviewed images were candidates
    bank_images: Tuple[BankImage, ...] = ()  # every reviewed image this version and its ancestors offered the bank

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["good_images"], data["defect_images"] = list(self.good_images), list(self.defect_images)
        data["augment"] = list(self.augment)
        data["bank_images"] = [dataclasses.asdict(image) for image in self.bank_images]
        return data


def lineage_bank_images(lineage, model_path, warn: Callable[[str], None],
                        pixels_of: Callable[[str], str] = pixels_sha256,
                        file_of: Callable[[str], str] = file_sha256) -> Tuple[BankImage, ...]:
    """The reviewed images a checkpoint's lineage (its ``lineage`` dict, or None) offered the bank, over
    every version. A lineage of schema 1 (an older mrkd) names only its own refit's images, by path:
    those still readable are taken by their pixels (``pixels_of``) and file hash (``file_of``) now, and
    ``warn`` says what cannot be known."""
    if not isinstance(lineage, dict):
        return ()
    where = f"{model_path}: lineage"
    schema = lineage.get("schema_version", 1)
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise RefitError(f"{where}: field schema_version must be an integer, got {schema!r}")
    if schema >= 2:
        entries = lineage.get("bank_images")
        if not isinstance(entries, list):
            raise RefitError(f"{where}: field bank_images is missing or not a list")
        return tuple(BankImage.from_dict(entry, f"{where} bank_images[{i}]") for i, entry in enumerate(entries))
    version, paths = lineage.get("version"), lineage.get("good_images")
    if not isinstance(paths, list) or not isinstance(version, int):
        return ()
    taken = []
    for path in paths:
        try:
            taken.append(BankImage(pixels_of(path), file_of(path), str(path), version))
        except (ImageReadError, OSError, TypeError):
            pass
    if len(taken) < len(paths) or version > 2:
        gone = f", {len(paths) - len(taken)} of them no longer readable" if len(taken) < len(paths) else ""
        warn(f"note: {model_path}'s lineage is of an older mrkd (schema 1): it names only the {len(paths)} "
             f"image(s) of its own refit (version {version}), by path{gone}; reviewed images taken into the bank "
             f"otherwise are not recognised and would be offered again")
    return tuple(taken)


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
    reviewed_still_flagged: List[str]    # images reviewed as good that the new model still flags
    seconds: float = 0.0                 # the bank's growth and the new threshold (refit_model)
    wall_seconds: float = 0.0            # the whole refit_checkpoint: reading, refit, export, writing
    files: dict = field(default_factory=dict)
    lineage: Optional[dict] = None
    guarded_patches: int = 0             # candidate patches kept out by the defect guard
    reweight: Optional["Reweight"] = None  # the MRKD/kNN share chosen from the labels (None: not asked)
    already_in_bank: Tuple[str, ...] = ()   # reviewed good images skipped: the lineage took them (refit_checkpoint)


@dataclass(frozen=True)
class ShareScore:
    share: float
    auroc: float                         # reviewed + held-out goods vs confirmed defects, at this share
    false_alarms: int = 0                # goods at or above the score that catches REWEIGHT_CATCH of the defects
    good_scores: Tuple[float, ...] = field(default=(), repr=False)    # kept out of the metadata
    defect_scores: Tuple[float, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class Reweight:
    """The MRKD share of the "both" map a refit chose: the map becomes 2·share·MRKD + 2·(1−share)·kNN
    (each part as trained, i.e. already divided by its spread), so 0.5 leaves it as it was."""

    share: float
    moved: bool
    reason: str
    table: Tuple[ShareScore, ...] = ()

    def to_dict(self) -> dict:
        return {"share": self.share, "moved": self.moved, "reason": self.reason,
                "table": [{"share": row.share, "auroc": row.auroc, "false_alarms": row.false_alarms}
                          for row in self.table]}


# ---------------------------------------------------------------- the computation

def _batches(model, paths: Sequence[str], batch_size: int, images: Optional[DecodedImages] = None):
    """The model's input batches of ``paths``: decoded from the files, or the squares of ``images``."""
    from mrkd.train.calibrate import _as_batches
    return _as_batches(list(paths), model, batch_size, square=images.square if images is not None else None)


def image_patches(model, paths: Sequence[str], batch_size: int = 8,
                  images: Optional[DecodedImages] = None) -> torch.Tensor:
    """Every stride-8 patch feature (rows) of ``paths``, as the memory bank holds them."""
    from mrkd.train.memory_bank import training_patches
    return training_patches(model, _batches(model, paths, batch_size, images)).rows


def _patch_batches(model, paths: Sequence[str], batch_size: int, images: Optional[DecodedImages] = None):
    """(rows, images) per batch of ``paths``: its patches as image_patches gives them, and its image count."""
    from mrkd.train.memory_bank import training_patches
    for x in _batches(model, paths, batch_size, images):
        yield training_patches(model, [x]).rows, len(x)


def bank_distances(model, paths: Sequence[str], bank: torch.Tensor, batch_size: int = 8,
                   images: Optional[DecodedImages] = None) -> torch.Tensor:
    """nearest_distance to ``bank`` of every patch of ``paths`` (image_patches' rows, in order), batch by
    batch: only the distances are kept. Every patch at once held 6 MiB an image at 512 px (ResNet-18:
    4096 patches x 384 floats), 1.2 GiB for 200 held-out images, twice over while they were joined."""
    parts = [nearest_distance(rows, bank) for rows, _ in _patch_batches(model, paths, batch_size, images)]
    return torch.cat(parts) if parts else torch.zeros(0)


def guard_patches(model, paths: Sequence[str], bank: torch.Tensor, top: int, batch_size: int = 8,
                  images: Optional[DecodedImages] = None) -> torch.Tensor:
    """defect_patches of the images ``paths``, batch by batch (each image's top patches are its own)."""
    parts = [defect_patches(rows, count, bank, top) for rows, count in _patch_batches(model, paths, batch_size,
                                                                                        images)]
    return torch.cat(parts) if parts else bank[:0]


def augment_names(augment) -> Tuple[str, ...]:
    """The transforms of ``augment`` (a preset of AUGMENT_PRESETS, or names of AUGMENTS), in order,
    each once; RefitError names an unknown one."""
    if isinstance(augment, str):
        if augment not in AUGMENT_PRESETS:
            raise RefitError(f"augment {augment!r}: expected one of {', '.join(AUGMENT_PRESETS)}")
        return AUGMENT_PRESETS[augment]
    names = tuple(dict.fromkeys(str(name) for name in augment or ()))
    unknown = [name for name in names if name not in AUGMENTS]
    if unknown:
        raise RefitError(f"augment {', '.join(map(repr, unknown))}: expected names of {', '.join(AUGMENTS)}")
    return names


@dataclass
class Candidates:
    """The reviewed images' patches that farthest_first may add (reviewed_candidates)."""

    rows: torch.Tensor        # every image's patches, then each transform's, in that order; only the survivors
    owner: torch.Tensor       # owner[i]: the index in the reviewed paths of the image row i comes from
    guarded: int              # patches (of all, before the radius) the defect guard kept out


def reviewed_candidates(model, paths: Sequence[str], bank: torch.Tensor, radius: float, augment: Sequence[str] = (),
                        guard: Optional[torch.Tensor] = None, reach=None, batch_size: int = 8,
                        images: Optional[DecodedImages] = None) -> Candidates:
    """The patches of ``paths``, and of each transform of ``augment`` applied to every image, that the
    growth could take: farther than ``radius`` from ``bank`` (farthest_first never adds one nearer, and
    adding others never makes it farther) and, with a ``guard``, allowed by guard_mask(``reach``). Taken
    one batch and one transform at a time, so only those survivors are held (every patch at once was 8x
    the reviewed images' patches with --augment flips+rot90); in the order every patch at once had."""
    from mrkd.train.memory_bank import training_patches
    names = augment_names(augment)
    kept: List[List[Tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(1 + len(names))]
    guarded, first = 0, 0
    for x in _batches(model, paths, batch_size, images):
        for slot, name in enumerate((None,) + names):
            if name in ("rot90", "rot270", "transpose", "antitranspose") and x.shape[-1] != x.shape[-2]:
                raise RefitError(f"augment {name!r} needs a square model input (this one: {tuple(x.shape[-2:])})")
            rows = training_patches(model, [x if name is None else AUGMENTS[name](x)]).rows
            owner = torch.arange(first, first + len(x)).repeat_interleave(len(rows) // len(x))
            allowed = guard_mask(rows, guard, reach) if guard is not None else torch.ones(len(rows), dtype=torch.bool)
            guarded += int((~allowed).sum())
            keep = allowed & (nearest_distance(rows, bank) > radius)
            kept[slot].append((rows[keep], owner[keep]))     # a boolean index copies: the batch goes
        first += len(x)
    parts = [part for slot in kept for part in slot]
    if not parts:
        return Candidates(bank[:0], torch.zeros(0, dtype=torch.long), 0)
    return Candidates(torch.cat([rows for rows, _ in parts]), torch.cat([owner for _, owner in parts]), guarded)


def _squared_distances(rows: torch.Tensor, bank: torch.Tensor, chunk: int):
    """(start, squared L2 distances of every row to bank[start:start + chunk]), chunk by chunk (the
    MemoryBank's formula; not clamped)."""
    rows, bank = rows.float(), bank.float()
    row_sq = rows.pow(2).sum(1, keepdim=True)
    for start in range(0, len(bank), chunk):
        part = bank[start:start + chunk]
        yield start, row_sq - 2.0 * rows @ part.t() + part.pow(2).sum(1)


def nearest_distance(rows: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """L2 distance of each row to its nearest bank row (the MemoryBank's formula, clamped at 0), in
    blocks of ``chunk`` rows as well as of the bank: chunk² floats at a time whatever the rows' count
    (every training patch at once against one bank block took ~10 GB at 256 px)."""
    best = torch.full((len(rows),), float("inf"))
    for first in range(0, len(rows), chunk):
        for _, d2 in _squared_distances(rows[first:first + chunk], bank, chunk):
            torch.minimum(best[first:first + chunk], d2.amin(1), out=best[first:first + chunk])
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


def guard_mask(candidates: torch.Tensor, guard: torch.Tensor, reach, chunk: int = 4096) -> torch.Tensor:
    """True for the candidates farther than ``reach`` from every ``guard`` patch: only those may join
    the bank (one within reach would make that defect patch look normal). ``reach``: one distance, or
    one per guard patch."""
    allowed = torch.ones(len(candidates), dtype=torch.bool)
    if len(guard) == 0 or len(candidates) == 0:
        return allowed
    reach = torch.as_tensor(reach, dtype=torch.float32).expand(len(guard))
    for start, d2 in _squared_distances(candidates, guard, chunk):
        allowed &= (d2.clamp_min(0).sqrt() > reach[start:start + d2.shape[1]]).all(1)
    return allowed


def pair_auroc(good: np.ndarray, defect: np.ndarray) -> float:
    """Share of (good, defect) pairs the scores order right (ties count half): the Mann-Whitney AUROC."""
    good, defect = np.asarray(good, np.float64), np.asarray(defect, np.float64)
    if len(good) == 0 or len(defect) == 0:
        return float("nan")
    above = (defect[:, None] > good[None, :]).sum() + 0.5 * (defect[:, None] == good[None, :]).sum()
    return float(above / (len(good) * len(defect)))


def share_scores(mrkd_maps: np.ndarray, knn_maps: np.ndarray, share: float) -> np.ndarray:
    """Image scores (map maximum) of 2·share·MRKD + 2·(1−share)·kNN, from each part's smoothed maps
    (N×H×W; the blur is linear, so it commutes with the weighting)."""
    combined = 2.0 * share * mrkd_maps + 2.0 * (1.0 - share) * knn_maps
    return combined.reshape(len(combined), -1).max(1) if len(combined) else np.zeros(0)


def choose_mrkd_share(good_maps: Tuple[np.ndarray, np.ndarray], defect_maps: Tuple[np.ndarray, np.ndarray],
                      reviewed: int, grid: Sequence[float] = MRKD_SHARE_GRID, *,
                      min_good: int = REWEIGHT_MIN_GOOD, min_defect: int = REWEIGHT_MIN_DEFECT,
                      margin: float = REWEIGHT_MARGIN) -> Reweight:
    """The share of ``grid`` whose scores separate the confirmed defects from the goods (reviewed +
    held-out) best (pair_auroc); it moves from 0.5 only when the labels support it: at least
    ``min_good`` reviewed goods and ``min_defect`` defects, and an AUROC gain of ``margin`` or more.
    Among shares within 1e-9 of the best, the one nearest 0.5 wins."""
    grid = sorted(set(float(g) for g in grid) | {0.5})
    table = []
    for g in grid:
        good, defect = share_scores(*good_maps, g), share_scores(*defect_maps, g)
        k = max(1, int(np.ceil(REWEIGHT_CATCH * len(defect) - 1e-9)))
        alarms = int((good >= np.sort(defect)[::-1][k - 1]).sum()) if len(defect) else 0
        table.append(ShareScore(g, pair_auroc(good, defect), alarms, tuple(float(v) for v in good),
                                tuple(float(v) for v in defect)))
    table = tuple(table)
    defects = len(defect_maps[0])
    if reviewed < min_good or defects < min_defect:
        return Reweight(0.5, False, f"too few labels ({reviewed} reviewed good, {defects} confirmed defect; "
                                    f"needs {min_good} and {min_defect})", table)
    base = next(row.auroc for row in table if row.share == 0.5)
    best = max(row.auroc for row in table)
    share = min((row for row in table if row.auroc >= best - 1e-9), key=lambda row: abs(row.share - 0.5)).share
    if share == 0.5 or not best - base >= margin:
        return Reweight(0.5, False, f"AUROC on the labels {base:.4f} at 0.5, best {best:.4f}: gain under "
                                    f"{margin}", table)
    return Reweight(share, True, f"AUROC on the labels {base:.4f} -> {best:.4f}", table)


def component_maps(model, paths: Sequence[str], banks: Optional[Sequence[torch.Tensor]] = None,
                   batch_size: int = 8, images: Optional[DecodedImages] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The smoothed MRKD part and kNN part of ``model``'s "both" map (each times its current weight),
    N×H×W each; their sum is the model's map. ``banks``: one bank per image for the kNN part (a
    reviewed image's map against the bank without its own patches); default the model's bank."""
    from mrkd.train.memory_bank import MemoryBank
    head = model.head
    mrkd, knn = [], []
    start = 0
    with torch.no_grad():
        for x in _batches(model, paths, batch_size, images):
            x = x.to(next(model.parameters()).device)
            teacher, student = model(x)
            maps = head.per_scale_maps(teacher, student)
            mrkd.append(head.blur(head.upsample_sum(maps[:3]))[:, 0].cpu())
            if banks is None:
                knn.append(head.blur(head.upsample_sum(maps[3:]))[:, 0].cpu())
            else:
                for i in range(len(x)):
                    own = [f[i:i + 1] for f in teacher]
                    knn_map = MemoryBank(banks[start + i], pool=model.config.knn_pool)(own) * head.knn_weight
                    knn.append(head.blur(head.upsample_sum([knn_map]))[:, 0].cpu())
            start += len(x)
    if not mrkd:
        return np.zeros((0, 0, 0)), np.zeros((0, 0, 0))
    return torch.cat(mrkd).numpy(), torch.cat(knn).numpy()


def apply_mrkd_share(model, share: float) -> None:
    """Weight the MRKD part by 2·share and the kNN part by 2·(1−share) (head and config, so the
    checkpoint and its export carry it)."""
    head = model.head
    head.scale_weights = tuple(2.0 * share * w for w in head.scale_weights)
    head.knn_weight = 2.0 * (1.0 - share) * head.knn_weight
    model.config.scale_weights, model.config.knn_weight = head.scale_weights, head.knn_weight


MASKED_OUT = -1e30      # an ignored pixel of the re-weighting's component maps: below every score, and finite,
                        # so a share's weight times it is too


def masked_maps(maps: Tuple[np.ndarray, np.ndarray], paths: Sequence[str], mask: Optional[IgnoreMask],
                images: DecodedImages, model) -> Tuple[np.ndarray, np.ndarray]:
    """component_maps' two parts of ``paths`` with each image's ignored pixels at MASKED_OUT, so that a
    share's map maximum (share_scores) is the masked score (``mask`` None: as they are)."""
    if mask is None:
        return maps
    ignored = np.stack([mask.grid(images.frame_hw(p), model.config.image_size, model.config.resize_mode)
                        for p in paths]) if len(paths) else np.zeros((0,) + maps[0].shape[1:], bool)
    return tuple(np.where(ignored, np.float32(MASKED_OUT), part) for part in maps)


def refit_model(model, good_paths: Sequence[str], calibration_paths: Sequence[str],
                defect_paths: Sequence[str] = (), *, quantile: Optional[float] = None,
                method: Optional[str] = None, confidence: Optional[float] = None, radius: Optional[float] = None,
                radius_quantile: float = RADIUS_QUANTILE, seed: int = 0, batch_size: int = 8,
                guard_top: int = GUARD_TOP, guard_keep: float = GUARD_KEEP,
                reweight: bool = False, share_grid: Sequence[float] = MRKD_SHARE_GRID,
                augment: Sequence[str] = (), images: Optional[DecodedImages] = None,
                ignore_mask: Optional[IgnoreMask] = None) -> RefitResult:
    """Grow ``model``'s memory bank from ``good_paths`` and calibrate again on ``calibration_paths``
    (see the module's notes). Changes only the head's bank and ``model.calibration``. Defect guard:
    a candidate within ``guard_keep`` x the nearest-bank distance of one of the ``guard_top`` most
    anomalous patches of any ``defect_paths`` image is not added (0: no guard). ``reweight``: after
    the growth, choose MRKD's share of the map from ``share_grid`` by choose_mrkd_share on the labels
    (reviewed goods scored against the bank without their own patches, held-out goods, defects).
    ``radius`` (default: the ``radius_quantile`` of the held-out good patches' nearest-bank distances)
    stops the growth. ``augment``: transforms (AUGMENTS names, or a preset of AUGMENT_PRESETS) whose
    copies of each reviewed image are candidates too (default none). ``images``: where the images are
    read, each file decoded once (default: a DecodedImages of this refit's own; refit_checkpoint gives
    the one that hashed them). ``ignore_mask``: every image score (the threshold's, the defect check's, the
    reviewed images', re-weighting's) is taken under it, as a camera judging under that mask takes it, and
    the calibration records its sha256; the bank's patches are the whole image's. A progress bar counts the
    images its passes read (image_passes)."""
    if getattr(model.head, "memory_bank", None) is None:
        raise RefitError(f"the model has no memory bank (trained with --score {model.config.score}); refit "
                         f"adds reviewed good parts to the bank of a --score both or knn model")
    if not good_paths:
        raise RefitError("no image marked good to add to the memory bank")
    if not calibration_paths:
        raise RefitError("no held-out good images to set the threshold on")
    augment = augment_names(augment)
    images = images if images is not None else DecodedImages.of(model)
    if ignore_mask is not None:
        from mrkd.train.calibrate import mask_misfit
        why = mask_misfit(ignore_mask, [*good_paths, *calibration_paths, *defect_paths], model, images.frame_hw)
        if why:
            raise RefitError(why)
    guarding = bool(defect_paths) and guard_keep > 0 and guard_top > 0
    bar = refit_bar(image_passes(len(good_paths), len(calibration_paths), len(defect_paths), radius is None,
                                 guarding, reweight))
    images.on_square = bar.update
    try:
        return _refit_model(model, good_paths, calibration_paths, defect_paths, quantile, method, confidence, radius,
                            radius_quantile, seed, batch_size, guard_top, guard_keep, guarding, reweight, share_grid,
                            augment, images, ignore_mask)
    finally:
        images.on_square = None
        bar.close()


def image_passes(good: int, held_out: int, defects: int, radius: bool, guarding: bool, reweight: bool) -> int:
    """How many images refit_model's passes read (its progress bar's total): the reviewed images' scores
    before, the held-out images' distances for the ``radius``, the defects' patches for the guard
    (``guarding``), the reviewed images' candidates (their mirrored copies are made of the same read), the
    three sets' maps when it may ``reweight``, the held-out scores for the threshold, the defects' and the
    reviewed images' scores after."""
    return (good + (held_out if radius else 0) + (defects if guarding else 0) + good
            + ((good + held_out + defects) if reweight else 0) + held_out + defects + good)


def refit_bar(total: int):
    """The refit's progress bar on stderr (images read by its passes; the terminal's console lines are
    written above it, mrkd/console.py)."""
    from tqdm import tqdm
    return tqdm(total=total, desc="refit", unit="img", leave=False, mininterval=1.0)


def _refit_model(model, good_paths, calibration_paths, defect_paths, quantile, method, confidence, radius,
                 radius_quantile, seed, batch_size, guard_top, guard_keep, guarding, reweight, share_grid, augment,
                 images, ignore_mask) -> RefitResult:
    """refit_model's work, its arguments checked and its progress bar counting ``images``' reads."""
    from mrkd.train.calibrate import score_images
    from mrkd.train.memory_bank import MemoryBank, greedy_coreset
    started = time.perf_counter()
    head = model.head

    def scores(paths):
        return score_images(model, list(paths), batch_size, square=images.square, mask=ignore_mask,
                            frame_hw=images.frame_hw)

    def maps(paths, banks=None):
        return masked_maps(component_maps(model, paths, banks, batch_size, images), paths, ignore_mask, images, model)
    model.eval()
    previous = Calibration.of(model.calibration, "model calibration")
    quantile = quantile if quantile is not None else (previous.quantile if previous and previous.quantile
                                                      else DEFAULT_QUANTILE)
    method = method or (previous.method if previous and previous.method in ("quantile", "tolerance")
                        else DEFAULT_METHOD)
    confidence = confidence if confidence is not None else (previous.confidence if previous and previous.confidence
                                                            else DEFAULT_CONFIDENCE)
    good_before = scores(good_paths)
    bank = head.memory_bank.bank.detach().cpu()
    before = len(bank)
    with torch.no_grad():
        if radius is None:
            radius = float(torch.quantile(bank_distances(model, calibration_paths, bank, batch_size, images),
                                          radius_quantile))
        guard = reach = None
        if guarding:
            guard = guard_patches(model, defect_paths, bank, guard_top, batch_size, images)
            reach = guard_keep * nearest_distance(guard, bank)
        found = reviewed_candidates(model, good_paths, bank, radius, augment, guard, reach, batch_size, images)
        candidates, owner, guarded = found.rows, found.owner, found.guarded
        added = farthest_first(candidates, bank, radius)
        grown = torch.cat([bank, candidates[added]]) if len(added) else bank
    cap = int(getattr(model.config, "knn_max_patches", 0) or 0)
    reselected = cap > 0 and len(grown) > cap
    if reselected:
        logger.warning("memory bank would hold %d patches, over its cap of %d: re-selecting %d by greedy "
                       "coreset over the old bank and the reviewed patches", len(grown), cap, cap)
        grown = grown[greedy_coreset(grown, cap, seed)].contiguous()
    device = next(model.parameters()).device
    head.set_memory_bank(MemoryBank(grown, pool=model.config.knn_pool).to(device), head.knn_weight)
    chosen = None
    if reweight:
        if model.config.score != "both":
            raise RefitError(f"re-weighting needs a --score both model (this one: --score {model.config.score})")
        new_rows, new_owner = candidates[added], owner[added]
        own_out = [torch.cat([bank, new_rows[new_owner != i]]) for i in range(len(good_paths))]
        reviewed_maps = maps(good_paths, own_out)
        held_maps = maps(calibration_paths)
        good_maps = tuple(np.concatenate([a, b]) for a, b in zip(reviewed_maps, held_maps))
        defect_maps = maps(defect_paths) if defect_paths else \
            (np.zeros((0,) + good_maps[0].shape[1:]),) * 2
        chosen = choose_mrkd_share(good_maps, defect_maps, len(good_paths), share_grid)
        if chosen.moved:
            apply_mrkd_share(model, chosen.share)
        logger.info("re-weighting: MRKD share %.2f (%s)", chosen.share, chosen.reason)
    good_scores = scores(calibration_paths)
    calibration = calibration_from_scores(good_scores, quantile, method=method, confidence=confidence,
                                          previous_threshold=previous.threshold if previous else None,
                                          source=f"refit: {len(calibration_paths)} held-out good image(s)")
    calibration = dataclasses.replace(calibration, ignore_mask=ignore_mask.sha256 if ignore_mask is not None else None)
    model.calibration = calibration.to_dict()
    defect_scores = scores(defect_paths) if defect_paths else np.zeros(0)
    missed = [str(p) for p, s in zip(defect_paths, defect_scores) if not s >= calibration.threshold]
    good_after = scores(good_paths)
    still = [str(p) for p, s in zip(good_paths, good_after) if s >= calibration.threshold]
    return RefitResult(bank_before=before, bank_after=len(grown), added_patches=int(len(added)),
                       reselected=reselected, radius=float(radius),
                       threshold_before=previous.threshold if previous else None,
                       threshold_after=calibration.threshold, calibration=calibration.to_dict(),
                       good_scores_before=[float(s) for s in good_before],
                       good_scores_after=[float(s) for s in good_after],
                       defect_scores_after=[float(s) for s in defect_scores], defects_missed=missed,
                       reviewed_still_flagged=still,
                       seconds=time.perf_counter() - started, guarded_patches=guarded, reweight=chosen)


def check_ignore_mask(mask: Optional[IgnoreMask], reviewed: ReviewedImages, parent: Optional[Calibration],
                      echo: Callable[[str], None]) -> None:
    """Refuse (RefitError) a refit without the ignore mask its reviewed alarms were judged under (their
    events record it), or the parent's threshold was set under: set on whole images, the threshold would
    take in what the mask leaves out and sit above the camera's masked scores, so defects the camera
    flags now would pass. A given mask that is none of theirs is warned about (a mask drawn again)."""
    recorded = reviewed.ignore_masks()
    parent_mask = parent.ignore_mask if parent is not None else None
    if mask is None:
        if recorded:
            sha256, cameras = next(iter(recorded.items()))
            others = f" and {len(recorded) - 1} other mask(s)" if len(recorded) > 1 else ""
            raise RefitError(f"the reviewed alarms were judged under an ignore mask (sha256 {sha256[:12]}, camera "
                             f"{', '.join(cameras)}{others}): give it as --ignore-mask MASK; set on whole images the "
                             f"threshold would take in what the mask leaves out and let defects the camera flags now "
                             f"pass; nothing written")
        if parent_mask:
            raise RefitError(f"the parent's threshold was set under an ignore mask (sha256 {parent_mask[:12]}): give "
                             f"it as --ignore-mask MASK; set on whole images the threshold would take in what the "
                             f"mask leaves out and let defects the camera flags now pass; nothing written")
        return
    known = list(recorded) + ([parent_mask] if parent_mask and parent_mask not in recorded else [])
    if known and mask.sha256 not in known:
        echo(warning_line(f"--ignore-mask {mask.path} (sha256 {mask.sha256[:12]}) is not the mask the reviewed alarms "
                          f"or the parent's threshold were judged under (sha256 "
                          f"{', '.join(s[:12] for s in known)}); the new threshold is set under {mask.path}, and "
                          f"`mrkd run` warns about a camera judging under another"))


def _distinct_pixels(paths: Sequence[str], pixels: Mapping[str, str], echo: Callable[[str], None]) -> List[str]:
    """``paths`` with one file per decoded image: OK samples of a line that saw the same frame twice (a
    looped clip, a restart) would each weigh in the threshold's quantile."""
    first: dict = {}
    for path in paths:
        first.setdefault(pixels[path], path)
    if len(first) < len(paths):
        echo(warning_line(f"{len(paths) - len(first)} of the --good images have the same pixels as another --good "
                          f"image; each is counted once in the threshold"))
    return list(first.values())


def _moved_hint(skipped: Sequence["SkippedLabel"], evidence) -> str:
    """What to do when labels' images are gone from their paths and no --evidence was given: the evidence
    folder was most likely moved (archived) on its own."""
    if evidence is not None or not any(skip.image_gone for skip in skipped):
        return ""
    return "; if the evidence folder was moved, give --evidence DIR (its new place: the images are taken by sha256)"


def _other_log_hint(skipped: Sequence["SkippedLabel"]) -> str:
    """What to do when labels were skipped because --events named another log than the one they record
    (a label file kept across a new day's events log)."""
    logs = list(dict.fromkeys(skip.other_log for skip in skipped if skip.other_log))
    if not logs:
        return ""
    count = sum(1 for skip in skipped if skip.other_log)
    return (f"; {count} of them record{'s' if count == 1 else ''} another events log ({', '.join(logs)}): leave out "
            f"--events to check each label against the log it records")


def _threshold_text(threshold: Optional[float]) -> str:
    """A threshold as the refit's lines print it (a parent without a calibration has none)."""
    return "none" if threshold is None else f"{threshold:.6g}"


LISTED_IMAGES = 20      # images named one per line by refit_checkpoint; past that a count


def image_listing(paths: Sequence[str], scores: Sequence[float], chosen: set, relation: str,
                  threshold: float, limit: int = LISTED_IMAGES) -> List[str]:
    """One line per image of ``paths`` in ``chosen``, with its score against the threshold (the
    operator checks each one), at most ``limit`` of them and then how many more."""
    rows = [(str(p), float(s)) for p, s in zip(paths, scores) if str(p) in chosen]
    lines = [f"  {path}: score {score:.6g} {relation} threshold {threshold:.6g}" for path, score in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"  ... and {len(rows) - limit} more")
    return lines


# ---------------------------------------------------------------- files

@dataclass(frozen=True)
class SkippedLabel:
    """A label refit leaves out, and why (its image is missing or changed, its event unknown)."""
    labels_path: str
    event_id: str
    label: str                         # GOOD or DEFECT
    reason: str
    camera: str = ""                   # whose image of the event (a part has one per camera)
    image_gone: bool = False           # its image is not where it was labelled (the folder moved?)
    other_log: str = ""                # the events log it records, when --events named another one

    def __str__(self) -> str:
        camera = f" camera {self.camera}" if self.camera else ""
        return f"{self.labels_path}: event {self.event_id}{camera} ({self.label}) skipped: {self.reason}"


@dataclass(frozen=True)
class ReviewedImages:
    good: Tuple[str, ...]
    defect: Tuple[str, ...]
    skipped: Tuple[SkippedLabel, ...]
    # (camera, the sha256 of the ignore mask its score was taken under, None: whole image) of each image
    # whose event the log holds: the mask the refit's scores must be taken under too
    judged_under: Tuple[Tuple[str, Optional[str]], ...] = ()

    def ignore_masks(self) -> dict:
        """{mask sha256: the cameras that judged under it} of the reviewed images' events."""
        masks: dict = {}
        for camera, sha256 in self.judged_under:
            if sha256:
                masks.setdefault(sha256, [])
                if camera not in masks[sha256]:
                    masks[sha256].append(camera)
        return masks


def reviewed_images(labels_path, events: Optional[Mapping[str, dict]] = None, events_path=None,
                    warn: Callable[[str], None] = logger.warning,
                    labels: Optional[Sequence[ReviewLabel]] = None,
                    hashes: Optional[FileHashes] = None, evidence_dir=None) -> ReviewedImages:
    """The labels' images, each checked: present, and with the sha256 the operator saw. A label whose
    image is missing or changed, or whose event is not in its events log or recorded another sha256 for
    its evidence, is skipped with a warning; the rest is read by runtime/review.py's rules (last label
    of an image wins: each camera's image of a part is one, paths by label_image). Its events log:
    ``events`` (event id -> event, from ``events_path``) when given, for every label; else the one the
    label records (schema 2 and later), when it is still there. Labels that record none (schema 1), or
    whose log is gone or was replaced, are said in one line per log and go unchecked, as before there
    was a record. ``labels``: the file's labels as the caller read them (refit: check_refit_args' one
    read); default read here. ``hashes``: the caller's FileHashes (refit's, which the lineage reads too):
    a file many labels name is read once. ``evidence_dir``: where a label's image that is not at its
    path is looked for too (label_image; refit's --evidence)."""
    labels_path = Path(labels_path)
    hashes = hashes if hashes is not None else FileHashes()
    latest = latest_labels(read_labels(labels_path) if labels is None else list(labels), str(labels_path))
    logs = recorded_logs(list(latest.values()), labels_path) if events is None else {}
    if events is None:
        for note in _unchecked_notes(list(latest.values()), logs, labels_path):
            warn(note)
    # an image is counted once by its bytes: two events of one frame (one evidence file each) are one image
    good, defect, skipped, judged_under = {}, {}, [], []
    for label in latest.values():
        known, log_path, which = events, events_path, "the events log"
        found = logs.get(label.log_ref) if label.log_ref is not None else None
        if found is not None and found.events is not None:
            known, log_path, which = found.events, found.path, f"the events log it was labelled from ({found.path})"
        image = label_image(label, labels_path, log_path, evidence_dir, hashes)
        event = known.get(label.event_id) if known is not None else None
        # the event as the labelled camera's alarm: a camera it lacks, or none of a part several flagged,
        # is no image of the event, so its file could not be checked against what the run recorded
        one, why = one_camera_event(event, label.camera or None) if event is not None else (None, "")
        reason = None
        if known is not None and event is None:
            reason = f"is not in {which}"
        elif event is not None and one is None:
            reason = f"names no image of its event in {which} ({why})"
        elif image is None:
            reason = "names no image"
        elif not image.is_file():
            reason = f"image {image} no longer exists"
        elif hashes.sha256(image) != label.image_sha256:
            reason = f"image {image} changed since it was reviewed (sha256 differs)"
        elif one is not None and evidence_changed(one, image, hashes):
            reason = f"image {image} is not the evidence the run recorded (sha256 differs from the event's)"
        if reason:
            skipped.append(SkippedLabel(str(labels_path), label.event_id, label.label, reason, label.camera,
                                        image_gone=image is not None and not image.is_file(),
                                        other_log=_other_log(label, events_path) if event is None else ""))
            warn(str(skipped[-1]))
            continue
        (good if label.label == GOOD else defect).setdefault(label.image_sha256, str(image))
        if one is not None:
            mask = one.get("ignore_mask_sha256")
            judged_under.append((str(one.get("camera") or ""), mask if isinstance(mask, str) and mask else None))
    return ReviewedImages(tuple(good.values()), tuple(defect.values()), tuple(skipped), tuple(judged_under))


def _other_log(label: ReviewLabel, events_path) -> str:
    """The events log ``label`` records when the refit was given another one as --events ("")."""
    if events_path is None or label.log_ref is None:
        return ""
    return "" if os.path.abspath(label.log_ref.path) == os.path.abspath(events_path) else label.log_ref.path


def _unchecked_notes(labels: Sequence[ReviewLabel], logs: Mapping[EventsLogRef, RecordedLog],
                     labels_path: Path) -> List[str]:
    """One line for the labels that record no events log, and one per recorded log that is gone or was
    replaced: their event ids (and evidence hashes) go unchecked."""
    notes = []
    unrecorded = sum(1 for label in labels if label.log_ref is None)
    if unrecorded:
        notes.append(f"note: the event ids of {unrecorded} label(s) of {labels_path} were not checked (they record no "
                     f"events log: label schema 1, written by an older mrkd); give --events LOG, the "
                     f"log of `mrkd run --events`, to skip labels of events that are not in it")
    for ref, found in logs.items():
        if found.events is None:
            count = sum(1 for label in labels if label.log_ref == ref)
            notes.append(f"note: the events log of {count} label(s) of {labels_path}, {ref.path} (first event "
                         f"{ref.first_event}), {found.problem}; their event ids and evidence hashes were not checked "
                         f"(give --events LOG to check them)")
    return notes


def _unreadable(exc: Exception, good, held_out: Sequence[str]) -> Exception:
    """An image refit cannot read, named with where it came from (the loader's hint names `mrkd
    train`'s option, which refit has not: the file has to go)."""
    cause = exc if isinstance(exc, ImageReadError) else exc.__cause__
    if not isinstance(cause, ImageReadError):
        return exc
    source = (f"one of --good {good}: take it out" if cause.path in {str(p) for p in held_out}
              else "a reviewed image of the label file")
    return RefitError(f"cannot read image {cause.path!r}: {cause.reason} ({source})")


def leftover_staging(out_dir: Path) -> List[Path]:
    """Staging folders of ``out_dir`` that an earlier refit left (only SIGKILL or a power cut skips
    the clean-up), sorted."""
    try:
        return sorted(p for p in out_dir.parent.glob(f".{out_dir.name}.*") if p.is_dir())
    except OSError:
        return []


def refit_checkpoint(model_path, labels_path, good, out_dir=None, *, force: bool = False, export: bool = True,
                     events=None, quantile: Optional[float] = None, method: Optional[str] = None,
                     batch_size: int = 8, guard_keep: float = GUARD_KEEP, reweight: bool = False,
                     radius_quantile: float = RADIUS_QUANTILE, augment: Sequence[str] = (),
                     echo: Callable[[str], None] = print, checked: Optional[CheckedRefitArgs] = None,
                     evidence=None, ignore_mask=None) -> RefitResult:
    """Refit the checkpoint ``model_path`` from the labels at ``labels_path``; calibrate on the good
    images ``good`` (a folder, glob or list). Writes ``out_dir`` (default: beside the model,
    ``<stem>.v<N>``), which must not exist: model.ckpt (+ model.onnx and its sidecar with ``export``),
    built in a temporary folder and renamed into place at the end. ``events``: an events log whose
    ids the labels must name and whose evidence sha256 their images must have (default: each label's
    own recorded log, reviewed_images). ``evidence``: an evidence folder where the labels' images are
    looked for when they are not at their paths (moved on its own: reviewed_images). ``ignore_mask``: a
    mask image's path (or an IgnoreMask) the scores are taken under (refit_model; check_ignore_mask refuses
    a refit without the mask its reviewed alarms were judged under). ``radius_quantile``:
    refit_model's growth stop; ``augment``: its augmented candidates. Raises RefitError when a
    confirmed defect is no longer flagged, or a label "defect confirmed" cannot be checked (its image is
    missing or changed), unless ``force``. ``checked``: check_refit_args' result for these arguments
    when the caller ran it (`mrkd refit`, before importing torch); else it runs here, first. Either way
    the label file is read once, there: the page may append to it while the refit runs, and the
    lineage's hash must name the labels this version was made from, not the file at the end."""
    started = time.perf_counter()
    from mrkd.train.checkpoint import checkpoint_dict, model_from_dict, read_checkpoint, save_checkpoint
    from mrkd.train.data import DataError, scan_folder
    model_path, labels_path = Path(model_path), Path(labels_path)
    # an exported model, an unreadable label file or events log in its place, an existing new folder:
    # refused before the checkpoint's seconds of loading
    if checked is None:
        checked = check_refit_args(model_path, labels_path, out_dir)
    elif not checked.same(model_path, labels_path, out_dir):
        raise ValueError(f"checked= holds the checks of {checked.model_path}, {checked.labels_path}, "
                         f"{checked.out_dir}, not of these arguments")
    data = read_checkpoint(model_path)
    model = model_from_dict(data, source=str(model_path))
    known = None
    if events is not None:
        try:
            known = {str(e["event_id"]): e for e in read_review_events(events)}
        except OSError as exc:
            raise RefitError(f"{events}: cannot read the events log ({exc})") from exc
    # without --events each label is checked against the log it records; reviewed_images says what is not
    # each image file hashed once (however many labels name it): the labels' checks, the lineage
    hashes = FileHashes()
    reviewed = reviewed_images(labels_path, known, events, warn=echo, labels=checked.labels, hashes=hashes,
                               evidence_dir=evidence)
    unchecked = [skip for skip in reviewed.skipped if skip.label == DEFECT]
    if unchecked:      # the confirmed-defect check is the refit's safety net: without the image it is blind
        message = (f"{len(unchecked)} image(s) marked '{DEFECT}' cannot be checked against the new model "
                   f"(listed above)")
        if not force:
            raise RefitError(message + "; nothing written" + _moved_hint(unchecked, evidence) +
                             _other_log_hint(unchecked) + " (--force refits without them)")
        echo(warning_line(f"{message}; refit without them (--force)"))
    mask = ignore_mask if ignore_mask is None or isinstance(ignore_mask, IgnoreMask) else load_ignore_mask(ignore_mask)
    check_ignore_mask(mask, reviewed, Calibration.of(model.calibration, f"{model_path}: calibration"), echo)
    if not reviewed.good:
        skipped_good = [skip for skip in reviewed.skipped if skip.label == GOOD]
        raise RefitError(f"{labels_path}: no usable image marked good ({len(skipped_good)} marked good"
                         f"{' and skipped' if skipped_good else ''}, {len(reviewed.defect)} confirmed defect"
                         f"{'' if len(reviewed.defect) == 1 else 's'}); nothing to refit: a refit adds images marked "
                         f"good (false alarms, `mrkd review --as good`) to the memory bank"
                         f"{_moved_hint(skipped_good, evidence)}{_other_log_hint(skipped_good)}")
    calibration_paths = list(good) if isinstance(good, (list, tuple)) else [str(p) for p in scan_folder(good)]
    # images are compared by their pixels (the module's notes); each file is decoded once, here: the
    # refit's passes over it read the square kept from that decode
    images = DecodedImages.of(model)
    try:
        reviewed_pixels = {p: images.pixels_sha256(p) for p in reviewed.good + reviewed.defect}
        calibration_pixels = {p: images.pixels_sha256(p) for p in calibration_paths}
    except ImageReadError as exc:
        raise _unreadable(exc, good, calibration_paths) from exc
    taken = {image.pixels_sha256: image for image in lineage_bank_images(data.get(LINEAGE_KEY), model_path, echo,
                                                                          images.pixels_sha256, hashes.sha256)}
    new_good: dict = {}           # pixels -> path: one image saved twice is offered once
    already_in_bank = []
    for path in reviewed.good:
        if reviewed_pixels[path] in taken:
            already_in_bank.append(path)
        else:
            new_good.setdefault(reviewed_pixels[path], path)
    if not new_good:
        versions = sorted({taken[reviewed_pixels[p]].version for p in already_in_bank})
        raise NothingNewToRefit(
            f"{labels_path}: the {len(reviewed.good)} reviewed good image(s) are all already in the memory bank "
            f"(taken by version {', '.join(map(str, versions))} of {model_path}'s lineage); nothing new to refit, "
            f"nothing written")
    # a confirmed defect among the good images (the alarm evidence folder given for its ok/ samples) would
    # set the threshold above it; the defect check would then blame the bank: refused, whatever --force
    defect_pixels = {reviewed_pixels[p] for p in reviewed.defect}
    defects_given = [p for p in calibration_paths if calibration_pixels[p] in defect_pixels]
    if defects_given:
        raise RefitError(f"{good}: {len(defects_given)} of the --good images (e.g. {defects_given[0]}) are marked "
                         f"'{DEFECT}' in {labels_path}; the threshold is set on good parts only: give held-out "
                         f"good images (e.g. the line's OK samples, <evidence>/<camera>/ok), not alarm evidence")
    # an image of the bank scores ~0 against it: calibrated on, it would pull the threshold down
    bank_pixels = set(taken) | {reviewed_pixels[p] for p in reviewed.good}
    held_out = [p for p in calibration_paths if calibration_pixels[p] not in bank_pixels]
    if len(held_out) < len(calibration_paths):
        echo(warning_line(f"{len(calibration_paths) - len(held_out)} of the --good images are images of the memory "
                          f"bank (the same pixels as an image reviewed as good, here or by an earlier version); they "
                          f"are left out of the threshold"))
    if not held_out:
        raise RefitError(f"{good}: no held-out good image left to set the threshold on")
    held_out = _distinct_pixels(held_out, calibration_pixels, echo)
    offered = tuple(new_good.values())
    version = parent_version(data) + 1
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(model_path, version)
    check_new_out_dir(out_dir)        # again (the default's version is known now): before the minutes of work
    try:
        result = refit_model(model, offered, held_out, reviewed.defect, quantile=quantile, method=method,
                             batch_size=batch_size, guard_keep=guard_keep, reweight=reweight,
                             radius_quantile=radius_quantile, augment=augment, images=images, ignore_mask=mask)
    except DataError as exc:
        raise _unreadable(exc, good, held_out) from exc
    result.already_in_bank = tuple(already_in_bank)
    skipped = f", {len(already_in_bank)} skipped as already in the bank" if already_in_bank else ""
    echo(f"memory bank {result.bank_before} -> {result.bank_after} patches ({result.added_patches} added from "
         f"{len(offered)} reviewed good image(s){skipped}, radius {result.radius:.4g}, {result.guarded_patches} "
         f"kept out by the defect guard"
         f"{', re-selected within the cap' if result.reselected else ''}); threshold "
         f"{_threshold_text(result.threshold_before)} -> {result.threshold_after:.6g} on {len(held_out)} held-out "
         f"good image(s){f' under ignore mask {mask.path}' if mask is not None else ''}")
    if result.reweight is not None:
        echo(f"re-weighting: MRKD share of the map {result.reweight.share:g} "
             f"({'moved' if result.reweight.moved else 'unchanged'}: {result.reweight.reason})")
    if result.reviewed_still_flagged:
        # the patches that raise them lie near a confirmed defect's (the guard) or are no rarer than the
        # growth's stop: the operator should know the alarm will come again
        echo(f"note: {len(result.reviewed_still_flagged)} of {len(offered)} reviewed good image(s) still score "
             f"at or above the new threshold; the refit model will flag them again:")
        for line in image_listing(offered, result.good_scores_after, set(result.reviewed_still_flagged),
                                  ">=", result.threshold_after):
            echo(line)
    if reviewed.defect and not result.defects_missed:
        # said when the check passes too: the operator sees it ran, and by how much the closest one clears it
        echo(f"confirmed defects: {len(reviewed.defect)} of {len(reviewed.defect)} still flagged (lowest score "
             f"{min(result.defect_scores_after):.6g} >= threshold {result.threshold_after:.6g})")
    if result.defects_missed:
        for line in image_listing(reviewed.defect, result.defect_scores_after, set(result.defects_missed), "<",
                                  result.threshold_after):
            echo(line)
        message = (f"{len(result.defects_missed)} of {len(reviewed.defect)} confirmed defect(s) no longer flagged "
                   f"by the refit model (listed above)")
        if not force:
            raise RefitError(message + "; nothing written (--force writes it anyway)")
        echo(warning_line(f"{message}; written anyway (--force)"))
    lineage = Lineage(version=version, parent_sha256=file_sha256(model_path),
                      labels_sha256=hashlib.sha256(checked.labels_data).hexdigest(), parent=str(model_path),
                      labels=str(labels_path), good_images=offered, defect_images=reviewed.defect,
                      bank_before=result.bank_before, bank_after=result.bank_after,
                      created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      reweight=result.reweight.to_dict() if result.reweight is not None else None,
                      augment=augment_names(augment),
                      bank_images=tuple(taken.values()) + tuple(
                          BankImage(pixels, hashes.sha256(path), path, version) for pixels, path in new_good.items()))
    result.lineage = lineage.to_dict()
    kept = {k: v for k, v in data.items() if k not in checkpoint_dict(model) and k not in ("train_state",)}
    kept[LINEAGE_KEY] = result.lineage
    for leftover in leftover_staging(out_dir):
        echo(warning_line(f"{leftover} looks like the unfinished version of a refit that was killed (or one "
                          f"running now); it is not used: remove it once no refit runs"))
    with contextlib.ExitStack() as stack:
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            staging = stack.enter_context(temporary_folder(out_dir.parent, f".{out_dir.name}."))
        except OSError as exc:        # its message names the staging folder, which the user never typed
            raise RefitError(f"{out_dir}: cannot be created ({exc.strerror or exc}); nothing written") from exc
        try:
            save_checkpoint(model.cpu(), staging / CHECKPOINT_NAME, extra=kept)
            if export:       # the checkpoint carries the lineage; the export puts it into the sidecars
                from mrkd.export.pipeline import export_checkpoint
                # its lines name the files where they will be once the folder is renamed into place
                export_checkpoint(staging / CHECKPOINT_NAME, staging,
                                  echo=lambda text: echo(text.replace(str(staging), str(out_dir))))
            # mkdtemp's folder is private (0700); the version is a folder like any other (the line's account
            # reads it)
            os.chmod(staging, 0o777 & ~current_umask())
            try:
                os.rename(staging, out_dir)       # atomic; fails when out_dir appeared meanwhile
            except OSError as exc:
                raise RefitError(f"{out_dir}: cannot be created ({exc.strerror or exc}); nothing written") from exc
            sync_folder(out_dir.parent)           # the rename too reaches the disk before "written" is said
        except RefitError:
            raise
        except (OSError, MrkdError) as exc:
            # a full disk or an export error names a file in the staging folder: say where it was going
            raise RefitError(f"{out_dir}: cannot be written ("
                             f"{one_line(exc).replace(str(staging), str(out_dir))}); nothing written") from exc
    result.files = {p.name: str(out_dir / p.name) for p in sorted(out_dir.iterdir())}
    result.wall_seconds = time.perf_counter() - started
    return result


def sidecar_lineage(lineage) -> dict:
    """What an export's sidecar (``extra``) carries of a checkpoint's lineage: version, parent and
    label file sha256 ({} for a checkpoint that is no refit)."""
    if not isinstance(lineage, dict):
        return {}
    return {"model_version": lineage.get("version"), "parent_sha256": lineage.get("parent_sha256"),
            "labels_sha256": lineage.get("labels_sha256")}
