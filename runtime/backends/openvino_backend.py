"""OpenVINO backend: the exported ``.onnx`` file (FP32, FP16 or the Q/DQ INT8 graph) compiled for the CPU.

OpenVINO reads the ONNX file itself (no conversion step, no second file), so the sidecar and the
sha256 check are the same as for ONNX Runtime. The precision of the float layers is always set
explicitly (``INFERENCE_PRECISION_HINT``): OpenVINO's own default is bf16 on CPUs with native bf16
(AVX512-BF16, AMX), which moves scores against a threshold calibrated in FP32. Q/DQ INT8 graphs run
INT8 kernels (OpenVINO folds the Q/DQ pairs into its low-precision convolutions) with the rest at
that precision. The precision the compiled model reports is what ``precision`` records.
Every model of the process compiles on one ``ov.Core`` (``shared_core``; why: its docstring). OpenVINO is
imported with its usage telemetry declined unless this machine's user opted in (openvino_import.py).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from mrkd.runtime.backends import NOT_ONNX, PRECISION_ALIASES, Backend, BackendError, BackendOptions
from mrkd.runtime.backends.openvino_import import import_openvino

DEVICE = "CPU"
DEFAULT_PRECISION = "fp32"    # bit-comparable to ONNX Runtime FP32; bf16 is asked for by name
CHECKED = "checked"           # --backend auto's precision: bf16 only where the model's bf16 check passed
# Precisions are named as everywhere a user reads them (events, /metrics, the sidecar: "fp32", "fp16",
# "bf16"); OpenVINO's own element type names ("f32", "f16") are used only towards OpenVINO.
OPENVINO_TYPE = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}
OUR_NAME = {ov_name: ours for ours, ov_name in OPENVINO_TYPE.items()}
# OpenVINO element type names -> numpy input dtypes the Detector feeds.
_INPUT_TYPES = {"f32": np.float32, "f16": np.float16, "u8": np.uint8}


_CORE = None
_CORE_LOCK = threading.Lock()


def shared_core():
    """The process's one ov.Core, made on first use and never released. Why one: each Core's CPU plugin
    gives the thread that makes it a signal stack of its own and, when the Core goes, puts back the one
    it found. Cores released in another order than the reverse of their making (a hot swap closes the
    older model) left a thread on a freed signal stack, and the next signal (SIGHUP, SIGTERM, Ctrl-C)
    ended the process with SIGSEGV. One Core also loads the plugin once."""
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            _CORE = import_openvino().Core()
        return _CORE


def cpu_capabilities() -> Tuple[str, ...]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of the CPU, e.g. ("FP32", "INT8", "BF16")."""
    return tuple(str(c) for c in shared_core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))


def checked_precision(capabilities: Tuple[str, ...], metadata,
                      decision_thresholds: Sequence[Optional[float]] = ()) -> Tuple[str, str]:
    """"checked" (what --backend auto runs): bf16 where the CPU has it natively and the model's
    sidecar records a passing bf16 check (export --check-images), else fp32. ``decision_thresholds``: the
    thresholds the run decides at (None: the model's own; () = only the model's): the check's score
    error must stay within 1 % of each. Returns (hint, why)."""
    if "BF16" not in capabilities:
        return "fp32", "fp32: this CPU has no native bf16"
    checks = [c for c in getattr(metadata, "precision_checks", ()) if c.backend == "openvino:bf16"]
    if not checks:
        if getattr(metadata, "int8", None) is not None:
            # export checks bf16 on the FP32 graph only; no option records it for the INT8 graph's f32 layers
            return "fp32", "fp32 beside its INT8 layers: bf16 is checked on the FP32 graph (model.onnx) only"
        return "fp32", "fp32: bf16 not checked for this model (see mrkd export --check-images)"
    check = checks[-1]
    measured = (f"score max |diff| {check.score_max_abs_diff:.3g} at threshold {check.threshold:.6g}, "
                f"{check.decision_agreement:.1%} of {check.images} decisions equal")
    if not check.passed:
        return "fp32", f"fp32: the bf16 check failed ({measured})"
    threshold = getattr(metadata, "threshold", None)
    if threshold is not None and check.score_max_abs_diff > check.SCORE_TOLERANCE * abs(threshold):
        # mrkd calibrate moved the threshold since the check: the score error is judged against the new one.
        return "fp32", f"fp32: bf16's score error {check.score_max_abs_diff:.3g} is over 1 % of the threshold now set"
    # a camera's own threshold (--threshold, the line file) is where its decisions are taken: judged alike
    for given in (t for t in decision_thresholds if t is not None):
        if check.score_max_abs_diff > check.SCORE_TOLERANCE * abs(given):
            return "fp32", (f"fp32: bf16's score error {check.score_max_abs_diff:.3g} is over 1 % of the threshold "
                           f"{given:.6g} given for a camera")
    return "bf16", f"bf16: checked against FP32 ({measured}{', on ' + check.cpu if check.cpu else ''})"


def inference_precision(requested: Optional[str], capabilities: Tuple[str, ...], where: str) -> str:
    """The precision to compile with (OPENVINO_TYPE gives the INFERENCE_PRECISION_HINT): "fp32" (default;
    "f32", OpenVINO's name, is taken too), "bf16" (refused on a CPU without native bf16, where OpenVINO would
    silently fall back to f32), or "auto" = bf16 where the CPU has it natively, else fp32 ("checked" is
    decided by checked_precision)."""
    requested = PRECISION_ALIASES.get(requested or DEFAULT_PRECISION, requested or DEFAULT_PRECISION)
    has_bf16 = "BF16" in capabilities
    if requested == "auto":
        return "bf16" if has_bf16 else "fp32"
    if requested == "bf16" and not has_bf16:
        raise BackendError(f"{where}: openvino:bf16 needs a CPU with native bf16 (AVX512-BF16 or AMX); this "
                           f"one offers {', '.join(capabilities)}: use openvino (fp32) or openvino:auto")
    if requested not in ("fp32", "bf16"):
        raise BackendError(f"{where}: OpenVINO precision {requested!r} unknown; choose fp32, bf16 or auto")
    return requested


class OpenVinoBackend(Backend):
    """Runs an .onnx model with OpenVINO on the CPU; outputs come back as host numpy arrays."""

    name = "openvino"

    def __init__(self, model_path: str | Path, options: Optional[BackendOptions] = None):
        ov = import_openvino()
        options = options or BackendOptions()
        self.model_path = Path(model_path)
        core = shared_core()
        try:
            if self.model_path.suffix.lower() == ".onnx":
                # the ONNX frontend itself: read_model tries every frontend on a file it cannot parse, and
                # TensorFlow's prints C++ log lines ("Error parsing text-format GraphDef") before our error
                frontend = ov.frontend.FrontEndManager().load_by_framework("onnx")
                model = frontend.convert(frontend.load(str(self.model_path)))
            else:
                model = core.read_model(str(self.model_path))
        except Exception as exc:  # OpenVINO raises its own exception types for unreadable files
            reason = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            unparsed = "can't be parsed" in reason
            raise BackendError(f"{self.model_path}: OpenVINO cannot read the model"
                               + (f", it is {NOT_ONNX}: {reason}" if unparsed else f" ({reason})")) from exc
        if not model.inputs and not model.outputs:     # what its ONNX reader makes of a file without a graph
            raise BackendError(f"{self.model_path}: {NOT_ONNX}: it holds no graph")
        if len(model.inputs) != 1:
            raise BackendError(f"{self.model_path}: expected one model input, found "
                               f"{[i.get_any_name() for i in model.inputs]}")
        model_input = model.inputs[0]
        self.input_name = model_input.get_any_name()
        self.input_shape = tuple(-1 if d.is_dynamic else d.get_length() for d in model_input.get_partial_shape())
        type_name = model_input.get_element_type().get_type_name()
        if type_name not in _INPUT_TYPES:
            raise BackendError(f"{self.model_path}: input {self.input_name!r} has unsupported type {type_name}")
        self.input_dtype = np.dtype(_INPUT_TYPES[type_name])
        self.output_names = tuple(o.get_any_name() for o in model.outputs)
        batch_dim = self.input_shape[0] if self.input_shape else -1
        self.batch_range = (batch_dim, batch_dim) if batch_dim > 0 else (1, 1 << 30)
        # The ONNX frontend keeps the file's metadata_props (the export's embedded metadata) here.
        rt_info = model.get_rt_info()
        framework = rt_info["framework"] if "framework" in rt_info.keys() else {}
        self.model_metadata_props = {key: value.astype(str) for key, value in dict(framework).items()}
        self.capabilities = cpu_capabilities()
        self.requested_precision = PRECISION_ALIASES.get(options.precision, options.precision) or DEFAULT_PRECISION
        if self.requested_precision == CHECKED:
            hint, self.precision_reason = checked_precision(self.capabilities, options.metadata,
                                                            options.decision_thresholds)
        else:
            hint = inference_precision(options.precision, self.capabilities, str(self.model_path))
            self.precision_reason = f"{hint}: asked for {self.requested_precision}"
        config = {"INFERENCE_PRECISION_HINT": OPENVINO_TYPE[hint], "PERFORMANCE_HINT": "LATENCY"}
        if options.threads:
            config["INFERENCE_NUM_THREADS"] = int(options.threads)
        try:
            self.compiled = core.compile_model(model, DEVICE, config)
        except Exception as exc:
            raise BackendError(f"{self.model_path}: OpenVINO cannot compile the model for the CPU ({exc})") from exc
        # What the compiled model runs at, not what was asked for (the two differ where OpenVINO falls back).
        ran = _short_type(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.precision = OUR_NAME.get(ran, ran)
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        self._request = self.compiled.create_infer_request()
        self._outputs = list(self.compiled.outputs)

    def infer(self, batch: np.ndarray, device_outputs: bool = False) -> Dict[str, np.ndarray]:
        if device_outputs:
            self._no_device_outputs()
        if self._request is None:
            raise BackendError(f"{self.model_path}: the OpenVINO backend is closed")
        results = self._request.infer({0: batch})
        # Copies: the request's output tensors are overwritten by the next call.
        return {name: np.array(results[port]) for name, port in zip(self.output_names, self._outputs)}

    def describe(self) -> str:
        return (f"openvino {DEVICE} precision {self.precision}, {self.threads} threads ({self.model_path.name}; "
                f"{self.precision_reason})")

    def close(self) -> None:
        self._request = None
        self.compiled = None


def _short_type(element_type) -> str:
    """OpenVINO's Type (or its text) -> its name: "f32" / "bf16" / "f16" (OUR_NAME: ours)."""
    name = getattr(element_type, "get_type_name", None)
    return name() if callable(name) else str(element_type)
