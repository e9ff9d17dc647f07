"""What ``--score both`` costs at inference against ``--score mrkd``: latency and graph size.

    mrkd bench --only score_cost
    python -m mrkd.benchmarks.bench_score_cost [--quick] [--image-size 256] [--patches 8192]

One EfficientNet-Lite0 model (ImageNet teacher) exported twice to ONNX (FP32, map and score in the
graph): once as it is (``mrkd``), once with a memory bank of ``patches`` training-like patches and the
head of ``both``. The bank's values do not change the cost, only its size does, so a seeded random bank
stands in for a fitted one. Both graphs run in ONNX Runtime on the CPU, batch 1, alternated run by run
in this process (medians and the paired ratio). The bank size defaults to the trainer's cap
(mrkd.train.memory_bank.DEFAULT_MAX_PATCHES): the most a default training run puts into the graph.
Where the default averages the bank's patches (256 px and up, memory_bank.default_pool), a third graph
without that averaging (``both_unpooled``) shows what the AveragePool costs.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np


def run(quick: bool = False, image_size: Optional[int] = None, threads: Optional[int] = None,
        patches: Optional[int] = None, repeats: Optional[int] = None) -> dict:
    import torch

    from mrkd.export import ExportOptions, export_onnx
    from mrkd.export.ort import cpu_session, run as ort_run
    from mrkd.train.memory_bank import BOTH_SCALE_WEIGHTS, DEFAULT_MAX_PATCHES, MemoryBank, default_pool
    from mrkd.train.model import build_model

    image_size = image_size or (64 if quick else 256)
    patches = patches or (256 if quick else DEFAULT_MAX_PATCHES)
    repeats = repeats or (3 if quick else 30)
    threads = threads or 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model("efficientnet_lite0", "imagenet", image_size=image_size).eval()
    channels = sum(model.teacher(torch.zeros(1, 3, 64, 64))[i].shape[1] for i in (1, 2))
    options = ExportOptions()
    sessions, sizes = {}, {}
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pool = default_pool(image_size)     # as shipped
        for score in ("mrkd", "both") + (("both_unpooled",) if pool > 1 else ()):
            if score != "mrkd":
                bank = torch.randn(patches, channels, generator=torch.Generator().manual_seed(0)).abs()
                model.head.set_memory_bank(MemoryBank(bank, pool=pool if score == "both" else 1), 1.0)
                model.head.scale_weights = BOTH_SCALE_WEIGHTS
            path = Path(folder) / f"{score}.onnx"
            export_onnx(model, path, options)   # simplified as `mrkd-export` does (constants folded)
            sizes[score] = path.stat().st_size
            sessions[score] = cpu_session(str(path), threads)
        x = np.random.default_rng(0).standard_normal((1, 3, image_size, image_size)).astype(np.float32)
        samples = {score: [] for score in sessions}
        for index in range(repeats + 2):
            for score, session in sessions.items():
                started = time.perf_counter()
                ort_run(session, x)
                if index >= 2:   # two warm-up runs each
                    samples[score].append(time.perf_counter() - started)
    mrkd_ms, both_ms = (1000 * statistics.median(samples[s]) for s in ("mrkd", "both"))
    paired = sorted(b / a for a, b in zip(samples["mrkd"], samples["both"]))
    pooling = {}
    if "both_unpooled" in samples:
        unpooled = sorted(b / a for a, b in zip(samples["both_unpooled"], samples["both"]))
        pooling = {"pool": pool, "both_unpooled_ms": round(1000 * statistics.median(samples["both_unpooled"]), 2),
                   "pooled_vs_unpooled_paired_median": round(unpooled[len(unpooled) // 2], 3)}
    return {**pooling, "image_size": image_size, "bank_patches": patches, "bank_channels": channels,
            "bank_mb": round(patches * channels * 4 / 2 ** 20, 2), "threads": threads, "repeats": repeats,
            "mrkd_ms": round(mrkd_ms, 2), "both_ms": round(both_ms, 2),
            "both_vs_mrkd_latency": round(both_ms / mrkd_ms, 2),
            "both_vs_mrkd_paired_median": round(paired[len(paired) // 2], 2),
            "graph_mb_mrkd": round(sizes["mrkd"] / 2 ** 20, 2), "graph_mb_both": round(sizes["both"] / 2 ** 20, 2)}


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the code runs, numbers mean nothing")
    parser.add_argument("--image-size", type=int, default=None, help="pixels (default 256; 64 with --quick)")
    parser.add_argument("--patches", type=int, default=None, help="bank patches (default: the trainer's cap, 8192)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per graph (default 30)")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick, image_size=args.image_size, threads=args.threads,
                         patches=args.patches, repeats=args.repeats), indent=2))
