"""Model throughput and latency per backend, against the official-style baseline in the same process.

Backends: the baseline (benchmarks/baseline_pipeline.py), PyTorch eager FP32 with our fused head,
ONNX Runtime (every available execution provider; FP32 and INT8), PyTorch FP16 with the FP32 head
(+ CUDA graphs) where a GPU exists, and the TensorRT engine where TensorRT exists.
FLOPs per image are counted with torch's FlopCounterMode (multiply-add = 2 FLOPs).

    python -m mrkd.benchmarks.bench_model [--quick] [--backbone wide_resnet50_2] [--image-size 256]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

from mrkd.benchmarks.timing import measure


def count_gflops(model, image_size: int) -> Dict[str, float]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, image_size, image_size)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model.teacher(x)
        teacher = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.anomaly_map(x)
        total = counter.get_total_flops()
    return {"teacher_gflop": teacher / 1e9, "model_gflop": total / 1e9}


def _ort_rows(model, image_size: int, batches: List[int], threads: int, repeats: int, workdir: Path,
              int8_images=None) -> List[dict]:
    """Export once and time ONNX Runtime on every execution provider it offers."""
    import numpy as np
    import onnxruntime as ort

    from mrkd.export import export_onnx

    rows = []
    ckpt = workdir / "bench.ckpt"
    model.save(ckpt)
    variants = {"fp32": export_onnx(ckpt, workdir / "fp32", batch_range=(1, 1, max(batches)))}
    if int8_images is not None:
        try:
            from mrkd.export import export_int8
            variants["int8"] = export_int8(ckpt, workdir / "int8", calibration_images=int8_images,
                                           batch_range=(1, 1, max(batches)))
        except Exception as exc:  # reported, not hidden
            rows.append({"backend": "onnxruntime-int8", "error": f"{type(exc).__name__}: {exc}"})
    for precision, artifact in variants.items():
        onnx_path = getattr(artifact, "onnx_path", artifact)
        for provider in ort.get_available_providers():
            if provider in ("TensorrtExecutionProvider", "AzureExecutionProvider"):
                continue
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            session = ort.InferenceSession(str(onnx_path), options, providers=[provider])
            name = session.get_inputs()[0].name
            for batch in batches:
                x = np.random.default_rng(0).standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
                stats = measure(lambda: session.run(None, {name: x}), warmup=1, repeats=repeats)
                rows.append({"backend": f"onnxruntime-{provider.replace('ExecutionProvider', '').lower()}-{precision}",
                             "batch": batch, **stats, "images_per_s": 1e3 * batch / stats["median_ms"]})
    return rows


def run(quick: bool = False, backbone: str = "wide_resnet50_2", image_size: int = 256,
        batch_n: int = 8, threads: int = 2) -> dict:
    import torch

    from mrkd.benchmarks.baseline_pipeline import official_style_score
    from mrkd.train import build_model

    if quick:
        backbone, image_size, batch_n = "resnet18", 64, 2
    repeats = 3 if quick else 5
    torch.set_num_threads(threads)
    model = build_model(backbone, "random", image_size=image_size).eval()
    rows: List[dict] = []

    one = torch.randn(1, 3, image_size, image_size)
    base = measure(lambda: official_style_score(model, one), warmup=1, repeats=repeats)
    rows.append({"backend": "baseline (official-style eager + scipy)", "batch": 1, **base,
                 "images_per_s": 1e3 / base["median_ms"]})
    for batch in (1, batch_n):
        x = torch.randn(batch, 3, image_size, image_size)
        stats = measure(lambda: model.anomaly_map(x), warmup=1, repeats=repeats)
        rows.append({"backend": "pytorch-eager-fp32", "batch": batch, **stats,
                     "images_per_s": 1e3 * batch / stats["median_ms"]})

    with tempfile.TemporaryDirectory() as tmp:
        try:
            rows += _ort_rows(model, image_size, [1, batch_n], threads, repeats, Path(tmp))
        except ImportError as exc:
            rows.append({"backend": "onnxruntime", "error": str(exc)})

    if torch.cuda.is_available():
        rows += _gpu_rows(model, image_size, [1, batch_n], repeats)

    baseline_ips = rows[0]["images_per_s"]
    for row in rows:
        if "images_per_s" in row:
            row["speedup_vs_baseline"] = row["images_per_s"] / baseline_ips
    return {"bench": "model", "backbone": backbone, "image_size": image_size, "threads": threads,
            **count_gflops(model, image_size), "rows": rows}


def _gpu_rows(model, image_size: int, batches: List[int], repeats: int) -> List[dict]:
    """FP16 teacher/student with the FP32 head, captured in a CUDA graph: the engine's stand-in."""
    import copy

    import torch

    from mrkd.benchmarks.baseline_pipeline import official_style_score

    rows = []
    fp32 = copy.deepcopy(model).cuda().eval()
    one = torch.randn(1, 3, image_size, image_size, device="cuda")
    base = measure(lambda: (official_style_score(fp32, one), torch.cuda.synchronize()), warmup=3, repeats=repeats * 4)
    rows.append({"backend": "baseline-gpu (official-style eager fp32 + scipy)", "batch": 1, **base,
                 "images_per_s": 1e3 / base["median_ms"]})
    fp16 = copy.deepcopy(model).cuda().eval()
    for part in (fp16.teacher, fp16.bottleneck, fp16.student):
        part.half()
    for batch in batches:
        static_in = torch.randn(batch, 3, image_size, image_size, device="cuda", dtype=torch.half)
        with torch.no_grad():
            for _ in range(3):  # warm up on a side stream before capture, as CUDA graphs require
                fp16.anomaly_map(static_in)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = fp16.anomaly_map(static_in)

        def replay():
            graph.replay()
            torch.cuda.synchronize()
            return static_out
        stats = measure(replay, warmup=5, repeats=repeats * 10)
        rows.append({"backend": "pytorch-fp16-fp32head-cudagraph", "batch": batch, **stats,
                     "images_per_s": 1e3 * batch / stats["median_ms"],
                     "speedup_vs_gpu_baseline": (1e3 * batch / stats["median_ms"]) / rows[0]["images_per_s"]})
    return rows


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
