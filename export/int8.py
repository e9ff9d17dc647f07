"""INT8 export: explicit quantisation (Q/DQ) of the backbone, its activation ranges measured on good
images ("INT8 images": --int8-images; not the threshold calibration of mrkd calibrate).

``onnxruntime.quantization.quantize_static`` writes the graph in one of two forms (``target``):

* ``"tensorrt"``: QDQ, per-channel symmetric INT8 weights, symmetric INT8 (zero-point 0)
  activations — the explicit-quantisation form TensorRT builds, which requires zero-point 0.
* ``"cpu"``: QDQ with U8 asymmetric activations, the form ONNX Runtime's x86 CPU EP runs fastest
  (about 2.1x FP32 on WRN50 at 256 px, measured by benchmarks/bench_model.py; see benchmarks/RESULTS.md).
* ``"auto"`` (the export's default, default_int8_target): "tensorrt" where a TensorRT engine will be
  built from the graph (TensorRT and a GPU here, or an engine asked for), else "cpu".

Both keep every Relu explicit (see _quantize) so the FP32 head reads post-activation features, and both
rewrite the decoder's ConvTransposes as 1×1 Conv + DepthToSpace first (export/rewrite.py) so that
they get INT8 kernels too. Which teacher layers stay FP32 is chosen by measurement (KEEP_FP32_MODES).

Only the teacher/bottleneck/student nodes are quantised; pre-processing and the cosine head stay FP32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Set, Tuple

import numpy as np

from mrkd.export.exporter import ExportedModel
from mrkd.export.model_metadata import write_model
from mrkd.export.onnx_graph import INPUT_NAME, ExportError, load_onnx, save_onnx
from mrkd.export.parity import Comparison, compare
from mrkd.export.rewrite import convtranspose_as_conv_depth_to_space
from mrkd.runtime.metadata import Int8Info, ModelMetadata

# Node-name scopes the TorchScript exporter gives the three networks (ExportGraph's attributes).
QUANTISED_SCOPES = ("/teacher/", "/bottleneck/", "/student/")
DEFAULT_INT8_IMAGE_LIMIT = 64  # images INT8 quantisation measures activation ranges on


@dataclasses.dataclass(frozen=True)
class Int8Target:
    """quantize_static settings for one consumer of the INT8 graph."""

    quant_format: str          # "QDQ" | "QOperator"
    activation_type: str       # "QInt8" | "QUInt8"
    activation_symmetric: bool
    description: str
    # Quantise Convs whose output only the FP32 head reads (see head_only_convs)? TensorRT runs a Conv
    # with dequantised inputs and a float output as an INT8 kernel (NVIDIA's guidance: quantise the
    # inputs of weighted layers). ONNX Runtime's CPU EP makes an INT8 Conv only when the output is
    # quantised too, so there it runs FP32 anyway and dequantises the weight on every call: keeping
    # those Convs FP32 took trained WRN50 from 92.0 to 86.6 ms at 256 px with the same scores.
    quantise_head_only_convs: bool = True


# Measured on WRN50 at 256 px, 2 threads, ORT 1.32 (AVX512-VNNI), trained checkpoint, 44 test images
# at its calibrated threshold: "tensorrt" (symmetric S8) runs only 58 of 100 Convs as QLinearConv,
# ~175-199 ms/image, 100% decision agreement (max score diff 0.014); "cpu" (U8 asymmetric) runs 95
# QLinearConv + 26 QLinearAdd, ~107-115 ms/image (FP32: ~212 ms), 100% agreement (max diff 0.010).
# (Before the ConvTranspose rewrite and with the front layers kept FP32.) QOperator S8S8 is flagged slow on x86 by ORT's docs, so QDQ is kept.
INT8_TARGETS = {
    "tensorrt": Int8Target("QDQ", "QInt8", True, "QDQ per-channel symmetric"),
    "cpu": Int8Target("QDQ", "QUInt8", False, "QDQ per-channel, U8 asymmetric activations (ORT x86 CPU)",
                      quantise_head_only_convs=False),
}


INT8_TARGET_CHOICES = ("auto",) + tuple(INT8_TARGETS)


def default_int8_target(engine_will_be_built: bool) -> str:
    """The INT8 form for ``target="auto"``: the one TensorRT builds when an engine will be built from
    the graph, else the one the CPU runtimes run fastest (ONNX Runtime 1.8x the tensorrt form; OpenVINO
    reads both)."""
    return "tensorrt" if engine_will_be_built else "cpu"


_IMAGES_FOR = {"--int8-images": "INT8 quantisation", "--check-images": "the precision checks"}


def int8_image_paths(images_dir, limit: Optional[int] = DEFAULT_INT8_IMAGE_LIMIT,
                     option: str = "--int8-images") -> List[Path]:
    """The good images INT8 quantisation measures activation ranges on: the image files in
    ``images_dir`` and its sub-folders (runtime.images.list_images, recursive: a category's
    train/ with good/ inside works), sorted, the first ``limit``; a clear error naming ``option``
    (the folder's option, "--int8-images" or "--check-images") when there are none."""
    from mrkd.runtime.image_folders import warn_narrow_16bit, warn_unread_images
    from mrkd.runtime.images import list_images
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise ExportError(f"{images_dir}: folder not found ({option} needs a folder of good images for "
                          f"{_IMAGES_FOR[option]})")
    paths = list_images(images_dir, recursive=True)
    warn_unread_images(images_dir, recursive=True)    # as every other folder reader says it
    if not paths:
        raise ExportError(f"{images_dir}: no images found for {_IMAGES_FOR[option]} ({option})")
    paths = paths[:limit] if limit else paths
    warn_narrow_16bit(paths, f"{images_dir} ({option})")
    return paths


def refuse_unreadable(paths: Sequence, option: str) -> None:
    """An ExportError naming the first of ``paths`` that cannot be decoded and ``option``, the folder's
    option: said before any file is written, not after model.onnx is already there."""
    from mrkd.runtime.images import ImageReadError, read_image
    for path in paths:
        try:
            read_image(path)
        except ImageReadError as exc:
            raise ExportError(f"{exc} (in {option}; remove it or fix it)") from None


def load_images(paths: Sequence, meta: ModelMetadata) -> np.ndarray:
    """Images as the graph's input: uint8 N×H×W×3 BGR frames or float32 N×3×H×W normalised."""
    from mrkd.runtime.images import read_image
    from mrkd.runtime.preprocess import model_input
    return model_input([read_image(p) for p in paths], meta)


def _reader(batch: np.ndarray):
    from mrkd.deps import require
    quantization = require("onnxruntime.quantization")

    class ImageReader(quantization.CalibrationDataReader):
        """Feeds the INT8 images one at a time (progress shown by tqdm)."""

        def __init__(self):
            from tqdm import tqdm
            self._items = iter(tqdm(batch, desc="INT8 quantisation images", unit="img", leave=False))

        def get_next(self):
            item = next(self._items, None)
            return None if item is None else {INPUT_NAME: item[None]}

    return ImageReader()


def backbone_nodes(proto) -> List[str]:
    """Names of the nodes that belong to teacher, bottleneck or student."""
    return [n.name for n in proto.graph.node if n.name.startswith(QUANTISED_SCOPES)]


def head_only_convs(proto) -> Set[str]:
    """Backbone Convs whose outputs no backbone node reads, only the head: the student's last
    generation Convs, whose features the cosine head compares with the teacher's."""
    backbone = set(backbone_nodes(proto))
    readers = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    return {n.name for n in proto.graph.node
            if n.op_type == "Conv" and n.name in backbone
            and not any(reader in backbone for out in n.output for reader in readers.get(out, []))}


def first_tap_ancestors(proto) -> Set[str]:
    """Teacher nodes up to and including the shallowest teacher feature tap (the teacher node
    whose output the bottleneck or head reads and that has the fewest teacher nodes upstream).

    Why these may need to stay FP32 (keep_fp32 "front", or "auto" when measured): on
    EfficientNet-Lite0 (trained, 44 test images at the calibrated threshold) quantising only the stem and blocks 0-2 — the layers in front of the first tap —
    costs 5-9% decision agreement each, while every later teacher block alone keeps 100%; their
    error reaches all three feature scales. Excluding depthwise Convs instead made it worse
    (70%), so it is depth, not the op type. Derived from the graph, so it holds for every backbone."""
    teacher = [n for n in proto.graph.node if n.name.startswith("/teacher/")]
    producer = {out: n for n in teacher for out in n.output}
    read_outside = {name for n in proto.graph.node if not n.name.startswith("/teacher/") for name in n.input}
    taps = [n for n in teacher if set(n.output) & read_outside]
    if not taps:
        return set()

    def ancestors(node) -> Set[str]:
        seen, stack = {node.name}, [node]
        while stack:
            for name in stack.pop().input:
                up = producer.get(name)
                if up is not None and up.name not in seen:
                    seen.add(up.name)
                    stack.append(up)
        return seen

    return min((ancestors(t) for t in taps), key=len)


def keep_unquantised_inputs_fp32(proto, quantised: set) -> int:
    """Rewire nodes outside the quantised set (the head) to read the FP32 tensor instead of its
    Q→DQ copy, then drop Q/DQ pairs nobody reads. The quantiser puts a Q/DQ on a feature map that a
    quantised node *and* the head both read; the head must see the FP32 features. Returns the
    number of inputs rewired."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    original = {}   # DQ output -> the FP32 tensor that went into the matching Q
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in producers:
            q = producers[node.input[0]]
            if q.op_type == "QuantizeLinear":
                original[node.output[0]] = q.input[0]
    rewired = 0
    for node in proto.graph.node:
        if node.name in quantised or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            if name in original:
                node.input[i] = original[name]
                rewired += 1
    # Remove Q/DQ nodes whose outputs are now unused (repeat: a Q is unused once its DQ is gone).
    graph_outputs = {o.name for o in proto.graph.output}
    while True:
        used = {name for node in proto.graph.node for name in node.input} | graph_outputs
        dead = [n for n in proto.graph.node
                if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            proto.graph.node.remove(node)
    # their scales and zero points too: ONNX Runtime warns of each unused initializer whenever it loads the graph
    used = {name for node in proto.graph.node for name in node.input} | graph_outputs
    for unused in [init for init in proto.graph.initializer if init.name not in used]:
        proto.graph.initializer.remove(unused)
    return rewired


# keep_fp32 modes: which teacher layers stay FP32. "front" keeps the layers in front of the first
# feature tap (first_tap_ancestors), "none" quantises them too, "auto" tries "none" first and falls back
# to "front" when the all-INT8 graph's scores on the INT8 images move by more than
# AUTO_MAX_ERROR_VS_SPREAD × the spread (std) of the FP32 graph's scores there. The spread is the unit
# because the calibrated threshold sits in the tail of those same good-image scores.
# Measured (trained checkpoints, 256 px, 2 threads, "cpu" target, 44 test images at the calibrated
# threshold): WRN50 all-INT8 moves scores by 0.10× the spread (100% decisions, 89 ms vs 99 ms with
# "front"); EfficientNet-Lite0 all-INT8 by 1.5× (86% decisions) and with "front" by 0.13× (100%).
KEEP_FP32_MODES = ("auto", "front", "none")
AUTO_MAX_ERROR_VS_SPREAD = 0.25


@dataclasses.dataclass(frozen=True)
class ScoreError:
    """How far an INT8 graph's scores move from the FP32 graph's on the INT8 images."""

    mean_abs: float
    max_abs: float
    fp32_spread: float      # std of the FP32 scores; the unit of ``relative``

    @property
    def relative(self) -> float:
        return self.mean_abs / self.fp32_spread if self.fp32_spread > 0 else float("inf")

    def as_dict(self) -> dict:
        # JSON has no infinity: a spread of 0 (one image, or images scored alike) records no ratio
        relative = self.relative if self.fp32_spread > 0 else None
        return {"mean_abs": self.mean_abs, "max_abs": self.max_abs, "fp32_spread": self.fp32_spread,
                "relative": relative}


def graph_scores(model, batch: np.ndarray, meta: ModelMetadata) -> np.ndarray:
    """Image scores of a graph (path or serialised bytes) on ``batch``, on ONNX Runtime CPU."""
    from mrkd.export import ort
    from mrkd.export.parity import scores_from_outputs
    return scores_from_outputs(ort.run(ort.cpu_session(model), batch), meta)


def score_error(reference: np.ndarray, candidate: np.ndarray) -> ScoreError:
    """How far ``candidate`` scores lie from the ``reference`` (FP32) scores of the same images."""
    error = np.abs(candidate - reference)
    spread = float(np.std(reference)) if len(reference) > 1 else 0.0
    return ScoreError(float(error.mean()), float(error.max()), spread)


def int8_image_score_error(fp32_model, int8_model, batch: np.ndarray, meta: ModelMetadata) -> ScoreError:
    """Score error of ``int8_model`` against ``fp32_model`` (paths or serialised bytes) on ``batch``."""
    return score_error(graph_scores(fp32_model, batch, meta), graph_scores(int8_model, batch, meta))


def _quantize(source: Path, destination: Path, batch: np.ndarray, settings: Int8Target, nodes: List[str]):
    """quantize_static on ``source`` with our settings; returns the Q/DQ proto, head inputs rewired to FP32."""
    from mrkd.deps import require
    quantization = require("onnxruntime.quantization")
    with _without_preprocessing_advice():
        return _quantize_static(quantization, source, destination, batch, settings, nodes)


class _PreprocessingAdvice(logging.Filter):
    """ONNX Runtime's quantiser logs "Please consider (to run) pre-processing before quantization" on the
    root logger, twice per graph; the graph it gets is already slimmed (shapes inferred, constants
    folded: _prepare), so the advice is noise in the export's report."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider")


@contextlib.contextmanager
def _without_preprocessing_advice():
    advice, root = _PreprocessingAdvice(), logging.getLogger()   # it logs through logging.warning: the root
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def _quantize_static(quantization, source: Path, destination: Path, batch: np.ndarray, settings: Int8Target,
                     nodes: List[str]):
    quantization.quantize_static(
        str(source), str(destination), _reader(batch),
        quant_format=getattr(quantization.QuantFormat, settings.quant_format), per_channel=True,
        activation_type=getattr(quantization.QuantType, settings.activation_type),
        weight_type=quantization.QuantType.QInt8, nodes_to_quantize=nodes,
        extra_options={"ActivationSymmetric": settings.activation_symmetric, "WeightSymmetric": True,
                       # With asymmetric activations ORT otherwise deletes each Relu and lets the
                       # U8 Q (zero-point 0) do the clipping; keep_unquantised_inputs_fp32 then
                       # rewires the head to that Q's input, i.e. the *pre-ReLU* features, and
                       # decisions collapse (13.6% agreement on trained WRN50). Keeping the Relu
                       # costs nothing: ORT's optimiser still fuses it into QLinearConv.
                       "QDQKeepRemovableActivations": True})
    proto = load_onnx(destination)
    bypassed = keep_unquantised_inputs_fp32(proto, set(nodes))
    return proto, bypassed


def quantize_int8(fp32_onnx_path, out_path, images_dir, limit: Optional[int] = DEFAULT_INT8_IMAGE_LIMIT,
                  target: str = "tensorrt", keep_fp32: str = "auto", echo=None,
                  fp32_metadata: Optional[ModelMetadata] = None) -> ExportedModel:
    """Write an INT8 copy of the FP32 graph at ``fp32_onnx_path`` (+ sidecar) to ``out_path``.

    ``target``: a key of INT8_TARGETS — "tensorrt" (explicit Q/DQ, the export default) or "cpu"
    (the setting ONNX Runtime's CPU EP runs fastest). ``keep_fp32``: one of KEEP_FP32_MODES.
    ``echo`` (optional) receives one line saying which layers stayed FP32 and why."""
    from mrkd.deps import require
    if target not in INT8_TARGETS:
        raise ExportError(f"INT8 target {target!r} unknown; choose from {sorted(INT8_TARGETS)}")
    if keep_fp32 not in KEEP_FP32_MODES:
        raise ExportError(f"keep_fp32 {keep_fp32!r} unknown; choose from {list(KEEP_FP32_MODES)}")
    settings = INT8_TARGETS[target]
    require("onnxruntime.quantization")
    from mrkd.runtime.metadata import sidecar_path
    meta = fp32_metadata or ModelMetadata.load(sidecar_path(fp32_onnx_path))   # the export passes its own
    if meta.precision != "fp32":
        raise ExportError(f"{fp32_onnx_path}: INT8 is quantised from the fp32 graph, this one is {meta.precision}")
    batch = load_images(int8_image_paths(images_dir, limit), meta)
    if not backbone_nodes(load_onnx(fp32_onnx_path)):
        raise ExportError(f"{fp32_onnx_path}: no teacher/bottleneck/student nodes found to quantise")
    tried = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Slim first (folds the Identity/Constant chains the tracer leaves in front of weights and
        # biases), so the quantiser sees every Conv's weight and bias as an initializer.
        slim_path, prepared_path = Path(tmp) / "fp32_slim.onnx", Path(tmp) / "fp32_prepared.onnx"
        with contextlib.redirect_stdout(io.StringIO()):    # onnxslim prints a summary table
            require("onnxslim").slim(str(fp32_onnx_path), str(slim_path))
        prepared = load_onnx(slim_path)
        rewritten = convtranspose_as_conv_depth_to_space(prepared)
        save_onnx(prepared, prepared_path)
        reference = graph_scores(str(prepared_path), batch, meta)   # FP32, once for every mode tried
        front = first_tap_ancestors(prepared)
        head_only = set() if settings.quantise_head_only_convs else head_only_convs(prepared)
        for mode in (("none", "front") if keep_fp32 == "auto" else (keep_fp32,)):
            kept = front if mode == "front" else set()
            nodes = [n for n in backbone_nodes(prepared) if n not in kept and n not in head_only]
            proto, bypassed = _quantize(prepared_path, Path(tmp) / f"int8_{mode}.onnx", batch, settings, nodes)
            error = score_error(reference, graph_scores(proto.SerializeToString(), batch, meta))
            tried[mode] = error.as_dict()
            if keep_fp32 != "auto" or error.relative <= AUTO_MAX_ERROR_VS_SPREAD:
                break
    if echo is not None:
        echo(f"INT8 ({keep_fp32}): {len(kept)} teacher nodes in front of the first feature tap kept FP32; "
             f"INT8-image score error {error.mean_abs:.4g} mean = " + _relative_words(error.as_dict())
             + (f" (all-INT8 was {_relative_words(tried['none'])}, above {AUTO_MAX_ERROR_VS_SPREAD})"
                if mode == "front" and "none" in tried else ""))
    # precision_checks describe the FP32 graph at lower precisions, not this one: not inherited.
    int8_meta = dataclasses.replace(meta, precision="int8", precision_checks=(), int8=Int8Info(
        images=int(len(batch)), images_dir=str(images_dir), quantised_nodes=len(nodes),
        teacher_nodes_kept_fp32=len(kept), keep_fp32=keep_fp32, keep_fp32_chosen=mode,
        score_error=tried, convtranspose_rewritten=rewritten, head_only_convs_fp32=len(head_only),
        head_inputs_kept_fp32=bypassed, target=target, format=settings.description))
    write_model(proto, out_path, int8_meta)
    return ExportedModel(Path(out_path), int8_meta, meta.extra.get("onnxslim", {}))


def _relative_words(error: dict) -> str:
    if error["relative"] is None:
        return (f"no ratio to the FP32 score spread: the {'one image' if error['fp32_spread'] == 0 else 'images'} "
                "gave no spread to measure it against")
    return f"{error['relative']:.2f}x the FP32 score spread"


# Said by every check (INT8 agreement, bf16) that runs on the images INT8 quantisation read: they are
# usually training images too, scored far from the threshold, and the INT8 ranges were measured on them.
SEEN_IMAGES_NOTE = ("flattering: measured on the INT8 calibration images, which quantisation saw; give "
                    "--check-images with other good images, or more than 64 in --int8-images, for images it "
                    "has not seen")
GOOD_ONLY_NOTE = "agreement measured on good images only; defects not checked"


def int8_check_paths(int8_images, check_images=None,
                     limit: int = DEFAULT_INT8_IMAGE_LIMIT) -> Tuple[List[Path], Optional[str]]:
    """The good images the INT8 graph (and bf16, with INT8) is checked on against FP32, and a note when
    they are not held out: ``check_images`` when given (other images than quantisation saw), else the
    ``int8_images`` past the first ``limit`` that quantisation read, else (a folder of at most ``limit``)
    the quantisation images themselves, which flatter the check (SEEN_IMAGES_NOTE). Without
    ``int8_images`` (no INT8 export): the ``check_images``."""
    if int8_images is None or (check_images is not None
                               and Path(check_images).resolve() != Path(int8_images).resolve()):
        return int8_image_paths(check_images, limit, option="--check-images"), None
    every = int8_image_paths(int8_images, limit=None)      # its errors name the option
    if len(every) > limit:
        return every[limit:2 * limit], None
    return int8_image_paths(int8_images, limit), SEEN_IMAGES_NOTE


def held_out_defect_paths(trained_on, limit: int = DEFAULT_INT8_IMAGE_LIMIT) -> Tuple[List[Path], str]:
    """Defect images of the test/ split of the data a checkpoint was trained on (``trained_on``: its
    record, {"data_root", "category", "layout"}), at most ``limit``, taken from each defect type in turn;
    and, in words, where they are from or why there are none. Quantisation error grows with the
    features, so a good image's agreement does not vouch for a defect's (measured on a 64 px Lite0
    model: INT8 moved good scores by up to 1 % of the threshold, defect scores by up to 8.5 %)."""
    from mrkd.runtime.labelled_images import labelled_images, misnamed_good_text
    record = trained_on if isinstance(trained_on, dict) else {}
    root, category = record.get("data_root"), record.get("category")
    if not root or not category:
        return [], "the checkpoint records no training data (no test/ split to take them from)"
    if record.get("layout") == "folder":
        return [], "the checkpoint was trained on a plain folder of good images, without a test/ split"
    test_dir = Path(root) / category / "test"
    if not test_dir.is_dir():
        return [], f"the checkpoint's test split {test_dir} is not here"
    split = labelled_images(test_dir)
    misnamed = misnamed_good_text(split)
    if misnamed:        # its good parts would be checked as defects: no defect check, said in its note
        return [], misnamed
    by_type = [kind.images for kind in split.defect_types]
    paths = [kind[i] for i in range(max(map(len, by_type), default=0)) for kind in by_type if i < len(kind)]
    if not paths:
        return [], f"{test_dir} holds no defect images"
    return paths[:limit], f"defect images held out in {test_dir}"


def load_readable_images(paths: Sequence, meta: ModelMetadata) -> Tuple[np.ndarray, List[Path]]:
    """load_images of the ``paths`` that can be read, and the ones that cannot (a check's images are
    looked at, not required: one broken file in a test/ folder must not stop an export)."""
    from mrkd.runtime.images import ImageReadError, read_image
    from mrkd.runtime.preprocess import model_input
    frames, unreadable = [], []
    for path in paths:
        try:
            frames.append(read_image(path))
        except ImageReadError:
            unreadable.append(Path(path))
    return (model_input(frames, meta) if frames else None), unreadable


def int8_agreement_report(fp32_onnx_path, int8_onnx_path, images: np.ndarray,
                          threshold: Optional[float] = None, backend: str = "onnxruntime",
                          int8_metadata: Optional[ModelMetadata] = None, subset: str = "") -> Comparison:
    """INT8 vs FP32 graph on ``images``: the FP32 graph through the runtime's ONNX Runtime backend (CPU
    EP), the INT8 graph through the runtime backend ``backend`` names (a runtime.backends spec:
    "onnxruntime" on its CPU EP, "openvino", "openvino:bf16", ...), both finished by the runtime's
    post-processing: map error and decision agreement (at the median FP32 score without a threshold).
    ``subset`` names the images in the report ("good", "defect")."""
    report = backend_agreement_report(fp32_onnx_path, int8_onnx_path, images, threshold, backend, "INT8 graph",
                                      candidate_metadata=int8_metadata)
    report.subset = subset
    return report


def backend_agreement_report(fp32_onnx_path, candidate_onnx_path, images: np.ndarray,
                             threshold: Optional[float] = None, backend: str = "onnxruntime",
                             what: str = "graph", candidate_metadata: Optional[ModelMetadata] = None) -> Comparison:
    """``candidate_onnx_path`` run by ``backend`` vs the FP32 graph on ONNX Runtime's CPU EP (the
    reference every export is checked with): map/score error and decision agreement; the name says
    which backend and precision ran (Backend.precision), e.g. "INT8 graph on openvino fp32"."""
    from mrkd.export import ort
    from mrkd.export.parity import scores_from_outputs
    from mrkd.runtime.backends import open_backend
    from mrkd.runtime.metadata import sidecar_path
    metadata = candidate_metadata or ModelMetadata.load(sidecar_path(candidate_onnx_path))
    reference = ort.runtime_outputs(fp32_onnx_path, images)
    if backend == "onnxruntime":
        candidate, ran = ort.runtime_outputs(candidate_onnx_path, images), "ONNX Runtime CPU"
    else:
        runner = open_backend(candidate_onnx_path, backend)
        try:
            candidate = runner.infer(np.ascontiguousarray(images))
            ran = f"{runner.name} {runner.precision}"
        finally:
            runner.close()
    reference = {k: v.astype(np.float64) for k, v in reference.items()}
    if threshold is None:
        threshold = float(np.median(scores_from_outputs(reference, metadata)))
    name = (f"{what} vs FP32 graph ({ran})" if backend == "onnxruntime"
            else f"{what} on {ran} vs FP32 graph (ONNX Runtime CPU)")
    return compare(name, reference, candidate, metadata, threshold)
