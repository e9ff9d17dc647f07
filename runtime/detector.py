"""Detector: model file + metadata -> pre-processing -> backend -> post-processing, one call per batch.

``Detector("model.onnx")(frames)`` takes uint8 BGR frames of any size and returns scores, anomaly maps
at model size and decisions against the calibrated threshold. Every setting (input layout, size,
mean/std, resize mode, threshold, smoothing sigma) comes from the export's metadata; a model whose
inputs or outputs disagree with its metadata is refused with an error naming the file and field.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from mrkd.runtime import postprocess
from mrkd.runtime.line.alarms import is_anomalous
from mrkd.runtime.backends import Backend, BackendError, check_model_file, open_backend, run_precision
from mrkd.runtime.metadata import (INPUT_FLOAT_NCHW, INPUT_UINT8_NHWC, MetadataError, ModelMetadata,
                                   model_file_sha256, sidecar_path)
from mrkd.runtime.preprocess import model_input

logger = logging.getLogger(__name__)
Frames = Union[np.ndarray, Sequence[np.ndarray]]
STAGES = ("preprocess", "infer", "postprocess")


@dataclass
class DetectionResult:
    """What one detector call returns; index i describes frame i.

    scores: float32 (N,) image scores; maps: float32 (N, S, S) anomaly maps at model size;
    decisions: bool (N,) score >= threshold (None without a threshold); frame_sizes: (h, w) of each
    input frame (to scale map regions back); timings: seconds per stage for this call.
    """

    scores: np.ndarray
    maps: np.ndarray
    decisions: Optional[np.ndarray]
    threshold: Optional[float]
    frame_sizes: List[Tuple[int, int]]
    timings: Dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.scores)


def check_sidecar_belongs_to(meta: ModelMetadata, model_path: Path, sidecar: Path) -> bool:
    """Refuse a sidecar that describes another model file: the sha256 it records (onnx_sha256, or the
    engine's engine_sha256) must be the model file's. Returns False when it records none (older
    exports), after a warning; the caller then cannot vouch for the pairing."""
    expected = meta.model_sha256
    if expected is None:
        logger.warning("%s records no model hash: cannot check that it belongs to %s", sidecar, model_path.name)
        return False
    actual = model_file_sha256(model_path)
    if actual != expected:
        field_name = "engine.engine_sha256" if meta.engine is not None else "onnx_sha256"
        raise MetadataError(f"{sidecar}: field {field_name}: this sidecar describes another model (sha256 "
                            f"{expected[:16]}...) than {model_path} (sha256 {actual[:16]}...): the model was "
                            f"cut short or replaced, or the .json is another export's; use the .json written "
                            f"with this model or export it again{unfinished_export(model_path.parent)}")
    return True


EXPORT_STAGING = ".export-"      # export/file_set.py's STAGING_PREFIX (the runtime imports no export code)


def unfinished_export(folder: Path) -> str:
    """The words that name an export's staging folders left in ``folder`` (its new files not yet moved in,
    and the earlier set it keeps until the move is done): an export cut short by a kill or a power cut
    between its renames leaves a new sidecar beside an earlier graph. "" when there are none."""
    try:
        left = sorted(entry.name for entry in folder.iterdir() if entry.name.startswith(EXPORT_STAGING)
                      and entry.is_dir())
    except OSError:
        return ""
    if not left:
        return ""
    return (f" (an export into {folder} was cut short, by a kill or a power cut, or is running now: its files "
            f"and the earlier export's are in {', '.join(left)})")


def check_sidecar_against_embedded(meta: ModelMetadata, embedded: ModelMetadata, sidecar: Path) -> None:
    """The sidecar must describe the graph as the metadata the export embedded in it does
    (ModelMetadata.GRAPH_FIELDS)."""
    meta.check_same_graph(embedded, str(sidecar))


def load_metadata(model_path: Union[str, Path], backend: Optional[Backend] = None) -> ModelMetadata:
    """The model's metadata: its JSON sidecar (checked against the model file's hash), or for ONNX files
    without one the graph's metadata_props (announced with a warning: a calibration done on the line
    by `mrkd calibrate` lives only in the sidecar)."""
    model_path = Path(model_path)
    sidecar = sidecar_path(model_path)
    if sidecar.exists():
        meta = ModelMetadata.load(sidecar)
        check_sidecar_belongs_to(meta, model_path, sidecar)
        return meta
    props = backend.model_metadata_props if backend is not None else None
    if props and ModelMetadata.ONNX_KEY in props:
        logger.warning("%s: no sidecar %s; using the metadata embedded in the model at export (a threshold set "
                       "later by `mrkd calibrate` is in the missing sidecar, not here)", model_path, sidecar.name)
        return ModelMetadata.from_onnx_props(props, source=str(model_path))
    raise MetadataError(f"{sidecar}: metadata sidecar not found (the export writes it next to {model_path.name})")


def threshold_and_source(meta: ModelMetadata, metadata_from: str, override: Optional[float]) -> Tuple[Optional[float], str]:
    """(threshold, where it comes from, in words) for the run's first status line."""
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, (int, float, np.floating)) \
                or not math.isfinite(override):
            raise MetadataError(f"threshold {override!r}: must be a finite number")
        return float(override), "given by the caller (--threshold)"
    calibration = meta.calibration
    if calibration is None:
        return None, f"none: {metadata_from} has no calibration (scores only, no alarms)"
    how = calibration.method + (f" on {calibration.n_good} good parts" if calibration.n_good else "")
    if calibration.source:
        how += f" of {calibration.source}"
    return calibration.threshold, f"{metadata_from} ({how})"


def as_frame_list(frames: Frames) -> List[np.ndarray]:
    """One H×W×3 frame, an N×H×W×3 array or a list of H×W×3 frames -> list of uint8 BGR frames."""
    if isinstance(frames, np.ndarray):
        if frames.ndim == 3:
            frames = [frames]
        elif frames.ndim == 4:
            frames = list(frames)
        else:
            raise ValueError(f"frames must be H×W×3 or N×H×W×3 uint8 BGR, got shape {frames.shape}")
    frames = list(frames)
    for i, frame in enumerate(frames):
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 \
                or frame.shape[2] != 3 or frame.size == 0:
            shape = getattr(frame, "shape", None)
            dtype = getattr(frame, "dtype", type(frame).__name__)
            raise ValueError(f"frame {i}: expected a non-empty uint8 H×W×3 BGR image, got {dtype} {shape}")
    return frames


class Detector:
    """An exported MRKD model ready to score frames.

    model_path: .onnx (with model.onnx.json or embedded metadata) or .engine/.plan (with model.engine.json).
    backend: a spec of runtime.backends.backend_choices() ("auto", "onnxruntime", "tensorrt",
    "openvino", "openvino:bf16", ...; "auto": see choose_auto_backend). postprocess: "auto" | "cuda" | "cpu" | "numpy" (used
    only when the model outputs per-scale maps). threshold: overrides the calibrated one.
    providers / threads: ONNX Runtime execution providers; CPU inference threads (ONNX Runtime,
    OpenVINO). decision_thresholds: the thresholds callers decide at with this model's scores (None in
    it: the model's own; default: ``threshold``), against which OpenVINO under auto judges bf16.
    precision: what the model runs at (run_precision: graph and backend together).
    """

    def __init__(self, model_path: Union[str, Path], backend: str = "auto", postprocess: str = "auto",
                 threshold: Optional[float] = None, providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None, decision_thresholds: Optional[Sequence[Optional[float]]] = None):
        # an empty file is said to be one before its sidecar is found not to match it
        self.model_path = check_model_file(Path(model_path))
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
            raise BackendError(f"threads {threads!r}: must be a whole number >= 0 (0: ONNX Runtime's default)")
        sidecar = sidecar_path(self.model_path)
        # The hash of the file this Detector runs (events name it): taken before the backend reads the file
        # and checked after, so a new version moved in meanwhile is never run under the old one's name.
        self.model_sha256 = model_file_sha256(self.model_path)
        # The sidecar is read and checked against the model file before any backend touches the file.
        metadata = load_metadata(self.model_path) if sidecar.exists() else None
        # where decisions are taken (the cameras' own thresholds, None: the model's) decides bf16 under auto
        self.backend = open_backend(self.model_path, backend, providers=providers, threads=threads,
                                    metadata=metadata, decision_thresholds=(
                                        (threshold,) if decision_thresholds is None else tuple(decision_thresholds)))
        try:
            if model_file_sha256(self.model_path) != self.model_sha256:
                raise MetadataError(f"{self.model_path}: changed while it was loaded; move a new version there in "
                                    f"one rename")
            props = self.backend.model_metadata_props
            if metadata is not None and props and ModelMetadata.ONNX_KEY in props:
                check_sidecar_against_embedded(metadata, ModelMetadata.from_onnx_props(props, str(self.model_path)),
                                               sidecar)
            self.metadata = metadata or load_metadata(self.model_path, self.backend)
            self.postprocess_impl = postprocess
            # the sidecar the metadata came from (None: the graph's embedded metadata): a hot swap keeps to it
            self.sidecar: Optional[Path] = sidecar if metadata is not None else None
            self._source = str(sidecar) if metadata is not None else f"{self.model_path} (embedded metadata, no sidecar)"
            self.threshold, self.threshold_source = threshold_and_source(self.metadata, self._source, threshold)
            self.image_size = self.metadata.image_size
            self.precision = run_precision(self.metadata.precision, self.backend.precision)
            self._check_model_against_metadata()
        except Exception:
            self.backend.close()
            raise
        self.max_batch = min(self.metadata.batch_range[2], self.backend.batch_range[1])
        self.min_batch = self.backend.batch_range[0]

    # --- consistency checks -----------------------------------------------------------------
    def _check_model_against_metadata(self) -> None:
        meta, model, src = self.metadata, self.backend, self._source
        if model.input_name != meta.input_name:
            raise MetadataError(f"{src}: field input_name={meta.input_name!r} but {self.model_path.name} has "
                                f"input {model.input_name!r}")
        size = meta.image_size
        if meta.input_format == INPUT_FLOAT_NCHW:
            expected, dtypes = (3, size, size), (np.float32, np.float16)
        else:
            expected, dtypes = (size, size, 3), (np.uint8,)
        shape = tuple(model.input_shape[1:])
        if len(shape) != 3 or any(d not in (-1, e) for d, e in zip(shape, expected)):
            raise MetadataError(f"{src}: fields input_format={meta.input_format!r}, image_size={size} expect "
                                f"input shape N×{'×'.join(map(str, expected))} but {self.model_path.name} "
                                f"has {model.input_shape}")
        if model.input_dtype not in [np.dtype(d) for d in dtypes]:
            raise MetadataError(f"{src}: field input_format={meta.input_format!r} expects "
                                f"{'/'.join(np.dtype(d).name for d in dtypes)} input but {self.model_path.name} "
                                f"takes {model.input_dtype}")
        meta.outputs.validate(src, meta.per_scale_outputs)   # the outputs this layout needs are named
        missing = [n for n in meta.outputs.names if n not in model.output_names]
        if missing:
            raise MetadataError(f"{src}: field outputs names {sorted(set(missing))} that {self.model_path.name} "
                                f"does not produce (it has {list(model.output_names)})")

    # --- the three stages -------------------------------------------------------------------
    def preprocess(self, frames: List[np.ndarray]) -> np.ndarray:
        """Frames -> the model's input batch, exactly as training prepared images."""
        batch = model_input(frames, self.metadata)
        if self.metadata.input_format == INPUT_UINT8_NHWC or self.backend.input_dtype == np.float32:
            return batch
        return batch.astype(self.backend.input_dtype)

    def _infer_and_postprocess(self, batch: np.ndarray, timings: Dict[str, float]) -> Tuple[np.ndarray, np.ndarray]:
        meta, size = self.metadata, self.metadata.image_size
        # Outputs stay on the GPU for the CUDA post-processing where the backend can keep them there.
        on_device = (meta.per_scale_outputs and self.backend.has_device_outputs
                     and self.postprocess_impl in ("auto", "cuda") and "cuda" in postprocess.available_impls())
        start = time.perf_counter()
        outputs = self.backend.infer(batch, device_outputs=on_device)
        timings["infer"] += time.perf_counter() - start
        start = time.perf_counter()
        if on_device:
            per_scale = [outputs[name] for name in meta.outputs.scales]
            with self.backend.cuda_context():
                maps, scores = postprocess.anomaly_map(per_scale, size, meta.sigma, impl="cuda")
                maps, scores = maps.get(), scores.get()
        else:
            maps, scores = postprocess.maps_and_scores(outputs, meta, impl=self.postprocess_impl)
        timings["postprocess"] += time.perf_counter() - start
        return np.asarray(maps, dtype=np.float32), np.asarray(scores, dtype=np.float32)

    def __call__(self, frames: Frames) -> DetectionResult:
        """Score uint8 BGR frames (H×W×3, N×H×W×3 or a list of any sizes)."""
        frames = as_frame_list(frames)
        timings = dict.fromkeys(STAGES, 0.0)
        all_maps, all_scores = [], []
        for begin in range(0, len(frames), self.max_batch):   # split batches larger than the model's
            chunk = frames[begin:begin + self.max_batch]
            start = time.perf_counter()
            batch = self.preprocess(chunk)
            pad = self.min_batch - len(chunk)
            if pad > 0:   # a fixed-batch model: fill with copies, drop their results
                batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
            timings["preprocess"] += time.perf_counter() - start
            maps, scores = self._infer_and_postprocess(batch, timings)
            all_maps.append(maps[:len(chunk)])
            all_scores.append(scores[:len(chunk)])
        size = self.metadata.image_size
        maps = np.concatenate(all_maps) if all_maps else np.zeros((0, size, size), np.float32)
        scores = np.concatenate(all_scores) if all_scores else np.zeros(0, np.float32)
        decisions = is_anomalous(scores, self.threshold) if self.threshold is not None else None
        return DetectionResult(scores=scores, maps=maps, decisions=decisions, threshold=self.threshold,
                               frame_sizes=[f.shape[:2] for f in frames], timings=timings)

    def describe(self) -> str:
        """One line for logs: model, backend, size, threshold."""
        return (f"{self.model_path.name}: {self.backend.describe()}, {self.metadata.backbone} "
                f"{self.image_size}px {self.precision}, threshold {self.threshold} from "
                f"{self.threshold_source}")

    def close(self) -> None:
        """Release the backend."""
        self.backend.close()
