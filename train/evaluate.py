"""Evaluation on a category's test split: metrics, metrics.json, ROC and histogram PNGs, overlays.

    result = evaluate(model, "data/", "grain", out_dir="runs/grain/eval")
    print(format_table({"grain": result}))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from mrkd.atomic import atomic_write_bytes, atomic_write_text
from mrkd.errors import SettingError
from mrkd.train import metrics
from mrkd.runtime.calibration import Calibration

TABLE_COLUMNS = (("image_auroc", "img AUROC"), ("pixel_auroc", "pix AUROC"), ("aupro", "AUPRO"),
                 ("aupro_paper", "AUPRO(paper)"), ("precision", "P@thr"), ("recall", "R@thr"), ("f1", "F1@thr"))
MASKS_COLUMN = "masks"    # defect images with a usable mask / defect images
# What a run folder hands on: the final epoch's weights (never a checkpoint chosen on test labels).
CHECKPOINT_NAMES = ("last.ckpt",)


def write_png(path, bgr) -> None:
    """Encode a uint8 BGR image as PNG and write it atomically."""
    import cv2
    ok, encoded = cv2.imencode(".png", bgr)
    if not ok:
        raise ValueError(f"could not encode {path} as PNG")
    atomic_write_bytes(path, encoded.tobytes())


def resolve_device(spec: str = "auto"):
    """'auto' -> CUDA when available, else CPU; otherwise the torch.device named."""
    import torch
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from mrkd.errors import DeviceError
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise DeviceError(f"device {spec!r} is not a device name ('auto', 'cpu', 'cuda' or 'cuda:N')") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r} asked for but CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {spec!r} asked for but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def maps_on_test_split(model, items, batch_size: int = 8, device=None, progress: bool = True,
              num_workers: int = 0) -> dict:
    """Anomaly maps of test items: ``maps`` N×H×W float32, ``scores`` N, ``masks`` N×H×W bool,
    ``has_mask`` N bool (False for defect images labelled per image only), ``labels`` N, ``paths``.
    Pre-processing is the model's own (image size, resize mode, mean/std)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from mrkd.child_signal import sigchld_kept
    from mrkd.train.data import TestDataset

    config = model.config
    device = device or next(model.parameters()).device
    dataset = TestDataset(items, config.image_size, config.resize_mode, config.mean, config.std)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    maps, masks, labels, paths = [], [], [], []
    was_training = model.training
    model.eval()
    with torch.no_grad(), sigchld_kept():
        for image, mask, label, path in tqdm(loader, desc="evaluating", unit="batch", leave=False,
                                             disable=not progress):
            maps.append(model.anomaly_map(image.to(device))[:, 0].float().cpu().numpy())
            masks.append(mask.numpy())
            labels.append(np.asarray(label))
            paths.extend(path)
    model.train(was_training)
    maps_array = np.concatenate(maps)
    return {"maps": maps_array, "scores": maps_array.reshape(len(maps_array), -1).max(1),
            "masks": np.concatenate(masks), "labels": np.concatenate(labels).astype(int), "paths": paths,
            "has_mask": np.array([item.mask_path is not None for item in items], bool)}


def metrics_of_arrays(arrays: dict, threshold: Optional[float] = None) -> dict:
    """metrics.evaluate_arrays on maps_on_test_split's arrays; warns (once per set of files) about
    defect masks that are empty or cover the whole image, naming them; their paths are in the result."""
    import warnings

    from mrkd.train.data import _some
    status = metrics.mask_status(arrays["labels"], arrays["masks"], arrays["has_mask"])
    result = metrics.evaluate_arrays(arrays["labels"], arrays["scores"], arrays["masks"], arrays["maps"],
                                     threshold=threshold, has_mask=arrays["has_mask"])
    for key, index, what in (("empty_masks", status.empty, "an empty mask (left out of the pixel metrics)"),
                             ("full_masks", status.full, "a mask covering the whole image (left out of AUPRO)")):
        paths = [arrays["paths"][i] for i in index]
        result[key] = paths
        if paths:
            warnings.warn(f"{len(paths)} defect image(s) have {what}, at the model's size: {_some(paths)}")
    return result


def metrics_on_test_split(model, items, threshold: Optional[float] = None, **kwargs) -> dict:
    """Metrics of ``model`` on the test items (see metrics_of_arrays; keys image_auroc, pixel_auroc,
    aupro, aupro_paper, the mask counts, ...)."""
    return metrics_of_arrays(maps_on_test_split(model, items, **kwargs), threshold)


def _write_plots(arrays: dict, result: dict, threshold: Optional[float], out_dir: Path, config,
                 n_overlays: int) -> List[str]:
    from mrkd.runtime.images import read_image
    from mrkd.runtime.preprocess import resize_square
    from mrkd.train.plots import heatmap_overlay, plot_roc, plot_score_histogram

    labels, scores, masks, maps = arrays["labels"], arrays["scores"], arrays["masks"], arrays["maps"]
    fpr, tpr, _ = metrics.roc_curve_points(labels, scores)
    curves = {"image": (fpr, tpr, result["image_auroc"])}
    if result.get("pixel_auroc") is not None:
        pixel = metrics.mask_status(labels, masks, arrays["has_mask"]).pixel_images
        # Every 8th pixel keeps the pixel ROC plot small; the AUROC in the legend is the exact one.
        pfpr, ptpr, _ = metrics.roc_curve_points(masks[pixel].ravel()[::8], maps[pixel].ravel()[::8])
        curves["pixel"] = (pfpr, ptpr, result["pixel_auroc"])
    written = [out_dir / "roc.png", out_dir / "score_histogram.png"]
    plot_roc(curves, written[0])
    plot_score_histogram(scores[labels == 0], scores[labels == 1], threshold, written[1])
    # Overlays: the highest-scoring defects and good images, on the square the model saw.
    vmax = threshold if threshold is not None else float(maps.max())
    order = np.argsort(-scores)
    chosen = [i for i in order if labels[i] == 1][:n_overlays] + [i for i in order if labels[i] == 0][:n_overlays]
    for index in chosen:
        square = resize_square(read_image(arrays["paths"][index]), config.image_size, config.resize_mode)
        overlay = heatmap_overlay(square, maps[index], vmin=0.0, vmax=vmax)
        name = f"{'defect' if labels[index] else 'good'}_{index:04d}_{Path(arrays['paths'][index]).stem}.png"
        target = out_dir / "overlays" / name
        write_png(target, overlay)
        written.append(target)
    return [str(p) for p in written]


EVALUATION_FILES = ("metrics.json", "roc.png", "score_histogram.png", "overlays")


def earlier_evaluation(out_dir, categories: Sequence[str] = ()) -> List[Path]:
    """The files of an earlier evaluation in ``out_dir`` (and its ``<category>/`` folders)."""
    folders = [Path(out_dir)] + [Path(out_dir) / category for category in categories]
    return [folder / name for folder in folders for name in EVALUATION_FILES if (folder / name).exists()]


def claim_out_dir(out_dir, categories: Sequence[str] = (), replace: bool = False) -> None:
    """Refuse an ``out_dir`` that holds an earlier evaluation (SettingError), or with ``replace`` remove
    those files (and only those) first: a second evaluation into the same folder left the first one's
    overlays beside the second's metrics, and metrics that no longer said which model they were."""
    import shutil
    earlier = earlier_evaluation(out_dir, categories)
    if earlier and not replace:
        shown = ", ".join(str(path.relative_to(out_dir)) for path in earlier[:4]) + (" ..." if len(earlier) > 4 else "")
        raise SettingError(f"{out_dir}: holds an earlier evaluation ({shown}); evaluations are never written "
                           "over one another: name a new folder (-o)")
    for path in earlier:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def evaluate(model, data_root, category: str, out_dir=None, batch_size: int = 8, device="auto",
             n_overlays: int = 4, progress: bool = True, skip_unreadable: bool = False,
             require_masks: bool = False, checkpoint=None, replace: bool = False) -> dict:
    """Evaluate ``model`` (an MRKD or a checkpoint path) on ``data_root/category``'s test split.

    Returns metrics_of_arrays' dict (+ ``threshold``, ``n_good``, ``n_defect``, ``category``, and
    ``checkpoint``/``checkpoint_sha256``: the file evaluated, ``model`` itself when it is a path).
    Image metrics cover every test image; pixel metrics the images with usable masks (the counts and
    ``pixel_metrics`` say which; ``require_masks``: a defect image without a mask is an error).
    With ``out_dir``: writes metrics.json, roc.png, score_histogram.png and overlays/*.png there; a
    folder with an earlier evaluation is refused unless ``replace`` (claim_out_dir).
    """
    from mrkd.runtime.metadata import file_sha256
    from mrkd.train.checkpoint import load_checkpoint
    from mrkd.train.data import DataError, scan_category

    if out_dir is not None:
        claim_out_dir(out_dir, replace=replace)
    if not hasattr(model, "anomaly_map"):
        checkpoint = model
        model = load_checkpoint(model)
    device = resolve_device(device) if isinstance(device, str) or device is None else device
    model = model.to(device)
    data = scan_category(data_root, category, skip_unreadable=skip_unreadable, require_masks=require_masks)
    if not any(item.label == 1 for item in data.test_items) or not any(item.label == 0 for item in data.test_items):
        raise DataError(f"{Path(data_root) / category / 'test'}: evaluation needs good and defective test images")
    threshold = Calibration.threshold_of(model.calibration, "model calibration")
    arrays = maps_on_test_split(model, data.test_items, batch_size, device, progress)
    result = metrics_of_arrays(arrays, threshold)
    result.update(category=category, threshold=threshold, n_good=int((arrays["labels"] == 0).sum()),
                  n_defect=int((arrays["labels"] == 1).sum()), skipped_unreadable=len(data.skipped_unreadable),
                  data_root=str(Path(data_root).resolve()))
    if checkpoint is not None:    # which model these numbers are of (the file, not only its name)
        result.update(checkpoint=str(checkpoint), checkpoint_sha256=file_sha256(checkpoint))
    if out_dir is not None:
        out_dir = Path(out_dir)
        result["files"] = _write_plots(arrays, result, threshold, out_dir, model.config, n_overlays)
        atomic_write_text(out_dir / "metrics.json", json.dumps(_jsonable(result), indent=2) + "\n")
    return result


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def find_checkpoints(path, categories: Optional[Sequence[str]] = None) -> Dict[str, Path]:
    """category -> checkpoint: ``path`` is one checkpoint file (its category is the folder's name unless
    one category is given) or a run folder holding <category>/last.ckpt (the final epoch's weights)."""
    from mrkd.runtime.images import visible_subfolders
    from mrkd.train.checkpoint import CheckpointError

    path = Path(path)
    if path.is_file():
        name = categories[0] if categories else path.parent.name
        return {name: path}
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or run folder")
    found = {}
    for folder in visible_subfolders(path):      # a hidden .washer.old/ is no category
        if categories and folder.name not in categories:
            continue
        for name in CHECKPOINT_NAMES:
            if (folder / name).is_file():
                found[folder.name] = folder / name
                break
    if categories:
        missing = [c for c in categories if c not in found]
        if missing:
            raise CheckpointError(f"{path}: no {' or '.join(CHECKPOINT_NAMES)} for {missing}")
    if not found:
        raise CheckpointError(f"{path}: no <category>/{CHECKPOINT_NAMES[0]} found in this run folder")
    return found


def run_checkpoint(path, category: Optional[str] = None):
    """(checkpoint file, category it is used for) from a checkpoint file or a run folder.

    A run folder is a category's folder (holding last.ckpt, the final epoch: what training hands on)
    or a run root with one <category>/last.ckpt (pick one with ``category`` when there are several).
    The category is the one given, else the category folder's name (None for a bare file)."""
    from mrkd.train.checkpoint import CheckpointError

    path = Path(path)
    if path.is_file():
        return path, category
    if (path / CHECKPOINT_NAMES[0]).is_file():
        return path / CHECKPOINT_NAMES[0], category or path.name
    found = find_checkpoints(path, [category] if category else None)
    if len(found) > 1:
        raise CheckpointError(f"{path}: holds checkpoints of several categories ({', '.join(found)}); "
                              f"choose one with --category")
    (name, checkpoint), = found.items()
    return checkpoint, name


def mean_row(results: Mapping[str, dict]) -> dict:
    """The mean of every numeric table column over the categories that have it."""
    row = {}
    for key, _ in TABLE_COLUMNS:
        values = [r[key] for r in results.values() if isinstance(r.get(key), (int, float))]
        if values:
            row[key] = float(np.mean(values))
    return row


def evaluate_all(checkpoints, data_root, categories: Optional[Sequence[str]] = None, out_dir=None,
                 test_time_mask: Optional[bool] = None, warn: Optional[Callable[[str], None]] = None,
                 replace: bool = False, **kwargs) -> Dict[str, dict]:
    """Evaluate every category's checkpoint (see find_checkpoints); adds a "mean" row.

    Each category's files go to ``out_dir/<category>/``; the table (with mean) to ``out_dir/metrics.json``.
    ``test_time_mask`` overrides the student's test-time masking (None: as trained); ``warn`` receives
    a line when a checkpoint was trained on another category than the one it is evaluated on.
    ``out_dir`` with an earlier evaluation is refused before anything runs, unless ``replace``.
    """
    from mrkd.train.checkpoint import category_mismatch, model_from_dict, read_checkpoint

    from mrkd.train.data import check_category, require_category_folders
    found = find_checkpoints(checkpoints, [check_category(name) for name in categories] if categories else None)
    if len(found) > 1:     # a category the data lacks is refused before the others are evaluated and written
        for category in found:
            require_category_folders(data_root, category)
    if out_dir is not None:
        claim_out_dir(out_dir, list(found), replace=replace)
    results = {}
    for category, checkpoint in found.items():
        model = model_from_dict(read_checkpoint(checkpoint, warn=warn), source=str(checkpoint))
        mismatch = category_mismatch(model, category, checkpoint)
        if mismatch and warn is not None:
            warn(mismatch)
        if test_time_mask is not None:
            model.student.test_time_mask = test_time_mask
        target = None if out_dir is None else Path(out_dir) / category
        results[category] = evaluate(model, data_root, category, target, checkpoint=checkpoint, **kwargs)
    if len(results) > 1:
        results["mean"] = mean_row(results)
    if out_dir is not None:
        atomic_write_text(Path(out_dir) / "metrics.json", json.dumps(_jsonable(results), indent=2) + "\n")
    return results


def format_table(results: Mapping[str, dict]) -> str:
    """A plain-text table: one row per category (and the mean), the TABLE_COLUMNS as columns, then how
    many defect images had masks ("masks": with usable mask / all defect images) and, per category
    whose pixel metrics did not cover every defect image, over what they ran (or that they are n/a)."""
    width = max([len("category")] + [len(name) for name in results])
    header = (f"{'category':<{width}}  " + "  ".join(f"{title:>12}" for _, title in TABLE_COLUMNS)
              + f"  {MASKS_COLUMN:>9}")
    lines = [header, "-" * len(header)]
    notes = []
    for name, row in results.items():
        cells = []
        for key, _ in TABLE_COLUMNS:
            value = row.get(key)
            cells.append(f"{value:>12.4f}" if isinstance(value, (int, float)) else f"{'-':>12}")
        masked = row.get("n_defect_with_regions")
        masks = f"{masked}/{row['n_defect']}" if masked is not None and "n_defect" in row else "-"
        lines.append(f"{name:<{width}}  " + "  ".join(cells) + f"  {masks:>9}")
        if masked is not None and row.get("n_defect") is not None and masked < row["n_defect"]:
            notes.append(f"{name}: pixel metrics {row.get('pixel_metrics')}")
    if "mean" in results and notes:
        notes.append("mean: each column over the categories that have it")
    return "\n".join(lines + notes)
