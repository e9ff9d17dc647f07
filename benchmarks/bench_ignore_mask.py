"""Ignore masks on real images: ELPV cells carrying a "date code" that differs on every part.

    python -m mrkd.benchmarks.bench_ignore_mask [--categories elpv_mono] [--seeds 0] [--image-size 256]

A line's parts often carry a print that changes from part to part (a date code, a serial number); the
model has never seen that print, so every part is flagged there. The camera's ignore mask leaves the area
out, but the anomaly map is smoothed (and the teacher's features reach across patches) before it is
masked, so a mask drawn tight around the print still lets some of it through; the page's editor widens
each rectangle by two sigmas of the blur (``MapGeometry.blur_margin``). This study measures both:

Every cell of the ELPV layout (training and test alike) gets its own random code of bright 10 px blocks
in rows 10-110, columns 10-150 (of the 300 px cell); the default model (``--score both``, Lite0 ImageNet
teacher) is trained on the coded training cells, and the coded test cells are scored as a camera scores
them (``train/calibrate.py`` ``score_images``: the map's maximum outside the mask at the frame's own
geometry). Image AUROC (sklearn) for: coded cells without a mask, and under masks over the code widened by
0 (tight), 1, 2 (the editor's), 4 and 8 sigmas of the blur. The reference is a second model, trained and
tested on the same cells without codes: without a mask (what a line without a code gets), and under the
editor's mask (what leaving the area out costs: a defect there is not seen).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

SCHEMA_VERSION = 1
CELL = 300                                        # ELPV cells are 300 x 300
CODE = (slice(10, 110), slice(10, 150))           # where the code is printed: rows, columns
BLOCK = 10                                        # one block of the code, pixels
MARGINS = (0.0, 1.0, 2.0, 4.0, 8.0)                  # mask margin around the code, in sigmas of the map's blur


@dataclass
class MaskBenchSettings:
    image_size: int = 256
    epochs: int = 10
    max_train: int = 160
    seeds: Tuple[int, ...] = (0,)
    categories: Tuple[str, ...] = ("elpv_mono", "elpv_poly")
    split: str = "test"
    margins: Tuple[float, ...] = MARGINS
    threads: int = 2
    schema_version: int = SCHEMA_VERSION


def paint_code(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` (grayscale) with a random code of white/black BLOCK-pixel blocks over CODE; a copy."""
    rows, cols = CODE
    h, w = rows.stop - rows.start, cols.stop - cols.start
    blocks = rng.integers(0, 2, size=(h // BLOCK, w // BLOCK))
    coded = image.copy()
    coded[rows, cols] = blocks.repeat(BLOCK, 0).repeat(BLOCK, 1).astype(np.uint8) * 255
    return coded


def code_mask(margin_xy: Tuple[int, int], shape: Tuple[int, int] = (CELL, CELL)) -> np.ndarray:
    """A mask (uint8, 255: not judged) over CODE widened by ``margin_xy`` (x, y) pixels on every side."""
    rows, cols = CODE
    mx, my = margin_xy
    mask = np.zeros(shape, np.uint8)
    mask[max(rows.start - my, 0):rows.stop + my, max(cols.start - mx, 0):cols.stop + mx] = 255
    return mask


def coded_copy(source: Path, target: Path, seed: int) -> List[Path]:
    """Every image under ``source`` written under ``target`` (same relative paths) with its own code."""
    import cv2
    rng = np.random.default_rng(seed)
    written = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if image is None or image.shape != (CELL, CELL):
            shutil.copyfile(path, out)
            continue
        cv2.imwrite(str(out), paint_code(image, rng))
        written.append(out)
    return written


def run_category(layout_root: Path, work: Path, category: str, seed: int, settings: MaskBenchSettings,
                 log=print) -> Dict[str, float]:
    import cv2
    import torch
    from sklearn.metrics import roc_auc_score

    from mrkd.benchmarks.bench_quality import QualitySettings, train_mrkd
    from mrkd.runtime.ignore_mask import BLUR_MARGIN_SIGMAS, MapGeometry, load_ignore_mask
    from mrkd.train.calibrate import score_images
    from mrkd.train.data import scan_category
    from mrkd.train.memory_bank import DEFAULT_MAX_PATCHES, fit_memory_bank
    coded_root = work / f"coded_{seed}"
    if not (coded_root / category).exists():
        coded_copy(layout_root / category, coded_root / category, seed)
    clean, coded = scan_category(layout_root, category), scan_category(coded_root, category)
    labels = np.array([item.label for item in coded.test_items])
    assert labels.tolist() == [item.label for item in clean.test_items]
    quality = QualitySettings(image_size=settings.image_size, epochs=settings.epochs, max_train=settings.max_train,
                              threads=settings.threads)
    torch.set_num_threads(settings.threads)

    def trained(root: Path, data, what: str):       # the default --score both model, as bench_quality's
        started = time.perf_counter()
        model = train_mrkd(root, category, quality, "imagenet", seed)
        fit_memory_bank(model, data.train_paths, "both", quality.coreset_fraction, seed, sampler="coreset",
                        max_patches=DEFAULT_MAX_PATCHES)
        log(f"{category} seed {seed}: trained on {len(data.train_paths)} {what} cells in "
            f"{time.perf_counter() - started:.0f} s")
        return model

    def auroc(model, data, mask=None) -> float:
        paths = [item.path for item in data.test_items]
        return round(float(roc_auc_score(labels, score_images(model, paths, mask=mask))), 4)

    def mask_of(model, sigmas: float):
        path = work / f"mask_{sigmas:g}.png"
        geometry = MapGeometry(settings.image_size, model.config.resize_mode, model.config.sigma)
        cv2.imwrite(str(path), code_mask(geometry.blur_margin((CELL, CELL), sigmas)))
        return load_ignore_mask(path)
    model = trained(coded_root, coded, "coded")
    row = {"coded, no mask": auroc(model, coded)}
    for sigmas in settings.margins:
        row[f"coded, mask + {sigmas:g} sigma"] = auroc(model, coded, mask_of(model, sigmas))
    del model
    reference = trained(layout_root, clean, "uncoded")
    row["no code, no mask"] = auroc(reference, clean)
    row[f"no code, mask + {BLUR_MARGIN_SIGMAS:g} sigma"] = auroc(reference, clean,
                                                               mask_of(reference, BLUR_MARGIN_SIGMAS))
    log(f"{category} seed {seed}: {row}")
    return row


def run(settings: MaskBenchSettings, work: Path, log=print) -> dict:
    from mrkd.train.elpv import layout_elpv
    layout = layout_elpv(work / f"elpv_{settings.split}_{settings.max_train}", split=settings.split,
                         max_train=settings.max_train)
    runs = {f"{category} seed {seed}": run_category(Path(layout.root), work, category, seed, settings, log)
            for category in settings.categories for seed in settings.seeds}
    return {"settings": asdict(settings), "runs": runs}


def main(argv: Sequence[str] = None) -> None:
    import argparse

    from mrkd.benchmarks.module_main import run_in_work
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--categories", nargs="+", default=list(MaskBenchSettings.categories),
                        help="ELPV categories (default: both)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(MaskBenchSettings.seeds),
                        help="training seeds (default: 0)")
    parser.add_argument("--image-size", type=int, default=MaskBenchSettings.image_size,
                        help="model input size in pixels (default 256)")
    parser.add_argument("--epochs", type=int, default=MaskBenchSettings.epochs, help="training epochs (default 10)")
    parser.add_argument("--max-train", type=int, default=MaskBenchSettings.max_train,
                        help="training cells per category (default 160)")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="ELPV split to score (default test; nothing is tuned here)")
    parser.add_argument("--margins", nargs="+", type=float, default=list(MARGINS),
                        help="mask margins around the code in sigmas of the map's blur (default 0 1 2 4 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the layout and the coded copies (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    settings = MaskBenchSettings(image_size=args.image_size, epochs=args.epochs, max_train=args.max_train,
                                 seeds=tuple(args.seeds), categories=tuple(args.categories), split=args.split,
                                 margins=tuple(args.margins), threads=args.threads)
    run_in_work(lambda work: run(settings, work), args.work, args.out)


if __name__ == "__main__":
    main()
