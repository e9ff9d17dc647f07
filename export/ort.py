"""ONNX Runtime on the CPU: the reference backend every export is checked with."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Union

import numpy as np

ModelSource = Union[str, Path, bytes]


def cpu_session(model: ModelSource, threads: int = 0):
    """An onnxruntime InferenceSession on the CPU EP for a path or serialised model bytes: the
    runtime's own factory (runtime.backends.onnxruntime_backend.ort_session), errors logged only."""
    from mrkd.runtime.backends.onnxruntime_backend import ort_session
    return ort_session(model, ["cpu"], threads, quiet=True)


def runtime_outputs(model_path, batch: np.ndarray) -> Dict[str, np.ndarray]:
    """The graph's outputs on ``batch`` through the runtime's own ONNX Runtime backend on the CPU
    EP: what `mrkd run` computes, so the export reports check what users run."""
    from mrkd.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    backend = OnnxRuntimeBackend(model_path, providers=["cpu"], quiet=True)
    try:
        return backend.infer(np.ascontiguousarray(batch))
    finally:
        backend.close()


def run(session, batch: np.ndarray) -> Dict[str, np.ndarray]:
    """Run one batch; returns output name -> array."""
    name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {name: batch})))


def median_latency(session, batch: np.ndarray, repeats: int = 5) -> float:
    """Median wall time of ``repeats`` runs (the caller warms up), in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(session, batch)
        times.append(time.perf_counter() - start)
    return float(np.median(times))
