"""How the image score is read from the ``--score both`` map, on the ELPV validation split only.

    python -m mrkd.benchmarks.bench_image_score [--seeds 0 1 2 3 4] [--categories elpv_mono elpv_poly]

The shipped image score is the maximum of the summed map smoothed with sigma 4 (the official MRKD/RD
protocol). PatchCore reads its score differently: the largest unsmoothed patch distance, re-weighted by
how isolated that patch's nearest bank row is among its own neighbours in the bank. Per model (the
default model of bench_refit, trained on the validation layout's 160 cells and cached in ``--work``),
the image AUROC on the validation cells (never the test split) of:

* ``sigma S``: the maximum of the summed map smoothed with sigma S (0: unsmoothed; 4: shipped);
* ``top K mean``: the mean of the K largest values of the shipped smoothed map;
* ``patchcore``: the kNN part read as PatchCore reads it (max unsmoothed patch distance × (1 − the
  softmax weight of its nearest bank row among that row's PATCHCORE_NEIGHBOURS nearest)), plus the
  smoothed MRKD part's maximum; ``knn patchcore`` alone;
* ``mrkd only``, ``knn only``: each part's smoothed maximum.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from mrkd.benchmarks.bench_refit import SETTINGS

SIGMAS = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
TOP_K = (10, 100, 1000)
PATCHCORE_NEIGHBOURS = 9       # anomalib's PatchCore default (num_neighbors)


def patchcore_weighted(rows, bank, neighbours: int = PATCHCORE_NEIGHBOURS) -> float:
    """PatchCore's image score of one image's patches (rows × C) against ``bank``: the largest nearest
    distance, times 1 − the softmax weight of that nearest bank row among the distances from the patch
    to the row's ``neighbours`` nearest bank rows (the row itself first)."""
    import torch
    d = torch.cdist(rows.float(), bank.float())
    nearest, index = d.min(1)
    worst = int(nearest.argmax())
    row = bank[index[worst]:index[worst] + 1]
    around = torch.cdist(row, bank.float())[0].topk(min(neighbours, len(bank)), largest=False).indices
    weights = torch.softmax(torch.cdist(rows[worst:worst + 1].float(), bank[around].float())[0], 0)
    return float((1 - weights[0]) * nearest[worst])


def image_score_variants(model, paths: Sequence[str], batch_size: int = 8) -> Dict[str, np.ndarray]:
    """Every variant's image scores of ``paths`` (a --score both model): name -> N scores."""
    import torch

    from mrkd.train.head import GaussianBlur
    from mrkd.train.memory_bank import patch_features
    from mrkd.train.refit import _batches
    head = model.head
    bank = head.memory_bank.bank
    mrkd, knn, weighted = [], [], []
    model.eval()
    with torch.no_grad():
        for x in _batches(model, list(paths), batch_size):
            teacher, student = model(x)
            maps = head.per_scale_maps(teacher, student)
            mrkd.append(head.upsample_sum(maps[:3]))
            knn.append(head.upsample_sum(maps[3:]))
            rows = patch_features(teacher, head.memory_bank.pool).flatten(2).transpose(1, 2)
            weighted += [patchcore_weighted(r, bank) * head.knn_weight for r in rows]
    mrkd, knn, weighted = torch.cat(mrkd), torch.cat(knn), torch.tensor(weighted)
    out = {}
    smoothed = {sigma: (GaussianBlur(sigma)(mrkd + knn) if sigma > 0 else mrkd + knn).flatten(1) for sigma in SIGMAS}
    for sigma, maps in smoothed.items():
        out[f"sigma {sigma:g}"] = maps.amax(1)
    # the model's own smoothing (sigma 4 in every default model, so already among SIGMAS)
    shipped = smoothed[head.sigma] if head.sigma in smoothed else head.blur(mrkd + knn).flatten(1)
    for k in TOP_K:
        out[f"top {k} mean"] = shipped.topk(min(k, shipped.shape[1]), 1).values.mean(1)
    mrkd_max = head.blur(mrkd).flatten(1).amax(1)
    out["patchcore"] = mrkd_max + weighted
    out["knn patchcore"] = weighted
    out["mrkd only"] = mrkd_max
    out["knn only"] = head.blur(knn).flatten(1).amax(1)
    return {name: scores.double().numpy() for name, scores in out.items()}


def run(seeds=(0, 1, 2, 3, 4), categories=("elpv_mono", "elpv_poly"), work=None,
        image_size: int = SETTINGS["image_size"], log=print) -> dict:
    from mrkd.benchmarks.bench_refit import auroc, study_means, study_models
    results = {"image_size": image_size, "runs": []}
    rows = []
    for case in study_models(seeds, categories, work, image_size, log):
        good, defect = case.good, case.defect
        variants = image_score_variants(case.model, good + defect)
        row = {name: auroc(s[:len(good)], s[len(good):]) for name, s in variants.items()}
        log(f"[image score] {case.category} seed {case.seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
        results["runs"].append({"category": case.category, "seed": case.seed, "auroc": row})
        rows.append((case.category, row))
    results["means"] = study_means(rows)
    return results


def main(argv=None) -> None:
    import argparse

    from mrkd.benchmarks.bench_refit import add_study_arguments, report_study
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_study_arguments(parser)
    args = parser.parse_args(argv)
    report_study(run(tuple(args.seeds), tuple(args.categories), args.work, args.image_size), args.out)


if __name__ == "__main__":
    main()
