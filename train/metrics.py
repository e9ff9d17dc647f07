"""Evaluation metrics for anomaly detection: AUROC, AUPRO, thresholds and F1.

numpy/scipy only (no torch), so the runtime tools and the benchmarks can score arrays too.

Conventions used everywhere here:
* a higher score means "more anomalous"; a sample is called anomalous when ``score >= threshold``
  (image level) and a pixel is flagged when ``map > threshold`` (the official PRO rule);
* ``labels`` are 0 (good) / 1 (defect); ``masks`` are N×H×W bool or 0/1, ``maps`` N×H×W float.

AUPRO follows the official MRKD/RD4AD ``compute_pro`` (test.py) exactly: thresholds
``np.arange(min, max, (max - min) / num_thresholds)`` over the maps given, a pixel is positive when
``map > threshold``, PRO is the mean over every connected defect region (8-connectivity, as
``skimage.measure.label`` for 2-D) of the fraction of its pixels flagged, FPR is the fraction of
all defect-free pixels flagged, points with FPR < max_fpr are kept, FPR is divided by the largest
kept FPR and the area is the trapezoid rule. The official code loops over thresholds × regions
in Python; here each pixel is placed once on the threshold grid and every threshold's counts for
every region come from one bincount and a cumulative sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from mrkd.deps import require
from mrkd.errors import MrkdError
from mrkd.runtime.line.alarms import is_anomalous
# The threshold rules live with the Calibration record (numpy only, shared with the runtime).
from mrkd.runtime.calibration import (counts_at_each_threshold, f1_optimal_threshold,  # noqa: F401
                                     threshold_at_quantile)

class MetricInputError(MrkdError, ValueError):
    """The test data cannot give this metric (one class only, a defect image with an empty mask, mask
    values other than 0/1): a property of the user's data set, reported in one line. Shape mismatches
    between arguments stay plain ValueErrors (a caller's bug)."""


# 8-connectivity inside each image, no connection between images of a stack: one label call
# numbers the regions of a whole N×H×W set.
_STACK_8_CONNECTIVITY = np.zeros((3, 3, 3), dtype=bool)
_STACK_8_CONNECTIVITY[1] = True


# ----------------------------------------------------------------------------- validation

def _binary_labels(labels, name: str = "labels") -> np.ndarray:
    labels = np.asarray(labels).ravel()
    if labels.size == 0:
        raise ValueError(f"{name} is empty")
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        raise ValueError(f"{name} must be 0/1 (or bool); found {labels[bad][0]!r} at index "
                         f"{int(np.flatnonzero(bad)[0])}")
    return labels.astype(bool)


def _finite_scores(scores, name: str = "scores") -> np.ndarray:
    scores = np.asarray(scores)
    if not np.issubdtype(scores.dtype, np.number) or np.iscomplexobj(scores):
        raise ValueError(f"{name} must be real numbers, got dtype {scores.dtype}")
    finite = np.isfinite(scores)
    if not finite.all():
        raise ValueError(f"{name} contains NaN/inf at flat index {int(np.flatnonzero(~finite)[0])}")
    return scores


def _masks_and_maps(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """Check N×H×W masks (bool or 0/1) and maps of the same shape; return (bool masks, maps)."""
    masks = np.asarray(masks)
    maps = _finite_scores(maps, "maps")
    if masks.ndim != 3 or maps.ndim != 3:
        raise ValueError(f"masks and maps must be N×H×W, got masks {masks.shape} and maps {maps.shape}")
    if masks.shape != maps.shape:
        raise ValueError(f"masks shape {masks.shape} differs from maps shape {maps.shape}")
    if masks.dtype != bool:
        bad = (masks != 0) & (masks != 1)
        if bad.any():
            n, y, x = np.argwhere(bad)[0]
            raise MetricInputError(f"masks must be 0/1 (or bool); image {n} has {masks[n, y, x]!r} at "
                                   f"(y={y}, x={x}) — threshold soft masks first (official: > 0.5)")
        masks = masks.astype(bool)
    return masks, maps


def _require_both_classes(labels: np.ndarray, name: str) -> None:
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        raise MetricInputError(f"AUROC needs both classes in {name}: got {n_pos} positive of {labels.size}")


# ----------------------------------------------------------------------------- AUROC

def _rank_auroc(positive: np.ndarray, scores: np.ndarray, chunk: int = 1 << 20) -> float:
    """Mann-Whitney AUROC, ties counted half: sort each class once, then binary-search positives.

    Memory is one sorted copy of the scores plus a bounded chunk, so a whole test set's pixels fit.
    """
    negatives = np.sort(scores[~positive])
    positives = np.sort(scores[positive])  # sorted needles keep the searches cache-friendly
    wins_twice = 0  # per positive: 2 × (negatives below) + (negatives tied) = left + right
    for start in range(0, positives.size, chunk):
        needles = positives[start:start + chunk]
        wins_twice += int(np.searchsorted(negatives, needles, side="left").sum(dtype=np.int64))
        wins_twice += int(np.searchsorted(negatives, needles, side="right").sum(dtype=np.int64))
    return wins_twice / (2.0 * positives.size * negatives.size)


def image_auroc(labels, scores) -> float:
    """Image-level AUROC of ``scores`` (N) against 0/1 ``labels`` (N); ties count half."""
    labels = _binary_labels(labels)
    scores = _finite_scores(scores).ravel()
    if scores.size != labels.size:
        raise ValueError(f"labels has {labels.size} entries but scores has {scores.size}")
    _require_both_classes(labels, "labels")
    return _rank_auroc(labels, scores)


def pixel_auroc(masks, maps) -> float:
    """Pixel-level AUROC of anomaly ``maps`` (N×H×W) against ``masks`` (N×H×W, bool or 0/1).

    Rank based, exact with ties: besides the inputs it holds one sorted copy of the map values
    (4 bytes per pixel for float32 maps), so a whole test set is scored at once; sklearn on the
    raveled arrays needs about ten times the memory.
    """
    masks, maps = _masks_and_maps(masks, maps)
    positive = masks.ravel()
    _require_both_classes(positive, "masks (pixels)")
    return _rank_auroc(positive, maps.ravel())


# ----------------------------------------------------------------------------- AUPRO

def pro_thresholds(maps, num_thresholds: int = 200) -> np.ndarray:
    """The official threshold grid: ``np.arange(min, max, (max - min) / num_thresholds)``.

    A constant map has no spread; its grid is the single value (nothing exceeds it).
    """
    if not isinstance(num_thresholds, (int, np.integer)) or num_thresholds < 1:
        raise ValueError(f"num_thresholds must be a positive int, got {num_thresholds!r}")
    maps = np.asarray(maps)
    low, high = maps.min(), maps.max()
    if high == low:
        return np.asarray([low], dtype=np.float64)
    return np.arange(low, high, (high - low) / num_thresholds)


def _thresholds_below(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of the ascending ``thresholds`` each value exceeds: ``searchsorted(..., 'left')``.

    The official grid is arithmetic, so the index is estimated with one multiply (about twice as
    fast as a binary search) and then checked; the few values where rounding put the estimate off
    by one are redone with searchsorted, so the result is exact for any ascending thresholds.
    """
    count = thresholds.size
    if count == 1:
        return (values > thresholds[0]).astype(np.intp)
    low, step = float(thresholds[0]), float(thresholds[1] - thresholds[0])
    estimate = values.astype(np.float64)
    estimate -= low
    estimate *= 1.0 / step
    np.floor(estimate, out=estimate)
    np.clip(estimate, -1, count - 1, out=estimate)
    below = estimate.astype(np.intp)
    del estimate
    below += 1
    padded = np.concatenate([[-np.inf], thresholds, [np.inf]])  # padded[i] = thresholds[i - 1]
    wrong = padded[below] >= values  # the below-th threshold is not below the value
    wrong |= padded[below + 1] < values  # or the next one is below it too
    if wrong.any():
        below[wrong] = np.searchsorted(thresholds, values[wrong], side="left")
    return below


def pro_curve(masks, maps, num_thresholds: int = 200) -> dict:
    """Per-region overlap and false-positive rate at every official threshold.

    Returns ``{"thresholds", "pro", "fpr", "num_regions"}`` (arrays over thresholds, ascending).
    Raises ValueError when the masks hold no defect pixel or no defect-free pixel.
    """
    masks, maps = _masks_and_maps(masks, maps)
    ndimage = require("scipy.ndimage", "connected defect regions need SciPy")
    regions, num_regions = ndimage.label(masks, structure=_STACK_8_CONNECTIVITY)
    if num_regions == 0:
        raise MetricInputError("AUPRO needs at least one defect region, but every mask is empty "
                               "(pass only defective images, or use image-level metrics)")
    regions = regions.ravel()  # 0 = defect-free, i = region i
    pixels_per_group = np.bincount(regions, minlength=num_regions + 1)
    if pixels_per_group[0] == 0:
        raise MetricInputError("AUPRO needs defect-free pixels for the FPR, but every mask pixel is a defect")
    thresholds = pro_thresholds(maps, num_thresholds)

    # A pixel is flagged at threshold t exactly when t < its "below" count, so one histogram of
    # (group, below) summed from the top gives every group's flagged count at every threshold.
    n_bins = thresholds.size + 1
    cell = regions.astype(np.intp) * n_bins
    cell += _thresholds_below(maps.ravel(), thresholds)
    histogram = np.bincount(cell, minlength=(num_regions + 1) * n_bins).reshape(num_regions + 1, n_bins)
    flagged = np.cumsum(histogram[:, ::-1], axis=1)[:, ::-1][:, 1:]

    pro = (flagged[1:] / pixels_per_group[1:, None]).mean(axis=0)
    fpr = flagged[0] / pixels_per_group[0]
    return {"thresholds": thresholds, "pro": pro, "fpr": fpr, "num_regions": int(num_regions)}


def normalized_pro_area(fpr: np.ndarray, pro: np.ndarray, max_fpr: float = 0.3) -> float:
    """Official area: keep points with FPR < max_fpr, divide FPR by its largest kept value, trapezoid.

    Degenerate cases the official code turns into NaN or an exception get a defined value:
    no kept point -> 0.0; every kept point at FPR 0 (e.g. a perfect binary map) -> the best PRO
    reached without a single false positive.
    """
    fpr = np.asarray(fpr, dtype=np.float64)
    pro = np.asarray(pro, dtype=np.float64)
    kept = fpr < max_fpr
    if not kept.any():
        return 0.0
    fpr, pro = fpr[kept], pro[kept]
    widest = fpr.max()
    if widest == 0:
        return float(pro.max())
    # Thresholds ascend, so FPR never rises: walk the points backwards, as sklearn.metrics.auc
    # does, which also fixes the order of points that share one FPR.
    x, y = (fpr / widest)[::-1], pro[::-1]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5))


def aupro(masks, maps, max_fpr: float = 0.3, num_thresholds: int = 200) -> float:
    """Set-level AUPRO: the official ``compute_pro`` called once on all images together.

    ``masks`` and ``maps`` are N×H×W; thresholds span the whole set. Raises ValueError when no
    mask holds a defect. Matches the official pandas loop to float rounding, about 100× faster.
    """
    curve = pro_curve(masks, maps, num_thresholds)
    return normalized_pro_area(curve["fpr"], curve["pro"], max_fpr)


def aupro_per_image_mean(masks, maps, labels=None, max_fpr: float = 0.3,
                         num_thresholds: int = 200) -> float:
    """The paper's AUPRO: ``compute_pro`` on each defective image alone (its own thresholds), averaged.

    ``labels`` (N, 0/1) picks the defective images as the official evaluation does; None takes
    every image whose mask has a defect. A defective image with an empty mask is an error.
    """
    masks, maps = _masks_and_maps(masks, maps)
    if labels is None:
        defective = np.flatnonzero(masks.any(axis=(1, 2)))
    else:
        labels = _binary_labels(labels)
        if labels.size != masks.shape[0]:
            raise ValueError(f"labels has {labels.size} entries but there are {masks.shape[0]} masks")
        defective = np.flatnonzero(labels)
    if defective.size == 0:
        raise MetricInputError("per-image AUPRO needs at least one defective image")
    areas = []
    for index in defective:
        if not masks[index].any():
            raise MetricInputError(f"image {index} is labelled defective but its mask is empty")
        areas.append(aupro(masks[index:index + 1], maps[index:index + 1], max_fpr, num_thresholds))
    return float(np.mean(areas))


# ----------------------------------------------------------------------------- thresholds

def _counts_at_each_threshold(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """For every distinct score t (descending): TP and FP of the rule ``score >= t`` (the counting is
    mrkd.runtime.calibration's, which the F1 threshold uses too)."""
    labels = _binary_labels(labels)
    scores = _finite_scores(scores).ravel()
    if scores.size != labels.size:
        raise ValueError(f"labels has {labels.size} entries but scores has {scores.size}")
    thresholds, tp, fp = counts_at_each_threshold(labels, scores)
    n_pos = int(labels.sum())
    return thresholds, tp, fp, n_pos, labels.size - n_pos


def roc_curve_points(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)`` for the rule ``score >= threshold``.

    Starts at (0, 0) with threshold +inf and has one point per distinct score, like
    ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.
    """
    thresholds, tp, fp, n_pos, n_neg = _counts_at_each_threshold(labels, scores)
    if n_pos == 0 or n_neg == 0:
        raise MetricInputError(f"a ROC curve needs both classes: got {n_pos} defective and {n_neg} good")
    tpr = np.r_[0.0, tp / n_pos]
    fpr = np.r_[0.0, fp / n_neg]
    return fpr, tpr, np.r_[np.inf, thresholds]


def precision_recall_f1(labels, scores, threshold: float) -> dict:
    """Confusion counts, precision, recall and F1 of the rule ``score >= threshold``.

    Precision with no alarm raised is defined as 1.0 (nothing claimed, nothing wrong); recall
    with no defective sample is 0.0.
    """
    labels = _binary_labels(labels)
    scores = _finite_scores(scores).ravel()
    if scores.size != labels.size:
        raise ValueError(f"labels has {labels.size} entries but scores has {scores.size}")
    predicted = is_anomalous(scores, threshold)
    tp = int(np.sum(predicted & labels))
    fp = int(np.sum(predicted & ~labels))
    fn = int(np.sum(~predicted & labels))
    tn = int(labels.size - tp - fp - fn)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"threshold": float(threshold), "precision": precision, "recall": recall, "f1": f1,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


# ----------------------------------------------------------------------------- everything at once

@dataclass(frozen=True)
class MaskStatus:
    """Which test images can take part in which metric (index arrays into the test set).

    Image metrics use every image. Pixel AUROC uses the good images and the defect images whose mask
    marks some pixels (``regions`` and ``full``). Per-region metrics (AUPRO, both protocols) use the
    good images and ``regions`` only: a mask covering the whole image has no defect-free pixel for
    the FPR, and an ``empty`` mask of a defect image has no region (and its pixels are not known to be
    good). ``unannotated`` defect images have no mask at all (labelled per image).
    """

    good: np.ndarray
    regions: np.ndarray
    full: np.ndarray
    empty: np.ndarray
    unannotated: np.ndarray

    @property
    def pixel_images(self) -> np.ndarray:
        return np.sort(np.concatenate([self.good, self.regions, self.full]))

    @property
    def region_images(self) -> np.ndarray:
        return np.sort(np.concatenate([self.good, self.regions]))

    def counts(self) -> dict:
        n_defect = self.regions.size + self.full.size + self.empty.size + self.unannotated.size
        return {"n_defect_with_regions": int(self.regions.size), "n_defect_full_mask": int(self.full.size),
                "n_defect_empty_mask": int(self.empty.size), "n_defect_without_mask": int(self.unannotated.size),
                "n_defect_with_mask": int(n_defect - self.unannotated.size),
                "n_pixel_images": int(self.pixel_images.size)}


def mask_status(labels, masks, has_mask=None) -> MaskStatus:
    """Sort the images of a test set by what their masks allow (see MaskStatus).

    ``has_mask`` (N bool, default all True) says which images come with pixel labels; good images
    are defect-free everywhere whether or not they have a mask file.
    """
    labels = _binary_labels(labels)
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[0] != labels.size:
        raise ValueError(f"masks must be N×H×W with N = {labels.size} labels, got shape {masks.shape}")
    has_mask = np.ones(labels.size, bool) if has_mask is None else np.asarray(has_mask, bool).ravel()
    if has_mask.size != labels.size:
        raise ValueError(f"has_mask has {has_mask.size} entries but there are {labels.size} labels")
    flat = masks.reshape(labels.size, -1).astype(bool)
    any_defect, all_defect = flat.any(axis=1), flat.all(axis=1)
    defect_with_mask = labels & has_mask
    return MaskStatus(good=np.flatnonzero(~labels),
                      regions=np.flatnonzero(defect_with_mask & any_defect & ~all_defect),
                      full=np.flatnonzero(defect_with_mask & all_defect),
                      empty=np.flatnonzero(defect_with_mask & ~any_defect),
                      unannotated=np.flatnonzero(labels & ~has_mask))


def _subset(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    return array if index.size == array.shape[0] else array[index]


def evaluate_arrays(labels, scores, masks, maps, threshold: Optional[float] = None,
                    max_fpr: float = 0.3, num_thresholds: int = 200, has_mask=None) -> dict:
    """All metrics for one test set.

    Returns ``image_auroc`` (every image), ``pixel_auroc``, ``aupro`` (set level, thresholds over the
    maps used) and ``aupro_paper`` (per defective image, averaged: the number MRKD's paper reports),
    each over the images mask_status allows (None when no image allows it), the counts of
    MaskStatus.counts(), ``pixel_metrics`` (a sentence saying over what the pixel metrics ran, or
    why they are not available) and, when ``threshold`` is given, ``precision``/``recall``/``f1``/
    ``tp``/``fp``/``fn``/``tn`` at it. ``has_mask``: see mask_status (default: every image).
    """
    labels = _binary_labels(labels)
    masks, maps = _masks_and_maps(masks, maps)
    if masks.shape[0] != labels.size:
        raise ValueError(f"labels has {labels.size} entries but there are {masks.shape[0]} masks")
    status = mask_status(labels, masks, has_mask)
    result = {"image_auroc": image_auroc(labels, scores), "pixel_auroc": None, "aupro": None, "aupro_paper": None,
              "n_images": int(labels.size), "n_good_images": int(status.good.size), **status.counts()}
    pixel = status.pixel_images
    pixel_masks = _subset(masks, pixel)
    if pixel_masks.any() and not pixel_masks.all():
        result["pixel_auroc"] = pixel_auroc(pixel_masks, _subset(maps, pixel))
    if status.regions.size:
        region = status.region_images
        result["aupro"] = aupro(_subset(masks, region), _subset(maps, region), max_fpr, num_thresholds)
        result["aupro_paper"] = aupro_per_image_mean(masks[status.regions], maps[status.regions], None, max_fpr,
                                                     num_thresholds)
    result["pixel_metrics"] = _pixel_metrics_note(status, result)
    if threshold is not None:
        result.update(precision_recall_f1(labels, scores, threshold))
    return result


def _pixel_metrics_note(status: MaskStatus, result: dict) -> str:
    n_defect = sum(result[k] for k in ("n_defect_with_mask", "n_defect_without_mask"))
    if result["pixel_auroc"] is None and result["aupro"] is None:
        return f"n/a: none of the {n_defect} defect image(s) has a usable mask"
    left_out = [f"{count} {what}" for count, what in ((status.unannotated.size, "without mask"),
                                                      (status.empty.size, "with an empty mask"),
                                                      (status.full.size, "with a full mask (pixel AUROC only)"))
                if count]
    return (f"over {status.regions.size + status.full.size} of {n_defect} defect image(s) and "
            f"{status.good.size} good" + (f"; left out: {', '.join(left_out)}" if left_out else ""))
