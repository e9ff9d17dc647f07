"""Evaluation plots written as PNG files: ROC curves, score histograms, heat-map overlays.

matplotlib is imported inside each function and drawn through the Agg canvas directly (no
pyplot, no global backend switch), so plotting works headless and in threads. Files are
written atomically: a crash never leaves a half-written PNG behind.
"""

from __future__ import annotations

import io
import os
from typing import Mapping, Sequence

import numpy as np

from mrkd.atomic import atomic_write_bytes
from mrkd.deps import require
from mrkd.runtime.outputs.overlay import heatmap_overlay  # noqa: F401  (re-exported: one implementation)


def _new_figure(figsize: Sequence[float], dpi: int):
    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=tuple(figsize), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure, path: str | os.PathLike, dpi: int) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)  # no bbox "tight": the size stays figsize × dpi
    atomic_write_bytes(path, buffer.getvalue())


def plot_roc(curves: Mapping[str, tuple], path: str | os.PathLike,
             figsize: Sequence[float] = (5.0, 5.0), dpi: int = 100) -> None:
    """ROC curves in one chart: ``curves`` maps a name to ``(fpr, tpr, auc)``; PNG of figsize × dpi pixels."""
    if not curves:
        raise ValueError("plot_roc needs at least one curve")
    figure = _new_figure(figsize, dpi)
    axes = figure.add_subplot()
    for name, (fpr, tpr, auc) in curves.items():
        fpr, tpr = np.asarray(fpr), np.asarray(tpr)
        if fpr.shape != tpr.shape:
            raise ValueError(f"curve {name!r}: fpr {fpr.shape} and tpr {tpr.shape} differ")
        axes.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
             title="ROC")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    _save_png(figure, path, dpi)


def plot_score_histogram(good_scores, defect_scores, threshold, path: str | os.PathLike,
                         bins: int = 40, figsize: Sequence[float] = (6.0, 4.0), dpi: int = 100) -> None:
    """Histograms of good and defective image scores with the alarm threshold as a vertical line.

    ``threshold`` may be None (no line). PNG of figsize × dpi pixels.
    """
    good = np.asarray(good_scores, dtype=np.float64).ravel()
    defect = np.asarray(defect_scores, dtype=np.float64).ravel()
    if good.size + defect.size == 0:
        raise ValueError("plot_score_histogram needs at least one score")
    every = np.concatenate([good, defect] + ([np.asarray([threshold], float)] if threshold is not None else []))
    if not np.isfinite(every).all():
        raise ValueError("scores and threshold must be finite")
    edges = np.histogram_bin_edges(every, bins=bins)  # shared bins: the two histograms line up
    figure = _new_figure(figsize, dpi)
    axes = figure.add_subplot()
    if good.size:
        axes.hist(good, bins=edges, alpha=0.6, color="tab:green", label=f"good ({good.size})")
    if defect.size:
        axes.hist(defect, bins=edges, alpha=0.6, color="tab:red", label=f"defect ({defect.size})")
    if threshold is not None:
        axes.axvline(float(threshold), color="black", linestyle="--", label=f"threshold {float(threshold):.4g}")
    axes.set(xlabel="anomaly score", ylabel="images", title="Image scores")
    axes.legend(fontsize="small")
    figure.tight_layout()
    _save_png(figure, path, dpi)
