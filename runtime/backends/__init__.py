"""Inference backends behind one small interface: ``infer(batch) -> {output name: numpy array}``.

ONNX Runtime runs ``.onnx`` files (TensorRT, CUDA or CPU execution providers); the TensorRT backend
runs serialized engines (``.engine``/``.plan``). Each backend imports its library lazily, so a Jetson
with only TensorRT never needs onnxruntime and a laptop never needs TensorRT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from mrkd.errors import MrkdError

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
BACKENDS = ("auto", "onnxruntime", "tensorrt")


class BackendError(MrkdError, RuntimeError):
    """A model file cannot be loaded or run by the chosen backend; the message names the file."""


class Backend:
    """What every backend provides. Subclasses fill the attributes in ``__init__``.

    input_name / input_shape (dims, -1 where dynamic) / input_dtype (numpy dtype) describe the one
    model input; output_names lists the outputs; batch_range is (min, max) of the batch dimension.
    """

    name = "backend"
    model_path: Path
    input_name: str
    input_shape: Tuple[int, ...]
    input_dtype: np.dtype
    output_names: Tuple[str, ...]
    batch_range: Tuple[int, int]

    def infer(self, batch: np.ndarray) -> Dict[str, np.ndarray]:
        """Run one batch (already pre-processed, contiguous, of ``input_dtype``); returns host arrays."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for logs: backend, device/providers, model file."""
        return f"{self.name} ({self.model_path})"

    def close(self) -> None:
        """Free sessions/buffers. Safe to call twice."""


def resolve_backend_name(model_path: str | Path, backend: str = "auto") -> str:
    """"auto" -> "tensorrt" for .engine/.plan/.trt files, "onnxruntime" for .onnx; others unchanged."""
    if backend not in BACKENDS:
        raise BackendError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    suffix = Path(model_path).suffix.lower()
    if suffix in ENGINE_SUFFIXES:
        return "tensorrt"
    if suffix == ".onnx":
        return "onnxruntime"
    raise BackendError(f"{model_path}: cannot tell the backend from the suffix {suffix!r} "
                       f"(expected .onnx or one of {ENGINE_SUFFIXES}); pass backend= explicitly")


def open_backend(model_path: str | Path, backend: str = "auto", providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None, metadata=None) -> Backend:
    """Load ``model_path`` with the named backend ("auto" picks by suffix).

    providers: ONNX Runtime execution providers in order of preference (short names "tensorrt",
    "cuda", "cpu" or full names); None = every available one of TensorRT, CUDA, CPU.
    threads: ONNX Runtime intra-op threads (None = its default).
    metadata: the ModelMetadata of an engine, checked against the running TensorRT and GPU.
    """
    path = Path(model_path)
    if not path.is_file():
        raise BackendError(f"{path}: model file not found")
    name = resolve_backend_name(path, backend)
    if name == "tensorrt":
        from mrkd.runtime.backends.tensorrt_backend import TensorRTBackend
        return TensorRTBackend(path, metadata=metadata)
    from mrkd.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    return OnnxRuntimeBackend(path, providers=providers, threads=threads)
