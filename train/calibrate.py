"""Calibration: turn a trained model's raw scores into an alarm threshold and normalisation stats.

After training, the held-out good images are scored and ``model.calibration`` records::

    threshold         the alarm threshold (a score >= threshold is anomalous, as in mrkd.train.metrics)
    threshold_method  "quantile" | "max_margin" (too few good images for a quantile) | "f1"
    quantile          the quantile asked for
    good_mean, good_std, good_min, good_max, good_q99, n_good   statistics of the good scores

The export writes these into the model metadata, so the edge runtime never re-types a threshold.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

from mrkd.train import metrics

# Below this many good scores a high quantile is only the maximum with noise; use max + margin.
MIN_SCORES_FOR_QUANTILE = 10
# Margin above the largest good score, as a share of the good scores' range (max - min).
MAX_MARGIN = 0.1


def good_score_stats(good_scores) -> dict:
    """Mean, standard deviation, min, max and 99th percentile of good scores (floats)."""
    scores = np.asarray(good_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError("calibration needs at least one good image score")
    return {"good_mean": float(scores.mean()), "good_std": float(scores.std()),
            "good_min": float(scores.min()), "good_max": float(scores.max()),
            "good_q99": float(np.quantile(scores, 0.99)), "n_good": int(scores.size)}


def threshold_from_good_scores(good_scores, quantile: float = 0.99,
                               min_scores: int = MIN_SCORES_FOR_QUANTILE,
                               margin: float = MAX_MARGIN) -> Tuple[float, str]:
    """(threshold, method): the ``quantile`` of good scores, or max + margin·(max − min) when there
    are fewer than ``min_scores`` of them."""
    scores = np.asarray(good_scores, dtype=np.float64).ravel()
    if scores.size >= min_scores:
        return metrics.threshold_at_quantile(scores, quantile), "quantile"
    spread = float(scores.max() - scores.min())
    # A single score has no spread: fall back to a share of its magnitude.
    spread = spread if spread > 0 else abs(float(scores.max()))
    return float(scores.max() + margin * spread), "max_margin"


def calibration_from_scores(good_scores, quantile: float = 0.99, labels=None, labelled_scores=None) -> dict:
    """The calibration dict for given good scores (and, optionally, labelled scores for an F1 threshold)."""
    result = good_score_stats(good_scores)
    threshold, method = threshold_from_good_scores(good_scores, quantile)
    if labels is not None:
        threshold, best_f1 = metrics.f1_optimal_threshold(labels, labelled_scores)
        method = "f1"
        result["f1_at_threshold"] = float(best_f1)
    result.update(threshold=float(threshold), threshold_method=method, quantile=float(quantile))
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
              batch_size: int = 8, device=None) -> dict:
    """Score ``good_images`` (paths or a normalised tensor) and store the calibration in the model.

    ``labelled``: optional ``(images, labels)`` with defective examples; the threshold is then the
    F1-optimal one on them instead of the good-score quantile. Returns ``model.calibration``.
    """
    good = score_images(model, good_images, batch_size, device)
    labels = labelled_scores = None
    if labelled is not None:
        labelled_images, labels = labelled
        labelled_scores = score_images(model, labelled_images, batch_size, device)
    model.calibration = calibration_from_scores(good, quantile, labels, labelled_scores)
    return model.calibration
