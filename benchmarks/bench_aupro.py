"""AUPRO speed: mrkd.train.metrics.aupro against the official pandas-loop algorithm.

Both run on the same synthetic test set (defect regions blurred into noisy anomaly maps) in this
process; the result holds both times, the speed-up and how far apart the two values are.

    python -m mrkd.benchmarks.bench_aupro [--quick]
"""

from __future__ import annotations

import time

import numpy as np

from mrkd.benchmarks.official_reference import official_compute_pro
from mrkd.train.metrics import aupro


def synthetic_masks_and_maps(num_images: int, size: int, regions_per_image: int = 3,
                             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Masks with a few elliptic defects each, and float32 maps that are high on them, blurred and noisy.

    The blur spreads the map beyond the defect edge and the noise creates false positives, so
    PRO and FPR both move across the threshold range as on a real model's output.
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    masks = np.zeros((num_images, size, size), dtype=bool)
    for image in masks:
        for _ in range(regions_per_image):
            cy, cx = rng.uniform(0.1, 0.9, 2) * size
            ry, rx = rng.uniform(0.02, 0.12, 2) * size
            image |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    sigma = max(size / 64, 1.0)
    maps = np.empty(masks.shape, dtype=np.float32)
    for index, mask in enumerate(masks):
        signal = gaussian_filter(mask * rng.uniform(0.3, 1.0), sigma)  # some defects are faint
        noise = gaussian_filter(rng.normal(size=mask.shape), sigma)
        maps[index] = signal + 0.15 * noise / noise.std()  # blotchy background of a fixed strength
    return masks, maps


def _timed(fn, *args, repeats: int = 1):
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn(*args)
        best = min(best, time.perf_counter() - start)
    return value, best


def run(quick: bool = False) -> dict:
    """Time both AUPRO implementations on one synthetic set; return seconds, speed-up and |difference|."""
    num_images, size = (8, 128) if quick else (40, 256)
    masks, maps = synthetic_masks_and_maps(num_images, size, regions_per_image=3, seed=0)
    official_value, official_s = _timed(official_compute_pro, masks, maps, 200)
    fast_value, fast_s = _timed(aupro, masks, maps, 0.3, 200, repeats=3)
    return {
        "bench": "aupro",
        "num_images": num_images,
        "image_size": size,
        "num_thresholds": 200,
        "official_loop_s": official_s,
        "mrkd_aupro_s": fast_s,
        "speedup": official_s / fast_s,
        "official_value": official_value,
        "mrkd_value": fast_value,
        "abs_difference": abs(official_value - fast_value),
    }


if __name__ == "__main__":
    from mrkd.benchmarks.module_main import benchmark_main
    benchmark_main(__doc__, run)
