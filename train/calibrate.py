"""Calibration of a trained model (PyTorch): score held-out good images and set ``model.calibration``,
a ``mrkd.runtime.calibration.Calibration`` (threshold, the rule that set it, statistics of the good
scores). The record and its rules live in mrkd.runtime.calibration (numpy only, shared with the
runtime); the checkpoint stores ``Calibration.to_dict()`` and the export writes the same record into
the model metadata, so the edge runtime never re-types a threshold.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Tuple, Union

import numpy as np

from mrkd.runtime.calibration import (DEFAULT_CONFIDENCE, DEFAULT_METHOD, DEFAULT_QUANTILE, Calibration,
                                     CalibrationError, calibration_from_scores, check_calibration_shift,
                                     shift_reference, whole_image_recalibration)
from mrkd.runtime.images import read_image

if TYPE_CHECKING:
    from mrkd.runtime.ignore_mask import IgnoreMask


def _as_batches(images, model, batch_size: int, square: Optional[Callable[[str], np.ndarray]] = None):
    """Yield N×3×H×W float tensors from a tensor or from image paths (pre-processed like training).
    ``square``: a path's uint8 square at the model's size (default load_square: decoded from the file;
    refit gives the squares of the images it decoded once)."""
    import torch
    if isinstance(images, torch.Tensor):
        for start in range(0, images.shape[0], batch_size):
            yield images[start:start + batch_size]
        return
    from mrkd.train.data import load_square
    from mrkd.runtime.preprocess import normalize_batch
    config = model.config
    square = square or (lambda path: load_square(path, config.image_size, config.resize_mode))
    paths = list(images)
    for start in range(0, len(paths), batch_size):
        squares = [square(p) for p in paths[start:start + batch_size]]
        yield torch.from_numpy(normalize_batch(np.stack(squares), config.mean, config.std))


def score_images(model, images, batch_size: int = 8, device=None,
                 square: Optional[Callable[[str], np.ndarray]] = None, mask: Optional["IgnoreMask"] = None,
                 frame_hw: Optional[Callable[[str], Tuple[int, int]]] = None) -> np.ndarray:
    """Image scores (max of the anomaly map) of a tensor N×3×H×W or of a list of image paths
    (``square``: as _as_batches). Under ``mask`` (paths only) each score is the one a camera judging under
    that ignore mask takes (runtime/ignore_mask.py: the map's maximum outside the ignored area, at the
    image's own geometry: ``frame_hw(path)``, default read from the file)."""
    import torch
    device = device or next(model.parameters()).device
    model.eval()
    if mask is not None and isinstance(images, torch.Tensor):
        raise ValueError("an ignore mask needs image paths (the frames' own size), not a tensor")
    paths = images if isinstance(images, torch.Tensor) else list(images)
    frame_hw = frame_hw or (lambda path: tuple(read_image(path).shape[:2]))
    out, start = [], 0
    with torch.no_grad():
        for batch in _as_batches(paths, model, batch_size, square):
            if mask is None:
                out.append(model.scores(batch.to(device)).float().cpu().numpy())
                continue
            maps = model.anomaly_map(batch.to(device))[:, 0].float().cpu().numpy()
            out.append(np.array([mask.apply(amap, frame_hw(path), model.config.image_size, model.config.resize_mode)[1]
                                 for amap, path in zip(maps, paths[start:start + len(maps)])], np.float32))
            start += len(maps)
    return np.concatenate(out) if out else np.zeros(0)


def mask_misfit(mask: "IgnoreMask", paths: Sequence[str], model,
                frame_hw: Optional[Callable[[str], Tuple[int, int]]] = None) -> Optional[str]:
    """Why ``mask`` cannot judge the first image of ``paths`` it cannot (not the size it was drawn at: a
    mask is a camera's, and so are the images scored under it; or it leaves nothing of the model's map
    judged), else None. ``frame_hw``: as score_images."""
    from mrkd.runtime.ignore_mask import IgnoreMaskError
    frame_hw = frame_hw or (lambda path: tuple(read_image(path).shape[:2]))
    for path in paths:
        h, w = frame_hw(path)
        if (h, w) != mask.ignored.shape:
            return (f"ignore mask {mask.path} is {mask.size_text}, image {path} is {w}x{h}: scores under a camera's "
                    f"ignore mask are taken on that camera's images (its evidence, OK samples or good parts)")
        try:
            mask.grid((h, w), model.config.image_size, model.config.resize_mode)
        except IgnoreMaskError as exc:
            return str(exc)
    return None


def calibrate(model, good_images: Union[Sequence[str], "torch.Tensor"],  # noqa: F821
              labelled: Optional[Tuple[object, Sequence[int]]] = None, quantile: float = DEFAULT_QUANTILE,
              batch_size: int = 8, device=None, method: str = DEFAULT_METHOD,
              confidence: float = DEFAULT_CONFIDENCE,
              check: Optional[Callable[[np.ndarray, Calibration], None]] = None,
              mask: Optional["IgnoreMask"] = None, square: Optional[Callable[[str], np.ndarray]] = None,
              frame_hw: Optional[Callable[[str], Tuple[int, int]]] = None) -> Calibration:
    """Score ``good_images`` (paths or a normalised tensor) and store the calibration in the model.

    ``labelled``: optional ``(images, labels)`` with defective examples; the threshold is then the
    F1-optimal one on them instead of the good-score rule ``method`` (see threshold_from_good_scores).
    ``check(good_scores, calibration)`` may refuse the result (raise) before it is stored. ``mask``:
    scores taken under that ignore mask (score_images), its sha256 recorded with the threshold.
    ``square``, ``frame_hw``: as score_images (images decoded once by the caller).
    Returns ``model.calibration``.
    """
    good = score_images(model, good_images, batch_size, device, square=square, mask=mask, frame_hw=frame_hw)
    labels = labelled_scores = None
    if labelled is not None:
        labelled_images, labels = labelled
        labelled_scores = score_images(model, labelled_images, batch_size, device, square=square, mask=mask,
                                       frame_hw=frame_hw)
    result = calibration_from_scores(good, quantile, labels, labelled_scores, method, confidence)
    if mask is not None:
        result = dataclasses.replace(result, ignore_mask=mask.sha256)
    if check is not None:
        check(good, result)
    model.calibration = result
    return model.calibration


def recalibrate_checkpoint(checkpoint, good_images, out=None, labelled=None, quantile: float = DEFAULT_QUANTILE,
                           method: str = DEFAULT_METHOD, confidence: float = DEFAULT_CONFIDENCE,
                           batch_size: int = 8, device=None, accept_shift: bool = False,
                           warn: Callable[[str], None] = lambda text: print(text, file=sys.stderr),
                           ignore_mask=None) -> Calibration:
    """Calibrate the model in ``checkpoint`` again and write it (atomically) to ``out`` or in place.

    ``good_images``: a folder or glob of good images, or a list of image paths; ``labelled``: optional
    MVTec-style test folder (see mrkd.runtime.calibrate.labelled_folder) for an F1-optimal threshold.
    Good scores far from the ones the checkpoint recorded are refused unless ``accept_shift``
    (mrkd.runtime.calibration.calibration_shift). ``ignore_mask`` (a mask image's path): the scores are
    taken under it, as `mrkd run` judges a camera with that mask, and its sha256 is recorded (the shift
    check then compares only what shift_reference allows). Everything else in the file (training state,
    epoch) is kept. Returns the new calibration."""
    from mrkd.runtime.calibrate import labelled_folder
    from mrkd.runtime.ignore_mask import load_ignore_mask
    from mrkd.train.checkpoint import checkpoint_dict, model_from_dict, read_checkpoint, save_checkpoint
    from mrkd.train.data import scan_folder
    good = list(good_images) if isinstance(good_images, (list, tuple)) else scan_folder(good_images)
    labelled = labelled_folder(labelled) if labelled else None
    mask = load_ignore_mask(ignore_mask) if ignore_mask is not None else None
    data = read_checkpoint(checkpoint, warn=warn)
    model = model_from_dict(data, source=str(checkpoint))
    kept = {k: v for k, v in data.items() if k not in checkpoint_dict(model)}   # not the model's own entries
    if device is not None:
        model = model.to(device)
    previous = model.calibration
    images = None
    if mask is not None:
        # each image decoded once: its size for the mask, its square for the model (refit's cache)
        from mrkd.train.refit import DecodedImages
        images = DecodedImages.of(model)
        why = mask_misfit(mask, [*good, *(labelled[0] if labelled else ())], model, images.frame_hw)
        if why:
            raise CalibrationError(why)
    else:
        note = whole_image_recalibration(previous, str(checkpoint))
        if note:
            warn(note)

    def check(good_scores, result):
        check_calibration_shift(shift_reference(previous, result, good_scores), good_scores, result.threshold,
                                accept_shift, str(checkpoint), warn)
        result.previous_threshold = None if previous is None else previous.threshold

    calibrate(model, good, labelled=labelled, quantile=quantile, batch_size=batch_size, device=device,
              method=method, confidence=confidence, check=check, mask=mask,
              square=images.square if images is not None else None,
              frame_hw=images.frame_hw if images is not None else None)
    save_checkpoint(model.cpu(), out or checkpoint, extra=kept)
    return model.calibration
