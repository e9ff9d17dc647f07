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
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

from mrkd.runtime.metadata import calibration_fields, sidecar_path
from mrkd.runtime.sources import SourceStats, open_source

logger = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """The source gave nothing to calibrate on, or a live source has no frame limit."""


def labelled_folder(folder) -> Tuple[List[str], np.ndarray]:
    """(paths, labels) from an MVTec-style test folder: ``good/`` holds label 0, every other
    sub-folder (a defect type) label 1. Errors name the folder when a side is missing."""
    from mrkd.runtime.images import is_image_file
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"missing folder {folder} (labelled images: good/ and one sub-folder per defect type)")
    paths, labels = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        images = sorted(str(p) for p in sub.iterdir() if p.is_file() and is_image_file(p))
        paths += images
        labels += [0 if sub.name == "good" else 1] * len(images)
    labels = np.asarray(labels, dtype=np.int64)
    if not (labels == 0).any() or not (labels == 1).any():
        raise CalibrationError(f"{folder}: labelled calibration needs a good/ sub-folder and at least one defect "
                               f"sub-folder with images (found {int((labels == 0).sum())} good, "
                               f"{int(labels.sum())} defective)")
    return paths, labels


def score_source(detector, uri, max_frames: Optional[int] = None, batch_size: int = 8,
                 progress: bool = True) -> Tuple[np.ndarray, SourceStats]:
    """Scores of the frames of ``uri`` (any source open_source takes), in batches; bad frames are
    skipped and counted by the source. A live source (camera, stream) needs ``max_frames``."""
    from tqdm import tqdm
    source = open_source(uri, reconnect=False)
    if source.live and not max_frames:
        source.close()
        raise CalibrationError(f"{uri}: a live source never ends; give a frame limit (--max-frames)")
    scores, pending, seen = [], [], 0
    try:
        with tqdm(total=max_frames, desc="calibration frames", unit="frame", disable=not progress) as bar:
            for frame in source:
                pending.append(frame.image)
                seen += 1          # counted here: a disabled tqdm does not count
                bar.update()
                if len(pending) == batch_size:
                    scores.append(detector(pending).scores)
                    pending = []
                if max_frames and seen >= max_frames:
                    break
            if pending:
                scores.append(detector(pending).scores)
    finally:
        source.close()
    if not scores:
        raise CalibrationError(f"{uri}: no usable frames to calibrate on "
                               f"({source.stats.bad_frames} bad frame(s); {source.stats.last_error or 'none read'})")
    return np.concatenate(scores).astype(np.float64), source.stats


def calibrate_exported(model_path: Union[str, Path], good, labelled=None, quantile: float = 0.99,
                       method: str = "quantile", confidence: Optional[float] = None,
                       max_frames: Optional[int] = None, backend: str = "auto", progress: bool = True) -> dict:
    """Score ``good`` (folder, glob, video, camera or stream URI) with the exported model, set its
    threshold by the same rules training uses (mrkd.train.calibrate; F1-optimal when ``labelled``, an
    MVTec-style test folder, is given) and rewrite the model's sidecar atomically. The model file is
    not touched; the old threshold is kept in the sidecar's ``extra["calibration"]``. Returns the
    calibration dict."""
    from mrkd.runtime.detector import Detector
    from mrkd.runtime.images import read_image
    # The threshold rules are numpy (scipy for "tolerance") and shared with training; no PyTorch.
    from mrkd.train.calibrate import TOLERANCE_CONFIDENCE, calibration_from_scores

    detector = Detector(model_path, backend=backend)
    try:
        good_scores, stats = score_source(detector, good, max_frames=max_frames, progress=progress)
        labels = labelled_scores = None
        if labelled:
            paths, labels = labelled_folder(labelled)
            labelled_scores = detector([read_image(p) for p in paths]).scores.astype(np.float64)
        calibration = calibration_from_scores(good_scores, quantile, labels, labelled_scores, method,
                                              TOLERANCE_CONFIDENCE if confidence is None else confidence)
        calibration.update(source=str(good), bad_frames=int(stats.bad_frames),
                           previous_threshold=detector.metadata.threshold)
        threshold, score_norm = calibration_fields(calibration)
        metadata = dataclasses.replace(detector.metadata, threshold=threshold, score_norm=score_norm,
                                       extra={**detector.metadata.extra, "calibration": calibration})
    finally:
        detector.close()
    metadata.save(sidecar_path(model_path))
    logger.info("%s: threshold %s -> %s", model_path, calibration["previous_threshold"], threshold)
    return calibration
