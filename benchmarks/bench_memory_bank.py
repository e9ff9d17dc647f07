"""Fitting the memory bank of ``--score both``: before issue 24 against now, same images, one run.

    mrkd bench --only memory_bank
    python -m mrkd.benchmarks.bench_memory_bank [--quick] [--images 700] [--image-size 256] [--threads 2]

The training images are ELPV solar cells (PyPI ``elpv-dataset``, the first ``images`` files), the model an
EfficientNet-Lite0 with its ImageNet teacher (the student's weights do not change the cost). The previous
fitting (mrkd.benchmarks.memory_bank_previous: three passes, coreset over 200,000 candidates in 128
dimensions) and today's (mrkd.train.memory_bank.fit_memory_bank) run on copies of the same model, each
timed whole. Besides the seconds and their ratio, what each bank is worth: its coverage of the training
patches (mean and 99th-percentile distance from a seeded sample of 20,000 patches to the nearest bank
row, full dimensions: smaller is better) and the two score spreads the "both" head divides by.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import time
import warnings
from pathlib import Path
from typing import Optional


def elpv_images(count: int):
    import elpv_dataset
    folder = Path(elpv_dataset.__file__).parent / "data" / "images"
    paths = sorted(glob.glob(str(folder / "*.png")))
    if len(paths) < count:
        raise ValueError(f"{folder} has {len(paths)} images, {count} asked for")
    return paths[:count]


def coverage(model, paths, bank, samples: int = 20_000) -> dict:
    """Distances (full dimensions) from a seeded sample of the training patches to their nearest bank row."""
    import torch

    from mrkd.train.memory_bank import _loader, training_patches
    patches = training_patches(model, (x for x, _, _, _ in _loader(model, paths, 16)), limit=samples, seed=12345)
    rows, best = patches.rows, None
    for start in range(0, len(bank), 4096):
        part = bank[start:start + 4096]
        d2 = rows.pow(2).sum(1, keepdim=True) - 2 * rows @ part.t() + part.pow(2).sum(1)
        best = d2.amin(1) if best is None else torch.minimum(best, d2.amin(1))
    nearest = best.clamp_min(0).sqrt()
    return {"mean": round(float(nearest.mean()), 4), "p99": round(float(nearest.quantile(0.99)), 4)}


def run(quick: bool = False, image_size: Optional[int] = None, threads: Optional[int] = None,
        images: Optional[int] = None) -> dict:
    import torch

    from mrkd.benchmarks import memory_bank_previous as previous
    from mrkd.train import memory_bank as current
    from mrkd.train.model import build_model

    image_size = image_size or (64 if quick else 256)
    images = images or (24 if quick else 700)
    threads = threads or 2
    torch.set_num_threads(threads)
    paths = elpv_images(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model("efficientnet_lite0", "imagenet", image_size=image_size).eval()
    result = {"images": images, "image_size": image_size, "threads": threads, "backbone": "efficientnet_lite0",
              "coreset_candidates": {"before": previous.CORESET_CANDIDATES, "after": current.CORESET_CANDIDATES},
              "coreset_projection": {"before": previous.CORESET_PROJECTION, "after": current.CORESET_PROJECTION}}
    banks = {}
    for side, fit in (("after", current.fit_memory_bank), ("before", previous.fit_memory_bank)):
        fitted = copy.deepcopy(model)
        started = time.perf_counter()
        cpu = time.process_time()
        kwargs = {"progress": False} if side == "after" else {}
        info = fit(fitted, paths, "both", batch_size=16, **kwargs)
        result[side] = {"seconds": round(time.perf_counter() - started, 2),
                        "cpu_seconds": round(time.process_time() - cpu, 2),
                        "bank_patches": info["bank_patches"],
                        "mrkd_train_score_std": round(info["mrkd_train_score_std"], 5),
                        "knn_train_score_std": round(info["knn_train_score_std"], 5)}
        banks[side] = fitted.head.memory_bank.bank
    for side, bank in banks.items():
        result[side]["coverage"] = coverage(model, paths, bank)
    result["speedup"] = round(result["before"]["seconds"] / result["after"]["seconds"], 2)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke mode (24 images, 64 px)")
    parser.add_argument("--images", type=int, default=None, help="training images (default 700; 24 in --quick)")
    parser.add_argument("--image-size", type=int, default=None, help="input size in pixels (default 256)")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch threads (default 2)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick, args.image_size, args.threads, args.images), indent=2))


if __name__ == "__main__":
    main()
