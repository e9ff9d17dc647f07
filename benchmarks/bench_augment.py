"""ILM augmentation throughput per CPU core at 256 px, against a plain copy+resize baseline.

    python -m mrkd.benchmarks.bench_augment [--quick]
"""

from __future__ import annotations

import time

import cv2
import numpy as np

from mrkd.train.augment import PRESETS, PatchSwap
from mrkd.train.synthetic import render_good

SIZE = 256


def _images_per_second(step, count: int) -> float:
    step(0)   # warm-up
    started = time.perf_counter()
    for index in range(count):
        step(index)
    return count / (time.perf_counter() - started)


def run(quick: bool = False) -> dict:
    """images/s on one core for the texture and object presets and for copy+resize, same process."""
    previous_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        count = 200 if quick else 2000
        pool = 8
        textures = [render_good("grain", np.random.default_rng(i), SIZE) for i in range(pool)]
        objects = [render_good("washer", np.random.default_rng(i), SIZE) for i in range(pool)]
        larger = [cv2.resize(image, (SIZE * 2, SIZE * 2)) for image in textures]
        rng = np.random.default_rng(0)

        def baseline(index):
            cv2.resize(larger[index % pool].copy(), (SIZE, SIZE), interpolation=cv2.INTER_AREA)

        def swap_step(swap, images):
            return lambda index: swap(images[index % pool], images[(index + 1) % pool], rng)

        results = {"image_size": SIZE, "threads": 1, "count": count,
                   "baseline_copy_resize_ips": _images_per_second(baseline, count)}
        for name, images in (("texture", textures), ("object", objects)):
            ips = _images_per_second(swap_step(PatchSwap(PRESETS[name]), images), count)
            results[f"{name}_ips"] = ips
            results[f"{name}_vs_baseline"] = ips / results["baseline_copy_resize_ips"]
        return results
    finally:
        cv2.setNumThreads(previous_threads)


if __name__ == "__main__":
    from mrkd.benchmarks.module_main import benchmark_main
    benchmark_main(__doc__, run)
