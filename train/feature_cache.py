"""The teacher features one training step needs, computed as cheaply as the result allows.

A step needs the frozen teacher's features of two images: the clean image (the target) and the
image-level-masked one (the student's input). Two facts make most of that work avoidable:

* the teacher is frozen and the clean image is never augmented (TrainDataset decodes and resizes it
  once; only the student's input gets the per-epoch patch swap), so the clean image's features are
  the same in every epoch: :class:`CleanFeatureCache` computes them once, before the first epoch, and
  each step looks its batch up by index. The masked image changes every epoch and is not cached;
  without image-level masking (``ilm=False``) the student's input IS the clean image, so a step then
  runs no teacher pass at all;
* :class:`mrkd.train.teachers.FastTeacher` runs the remaining pass with BatchNorm folded into the
  convolutions and channels-last weights.

Memory: one image's features take ``4 × Σ C·h·w`` bytes in FP32 (Lite0 at 256 px: 0.64 MiB;
WideResNet50-2: 7 MiB). :func:`plan_cache` keeps FP32 when the whole set fits the budget, else FP16
(half the bytes, ~5e-4 relative rounding of the target), else no cache.

``TeacherFeatures(..., cache="off", fast_teacher=False)`` is the trainer's original path, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from mrkd.console import warn_for_all_ranks
from mrkd.errors import SettingError
from mrkd.runtime.preprocess import normalize
from mrkd.train.teachers import FastTeacher

CACHE_MODES = ("auto", "fp32", "fp16", "off")
DEFAULT_CACHE_MB = 2048
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass(frozen=True)
class CachePlan:
    """What the cache will hold, and why."""

    mode: str                  # "fp32" | "fp16" | "off"
    bytes_per_image_fp32: int
    images: int
    budget_bytes: int
    reason: str

    @property
    def total_bytes(self) -> int:
        per_image = {"fp32": self.bytes_per_image_fp32, "fp16": self.bytes_per_image_fp32 // 2}.get(self.mode, 0)
        return per_image * self.images


def plan_cache(requested: str, bytes_per_image_fp32: int, images: int, budget_mb: float) -> CachePlan:
    """Choose the cache's precision: ``requested`` "fp32"/"fp16" if it fits ``budget_mb``, "auto" the
    most precise that fits; "off" (or nothing fits) means every step runs the teacher on the clean image."""
    if requested not in CACHE_MODES:
        raise SettingError(f"feature cache must be one of {CACHE_MODES}, got {requested!r}")
    budget = int(budget_mb * 2 ** 20)
    need = {"fp32": bytes_per_image_fp32 * images, "fp16": bytes_per_image_fp32 // 2 * images}

    def plan(mode: str, reason: str) -> CachePlan:
        return CachePlan(mode, bytes_per_image_fp32, images, budget, reason)

    if requested == "off":
        return plan("off", "feature cache turned off")
    for mode in (("fp32", "fp16") if requested == "auto" else (requested,)):
        if need[mode] <= budget:
            return plan(mode, f"{images} images x {need[mode] / images / 2 ** 20:.2f} MiB ({mode}) = "
                              f"{need[mode] / 2 ** 20:.0f} MiB <= budget {budget_mb:g} MiB")
    smallest = min(need[m] for m in need if requested in ("auto", m))
    # Three significant digits: a small set's need is well under 1 MiB, and "0 MiB over a 0 MiB budget"
    # reads as a contradiction.
    return plan("off", f"the clean images' features need {smallest / 2 ** 20:.3g} MiB, over the "
                       f"{budget_mb:g} MiB budget (raise it with --feature-cache-mb)")


class CleanFeatureCache:
    """The teacher's features of every clean training image, indexed like the dataset."""

    def __init__(self, per_scale: Sequence[torch.Tensor]):
        self.per_scale = list(per_scale)            # one N×C×h×w tensor per scale, in the cache's dtype

    def __len__(self) -> int:
        return int(self.per_scale[0].shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.per_scale)

    def lookup(self, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> List[torch.Tensor]:
        """The features of the images at ``indices`` (a 1-D tensor), as ``dtype``."""
        indices = indices.to(self.per_scale[0].device)
        return [t.index_select(0, indices).to(dtype) for t in self.per_scale]

    @classmethod
    def build(cls, teacher, dataset, mode: str, batch_size: int, device: torch.device,
              autocast: bool = False) -> "CleanFeatureCache":
        """Run ``teacher`` once over every clean image of ``dataset`` (a TrainDataset) in order."""
        dtype = _DTYPES[mode]
        per_scale: Optional[List[torch.Tensor]] = None
        for start in range(0, len(dataset), batch_size):
            indices = range(start, min(start + batch_size, len(dataset)))
            clean = torch.stack([clean_tensor(dataset, i) for i in indices]).to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=autocast):
                features = teacher(clean)
            if per_scale is None:
                per_scale = [torch.empty((len(dataset),) + tuple(f.shape[1:]), dtype=dtype, device=device)
                             for f in features]
            for stored, feature in zip(per_scale, features):
                stored[start:start + len(indices)] = feature.to(dtype)
        return cls(per_scale)


def clean_tensor(dataset, index: int) -> torch.Tensor:
    """The normalised clean image ``index`` of a TrainDataset, exactly as its __getitem__ gives it."""
    return torch.from_numpy(normalize(dataset.images[index], dataset.mean, dataset.std))


class IndexedStudentInputs(Dataset):
    """A TrainDataset's (index, student input) pairs: with the cache, the clean image is only an index.

    It draws the same augmentation as the dataset's own __getitem__ (same calls, same order), so a
    seeded loader gives the same student inputs on either path.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[int, torch.Tensor]:
        _, student, _ = self.dataset.augmented_pair(index)
        return index, torch.from_numpy(normalize(student, self.dataset.mean, self.dataset.std))


def features_bytes_per_image(teacher, image_size: int, device: torch.device) -> int:
    """FP32 bytes of one image's teacher features at ``image_size`` (one forward of a blank image)."""
    with torch.no_grad():
        features = teacher(torch.zeros(1, 3, image_size, image_size, device=device))
    return sum(f[0].numel() * 4 for f in features)


class TeacherFeatures:
    """(target, source) teacher features for one training batch.

    Batches are ``(clean, student_input)`` tensors, or with a cache ``(indices, student_input)``:
    :meth:`dataset` says which. ``fast_teacher`` runs the teacher through a FastTeacher copy.
    """

    def __init__(self, model, dataset, *, ilm: bool, cache: str = "auto", cache_mb: float = DEFAULT_CACHE_MB,
                 fast_teacher: bool = True, batch_size: int = 16, device: Optional[torch.device] = None,
                 autocast: bool = False):
        self.ilm = ilm
        self.device = device or next(model.teacher.parameters()).device
        self.teacher = FastTeacher(model.teacher) if fast_teacher else model.teacher_features
        self.fast_teacher = fast_teacher
        self.plan = plan_cache(cache, features_bytes_per_image(self.teacher, dataset.image_size, self.device)
                               if cache != "off" else 0, len(dataset), cache_mb)
        if cache != "off" and self.plan.mode == "off":
            warn_for_all_ranks(f"feature cache off: {self.plan.reason}; every step runs the teacher twice")
        self.cache = None if self.plan.mode == "off" else CleanFeatureCache.build(
            self.teacher, dataset, self.plan.mode, batch_size, self.device, autocast)
        self._dataset = IndexedStudentInputs(dataset) if self.cache is not None else dataset

    def dataset(self) -> Dataset:
        """What the DataLoader should load from."""
        return self._dataset

    def __call__(self, batch) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        first, student_input = batch
        if self.cache is not None:
            target = self.cache.lookup(first, torch.get_autocast_dtype(self.device.type)
                                       if torch.is_autocast_enabled(self.device.type) else torch.float32)
        else:
            target = self.teacher(first.to(self.device, non_blocking=True))
        if not self.ilm:
            return target, target
        return target, self.teacher(student_input.to(self.device, non_blocking=True))

    def describe(self) -> dict:
        """For the run's summary: which speed-ups were used."""
        return {"fast_teacher": self.fast_teacher, "feature_cache": self.plan.mode,
                "feature_cache_mib": round(self.plan.total_bytes / 2 ** 20, 1), "reason": self.plan.reason}
