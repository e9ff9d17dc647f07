"""``mrkd calibrate``: set the alarm threshold of a checkpoint (PyTorch) or of an exported model (the
runtime: no PyTorch, no SciPy). Parses options and calls mrkd.train.calibrate.recalibrate_checkpoint
or mrkd.runtime.calibrate.calibrate_exported; the threshold rules of both are
mrkd.runtime.calibration."""

from __future__ import annotations

from pathlib import Path

import click

from mrkd.errors import error_boundary
from mrkd.options import FRACTION, BackendChoice, IntegerRange
from mrkd.runtime.calibration import (CONFIDENCE_HELP, DEFAULT_CONFIDENCE, DEFAULT_METHOD, DEFAULT_QUANTILE,
                                     ACCEPT_SHIFT_HELP, METHOD_HELP, QUANTILE_HELP, THRESHOLD_METHODS)

EXPORTED_SUFFIXES = (".onnx", ".engine", ".plan", ".trt")
DEVICE_HELP = "'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'."


@click.command("calibrate", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("good")
@click.option("--labelled", type=click.Path(file_okay=False),
              help="A folder with good/ and one sub-folder per defect type (MVTec test layout): the threshold "
                   "becomes the F1-optimal one on these images instead of the good-score rule.")
@click.option("--method", type=click.Choice(list(THRESHOLD_METHODS)), default=DEFAULT_METHOD, show_default=True,
              help=METHOD_HELP)
@click.option("--quantile", type=FRACTION, default=DEFAULT_QUANTILE, show_default=True, help=QUANTILE_HELP)
@click.option("--confidence", type=FRACTION, default=DEFAULT_CONFIDENCE, show_default=True, help=CONFIDENCE_HELP)
@click.option("--out", "-o", type=click.Path(dir_okay=False),
              help="Checkpoints only: write the recalibrated checkpoint here instead of replacing MODEL.")
@click.option("--max-frames", type=IntegerRange(min=1), default=None,
              help="Exported models: score at most this many frames of GOOD (needed for cameras and streams).")
@click.option("--size", default=None,
              help="Exported models: WIDTHxHEIGHT to resize GOOD's frames to, as `mrkd run --size` does; recorded with "
                   "the threshold, and `mrkd run` warns when it reads frames at another size.")
@click.option("--backend", type=BackendChoice(), default="auto", show_default=True,
              help="Exported models: the inference backend that scores GOOD (as `mrkd run --backend`: score with "
                   "the backend the line runs).")
@click.option("--batch-size", type=IntegerRange(1, 4096), default=8, show_default=True,
              help="Checkpoints: images per forward pass.")
@click.option("--device", default="auto", show_default=True, help="Checkpoints: " + DEVICE_HELP)
@click.option("--accept-shift", is_flag=True, help=ACCEPT_SHIFT_HELP)
@click.option("--ignore-mask", type=click.Path(), default=None,
              help="Score GOOD (and --labelled) under this ignore mask (white: not judged), as `mrkd run` judges a "
                   "camera with it; recorded with the threshold, and `mrkd run` warns where a camera judges under "
                   "another mask or none. The images must be the camera's (the mask's size).")
@error_boundary
def calibrate_command(model, good, labelled, method, quantile, confidence, out, max_frames, size, backend,
                      batch_size, device, accept_shift, ignore_mask):
    """Set MODEL's alarm threshold from GOOD, optionally F1-optimal on --labelled images.

    MODEL is a checkpoint (.ckpt: GOOD is a folder or glob of good images, e.g. new parts from the line;
    export again afterwards, the threshold travels in the metadata) or an exported model (.onnx or
    .engine: GOOD is any `mrkd run` source — folder, glob, video file, camera, stream — so the threshold
    is set on frames that came through the camera and codec the line uses; only the sidecar is
    rewritten, and no PyTorch is needed).

    A calibration whose good scores lie far from the good scores the model recorded (a folder of
    defective parts given as good) is refused unless --accept-shift."""
    def warn(text):
        click.secho(text, err=True, fg="yellow", bold=True)
    from mrkd.runtime.cli import refuse_empty_text
    context = click.get_current_context()
    refuse_empty_text(context.command, context.params)
    given = {param.name for param in context.command.params if context.params.get(param.name) != param.default}
    exported = Path(model).suffix.lower() in EXPORTED_SUFFIXES
    # an option of the other kind of model was ignored without a word (--device cuda on an .onnx)
    unused = sorted(given & ({"batch_size", "device"} if exported else {"max_frames", "backend"}))
    if unused:
        flags = ", ".join("--" + name.replace("_", "-") for name in unused)
        raise click.UsageError(f"{flags}: for {'checkpoints' if exported else 'exported models'} only; "
                               f"{Path(model).name} is {'an exported model' if exported else 'a checkpoint'}")
    if not exported and not Path(good).is_dir() and not any(c in good for c in "*?[") \
            and (Path(good).exists() or "://" in good or good.isdigit()):
        # it was called a "missing folder"; a video, camera or stream is read only by the runtime's calibration
        raise click.UsageError(f"GOOD {good}: a checkpoint is calibrated on a folder (or a glob) of good images; a "
                               f"video file, camera or stream is read for an exported model only (mrkd export, then "
                               f"mrkd calibrate model.onnx {good})")
    if exported:
        if out:
            raise click.UsageError("--out is for checkpoints; an exported model's sidecar is updated in place")
        from mrkd.runtime.calibrate import calibrate_exported
        from mrkd.runtime.sources import SourceOptions
        options = SourceOptions(size=SourceOptions.parse_size(size), reconnect=False).validate()
        result = calibrate_exported(model, good, labelled=labelled, quantile=quantile, method=method,
                                    confidence=confidence, max_frames=max_frames, backend=backend,
                                    source_options=options, accept_shift=accept_shift, warn=warn,
                                    ignore_mask=ignore_mask)
        target = f"{model} (sidecar; was {result.previous_threshold})"
    else:
        if size:
            raise click.UsageError("--size is for exported models (checkpoints resize to their own image size)")
        if out and Path(out).exists() and Path(out).resolve() != Path(model).resolve():
            raise click.UsageError(f"--out {out}: exists; a recalibrated checkpoint is never written over another "
                                   "file (name a new one, or leave --out out to update MODEL)")
        from mrkd.train.calibrate import recalibrate_checkpoint
        from mrkd.train.evaluate import resolve_device
        result = recalibrate_checkpoint(
            model, good, out=out, labelled=labelled, quantile=quantile, method=method, confidence=confidence,
            batch_size=batch_size, device=resolve_device(device), accept_shift=accept_shift, warn=warn,
            ignore_mask=ignore_mask)
        target = out or model
    extra = (f", F1 {result.f1_at_threshold:.3f} on the labelled images" if result.f1_at_threshold is not None
             else f", k {result.tolerance_k:.2f}" if result.tolerance_k is not None else "")
    click.echo(f"threshold {result.threshold:.6g} ({result.method}{extra}) from {result.n_good} "
               f"good image(s): mean {result.good_mean:.4g}, std {result.good_std:.4g}, "
               f"max {result.good_max:.4g} -> {target}")
