"""The export metadata: the one contract between training/export and the runtime.

Written by ``mrkd.export`` into the ONNX ``metadata_props`` and a JSON sidecar (``model.onnx.json``,
``model.engine.json``); read here by the runtime, which takes every setting from it and re-types none.
Pure Python: no torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from mrkd.atomic import atomic_write_text

FORMAT = "mrkd-model"
FORMAT_VERSION = 1

# input_format values
INPUT_FLOAT_NCHW = "float32_nchw_rgb_normalized"   # runtime resizes, normalises and transposes
INPUT_UINT8_NHWC = "uint8_nhwc_bgr"               # runtime resizes only; the graph does the rest


class MetadataError(ValueError):
    """Metadata missing, malformed, or inconsistent with the model or the runtime settings."""


@dataclass
class ModelMetadata:
    backbone: str
    image_size: int
    input_format: str = INPUT_FLOAT_NCHW
    input_name: str = "input"
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize_mode: str = "resize"
    # Calibration: image score threshold and good-score statistics for a 0..1-ish normalised score.
    threshold: Optional[float] = None
    score_norm: Dict[str, float] = field(default_factory=dict)   # e.g. {"min":..,"max":..} or {"mean":..,"std":..}
    # Outputs: name -> what it holds. "anomaly_map" (N×1×H×W), "score" (N), or "scale{i}" maps.
    outputs: Dict[str, str] = field(default_factory=dict)
    smoothing_in_graph: bool = True
    per_scale_outputs: bool = False
    sigma: float = 4.0
    batch_range: Tuple[int, int, int] = (1, 1, 16)     # min, opt, max of the dynamic batch
    precision: str = "fp32"                            # fp32 | fp16 | int8
    opset: Optional[int] = None
    checkpoint_sha256: Optional[str] = None
    onnx_sha256: Optional[str] = None
    teacher_weights: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def scale_outputs(self) -> List[str]:
        """The per-scale output names (scale0, scale1, ...) in scale order."""
        return sorted((n for n in self.outputs if n.startswith("scale")), key=lambda n: int(n[5:]))

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "metadata") -> "ModelMetadata":
        if data.get("format") != FORMAT:
            raise MetadataError(f"{source}: not mrkd model metadata (format={data.get('format')!r})")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise MetadataError(f"{source}: metadata format_version {version!r} is newer than this runtime "
                                f"understands ({FORMAT_VERSION}); upgrade mrkd")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [name for name in ("backbone", "image_size") if name not in data]
        if missing:
            raise MetadataError(f"{source}: missing field(s) {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        for name in ("mean", "std", "batch_range"):
            if name in kwargs and kwargs[name] is not None:
                kwargs[name] = tuple(kwargs[name])
        meta = cls(**kwargs)
        meta.validate(source)
        return meta

    def validate(self, source: str = "metadata") -> None:
        if self.input_format not in (INPUT_FLOAT_NCHW, INPUT_UINT8_NHWC):
            raise MetadataError(f"{source}: field input_format={self.input_format!r} is not one of "
                                f"{INPUT_FLOAT_NCHW!r}, {INPUT_UINT8_NHWC!r}")
        if not isinstance(self.image_size, int) or self.image_size <= 0:
            raise MetadataError(f"{source}: field image_size={self.image_size!r} must be a positive int")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise MetadataError(f"{source}: fields mean/std must have 3 values")
        if self.resize_mode not in ("resize", "center_crop"):
            raise MetadataError(f"{source}: field resize_mode={self.resize_mode!r} is not resize|center_crop")
        lo, opt, hi = self.batch_range
        if not (1 <= lo <= opt <= hi):
            raise MetadataError(f"{source}: field batch_range={self.batch_range!r} must be 1 <= min <= opt <= max")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelMetadata":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise MetadataError(f"{path}: metadata sidecar not found (export writes it next to the model)")
        except json.JSONDecodeError as exc:
            raise MetadataError(f"{path}: metadata is not valid JSON ({exc})")
        return cls.from_dict(data, source=str(path))

    # ONNX metadata_props are string->string; one key holds the whole JSON so nothing is lost.
    ONNX_KEY = "mrkd.metadata"

    def to_onnx_props(self) -> Dict[str, str]:
        return {self.ONNX_KEY: json.dumps(self.to_dict(), sort_keys=True),
                "mrkd.format_version": str(self.format_version)}

    @classmethod
    def from_onnx_props(cls, props: Dict[str, str], source: str = "onnx") -> "ModelMetadata":
        if cls.ONNX_KEY not in props:
            raise MetadataError(f"{source}: ONNX metadata_props has no {cls.ONNX_KEY!r} (not exported by mrkd?)")
        return cls.from_dict(json.loads(props[cls.ONNX_KEY]), source=source)


def sidecar_path(model_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``: the sidecar sits beside the model it describes."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


# Calibration entries that describe the good-score distribution (mrkd.train.calibrate writes good_*):
# the runtime's normalised score is (score - good_min) / (threshold - good_min).
SCORE_NORM_PREFIXES = ("good_", "score_")


def calibration_fields(calibration: Dict[str, Any]) -> Tuple[Optional[float], Dict[str, float]]:
    """(threshold, score_norm) from a calibration dict: the nested ``score_norm`` dict if there is one,
    else the numeric good-score statistics (good_min, good_max, good_mean, ...)."""
    threshold = calibration.get("threshold")
    norm = calibration.get("score_norm")
    if not isinstance(norm, dict):
        norm = {k: v for k, v in calibration.items() if k.startswith(SCORE_NORM_PREFIXES)
                and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return (None if threshold is None else float(threshold)), {k: float(v) for k, v in norm.items()}
