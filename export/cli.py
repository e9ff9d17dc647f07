"""`mrkd export`: parses options and calls mrkd.export.pipeline.export_checkpoint, nothing more."""

from __future__ import annotations

import click

from mrkd.errors import error_boundary, one_line, warning_line
from mrkd.export.int8 import INT8_TARGET_CHOICES
from mrkd.export.onnx_graph import DEFAULT_BATCH_RANGE, DEFAULT_OPSET, MAX_BATCH, MIN_OPSET
from mrkd.options import IntegerRange
from mrkd.stopping import stops_in_one_line

EXIT_NO_TENSORRT = 3


@click.command("export")
@click.argument("checkpoint", type=click.Path(exists=True))
@click.option("--category", "-c", default=None,
              help="CHECKPOINT may be a run folder: <run>/<category>/last.ckpt (the final epoch of training) is "
                   "exported. Warns when the checkpoint was trained on another category.")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), default="exported", show_default=True,
              help="Folder for model.onnx (+ .json sidecar) and, on request, model_fp16/int8.onnx, model.engine. "
                   "One export per folder: one that already holds an exported model is refused (see --overwrite).")
@click.option("--overwrite", is_flag=True,
              help="Replace the exported model already in --output: the new files are moved in together once all "
                   "are written and checked, and the earlier export's files this one does not write (e.g. its "
                   "model_int8.onnx, model.engine) are removed. A folder where mrkd calibrate set a threshold on the "
                   "line is still refused.")
@click.option("--smooth-in-graph/--no-smooth-in-graph", default=True, show_default=True,
              help="Gaussian smoothing inside the graph (a runtime without the CUDA extension still gets the "
                   "full map), or left to the runtime.")
@click.option("--per-scale-outputs", is_flag=True,
              help="Output the three low-resolution 1 − cos maps (scale0..2; --score knn|both models add the "
                   "kNN distance map as scale3) instead of the full map, for the runtime's fused "
                   "upsample+smooth kernel.")
@click.option("--uint8-input", is_flag=True,
              help="Graph input is uint8 BGR N×H×W×3 at the model size; BGR->RGB, /255, mean/std and HWC->CHW "
                   "happen in the graph (the resize stays outside).")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help=f"ONNX opset: {MIN_OPSET} up to the newest that the installed torch exporter, onnx and "
                   f"onnxruntime all support (an error names it).")
@click.option("--batch", "batch", default=":".join(map(str, DEFAULT_BATCH_RANGE)), show_default=True,
              help=f"Dynamic batch range MIN:OPT:MAX (1 <= MIN <= OPT <= MAX <= {MAX_BATCH}); OPT/MAX set the "
                   f"TensorRT profile and Triton's max_batch_size.")
@click.option("--fp16", is_flag=True, help="Also write model_fp16.onnx (FP16 backbone, FP32 head) and build a "
                                           "strongly typed TensorRT engine from it (an error without TensorRT).")
@click.option("--int8", is_flag=True, help="Also write model_int8.onnx (Q/DQ, activation ranges measured on "
                                           "--int8-images) and, where TensorRT and a GPU are here, a TensorRT "
                                           "engine from it (without them: a note, exit 0).")
@click.option("--engine/--no-engine", default=None,
              help="Require a TensorRT engine (from the --fp16/--int8 graph, else FP32; an error without "
                   "TensorRT) or never build one. Default: with --fp16, and with --int8 where TensorRT is here.")
@click.option("--int8-images", type=click.Path(file_okay=False),
              help="Folder of good images (sub-folders included, first 64) that INT8 quantisation measures "
                   "activation ranges on. Not the threshold calibration (that is mrkd calibrate).")
@click.option("--check-images", type=click.Path(file_okay=False),
              help="Folder of good images (first 64) the FP32 graph at bf16 is checked on against FP32 "
                   "(OpenVINO, on a CPU with native bf16; a passing check, recorded in the sidecar, lets "
                   "--backend auto run bf16), and the INT8 graph's decisions. Default: the --int8-images "
                   "folder's images past the 64 quantisation read, where there are more (else those 64, "
                   "noted as flattering). INT8 is also checked apart on the defect images of the test/ "
                   "split of the data the checkpoint was trained on, where it is here.")
@click.option("--calib", type=click.Path(file_okay=False), hidden=True,
              help="Old name of --int8-images, still accepted.")
@click.option("--int8-target", type=click.Choice(INT8_TARGET_CHOICES), default="auto", show_default=True,
              help="INT8 graph form: 'tensorrt' (symmetric Q/DQ, what TensorRT needs), 'cpu' (U8 asymmetric "
                   "activations: about 1.8x faster than 'tensorrt' on ONNX Runtime's x86 CPU kernels; OpenVINO "
                   "runs both), or 'auto': 'tensorrt' when an engine is built here, else 'cpu'.")
@click.option("--int8-keep-fp32", type=click.Choice(["auto", "front", "none"]), default="auto", show_default=True,
              help="Which teacher layers stay FP32 in the INT8 graph: 'front' keeps the layers in front of the "
                   "first feature tap (stem + first stage), 'none' quantises them too, 'auto' tries 'none' and "
                   "falls back to 'front' when the INT8 images' scores move by more than a quarter of "
                   "their FP32 spread (WRN50 stays all-INT8; EfficientNet-Lite needs 'front').")
@click.option("--triton", "triton_dir", type=click.Path(file_okay=False),
              help="Also write a Triton model repository into this folder.")
@click.option("--workspace", type=IntegerRange(min=1), default=2048, show_default=True, help="TensorRT workspace pool limit (MiB).")
@click.option("--opt-level", type=IntegerRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimisation level (0-5; higher builds slower, may run faster).")
@click.option("--timing-cache", type=click.Path(dir_okay=False),
              help="TensorRT timing cache file: loaded if present, saved after the build.")
@click.option("--dla-core", type=IntegerRange(0, 15), help="Build for this DLA core (Jetson) with GPU fallback.")
@click.option("--simplify", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="onnxslim: 'auto' keeps it only when it removes nodes without slowing ONNX Runtime CPU.")
@error_boundary   # mrkd's errors (checkpoint, export, parity, metadata) as one line, exit 1
def export_command(checkpoint, category, out_dir, overwrite, smooth_in_graph, per_scale_outputs, uint8_input, opset, batch, fp16,
                   int8, engine, int8_images, check_images, calib, int8_target, int8_keep_fp32, triton_dir, workspace, opt_level, timing_cache, dla_core, simplify):
    """Export CHECKPOINT (a .ckpt file or a training run folder) to one fused ONNX graph (teacher,
    bottleneck, decoder, cosine anomaly map) with a metadata sidecar; print its parity report against
    PyTorch; optionally FP16/INT8, TensorRT, Triton."""
    from mrkd.export.onnx_graph import ExportOptions, parse_batch_range
    from mrkd.export.pipeline import ExportResult, export_checkpoint
    from mrkd.export.tensorrt_build import BuildSettings, TensorRTUnavailableError

    if int8_images and calib and int8_images != calib:
        raise click.UsageError("--int8-images and its old name --calib name different folders: give one")
    int8_images = int8_images or calib
    if int8 and not int8_images:
        raise click.UsageError("--int8 needs --int8-images DIR (a folder of good images; --calib is its old name)")
    try:
        # the options first: a mistake in them is said before the checkpoint is read
        options = ExportOptions(smooth_in_graph=smooth_in_graph, per_scale_outputs=per_scale_outputs,
                                uint8_input=uint8_input, opset=opset, batch_range=parse_batch_range(batch))
        options.validate()
        checkpoint = _checkpoint_of_run(checkpoint, category)
        settings = BuildSettings(workspace_mib=workspace, opt_level=opt_level, timing_cache=timing_cache,
                                 dla_core=dla_core)
        progress = ExportResult()      # says, if the export is stopped, whether its files were moved in
        with stops_in_one_line(lambda by: _stopped_line(by, out_dir, progress)):
            export_checkpoint(checkpoint, out_dir, options, fp16=fp16, int8_images=int8_images if int8 else None,
                              int8_target=int8_target, int8_keep_fp32=int8_keep_fp32, engine=engine,
                              triton_dir=triton_dir, build=settings, check_images=check_images,
                              simplify=simplify, echo=click.echo, overwrite=overwrite, result=progress)
    except TensorRTUnavailableError as exc:
        click.echo(f"Error: {one_line(exc)}", err=True)     # the reason and the install hint on one line
        raise SystemExit(EXIT_NO_TENSORRT)


def _stopped_line(by: str, out_dir, progress) -> str:
    if progress.in_place:
        return (f"export stopped ({by}) after its files were moved into {out_dir}, whole: "
                + ", ".join(path.name for key, path in progress.files.items() if not key.startswith("triton:")))
    return f"export stopped ({by}) before its files were moved into {out_dir}: nothing new there, nothing replaced"


def _checkpoint_of_run(path, category):
    """The checkpoint file for a file or run folder (mrkd.train.evaluate.run_checkpoint), with a
    warning when it was trained on another category than the one given or implied by the folder."""
    from mrkd.train.checkpoint import read_checkpoint, trained_category
    from mrkd.train.evaluate import run_checkpoint
    checkpoint, used_for = run_checkpoint(path, category)
    data = read_checkpoint(checkpoint, warn=lambda line: click.secho(line, fg="yellow", err=True))
    trained = trained_category(data)
    if trained and used_for and trained != used_for:
        click.secho(warning_line(f"{checkpoint} was trained on {trained!r}, not {used_for!r}"), fg="yellow", err=True)
    return str(checkpoint)
