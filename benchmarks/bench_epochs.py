"""How many epochs does the default model need? Image AUROC on ELPV at several epoch counts of one run.

`mrkd train` defaults to the paper's 200 epochs, while every quality number in RESULTS.md was measured
at 10. This bench trains one model per category and seed and, at each count of ``--epochs-at``, resumes
the same run to that count (the trainer's learning rate is constant, so epoch k of a longer run is the
k-epoch model), then scores the split: MRKD alone (the head's map) and ``--score both`` as the trainer
ships it (bench_quality.shipped_both: coreset bank at the trainer's defaults). Tune on
``--split validation`` (the default); the test split is for the one check after a choice.

    python -m mrkd.benchmarks.bench_epochs --categories elpv_mono --seeds 0 --epochs-at 10 50 200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

SCHEMA_VERSION = 1


@dataclass
class EpochsSettings:
    """One configuration of the bench (stored with its results)."""

    epochs_at: Tuple[int, ...] = (10, 25, 50, 100, 200)
    seeds: Tuple[int, ...] = (0,)
    categories: Tuple[str, ...] = ("elpv_mono", "elpv_poly")
    split: str = "validation"
    image_size: int = 256
    max_train: Optional[int] = 160
    max_per_class: Optional[int] = None
    threads: int = 1
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        self.epochs_at = tuple(sorted({int(e) for e in self.epochs_at}))
        if not self.epochs_at or self.epochs_at[0] < 1:
            raise ValueError(f"epochs_at must be positive counts, got {self.epochs_at}")


@dataclass
class EpochsRow:
    """One model at one epoch count."""

    category: str
    seed: int
    epochs: int
    mrkd_auroc: float          # MRKD alone, the head's map (all stages, max)
    both_auroc: float          # --score both as shipped
    loss: float                # the last epoch's mean training loss
    train_s: float             # training time to reach this count from the previous one
    score_s: float


def quality_settings(settings: EpochsSettings, epochs: int):
    from mrkd.benchmarks.bench_quality import QualitySettings
    return QualitySettings(image_size=settings.image_size, epochs=epochs, seeds=settings.seeds,
                           max_train=settings.max_train, max_per_class=settings.max_per_class,
                           split=settings.split, categories=settings.categories, threads=settings.threads)


def run_model(root: Path, category: str, seed: int, settings: EpochsSettings, work: Path, log=print) -> List[EpochsRow]:
    """Train ``category`` with ``seed`` to each count in turn (resuming in ``work``) and score each."""
    from mrkd.benchmarks.bench_quality import (MRKD_VARIANTS, _auroc, image_scores, mrkd_maps, mrkd_per_scale,
                                               shipped_both)
    from mrkd.train.data import scan_category
    from mrkd.train.trainer import TrainConfig, train

    data = scan_category(root, category)
    paths = [item.path for item in data.test_items]
    labels = [item.label for item in data.test_items]
    rows = []
    for epochs in settings.epochs_at:
        quality = quality_settings(settings, epochs)
        config = TrainConfig(epochs=epochs, batch_size=quality.batch_size, lr=quality.lr, image_size=settings.image_size,
                             seed=seed, eval_every=0, save_every=epochs, holdout_fraction=0.0,
                             ilm_preset=quality.ilm_preset, ilm_source=quality.ilm_source, progress=False,
                             score="mrkd")
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = train(root, category, work, config, backbone=quality.backbone, teacher_weights="imagenet",
                           resume=True)
        train_s = time.perf_counter() - started
        model = result["model"].eval()
        started = time.perf_counter()
        stage_weights, rule = MRKD_VARIANTS["all_max"]
        mrkd = _auroc(labels, image_scores(mrkd_maps(model, mrkd_per_scale(model, paths), stage_weights), rule))
        both = shipped_both(model, data.train_paths, paths, labels, quality, seed)["image_auroc"]
        row = EpochsRow(category, seed, epochs, round(mrkd, 4), round(both, 4), round(result["history"][-1]["loss"], 5),
                        round(train_s, 1), round(time.perf_counter() - started, 1))
        log(f"[epochs] {category} seed {seed} at {epochs} epochs: MRKD {row.mrkd_auroc:.4f}, both "
            f"{row.both_auroc:.4f}, loss {row.loss:.4f} ({row.train_s} s training, {row.score_s} s scoring)")
        rows.append(row)
    return rows


def run_epochs(settings: EpochsSettings, work: Optional[Path] = None, log=print) -> dict:
    import torch

    from mrkd.benchmarks.bench_quality import quality_layout
    torch.set_num_threads(settings.threads)
    temporary = tempfile.TemporaryDirectory() if work is None else None
    base = Path(temporary.name if temporary else work)
    try:
        layout = quality_layout(quality_settings(settings, settings.epochs_at[0]), base)
        rows = []
        for category in settings.categories:
            for seed in settings.seeds:
                rows += run_model(layout.root, category, seed, settings,
                                  base / f"runs_{settings.image_size}" / f"{category}_{seed}", log)
    finally:
        if temporary:
            temporary.cleanup()
    return {"settings": dataclasses.asdict(settings), "layout": {"counts": layout.counts, "split": layout.split},
            "rows": [dataclasses.asdict(r) for r in rows]}


def main(argv: Optional[Sequence[str]] = None) -> None:
    from mrkd.atomic import atomic_write_text
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs-at", type=int, nargs="+", default=None,
                        help="epoch counts to score, one run resumed to each (default 10 25 50 100 200)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0)")
    parser.add_argument("--categories", nargs="+", default=None, help="ELPV categories (default both)")
    parser.add_argument("--split", choices=("validation", "test"), default="validation",
                        help="validation: to choose on (default); test: the one check after a choice")
    parser.add_argument("--image-size", type=int, default=256, help="input size in pixels (default 256)")
    parser.add_argument("--max-train", type=int, default=160, help="fixed subset of train/good (default 160)")
    parser.add_argument("--max-per-class", type=int, default=None, help="fixed subset per folder (smoke runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the layout and the runs (kept: a second call resumes them); default temporary")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    settings = EpochsSettings(split=args.split, image_size=args.image_size, max_train=args.max_train,
                              max_per_class=args.max_per_class, threads=args.threads)
    for name in ("epochs_at", "seeds", "categories"):
        if getattr(args, name) is not None:
            setattr(settings, name, tuple(getattr(args, name)))
    settings.__post_init__()
    results = run_epochs(settings, args.work)
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
