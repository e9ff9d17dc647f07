"""`mrkd export`: parses options and calls mrkd.export.pipeline.export_checkpoint, nothing more."""

from __future__ import annotations

import click

from mrkd.export.onnx_graph import DEFAULT_BATCH_RANGE, DEFAULT_OPSET, MAX_BATCH, MIN_OPSET

EXIT_NO_TENSORRT = 3


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), default="exported", show_default=True,
              help="Folder for model.onnx (+ .json sidecar) and, on request, model_fp16/int8.onnx, model.engine.")
@click.option("--smooth-in-graph/--no-smooth-in-graph", default=True, show_default=True,
              help="Gaussian smoothing inside the graph (a runtime without the CUDA extension still gets the "
                   "full map), or left to the runtime.")
@click.option("--per-scale-outputs", is_flag=True,
              help="Output the three low-resolution 1 − cos maps (scale0..2) instead of the full map, for the "
                   "runtime's fused upsample+smooth kernel.")
@click.option("--uint8-input", is_flag=True,
              help="Graph input is uint8 BGR N×H×W×3 at the model size; BGR->RGB, /255, mean/std and HWC->CHW "
                   "happen in the graph (the resize stays outside).")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help=f"ONNX opset (>= {MIN_OPSET}).")
@click.option("--batch", "batch", default=":".join(map(str, DEFAULT_BATCH_RANGE)), show_default=True,
              help=f"Dynamic batch range MIN:OPT:MAX (1 <= MIN <= OPT <= MAX <= {MAX_BATCH}); OPT/MAX set the "
                   f"TensorRT profile and Triton's max_batch_size.")
@click.option("--fp16", is_flag=True, help="Also write model_fp16.onnx (FP16 backbone, FP32 head) and build a "
                                           "strongly typed TensorRT engine from it.")
@click.option("--int8", is_flag=True, help="Also write model_int8.onnx (Q/DQ, calibrated on --calib) and build "
                                           "a TensorRT engine from it.")
@click.option("--calib", type=click.Path(file_okay=False), help="Folder of good images for INT8 calibration.")
@click.option("--int8-target", type=click.Choice(["tensorrt", "cpu"]), default="tensorrt", show_default=True,
              help="INT8 graph form: 'tensorrt' (symmetric Q/DQ, what TensorRT needs) or 'cpu' (U8 asymmetric "
                   "activations: about 1.8x faster than 'tensorrt' on ONNX Runtime's x86 CPU kernels).")
@click.option("--int8-keep-fp32", type=click.Choice(["auto", "front", "none"]), default="auto", show_default=True,
              help="Which teacher layers stay FP32 in the INT8 graph: 'front' keeps the layers in front of the "
                   "first feature tap (stem + first stage), 'none' quantises them too, 'auto' tries 'none' and "
                   "falls back to 'front' when the calibration images' scores move by more than a quarter of "
                   "their FP32 spread (WRN50 stays all-INT8; EfficientNet-Lite needs 'front').")
@click.option("--triton", "triton_dir", type=click.Path(file_okay=False),
              help="Also write a Triton model repository into this folder.")
@click.option("--workspace", type=int, default=2048, show_default=True, help="TensorRT workspace pool limit (MiB).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimisation level (0-5; higher builds slower, may run faster).")
@click.option("--timing-cache", type=click.Path(dir_okay=False),
              help="TensorRT timing cache file: loaded if present, saved after the build.")
@click.option("--dla-core", type=int, help="Build for this DLA core (Jetson) with GPU fallback.")
@click.option("--simplify", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="onnxslim: 'auto' keeps it only when it removes nodes without slowing ONNX Runtime CPU.")
def export_command(checkpoint, out_dir, smooth_in_graph, per_scale_outputs, uint8_input, opset, batch, fp16,
                   int8, calib, int8_target, int8_keep_fp32, triton_dir, workspace, opt_level, timing_cache, dla_core, simplify):
    """Export CHECKPOINT to one fused ONNX graph (teacher, bottleneck, decoder, cosine anomaly map) with a
    metadata sidecar; print its parity report against PyTorch; optionally FP16/INT8, TensorRT, Triton."""
    from mrkd.export.onnx_graph import ExportError, ExportOptions, parse_batch_range
    from mrkd.export.parity import ParityError
    from mrkd.export.pipeline import export_checkpoint
    from mrkd.export.tensorrt_build import BuildSettings, TensorRTUnavailableError
    from mrkd.runtime.metadata import MetadataError
    from mrkd.train.checkpoint import CheckpointError

    if int8 and not calib:
        raise click.UsageError("--int8 needs --calib DIR (a folder of good images)")
    try:
        options = ExportOptions(smooth_in_graph=smooth_in_graph, per_scale_outputs=per_scale_outputs,
                                uint8_input=uint8_input, opset=opset, batch_range=parse_batch_range(batch))
        options.validate()
        settings = BuildSettings(workspace_mib=workspace, opt_level=opt_level, timing_cache=timing_cache,
                                 dla_core=dla_core)
        export_checkpoint(checkpoint, out_dir, options, fp16=fp16, int8_calib=calib if int8 else None,
                          int8_target=int8_target, int8_keep_fp32=int8_keep_fp32,
                          triton_dir=triton_dir, build=settings, simplify=simplify, echo=click.echo)
    except TensorRTUnavailableError as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(EXIT_NO_TENSORRT)
    except (CheckpointError, ExportError, MetadataError, ParityError) as exc:
        raise click.ClickException(str(exc)) from exc
