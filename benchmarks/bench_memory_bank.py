"""Fitting the memory bank of ``--score both``: before issue 24 against now, same images, one run.

    mrkd bench --only memory_bank
    python -m mrkd.benchmarks.bench_memory_bank [--quick] [--images 700] [--image-size 256] [--threads 2]

The training images are ELPV solar cells (PyPI ``elpv-dataset``, the first ``images`` files), the model an
EfficientNet-Lite0 with its ImageNet teacher (the student's weights do not change the cost). The previous
fitting (mrkd.benchmarks.memory_bank_previous: three passes, coreset over 200,000 candidates in 128
dimensions, spreads on every image), today's default (mrkd.train.memory_bank.fit_memory_bank: one
teacher pass, the same coreset by the blocked kernel, spreads on 256 images), the same with spreads on
every image, and the fast option (50,000-patch pool + tail, 64 dims) run on copies of the same model, each timed whole, with its seconds per step. Besides the seconds and their ratio, what each bank is worth: its coverage of the training
patches (mean and 99th-percentile distance from a seeded sample of 20,000 patches to the nearest bank
row, full dimensions: smaller is better) and the two score spreads the "both" head divides by.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

from mrkd.train.elpv import CATEGORIES as ELPV_FOLDERS


def elpv_images(count: int):
    import elpv_dataset
    folder = Path(elpv_dataset.__file__).parent / "data" / "images"
    paths = sorted(glob.glob(str(folder / "*.png")))
    if len(paths) < count:
        raise ValueError(f"{folder} has {len(paths)} images, {count} asked for")
    return paths[:count]


# The previous fitting averaged no neighbourhood (it predates memory_bank.default_pool): every fit here
# takes the same unaveraged patches, so before and after differ in the fitting alone.
SAME_PATCHES = {"pool": 1}


def coverage_sample(model, paths, samples: int = 20_000):
    """A seeded sample of the training patches (one teacher pass), for coverage()."""
    from mrkd.train.memory_bank import _loader, training_patches
    return training_patches(model, (x for x, _, _, _ in _loader(model, paths, 16)), limit=samples,
                            seed=12345).rows


def coverage(rows, bank) -> dict:
    """Distances (full dimensions) from ``rows`` (coverage_sample) to their nearest bank row."""
    from mrkd.train.refit import nearest_distance
    nearest = nearest_distance(rows, bank)
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
    print(f"[memory_bank] load average at the start: {os.getloadavg()}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model("efficientnet_lite0", "imagenet", image_size=image_size).eval()
    model.config.knn_pool = SAME_PATCHES["pool"]      # coverage_sample's patches
    result = {"loadavg_before": [round(v, 2) for v in os.getloadavg()], "images": images, "image_size": image_size, "threads": threads, "backbone": "efficientnet_lite0",
              "coreset_candidates": {"before": previous.CORESET_CANDIDATES, "after": current.CORESET_CANDIDATES},
              "coreset_projection": {"before": previous.CORESET_PROJECTION, "after": current.CORESET_PROJECTION}}
    banks = {}
    fast = {"candidates": current.FAST_CANDIDATES, "projection_dim": current.FAST_PROJECTION,
            "spread_limit": current.FAST_SPREAD_IMAGES, "progress": False, **SAME_PATCHES}
    every_spread = {"spread_limit": images, "progress": False, **SAME_PATCHES}
    sides = (("after", current.fit_memory_bank, {"progress": False, **SAME_PATCHES}),
             ("after_all_spreads", current.fit_memory_bank, every_spread),
             ("fast", current.fit_memory_bank, fast), ("before", previous.fit_memory_bank, {}))
    for side, fit, kwargs in sides:
        fitted = copy.deepcopy(model)
        started = time.perf_counter()
        cpu = time.process_time()
        info = fit(fitted, paths, "both", batch_size=16, **kwargs)
        result[side] = {"seconds": round(time.perf_counter() - started, 2),
                        "cpu_seconds": round(time.process_time() - cpu, 2),
                        "steps_s": info["seconds"], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
                        "bank_patches": info["bank_patches"],
                        "spread_images": info.get("spread_images", images),
                        "mrkd_train_score_std": round(info["mrkd_train_score_std"], 5),
                        "knn_train_score_std": round(info["knn_train_score_std"], 5)}
        print(f"[memory_bank] {side}: {result[side]}", file=sys.stderr)
        banks[side] = fitted.head.memory_bank.bank
    rows = coverage_sample(model, paths)
    for side, bank in banks.items():
        result[side]["coverage"] = coverage(rows, bank)
    result["same_bank_after_before"] = bool(torch.equal(banks["after"], banks["before"]))
    result["shared_bank_rows_after_before"] = _shared_rows(banks["after"], banks["before"])
    result["speedup"] = round(result["before"]["seconds"] / result["after"]["seconds"], 2)
    for side in ("after_all_spreads", "fast"):
        result[f"speedup_{side}"] = round(result["before"]["seconds"] / result[side]["seconds"], 2)
    result["coreset_kernels"] = coreset_kernels(steps=16 if quick else 512,
                                                scale=0.05 if quick else 1.0)
    result["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    print(f"[memory_bank] load average at the end: {os.getloadavg()}", file=sys.stderr)
    return result


def coreset_kernels(steps: int = 512, channels: int = 152, seed: int = 0, scale: float = 1.0) -> list:
    """Milliseconds per greedy step (one centre's distances to every candidate, the running minimum,
    the argmax) for the previous kernel (``p @ c`` with the process's threads), the one-thread fused
    addmv and today's blocked one (_blocked_greedy: same choices), at the previous settings (200k
    candidates, 128 dims) and the fast option's (50k, 64) and the mixes between, on random rows of the
    model's width; ``steps`` steps each, same process. Random Gaussian rows are the blocked kernel's
    worst case (every row about as far as the farthest); the fit's own "coreset" seconds are the real
    one. ``scale``: the candidate counts times this (--quick: 5 %)."""
    import torch

    from mrkd.train.memory_bank import greedy_coreset
    rows = []
    generator = torch.Generator().manual_seed(seed)
    for candidates, dims in ((200_000, 128), (200_000, 64), (50_000, 128), (50_000, 64)):
        candidates = max(2, int(candidates * scale))
        patches = torch.randn(candidates, channels, generator=generator)
        for kernel in ("previous", "addmv", "blocked"):
            seconds = []
            for count in (1, steps):   # the difference leaves out the one-off projection
                started = time.perf_counter()
                if kernel == "previous":
                    _previous_greedy(patches, count, seed, dims)
                else:
                    greedy_coreset(patches, count, seed, dims, kernel=kernel)
                seconds.append(time.perf_counter() - started)
            rows.append({"candidates": candidates, "dims": dims, "kernel": kernel,
                         "ms_per_step": round(1000 * (seconds[1] - seconds[0]) / (steps - 1), 3)})
    return rows


def _shared_rows(a, b) -> float:
    """Fraction of the rows of bank ``a`` that are rows of bank ``b`` (equal to 6 decimals)."""
    keys = {tuple(row) for row in b.numpy().round(6).tolist()}
    return round(sum(tuple(row) in keys for row in a.numpy().round(6).tolist()) / max(1, len(a)), 4)


def _previous_greedy(patches, keep, seed, dims):
    from mrkd.benchmarks.memory_bank_previous import greedy_coreset
    return greedy_coreset(patches, keep, seed, dims)


def bank_coverage(rows, bank) -> dict:
    """Distances (full dimensions) from every row of ``rows`` to its nearest bank row: the largest (the
    quantity greedy k-center minimises: how far the rarest training patch is from the bank) and the mean."""
    from mrkd.train.refit import nearest_distance
    nearest = nearest_distance(rows, bank)
    return {"max": round(float(nearest.max()), 4), "mean": round(float(nearest.mean()), 4)}


def validation(image_size: int = 256, epochs: int = 2, max_train: Optional[int] = 320, seed: int = 0,
               categories=("elpv_mono", "elpv_poly"), threads: int = 1, log=print,
               sides=("before", "after")) -> dict:
    """Quality of the two banks on ELPV's VALIDATION split only (never the test split): one MRKD model
    trained per category, then the previous and today's --score both bank fitted on copies of it, each
    scored by image AUROC on the validation images; plus each bank's coverage of every training patch
    (the candidates both coresets draw from)."""
    import tempfile

    import torch

    from mrkd.benchmarks import memory_bank_previous as previous
    from mrkd.benchmarks.bench_quality import QualitySettings, _auroc, _batches, train_mrkd
    from mrkd.train import memory_bank as current
    from mrkd.train.data import scan_category
    from mrkd.train.elpv import layout_elpv

    torch.set_num_threads(threads)
    settings = QualitySettings(image_size=image_size, epochs=epochs, seeds=(seed,), split="validation",
                               max_train=max_train, threads=threads)
    out = {"split": "validation", "image_size": image_size, "epochs": epochs, "max_train": max_train,
           "seed": seed}
    with tempfile.TemporaryDirectory() as root:
        layout = layout_elpv(Path(root) / "elpv", split="validation", max_train=max_train)
        for category in categories:
            data = scan_category(layout.root, category)
            paths = [item.path for item in data.test_items]
            labels = [item.label for item in data.test_items]
            started = time.perf_counter()
            model = train_mrkd(layout.root, category, settings, "imagenet", seed)
            model.config.knn_pool = SAME_PATCHES["pool"]     # training_patches below
            row = {"train_images": len(data.train_paths), "validation_images": len(paths),
                   "validation_defects": int(sum(labels)), "train_s": round(time.perf_counter() - started, 1)}
            rows = current.training_patches(
                model, (x for x, _, _, _ in current._loader(model, data.train_paths, 16))).rows
            fits = {"before": (previous.fit_memory_bank, {}),
                    "after": (current.fit_memory_bank, {"progress": False, **SAME_PATCHES}),
                    "after_pool_only": (current.fit_memory_bank, {"progress": False, "tail": 0.0, **SAME_PATCHES}),
                    "after_spread256": (current.fit_memory_bank,
                                        {"progress": False, "spread_limit": current.FAST_SPREAD_IMAGES,
                                         **SAME_PATCHES}),
                    "fast": (current.fit_memory_bank,
                             {"progress": False, "candidates": current.FAST_CANDIDATES,
                              "projection_dim": current.FAST_PROJECTION,
                              "spread_limit": current.FAST_SPREAD_IMAGES, **SAME_PATCHES}),
                    # today's fit with the neighbourhood averaging of the model's input size
                    # (memory_bank.default_pool): what `mrkd train` ships
                    "after_default_pool": (current.fit_memory_bank, {"progress": False})}
            for side in sides:
                fit, kwargs = fits[side]
                fitted = copy.deepcopy(model)
                started = time.perf_counter()
                info = fit(fitted, data.train_paths, "both", current.DEFAULT_FRACTION, seed, **kwargs)
                fit_s = time.perf_counter() - started
                with torch.no_grad():
                    scores = torch.cat([fitted.scores(x) for x in _batches(paths, fitted.config)])
                row[side] = {"image_auroc": round(_auroc(labels, scores), 4), "fit_s": round(fit_s, 1),
                             "bank_patches": info["bank_patches"], "pool": fitted.head.memory_bank.pool,
                             # coverage of the unaveraged training patches: only for banks of those
                             "coverage": bank_coverage(rows, fitted.head.memory_bank.bank)
                             if fitted.head.memory_bank.pool == SAME_PATCHES["pool"] else None}
                log(f"[memory_bank validation] {category} {side}: {row[side]}")
            if "before" in row and "after" in row:
                row["auroc_change"] = round(row["after"]["image_auroc"] - row["before"]["image_auroc"], 4)
            if "after" in row and "after_default_pool" in row:
                row["pool_auroc_change"] = round(row["after_default_pool"]["image_auroc"]
                                                 - row["after"]["image_auroc"], 4)
            out[category] = row
    return out


ELPV_CATEGORIES = tuple(ELPV_FOLDERS.values())        # elpv_mono, elpv_poly
VALIDATION_SIDES = ("before", "after", "after_pool_only", "after_spread256", "fast", "after_default_pool")


def comma_list(choices):
    """An argparse type: comma-separated names, each one of ``choices`` (a wrong one is a one-line usage
    error before anything runs; it was a traceback after the ELPV layout had been written)."""
    def parse(text: str):
        names = tuple(name.strip() for name in text.split(",") if name.strip())
        wrong = [name for name in names if name not in choices]
        if wrong or not names:
            raise argparse.ArgumentTypeError(f"{', '.join(map(repr, wrong)) or repr(text)}: expected "
                                             f"comma-separated names of {', '.join(choices)}")
        return names
    return parse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke mode (24 images, 64 px)")
    parser.add_argument("--images", type=int, default=None, help="training images (default 700; 24 in --quick)")
    parser.add_argument("--image-size", type=int, default=None, help="input size in pixels (default 256)")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch threads (default 2)")
    parser.add_argument("--validation", action="store_true",
                        help="instead: image AUROC of both banks on ELPV's validation split (trains MRKD)")
    parser.add_argument("--epochs", type=int, default=2, help="--validation: training epochs")
    parser.add_argument("--max-train", type=int, default=320, help="--validation: training cells per category")
    parser.add_argument("--sides", default=("before", "after"), type=comma_list(VALIDATION_SIDES),
                        help="--validation: which fits (before, after, after_pool_only: no tail, "
                             "after_spread256: spreads on 256 images, fast, after_default_pool: patches "
                             "averaged as shipped at this size)")
    parser.add_argument("--seed", type=int, default=0, help="--validation: training and bank seed")
    parser.add_argument("--categories", default=ELPV_CATEGORIES, type=comma_list(ELPV_CATEGORIES),
                        help=f"--validation: ELPV categories, comma-separated ({', '.join(ELPV_CATEGORIES)})")
    args = parser.parse_args(argv)
    if args.validation:
        print(json.dumps(validation(args.image_size or 256, args.epochs, args.max_train,
                                    seed=args.seed, categories=args.categories,
                                    threads=args.threads or 1,
                                    sides=args.sides), indent=2))
        return
    print(json.dumps(run(args.quick, args.image_size, args.threads, args.images), indent=2))


if __name__ == "__main__":
    main()
