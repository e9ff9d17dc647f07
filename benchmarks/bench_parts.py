"""Triggered inspection: trigger-to-verdict latency of software-triggered parts from a GigE Vision
camera (Aravis' simulator over UDP on loopback, 512×512 Mono8) judged by an EfficientNet-Lite0 model
(random weights: speed only) at 256 px on the CPU, next to the model's own latency in the same run.

* ``model``: the Detector alone on the camera's 512×512 frame (pre-processing, inference,
  post-processing), one call after each part (interleaved, so load on a shared machine hits both
  alike): the baseline.
* ``parts``: ``PartRunner`` over ``gige://`` with ``--trigger software``; each part is triggered when
  the previous verdict arrived (no queue wait), so trigger -> verdict is one part's whole path:
  trigger command over GVCP, the simulator's image over GVSP, conversion, model, verdict, observers.
  Also reported: trigger -> image in hand, image -> verdict (model plus what mrkd adds), that
  overhead beyond each part's own model time, and the part rate this sustains (baseline calls
  excluded).

The simulator looks for a software trigger 25 times a second (Aravis' fixed trigger_frequency),
so its image comes 0-40 ms after the trigger, whatever mrkd does: the goal "p99 within the model's
latency + 10 ms" is checked on image -> verdict (mrkd's share) and shown for the whole path too.

    python -m mrkd.benchmarks.bench_parts [--quick]      (mrkd bench --only parts)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from mrkd.runtime.outputs.base import LineObserver

ADDRESS = "127.0.86.30"          # its own loopback address: the tests' simulators use others
GOAL_MARGIN_MS = 10.0


def _percentiles(values_s: List[float]) -> dict:
    ms = np.asarray(values_s) * 1000.0
    return {"p50": round(float(np.percentile(ms, 50)), 2), "p99": round(float(np.percentile(ms, 99)), 2),
            "mean": round(float(ms.mean()), 2)}


class _Parts(LineObserver):
    def __init__(self):
        self.parts = []

    def on_part(self, result):
        self.parts.append(result)


def export_lite0(folder: Path, image_size: int) -> Path:
    """Random-weight Lite0 exported to ONNX (batch 1..4)."""
    import torch

    from mrkd.benchmarks.bench_model import load_or_build
    from mrkd.export.exporter import export_onnx
    from mrkd.export.onnx_graph import ExportOptions
    torch.manual_seed(0)
    model = load_or_build(None, "efficientnet_lite0", image_size)
    return export_onnx(model, folder / "lite0.onnx", ExportOptions(batch_range=(1, 1, 4))).path


def model_latency(detector, frame: np.ndarray, calls: int) -> List[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        detector([frame])
        times.append(time.perf_counter() - start)
    return times


def run(quick: bool = False, image_size: Optional[int] = None, threads: int = 2) -> dict:
    from mrkd.benchmarks.fake_gige import FakeGigeCamera
    from mrkd.runtime.detector import Detector
    from mrkd.runtime.line.loop import Camera, Line
    from mrkd.runtime.line.parts import PartRunner, open_part_sources
    from mrkd.runtime.line.trigger import PartSettings

    image_size = image_size or (64 if quick else 256)
    parts = 20 if quick else 200
    with tempfile.TemporaryDirectory() as tmp, FakeGigeCamera(ADDRESS, "BENCH") as camera:
        model = export_lite0(Path(tmp), image_size)
        detector = Detector(model, threads=threads)
        line = Line((Camera("cam", camera.uri, str(model), threshold=1e9, trigger="software"),))
        settings = PartSettings(queue=1, timeout=2.0)
        recorder = _Parts()
        runner = PartRunner(line, open_part_sources(line, settings), settings,
                            detectors={str(Path(model).resolve()): detector}, observers=[recorder]).start()
        try:
            frame = camera_frame(runner)
            model_latency(detector, frame, 3)
            baseline, busy = [], 0.0
            started = time.perf_counter()
            for i in range(parts):
                runner.trigger(f"B{i}")
                deadline = time.monotonic() + 5.0
                while len(recorder.parts) < i + 1 and time.monotonic() < deadline:
                    time.sleep(0.0005)
                # The baseline interleaved with the parts: a shared machine's load changes both alike.
                mark = time.perf_counter()
                baseline += model_latency(detector, frame, 1)[-1:]
                busy += time.perf_counter() - mark
            elapsed = time.perf_counter() - started - busy
            model_in_parts = list(runner.latency["model"].values)
        finally:
            summary = runner.stop()
            detector.close()
    judged = recorder.parts
    errors = [p for p in judged if p.verdict == "ERROR"]
    scored = [p for p in judged if p.verdict != "ERROR"]
    model_ms = _percentiles(baseline)
    overhead = [p.verdict_s - p.acquired_s - m for p, m in zip(scored, model_in_parts)]
    trigger_to_verdict = _percentiles([p.verdict_s for p in scored])
    image_to_verdict = _percentiles([p.verdict_s - p.acquired_s for p in scored])
    return {"bench": "parts", "backbone": "efficientnet_lite0", "image_size": image_size, "threads": threads,
            "camera": "arv-fake-gv-camera-0.8 on loopback, 512x512 Mono8, software trigger",
            "parts": len(judged), "errors": len(errors), "model_ms": model_ms,
            "trigger_to_image_ms": _percentiles([p.acquired_s for p in scored]),
            "image_to_verdict_ms": image_to_verdict, "trigger_to_verdict_ms": trigger_to_verdict,
            "model_in_parts_ms": _percentiles(model_in_parts),
            "overhead_beyond_model_ms": _percentiles(overhead),
            "parts_per_s": round(len(judged) / elapsed, 2),
            "goal_image_to_verdict_p99_ms": round(model_ms["p99"] + GOAL_MARGIN_MS, 2),
            "goal_met_image_to_verdict": image_to_verdict["p99"] <= model_ms["p99"] + GOAL_MARGIN_MS,
            "goal_met_trigger_to_verdict": trigger_to_verdict["p99"] <= model_ms["p99"] + GOAL_MARGIN_MS,
            "missed_triggers": summary["missed_triggers"],
            "camera_stats": summary["cameras"]["cam"]["source"]}


def camera_frame(runner) -> np.ndarray:
    """One image from the camera (for timing the model on what the camera delivers)."""
    grab = runner.cameras[0].grabber.grab(time.monotonic(), 2.0)
    if grab.error:
        raise RuntimeError(f"the simulated camera gave no image: {grab.error}")
    return grab.images[0]


if __name__ == "__main__":
    from mrkd.benchmarks.module_main import benchmark_main
    benchmark_main(__doc__, run)
