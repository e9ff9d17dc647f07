"""Calibration: turn a trained model's raw scores into an alarm threshold and normalisation stats.

After training, the held-out good images are scored and ``model.calibration`` records::

    threshold         the alarm threshold (a score >= threshold is anomalous, as in mrkd.train.metrics)
    threshold_method  "quantile" (default) | "max_margin" (too few images for it) | "tolerance" | "f1"
    quantile          the share of good parts the threshold should pass (the coverage)
    confidence, tolerance_k   for "tolerance": see threshold_from_good_scores
    good_mean, good_std, good_min, good_max, good_q99, n_good   statistics of the good scores

That dict is ``mrkd.runtime.calibration.Calibration.to_dict()``; the rules live there (numpy only).
The export writes the Calibration into the model metadata, so the edge runtime never re-types a threshold.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

# The rules and the record are torch-free (the runtime calibrates exported models with them too).
from mrkd.runtime.calibration import (DEFAULT_CONFIDENCE, DEFAULT_METHOD, DEFAULT_QUANTILE,  # noqa: F401
                                     MAX_MARGIN, MIN_SCORES_FOR_QUANTILE, MIN_SCORES_FOR_TOLERANCE,
                                     THRESHOLD_METHODS, Calibration, good_score_stats,
                                     threshold_from_good_scores, tolerance_factor)
from mrkd.runtime.calibration import calibration_from_scores as _calibration_from_scores

TOLERANCE_CONFIDENCE = DEFAULT_CONFIDENCE    # the name training has used


def calibration_from_scores(good_scores, quantile: float = DEFAULT_QUANTILE, labels=None, labelled_scores=None,
                            method: str = DEFAULT_METHOD, confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """The calibration dict (the checkpoint's form of a Calibration) for given good scores and,
    optionally, labelled scores for an F1 threshold."""
    return _calibration_from_scores(good_scores, quantile, labels, labelled_scores, method, confidence).to_dict()


def normalized_scores(scores, calibration: dict) -> np.ndarray:
    """Scores rescaled so that the lowest good calibration score is 0 and the threshold is 1."""
    return Calibration.from_dict(calibration, "model calibration").normalized(scores)


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
              labelled: Optional[Tuple[object, Sequence[int]]] = None, quantile: float = DEFAULT_QUANTILE,
              batch_size: int = 8, device=None, method: str = DEFAULT_METHOD,
              confidence: float = DEFAULT_CONFIDENCE) -> dict:
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


def recalibrate_checkpoint(checkpoint, good_images, out=None, labelled=None, quantile: float = DEFAULT_QUANTILE,
                           method: str = DEFAULT_METHOD, confidence: float = DEFAULT_CONFIDENCE,
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
