"""How large the ``--score both`` memory bank should be at 256 px, on the ELPV validation split only.

    python -m mrkd.benchmarks.bench_bank_size [--seeds 0 1 2 3 4] [--fractions 0.05 0.1]

Per model (bench_refit's default model, trained on the validation layout's 160 cells and cached in
``--work``), the bank is chosen again from the same 144 cells it was fitted on (the 16 calibration cells
stay out) by the shipped coreset at each fraction of their patches (cap: the fraction's own count, so
5 % is the shipped bank, 7,373 patches at 256 px, and reproduces the shipped model), with the head's "both" weights measured again, and the image AUROC
on the validation cells (never the test split) is reported with the bank's size and fitting time.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Sequence


from mrkd.benchmarks.bench_refit import SETTINGS

FRACTIONS = (0.05, 0.10)


def run(seeds=(0, 1, 2, 3, 4), categories=("elpv_mono", "elpv_poly"), fractions: Sequence[float] = FRACTIONS,
        work=None, image_size: int = SETTINGS["image_size"], log=print) -> dict:
    import torch

    from mrkd.benchmarks.bench_refit import _paths, auroc, study_means, study_models
    from mrkd.train.calibrate import score_images
    from mrkd.train.memory_bank import fit_memory_bank
    from mrkd.train.trainer import TrainConfig
    results = {"image_size": image_size, "fractions": list(fractions), "runs": []}
    rows = []
    for case in study_models(seeds, categories, work, image_size, log):
        shipped = case.model
        held = {Path(p).name for p in case.holdout}     # the calibration cells never went into the bank
        train = [p for p in _paths(case.folder / "train/good") if Path(p).name not in held]
        good, defect = case.good, case.defect
        scores = score_images(shipped, good + defect)
        row = {"shipped": {"auroc": auroc(scores[:len(good)], scores[len(good):]),
                           "patches": int(len(shipped.head.memory_bank.bank))}}
        patches = len(train) * (image_size // 8) ** 2
        for fraction in fractions:
            model = copy.deepcopy(shipped)
            keep = int(round(fraction * patches))
            started = time.perf_counter()
            fit_memory_bank(model, train, "both", fraction=fraction, seed=case.seed,   # as train() does
                            batch_size=TrainConfig().eval_batch_size, max_patches=keep, progress=False,
                            pool=model.config.knn_pool)
            seconds = time.perf_counter() - started
            scores = score_images(model, good + defect)
            row[f"{fraction:g}"] = {"auroc": auroc(scores[:len(good)], scores[len(good):]),
                                    "patches": int(len(model.head.memory_bank.bank)),
                                    "fit_s": round(seconds, 1), "threads": torch.get_num_threads()}
        log(f"[bank size] {case.category} seed {case.seed}: " + ", ".join(
            f"{name} {value['auroc']:.4f} ({value['patches']} patches)" for name, value in row.items()))
        results["runs"].append({"category": case.category, "seed": case.seed, **row})
        rows.append((case.category, row))
    results["means"] = study_means(rows, lambda cell: cell["auroc"])
    return results


def main(argv=None) -> None:
    import argparse

    from mrkd.benchmarks.bench_refit import add_study_arguments, report_study
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_study_arguments(parser)
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS),
                        help="bank sizes to try, as fractions of the training patches (0.05: shipped)")
    args = parser.parse_args(argv)
    report_study(run(tuple(args.seeds), tuple(args.categories), tuple(args.fractions), args.work, args.image_size),
                 args.out)


if __name__ == "__main__":
    main()
