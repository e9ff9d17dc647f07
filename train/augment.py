"""MRKD's image-level masking (ILM): swap rectangular patches from a source image into a training
image, in the style of Natural Synthetic Anomalies (NSA, Schlüter et al. 2022).

The student decoder sees the patched image and must reproduce the teacher's features of the clean
one, so it learns to "repair" foreign content. Settings follow the official MRKD training script:
patch half-widths drawn from gamma(shape, scale) + offset (fractions of the image side) and clipped to
per-category bounds; the first patch always, each further one on a coin flip; the patch moved to a
random new place; plain replacement ('swap', no Poisson blending). For objects, an object mask
(|mean intensity - background| > threshold, median-filtered) keeps patches on the object.

numpy + OpenCV only (no torch), so it also runs inside DataLoader workers cheaply.
"""

from __future__ import annotations

from mrkd.errors import SettingError

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Tuple

import cv2
import numpy as np

Bounds = Tuple[Tuple[float, float], Tuple[float, float]]


@dataclass(frozen=True)
class PatchSwapConfig:
    """How patches are drawn. Widths are half-widths as fractions of (height, width).

    skip_background: None (textures: patches anywhere) or (background_value, threshold): a pixel is
    object when |mean over channels - background_value| > threshold. background_value None means
    "estimate it as the median of the image border" (works for dark and bright backgrounds alike).
    """

    width_bounds_pct: Bounds = ((0.03, 0.4), (0.03, 0.4))
    num_patches: int = 4
    gamma_params: Tuple[float, float, float] = (2.0, 0.05, 0.03)   # shape, scale, offset
    skip_background: Optional[Tuple[Optional[float], float]] = None
    min_object_pct: float = 0.7
    min_overlap_pct: float = 0.25
    max_attempts: int = 200

    def __post_init__(self):
        for axis, (low, high) in enumerate(self.width_bounds_pct):
            if not 0 <= low <= high <= 0.5:
                raise SettingError(f"width_bounds_pct[{axis}] must satisfy 0 <= low <= high <= 0.5, "
                                 f"got {(low, high)}")
        if self.num_patches < 1:
            raise SettingError(f"num_patches must be >= 1, got {self.num_patches}")
        if self.max_attempts < 1:
            raise SettingError(f"max_attempts must be >= 1, got {self.max_attempts}")


PRESETS: Dict[str, PatchSwapConfig] = {
    # Official settings of the large-patch textures (carpet, leather).
    "texture": PatchSwapConfig(width_bounds_pct=((0.03, 0.4), (0.03, 0.4)), num_patches=4),
    # Official 'bottle'/'hazelnut'-style objects, with the background value estimated per image.
    "object": PatchSwapConfig(width_bounds_pct=((0.03, 0.35), (0.03, 0.35)), num_patches=3,
                              skip_background=(None, 20.0), min_object_pct=0.7, min_overlap_pct=0.25),
}

MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
MVTEC_OBJECTS = ("bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush",
                 "transistor", "zipper")
MVTEC_KIND: Dict[str, str] = {**{name: "texture" for name in MVTEC_TEXTURES},
                              **{name: "object" for name in MVTEC_OBJECTS}}

# The official per-category settings for MVTec AD (main.py of yuxin-jiang/MRKD):
# (width_bounds_pct, num_patches, skip_background, min_object_pct, min_overlap_pct).
_MVTEC_OFFICIAL = {
    "bottle": (((0.03, 0.4), (0.03, 0.4)), 3, (200, 60), 0.7, 0.25),
    "cable": (((0.01, 0.05), (0.01, 0.1)), 3, None, None, None),
    "capsule": (((0.01, 0.05), (0.01, 0.05)), 1, (200, 60), 0.7, 0.25),
    "hazelnut": (((0.03, 0.35), (0.03, 0.35)), 3, (20, 20), 0.7, 0.25),
    "metal_nut": (((0.01, 0.05), (0.01, 0.01)), 1, (20, 20), 0.5, 0.25),
    "pill": (((0.01, 0.05), (0.01, 0.05)), 1, (20, 20), 0.7, 0.25),
    "screw": (((0.01, 0.05), (0.01, 0.05)), 1, (200, 60), 0.5, 0.25),
    "toothbrush": (((0.01, 0.01), (0.01, 0.01)), 1, (20, 20), 0.25, 0.25),
    "transistor": (((0.03, 0.4), (0.03, 0.4)), 3, None, None, None),
    "zipper": (((0.01, 0.05), (0.01, 0.01)), 1, (200, 60), 0.7, 0.25),
    "carpet": (((0.03, 0.4), (0.03, 0.4)), 4, None, None, None),
    "grid": (((0.01, 0.05), (0.01, 0.1)), 4, None, None, None),
    "leather": (((0.03, 0.4), (0.03, 0.4)), 4, None, None, None),
    "tile": (((0.01, 0.05), (0.01, 0.1)), 4, None, None, None),
    "wood": (((0.01, 0.05), (0.01, 0.01)), 4, None, None, None),
}

CATEGORY_FILE = "mrkd_category.json"


def mvtec_official_config(category: str) -> PatchSwapConfig:
    """The official MRKD ILM settings of one MVTec AD category."""
    bounds, num_patches, background, min_object, min_overlap = _MVTEC_OFFICIAL[category]
    return PatchSwapConfig(width_bounds_pct=bounds, num_patches=num_patches,
                           skip_background=None if background is None else (float(background[0]),
                                                                            float(background[1])),
                           min_object_pct=0.7 if min_object is None else min_object,
                           min_overlap_pct=0.25 if min_overlap is None else min_overlap)


def preset_for(category: str, root=None) -> PatchSwapConfig:
    """The ILM settings for ``category``.

    Order: ``<root>/<category>/mrkd_category.json`` ({"kind": "texture"|"object"}, optionally
    "background": [value, threshold], value null = estimate from the border), then the official
    settings of the 15 MVTec AD categories, then the "texture" preset.
    """
    if root is not None:
        path = Path(root) / category / CATEGORY_FILE
        if path.is_file():
            try:
                info = json.loads(path.read_text(encoding="utf-8"))
                kind = info["kind"]
            except (ValueError, KeyError, TypeError) as exc:
                raise SettingError(f"{path}: expected JSON like {{\"kind\": \"object\"}} ({exc})") from exc
            if kind not in PRESETS:
                raise SettingError(f"{path}: kind must be one of {sorted(PRESETS)}, got {kind!r}")
            config = PRESETS[kind]
            if "background" in info:
                value, threshold = info["background"]
                config = replace(config, skip_background=(None if value is None else float(value),
                                                          float(threshold)))
            return config
    if category in _MVTEC_OFFICIAL:
        return mvtec_official_config(category)
    return PRESETS["texture"]


def object_mask(image: np.ndarray, background: Optional[float], threshold: float) -> np.ndarray:
    """uint8 0/1 HxW: pixels whose mean intensity differs from the background by more than threshold,
    median-filtered (7×7) to remove grain. background None: the median of the image's border."""
    # Work on the channel sum against channels*background: exact in float32 for 8-bit input, so
    # pixels exactly at the threshold fall on the same side as with a float64 mean.
    channels = 1 if image.ndim == 2 else image.shape[2]
    if image.ndim == 2:
        total = image.astype(np.float32)
    else:   # cv2.transform is ~20x faster than ndarray.sum(axis=2); on uint8 it would saturate
        total = cv2.transform(image.astype(np.float32), np.ones((1, channels), np.float32))
    if background is None:
        border = np.concatenate([total[0], total[-1], total[:, 0], total[:, -1]])
        background = float(np.median(border)) / channels
    distance = cv2.absdiff(total, (float(background) * channels, 0.0, 0.0, 0.0))
    mask = cv2.threshold(distance, float(threshold) * channels, 1.0, cv2.THRESH_BINARY)[1].astype(np.uint8)
    return binary_median7(mask)


def binary_median7(mask: np.ndarray) -> np.ndarray:
    """7×7 median of a 0/1 uint8 mask with replicated borders (== cv2.medianBlur(mask, 7)).

    For binary input the median is a majority vote (more than 24 of 49 ones), and a box sum is
    several times faster than the generic median filter.
    """
    votes = cv2.boxFilter(mask, cv2.CV_16U, (7, 7), normalize=False, borderType=cv2.BORDER_REPLICATE)
    return (votes > 24).astype(np.uint8)


def _box_sums(integral: np.ndarray, y0, y1, x0, x1) -> np.ndarray:
    """Sums of boxes [y0:y1, x0:x1] (vectorised) from a cv2.integral table."""
    return integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]


class PatchSwap:
    """ILM augmentation: ``PatchSwap(config)(dest, src, rng) -> (augmented, changed_mask)``.

    dest and src are uint8 HxWx3 (or HxW) images of the same shape; the result has dest's shape and
    the mask (uint8 0/1, HxW) marks exactly the pixels whose value changed.
    """

    def __init__(self, config: PatchSwapConfig = PRESETS["texture"]):
        self.config = config

    def __repr__(self):
        return f"PatchSwap({self.config})"

    def __call__(self, dest: np.ndarray, src: np.ndarray,
                 rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        if dest.shape != src.shape:
            raise ValueError(f"dest and src must have the same shape, got {dest.shape} and {src.shape}")
        if dest.dtype != np.uint8 or src.dtype != np.uint8:
            raise ValueError(f"PatchSwap expects uint8 images, got {dest.dtype} and {src.dtype}")
        if dest.ndim not in (2, 3):
            raise ValueError(f"PatchSwap expects HxW or HxWxC images, got shape {dest.shape}")
        cfg = self.config
        if cfg.skip_background is not None:
            background, threshold = cfg.skip_background
            src_obj = object_mask(src, background, threshold)
            dest_obj = object_mask(dest, background, threshold)
            src_integral = cv2.integral(src_obj)
        else:
            src_obj = dest_obj = src_integral = None

        out = dest.copy()
        changed = np.zeros(dest.shape[:2], np.uint8)
        for index in range(cfg.num_patches):
            if index == 0 or rng.integers(2) > 0:   # the first patch always, the others on a coin flip
                box = self._swap_one(out, src, src_obj, dest_obj, src_integral, rng)
                if box is not None:
                    # Compare only inside the pasted box: a copied pixel may equal the one it replaced.
                    y0, y1, x0, x1 = box
                    diff = out[y0:y1, x0:x1] != dest[y0:y1, x0:x1]
                    changed[y0:y1, x0:x1] = diff.any(axis=2) if diff.ndim == 3 else diff
        return out, changed

    def _swap_one(self, out, src, src_obj, dest_obj, src_integral, rng):
        """Copy one patch of src into out (in place); returns the destination box (y0, y1, x0, x1),
        or None when no place satisfied the object rules."""
        cfg = self.config
        height, width = out.shape[:2]
        (lo1, hi1), (lo2, hi2) = cfg.width_bounds_pct
        min1, max1 = int(round(lo1 * height)), max(1, int(round(hi1 * height)))
        min2, max2 = int(round(lo2 * width)), max(1, int(round(hi2 * width)))
        shape, scale, offset = cfg.gamma_params
        half1 = int(np.clip((offset + rng.gamma(shape, scale)) * height, max(1, min1), max1))
        half2 = int(np.clip((offset + rng.gamma(shape, scale)) * width, max(1, min2), max2))

        # Source box: centres drawn for all attempts at once; the first acceptable one wins.
        attempts = cfg.max_attempts if src_obj is not None else 1
        c1 = rng.integers(min1, max(min1 + 1, height - min1), size=attempts)
        c2 = rng.integers(min2, max(min2 + 1, width - min2), size=attempts)
        y0, y1 = np.clip(c1 - half1, 0, height), np.clip(c1 + half1, 0, height)
        x0, x1 = np.clip(c2 - half2, 0, width), np.clip(c2 + half2, 0, width)
        area = (y1 - y0) * (x1 - x0)
        ok = area > 0
        if src_obj is not None:
            on_object = _box_sums(src_integral, y0, y1, x0, x1) / np.maximum(area, 1)
            ok &= on_object > cfg.min_object_pct
        candidates = np.flatnonzero(ok)
        if candidates.size == 0:
            return None
        pick = candidates[0]
        sy0, sy1, sx0, sx1 = int(y0[pick]), int(y1[pick]), int(x0[pick]), int(x1[pick])
        patch_h, patch_w = sy1 - sy0, sx1 - sx0

        # Destination: a random place where the whole patch fits.
        attempts = cfg.max_attempts if src_obj is not None else 1
        d1 = rng.integers(0, height - patch_h + 1, size=attempts)
        d2 = rng.integers(0, width - patch_w + 1, size=attempts)
        if src_obj is None:
            dy, dx = int(d1[0]), int(d2[0])
            out[dy:dy + patch_h, dx:dx + patch_w] = src[sy0:sy1, sx0:sx1]
            return dy, dy + patch_h, dx, dx + patch_w

        src_patch_obj = src_obj[sy0:sy1, sx0:sx1]
        src_count = int(src_patch_obj.sum())
        for dy, dx in zip(d1.tolist(), d2.tolist()):
            dest_region = dest_obj[dy:dy + patch_h, dx:dx + patch_w]
            overlap = np.count_nonzero(dest_region & src_patch_obj)
            if overlap > cfg.min_overlap_pct * src_count:
                # Only object pixels travel (source object, or destination object they cover).
                keep = (src_patch_obj | dest_region).astype(bool)
                region = out[dy:dy + patch_h, dx:dx + patch_w]
                region[keep] = src[sy0:sy1, sx0:sx1][keep]
                return dy, dy + patch_h, dx, dx + patch_w
        return None
