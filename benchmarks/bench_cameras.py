"""Many cameras: 4 cameras sharing one EfficientNet-Lite0 model, three ways, in one run.

* ``one process, batched``: ``run_line`` with one loaded model; the cameras' newest frames are scored
  in one call per round (the shipped behaviour).
* ``one process, unbatched``: the same loop scoring each camera's frame in its own call.
* ``4 processes``: four single-camera ``run_stream`` processes, each loading its own copy of the model
  (what users do today), started together after each loaded its model.

Each is measured with the files played as fast as they are read (throughput) and replayed at a fixed
rate per camera (a live line; the rate is half what the slowest configuration sustained, so all keep
up and the latency is what differs; at most 30 s each). Reported: total frames/s over the 4 cameras, p50/p99 latency
from a frame's arrival to its result, CPU time per frame (all threads of all processes: what a
shared, loaded machine cannot skew by giving four processes four shares of the CPU), and ratios
against the batched process. Every process gets
``threads`` ONNX Runtime threads (the setting a user would pass to each).

    python -m mrkd.benchmarks.bench_cameras [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from mrkd.runtime.outputs.base import LineObserver

CAMERAS = 4
FRAME_SIZE = (640, 480)      # VGA camera frames; the model resizes them
FIXED_RATE_SECONDS = 30      # length of each fixed-rate replay
NO_ALARM = 1e9               # speed only: no alarm, so no snapshot writing in any configuration


def write_videos(folder: Path, frames: int) -> List[Path]:
    """One MJPG clip per camera of textured frames (a different texture per camera)."""
    import cv2
    paths = []
    for camera in range(CAMERAS):
        rng = np.random.default_rng(camera)
        textures = [cv2.GaussianBlur(rng.integers(60, 200, (FRAME_SIZE[1], FRAME_SIZE[0], 3), dtype=np.uint8),
                                     (5, 5), 0) for _ in range(8)]
        path = folder / f"cam{camera}.avi"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, FRAME_SIZE)
        for index in range(frames):
            writer.write(textures[index % len(textures)])
        writer.release()
        paths.append(path)
    return paths


def export_lite0(folder: Path, image_size: int, checkpoint: Optional[str]) -> Path:
    """An EfficientNet-Lite0 MRKD model (random weights unless ``checkpoint``) exported to ONNX."""
    import torch

    from mrkd.benchmarks.bench_model import load_or_build
    from mrkd.export.exporter import export_onnx
    from mrkd.export.onnx_graph import ExportOptions
    torch.manual_seed(0)
    model = load_or_build(checkpoint, "efficientnet_lite0", image_size)
    return export_onnx(model, folder / "lite0.onnx", ExportOptions(batch_range=(1, CAMERAS, 16))).path


class _Latencies(LineObserver):
    """Keeps every frame's arrival-to-result latency."""

    def __init__(self):
        self.values: List[float] = []

    def on_frame(self, result):
        self.values.append(result.latency_s)


def _warm(detector) -> None:
    frame = np.full((FRAME_SIZE[1], FRAME_SIZE[0], 3), 128, np.uint8)
    for count in (1, CAMERAS):
        detector([frame] * count)


def score_cameras(model: Path, videos, threads: int, fps: Optional[float], batched: bool,
                  max_frames: Optional[int] = None) -> dict:
    """One process running ``videos`` as cameras; frames, seconds, every latency, detector calls."""
    from mrkd.runtime.detector import Detector
    from mrkd.runtime.line.loop import Camera, Line, run_line
    detector = Detector(model, backend="onnxruntime", threads=threads)
    _warm(detector)
    line = Line(tuple(Camera(Path(v).stem, str(v), str(model), threshold=NO_ALARM, cooldown=0, fps=fps)
                      for v in videos))
    latencies = _Latencies()
    started, cpu_started = time.perf_counter(), time.process_time()
    summary = run_line(line, observers=[latencies], detectors={str(Path(model).resolve()): detector},
                       cross_camera_batching=batched, status=lambda text: None, max_frames=max_frames)
    seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    detector.close()
    return {"frames": summary["frames"], "seconds": seconds, "cpu_s": cpu_s, "latencies": latencies.values,
            "frames_per_call": summary["frames_per_call"]}


def _worker(args: dict) -> None:
    """A single-camera process: load, warm up, say READY, wait for GO, score, print the result."""
    from mrkd.runtime.detector import Detector
    from mrkd.runtime.line.loop import Camera, Line, run_line
    detector = Detector(args["model"], backend="onnxruntime", threads=args["threads"])
    _warm(detector)
    line = Line((Camera("cam", args["video"], args["model"], threshold=NO_ALARM, cooldown=0, fps=args["fps"]),))
    latencies = _Latencies()
    print("READY", flush=True)
    sys.stdin.readline()
    started, cpu_started = time.perf_counter(), time.process_time()
    summary = run_line(line, observers=[latencies], detectors={str(Path(args["model"]).resolve()): detector},
                       status=lambda text: None, max_frames=args["max_frames"])
    print(json.dumps({"frames": summary["frames"], "started": started, "ended": time.perf_counter(),
                      "cpu_s": time.process_time() - cpu_started, "latencies": latencies.values}), flush=True)


def score_processes(model: Path, videos, threads: int, fps: Optional[float], max_frames: Optional[int] = None) -> dict:
    """One process per camera, all released at once; seconds from the release to the last one's end."""
    procs = [subprocess.Popen([sys.executable, "-m", "mrkd.benchmarks.bench_cameras", "--worker",
                               json.dumps({"model": str(model), "video": str(v), "threads": threads, "fps": fps,
                                           "max_frames": max_frames})],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for v in videos]
    try:
        for proc in procs:
            if proc.stdout.readline().strip() != "READY":
                raise RuntimeError("a camera process failed to start")
        for proc in procs:
            proc.stdin.write("GO\n")
            proc.stdin.flush()
        results = [json.loads(proc.stdout.readline()) for proc in procs]
    finally:
        for proc in procs:
            proc.wait(timeout=600)
    # perf_counter is CLOCK_MONOTONIC on Linux: comparable across processes.
    seconds = max(r["ended"] for r in results) - min(r["started"] for r in results)
    return {"frames": sum(r["frames"] for r in results), "seconds": seconds, "cpu_s": sum(r["cpu_s"] for r in results),
            "latencies": [v for r in results for v in r["latencies"]], "frames_per_call": 1.0}


def _row(name: str, mode: str, measured: dict) -> dict:
    latencies = np.asarray(measured["latencies"]) * 1e3
    return {"config": name, "replay": mode, "frames": measured["frames"],
            "total_fps": measured["frames"] / measured["seconds"],
            "cpu_ms_per_frame": 1e3 * measured["cpu_s"] / measured["frames"],
            "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)),
            "frames_per_call": round(measured["frames_per_call"], 2)}


def run(quick: bool = False, image_size: Optional[int] = None, threads: int = 2,
        checkpoint: Optional[str] = None) -> dict:
    image_size = image_size or (64 if quick else 256)
    frames = 8 if quick else 100
    configs = {"one process, batched": lambda fps, n: score_cameras(model, videos, threads, fps, True, n),
               "one process, unbatched": lambda fps, n: score_cameras(model, videos, threads, fps, False, n),
               f"{CAMERAS} processes": lambda fps, n: score_processes(model, videos, threads, fps, n)}
    rows: List[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = export_lite0(folder, image_size, checkpoint)
        videos = write_videos(folder, frames)
        for name, measure in configs.items():
            rows.append(_row(name, "as fast as possible", measure(None, None)))
        rate = max(0.1, round(0.5 * min(r["total_fps"] for r in rows) / CAMERAS, 1))
        replayed = min(frames, max(4, int(rate * FIXED_RATE_SECONDS)))     # a slow machine: fewer frames
        for name, measure in configs.items():
            rows.append(_row(name, f"{rate:g} fps per camera", measure(rate, replayed)))
    for row in rows:
        base = next(r for r in rows if r["replay"] == row["replay"] and r["config"] == "one process, batched")
        row["fps_vs_batched"] = row["total_fps"] / base["total_fps"]
        row["p99_vs_batched"] = row["p99_ms"] / base["p99_ms"]
        row["cpu_per_frame_vs_batched"] = row["cpu_ms_per_frame"] / base["cpu_ms_per_frame"]
    return {"bench": "cameras", "backbone": "efficientnet_lite0", "image_size": image_size, "cameras": CAMERAS,
            "frames_per_camera": frames, "frame_size": list(FRAME_SIZE), "threads": threads,
            "fixed_rate_fps_per_camera": rate, "rows": rows}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(json.loads(sys.argv[2]))
    else:
        from mrkd.benchmarks.module_main import benchmark_main
        benchmark_main(__doc__, run)
