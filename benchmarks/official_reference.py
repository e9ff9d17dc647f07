"""Baselines that re-implement the official MRKD/RD4AD evaluation code, slow parts included.

They exist to be compared against: the tests check mrkd's fast metrics against them and the
benchmarks time mrkd against them. Each keeps the official algorithm's semantics *and* its cost
profile (the Python loops), written from the facts of the official test.py, not copied.
"""

from __future__ import annotations

import numpy as np

from mrkd.deps import require

# skimage.measure.label's default for 2-D images is full connectivity: the 8 neighbours.
_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def _region_pixel_coords(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rows, cols) of every connected region of one mask, like ``regionprops(label(mask))[i].coords``."""
    ndimage = require("scipy.ndimage")
    labelled, _ = ndimage.label(mask, structure=_EIGHT_NEIGHBOURS)
    coords = []
    for index, box in enumerate(ndimage.find_objects(labelled), start=1):
        rows, cols = np.nonzero(labelled[box] == index)
        coords.append((rows + box[0].start, cols + box[1].start))
    return coords


def official_compute_pro(masks: np.ndarray, amaps: np.ndarray, num_th: int = 200) -> float:
    """AUPRO the way the official ``compute_pro`` computes it: a pandas table, one row per threshold.

    For every threshold of ``np.arange(min, max, (max - min) / num_th)`` the maps are binarised
    (``> th``), every mask is labelled again and each region's overlap is summed pixel by pixel
    in Python; FPR counts flagged defect-free pixels. Rows with FPR < 0.3 are kept, FPR divided by
    its largest kept value, and the area taken with ``sklearn.metrics.auc``.
    """
    pd = require("pandas", "the official-reference AUPRO builds a pandas table")
    auc = require("sklearn.metrics").auc
    masks = np.asarray(masks)
    amaps = np.asarray(amaps)
    if amaps.ndim != 3 or masks.shape != amaps.shape:
        raise ValueError(f"masks {masks.shape} and amaps {amaps.shape} must be the same N×H×W shape")
    if set(np.unique(masks).tolist()) != {0, 1}:
        raise ValueError("masks must hold both 0 and 1 (the official code asserts this)")

    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / num_th
    rows = []  # modern pandas has no DataFrame.append: collect rows, build the table once
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[amaps <= th] = False
        binary_amaps[amaps > th] = True

        pros = []
        for binary_amap, mask in zip(binary_amaps, masks):
            for region_rows, region_cols in _region_pixel_coords(mask):
                tp_pixels = binary_amap[region_rows, region_cols].sum()
                pros.append(tp_pixels / region_rows.size)

        inverse_masks = 1 - masks
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        rows.append({"pro": float(np.mean(pros)), "fpr": fp_pixels / inverse_masks.sum(), "threshold": th})

    table = pd.DataFrame(rows, columns=["pro", "fpr", "threshold"])
    table = table[table["fpr"] < 0.3].copy()
    table["fpr"] = table["fpr"] / table["fpr"].max()
    return float(auc(table["fpr"], table["pro"]))
