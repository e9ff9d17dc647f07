"""Training throughput (images/s) with the speed-ups of mrkd.train (feature cache, fast teacher,
allocator), against today's trainer (all off) on the same images and seed, in the same run.

    mrkd bench --only train                      # Lite0, 256 px, batch 16, 2 threads
    python -m mrkd.benchmarks.bench_train [--quick]

Variants (each a full ``train()`` call; throughput is the summary's ``images_per_second``: epochs'
wall time, the feature cache's one pass over the clean images included):

* ``baseline``: ``feature_cache="off", fast_teacher=False, allocator="system"`` — the model's teacher
  on the clean and on the patch-swapped image in every step, glibc's default malloc (the trainer
  before the speed-ups);
* ``fast_teacher``: the teacher copy with BatchNorm folded and channels-last weights;
* ``feature_cache``: the clean images' features computed once;
* ``keep_memory``: glibc keeps freed memory (mrkd.train.allocator);
* ``all``: the three together, the trainer's default.

The allocator setting is process-wide and cannot be undone, so every train() call runs in a fresh
process of its own (spawned; its start-up is not timed) and the variants alternate in rounds
(baseline, ..., all, baseline, ...) so that a change in the machine's load hits all of them alike;
each variant's number is its median over the rounds, and the paired ratios (same round) are
reported too.

Before the runs, ``step_*``: today's training step against the fast one on one batch, alternated
step by step inside one process, once with the system allocator and once with ``keep`` — the ratio
least disturbed by other work on a shared machine.

The result check: the final epoch loss and weights of ``all`` against ``baseline`` (rounding-level
divergence, see tests/test_train_speed.py), and ``feature_cache`` and ``keep_memory`` against
``baseline`` bit for bit.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch

VARIANTS = {
    "baseline": dict(feature_cache="off", fast_teacher=False, allocator="system"),
    "fast_teacher": dict(feature_cache="off", fast_teacher=True, allocator="system"),
    "feature_cache": dict(feature_cache="auto", fast_teacher=False, allocator="system"),
    "keep_memory": dict(feature_cache="off", fast_teacher=False, allocator="keep"),
    "all": dict(feature_cache="auto", fast_teacher=True, allocator="keep"),
}
BIT_IDENTICAL = ("feature_cache", "keep_memory")   # speed-ups that must not change a single bit
TARGET_IMAGES_PER_S = 30.0      # issue 11: 10 epochs of 700 images in <= 4 minutes on 2 cores
TARGET_RUN = (10, 700)          # epochs, images


def _trainable_state(model) -> Dict[str, torch.Tensor]:
    return {**{f"bottleneck.{k}": v for k, v in model.bottleneck.state_dict().items()},
            **{f"student.{k}": v for k, v in model.student.state_dict().items()}}


def _relative_distance(got: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> float:
    keys = [k for k in expected if expected[k].is_floating_point()]
    diff = sum(float((got[k] - expected[k]).double().pow(2).sum()) for k in keys)
    return (diff / sum(float(expected[k].double().pow(2).sum()) for k in keys)) ** 0.5


def _teacher_forward_ms(backbone: str, image_size: int, batch_size: int, repeats: int) -> Dict[str, float]:
    """Median ms of one teacher forward on a batch: the model's teacher vs its FastTeacher copy."""
    from mrkd.benchmarks.timing import measure
    from mrkd.train.model import build_model
    from mrkd.train.teachers import FastTeacher
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(backbone, "random", image_size=image_size)
    fast = FastTeacher(model.teacher)
    x = torch.randn(batch_size, 3, image_size, image_size)
    plain = measure(lambda: model.teacher_features(x), warmup=1, repeats=repeats)["median_ms"]
    folded = measure(lambda: fast(x), warmup=1, repeats=repeats)["median_ms"]
    return {"teacher_forward_ms": round(plain, 1), "fast_teacher_forward_ms": round(folded, 1),
            "fast_teacher_speedup": round(plain / folded, 2)}


def _step_images_per_s(backbone: str, weights: str, image_size: int, batch_size: int, repeats: int) -> dict:
    """Steady-state training steps, today's against the fast one, alternated step by step (A B A B ...)
    so that load changes on a shared machine hit both alike; images/s from each one's median step.

    Today's step: the model's teacher on the clean and on the student's input, then the student's
    forward, backward and Adam step. Fast step: the clean features looked up from a cache (index_select
    of FP32 tensors, as CleanFeatureCache does), the FastTeacher on the student's input, the same rest."""
    from mrkd.train.head import distillation_loss
    from mrkd.train.model import build_model
    from mrkd.train.teachers import FastTeacher
    from mrkd.train.trainer import StudentPath
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(backbone, weights, image_size=image_size)
    model.train()
    trainable = StudentPath(model)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=0.005, betas=(0.5, 0.999))
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    student_input = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    fast = FastTeacher(model.teacher)
    cached = fast(clean)
    indices = torch.arange(batch_size)

    def step(target, source):
        loss = distillation_loss(target, trainable(source))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    steps = {"today": lambda: step(model.teacher_features(clean), model.teacher_features(student_input)),
             "fast": lambda: step([c.index_select(0, indices) for c in cached], fast(student_input))}
    samples = {name: [] for name in steps}
    for index in range(repeats + 1):
        for name, fn in steps.items():
            started = time.perf_counter()
            fn()
            if index:   # the first of each is a warm-up
                samples[name].append(time.perf_counter() - started)
    today, quick_step = (statistics.median(samples[n]) for n in ("today", "fast"))
    paired = sorted(a / b for a, b in zip(samples["today"], samples["fast"]))
    return {"step_today_images_per_s": round(batch_size / today, 2),
            "step_fast_images_per_s": round(batch_size / quick_step, 2),
            "step_speedup": round(today / quick_step, 2),
            "step_speedup_paired_median": round(paired[len(paired) // 2], 2), "step_repeats": repeats}


def _in_fresh_process(fn, *args):
    """``fn(*args)`` in a spawned process of its own (the allocator setting is per process)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _step_child(backbone: str, weights: str, image_size: int, batch_size: int, repeats: int, threads: int,
                allocator: str) -> dict:
    from mrkd.train.allocator import apply_allocator
    torch.set_num_threads(threads)
    apply_allocator(allocator)
    return _step_images_per_s(backbone, weights, image_size, batch_size, repeats)


def _train_child(root: str, name: str, config_kwargs: dict, backbone: str, weights: str, threads: int) -> dict:
    """One train() call; what the parent needs back (throughput, loss, the trainable weights)."""
    from mrkd.train.trainer import TrainConfig, train
    torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        started = time.perf_counter()
        summary = train(root, "grain", Path(root) / "runs" / name, TrainConfig(**config_kwargs),
                        backbone=backbone, teacher_weights=weights, resume=False)
    return {"images_per_second": summary["images_per_second"], "loss": summary["history"][-1]["loss"],
            "state": _trainable_state(summary["model"]), "described": summary["teacher_features"],
            "allocator": summary["allocator"], "wall_s": round(time.perf_counter() - started, 1)}


def run(quick: bool = False, backbone: Optional[str] = None, image_size: Optional[int] = None,
        threads: Optional[int] = None, images: Optional[int] = None, epochs: Optional[int] = None,
        rounds: Optional[int] = None) -> dict:
    """Train each variant on the same synthetic images; images/s, ratios and the result check."""
    from mrkd.train.synthetic import generate_dataset

    backbone = backbone or "efficientnet_lite0"
    image_size = image_size or (64 if quick else 256)
    images = images or (8 if quick else 64)
    epochs = epochs or (1 if quick else 3)
    rounds = rounds or (1 if quick else 2)
    threads = threads or 2
    batch_size = 4 if quick else 16
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    weights = "imagenet" if backbone.startswith("efficientnet_lite") else "random"  # ResNets would download
    results: dict = {"load_average_at_start": round(os.getloadavg()[0], 2), "backbone": backbone,
                     "teacher_weights": weights, "image_size": image_size, "batch_size": batch_size,
                     "images": images, "epochs": epochs, "rounds": rounds, "threads": threads}
    try:
        results.update(_teacher_forward_ms(backbone, image_size, batch_size, repeats=2 if quick else 5))
        step_repeats = 2 if quick else 8
        for allocator in ("system", "keep"):
            step = _in_fresh_process(_step_child, backbone, weights, image_size, batch_size, step_repeats,
                                     threads, allocator)
            results.update({(k if allocator == "system" else f"{k}_keep_memory"): v for k, v in step.items()
                            if allocator == "system" or k.startswith("step_fast")})
        results["step_fast_keep_memory_vs_today"] = round(
            results["step_fast_images_per_s_keep_memory"] / results["step_today_images_per_s"], 2)
        # --quick (CI's smoke run) keeps the variants of the bit-identity check and the default.
        variants = {k: v for k, v in VARIANTS.items() if not quick or k in ("baseline", *BIT_IDENTICAL, "all")}
        per_variant: Dict[str, List[float]] = {name: [] for name in variants}
        outcome: Dict[str, dict] = {}
        with tempfile.TemporaryDirectory() as root:
            generate_dataset(root, ["grain"], image_size=image_size, n_train=images, n_test_good=1,
                             n_test_defect=1, seed=0, progress=False)
            for round_index in range(rounds):
                for name, speedups in variants.items():
                    config = dict(epochs=epochs, batch_size=batch_size, image_size=image_size, seed=0,
                                  eval_every=0, save_every=epochs, holdout_fraction=0.0, progress=False,
                                  **speedups)
                    child = _in_fresh_process(_train_child, root, name, config, backbone, weights, threads)
                    per_variant[name].append(child["images_per_second"])
                    if round_index == 0:
                        outcome[name] = child
        baseline = statistics.median(per_variant["baseline"])
        rows = []
        for name in variants:
            ips = statistics.median(per_variant[name])
            paired = [v / b for v, b in zip(per_variant[name], per_variant["baseline"])]
            rows.append({"impl": name, "images_per_s": round(ips, 2),
                         "speedup_vs_baseline": round(ips / baseline, 2),
                         "paired_ratios": " ".join(f"{r:.2f}" for r in paired),
                         "final_loss": round(outcome[name]["loss"], 6),
                         "feature_cache": outcome[name]["described"]["feature_cache"],
                         "allocator": outcome[name]["allocator"]["requested"]
                         + ("" if outcome[name]["allocator"]["applied"] else " (not applied)"),
                         "weights_rel_distance_vs_baseline": round(_relative_distance(
                             outcome[name]["state"], outcome["baseline"]["state"]), 5)})
        results["rows"] = rows
        best = statistics.median(per_variant["all"])
        results["speedup_all_vs_baseline"] = round(best / baseline, 2)
        for name in BIT_IDENTICAL:
            results[f"{name}_bit_identical"] = all(
                torch.equal(outcome[name]["state"][k], outcome["baseline"]["state"][k])
                for k in outcome["baseline"]["state"])
        results["final_loss_relative_difference_all"] = round(
            abs(outcome["all"]["loss"] - outcome["baseline"]["loss"]) / abs(outcome["baseline"]["loss"]), 6)
        epochs_target, images_target = TARGET_RUN
        results["projected_minutes_10_epochs_700_images_all"] = round(epochs_target * images_target / best / 60, 2)
        results["projected_minutes_10_epochs_700_images_baseline"] = round(
            epochs_target * images_target / baseline / 60, 2)
        results["load_average_at_end"] = round(os.getloadavg()[0], 2)
        results["target_images_per_s"] = TARGET_IMAGES_PER_S
        results["target_met"] = bool(best >= TARGET_IMAGES_PER_S) if not quick else None
        return results
    finally:
        torch.set_num_threads(previous_threads)


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the code runs, numbers mean nothing")
    parser.add_argument("--images", type=int, default=None, help="training images (default 64; 8 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per variant (default 3; 1 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2)")
    parser.add_argument("--image-size", type=int, default=None, help="pixels (default 256; 64 with --quick)")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick, images=args.images, epochs=args.epochs, rounds=args.rounds,
                         threads=args.threads, image_size=args.image_size), indent=2))
