"""One fused ONNX graph: (pre-processing) → teacher → bottleneck → decoder → cosine head.

The graph's outputs are what the runtime needs and nothing more:

* default: ``anomaly_map`` (N×1×H×W float32, Gaussian-smoothed) and ``score`` (N float32, its max);
* ``smooth_in_graph=False``: ``anomaly_map`` holds the upsampled sum *before* smoothing and there is
  no ``score`` output (a max of the unsmoothed map is not comparable to the calibrated threshold,
  so the runtime smooths and takes the max itself);
* ``per_scale_outputs=True``: ``scale0..scale2`` (N×h×w float32, unsmoothed 1 − cos at strides
  4, 8, 16, each times its scale weight) for the runtime's fused CUDA upsample+sum+smooth kernel,
  and ``scale3`` (the weighted memory-bank distance map at stride 8) for --score knn|both models.

FP16 graphs keep the head in FP32 with an explicit Cast after the student (see export/fp16.py).
"""

from __future__ import annotations

import copy
import functools
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

from mrkd.errors import MrkdError
from mrkd.runtime.metadata import (INPUT_FLOAT_NCHW, INPUT_UINT8_NHWC, MAP_OUTPUT, SCALE_OUTPUT_PREFIX,
                                   SCORE_OUTPUT, GraphOutputs)

MIN_OPSET = 17          # LayerNormalization-era opset: the oldest TensorRT 10 / ORT parse cleanly
DEFAULT_OPSET = 17
INPUT_NAME = "input"
BATCH_AXIS = "batch"
# Dynamic batch range: 1..16 by default. A camera box rarely batches more than a few frames, and a
# TensorRT profile's max sets the activation memory it reserves (WRN50 at 256 px: ~0.2 GB/frame).
DEFAULT_BATCH_RANGE = (1, 1, 16)
MAX_BATCH = 256


class ExportError(MrkdError, ValueError):
    """An export setting is invalid or an export step failed; the message says which and why."""


@dataclass
class ExportOptions:
    """What goes into the graph. Every field ends up in the model's metadata."""

    smooth_in_graph: bool = True
    per_scale_outputs: bool = False
    uint8_input: bool = False
    opset: int = DEFAULT_OPSET
    batch_range: Tuple[int, int, int] = DEFAULT_BATCH_RANGE
    precision: str = "fp32"                # fp32 | fp16 (int8 is made from the fp32 graph)

    def validate(self) -> "ExportOptions":
        if int(self.opset) < MIN_OPSET:
            raise ExportError(f"opset {self.opset} is not supported: mrkd exports need opset >= {MIN_OPSET} "
                              f"(TensorRT 10 and ONNX Runtime parse the head's Resize/ReduceMax there)")
        highest, limits = max_opset()
        if int(self.opset) > highest:
            raise ExportError(f"opset {self.opset} is not supported here: this installation exports opsets "
                              f"{MIN_OPSET} to {highest} ({limits})")
        check_batch_range(self.batch_range)
        if self.precision not in ("fp32", "fp16"):
            raise ExportError(f"precision {self.precision!r}: the graph is built as fp32 or fp16 "
                              f"(int8 is quantised from the fp32 graph)")
        if self.per_scale_outputs and self.smooth_in_graph:
            # Per-scale maps are low resolution and unsmoothed by definition.
            self.smooth_in_graph = False
        return self

    @property
    def input_format(self) -> str:
        return INPUT_UINT8_NHWC if self.uint8_input else INPUT_FLOAT_NCHW


@functools.lru_cache(maxsize=None)
def max_opset() -> Tuple[int, str]:
    """(the newest opset an export can have here, what bounds it, in words): the lowest of what torch's
    TorchScript exporter writes, what the installed onnx knows (the checker) and what the installed ONNX
    Runtime loads (every export's parity check runs on it). A higher --opset failed deep in torch with a
    traceback, or wrote a graph ONNX Runtime refuses."""
    from mrkd.deps import require
    onnx = require("onnx")
    limits = {f"onnx {onnx.__version__}": int(onnx.defs.onnx_opset_version())}
    try:
        from torch.onnx import _constants       # private, but the only place torch says it
        limits[f"torch {torch.__version__.split('+')[0]} exporter"] = int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):
        pass
    ort = require("onnxruntime")
    highest = min(limits.values())
    while highest > MIN_OPSET and not _ort_loads_opset(onnx, highest):
        highest -= 1
    if highest < min(limits.values()):
        limits[f"onnxruntime {ort.__version__}"] = highest
    return min(limits.values()), ", ".join(f"{name} up to {value}" for name, value in limits.items())


def _ort_loads_opset(onnx, opset: int) -> bool:
    """Whether ONNX Runtime loads a one-node graph of ``opset`` (it has no call that says so)."""
    from mrkd.runtime.backends import BackendError
    from mrkd.runtime.backends.onnxruntime_backend import ort_session
    helper = onnx.helper
    value = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [value],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    opsets = [helper.make_opsetid("", opset)]
    try:
        ir_version = helper.find_min_ir_version_for(opsets)
    except (ValueError, KeyError):
        return False
    try:
        ort_session(helper.make_model(graph, opset_imports=opsets, ir_version=ir_version).SerializeToString(),
                    ["cpu"], quiet=True)
    except BackendError:
        return False
    return True


def check_batch_range(batch_range) -> Tuple[int, int, int]:
    """Validate a (min, opt, max) batch range: 1 <= min <= opt <= max <= MAX_BATCH."""
    try:
        lo, opt, hi = (int(v) for v in batch_range)
    except (TypeError, ValueError):
        raise ExportError(f"batch range {batch_range!r} must be three integers MIN:OPT:MAX") from None
    if not (1 <= lo <= opt <= hi <= MAX_BATCH):
        raise ExportError(f"batch range {lo}:{opt}:{hi} must satisfy 1 <= MIN <= OPT <= MAX <= {MAX_BATCH}")
    return lo, opt, hi


def parse_batch_range(text: str) -> Tuple[int, int, int]:
    """'1:4:8' -> (1, 4, 8); a single 'N' means N:N:N."""
    parts = str(text).split(":")
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise ExportError(f"--batch {text!r}: expected MIN:OPT:MAX, e.g. 1:1:16")
    return check_batch_range(parts)


SCALE_STRIDES = (4, 8, 16)   # the teacher's feature taps, one per-scale output each


def has_knn_map(model) -> bool:
    """The model's head sums a memory-bank distance map (--score knn|both): one more per-scale output."""
    return getattr(model.head, "memory_bank", None) is not None


def output_names(options: ExportOptions, knn_map: bool = False) -> List[str]:
    """The graph's output names (runtime.metadata's constants), in output order. Per-scale exports of a
    model with a memory bank have the kNN distance map as the last "scale" (stride 8, weighted)."""
    if options.per_scale_outputs:
        return [f"{SCALE_OUTPUT_PREFIX}{i}" for i in range(len(SCALE_STRIDES) + int(knn_map))]
    return [MAP_OUTPUT, SCORE_OUTPUT] if options.smooth_in_graph else [MAP_OUTPUT]


def graph_outputs(options: ExportOptions, image_size: int, sigma: float, knn_map: bool = False) -> GraphOutputs:
    """ModelMetadata.outputs of an export with ``options``: the names by role (the runtime reads them)."""
    names = output_names(options, knn_map)
    descriptions = output_descriptions(options, image_size, sigma, knn_map)
    if options.per_scale_outputs:
        return GraphOutputs(scales=tuple(names), descriptions=descriptions)
    return GraphOutputs(anomaly_map=MAP_OUTPUT, score=SCORE_OUTPUT if SCORE_OUTPUT in names else None,
                        descriptions=descriptions)


def output_descriptions(options: ExportOptions, image_size: int, sigma: float,
                        knn_map: bool = False) -> Dict[str, str]:
    """Output name -> what it holds (GraphOutputs.descriptions, kept in the sidecar for people)."""
    if options.per_scale_outputs:
        finish = (f"upsample (bilinear, align_corners=True) to {image_size}, sum, smooth (sigma {sigma}), "
                  f"max = score")
        names = output_names(options, knn_map)
        described = {name: f"N×{image_size // s}×{image_size // s} float32: unsmoothed 1 − cos between "
                           f"teacher and student features at stride {s}, times its scale weight; {finish}"
                     for name, s in zip(names, SCALE_STRIDES)}
        if knn_map:
            described[names[-1]] = (f"N×{image_size // 8}×{image_size // 8} float32: distance to the memory "
                                    f"bank of training patches at stride 8, times its weight; {finish}")
        return described
    if options.smooth_in_graph:
        return {MAP_OUTPUT: f"N×1×{image_size}×{image_size} float32: sum over scales of upsampled 1 − cos, "
                            f"Gaussian-smoothed in the graph (sigma {sigma}, scipy reflect border)",
                SCORE_OUTPUT: "N float32: max of anomaly_map; compare with threshold"}
    return {MAP_OUTPUT: f"N×1×{image_size}×{image_size} float32: sum over scales of upsampled 1 − cos, "
                           f"NOT smoothed: the runtime applies the Gaussian (sigma {sigma}) and takes the max "
                           f"as the score"}


class InGraphPreprocess(nn.Module):
    """uint8 BGR N×H×W×3 (already at the model size) → float32 N×3×H×W RGB, (x/255 − mean)/std."""

    def __init__(self, mean, std):
        super().__init__()
        mean = torch.tensor(mean, dtype=torch.float64)
        std = torch.tensor(std, dtype=torch.float64)
        # Same affine as mrkd.runtime.preprocess: one multiply-add per channel.
        self.register_buffer("scale", (1.0 / (255.0 * std)).float().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("offset", (-mean / std).float().view(1, 3, 1, 1), persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        rgb = frames.flip(3).permute(0, 3, 1, 2).float()
        return rgb * self.scale + self.offset


class ExportGraph(nn.Module):
    """The module that is traced to ONNX: the whole detector as one forward."""

    def __init__(self, model, options: ExportOptions):
        super().__init__()
        options.validate()
        config = model.config
        self.options = options
        self.preprocess = InGraphPreprocess(config.mean, config.std) if options.uint8_input else None
        self.teacher, self.bottleneck, self.student = model.teacher, model.bottleneck, model.student
        self.head = model.head
        self.feature_dtype = torch.float16 if options.precision == "fp16" else torch.float32
        if options.precision == "fp16":
            # Copies, so the caller's FP32 model is untouched; the head (buffers) stays FP32.
            self.teacher = copy.deepcopy(model.teacher).half()
            self.bottleneck = copy.deepcopy(model.bottleneck).half()
            self.student = copy.deepcopy(model.student).half()

    def forward(self, x: torch.Tensor):
        if self.preprocess is not None:
            x = self.preprocess(x)
        x = x.to(self.feature_dtype)
        teacher_feats = self.teacher(x)
        student_feats = self.student(self.bottleneck(teacher_feats))
        # Explicit Cast to FP32 before the head: norms over 1024 channels overflow FP16.
        teacher_feats = [f.float() for f in teacher_feats]
        student_feats = [f.float() for f in student_feats]
        per_scale = self.head.per_scale_maps(teacher_feats, student_feats)
        if self.options.per_scale_outputs:
            return tuple(per_scale)
        summed = self.head.upsample_sum(per_scale)
        if not self.options.smooth_in_graph:
            return summed
        smoothed = self.head.blur(summed)
        return smoothed, self.head.scores(smoothed)


def example_input(image_size: int, options: ExportOptions, batch: int = 1) -> torch.Tensor:
    """A tracing/test input of the graph's input type."""
    if options.uint8_input:
        return torch.randint(0, 256, (batch, image_size, image_size, 3), dtype=torch.uint8)
    return torch.randn(batch, 3, image_size, image_size)


def trace_to_onnx(model, options: ExportOptions):
    """Trace ``model`` (an MRKD in eval mode) with ``options`` into an in-memory onnx.ModelProto."""
    from mrkd.deps import require
    onnx = require("onnx")
    options.validate()
    model = model.eval()
    graph = ExportGraph(model, options).eval()
    names = output_names(options, has_knn_map(model))
    dynamic_axes = {INPUT_NAME: {0: BATCH_AXIS}, **{name: {0: BATCH_AXIS} for name in names}}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is used on purpose: its dynamic_axes give one clean symbolic batch
        # axis and it needs no onnxscript. The blur's border indices are static (fixed image size).
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(graph, (example_input(model.config.image_size, options),), buffer,
                          input_names=[INPUT_NAME], output_names=names, dynamic_axes=dynamic_axes,
                          opset_version=int(options.opset), do_constant_folding=True, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # onnx raises several types (ValidationError, InferenceError)
        raise ExportError(f"the exported graph fails onnx.checker ({type(exc).__name__}: {exc})") from exc
    return proto


def set_metadata_props(proto, props: Dict[str, str]) -> None:
    """Replace the graph's metadata_props entries named in ``props``."""
    keep = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def save_onnx(proto, path) -> Path:
    """Write ``proto`` atomically (single file; mrkd models stay far below protobuf's 2 GB)."""
    from mrkd.atomic import atomic_write_bytes
    path = Path(path)
    atomic_write_bytes(path, proto.SerializeToString())
    return path


def load_onnx(path):
    """onnx.load with an error that names the file."""
    from mrkd.deps import require
    onnx = require("onnx")
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: ONNX model not found")
    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise ExportError(f"{path}: not a readable ONNX model ({exc})") from exc


def read_onnx_props(path) -> Dict[str, str]:
    """The ONNX file's metadata_props as a dict."""
    return {p.key: p.value for p in load_onnx(path).metadata_props}
