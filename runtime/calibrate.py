"""Calibrate an exported model on the line: score good parts as the camera delivers them and set the
alarm threshold in the model's sidecar (``mrkd calibrate model.onnx SOURCE``; no PyTorch needed).

Why: training sets the threshold on held-out image files, but frames that come through a camera and a
codec score differently. In the demo, writing the good `grain` test images into an MJPG video raises
their scores by 0.10 on average (8%), enough for 4 of the 5 alarms its stream raised on good parts.
Scoring a clip of good parts taken through the same path removes that shift from the threshold.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import numpy as np

from mrkd.runtime.calibration import (DEFAULT_CONFIDENCE, DEFAULT_METHOD, DEFAULT_QUANTILE, Calibration,
                                     CalibrationError, calibration_from_scores, check_calibration_shift,
                                     frame_size_label, shift_reference, whole_image_recalibration)
from mrkd.runtime.ignore_mask import IgnoreMask, load_ignore_mask, masked
from mrkd.runtime.metadata import file_sha256, sidecar_path
from mrkd.runtime.line.loop import iter_frames
from mrkd.runtime.sources import SourceOptions, SourceStats, open_source

logger = logging.getLogger(__name__)


__all__ = ["CalibrationError", "calibrate_exported", "labelled_folder", "score_source"]


def labelled_folder(folder) -> Tuple[List[str], np.ndarray]:
    """(paths, labels) from an MVTec-style test folder: ``good/`` holds label 0, every other visible
    sub-folder (a defect type) label 1. Errors name the folder when a side is missing, or a sub-folder
    named good in another case (its good parts would count as defects in the F1 threshold)."""
    from mrkd.runtime.image_folders import warn_left_out, warn_narrow_16bit
    from mrkd.runtime.labelled_images import labelled_images, misnamed_good_text
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"missing folder {folder} (labelled images: good/ and one sub-folder per defect type)")
    split = labelled_images(folder)
    misnamed = misnamed_good_text(split)
    if misnamed:
        raise CalibrationError(misnamed)
    paths, labels = [], []
    for sub in split.sub_folders:      # good/ where it sorts, as training lists them
        warn_left_out(sub)
        paths += [str(p) for p in sub.images]
        labels += [sub.label] * len(sub.images)
    labels = np.asarray(labels, dtype=np.int64)
    if not (labels == 0).any() or not (labels == 1).any():
        raise CalibrationError(f"{folder}: labelled calibration needs a good/ sub-folder and at least one defect "
                               f"sub-folder with images (found {int((labels == 0).sum())} good, "
                               f"{int(labels.sum())} defective)")
    warn_narrow_16bit(paths, str(folder))
    return paths, labels


def masked_scores(detector, frames: List[np.ndarray], mask: Optional[IgnoreMask]) -> np.ndarray:
    """The detector's image scores of ``frames``, under ``mask`` where one is given (runtime/ignore_mask.py:
    as `mrkd run` judges a camera with that ignore_mask)."""
    result = detector(frames)
    if mask is None:
        return result.scores
    return np.array([masked(mask, result.maps[i], float(result.scores[i]), frame.shape[:2], detector.metadata)[1]
                     for i, frame in enumerate(frames)], dtype=np.float32)


def score_source(detector, uri, max_frames: Optional[int] = None, batch_size: int = 8,
                 progress: bool = True, options: Optional[SourceOptions] = None,
                 mask: Optional[IgnoreMask] = None) -> Tuple[np.ndarray, SourceStats]:
    """Scores of the frames of ``uri`` (any source open_source takes), in batches, under ``mask`` where one
    is given; bad frames are skipped and counted by the source. A live source (camera, stream) needs
    ``max_frames``."""
    from tqdm import tqdm
    source = open_source(uri, options=options or SourceOptions(reconnect=False))
    if source.live and not max_frames:
        source.close()
        raise CalibrationError(f"{uri}: a live source never ends; give a frame limit (--max-frames)")
    scores, pending = [], []
    try:
        with tqdm(total=max_frames, desc="calibration frames", unit="frame", disable=not progress) as bar:
            # Read like a camera of mrkd run (its own reader thread, newest frame of a live source).
            for frames in iter_frames(source, max_frames=max_frames or None, batch=batch_size):
                pending += [frame.image for frame in frames]
                bar.update(len(frames))
                if len(pending) >= batch_size:
                    scores.append(masked_scores(detector, pending, mask))
                    pending = []
            if pending:
                scores.append(masked_scores(detector, pending, mask))
    finally:
        source.close()
    if not scores:
        raise CalibrationError(f"{uri}: no usable frames to calibrate on "
                               f"({source.stats.bad_frames} bad frame(s); {source.stats.last_error or 'none read'})")
    return np.concatenate(scores).astype(np.float64), source.stats


def calibrate_exported(model_path: Union[str, Path], good, labelled=None, quantile: float = DEFAULT_QUANTILE,
                       method: str = DEFAULT_METHOD, confidence: Optional[float] = None,
                       max_frames: Optional[int] = None, backend: str = "auto", progress: bool = True,
                       source_options: Optional[SourceOptions] = None, accept_shift: bool = False,
                       warn: Callable[[str], None] = lambda text: print(text, file=sys.stderr),
                       ignore_mask: Optional[str] = None) -> Calibration:
    """Score ``good`` (folder, glob, video, camera or stream URI) with the exported model, set its
    threshold by the same rules training uses (mrkd.runtime.calibration; F1-optimal when ``labelled``,
    an MVTec-style test folder, is given) and rewrite the model's sidecar atomically. The model file is
    not touched (its embedded metadata keeps the export's threshold; the runtime announces when it
    falls back to that); the old threshold is kept as ``previous_threshold``, the frame size the scores
    were taken at as ``frame_size`` (the runtime warns when a run reads frames at another size). Good
    scores far from the ones the model recorded are refused unless ``accept_shift`` (then ``warn``ed):
    mrkd.runtime.calibration.calibration_shift. With ``ignore_mask`` (a mask image's path) the scores are
    taken under it, as `mrkd run` judges a camera with that mask, and its sha256 is recorded (`mrkd run`
    warns where a camera judges under another); the shift check is then against the good scores recorded
    under the same mask only (another mask's, or whole images', are on another scale). Returns the
    Calibration."""
    from mrkd.runtime.detector import Detector
    from mrkd.runtime.images import read_image

    # the labelled folder's and the mask's mistakes are said before a camera is scored for minutes
    paths, labels = labelled_folder(labelled) if labelled else (None, None)
    mask = load_ignore_mask(ignore_mask) if ignore_mask is not None else None
    size = source_options.size if source_options is not None else None
    why = mask is not None and size is not None and mask.resize_misfit(size, "--size resizes the frames to")
    if why:
        raise CalibrationError(why)
    detector = Detector(model_path, backend=backend)
    try:
        note = whole_image_recalibration(detector.metadata.calibration, str(model_path)) if mask is None else None
        if note:
            warn(note)
        good_scores, stats = score_source(detector, good, max_frames=max_frames, progress=progress,
                                          options=source_options, mask=mask)
        labelled_scores = None
        if labelled:
            labelled_scores = masked_scores(detector, [read_image(p) for p in paths], mask).astype(np.float64)
        calibration = calibration_from_scores(
            good_scores, quantile, labels, labelled_scores, method,
            DEFAULT_CONFIDENCE if confidence is None else confidence, source=str(good),
            bad_frames=int(stats.bad_frames), previous_threshold=detector.metadata.threshold,
            frame_size=frame_size_label(source_options.size if source_options else None))
        calibration = dataclasses.replace(calibration, ignore_mask=mask.sha256 if mask is not None else None)
        previous = shift_reference(detector.metadata.calibration, calibration, good_scores)
        check_calibration_shift(previous, good_scores, calibration.threshold, accept_shift, str(model_path), warn)
        metadata = dataclasses.replace(detector.metadata, calibration=calibration)
        if metadata.model_sha256 is None and metadata.engine is None:   # from embedded props: hash it now
            metadata.onnx_sha256 = file_sha256(model_path)
    finally:
        detector.close()
    metadata.save(sidecar_path(model_path))
    logger.info("%s: threshold %s -> %s", model_path, calibration.previous_threshold, calibration.threshold)
    return calibration
