"""Anomaly heat-map over an image (numpy + OpenCV only): used by alarm snapshots and by training plots."""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np


def heatmap_overlay(bgr_uint8: np.ndarray, amap: np.ndarray, vmin: Optional[float] = None,
                    vmax: Optional[float] = None, alpha: float = 0.5) -> np.ndarray:
    """Blend a JET-coloured anomaly map over a BGR image; returns uint8 H×W×3 BGR.

    ``amap`` (2-D float) is stretched over the whole image when sizes differ (matching the
    ``"resize"`` pre-processing; crop the image first for ``"center_crop"``). Values are scaled
    from ``vmin``..``vmax`` (default: the map's own min..max) to the colour map's blue..red and
    clipped, so fixing vmin/vmax (e.g. 0 and the alarm threshold) makes frames comparable.
    ``alpha`` is the weight of the heat-map: 0 gives the image, 1 the colours only.
    """
    image = np.asarray(bgr_uint8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"bgr_uint8 must be uint8 H×W×3, got {image.dtype} {image.shape}")
    amap = np.asarray(amap, dtype=np.float32)
    if amap.ndim != 2 or amap.size == 0:
        raise ValueError(f"amap must be a non-empty 2-D array, got shape {amap.shape}")
    if not np.isfinite(amap).all():
        raise ValueError("amap contains NaN/inf")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")

    height, width = image.shape[:2]
    if amap.shape != (height, width):
        amap = cv2.resize(amap, (width, height), interpolation=cv2.INTER_LINEAR)
    low = float(amap.min()) if vmin is None else float(vmin)
    high = float(amap.max()) if vmax is None else float(vmax)
    span = high - low
    scaled = np.zeros_like(amap) if span <= 0 else np.clip((amap - low) / span, 0.0, 1.0)
    heat = cv2.applyColorMap(np.round(scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(heat, alpha, image, 1.0 - alpha, 0.0)
