"""A position-restricted memory bank, tried on the ELPV validation split (the kNN half of ``--score both``).

    python -m mrkd.benchmarks.bench_knn_radius [--categories elpv_mono elpv_poly] [--radii 0 1 2 3 5 8 32]

The shipped bank is searched whole: a test patch's distance is to its nearest training patch from
anywhere in any training image. On parts held in a fixture (ELPV cells are cut and rectified), a patch
could instead be compared only with training patches from nearby positions: radius R keeps those whose
stride-8 grid position is within R cells in both directions (R = 0: the same position only, as PaDiM's
per-position model; R >= the grid side: the whole bank). Lite0 ImageNet teacher, 256 px, the shipped
3 x 3 averaged stride-8/16 patches, the validation layout's 160 training cells, **every** training patch
(no coreset, so the radius is the only difference), the image score the maximum of the map smoothed with
sigma S in grid cells (0: unsmoothed). Validation cells only; the test split is never read.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Sequence

RADII = (0, 1, 2, 3, 5, 8, 32)
SIGMAS = (0.0, 0.5, 1.0)


def radius_nearest(train, test, radius: int):
    """Each test patch's L2 distance to its nearest training patch within ``radius`` grid cells of its
    own position. ``train``: N×C×h×w, ``test``: M×C×h×w (torch); returns M×h×w."""
    import torch
    n, channels, h, w = train.shape
    by_position = train.permute(2, 3, 0, 1).contiguous()        # h×w×N×C
    queries = test.permute(2, 3, 0, 1).contiguous()              # h×w×M×C
    best = torch.empty(h, w, len(test))
    for i in range(h):
        for j in range(w):
            near = by_position[max(0, i - radius):i + radius + 1, max(0, j - radius):j + radius + 1]
            best[i, j] = torch.cdist(queries[i, j], near.reshape(-1, channels)).amin(1)
    return best.permute(2, 0, 1)


def smoothed_max(maps, sigma: float):
    """Per map (M×h×w), the maximum after a Gaussian blur of ``sigma`` grid cells (reflected border;
    0: no blur)."""
    import torch
    import torch.nn.functional as F
    if sigma == 0:
        return maps.flatten(1).amax(1)
    size = int(4 * sigma + 0.5) * 2 + 1
    x = torch.arange(size, dtype=torch.float32) - size // 2
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    m = F.pad(maps[:, None], (size // 2, size // 2, 0, 0), mode="reflect")
    m = F.conv2d(m, kernel.view(1, 1, 1, size))
    m = F.pad(m, (0, 0, size // 2, size // 2), mode="reflect")
    m = F.conv2d(m, kernel.view(1, 1, size, 1))
    return m.flatten(1).amax(1)


def run(categories: Sequence[str], radii: Sequence[int], work: Path, log=print) -> Dict[str, dict]:
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from mrkd.benchmarks.bench_quality import _batches
    from mrkd.train.data import scan_category
    from mrkd.train.elpv import layout_elpv
    from mrkd.train.memory_bank import _teacher, patch_features
    from mrkd.train.model import build_model
    layout = layout_elpv(Path(work) / "elpv_validation_160", split="validation", max_train=160)
    model = build_model("efficientnet_lite0", "imagenet", image_size=256).eval()

    def features(paths):
        with torch.no_grad():
            return torch.cat([patch_features(_teacher(model, x), 3) for x in _batches(paths, model.config)])
    results: Dict[str, dict] = {}
    for category in categories:
        data = scan_category(layout.root, category)
        paths = [item.path for item in data.test_items]
        labels = np.array([item.label for item in data.test_items])
        train, test = features(data.train_paths), features(paths)
        results[category] = {}
        for radius in radii:
            started = time.perf_counter()
            maps = radius_nearest(train, test, radius)
            row = {f"sigma {s:g}": round(float(roc_auc_score(labels, smoothed_max(maps, s).numpy())), 4)
                   for s in SIGMAS}
            results[category][f"radius {radius}"] = row
            log(f"{category} radius {radius}: {row} ({time.perf_counter() - started:.0f} s)")
    return results


def main(argv=None) -> None:
    import argparse

    from mrkd.benchmarks.module_main import run_in_work
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--categories", nargs="+", default=["elpv_mono", "elpv_poly"],
                        help="ELPV categories (default: both)")
    parser.add_argument("--radii", nargs="+", type=int, default=list(RADII),
                        help="search radii in stride-8 grid cells (32 covers a 256 px image: the whole bank)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the ELPV layout (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    run_in_work(lambda work: run(args.categories, args.radii, work), args.work, args.out)


if __name__ == "__main__":
    main()
