"""mrkd.export: checkpoint → one fused ONNX graph (+ FP16 / INT8 variants) → TensorRT engine / Triton.

Library first (each function one step); `mrkd export` is a thin layer over ``export_checkpoint``::

    from mrkd.export import ExportOptions, export_onnx, load_model, parity_report
    model, checkpoint_sha = load_model("runs/grain/last.ckpt")
    options = ExportOptions(uint8_input=True, batch_range=(1, 2, 8))
    exported = export_onnx(model, "out/model.onnx", options, checkpoint_sha256=checkpoint_sha)
    print(parity_report(model, exported.path, options).check().format())

Modules are imported on first attribute access, so `import mrkd.export` stays cheap.
"""

from __future__ import annotations

import importlib

_API = {
    "ExportOptions": "onnx_graph", "ExportError": "onnx_graph", "ExportGraph": "onnx_graph",
    "trace_to_onnx": "onnx_graph", "parse_batch_range": "onnx_graph", "output_names": "onnx_graph",
    "read_onnx_props": "onnx_graph", "MIN_OPSET": "onnx_graph",
    "ExportedModel": "exporter", "export_onnx": "exporter", "load_model": "exporter",
    "build_metadata": "model_metadata", "file_sha256": "model_metadata",
    "maybe_simplify": "simplify",
    "parity_report": "parity", "torch_reference": "parity", "compare": "parity", "Comparison": "parity",
    "ParityError": "parity", "FP32_TOLERANCE": "parity",
    "fp16_options": "fp16", "fp16_fidelity_report": "fp16", "run_fp16_on_cpu": "fp16", "TENSORRT_SUPPORT": "fp16",
    "quantize_int8": "int8", "int8_agreement_report": "int8", "int8_image_paths": "int8", "load_images": "int8",
    "BuildSettings": "tensorrt_build", "build_engine": "tensorrt_build", "TensorRTUnavailableError": "tensorrt_build",
    "require_tensorrt": "tensorrt_build", "tensorrt_unavailable_reason": "tensorrt_build",
    "backend_agreement_report": "int8", "default_int8_target": "int8",
    "engine_metadata": "engine_meta", "check_engine_compatible": "engine_meta",
    "EngineIncompatibleError": "engine_meta",
    "write_triton_repository": "triton", "model_config": "triton",
    "export_checkpoint": "pipeline", "ExportResult": "pipeline",
    "check_bf16": "precision_check", "bf16_unavailable_reason": "precision_check",
}

__all__ = sorted(_API)


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'mrkd.export' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mrkd.export.{_API[name]}"), name)
