"""Teachers compared: compute (GFLOP per image), CPU latency, training speed and detection.

    python -m mrkd.benchmarks.bench_teachers [--quick]

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matmuls) and
reported as GFLOP = 2 × multiply-accumulates (one MAC = one multiply + one add). Element-wise work
(BatchNorm, activations, padding) is not counted, as is usual. "teacher" is the backbone up to its
stride-16 features; "model" is the whole MRKD forward (teacher, bottleneck, decoder; no Gaussian).

Latency: batch 1, 2 threads, median of repeats, random weights (timing does not depend on values).
Detection: image AUROC on the embedded synthetic data set after a short training (same images,
size, epochs and seed for every teacher) — ImageNet weights against a random teacher of the same
architecture shows what the pretrained features contribute.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from typing import Dict

import numpy as np
import torch

from mrkd.benchmarks.timing import gflop_per_image, measure

TEACHERS = ("efficientnet_lite0", "resnet18", "wide_resnet50_2")


def _random_model(backbone: str, image_size: int):
    from mrkd.train.model import build_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(backbone, "random", image_size=image_size).eval()


def cpu_latency_ms(module, image_size: int, repeats: int = 20, threads: int = 2) -> float:
    """Median wall time (ms) of one batch-1 forward pass with ``threads`` CPU threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(1, 3, image_size, image_size)
        with torch.no_grad():
            return measure(lambda: module(x), warmup=3, repeats=repeats)["median_ms"]
    finally:
        torch.set_num_threads(previous)


def train_detector(backbone: str, teacher_weights: str, data_root, category: str, image_size: int,
                   epochs: int, batch_size: int = 8, lr: float = 0.005, seed: int = 0, progress: bool = False):
    """Train an MRKD model on ``category`` with the project's trainer (paper optimiser, image- and
    feature-level masking, the teacher's own normalisation), scored by the distillation map alone
    (``score="mrkd"``: what the teacher contributes to MRKD, without the kNN map of the default
    ``both``). Returns (model, seconds/epoch)."""
    import tempfile

    from mrkd.train.trainer import TrainConfig, train

    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size, seed=seed,
                         eval_every=0, save_every=epochs, progress=progress, score="mrkd")
    with tempfile.TemporaryDirectory() as out_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the random-teacher warning is expected here
        started = time.perf_counter()
        result = train(data_root, category, out_dir, config, backbone=backbone,
                       teacher_weights=teacher_weights, resume=False)
        seconds = time.perf_counter() - started
    return result["model"].eval(), seconds / epochs


def image_auroc_on_test(model, data_root, category: str, batch_size: int = 16) -> float:
    """Image AUROC (max of the anomaly map) of ``model`` on ``category``'s test split."""
    from mrkd.train.data import TestDataset, scan_category
    from mrkd.train.metrics import image_auroc

    items = scan_category(data_root, category).test_items
    dataset = TestDataset(items, model.config.image_size, model.config.resize_mode, model.config.mean,
                          model.config.std)
    scores, labels = [], []
    for image, _, label, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        scores.append(model.scores(image).numpy())
        labels.append(np.asarray(label))
    return image_auroc(np.concatenate(labels), np.concatenate(scores))


def detection_auroc(backbone: str, teacher_weights: str, data_root, category: str, image_size: int,
                    epochs: int, seed: int = 0, batch_size: int = 8) -> float:
    """Train (see train_detector) then return the image AUROC on the test split."""
    model, _ = train_detector(backbone, teacher_weights, data_root, category, image_size, epochs,
                              batch_size=batch_size, seed=seed)
    return image_auroc_on_test(model, data_root, category)


def run(quick: bool = False) -> Dict[str, dict]:
    """GFLOP, CPU latency and (unless quick) detection for each teacher; Lite0 ratios vs WRN50-2."""
    from mrkd.train.synthetic import generate_dataset

    # --quick is CI's smoke run: the same code paths at sizes that take seconds, not meaningful numbers.
    image_size = 64 if quick else 256
    repeats = 2 if quick else 20
    results: Dict[str, dict] = {"image_size": image_size}
    for backbone in TEACHERS:
        model = _random_model(backbone, image_size)
        results[backbone] = {
            "teacher_gflop": round(gflop_per_image(model.teacher, image_size), 3),
            "model_gflop": round(gflop_per_image(model, image_size), 3),
            "teacher_latency_ms": round(cpu_latency_ms(model.teacher, image_size, repeats), 2),
            "model_latency_ms": round(cpu_latency_ms(model, image_size, repeats), 2),
        }
    base = results["wide_resnet50_2"]
    lite = results["efficientnet_lite0"]
    results["ratios_lite0_vs_wide_resnet50_2"] = {
        key: round(base[key] / lite[key], 2) for key in ("teacher_gflop", "model_gflop", "teacher_latency_ms",
                                                         "model_latency_ms")}

    # Detection on the embedded data set (small: 96 px, few epochs) for ImageNet vs random teachers.
    size, epochs, n_images = (64, 1, 8) if quick else (128, 8, 32)
    with tempfile.TemporaryDirectory() as root:
        generate_dataset(root, ["grain"], image_size=size, n_train=n_images, n_test_good=12, n_test_defect=4,
                         seed=0, progress=False)
        backbones = ("efficientnet_lite0",) if quick else ("efficientnet_lite0", "resnet18")
        for backbone in backbones:
            for weights in ("imagenet", "random"):
                try:
                    auroc = round(detection_auroc(backbone, weights, root, "grain", size, epochs), 3)
                except OSError as exc:   # torchvision's ImageNet weights need a download (air-gapped here)
                    auroc = f"unavailable: {type(exc).__name__}: {exc}"
                results[backbone][f"image_auroc_{weights}"] = auroc

        # Training speed at 256 px (batch 16): seconds per epoch per 100 images.
        n_train = 8 if quick else 100
        generate_dataset(root, ["grain"], image_size=image_size, n_train=n_train, n_test_good=1, n_test_defect=1,
                         seed=0, progress=False)
        _, seconds = train_detector("efficientnet_lite0", "imagenet", root, "grain", image_size,
                                    epochs=1 if quick else 2, batch_size=16)
        lite[f"train_s_per_epoch_per_100_images_{image_size}px"] = round(seconds * 100 / n_train, 2)
    return results


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller detection run")
    print(json.dumps(run(quick=parser.parse_args().quick), indent=2))
