"""ONNX Runtime on the CPU: the reference backend every export is checked with."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Union

import numpy as np

ModelSource = Union[str, Path, bytes]


def cpu_session(model: ModelSource, threads: int = 0):
    """An onnxruntime InferenceSession on the CPU EP for a path or serialised model bytes."""
    from mrkd.deps import require
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


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
