"""End to end: a video file through the runtime (decode → pre-process → model → post-process → alarm)
against the official-style pipeline on the same frames, in the same process.

Baseline per frame: OpenCV decode, the official PIL resize/crop + ToTensor/Normalize, PyTorch eager
FP32 model, per-scale maps to numpy, scipy Gaussian, max, threshold.
Ours: ``mrkd.runtime.run_stream`` over ``open_source(video)`` with the exported model on ONNX Runtime
(FP32, and both INT8 targets when quantisation works), alarms and events on. Then FP32 again with ONNX
Runtime's threads left spinning after each run (ORT's own default, mrkd's before) and once more as
shipped, alternated, so the cost or gain of putting them to sleep between frames is measured in one run.

    python -m mrkd.benchmarks.bench_end_to_end [--quick]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import List, Optional

FRAME_SIZE = (640, 480)   # a VGA camera frame; the model resizes it


def write_video(category_dir: Path, path: Path, frames: int) -> int:
    """The category's test images, scaled to VGA, cycled into an MJPG video of ``frames`` frames."""
    import cv2

    from mrkd.runtime.images import read_image
    images = [cv2.resize(read_image(p), FRAME_SIZE) for p in sorted((category_dir / "test").rglob("*.png"))]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, FRAME_SIZE)
    for index in range(frames):
        writer.write(images[index % len(images)])
    writer.release()
    return frames


def baseline_fps(model, video: Path, threshold: float) -> dict:
    import cv2

    from mrkd.benchmarks.baseline_pipeline import official_style_preprocess, official_style_score
    capture = cv2.VideoCapture(str(video))
    frames, started = 0, time.perf_counter()
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        _, score = official_style_score(model, official_style_preprocess(frame, model.config.image_size))
        _ = score >= threshold
        frames += 1
    seconds = time.perf_counter() - started
    capture.release()
    return {"backend": "baseline (official-style)", "frames": frames, "fps": frames / seconds}


def runtime_fps(onnx_path: Path, video: Path, threshold: float, threads: int, workdir: Path, label: str,
                spin_after_run: bool = False) -> dict:
    from mrkd.runtime.backends.onnxruntime_backend import ort_session
    from mrkd.runtime.line.alarms import AlarmPolicy
    from mrkd.runtime.detector import Detector
    from mrkd.runtime.outputs import OutputSettings, build_outputs
    from mrkd.runtime.sources import open_source
    from mrkd.runtime.line.stream import run_stream

    detector = Detector(onnx_path, backend="onnxruntime", threads=threads, threshold=threshold)
    if spin_after_run:   # ORT's default: the same session options but for the threads' sleep
        backend = detector.backend
        backend.session = ort_session(backend.model_path, backend.providers, threads, spin_after_run=True)
    started = time.perf_counter()
    summary = run_stream(detector, open_source(str(video)), AlarmPolicy(threshold, (1, 1)),
                         build_outputs(OutputSettings(events=str(workdir / f"events_{label}.jsonl"),
                                                      snapshots=str(workdir / f"snapshots_{label}"))),
                         status=lambda line: None)
    seconds = time.perf_counter() - started
    latency = summary["latency_ms"]
    frame_ms = 1e3 * seconds / max(summary["frames"], 1)
    return {"backend": f"mrkd run, onnxruntime {label}", "frames": summary["frames"],
            "fps": summary["frames"] / seconds, "alarms": summary["alarms"],
            **{f"{stage}_p50_ms": v["p50"] for stage, v in latency.items()},
            **{f"{stage}_p99_ms": v["p99"] for stage, v in latency.items()},
            "share_outside_model": max(0.0, 1.0 - latency["infer"]["p50"] / frame_ms)}


def run(quick: bool = False, backbone: Optional[str] = None, image_size: Optional[int] = None, threads: int = 2,
        checkpoint: Optional[str] = None) -> dict:
    import numpy as np
    import torch

    from mrkd.benchmarks.bench_model import bench_data, load_or_build, test_batch
    from mrkd.export.exporter import export_onnx
    from mrkd.runtime.calibration import Calibration
    from mrkd.export.int8 import INT8_TARGETS, quantize_int8
    from mrkd.export.onnx_graph import ExportOptions

    backbone = backbone or ("resnet18" if quick else "wide_resnet50_2")    # a checkpoint brings its own
    image_size = image_size or (64 if quick else 256)
    frames = 12 if quick else 40
    torch.set_num_threads(threads)
    model = load_or_build(checkpoint, backbone, image_size)
    rows: List[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        category = bench_data(model.config.image_size, workdir, quick)
        video = workdir / "frames.avi"
        write_video(category, video, frames)
        threshold = Calibration.threshold_of(model.calibration, "model calibration")
        if threshold is None:   # uncalibrated: the median score of the test images
            threshold = float(np.median(model.scores(torch.from_numpy(
                test_batch(category, model.config.image_size, model.config.mean, model.config.std))).numpy()))
        models = {"fp32": export_onnx(model, workdir / "fp32.onnx", ExportOptions(batch_range=(1, 1, 4))).path}
        for target in INT8_TARGETS:   # "tensorrt" (symmetric QDQ) and "cpu" (ORT's fastest x86 form)
            label = f"int8-{target}"
            try:
                models[label] = quantize_int8(models["fp32"], workdir / f"{label}.onnx",
                                              category / "train" / "good", target=target).path
            except Exception as exc:
                rows.append({"backend": f"mrkd run, onnxruntime {label}", "error": f"{type(exc).__name__}: {exc}"})
        rows.insert(0, baseline_fps(model, video, threshold))
        for label, path in models.items():
            rows.append(runtime_fps(path, video, threshold, threads, workdir, label))
        rows.append(runtime_fps(models["fp32"], video, threshold, threads, workdir, "fp32-spinning-after-run",
                                spin_after_run=True))
        rows.append(runtime_fps(models["fp32"], video, threshold, threads, workdir, "fp32-again"))
    for row in rows:
        if "fps" in row:
            row["speedup_vs_baseline"] = row["fps"] / rows[0]["fps"]
    return {"bench": "end_to_end", "backbone": model.config.backbone, "image_size": model.config.image_size,
            "frame_size": list(FRAME_SIZE), "frames": frames, "threads": threads, "rows": rows}


if __name__ == "__main__":
    from mrkd.benchmarks.module_main import benchmark_main
    benchmark_main(__doc__, run)
