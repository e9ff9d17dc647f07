"""Parity reports: an exported graph's outputs against the PyTorch model (or an FP32 reference).

One comparison serves every report (FP32 parity, FP16 fidelity, INT8 agreement): the map error,
the score error and how often the decision (score >= threshold: runtime.alarms.is_anomalous, the
runtime's rule) agrees. The PyTorch reference comes from the MRKD model's own API (``anomaly_map``,
``per_scale_maps``) and the shared numpy pre-processing, not from the module that was traced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from mrkd.errors import MrkdError
from mrkd.export.onnx_graph import ExportOptions, example_input, has_knn_map, output_names
from mrkd.runtime.line.alarms import is_anomalous
from mrkd.runtime.calibration import Calibration

FP32_TOLERANCE = 1e-4    # relative to the map's magnitude (at least 1): --score both maps run to ~100


class ParityError(MrkdError, AssertionError):
    """An exported graph disagrees with its reference beyond the tolerance."""


@dataclass
class Comparison:
    """How far ``candidate`` is from ``reference`` on the same inputs."""

    name: str
    n_images: int
    max_abs_diff: Dict[str, float]             # per output
    map_max_abs_diff: float                    # the map the runtime uses (anomaly_map or scales)
    score_max_abs_diff: float
    decision_agreement: Optional[float]        # share of images with the same score >= threshold decision
    threshold: Optional[float]
    tolerance: Optional[float] = None
    finite: bool = True
    notes: List[str] = field(default_factory=list)
    subset: str = ""                           # which images, in a word ("good", "defect"), where it matters

    @property
    def passed(self) -> bool:
        return self.finite and (self.tolerance is None or self.map_max_abs_diff <= self.tolerance)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def format(self) -> str:
        agree = "n/a (no threshold)" if self.decision_agreement is None else f"{self.decision_agreement:.1%}"
        verdict = "" if self.tolerance is None else (" PASS" if self.passed else " FAIL") + f" (tol {self.tolerance:g})"
        images = f"{self.subset} image(s)" if self.subset else "image(s)"
        lines = [f"{self.name}: {self.n_images} {images}{verdict}",
                 f"  map max |diff|   {self.map_max_abs_diff:.3g}",
                 f"  score max |diff| {self.score_max_abs_diff:.3g}",
                 f"  decisions agree  {agree}" + ("" if self.threshold is None else f" at threshold {self.threshold:.6g}")]
        # the other outputs (the map and the score are shown above)
        lines += [f"  {name:<16} max |diff| {value:.3g}" for name, value in self.max_abs_diff.items()
                  if name != "score" and not (name == "anomaly_map" and value == self.map_max_abs_diff)]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def check(self) -> "Comparison":
        """Raise ParityError when the comparison failed."""
        if not self.passed:
            raise ParityError(self.format())
        return self


def torch_reference(model, batch: np.ndarray, options: ExportOptions) -> Dict[str, np.ndarray]:
    """What the graph should output, computed with the MRKD model's own API in FP32."""
    from mrkd.runtime.preprocess import normalize_batch
    if options.uint8_input:
        batch = normalize_batch(batch, model.config.mean, model.config.std)
    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    with torch.no_grad():
        names = output_names(options, has_knn_map(model))   # the exporter's names, in graph output order
        if options.per_scale_outputs:
            return {name: m.numpy() for name, m in zip(names, model.per_scale_maps(x))}
        if options.smooth_in_graph:
            maps = model.anomaly_map(x)
            return dict(zip(names, (maps.numpy(), model.head.scores(maps).numpy())))
        return dict(zip(names, (model.head(*model(x), smooth=False).numpy(),)))


def scores_from_outputs(outputs: Dict[str, np.ndarray], metadata) -> np.ndarray:
    """Image scores (float64) from graph outputs in the layout ``metadata`` describes, finished the
    way the runtime finishes them (runtime.postprocess.maps_and_scores: output names from the metadata)."""
    from mrkd.runtime.postprocess import maps_and_scores
    return maps_and_scores(outputs, metadata)[1].astype(np.float64)


def compare(name: str, reference: Dict[str, np.ndarray], candidate: Dict[str, np.ndarray], metadata,
            threshold: Optional[float], tolerance: Optional[float] = None) -> Comparison:
    """Compare two output dicts of the layout ``metadata`` (a ModelMetadata) describes."""
    missing = sorted(set(reference) - set(candidate))
    if missing:
        raise ParityError(f"{name}: outputs {missing} missing (got {sorted(candidate)})")
    diffs, finite = {}, True
    for key, ref in reference.items():
        cand = np.asarray(candidate[key], dtype=np.float64)
        if cand.shape != ref.shape:
            raise ParityError(f"{name}: output {key!r} has shape {cand.shape}, expected {ref.shape}")
        finite &= bool(np.isfinite(cand).all())
        diffs[key] = float(np.max(np.abs(cand - ref))) if np.isfinite(cand).all() else float("inf")
    map_keys = [k for k in diffs if k != metadata.outputs.score]
    ref_scores = scores_from_outputs(reference, metadata)
    cand_scores = scores_from_outputs(candidate, metadata)
    score_diff = float(np.max(np.abs(cand_scores - ref_scores))) if finite else float("inf")
    agreement = None
    if threshold is not None:
        agreement = float(np.mean(is_anomalous(ref_scores, threshold) == is_anomalous(cand_scores, threshold)))
    return Comparison(name=name, n_images=int(len(ref_scores)), max_abs_diff=diffs,
                      map_max_abs_diff=max(diffs[k] for k in map_keys), score_max_abs_diff=score_diff,
                      decision_agreement=agreement, threshold=threshold, tolerance=tolerance, finite=finite)


def parity_inputs(image_size: int, options: ExportOptions, n: int = 2, seed: int = 0) -> np.ndarray:
    """A few deterministic inputs of the graph's input type (random normalised images or uint8 frames)."""
    torch.manual_seed(seed)
    return example_input(image_size, options, batch=n).numpy()


def default_threshold(model) -> Optional[float]:
    threshold = Calibration.threshold_of(model.calibration, "model calibration")
    return None if threshold is None else float(threshold)


def parity_report(model, onnx_path, options: ExportOptions, batch: Optional[np.ndarray] = None,
                  tolerance: float = FP32_TOLERANCE, threshold: Optional[float] = None,
                  metadata=None) -> Comparison:
    """The exported FP32 graph through the runtime's ONNX Runtime backend (CPU EP) and
    post-processing vs the PyTorch model, on ``batch`` (default: 2 deterministic random inputs).
    Call ``.check()`` to raise on failure; ``.format()`` to print. ``metadata``: the graph's ModelMetadata
    when the caller has it (the export does), else read from its sidecar."""
    from mrkd.export import ort
    from mrkd.runtime.metadata import ModelMetadata, sidecar_path
    if batch is None:
        batch = parity_inputs(model.config.image_size, options)
    metadata = metadata or ModelMetadata.load(sidecar_path(onnx_path))
    reference = torch_reference(model, batch, options)
    candidate = ort.runtime_outputs(onnx_path, batch)
    threshold = default_threshold(model) if threshold is None else threshold
    if threshold is None:
        # No calibration: compare decisions at the reference's median score so the line still says something.
        threshold = float(np.median(scores_from_outputs(reference, metadata)))
    # FP32 rounding grows with the values: scale the tolerance by the reference map's magnitude.
    magnitude = max([1.0] + [float(np.max(np.abs(ref))) for key, ref in reference.items()
                             if key != metadata.outputs.score and ref.size])
    comparison = compare("ONNX Runtime CPU vs PyTorch (fp32)", reference, candidate, metadata, threshold,
                         tolerance * magnitude)
    if magnitude > 1.0:
        comparison.notes.append(f"tolerance {tolerance:g} x the map's magnitude {magnitude:.4g}")
    return comparison
