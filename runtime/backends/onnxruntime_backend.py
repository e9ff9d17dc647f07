"""ONNX Runtime backend: one InferenceSession, providers TensorRT > CUDA > CPU (whichever exist)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from mrkd.deps import require
from mrkd.runtime.backends import NOT_ONNX, Backend, BackendError, BackendOptions

PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
DEFAULT_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

# ONNX Runtime's words for a file that is no ONNX model at all (its other load errors, e.g. an opset it
# does not know, are about a valid model)
UNPARSED_SIGNS = ("INVALID_PROTOBUF", "No graph was found")

# ONNX Runtime's intra-op threads by default keep spinning for tens of ms after a run returns, on the
# cores the camera decoders, the post-processing and the broker need between frames (a row timed after
# an ONNX Runtime one took up to 1.8x its time). This entry puts them to sleep when run() returns; they
# still spin inside a run. ORT >= 1.12 (microsoft/onnxruntime#11841).
STOP_SPINNING_AFTER_RUN = ("session.force_spinning_stop", "1")

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}


def choose_providers(requested: Optional[Sequence[str]], available: Sequence[str]) -> List[str]:
    """Full provider names to use, in order. ``requested`` None = the available ones of DEFAULT_ORDER.

    A requested provider that this onnxruntime build lacks is an error naming what exists.
    """
    if not requested:
        return [p for p in DEFAULT_ORDER if p in available] or ["CPUExecutionProvider"]
    chosen = []
    for name in requested:
        name = name.strip()          # "cpu, cuda": the space is the list's, not the name's
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if not name:
            raise BackendError(f"execution providers {','.join(requested)!r}: an empty name in the list")
        if full in chosen:
            raise BackendError(f"execution provider {name!r} is named twice in {','.join(requested)!r}")
        if full not in available:
            raise BackendError(f"execution provider {name!r} is not in this onnxruntime build "
                               f"(available: {', '.join(available)})")
        chosen.append(full)
    return chosen


def session_options(threads: Optional[int] = None, quiet: bool = False, spin_after_run: bool = False):
    """The SessionOptions every ONNX Runtime session of mrkd uses: ``threads`` intra-op threads
    (None/0 = ORT's default, one per core), ORT_ENABLE_ALL (layout transformations to NCHWc blocked
    convolutions, QDQ -> integer kernel fusion), threads asleep once a run returns
    (STOP_SPINNING_AFTER_RUN; ``spin_after_run`` keeps ORT's own default, for the benchmark that
    measures the difference); ``quiet`` logs errors only (export reports)."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    if quiet:
        options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin_after_run:
        options.add_session_config_entry(*STOP_SPINNING_AFTER_RUN)
    return options


def ort_session(model: Union[str, Path, bytes], providers: Optional[Sequence[str]] = None,
                threads: Optional[int] = None, quiet: bool = False, spin_after_run: bool = False):
    """The one way mrkd opens an ONNX Runtime InferenceSession (the runtime backend, the export
    reports, the benchmarks, the tests): a model path or serialised bytes, ``providers`` as in
    choose_providers (None = TensorRT > CUDA > CPU, whichever this build has; aliases "cpu", "cuda",
    "tensorrt"), session_options(threads, quiet, spin_after_run). BackendError naming the model when ORT refuses it."""
    ort = require("onnxruntime")
    chosen = choose_providers(providers, ort.get_available_providers())
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, sess_options=session_options(threads, quiet, spin_after_run),
                                    providers=chosen)
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        what = "the serialised model" if isinstance(model, bytes) else str(model)
        unparsed = any(sign in str(exc) for sign in UNPARSED_SIGNS)
        raise BackendError(f"{what}: onnxruntime cannot load the model"
                           + (f", it is {NOT_ONNX}: {exc}" if unparsed else f" ({exc})")) from exc


class OnnxRuntimeBackend(Backend):
    """Runs an .onnx model with ONNX Runtime; outputs come back as host numpy arrays."""

    name = "onnxruntime"

    def __init__(self, model_path: str | Path, options: Optional[BackendOptions] = None, *,
                 providers: Optional[Sequence[str]] = None, threads: Optional[int] = None, quiet: bool = False):
        """``options`` as open_backend passes them (providers, threads); the keywords, for direct
        library use, take precedence."""
        ort = require("onnxruntime")
        options = options or BackendOptions()
        providers = providers if providers is not None else options.providers
        threads = threads if threads is not None else options.threads
        self.model_path = Path(model_path)
        self.providers = choose_providers(providers, ort.get_available_providers())
        self.session = ort_session(self.model_path, self.providers, threads, quiet)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise BackendError(f"{self.model_path}: expected one model input, found "
                               f"{[i.name for i in inputs]}")
        model_input = inputs[0]
        self.input_name = model_input.name
        self.input_shape = tuple(d if isinstance(d, int) else -1 for d in model_input.shape)
        if model_input.type not in _ORT_TYPES:
            raise BackendError(f"{self.model_path}: input {self.input_name!r} has unsupported type "
                               f"{model_input.type}")
        self.input_dtype = np.dtype(_ORT_TYPES[model_input.type])
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        batch_dim = self.input_shape[0] if self.input_shape else -1
        # A fixed batch dimension pins both ends; a dynamic one is bounded by the metadata instead.
        self.batch_range = (batch_dim, batch_dim) if batch_dim > 0 else (1, 1 << 30)
        self.model_metadata_props = dict(self.session.get_modelmeta().custom_metadata_map)

    def infer(self, batch: np.ndarray, device_outputs: bool = False) -> Dict[str, np.ndarray]:
        if device_outputs:
            self._no_device_outputs()
        outputs = self.session.run(list(self.output_names), {self.input_name: batch})
        return dict(zip(self.output_names, outputs))

    def describe(self) -> str:
        return f"onnxruntime {', '.join(self.providers)} ({self.model_path.name})"

    def close(self) -> None:
        self.session = None
