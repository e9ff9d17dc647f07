"""Detection quality on real images: ELPV solar cells, MRKD vs a nearest-neighbour baseline.

    mrkd bench --only quality [--quick]
    python -m mrkd.benchmarks.bench_quality [--quick] [--split validation] [--seeds 0 1 2] ...

Data: the PyPI ``elpv-dataset`` cells laid out by ``mrkd.train.elpv.layout_elpv`` as ``elpv_mono`` and
``elpv_poly`` (good = probability 0, defective = probability 1, the uncertain 1/3 and 2/3 cells left
out and counted; fixed sha1 split, see that module). Image labels only, so the metric is image AUROC.

Methods, each trained on the same ``train/good`` images and scored on the same test images:

* ``mrkd_imagenet``: MRKD, EfficientNet-Lite0 ImageNet teacher, the project's trainer, the FINAL
  epoch's model (nothing is selected on test labels);
* ``mrkd_random``: the same with a random teacher (what the pretrained features contribute);
* ``knn``: PatchCore without the coreset, written here: the same Lite0 ImageNet teacher's stride-8 and
  stride-16 features (16 upsampled bilinearly to 8, concatenated), a memory bank of a seeded random
  ``memory_fraction`` of all training patches, per-patch minimum L2 distance to the bank, upsampled to
  the image size, Gaussian-smoothed (sigma 4, the head's blur) and the maximum as the image score;
* ``mrkd+knn`` (``combine``): the MRKD ImageNet map (strides 8 and 16) and the kNN map of the same
  seed, each divided by the std of its detector's image scores on the training images, summed; the
  maximum is the score.
  This is what ``mrkd train --score both`` ships (mrkd.train.memory_bank, the same computation).

Training uses ``max_train`` (default 160) cells of ``train/good`` chosen by the layout's fixed hash
rule (CPU budget); the test split is complete. Other rows of a run: MRKD scoring variants computed
from the same trained model (stage weights, blur sigma, max vs top-1 % mean), for the research table.

Mean and spread (population std, min, max) over seeds; the seed drives the MRKD initialisation, masks
and shuffling, and the kNN memory-bank subset. ``split="validation"`` runs the same on the validation
layout (training good cells minus their validation share; validation good + reserved defects) — the
only split settings may be tuned on.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

SCHEMA_VERSION = 1
METHODS = ("mrkd_imagenet", "mrkd_random", "knn", "knn_coreset")
TOPK_SHARE = 0.01       # "topk" image score: the mean of the highest 1 % of map pixels


@dataclass
class QualitySettings:
    """One benchmark configuration (stored with its results)."""

    image_size: int = 128
    epochs: int = 10
    batch_size: int = 16
    lr: float = 0.005
    seeds: Tuple[int, ...] = (0, 1, 2)
    backbone: str = "efficientnet_lite0"
    max_per_class: Optional[int] = None       # fixed ELPV subset (quick mode), see layout_elpv
    # Fixed subset of train/good only, see layout_elpv: 160 cells keep 10 epochs of 3 seeds × 2 categories
    # × 2 teachers within about an hour on 2 shared cores. None: every training cell.
    max_train: Optional[int] = 160
    memory_fraction: float = 0.1              # kNN baseline's memory bank: share of all training patches
    coreset_fraction: float = 0.05            # knn_coreset and the shipped --score both (the trainer's default)
    split: str = "test"                       # "test" (final numbers) | "validation" (tuning)
    ilm_preset: str = "auto"
    ilm_source: str = "same"
    methods: Tuple[str, ...] = METHODS
    combine: bool = True                      # also score mrkd_imagenet + knn (= --score both)
    categories: Tuple[str, ...] = ("elpv_mono", "elpv_poly")
    # One thread: on a shared 2-core machine two OpenMP threads per process spin against the other
    # processes' threads (measured: a training step 13 s with 2 threads, 1.4 s with 1 under load 6).
    threads: int = 1
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        self.seeds = tuple(int(s) for s in self.seeds)
        self.methods = tuple(self.methods)
        self.categories = tuple(self.categories)
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"methods {sorted(unknown)}: expected some of {METHODS}")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")


# ----------------------------------------------------------------------------- images

def _batches(paths: Sequence[str], config, batch_size: int = 16):
    """ImageNet-style tensors of ``paths`` pre-processed exactly as the model's own evaluation does."""
    import torch

    from mrkd.train.data import TestDataset, TestItem
    items = [TestItem(str(p), 0, "good", None) for p in paths]
    dataset = TestDataset(items, config.image_size, config.resize_mode, config.mean, config.std)
    for image, _, _, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
        yield image


def image_scores(maps, rule: str = "max"):
    """N×… maps → N image scores: "max" (the head's rule) or "topk" (mean of the top TOPK_SHARE pixels)."""
    flat = maps.flatten(1)
    if rule == "max":
        return flat.amax(1)
    if rule == "topk":
        k = max(1, int(round(TOPK_SHARE * flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(1)
    raise ValueError(f"image score rule {rule!r}: expected 'max' or 'topk'")


# ----------------------------------------------------------------------------- kNN baseline

def patch_features(teacher, x):
    """The teacher's stride-8 and stride-16 features, 16 upsampled to 8 (bilinear), concatenated: N×C×h×w."""
    import torch
    import torch.nn.functional as F
    with torch.no_grad():
        feats = teacher(x)
    mid, deep = feats[1], feats[2]
    deep = F.interpolate(deep, size=mid.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([mid, deep], 1)


class PatchKNN:
    """Nearest-neighbour patch distance to a memory bank of training patches (PatchCore without coreset)."""

    def __init__(self, teacher, config, memory_fraction: float = 0.1, seed: int = 0, sigma: float = 4.0,
                 chunk: int = 4096, sampler: str = "random"):
        from mrkd.train.head import GaussianBlur
        self.teacher, self.config = teacher.eval(), config
        self.memory_fraction, self.seed, self.chunk, self.sampler = memory_fraction, seed, chunk, sampler
        self.blur = GaussianBlur(sigma)
        self.bank = None

    def fit(self, train_paths: Sequence[str]) -> "PatchKNN":
        import torch
        patches = []
        for x in _batches(train_paths, self.config):
            f = patch_features(self.teacher, x)
            patches.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
        patches = torch.cat(patches)
        if self.sampler == "coreset":   # the shipped selection (PatchCore's greedy k-center), no cap
            from mrkd.train.memory_bank import subsample_patches
            self.bank = subsample_patches(patches, self.memory_fraction, self.seed, "coreset")
            return self
        keep = max(1, int(round(self.memory_fraction * len(patches))))
        order = torch.randperm(len(patches), generator=torch.Generator().manual_seed(self.seed))
        self.bank = patches[order[:keep]].contiguous()
        return self

    @property
    def memory_bytes(self) -> int:
        return int(self.bank.numel() * self.bank.element_size())

    def nearest_distance(self, queries):
        """Minimum L2 distance of each query row to the bank, in chunks of the bank (bounded memory)."""
        import torch
        best = torch.full((len(queries),), float("inf"))
        for start in range(0, len(self.bank), self.chunk):
            d = torch.cdist(queries, self.bank[start:start + self.chunk])
            best = torch.minimum(best, d.min(1).values)
        return best

    def anomaly_maps(self, x):
        """N×1×H×W smoothed distance maps for a batch of pre-processed images."""
        import torch.nn.functional as F
        f = patch_features(self.teacher, x)
        n, c, h, w = f.shape
        dist = self.nearest_distance(f.permute(0, 2, 3, 1).reshape(-1, c)).view(n, 1, h, w)
        up = F.interpolate(dist, size=(self.config.image_size,) * 2, mode="bilinear", align_corners=True)
        return self.blur(up)


# ----------------------------------------------------------------------------- MRKD

def train_mrkd(data_root, category: str, settings: QualitySettings, teacher_weights: str, seed: int):
    """The project's trainer on ``category`` (no holdout: the same images as the kNN bank); the final model."""
    from mrkd.train.trainer import TrainConfig, train

    config = TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                         image_size=settings.image_size, seed=seed, eval_every=0, save_every=settings.epochs,
                         holdout_fraction=0.0, ilm_preset=settings.ilm_preset, ilm_source=settings.ilm_source,
                         progress=False, score="mrkd")   # the bank, where wanted, comes after (shipped_both)
    with tempfile.TemporaryDirectory() as out_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the random-teacher warning is expected here
        result = train(data_root, category, out_dir, config, backbone=settings.backbone,
                       teacher_weights=teacher_weights, resume=False)
    return result["model"].eval()


def mrkd_per_scale(model, paths: Sequence[str]) -> List["torch.Tensor"]:
    """The unsmoothed per-scale 1 − cos maps of ``paths`` (one N×h×w tensor per teacher stage)."""
    import torch
    per_scale = [m for m in zip(*(model.per_scale_maps(x) for x in _batches(paths, model.config)))]
    return [torch.cat(list(stage)) for stage in per_scale]


MAPS_CHUNK = 16     # images per blur call: CPU conv2d unfolds its whole input (N × 33 taps × H × W floats)


def mrkd_maps(model, per_scale, stage_weights: Sequence[float] = (1.0, 1.0, 1.0), sigma: Optional[float] = None):
    """Per-scale maps → the head's smoothed N×1×H×W map with the stages weighted (all 1 and sigma None =
    the head itself). In chunks of MAPS_CHUNK images: the blur of all 508 poly test cells at once at
    512 px unfolded about 17 GB, and the bench was killed for memory; each image's map is its own, so
    the chunks give the same maps."""
    import torch

    from mrkd.train.head import GaussianBlur
    blur = model.head.blur if sigma is None else GaussianBlur(sigma)
    chunks = []
    for start in range(0, len(per_scale[0]), MAPS_CHUNK):
        weighted = [w * m[start:start + MAPS_CHUNK] for w, m in zip(stage_weights, per_scale) if w]
        chunks.append(blur(model.head.upsample_sum(weighted)))
    return torch.cat(chunks)


# ----------------------------------------------------------------------------- one category

def _auroc(labels, scores) -> float:
    from mrkd.train.metrics import image_auroc
    return float(image_auroc(np.asarray(labels), np.asarray(scores, dtype=np.float64)))


# MRKD scoring variants computed from one trained model (stage weights over strides 4/8/16, score rule).
MRKD_VARIANTS = {
    "all_max": ((1, 1, 1), "max"),
    "all_topk": ((1, 1, 1), "topk"),
    "s8s16_max": ((0, 1, 1), "max"),
    "s8s16_topk": ((0, 1, 1), "topk"),
    "s16_max": ((0, 0, 1), "max"),
    "s4s8_max": ((1, 1, 0), "max"),
    "w0.5_1_1_max": ((0.5, 1, 1), "max"),
    "w0_1_2_max": ((0, 1, 2), "max"),
    "w0_2_1_max": ((0, 2, 1), "max"),
    "all_max_sigma2": ((1, 1, 1), "max", 2.0),
    "s8s16_max_sigma2": ((0, 1, 1), "max", 2.0),
    "s8s16_max_sigma8": ((0, 1, 1), "max", 8.0),
}


def run_category(data_root, category: str, settings: QualitySettings, seed: int) -> Dict[str, dict]:
    """Every method on one category and seed: {method: {"image_auroc": .., variants.., "train_s": ..}}."""
    import torch

    from mrkd.train.data import scan_category
    data = scan_category(data_root, category)
    paths = [item.path for item in data.test_items]
    labels = [item.label for item in data.test_items]
    out: Dict[str, dict] = {}
    combined: Dict[str, tuple] = {}        # name → (test scores, training-image scores), for --combine
    combined_maps: Dict[str, "torch.Tensor"] = {}   # name → test maps, for --combine
    for method in settings.methods:
        started = time.perf_counter()
        if method in ("knn", "knn_coreset"):
            from mrkd.train.model import build_model
            model = build_model(settings.backbone, "imagenet", image_size=settings.image_size)
            knn = PatchKNN(model.teacher, model.config, settings.memory_fraction, seed).fit(data.train_paths) \
                if method == "knn" else PatchKNN(model.teacher, model.config, settings.coreset_fraction, seed,
                                                 sampler="coreset").fit(data.train_paths)
            fit_s = time.perf_counter() - started
            maps = torch.cat([knn.anomaly_maps(x) for x in _batches(paths, model.config)])
            if settings.combine and method == "knn":
                train_maps = torch.cat([knn.anomaly_maps(x) for x in _batches(data.train_paths, model.config)])
                combined["knn"] = (image_scores(maps, "max").numpy(), image_scores(train_maps, "max").numpy())
                combined_maps["knn"] = maps
            row = {"image_auroc": _auroc(labels, image_scores(maps, "max")),
                   "topk": _auroc(labels, image_scores(maps, "topk")),
                   "fit_s": round(fit_s, 1), "memory_mb": round(knn.memory_bytes / 2 ** 20, 1),
                   "bank_patches": int(len(knn.bank))}
        else:
            weights = "imagenet" if method == "mrkd_imagenet" else "random"
            model = train_mrkd(data_root, category, settings, weights, seed)
            fit_s = time.perf_counter() - started
            per_scale = mrkd_per_scale(model, paths)
            row = {"fit_s": round(fit_s, 1)}
            for name, (stage_weights, rule, *sigma) in MRKD_VARIANTS.items():
                maps = mrkd_maps(model, per_scale, stage_weights, *sigma)
                row[name] = _auroc(labels, image_scores(maps, rule))
            if settings.combine and method == "mrkd_imagenet":
                train_scale = mrkd_per_scale(model, data.train_paths)
                for name in ("all_max", "s8s16_max"):
                    stage_weights, rule = MRKD_VARIANTS[name]
                    combined_maps[name] = mrkd_maps(model, per_scale, stage_weights)
                    combined[name] = (image_scores(combined_maps[name], rule).numpy(),
                                      image_scores(mrkd_maps(model, train_scale, stage_weights), rule).numpy())
            row["image_auroc"] = row["all_max"]      # the shipped head: all stages, max
            if settings.combine and method == "mrkd_imagenet":
                out["score_both"] = shipped_both(model, data.train_paths, paths, labels, settings, seed)
        row["wall_s"] = round(time.perf_counter() - started, 1)
        out[method] = row
    if "knn" in combined and len(combined) > 1:
        out["mrkd+knn"] = {name: _auroc(labels, combine_scores(combined[name], combined["knn"]))
                           for name in combined if name != "knn"}
        # The same as one map (what a single exported graph can output): each map divided by the spread
        # of its detector's training-image scores, summed, maximum as the score.
        knn_std = max(float(combined["knn"][1].std()), 1e-12)
        for name in [n for n in combined if n != "knn"]:
            mrkd_std = max(float(combined[name][1].std()), 1e-12)
            maps = combined_maps[name] / mrkd_std + combined_maps["knn"] / knn_std
            out["mrkd+knn"][f"map_{name}"] = _auroc(labels, image_scores(maps, "max"))
        out["mrkd+knn"]["image_auroc"] = out["mrkd+knn"]["map_s8s16_max"]   # what --score both ships
    return out


def shipped_both(model, train_paths, paths, labels, settings: QualitySettings, seed: int) -> dict:
    """``--score both`` as the trainer ships it: mrkd.train.memory_bank.fit_memory_bank on the trained
    model (coreset bank, the trainer's default cap), then the model's own image scores."""
    import torch

    from mrkd.train.memory_bank import DEFAULT_MAX_PATCHES, fit_memory_bank
    started = time.perf_counter()
    report = fit_memory_bank(model, train_paths, "both", settings.coreset_fraction, seed,
                             sampler="coreset", max_patches=DEFAULT_MAX_PATCHES)
    with torch.no_grad():
        scores = torch.cat([model.scores(x) for x in _batches(paths, model.config)])
    return {"image_auroc": _auroc(labels, scores), "bank_patches": report["bank_patches"],
            "memory_mb": report["bank_mb"], "fit_s": round(time.perf_counter() - started, 1)}


def combine_scores(first, second):
    """Sum of two detectors' test scores, each as a z-score against its own training-image scores."""
    (test_a, train_a), (test_b, train_b) = first, second
    return ((test_a - train_a.mean()) / max(train_a.std(), 1e-12)
            + (test_b - train_b.mean()) / max(train_b.std(), 1e-12))


def summarise(values: Sequence[float]) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(values.mean()), 4), "std": round(float(values.std()), 4),
            "min": round(float(values.min()), 4), "max": round(float(values.max()), 4), "n": int(len(values))}


def quality_layout(settings: QualitySettings, root: Path):
    """The ELPV layout ``settings`` ask for (split and subsets), in a folder of ``root`` named after them
    (an earlier call's folder with the same settings is reused as is: elpv.layout_elpv)."""
    from mrkd.train.elpv import layout_elpv
    return layout_elpv(root / f"elpv_{settings.split}_{settings.max_per_class}_{settings.max_train}",
                       split=settings.split, max_per_class=settings.max_per_class, max_train=settings.max_train)


def run_quality(settings: QualitySettings, data_root=None, log=print) -> dict:
    """Lay out ELPV (into a temporary folder unless ``data_root`` is given), run every method × category ×
    seed, and summarise. Returns the JSON-ready results (settings, layout counts, per-run rows, summary)."""
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    temporary = tempfile.TemporaryDirectory() if data_root is None else None
    root = Path(temporary.name if temporary else data_root)
    try:
        layout = quality_layout(settings, root)
        runs: List[dict] = []
        for category in settings.categories:
            for seed in settings.seeds:
                rows = run_category(layout.root, category, settings, seed)
                for method, row in rows.items():
                    runs.append(dict(category=category, seed=seed, method=method, **row))
                    log(f"[quality] {category} seed {seed} {method}: image AUROC {row['image_auroc']:.4f} "
                        f"({row.get('wall_s', 0)} s)")
    finally:
        torch.set_num_threads(previous_threads)
        if temporary:
            temporary.cleanup()
    summary: Dict[str, dict] = {}
    for category in settings.categories:
        for method in dict.fromkeys(r["method"] for r in runs):
            mine = [r for r in runs if r["category"] == category and r["method"] == method]
            keys = [k for k in mine[0] if k not in ("category", "seed", "method", "fit_s", "wall_s", "memory_mb",
                                                    "bank_patches")]
            summary[f"{category}/{method}"] = {k: summarise([r[k] for r in mine]) for k in keys}
    return {"settings": dataclasses.asdict(settings), "layout": {"counts": layout.counts,
            "uncertain_left_out": layout.uncertain, "rule": layout.rule, "split": layout.split},
            "runs": runs, "summary": summary}


def summary_table(results: dict) -> List[dict]:
    """One row per category × method: mean ± std of the image AUROC (the report's table)."""
    rows = []
    for key, stats in results["summary"].items():
        category, method = key.split("/")
        s = stats["image_auroc"]
        rows.append({"category": category, "method": method, "image_auroc_mean": s["mean"],
                     "image_auroc_std": s["std"], "min": s["min"], "max": s["max"], "seeds": s["n"]})
    return rows


def quick_settings() -> QualitySettings:
    """CI's quick mode: 24 cells per folder, 64 px, 3 epochs, 1 seed — seconds, the same code paths."""
    return QualitySettings(image_size=64, epochs=3, batch_size=8, seeds=(0,), max_per_class=24)


def run(quick: bool = False, image_size: Optional[int] = None, threads: Optional[int] = None) -> dict:
    """``mrkd bench --only quality``: the table rows (for the report) plus the full results."""
    settings = quick_settings() if quick else QualitySettings()
    if image_size:
        settings.image_size = image_size
    if threads:
        settings.threads = threads
    results = run_quality(settings)
    counts = results["layout"]["counts"]
    scalars = {f"{name}_{kind}": counts[category][kind] for category, name in
               ((c, c.replace("elpv_", "")) for c in settings.categories) for kind in counts[category]}
    return {"image_auroc": summary_table(results), "runs": results["runs"], "image_size": settings.image_size,
            "epochs": settings.epochs, "seeds": " ".join(map(str, settings.seeds)),
            "uncertain_cells_left_out": sum(results["layout"]["uncertain_left_out"].values()),
            "split_rule": results["layout"]["rule"], **scalars}


def main(argv=None) -> None:
    import argparse
    import json

    from mrkd.atomic import atomic_write_text
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI mode: small subset, 64 px, 3 epochs, 1 seed")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="test: final numbers; validation: the only split to tune settings on")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    parser.add_argument("--image-size", type=int, default=None, help="input size in pixels (default 128)")
    parser.add_argument("--epochs", type=int, default=None, help="MRKD training epochs (default 10)")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 0.005)")
    parser.add_argument("--backbone", default=None, help="teacher (default efficientnet_lite0)")
    parser.add_argument("--ilm-preset", choices=("auto", "texture", "object"), default=None,
                        help="image-level masking preset (default auto)")
    parser.add_argument("--ilm-source", choices=("same", "other"), default=None,
                        help="ILM patches from the same or another image (default same)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None, help="methods to run")
    parser.add_argument("--categories", nargs="+", default=None, help="ELPV categories (default both)")
    parser.add_argument("--max-per-class", type=int, default=None, help="fixed subset size per folder")
    parser.add_argument("--max-train", type=int, default=None, help="fixed subset size of train/good")
    parser.add_argument("--memory-fraction", type=float, default=None, help="kNN bank share (default 0.1)")
    parser.add_argument("--coreset-fraction", type=float, default=None,
                        help="bank share of knn_coreset and the shipped --score both (default 0.05)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    parser.add_argument("--combine", action=argparse.BooleanOptionalAction, default=True,
                        help="also score MRKD + kNN, as --score both does (default on)")
    parser.add_argument("--json", type=Path, default=None, help="write the full results here")
    args = parser.parse_args(argv)
    settings = quick_settings() if args.quick else QualitySettings()
    for name in ("split", "seeds", "image_size", "epochs", "lr", "backbone", "ilm_preset", "ilm_source",
                 "methods", "categories", "max_per_class", "max_train", "memory_fraction", "coreset_fraction",
                 "threads"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    settings.combine = args.combine
    settings.__post_init__()
    results = run_quality(settings)
    for row in summary_table(results):
        print(row)
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
