"""The export metadata: the one contract between training/export and the runtime.

Written by ``mrkd.export`` into the ONNX ``metadata_props`` and a JSON sidecar (``model.onnx.json``,
``model.engine.json``); read here by the runtime, which takes every setting from it and re-types none.
Pure Python: no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Optional, Tuple

from mrkd.atomic import atomic_write_text
from mrkd.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD
from mrkd.errors import MrkdError
from mrkd.runtime.calibration import Calibration, CalibrationError

FORMAT = "mrkd-model"
# 2: calibration, engine build and INT8 details are typed records (were loose dicts in ``extra``);
# version 1 files are migrated on load by ``migrate``.
FORMAT_VERSION = 2

# input_format values
INPUT_FLOAT_NCHW = "float32_nchw_rgb_normalized"   # runtime resizes, normalises and transposes
INPUT_UINT8_NHWC = "uint8_nhwc_bgr"               # runtime resizes only; the graph does the rest
PRECISIONS = ("fp32", "fp16", "int8")
# The exported graph's output names: written by the export (export/onnx_graph.py), read by the runtime.
MAP_OUTPUT = "anomaly_map"      # N×1×S×S summed map, Gaussian-smoothed when smoothing_in_graph
SCORE_OUTPUT = "score"          # N: max of the smoothed map (graphs that smooth)
SCALE_OUTPUT_PREFIX = "scale"   # scale0, scale1, ...: per-scale maps at feature resolution (per_scale_outputs)
MAX_IMAGE_SIZE = 8192
MAX_BATCH = 4096
_SHA256 = re.compile(r"[0-9a-f]{64}")


class MetadataError(MrkdError, ValueError):
    """Metadata missing, malformed, or inconsistent with the model or the runtime settings."""


class EngineIncompatibleError(MetadataError):
    """The engine was built for another TensorRT version or GPU; rebuild it on this device."""


def file_sha256(path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_file_sha256(path) -> str:
    """file_sha256 of a model file, cached while its size and modification time stay the same: the
    Detector checks its sidecar with it and the line reports it, and run_stream may be called again
    and again on the same model."""
    path = Path(path)
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, _size: int, _mtime_ns: int) -> str:
    return file_sha256(path)


# ---------------------------------------------------------------- field checks (errors name the field)

def _fail(source: str, name: str, value: Any, want: str):
    # _short: a 100 kB string or a long list in a hand-edited file is not repeated whole in the error line
    raise MetadataError(f"{source}: field {name}={_short(value)} {want}")


def _read_json(text: str) -> Any:
    """json.loads, with an integer of more digits than any field needs read as a float (inf when
    huge): Python refuses to convert one of over 4300 digits with a bare ValueError, and the field
    checks then refuse it by name (not a whole number, not finite)."""
    return json.loads(text, parse_int=lambda digits: int(digits) if len(digits) <= 64 else float(digits))


def _int(source, name, value, low=None, high=None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(source, name, value, "must be a whole number")
    if (low is not None and value < low) or (high is not None and value > high):
        _fail(source, name, value, f"must lie in [{low}, {high}]")
    return value


def _number(source, name, value, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(source, name, value, "must be a number")
    if not math.isfinite(value) or (positive and value <= 0):
        _fail(source, name, value, "must be finite" + (" and > 0" if positive else ""))
    return float(value)


def _text(source, name, value, choices=None, optional: bool = False) -> Optional[str]:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        _fail(source, name, value, "must be a non-empty string")
    if choices is not None and value not in choices:
        _fail(source, name, value, f"is not one of {', '.join(choices)}")
    return value


def _flag(source, name, value) -> bool:
    if not isinstance(value, bool):
        _fail(source, name, value, "must be true or false")
    return value


def _sha(source, name, value) -> Optional[str]:
    if value is not None and not (isinstance(value, str) and _SHA256.fullmatch(value)):
        _fail(source, name, value, "must be a sha256 hex digest (64 lowercase hex digits) or null")
    return value


def _numbers(source, name, value, count: int, positive: bool = False) -> Tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != count:
        _fail(source, name, value, f"must be a list of {count} numbers")
    return tuple(_number(source, f"{name}[{i}]", v, positive) for i, v in enumerate(value))


def _ints(source, name, value, count: int) -> Tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != count:
        _fail(source, name, value, f"must be a list of {count} whole numbers")
    return tuple(_int(source, f"{name}[{i}]", v, 1, MAX_BATCH) for i, v in enumerate(value))


def _plain_json(source, name, value) -> None:
    """Free-form values must be strict JSON (no NaN/Infinity), so the file can be written again."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        _fail(source, name, value if len(repr(value)) < 60 else "...", f"must be plain JSON ({exc})")


# ---------------------------------------------------------------- the typed records

_SCALE_NAME = re.compile(SCALE_OUTPUT_PREFIX + r"(0|[1-9][0-9]{0,3})")


@dataclass(frozen=True)
class GraphOutputs:
    """The exported graph's output names by role, and what each holds.

    On disk (every format version) this is the ``outputs`` object, output name -> description: the
    names are the fixed ones above, so the name gives the role and the layout needs no version bump.
    Exactly one layout per export: ``scales`` (per_scale_outputs), ``anomaly_map`` + ``score``
    (smoothed in the graph) or ``anomaly_map`` alone (the runtime smooths)."""

    anomaly_map: Optional[str] = None         # MAP_OUTPUT when the graph gives the summed map
    score: Optional[str] = None               # SCORE_OUTPUT when the graph gives the score
    scales: Tuple[str, ...] = ()              # scale0, scale1, ... in scale order (stride 4, 8, 16)
    descriptions: Dict[str, str] = field(default_factory=dict, hash=False)   # name -> what it holds

    @property
    def names(self) -> Tuple[str, ...]:
        """Every output the metadata names, in graph output order."""
        return tuple(self.scales) + tuple(n for n in (self.anomaly_map, self.score) if n is not None)

    def to_dict(self) -> Dict[str, str]:
        return {name: self.descriptions.get(name, "") for name in self.names}

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "GraphOutputs":
        if not isinstance(data, dict) or not all(isinstance(k, str) and k and isinstance(v, str)
                                                 for k, v in data.items()):
            _fail(source, "outputs", data, "must map output names to descriptions (strings)")
        roles: Dict[str, Any] = {"anomaly_map": None, "score": None}
        scales: Dict[int, str] = {}
        for name in data:
            match = _SCALE_NAME.fullmatch(name)
            if name == MAP_OUTPUT:
                roles["anomaly_map"] = name
            elif name == SCORE_OUTPUT:
                roles["score"] = name
            elif match:
                scales[int(match.group(1))] = name
            else:
                _fail(source, "outputs", name, f"is not an output mrkd exports ({MAP_OUTPUT}, {SCORE_OUTPUT}, "
                                               f"{SCALE_OUTPUT_PREFIX}0, {SCALE_OUTPUT_PREFIX}1, ...)")
        if sorted(scales) != list(range(len(scales))):
            _fail(source, "outputs.scales", sorted(scales.values()),
                  f"must be {SCALE_OUTPUT_PREFIX}0, {SCALE_OUTPUT_PREFIX}1, ... without gaps")
        return cls(scales=tuple(scales[i] for i in range(len(scales))), descriptions=dict(data), **roles)

    def validate(self, source: str, per_scale: bool) -> None:
        """The names are mrkd's and the layout is the one ``per_scale_outputs`` says."""
        if self.anomaly_map not in (None, MAP_OUTPUT):
            _fail(source, "outputs.anomaly_map", self.anomaly_map, f"must be {MAP_OUTPUT!r} or absent")
        if self.score not in (None, SCORE_OUTPUT):
            _fail(source, "outputs.score", self.score, f"must be {SCORE_OUTPUT!r} or absent")
        if tuple(self.scales) != tuple(f"{SCALE_OUTPUT_PREFIX}{i}" for i in range(len(self.scales))):
            _fail(source, "outputs.scales", list(self.scales), f"must be {SCALE_OUTPUT_PREFIX}0, "
                                                               f"{SCALE_OUTPUT_PREFIX}1, ... without gaps")
        if per_scale and not self.scales:
            raise MetadataError(f"{source}: field per_scale_outputs=true but outputs.scales is empty "
                                f"(outputs lists no {SCALE_OUTPUT_PREFIX}0.. maps)")
        if not per_scale and self.anomaly_map is None:
            raise MetadataError(f"{source}: field outputs.anomaly_map is missing (per_scale_outputs=false: "
                                f"the graph gives the summed map {MAP_OUTPUT!r})")
        unknown = sorted(set(self.descriptions) - set(self.names))
        if unknown:
            _fail(source, "outputs.descriptions", unknown, "describe outputs the metadata does not name")

@dataclass
class EngineBuild:
    """Where and how a TensorRT engine was built: it runs only on this TensorRT version and GPU."""

    trt_version: str
    gpu_name: str
    compute_capability: str
    profile: Tuple[int, int, int]
    precision: str
    onnx_sha256: Optional[str] = None          # the graph it was built from
    engine_sha256: Optional[str] = None        # the engine file itself
    strongly_typed: bool = True
    workspace_mib: Optional[int] = None
    opt_level: Optional[int] = None
    dla_core: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["profile"] = list(self.profile)
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "EngineBuild":
        where = "engine"
        if not isinstance(data, dict):
            _fail(source, where, data, "must be an object")
        for key in ("trt_version", "gpu_name", "compute_capability", "profile", "precision"):
            if key not in data:
                raise MetadataError(f"{source}: field {where}.{key} is missing")
        profile = _ints(source, f"{where}.profile", data["profile"], 3)
        if not profile[0] <= profile[1] <= profile[2]:
            _fail(source, f"{where}.profile", list(profile), "must be min <= opt <= max")
        optional_int = {k: (None if data.get(k) is None else _int(source, f"{where}.{k}", data[k], 0, 1 << 20))
                        for k in ("workspace_mib", "opt_level", "dla_core")}
        return cls(trt_version=_text(source, f"{where}.trt_version", data["trt_version"]),
                   gpu_name=_text(source, f"{where}.gpu_name", data["gpu_name"]),
                   compute_capability=_text(source, f"{where}.compute_capability", data["compute_capability"]),
                   profile=profile, precision=_text(source, f"{where}.precision", data["precision"], PRECISIONS),
                   onnx_sha256=_sha(source, f"{where}.onnx_sha256", data.get("onnx_sha256")),
                   engine_sha256=_sha(source, f"{where}.engine_sha256", data.get("engine_sha256")),
                   strongly_typed=_flag(source, f"{where}.strongly_typed", data.get("strongly_typed", True)),
                   **optional_int)


@dataclass
class Int8Info:
    """How an INT8 graph was quantised: the images its activation ranges were measured on (the INT8
    images; not the threshold's calibration) and what stayed FP32."""

    images: int                                # how many INT8 images
    target: str = "tensorrt"                   # tensorrt | cpu
    images_dir: Optional[str] = None           # the --int8-images folder
    keep_fp32: Optional[str] = None            # asked for: auto | front | none
    keep_fp32_chosen: Optional[str] = None     # what auto chose
    quantised_nodes: Optional[int] = None
    teacher_nodes_kept_fp32: Optional[int] = None
    head_only_convs_fp32: Optional[int] = None
    convtranspose_rewritten: Optional[int] = None
    head_inputs_kept_fp32: Any = None
    score_error: Dict[str, Any] = field(default_factory=dict)   # per keep_fp32 mode tried, on the INT8 images
    format: Optional[str] = None

    _COUNTS = ("quantised_nodes", "teacher_nodes_kept_fp32", "head_only_convs_fp32", "convtranspose_rewritten")
    # names written before the INT8 images were called what they are, still read
    _OLD_NAMES = {"calibration_images": "images", "calibration_dir": "images_dir",
                  "calibration_score_error": "score_error"}

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "Int8Info":
        where = "int8"
        if not isinstance(data, dict):
            _fail(source, where, data, "must be an object")
        data = {**{cls._OLD_NAMES[k]: v for k, v in data.items() if k in cls._OLD_NAMES},
                **{k: v for k, v in data.items() if k not in cls._OLD_NAMES}}
        if "images" not in data:
            raise MetadataError(f"{source}: field {where}.images is missing")
        counts = {k: (None if data.get(k) is None else _int(source, f"{where}.{k}", data[k], 0))
                  for k in cls._COUNTS}
        texts = {k: _text(source, f"{where}.{k}", data.get(k), optional=True)
                 for k in ("images_dir", "keep_fp32", "keep_fp32_chosen", "format")}
        errors = data.get("score_error") or {}
        if not isinstance(errors, dict):
            _fail(source, f"{where}.score_error", errors, "must be an object")
        _plain_json(source, f"{where}.score_error", errors)
        _plain_json(source, f"{where}.head_inputs_kept_fp32", data.get("head_inputs_kept_fp32"))
        return cls(images=_int(source, f"{where}.images", data["images"], 1),
                   target=_text(source, f"{where}.target", data.get("target", "tensorrt"), ("tensorrt", "cpu")),
                   head_inputs_kept_fp32=data.get("head_inputs_kept_fp32"), score_error=errors,
                   **counts, **texts)


def migrate(data: Dict[str, Any], source: str) -> Dict[str, Any]:
    """A version-1 sidecar as version 2: ``extra["calibration"]`` (with the top-level threshold, which
    the version-1 runtime used) becomes ``calibration``, ``extra["tensorrt"]`` becomes ``engine``,
    ``extra["int8"]`` becomes ``int8``; ``score_norm`` is dropped (it is derived from calibration).
    ``outputs`` (name -> description) has the same layout in every version; the loader types it
    (GraphOutputs)."""
    data = dict(data)
    extra = dict(data.get("extra") or {}) if isinstance(data.get("extra"), dict) else data.get("extra")
    if isinstance(extra, dict):
        calibration = extra.pop("calibration", None)
        threshold = data.pop("threshold", None)
        if threshold is not None:
            calibration = {**(calibration if isinstance(calibration, dict) else {}), "threshold": threshold}
        if calibration:
            data["calibration"] = calibration
        built = extra.pop("tensorrt", None)
        if isinstance(built, dict):
            built = dict(built)
            built["trt_version"] = built.pop("version", None)
            data["engine"] = built
        if "int8" in extra:
            data["int8"] = extra.pop("int8")
        data["extra"] = extra
    data.pop("score_norm", None)
    data["format_version"] = FORMAT_VERSION
    return data


@dataclass
class PrecisionCheck:
    """A lower precision checked against FP32 on good images by the export (or by hand): the graph run
    with ``backend`` (a backend spec, e.g. "openvino:bf16") against the FP32 graph on ONNX Runtime.
    ``--backend auto`` runs a precision the CPU offers only where a check of it ``passed``: no score
    further off than ``SCORE_TOLERANCE`` of ``threshold``. That is what bf16 does to a verdict: like a
    threshold up to 1 % higher or lower, so a part that close to it may be judged otherwise (the
    ``decision_agreement`` on the checked images says how often that happened; a pass/fail on it
    would only say whether one checked image happened to lie that close)."""

    backend: str                        # the spec that ran, e.g. "openvino:bf16"
    precision: str                      # what it ran at, e.g. "bf16"
    images: int
    decision_agreement: float           # share of images judged alike at ``threshold``
    score_max_abs_diff: float
    threshold: float
    cpu: str = ""                       # where it was measured (kernels differ between CPUs)

    SCORE_TOLERANCE: ClassVar[float] = 0.01     # of the threshold: a part 1 % from it is judged alike

    @property
    def passed(self) -> bool:
        return self.score_max_abs_diff <= self.SCORE_TOLERANCE * abs(self.threshold)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str, where: str) -> "PrecisionCheck":
        if not isinstance(data, dict):
            _fail(source, where, data, "must be an object")
        for key in ("backend", "precision", "images", "decision_agreement", "score_max_abs_diff", "threshold"):
            if key not in data:
                raise MetadataError(f"{source}: field {where}.{key} is missing")
        agreement = _number(source, f"{where}.decision_agreement", data["decision_agreement"])
        if not 0.0 <= agreement <= 1.0:
            _fail(source, f"{where}.decision_agreement", agreement, "must be in [0, 1]")
        diff = _number(source, f"{where}.score_max_abs_diff", data["score_max_abs_diff"])
        if diff < 0:
            _fail(source, f"{where}.score_max_abs_diff", diff, "must be >= 0")
        return cls(backend=_text(source, f"{where}.backend", data["backend"]),
                   precision=_text(source, f"{where}.precision", data["precision"]),
                   images=_int(source, f"{where}.images", data["images"], 1),
                   decision_agreement=agreement, score_max_abs_diff=diff,
                   threshold=_number(source, f"{where}.threshold", data["threshold"]),
                   cpu=_text(source, f"{where}.cpu", data.get("cpu") or None, optional=True) or "")


@dataclass
class ModelMetadata:
    backbone: str
    image_size: int
    input_format: str = INPUT_FLOAT_NCHW
    input_name: str = "input"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    resize_mode: str = "resize"
    # The alarm threshold and how it was set (None: an uncalibrated model, scores only).
    calibration: Optional[Calibration] = None
    # The graph's output names by role: "anomaly_map" (N×1×H×W), "score" (N), or "scale{i}" maps.
    outputs: GraphOutputs = field(default_factory=lambda: GraphOutputs(anomaly_map=MAP_OUTPUT, score=SCORE_OUTPUT))
    smoothing_in_graph: bool = True
    per_scale_outputs: bool = False
    sigma: float = 4.0
    batch_range: Tuple[int, int, int] = (1, 1, 16)     # min, opt, max of the dynamic batch
    precision: str = "fp32"                            # fp32 | fp16 | int8
    opset: Optional[int] = None
    checkpoint_sha256: Optional[str] = None
    onnx_sha256: Optional[str] = None
    teacher_weights: Optional[str] = None
    engine: Optional[EngineBuild] = None               # TensorRT engines only
    int8: Optional[Int8Info] = None                    # INT8 graphs (and engines built from them)
    # Lower precisions checked against FP32 on good images (export --check-images); --backend auto reads them.
    precision_checks: Tuple[PrecisionCheck, ...] = ()
    extra: Dict[str, Any] = field(default_factory=dict)   # free-form notes (e.g. onnxslim's measurement)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    # What the graph itself was built for, as the export embedded it in the model file: a sidecar may
    # change the calibration (mrkd calibrate does), the hashes and the notes, never these.
    GRAPH_FIELDS: ClassVar[Tuple[str, ...]] = (
        "backbone", "image_size", "input_format", "input_name", "mean", "std", "resize_mode", "outputs",
        "smoothing_in_graph", "per_scale_outputs", "sigma", "batch_range", "precision", "opset",
        "checkpoint_sha256", "teacher_weights", "int8")

    def check_same_graph(self, embedded: "ModelMetadata", source: str) -> None:
        """MetadataError naming ``source`` and the field where this metadata (a sidecar) describes the
        graph differently from ``embedded`` (the metadata the export wrote into the model file)."""
        for name in self.GRAPH_FIELDS:
            ours, theirs = getattr(self, name), getattr(embedded, name)
            if ours != theirs:
                raise MetadataError(f"{source}: field {name}={_short(ours)} but the model's embedded metadata "
                                    f"says {_short(theirs)}; the sidecar was edited or belongs to another export")

    @property
    def threshold(self) -> Optional[float]:
        """The calibrated alarm threshold (score >= threshold is anomalous), or None."""
        return None if self.calibration is None else self.calibration.threshold

    @property
    def score_norm(self) -> Dict[str, float]:
        """Good-score statistics of the calibration (good_min, good_mean, ...)."""
        return {} if self.calibration is None else self.calibration.score_norm

    @property
    def model_sha256(self) -> Optional[str]:
        """The sha256 of the model file this metadata describes (the engine's for an engine sidecar)."""
        return self.engine.engine_sha256 if self.engine is not None else self.onnx_sha256

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("calibration", "engine", "int8", "outputs"):
            data[name] = None if data[name] is None else data[name].to_dict()
        for name in ("mean", "std", "batch_range"):
            data[name] = list(data[name])
        data["precision_checks"] = [check.to_dict() for check in self.precision_checks]
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "metadata") -> "ModelMetadata":
        """Validated metadata from its dict form (older versions migrated); errors name ``source`` and
        the field: types, finiteness and ranges of every field are checked."""
        if not isinstance(data, dict):
            raise MetadataError(f"{source}: metadata must be a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise MetadataError(f"{source}: not mrkd model metadata (format={data.get('format')!r})")
        version = data.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise MetadataError(f"{source}: field format_version={version!r} must be a whole number >= 1")
        if version > FORMAT_VERSION:
            raise MetadataError(f"{source}: metadata format_version {version!r} is newer than this runtime "
                                f"understands ({FORMAT_VERSION}); upgrade mrkd")
        if version < FORMAT_VERSION:
            data = migrate(data, source)
        else:
            # A field the format has no place for was read as if absent: version 1's top-level threshold or
            # a misspelt "calibraton" edited by hand left the old threshold in force, silently.
            unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise MetadataError(f"{source}: field {unknown[0][:60]} is not a field of format_version "
                                    f"{FORMAT_VERSION} metadata{f' (nor {len(unknown) - 1} more)' if len(unknown) > 1 else ''}"
                                    f"; the threshold belongs in calibration.threshold (mrkd calibrate "
                                    f"writes it), free-form notes in extra")
        missing = [name for name in ("backbone", "image_size") if name not in data]
        if missing:
            raise MetadataError(f"{source}: missing field(s) {', '.join(missing)}")
        defaults = cls(backbone="-", image_size=1)
        get = lambda name: data.get(name, getattr(defaults, name))  # noqa: E731
        calibration = get("calibration")
        if calibration is not None:
            try:
                calibration = Calibration.from_dict(calibration, source=f"{source}: calibration")
            except CalibrationError as exc:
                raise MetadataError(str(exc)) from exc
        outputs = get("outputs")    # absent: the default layout, as for every other field
        if not isinstance(outputs, GraphOutputs):
            outputs = GraphOutputs.from_dict(outputs, source)
        extra = get("extra")
        if not isinstance(extra, dict):
            _fail(source, "extra", extra, "must be an object")
        _plain_json(source, "extra", extra)
        opset = get("opset")
        checks = get("precision_checks")
        if not isinstance(checks, (list, tuple)):
            _fail(source, "precision_checks", checks, "must be a list")
        checks = tuple(PrecisionCheck.from_dict(c, source, f"precision_checks[{i}]") for i, c in enumerate(checks))
        meta = cls(
            backbone=_text(source, "backbone", data["backbone"]),
            image_size=_int(source, "image_size", data["image_size"], 8, MAX_IMAGE_SIZE),
            input_format=_text(source, "input_format", get("input_format"), (INPUT_FLOAT_NCHW, INPUT_UINT8_NHWC)),
            input_name=_text(source, "input_name", get("input_name")),
            mean=_numbers(source, "mean", get("mean"), 3),
            std=_numbers(source, "std", get("std"), 3, positive=True),
            resize_mode=_text(source, "resize_mode", get("resize_mode"), ("resize", "center_crop")),
            calibration=calibration, outputs=outputs,
            smoothing_in_graph=_flag(source, "smoothing_in_graph", get("smoothing_in_graph")),
            per_scale_outputs=_flag(source, "per_scale_outputs", get("per_scale_outputs")),
            sigma=_number(source, "sigma", get("sigma"), positive=True),
            batch_range=_ints(source, "batch_range", get("batch_range"), 3),
            precision=_text(source, "precision", get("precision"), PRECISIONS),
            opset=None if opset is None else _int(source, "opset", opset, 1, 1000),
            checkpoint_sha256=_sha(source, "checkpoint_sha256", get("checkpoint_sha256")),
            onnx_sha256=_sha(source, "onnx_sha256", get("onnx_sha256")),
            teacher_weights=_text(source, "teacher_weights", get("teacher_weights"), optional=True),
            engine=None if get("engine") is None else EngineBuild.from_dict(data["engine"], source),
            int8=None if get("int8") is None else Int8Info.from_dict(data["int8"], source),
            precision_checks=checks, extra=dict(extra))
        meta.validate(source)
        return meta

    def validate(self, source: str = "metadata") -> None:
        """Consistency checks across fields (from_dict has checked each field's type and range)."""
        if self.input_format not in (INPUT_FLOAT_NCHW, INPUT_UINT8_NHWC):
            raise MetadataError(f"{source}: field input_format={self.input_format!r} is not one of "
                                f"{INPUT_FLOAT_NCHW!r}, {INPUT_UINT8_NHWC!r}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0:
            raise MetadataError(f"{source}: field image_size={self.image_size!r} must be a positive int")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise MetadataError(f"{source}: fields mean/std must have 3 values")
        if self.resize_mode not in ("resize", "center_crop"):
            raise MetadataError(f"{source}: field resize_mode={self.resize_mode!r} is not resize|center_crop")
        lo, opt, hi = self.batch_range
        if not (1 <= lo <= opt <= hi):
            raise MetadataError(f"{source}: field batch_range={self.batch_range!r} must be 1 <= min <= opt <= max")
        if not isinstance(self.outputs, GraphOutputs):
            _fail(source, "outputs", self.outputs, "must be a GraphOutputs")
        self.outputs.validate(source, self.per_scale_outputs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelMetadata":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            if not text.strip("\0"):        # size 0, or all zeros: a power cut before its data reached the disk
                raise MetadataError(f"{path}: the sidecar holds no data ({len(text)} bytes"
                                    f"{', all zero' if text else ''}: cut short, a power cut?); export or copy it "
                                    "again")
            # NaN/Infinity (not JSON, but Python writes them) are read as floats; the field checks then
            # refuse them by name.
            data = _read_json(text)
        except FileNotFoundError:
            raise MetadataError(f"{path}: metadata sidecar not found (export writes it next to the model)")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise MetadataError(f"{path}: metadata is not valid JSON ({exc})")
        except (IsADirectoryError, PermissionError) as exc:
            raise MetadataError(f"{path}: metadata cannot be read ({exc.strerror})")
        return cls.from_dict(data, source=str(path))

    # ONNX metadata_props are string->string; one key holds the whole JSON so nothing is lost.
    ONNX_KEY = "mrkd.metadata"

    def to_onnx_props(self) -> Dict[str, str]:
        return {self.ONNX_KEY: json.dumps(self.to_dict(), sort_keys=True, allow_nan=False),
                "mrkd.format_version": str(self.format_version)}

    @classmethod
    def from_onnx_props(cls, props: Dict[str, str], source: str = "onnx") -> "ModelMetadata":
        if cls.ONNX_KEY not in props:
            raise MetadataError(f"{source}: ONNX metadata_props has no {cls.ONNX_KEY!r} (not exported by mrkd?)")
        try:
            data = _read_json(props[cls.ONNX_KEY])
        except (json.JSONDecodeError, RecursionError) as exc:
            raise MetadataError(f"{source}: embedded metadata {cls.ONNX_KEY!r} is not valid JSON ({exc})")
        return cls.from_dict(data, source=f"{source} (embedded metadata)")


def sidecar_path(model_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``: the sidecar sits beside the model it describes."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def check_engine_compatible(meta: ModelMetadata, trt_version: str, gpu_name: str, compute_capability: str,
                            source: str = "engine metadata") -> ModelMetadata:
    """The one engine compatibility check (export after a build, the runtime before deserialising):
    raise EngineIncompatibleError unless ``meta`` describes an engine built with this TensorRT version
    on a GPU of this name and compute capability."""
    built = meta.engine
    if built is None:
        raise EngineIncompatibleError(f"{source}: no 'engine' entry: not an engine sidecar written by mrkd export")
    mismatches = []
    if str(built.trt_version) != str(trt_version):
        mismatches.append(f"TensorRT {built.trt_version} (here {trt_version})")
    if str(built.compute_capability) != str(compute_capability):
        mismatches.append(f"compute capability {built.compute_capability} (here {compute_capability})")
    if str(built.gpu_name) != str(gpu_name):
        mismatches.append(f"GPU {built.gpu_name!r} (here {gpu_name!r})")
    if mismatches:
        raise EngineIncompatibleError(
            f"{source}: the engine was built for {'; '.join(mismatches)}. TensorRT engines are tied to the "
            f"TensorRT version and GPU: rebuild on this device with `mrkd export CHECKPOINT --fp16` "
            f"(or --int8 --calib DIR), or build from the ONNX model with mrkd.export.build_engine.")
    return meta


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
