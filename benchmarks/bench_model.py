"""Model throughput and latency per backend, against the official-style baseline in the same process.

Backends: the baseline (benchmarks/baseline_pipeline.py), PyTorch eager FP32 with our fused head,
ONNX Runtime (every available execution provider; FP32 and INT8), PyTorch FP16 with the FP32 head
(+ CUDA graphs) where a GPU exists, and the TensorRT engine where TensorRT exists.
FLOPs per image are counted with torch's FlopCounterMode (multiply-add = 2 FLOPs).

    python -m mrkd.benchmarks.bench_model [--quick] [--backbone wide_resnet50_2] [--image-size 256]
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from mrkd.benchmarks.timing import gflop_per_image, measure
from mrkd.runtime.calibration import Calibration


def count_gflops(model, image_size: int) -> Dict[str, float]:
    return {"teacher_gflop": gflop_per_image(model.teacher, image_size),
            "model_gflop": gflop_per_image(model.anomaly_map, image_size)}


def peak_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """The CPU's attainable FP32 GFLOP/s: a large square matmul on ONNX Runtime's MLAS GEMM (the
    kernels the model runs on; faster here than torch.mm) with ``threads`` intra-op threads."""
    import numpy as np
    from onnx import TensorProto, helper

    from mrkd.runtime.backends.onnxruntime_backend import ort_session
    tensors = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in "ABC"]
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "peak", tensors[:2], tensors[2:])
    session = ort_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                          ["cpu"], threads)
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    stats = measure(lambda: session.run(None, {"A": a, "B": a}), warmup=1, repeats=repeats)
    return 2 * n ** 3 / (stats["min_ms"] * 1e-3) / 1e9


def int8_instructions() -> List[str]:
    """The CPU's integer dot-product extensions (ORT's INT8 GEMM uses VNNI when present)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "avx512bw", "avx2"})


def bench_data(image_size: int, workdir: Path, quick: bool) -> Path:
    """A synthetic category at the model size: train/good calibrates INT8, test/ (44 images: 24 good,
    4 of each of 5 defect types; 9 in quick mode) measures INT8-vs-FP32 decision agreement."""
    from mrkd.train.synthetic import generate_dataset
    root = workdir / "data"
    generate_dataset(root, ["grain"], image_size=image_size, n_train=8 if quick else 32,
                     n_test_good=4 if quick else 24, n_test_defect=1 if quick else 4, seed=0, progress=False)
    return root / "grain"


def test_batch(category_dir: Path, image_size: int, mean, std):
    import numpy as np

    from mrkd.runtime.images import list_images, read_image
    from mrkd.runtime.preprocess import normalize_batch, resize_square
    paths = list_images(category_dir / "test", recursive=True)
    return normalize_batch([resize_square(read_image(p), image_size) for p in paths], mean, std).astype(np.float32)


def _ort_rows(model, batches: List[int], threads: int, repeats: int, workdir: Path, quick: bool) -> List[dict]:
    """Export FP32 and INT8 (static quantisation calibrated on good images, one graph per INT8
    target: "tensorrt" = symmetric QDQ, "cpu" = ORT's fastest x86 form) and time ONNX Runtime on
    every execution provider it offers, with the runtime's session options; each INT8 graph's
    decisions are compared with FP32 on the test images."""
    import numpy as np
    import onnxruntime as ort

    from mrkd.export.exporter import export_onnx
    from mrkd.export.int8 import INT8_TARGETS, quantize_int8
    from mrkd.export.onnx_graph import ExportOptions
    from mrkd.export.ort import run as run_graph
    from mrkd.export.parity import scores_from_outputs
    from mrkd.runtime.backends.onnxruntime_backend import ort_session
    from mrkd.runtime.metadata import ModelMetadata, sidecar_path

    image_size = model.config.image_size
    category = bench_data(image_size, workdir, quick)
    options = ExportOptions(batch_range=(1, 1, max(batches)))
    paths = {"fp32": export_onnx(model, workdir / "fp32.onnx", options, simplify="auto").path}
    rows: List[dict] = []
    kept_fp32 = {}   # precision -> which teacher layers quantize_int8's "auto" kept FP32
    for target in INT8_TARGETS:
        precision = f"int8-{target}"
        try:
            quantised = quantize_int8(paths["fp32"], workdir / f"{precision}.onnx",
                                      category / "train" / "good", target=target)
            paths[precision] = quantised.path
            kept_fp32[precision] = quantised.metadata.int8.keep_fp32_chosen
        except Exception as exc:  # reported, not hidden
            rows.append({"backend": f"onnxruntime-{precision}", "error": f"{type(exc).__name__}: {exc}"})
    images = test_batch(category, image_size, model.config.mean, model.config.std)
    scores = {}
    for precision, onnx_path in paths.items():
        for provider in ort.get_available_providers():
            if provider in ("TensorrtExecutionProvider", "AzureExecutionProvider"):
                continue
            session = ort_session(onnx_path, [provider], threads)
            name = session.get_inputs()[0].name
            if provider == "CPUExecutionProvider":
                # finished as the runtime finishes them, whatever the graph's output layout
                metadata = ModelMetadata.load(sidecar_path(onnx_path))
                scores[precision] = np.concatenate([scores_from_outputs(run_graph(session, images[i:i + 1]), metadata)
                                                    for i in range(len(images))])
            for batch in batches:
                x = np.ascontiguousarray(np.resize(images, (batch,) + images.shape[1:]))
                stats = measure(lambda: session.run(None, {name: x}), warmup=1, repeats=repeats)
                rows.append({"backend": f"onnxruntime-{provider.replace('ExecutionProvider', '').lower()}-{precision}",
                             "batch": batch, **stats, "images_per_s": 1e3 * batch / stats["median_ms"]})
    threshold = Calibration.threshold_of(model.calibration, "model calibration")
    rule = "calibrated threshold"
    if threshold is None:  # an uncalibrated model: the median FP32 score, the hardest place to agree
        threshold, rule = float(np.median(scores["fp32"])), "median FP32 score (no calibration)"
    for precision in (p for p in scores if p.startswith("int8")):
        agree = float(np.mean((scores["fp32"] >= threshold) == (scores[precision] >= threshold)))
        rows.append({"backend": f"{precision}-vs-fp32 decisions", "images": int(len(images)),
                     "threshold_rule": rule, "threshold": float(threshold), "decision_agreement": agree,
                     "fp32_flagged": int(np.sum(scores["fp32"] >= threshold)),
                     "teacher_front_fp32": kept_fp32.get(precision) == "front",
                     "max_abs_score_diff": float(np.max(np.abs(scores["fp32"] - scores[precision])))})
    return rows


def load_or_build(checkpoint: Optional[str], backbone: str, image_size: int):
    from mrkd.train import build_model, load_checkpoint
    if checkpoint:
        return load_checkpoint(checkpoint).eval()
    return build_model(backbone, "random", image_size=image_size).eval()


def run(quick: bool = False, backbone: Optional[str] = None, image_size: Optional[int] = None,
        batch_n: Optional[int] = None, threads: int = 2, checkpoint: Optional[str] = None) -> dict:
    """``checkpoint``: time (and check INT8 agreement on) a trained model instead of a random one.
    ``backbone``/``image_size`` not given: wide_resnet50_2 at 256 px (resnet18 at 64 px when ``quick``)."""
    import torch

    from mrkd.benchmarks.baseline_pipeline import official_style_score

    backbone = backbone or ("resnet18" if quick else "wide_resnet50_2")
    image_size = image_size or (64 if quick else 256)
    batch_n = batch_n or (2 if quick else 8)
    repeats = 3 if quick else 5
    torch.set_num_threads(threads)
    model = load_or_build(checkpoint, backbone, image_size)
    backbone, image_size = model.config.backbone, model.config.image_size
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
            rows += _ort_rows(model, [1, batch_n], threads, repeats, Path(tmp), quick)
        except ImportError as exc:
            rows.append({"backend": "onnxruntime", "error": str(exc)})

    if torch.cuda.is_available():
        rows += _gpu_rows(model, image_size, [1, batch_n], repeats)

    flops = count_gflops(model, image_size)
    peak = peak_gflops(threads)
    baseline_ips = rows[0]["images_per_s"]
    for row in rows:
        if "images_per_s" in row:
            row["speedup_vs_baseline"] = row["images_per_s"] / baseline_ips
            # INT8 rows count the same FP32-equivalent FLOPs, so their "efficiency" can pass 1.
            row["gflops_per_s"] = row["images_per_s"] * flops["model_gflop"]
            row["efficiency"] = row["gflops_per_s"] / peak
    return {"bench": "model", "backbone": backbone, "image_size": image_size, "threads": threads,
            **flops, "peak_gflops": peak, "peak_method": "ONNX Runtime FP32 MatMul 2048x2048, best run",
            "int8_instructions": int8_instructions(), "rows": rows}


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
    from mrkd.benchmarks.module_main import benchmark_main
    benchmark_main(__doc__, run)
