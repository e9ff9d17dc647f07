"""onnxslim simplification, kept only when it measurably helps (or is neutral).

The decision is made per export on the graph at hand: node count and best-of-N single-thread ONNX Runtime CPU
latency before and after; slimming is kept when it removes nodes and is not slower than
``LATENCY_TOLERANCE`` × the original, and it must not change the outputs beyond 1e-5.
The measurement is recorded in the metadata (``extra["onnxslim"]``).
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from mrkd.errors import SettingError
from mrkd.export import ort

LATENCY_TOLERANCE = 1.05     # timing noise on a busy 2-core box is a few per cent
OUTPUT_TOLERANCE = 1e-5


def _interleaved_latency(sessions, batch: np.ndarray, repeats: int):
    """Best-of-``repeats`` latency of each session, timed alternately: on a shared machine the minimum
    is the least load-dependent estimate, and alternating makes load spikes hit both alike."""
    for session in sessions:
        ort.run(session, batch)
    samples = [[] for _ in sessions]
    for _ in range(repeats):
        for times, session in zip(samples, sessions):
            times.append(ort.median_latency(session, batch, repeats=1))
    return [float(np.min(times)) for times in samples]


def maybe_simplify(proto, batch: np.ndarray, mode: str = "auto", repeats: int = 7):
    """Return (model to keep, record). mode: "auto" (measure and decide), "always", "never"."""
    if mode not in ("auto", "always", "never"):
        raise SettingError(f"simplify mode must be auto|always|never, got {mode!r}")
    record: Dict[str, object] = {"mode": mode, "kept": False}
    if mode == "never":
        record["nodes_before"] = len(proto.graph.node)
        return proto, record
    from mrkd.deps import require
    onnxslim = require("onnxslim")
    import onnx
    slim = onnxslim.slim(onnx.load_from_string(proto.SerializeToString()))
    before = ort.cpu_session(proto.SerializeToString(), threads=1)
    after = ort.cpu_session(slim.SerializeToString(), threads=1)
    out_before, out_after = ort.run(before, batch), ort.run(after, batch)
    latency_before, latency_after = _interleaved_latency([before, after], batch, repeats)
    nodes_before, nodes_after = len(proto.graph.node), len(slim.graph.node)
    max_diff = max(float(np.max(np.abs(out_before[k] - out_after[k]))) for k in out_before)
    record.update(nodes_before=nodes_before, nodes_after=nodes_after,
                  latency_before_ms=round(latency_before * 1e3, 3), latency_after_ms=round(latency_after * 1e3, 3),
                  max_output_change=max_diff, onnxslim_version=getattr(onnxslim, "__version__", "?"))
    helps = nodes_after <= nodes_before and latency_after <= latency_before * LATENCY_TOLERANCE
    keep = max_diff <= OUTPUT_TOLERANCE and (mode == "always" or helps)
    record["kept"] = bool(keep)
    return (slim if keep else proto), record
