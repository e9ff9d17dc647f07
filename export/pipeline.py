"""The whole export as one library call (what `mrkd export` runs): each step is a function of its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from mrkd.export.exporter import export_onnx, load_model
from mrkd.export.fp16 import fp16_fidelity_report, fp16_options
from mrkd.export.int8 import int8_agreement_report, int8_image_paths, load_images, quantize_int8
from mrkd.export.onnx_graph import ExportError, ExportOptions
from mrkd.export.parity import Comparison, ParityError, parity_report
from mrkd.export.tensorrt_build import BuildSettings, TensorRTUnavailableError, build_engine
from mrkd.export.triton import write_triton_repository
from mrkd.runtime.metadata import sidecar_path

FP32_NAME, FP16_NAME, INT8_NAME, ENGINE_NAME = "model.onnx", "model_fp16.onnx", "model_int8.onnx", "model.engine"


@dataclass
class ExportResult:
    """Files written and reports computed by export_checkpoint."""

    files: Dict[str, Path] = field(default_factory=dict)
    reports: Dict[str, Comparison] = field(default_factory=dict)
    tensorrt_error: Optional[str] = None


def export_checkpoint(checkpoint, out_dir, options: Optional[ExportOptions] = None, *, fp16: bool = False,
                      int8_images=None, int8_target: str = "tensorrt", int8_keep_fp32: str = "auto",
                      triton_dir=None,
                      build: Optional[BuildSettings] = None,
                      simplify: str = "auto", echo: Callable[[str], None] = print) -> ExportResult:
    """Export ``checkpoint`` into ``out_dir``: model.onnx (FP32, parity-checked against PyTorch),
    model_fp16.onnx / model_int8.onnx and model.engine on request, a Triton repository on request.
    ``int8_images``: a folder of good images INT8 quantisation measures activation ranges on
    (asks for model_int8.onnx).

    Raises ParityError when FP32 parity is worse than 1e-4. Without TensorRT, every other file is
    still written and TensorRTUnavailableError is raised last."""
    options = (options or ExportOptions()).validate()
    if fp16 and int8_images:
        raise ExportError("--fp16 and --int8 build different engines: choose one")
    out_dir = Path(out_dir)
    result = ExportResult()
    model, checkpoint_sha = load_model(checkpoint)

    fp32 = export_onnx(model, out_dir / FP32_NAME, options, checkpoint_sha256=checkpoint_sha, simplify=simplify)
    result.files["onnx"] = fp32.path
    echo(f"wrote {fp32.path} (onnxslim: {_slim_line(fp32.simplify)})")
    result.reports["parity"] = parity_report(model, fp32.path, options)
    echo(result.reports["parity"].format())
    if not result.reports["parity"].passed:
        # A graph that disagrees with PyTorch must not be picked up by a runtime watching this folder.
        fp32.path.unlink()
        sidecar_path(fp32.path).unlink()
        raise ParityError(f"{checkpoint}: exported graph removed, FP32 parity failed:\n"
                          + result.reports["parity"].format())

    engine_source = None
    if fp16:
        half = export_onnx(model, out_dir / FP16_NAME, fp16_options(options), checkpoint_sha256=checkpoint_sha,
                           simplify=simplify)
        result.files["onnx_fp16"] = engine_source = half.path
        echo(f"wrote {half.path}")
        result.reports["fp16"] = fp16_fidelity_report(model, half.path, options)
        echo(result.reports["fp16"].format())
    if int8_images:
        quant = quantize_int8(fp32.path, out_dir / INT8_NAME, int8_images, target=int8_target,
                              keep_fp32=int8_keep_fp32, echo=echo)
        result.files["onnx_int8"] = engine_source = quant.path
        echo(f"wrote {quant.path}")
        images = load_images(int8_image_paths(int8_images), quant.metadata)
        result.reports["int8"] = int8_agreement_report(fp32.path, quant.path, images,
                                                       fp32.metadata.threshold)
        echo(result.reports["int8"].format())

    if engine_source is not None:
        try:
            build_engine(engine_source, out_dir / ENGINE_NAME, build or BuildSettings(), options.batch_range)
            result.files["engine"] = out_dir / ENGINE_NAME
            echo(f"wrote {out_dir / ENGINE_NAME}")
        except TensorRTUnavailableError as exc:
            result.tensorrt_error = str(exc)
    if triton_dir is not None:
        configs = write_triton_repository(triton_dir, fp32.path, engine_path=result.files.get("engine"))
        result.files.update({f"triton:{name}": path for name, path in configs.items()})
        echo(f"wrote Triton repository {triton_dir} ({', '.join(configs)})")
    if result.tensorrt_error:
        raise TensorRTUnavailableError(result.tensorrt_error)
    return result


def _slim_line(record: Dict) -> str:
    if "nodes_after" not in record:
        return f"{record.get('mode')}, not applied"
    return (f"{'kept' if record['kept'] else 'not kept'}: nodes {record['nodes_before']} -> {record['nodes_after']}, "
            f"CPU {record['latency_before_ms']:.2f} -> {record['latency_after_ms']:.2f} ms")
