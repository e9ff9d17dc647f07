"""Calibration: turn a trained model's raw scores into an alarm threshold and normalisation stats.

After training, the held-out good images are scored and ``model.calibration`` records::

    threshold         the alarm threshold (a score >= threshold is anomalous, as in mrkd.train.metrics)
    threshold_method  "quantile" (default) | "max_margin" (too few images for it) | "tolerance" | "f1"
    quantile          the share of good parts the threshold should pass (the coverage)
    confidence, tolerance_k   for "tolerance": see threshold_from_good_scores
    good_mean, good_std, good_min, good_max, good_q99, n_good   statistics of the good scores

The export writes these into the model metadata, so the edge runtime never re-types a threshold.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from mrkd.train import metrics

# Below this many good scores a high quantile is only the maximum with noise; use max + margin.
MIN_SCORES_FOR_QUANTILE = 10
# Below this many a standard deviation means little; "tolerance" falls back to max + margin too.
MIN_SCORES_FOR_TOLERANCE = 3
# Margin above the largest good score, as a share of the good scores' range (max - min).
MAX_MARGIN = 0.1
THRESHOLD_METHODS = ("tolerance", "quantile")
# Measured on the demo's six synthetic categories (Lite0, 128 px, 6 held-out good images each, 72 good
# and 120 defective test images), two hold-out draws: "quantile" (max + 10% here) flagged 10 and 12
# good images and missed no defect; "tolerance" at confidence 0.75 flagged 5 and 2 but missed 0 and 22
# (18 of 20 on `wood`, whose 6 held-out scores spread widely). With so few images neither rule is
# reliable; the default stays with the one that does not miss defects.
TOLERANCE_CONFIDENCE = 0.75


def good_score_stats(good_scores) -> dict:
    """Mean, standard deviation, min, max and 99th percentile of good scores (floats)."""
    scores = np.asarray(good_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError("calibration needs at least one good image score")
    return {"good_mean": float(scores.mean()), "good_std": float(scores.std()),
            "good_min": float(scores.min()), "good_max": float(scores.max()),
            "good_q99": float(np.quantile(scores, 0.99)), "n_good": int(scores.size)}


def tolerance_factor(n: int, coverage: float, confidence: float = TOLERANCE_CONFIDENCE) -> float:
    """One-sided normal tolerance factor k: with ``confidence``, mean + k·s of ``n`` normal samples
    (s with ddof=1) lies above the ``coverage`` quantile of their distribution. Exact, from the
    noncentral t distribution: k = t'_{confidence}(n−1, z_coverage·√n) / √n."""
    from scipy import stats
    if n < 2:
        raise ValueError(f"a tolerance bound needs at least 2 scores, got {n}")
    if not (0 < coverage < 1 and 0 < confidence < 1):
        raise ValueError(f"coverage and confidence must lie in (0, 1), got {coverage}, {confidence}")
    root_n = np.sqrt(n)
    return float(stats.nct.ppf(confidence, df=n - 1, nc=stats.norm.ppf(coverage) * root_n) / root_n)


def _max_margin(scores: np.ndarray, margin: float) -> float:
    spread = float(scores.max() - scores.min())
    # A single score has no spread: fall back to a share of its magnitude.
    spread = spread if spread > 0 else abs(float(scores.max()))
    return float(scores.max() + margin * spread)


def threshold_from_good_scores(good_scores, quantile: float = 0.99, method: str = "quantile",
                               min_scores: int = MIN_SCORES_FOR_QUANTILE, margin: float = MAX_MARGIN,
                               confidence: float = TOLERANCE_CONFIDENCE) -> Tuple[float, str]:
    """(threshold, method used) from held-out good scores.

    "quantile" (default): the ``quantile`` of the scores (max + margin·(max − min) below
    ``min_scores``). With a handful of held-out parts this is the tail of a small sample and sits
    below much of the unseen good parts' tail: some good parts raise alarms.
    "tolerance": mean + k·s with k = tolerance_factor(n, quantile, confidence), and never below the
    largest good score. It widens as the hold-out shrinks (k for 99% coverage at confidence 0.75:
    4.4 for 3 images, 3.2 for 6, 2.7 for 20, 2.5 for 50): fewer false alarms, and with a few widely
    spread scores, missed defects (see TOLERANCE_CONFIDENCE)."""
    scores = np.asarray(good_scores, dtype=np.float64).ravel()
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method {method!r} unknown; choose from {list(THRESHOLD_METHODS)}")
    if method == "tolerance" and scores.size >= MIN_SCORES_FOR_TOLERANCE:
        bound = scores.mean() + tolerance_factor(scores.size, quantile, confidence) * scores.std(ddof=1)
        return float(max(bound, scores.max())), "tolerance"
    if method == "quantile" and scores.size >= min_scores:
        return metrics.threshold_at_quantile(scores, quantile), "quantile"
    return _max_margin(scores, margin), "max_margin"


def calibration_from_scores(good_scores, quantile: float = 0.99, labels=None, labelled_scores=None,
                            method: str = "quantile", confidence: float = TOLERANCE_CONFIDENCE) -> dict:
    """The calibration dict for given good scores (and, optionally, labelled scores for an F1 threshold)."""
    result = good_score_stats(good_scores)
    threshold, used = threshold_from_good_scores(good_scores, quantile, method, confidence=confidence)
    if used == "tolerance":
        result.update(confidence=float(confidence),
                      tolerance_k=tolerance_factor(result["n_good"], quantile, confidence))
    if labels is not None:
        threshold, best_f1 = metrics.f1_optimal_threshold(labels, labelled_scores)
        used = "f1"
        result["f1_at_threshold"] = float(best_f1)
    result.update(threshold=float(threshold), threshold_method=used, quantile=float(quantile))
    return result


def normalized_scores(scores, calibration: dict) -> np.ndarray:
    """Scores rescaled so that the lowest good calibration score is 0 and the threshold is 1."""
    low, threshold = calibration["good_min"], calibration["threshold"]
    span = threshold - low
    scores = np.asarray(scores, dtype=np.float64)
    return (scores - low) / span if span > 0 else scores - low


def _as_batches(images, model, batch_size: int):
    """Yield N×3×H×W float tensors from a tensor or from image paths (pre-processed like training)."""
    import torch
    if isinstance(images, torch.Tensor):
        for start in range(0, images.shape[0], batch_size):
            yield images[start:start + batch_size]
        return
    from mrkd.train.data import load_square
    from mrkd.runtime.preprocess import normalize_batch
    config = model.config
    paths = list(images)
    for start in range(0, len(paths), batch_size):
        squares = [load_square(p, config.image_size, config.resize_mode) for p in paths[start:start + batch_size]]
        yield torch.from_numpy(normalize_batch(np.stack(squares), config.mean, config.std))


def score_images(model, images, batch_size: int = 8, device=None) -> np.ndarray:
    """Image scores (max of the anomaly map) of a tensor N×3×H×W or of a list of image paths."""
    import torch
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    with torch.no_grad():
        for batch in _as_batches(images, model, batch_size):
            out.append(model.scores(batch.to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def calibrate(model, good_images: Union[Sequence[str], "torch.Tensor"],  # noqa: F821
              labelled: Optional[Tuple[object, Sequence[int]]] = None, quantile: float = 0.99,
              batch_size: int = 8, device=None, method: str = "quantile",
              confidence: float = TOLERANCE_CONFIDENCE) -> dict:
    """Score ``good_images`` (paths or a normalised tensor) and store the calibration in the model.

    ``labelled``: optional ``(images, labels)`` with defective examples; the threshold is then the
    F1-optimal one on them instead of the good-score rule ``method`` (see threshold_from_good_scores).
    Returns ``model.calibration``.
    """
    good = score_images(model, good_images, batch_size, device)
    labels = labelled_scores = None
    if labelled is not None:
        labelled_images, labels = labelled
        labelled_scores = score_images(model, labelled_images, batch_size, device)
    model.calibration = calibration_from_scores(good, quantile, labels, labelled_scores, method, confidence)
    return model.calibration


def recalibrate_checkpoint(checkpoint, good_images, out=None, labelled=None, quantile: float = 0.99,
                           method: str = "quantile", confidence: float = TOLERANCE_CONFIDENCE,
                           batch_size: int = 8, device=None) -> dict:
    """Calibrate the model in ``checkpoint`` again and write it (atomically) to ``out`` or in place.

    ``good_images``: a folder or glob of good images, or a list of image paths; ``labelled``: optional
    MVTec-style test folder (see mrkd.runtime.calibrate.labelled_folder) for an F1-optimal threshold.
    Everything else in the file (training state, epoch) is kept. Returns the new calibration."""
    from mrkd.runtime.calibrate import labelled_folder
    from mrkd.train.checkpoint import checkpoint_dict, model_from_dict, read_checkpoint, save_checkpoint
    from mrkd.train.data import scan_folder
    good = list(good_images) if isinstance(good_images, (list, tuple)) else scan_folder(good_images)
    data = read_checkpoint(checkpoint)
    model = model_from_dict(data, source=str(checkpoint))
    kept = {k: v for k, v in data.items() if k not in checkpoint_dict(model)}   # not the model's own entries
    if device is not None:
        model = model.to(device)
    calibrate(model, good, labelled=labelled_folder(labelled) if labelled else None, quantile=quantile,
              batch_size=batch_size, device=device, method=method, confidence=confidence)
    save_checkpoint(model.cpu(), out or checkpoint, extra=kept)
    return model.calibration
