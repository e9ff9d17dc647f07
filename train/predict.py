"""Score new images with a trained model: scores.csv, one anomaly map (.npy) and one overlay PNG per image.

    summary = predict(load_checkpoint("runs/grain/last.ckpt"), "incoming/*.png", "out/")

Unreadable files are reported (skipped.csv and the summary) and skipped; they never stop the run.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import List

import numpy as np

from mrkd.atomic import atomic_write_bytes, atomic_write_text
from mrkd.errors import SettingError
from mrkd.runtime.line.alarms import is_anomalous
from mrkd.train.evaluate import write_png
from mrkd.runtime.calibration import Calibration

SCORES_FILE = "scores.csv"
SKIPPED_FILE = "skipped.csv"


def list_inputs(inputs) -> List[str]:
    """One image file, a folder (its images, not recursive) or a glob -> sorted paths."""
    from mrkd.train.data import scan_folder
    path = Path(str(inputs))
    if path.is_file():
        return [str(path)]
    return scan_folder(inputs)


def _unique_stems(paths: List[str]) -> List[str]:
    seen, names = {}, []
    for path in paths:
        stem = Path(path).stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def predict(model, inputs, out_dir, batch_size: int = 8, device=None, progress: bool = True,
            write_maps: bool = True, write_overlays: bool = True) -> dict:
    """Score every image of ``inputs`` (file, folder or glob) with ``model`` (an MRKD).

    Decision: ``score >= threshold`` (model.calibration.threshold; no decision when uncalibrated).
    Writes ``out_dir``/scores.csv (path, score, normalized_score, decision), maps/<stem>.npy (H×W
    float32 at the model's image size), overlays/<stem>.png and skipped.csv. Returns
    ``{"rows": [...], "n_scored", "n_skipped", "skipped": [(path, reason)], "scores_csv"}``.
    """
    import torch
    from tqdm import tqdm

    from mrkd.runtime.images import ImageReadError, read_image
    from mrkd.runtime.outputs.overlay import heatmap_overlay
    from mrkd.runtime.preprocess import normalize_batch, resize_square

    out_dir = Path(out_dir)
    earlier = [name for name in (SCORES_FILE, SKIPPED_FILE, "maps", "overlays") if (out_dir / name).exists()]
    if earlier:
        # a second prediction into the same folder mixed two runs (scores.csv of one, maps of both)
        raise SettingError(f"{out_dir}: holds an earlier prediction ({', '.join(earlier)}); predictions are never "
                           "written over one another: name a new folder (-o)")
    paths = list_inputs(inputs)
    names = _unique_stems(paths)
    config, calibration = model.config, Calibration.of(model.calibration, "model calibration")
    threshold = None if calibration is None else calibration.threshold
    device = device or next(model.parameters()).device
    model.eval()

    rows, skipped = [], []
    bar = tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress, leave=False)
    for start in range(0, len(paths), batch_size):
        squares, kept = [], []
        for index in range(start, min(start + batch_size, len(paths))):
            try:
                squares.append(resize_square(read_image(paths[index]), config.image_size, config.resize_mode))
                kept.append(index)
            except ImageReadError as exc:
                skipped.append((paths[index], str(exc)))
                bar.write(f"skipped unreadable image: {exc}")
        bar.update(min(batch_size, len(paths) - start))
        if not kept:
            continue
        batch = torch.from_numpy(normalize_batch(np.stack(squares), config.mean, config.std)).to(device)
        with torch.no_grad():
            maps = model.anomaly_map(batch)[:, 0].float().cpu().numpy()
        scores = maps.reshape(len(maps), -1).max(1)
        for square, amap, score, index in zip(squares, maps, scores, kept):
            row = {"path": paths[index], "score": float(score),
                   "normalized_score": float(calibration.normalized(score)) if threshold is not None else "",
                   "decision": ("anomalous" if is_anomalous(score, threshold) else "good") if threshold is not None else ""}
            if write_maps:
                buffer = io.BytesIO()
                np.save(buffer, amap.astype(np.float32))
                atomic_write_bytes(out_dir / "maps" / f"{names[index]}.npy", buffer.getvalue())
            if write_overlays:
                overlay = heatmap_overlay(square, amap, vmin=0.0, vmax=threshold)
                write_png(out_dir / "overlays" / f"{names[index]}.png", overlay)
            rows.append(row)
    bar.close()
    if not rows:
        # every file was unreadable: an empty scores.csv and exit 0 read as "all good parts"
        from mrkd.train.data import DataError
        path, reason = skipped[0]
        raise DataError(f"none of the {len(paths)} image file(s) of {inputs} could be read, nothing was scored or "
                        f"written (first: {reason})")

    atomic_write_text(out_dir / SCORES_FILE, _csv(rows, ("path", "score", "normalized_score", "decision")))
    atomic_write_text(out_dir / SKIPPED_FILE, _csv([{"path": p, "reason": r} for p, r in skipped], ("path", "reason")))
    return {"rows": rows, "n_scored": len(rows), "n_skipped": len(skipped), "skipped": skipped,
            "n_anomalous": sum(r["decision"] == "anomalous" for r in rows), "threshold": threshold,
            "scores_csv": str(out_dir / SCORES_FILE)}


def _csv(rows, columns) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
