"""FP16 export: a graph that carries its own types, for a strongly typed TensorRT network.

Teacher, bottleneck and student run in FP16 (weights and activations); their features are Cast to
FP32 explicitly and the whole head — norms, dot products, division, the sum of the maps, the
upsampling, the smoothing and the max — stays FP32: a sum of squares over 1024 channels of
features of magnitude ~20 is 4e5, far past FP16's 65504.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import numpy as np

from mrkd.export.onnx_graph import ExportOptions
from mrkd.export.parity import Comparison, compare, default_threshold, parity_inputs, scores_from_outputs, torch_reference

TENSORRT_SUPPORT = """\
TensorRT versions (facts from NVIDIA's TensorRT 10/11 Python API docs and migration guide):
* The FP16 graph is built as a STRONGLY TYPED network (NetworkDefinitionCreationFlag.STRONGLY_TYPED):
  every tensor keeps the type the ONNX graph gives it, so the FP32 head cannot be demoted to FP16.
  Supported: TensorRT 10.3+ (JetPack 6.x on Jetson Orin; the tensorrt wheel >= 10.3 on x86) and
  TensorRT 11, where strong typing is always on and the flag is accepted but ignored.
* Not used: the weakly typed route (BuilderFlag.FP16 / INT8 precision flags with precision
  constraints) — deprecated in TensorRT 10.12 and removed in TensorRT 11.
* INT8 is explicit quantisation (Q/DQ nodes in the ONNX graph); no implicit INT8 calibrator, which
  TensorRT 11 also removed.
* TensorRT 8.x (JetPack 5) is not supported: no strongly typed networks.
"""

# ORT's CPU EP stores every FP16 tensor in FP16 between operators (an FP16 Mul of 300·300 gives inf),
# so overflow shows exactly where a half-precision GPU would overflow; it was ~35x faster than PyTorch
# half on CPU for the same graph (resnet18, 64 px, batch 2: 0.09 s vs 3.0 s). PyTorch half is the fallback.
CPU_FP16_BACKENDS = ("onnxruntime-cpu", "torch-half-cpu")


def fp16_options(options: ExportOptions) -> ExportOptions:
    """The same graph settings with FP16 teacher/student."""
    return dataclasses.replace(options, precision="fp16")


def run_fp16_on_cpu(onnx_path, batch: np.ndarray, model=None,
                    options: Optional[ExportOptions] = None) -> Tuple[Dict[str, np.ndarray], str]:
    """Run the FP16 graph on a CPU backend that computes in half precision: (outputs, backend name).

    ONNX Runtime's CPU EP first; if it cannot run the graph and ``model``/``options`` are given,
    PyTorch half on CPU with the traced module itself."""
    from mrkd.export import ort
    try:
        return ort.runtime_outputs(onnx_path, batch), CPU_FP16_BACKENDS[0]
    except Exception as exc:  # onnxruntime raises its own exception classes (NOT_IMPLEMENTED, ...)
        if model is None or options is None:
            raise
        fallback_reason = f"{type(exc).__name__}: {exc}"
    import torch
    from mrkd.export.onnx_graph import ExportGraph, has_knn_map, output_names
    graph = ExportGraph(model, fp16_options(options)).eval()
    with torch.no_grad():
        result = graph(torch.from_numpy(batch))
    result = result if isinstance(result, tuple) else (result,)
    outputs = {name: t.float().numpy() for name, t in zip(output_names(options, has_knn_map(model)), result)}
    return outputs, f"{CPU_FP16_BACKENDS[1]} (onnxruntime failed: {fallback_reason[:200]})"


def fp16_fidelity_report(model, fp16_onnx_path, options: ExportOptions, batch: Optional[np.ndarray] = None,
                         threshold: Optional[float] = None, metadata=None) -> Comparison:
    """FP16 graph (run on a CPU half-precision backend) vs the FP32 PyTorch model: map error, score
    error, decision agreement. Not a pass/fail gate (FP16 differs by design); ``finite`` must hold."""
    if batch is None:
        batch = parity_inputs(model.config.image_size, options, n=4, seed=1)
    from mrkd.runtime.metadata import ModelMetadata, sidecar_path
    metadata = metadata or ModelMetadata.load(sidecar_path(fp16_onnx_path))   # the export passes its own
    reference = torch_reference(model, batch, options)
    candidate, backend = run_fp16_on_cpu(fp16_onnx_path, batch, model, options)
    threshold = default_threshold(model) if threshold is None else threshold
    if threshold is None:
        threshold = float(np.median(scores_from_outputs(reference, metadata)))
    report = compare(f"FP16 graph on {backend.split(' ')[0]} vs FP32 PyTorch", reference, candidate,
                     metadata, threshold)
    report.notes.append(f"backend: {backend}")
    scale = float(np.max(np.abs(scores_from_outputs(reference, metadata))))
    report.notes.append(f"relative score error {report.score_max_abs_diff / max(scale, 1e-12):.3g}")
    return report
