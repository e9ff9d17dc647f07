"""Which backend on a CPU: ms/frame of the whole Detector (pre-processing, inference, post-processing) at
batch 1 for ONNX Runtime FP32 (the baseline) vs OpenVINO fp32, OpenVINO bf16 (where the CPU has native
bf16) and OpenVINO on our INT8 Q/DQ graph (the "cpu" form, the export's default without TensorRT), plus
ONNX Runtime on that INT8 graph; alternated call by call in one process, so load on the machine falls
on every row alike. No row may tax the next: the runtime's ONNX Runtime sessions put their threads to
sleep when a run returns (STOP_SPINNING_AFTER_RUN in runtime/backends/onnxruntime_backend.py; by
default ORT spins on for tens of ms, on the core the next row needs), each call starts after a short
pause, and every row reports the CPU its backend still burns after a call returns (busy_after_call_ms,
which should be near 0). Each row's decisions are compared with the ONNX Runtime FP32 row's on test images
at the median FP32 score (random weights have no calibration; the median is the hardest place to agree).

    python -m mrkd.benchmarks.bench_backends [--quick] [--backbone efficientnet_lite0] [--image-size 256]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from mrkd.benchmarks.timing import percentile

INT8_IMAGES = 16      # good images the INT8 graph's activation ranges are measured on
# Before each timed call, so that every call starts with every backend's threads asleep (as on a line
# whose frames come farther apart than that): longer than the ~1 ms OpenVINO's workers spin after a call.
PAUSE_S = 0.005
IDLE_WINDOW_S = 0.02  # how long after a call busy_after_call_ms watches the process's CPU time

PLAN = [("onnxruntime FP32 (baseline)", "fp32", "onnxruntime"), ("openvino fp32", "fp32", "openvino:fp32"),
        ("openvino bf16", "fp32", "openvino:bf16"), ("openvino INT8 graph (cpu form)", "int8", "openvino"),
        ("onnxruntime INT8 graph (cpu form)", "int8", "onnxruntime"),
        ("--backend auto (the default), FP32 graph", "fp32", "auto")]


def _frames(category: Path, image_size: int) -> List[np.ndarray]:
    from mrkd.runtime.images import list_images, read_image
    return [read_image(p) for p in list_images(category / "test", recursive=True)]


def _graphs(backbone: str, image_size: int, workdir: Path, quick: bool) -> Dict[str, Path]:
    """FP32 and INT8 ("cpu" form, keep_fp32 "auto" as `mrkd export --int8` makes it) graphs of a
    random-weight model; returns their paths and the synthetic category's folder."""
    from mrkd.benchmarks.bench_model import bench_data
    from mrkd.export.exporter import export_onnx
    from mrkd.export.int8 import quantize_int8
    from mrkd.export.onnx_graph import ExportOptions
    from mrkd.train import build_model
    model = build_model(backbone, "random", image_size=image_size).eval()
    category = bench_data(image_size, workdir, quick)
    fp32 = export_onnx(model, workdir / "model.onnx", ExportOptions(), simplify="never").path
    int8 = quantize_int8(fp32, workdir / "model_int8.onnx", category / "train" / "good",
                         limit=4 if quick else INT8_IMAGES, target="cpu").path
    return {"fp32": fp32, "int8": int8, "category": category}


def open_detectors(graphs: Dict[str, Path], threads: int, plan=PLAN):
    """A Detector per row of ``plan`` that this machine can run, and an error row for each one it cannot."""
    from mrkd.runtime.backends import backend_entry
    from mrkd.runtime.detector import Detector
    detectors, rows = {}, []
    for label, graph, spec in plan:
        if spec.startswith("openvino") and not backend_entry("openvino").available():
            rows.append({"backend": label, "error": "openvino not installed (pip install 'mrkd[openvino]')"})
            continue
        try:
            detector = Detector(graphs[graph], backend=spec, threads=threads,
                                providers=["cpu"] if spec == "onnxruntime" else None)
            detectors[label] = detector
        except Exception as exc:   # e.g. bf16 on a CPU without it: reported, not hidden
            rows.append({"backend": label, "error": f"{type(exc).__name__}: {exc}"})
    return detectors, rows


def busy_after_call_ms(detector, frame: np.ndarray, probes: int = 5, window_s: float = IDLE_WINDOW_S) -> float:
    """Median CPU time (ms) the process burns in the ``window_s`` after a call returns, while this
    thread sleeps: what a backend's threads left spinning would take from the row timed next."""
    spent = []
    for _ in range(probes):
        detector(frame)
        start = time.process_time()
        time.sleep(window_s)
        spent.append((time.process_time() - start) * 1e3)
    return float(np.median(spent))


def run(quick: bool = False, backbone: Optional[str] = None, image_size: Optional[int] = None, threads: int = 2,
        rounds: int = 0) -> dict:
    """``backbone``/``image_size`` not given: efficientnet_lite0 at 256 px (resnet18 at 64 px when ``quick``)."""
    import torch

    backbone = backbone or ("resnet18" if quick else "efficientnet_lite0")
    image_size = image_size or (64 if quick else 256)
    rounds = rounds or (3 if quick else 30)
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        graphs = _graphs(backbone, image_size, Path(tmp), quick)
        detectors, rows = open_detectors(graphs, threads)
        frames = _frames(graphs["category"], image_size)
        one = frames[0]
        times: Dict[str, List[float]] = {label: [] for label in detectors}
        for detector in detectors.values():      # warm-up: first calls allocate and pick kernels
            detector(one)
            detector(one)
        for _ in range(rounds):
            for label, detector in detectors.items():   # alternated: one call each per round
                time.sleep(PAUSE_S)
                start = time.perf_counter()
                detector(one)
                times[label].append((time.perf_counter() - start) * 1e3)
        scores = {label: np.array([detector(frame).scores[0] for frame in frames]) for label, detector in detectors.items()}
        busy = {label: busy_after_call_ms(detector, one) for label, detector in detectors.items()}
        reference_label = PLAN[0][0]
        reference = scores.get(reference_label)
        threshold = float(np.median(reference)) if reference is not None else None
        base_ms = float(np.median(times[reference_label])) if reference_label in times else None
        for label, detector in detectors.items():
            ms = float(np.median(times[label]))
            row = {"backend": label, "spec": detector.backend.name, "precision": detector.precision,
                   "describe": detector.backend.describe(), "batch": 1, "median_ms": ms,
                   "p90_ms": percentile(times[label], 90), "rounds": rounds,
                   "busy_after_call_ms": round(busy[label], 2)}
            if base_ms:
                row["speedup_vs_onnxruntime_fp32"] = base_ms / ms
            if reference is not None:
                row["decision_agreement_vs_fp32"] = float(np.mean((scores[label] >= threshold) == (reference >= threshold)))
                row["max_abs_score_diff_vs_fp32"] = float(np.max(np.abs(scores[label] - reference)))
            rows.append(row)
            detector.close()
    from mrkd.benchmarks.timing import machine_description
    return {"bench": "backends", "backbone": backbone, "image_size": image_size, "threads": threads,
            "images_for_agreement": len(frames), "agreement_threshold": "median ONNX Runtime FP32 score",
            "busy_after_call_window_ms": IDLE_WINDOW_S * 1e3,
            "machine": machine_description(), "rows": rows}


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the code runs, numbers mean nothing")
    parser.add_argument("--backbone", default=None, help="default efficientnet_lite0 (resnet18 with --quick)")
    parser.add_argument("--image-size", type=int, default=None, help="default 256 (64 with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every backend (default 2)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="alternated calls per row (default 30; 3 with --quick)")
    args = parser.parse_args()
    json.dump(run(args.quick, args.backbone, args.image_size, args.threads, args.rounds), sys.stdout, indent=2)
    print()
