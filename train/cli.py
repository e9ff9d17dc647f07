"""``mrkd generate | train | eval | predict``: thin click commands over mrkd.train.

torch is imported inside the commands only, so ``--help`` is instant on any install.
"""

from __future__ import annotations

import os

import functools
import json
from pathlib import Path

import click

DEVICE_HELP = "'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'."
REQUIRE_MASKS_HELP = ("Fail on a defect image without a pixel mask. Default: such images (e.g. a data set labelled "
                      "per image) count in the image metrics; pixel AUROC and AUPRO use the images with masks.")


def friendly_errors(command):
    """Turn mrkd's expected errors into a one-line click error (no traceback)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from mrkd.deps import MissingDependencyError
        from mrkd.runtime.images import ImageReadError
        expected = [MissingDependencyError, ImageReadError, FileExistsError]
        try:
            from mrkd.train.checkpoint import CheckpointError
            from mrkd.train.data import DataError
            from mrkd.train.teachers import TeacherWeightsError
            expected += [CheckpointError, DataError, TeacherWeightsError]
        except MissingDependencyError as exc:
            raise click.ClickException(str(exc)) from exc
        try:
            return command(*args, **kwargs)
        except tuple(expected) as exc:
            raise click.ClickException(str(exc)) from exc
    return wrapper


def warn_random_teacher(teacher_weights: str) -> None:
    """Print the random-teacher warning where nobody can miss it."""
    if teacher_weights == "random":
        from mrkd.train.teachers import RANDOM_TEACHER_WARNING
        bar = "!" * 78
        click.secho(f"{bar}\n{RANDOM_TEACHER_WARNING}\n{bar}", fg="red", bold=True, err=True)


# ----------------------------------------------------------------------------- generate

@click.command("generate")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--categories", "-c", multiple=True,
              help="Categories to write (repeat the option); default: all. See mrkd.train.synthetic.CATEGORIES.")
@click.option("--image-size", default=128, show_default=True, help="Image height in pixels.")
@click.option("--seed", default=0, show_default=True, help="Random seed (same seed -> byte-identical files).")
@click.option("--n-train", default=40, show_default=True, help="Good training images per category.")
@click.option("--n-test-good", default=12, show_default=True, help="Good test images per category.")
@click.option("--n-test-defect", default=6, show_default=True, help="Test images per defect type and category.")
@friendly_errors
def generate_command(out, categories, image_size, seed, n_train, n_test_good, n_test_defect):
    """Write the embedded synthetic data set (MVTec AD layout) to OUT."""
    from mrkd.train.synthetic import generate_dataset
    try:
        summary = generate_dataset(out, list(categories) or None, image_size=image_size, n_train=n_train,
                                   n_test_good=n_test_good, n_test_defect=n_test_defect, seed=seed)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {', '.join(summary['categories'])} to {out} in {summary['seconds']} s")


# ----------------------------------------------------------------------------- train

@click.command("train")
@click.argument("data_root")
@click.option("--category", "-c", "categories", multiple=True,
              help="Category sub-folder of DATA_ROOT (repeat for several); default: all. "
                   "DATA_ROOT may instead be a plain folder or glob of good images (then no evaluation).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Output folder: <out>/<category>/last.ckpt (the final epoch's weights, calibrated; what "
                   "`mrkd eval` and `mrkd export` take from a run folder) and history.jsonl.")
@click.option("--backbone", default="wide_resnet50_2", show_default=True,
              help="Teacher backbone: wide_resnet50_2, resnet18, resnet50, wide_resnet101_2, efficientnet_lite0.")
@click.option("--teacher-weights", default="imagenet", show_default=True,
              help="'imagenet' (named ImageNet weights), a state-dict file path, or 'random' (plumbing only).")
@click.option("--image-size", default=256, show_default=True, help="Square input size in pixels.")
@click.option("--epochs", default=200, show_default=True, help="Training epochs.")
@click.option("--batch-size", default=16, show_default=True, help="Images per step (per process under torchrun).")
@click.option("--lr", default=0.005, show_default=True, help="Adam learning rate (betas 0.5, 0.999).")
@click.option("--seed", default=111, show_default=True, help="Random seed (torch, numpy, random, workers).")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--ilm/--no-ilm", default=True, show_default=True, help="Image-level masking (patch swap).")
@click.option("--ilm-source", type=click.Choice(["same", "other"]), default="same", show_default=True,
              help="Where image-level masking takes its patches from: 'same' image (the official code) or "
                   "'other': another training image.")
@click.option("--ilm-preset", type=click.Choice(["auto", "texture", "object"]), default="auto", show_default=True,
              help="Patch-swap settings: per category (mrkd_category.json / MVTec), or a fixed preset.")
@click.option("--mask-ratio", default=0.2, show_default=True, help="Feature-level masking ratio.")
@click.option("--flm/--no-flm", default=True, show_default=True, help="Feature-level masking.")
@click.option("--eval-every", default=10, show_default=True,
              help="Evaluate on the test split every N epochs (0: never), for monitoring only: the numbers go "
                   "to history.jsonl and never choose the weights (the run hands on its final epoch).")
@click.option("--holdout", default=0.1, show_default=True,
              help="Share of good training images held out for threshold calibration. 0: the official recipe "
                   "(train on every good image); the threshold then comes from training images and is biased "
                   "low (more false alarms).")
@click.option("--threshold-quantile", default=0.99, show_default=True,
              help="Share of good parts the alarm threshold should pass (the coverage).")
@click.option("--threshold-method", type=click.Choice(["quantile", "tolerance"]), default="quantile",
              show_default=True,
              help="'quantile': the quantile of the held-out good scores (max + 10% of their range below 10 "
                   "images); 'tolerance': mean + k·std, with k chosen so that the threshold passes that share "
                   "of good parts with --threshold-confidence (k grows as the hold-out shrinks: fewer false "
                   "alarms, but with few, widely spread scores it misses defects). `mrkd calibrate` re-does "
                   "this later, also F1-optimal from labelled images.")
@click.option("--threshold-confidence", default=0.75, show_default=True,
              help="For 'tolerance': how sure the threshold should be to pass that share of good parts "
                   "(higher: fewer false alarms, more missed defects; see mrkd.train.calibrate).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from <out>/<category>/last.ckpt when present (same settings required).")
@click.option("--workers", default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--amp/--no-amp", default=False, show_default=True, help="Mixed precision (CUDA only).")
@click.option("--resize-mode", type=click.Choice(["resize", "center_crop"]), default="resize", show_default=True,
              help="'resize': whole image to a square; 'center_crop': the official protocol.")
@click.option("--skip-unreadable", is_flag=True, help="Skip unreadable images (with a count) instead of failing.")
@click.option("--require-masks", is_flag=True,
              help=REQUIRE_MASKS_HELP)
@friendly_errors
def train_command(data_root, categories, out, backbone, teacher_weights, image_size, epochs, batch_size, lr, seed,
                  device, ilm, ilm_source, ilm_preset, mask_ratio, flm, eval_every, holdout, threshold_quantile,
                  threshold_method, threshold_confidence, resume,
                  workers, amp, resize_mode, skip_unreadable, require_masks):
    """Train MRKD on the good images of DATA_ROOT (MVTec layout, or a plain folder of good images).

    The run hands on its final epoch's weights (<out>/<category>/last.ckpt), as the official protocol
    does; no checkpoint is chosen on test labels. Test-split metrics every --eval-every epochs are
    monitoring only. An evaluation or calibration error is reported in one line and the run still
    ends with its final checkpoint."""
    import warnings

    from mrkd.train.data import DataError, list_categories
    from mrkd.train.trainer import TrainConfig, train, train_all

    warn_random_teacher(teacher_weights)
    warnings.filterwarnings("ignore", message="teacher_weights='random'")  # printed above already
    try:
        config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size, seed=seed,
                             device=device, amp=amp, num_workers=workers, ilm=ilm, ilm_source=ilm_source,
                             ilm_preset=ilm_preset,
                             mask_ratio=mask_ratio, flm=flm, eval_every=eval_every, holdout_fraction=holdout,
                             threshold_quantile=threshold_quantile, threshold_method=threshold_method,
                             threshold_confidence=threshold_confidence,
                             resize_mode=resize_mode)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    if holdout == 0:
        click.secho("--holdout 0: training on every good image (the official recipe); the alarm threshold then "
                    "comes from training images and is biased low (expect more false alarms than it promises)",
                    fg="yellow", err=True)
    options = dict(backbone=backbone, teacher_weights=teacher_weights, resume=resume,
                   skip_unreadable=skip_unreadable, require_masks=require_masks)
    if not categories:
        try:
            categories = list_categories(data_root)
        except DataError:
            categories = None  # a plain folder or glob of good images
    if categories is None:
        summaries = {Path(str(data_root)).name or "images": train(data_root, None, out, config, **options)}
    else:
        summaries = train_all(data_root, categories, out, config, **options)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun only rank 0 reports (it alone calibrated and wrote the files)
    for name, summary in summaries.items():
        last = summary["history"][-1] if summary["history"] else {}
        metrics = "  ".join(f"{k} {last[k]:.4f}" for k in ("image_auroc", "pixel_auroc", "aupro") if k in last)
        threshold = (summary.get("calibration") or {}).get("threshold")
        monitoring = f"  (test split, monitoring only: {metrics})" if metrics else ""
        click.echo(f"{name}: loss {last.get('loss', float('nan')):.4f}  threshold {threshold}{monitoring}  "
                   f"-> {summary['checkpoint']} (final epoch)")
        for error in summary.get("errors") or []:
            click.echo(f"{name}: {error}", err=True)


# ----------------------------------------------------------------------------- calibrate

@click.command("calibrate")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("good")
@click.option("--labelled", type=click.Path(file_okay=False),
              help="A folder with good/ and one sub-folder per defect type (MVTec test layout): the threshold "
                   "becomes the F1-optimal one on these images instead of the good-score rule.")
@click.option("--method", type=click.Choice(["quantile", "tolerance"]), default="quantile", show_default=True,
              help="Good-score rule (see `mrkd train --help`, --threshold-method).")
@click.option("--quantile", default=0.99, show_default=True,
              help="Share of good parts the threshold should pass (the coverage).")
@click.option("--confidence", default=0.75, show_default=True,
              help="For 'tolerance': how sure the threshold should be to pass that share of good parts "
                   "(higher: fewer false alarms, more missed defects; see mrkd.train.calibrate).")
@click.option("--out", "-o", type=click.Path(dir_okay=False),
              help="Checkpoints only: write the recalibrated checkpoint here instead of replacing MODEL.")
@click.option("--max-frames", type=int, default=None,
              help="Exported models: score at most this many frames of GOOD (needed for cameras and streams).")
@click.option("--backend", type=click.Choice(["auto", "tensorrt", "onnxruntime"]), default="auto",
              show_default=True, help="Exported models: the inference backend that scores GOOD.")
@click.option("--batch-size", default=8, show_default=True, help="Checkpoints: images per forward pass.")
@click.option("--device", default="auto", show_default=True, help="Checkpoints: " + DEVICE_HELP)
def calibrate_command(model, good, labelled, method, quantile, confidence, out, max_frames, backend, batch_size,
                      device):
    """Set MODEL's alarm threshold from GOOD, optionally F1-optimal on --labelled images.

    MODEL is a checkpoint (.ckpt: GOOD is a folder or glob of good images, e.g. new parts from the line;
    export again afterwards, the threshold travels in the metadata) or an exported model (.onnx or
    .engine: GOOD is any `mrkd run` source — folder, glob, video file, camera, stream — so the threshold
    is set on frames that came through the camera and codec the line uses; only the sidecar is
    rewritten, and no PyTorch is needed)."""
    if Path(model).suffix.lower() in (".onnx", ".engine", ".plan"):
        if out:
            raise click.UsageError("--out is for checkpoints; an exported model's sidecar is updated in place")
        # The runtime path: no PyTorch imported (friendly_errors would import the training modules).
        from mrkd.runtime.backends import BackendError
        from mrkd.runtime.calibrate import CalibrationError, calibrate_exported
        from mrkd.runtime.images import ImageReadError
        from mrkd.runtime.metadata import MetadataError
        from mrkd.runtime.sources import SourceError
        try:
            result = calibrate_exported(model, good, labelled=labelled, quantile=quantile, method=method,
                                        confidence=confidence, max_frames=max_frames, backend=backend)
        except (BackendError, CalibrationError, ImageReadError, MetadataError, SourceError) as exc:
            raise click.ClickException(str(exc)) from exc
        target = f"{model} (sidecar; was {result['previous_threshold']})"
    else:
        result = friendly_errors(_recalibrate_checkpoint)(model, good, out, labelled, quantile, method, confidence,
                                                          batch_size, device)
        target = out or model
    extra = (f", F1 {result['f1_at_threshold']:.3f} on the labelled images" if "f1_at_threshold" in result
             else f", k {result['tolerance_k']:.2f}" if "tolerance_k" in result else "")
    click.echo(f"threshold {result['threshold']:.6g} ({result['threshold_method']}{extra}) from {result['n_good']} "
               f"good image(s): mean {result['good_mean']:.4g}, std {result['good_std']:.4g}, "
               f"max {result['good_max']:.4g} -> {target}")


def _recalibrate_checkpoint(model, good, out, labelled, quantile, method, confidence, batch_size, device):
    from mrkd.runtime.calibrate import CalibrationError
    from mrkd.train.calibrate import recalibrate_checkpoint
    from mrkd.train.evaluate import resolve_device
    try:
        return recalibrate_checkpoint(model, good, out=out, labelled=labelled, quantile=quantile, method=method,
                                      confidence=confidence, batch_size=batch_size, device=resolve_device(device))
    except CalibrationError as exc:
        raise click.ClickException(str(exc)) from exc


# ----------------------------------------------------------------------------- eval

@click.command("eval")
@click.argument("checkpoint", type=click.Path(exists=True))
@click.argument("data_root", type=click.Path(exists=True, file_okay=False))
@click.option("--category", "-c", "categories", multiple=True,
              help="Category to evaluate (repeat for several). CHECKPOINT may be a run folder with "
                   "<category>/best.ckpt; default: every category found there.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Write metrics.json, roc.png, score_histogram.png and overlays here (per category).")
@click.option("--batch-size", default=8, show_default=True, help="Images per forward pass.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--test-time-mask/--no-test-time-mask", default=None,
              help="Override the model's feature masking at test time (the official code masks).")
@friendly_errors
def eval_command(checkpoint, data_root, categories, out, batch_size, device, test_time_mask):
    """Evaluate CHECKPOINT (file or run folder) on DATA_ROOT's test split; print the metrics table."""
    from mrkd.train.checkpoint import load_checkpoint
    from mrkd.train.evaluate import evaluate, find_checkpoints, format_table, mean_row

    results = {}
    for category, path in find_checkpoints(checkpoint, list(categories) or None).items():
        model = load_checkpoint(path)
        if test_time_mask is not None:
            model.student.test_time_mask = test_time_mask
        target = None if out is None else Path(out) / category
        results[category] = evaluate(model, data_root, category, target, batch_size=batch_size, device=device)
    if len(results) > 1:
        results["mean"] = mean_row(results)
    if out is not None:
        from mrkd.atomic import atomic_write_text
        from mrkd.train.evaluate import _jsonable
        atomic_write_text(Path(out) / "metrics.json", json.dumps(_jsonable(results), indent=2) + "\n")
    click.echo(format_table(results))
    if out is not None:
        click.echo(f"metrics.json, roc.png, score_histogram.png and overlays/ in {out}")


# ----------------------------------------------------------------------------- predict

@click.command("predict")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.argument("inputs")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Output folder: scores.csv, maps/*.npy, overlays/*.png, skipped.csv.")
@click.option("--batch-size", default=8, show_default=True, help="Images per forward pass.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--no-maps", is_flag=True, help="Do not write the .npy anomaly maps.")
@click.option("--no-overlays", is_flag=True, help="Do not write the heat-map overlay PNGs.")
@friendly_errors
def predict_command(checkpoint, inputs, out, batch_size, device, no_maps, no_overlays):
    """Score INPUTS (an image, a folder or a glob such as 'dir/*.png') with CHECKPOINT."""
    from mrkd.train.checkpoint import load_checkpoint
    from mrkd.train.evaluate import resolve_device
    from mrkd.train.predict import predict

    model = load_checkpoint(checkpoint).to(resolve_device(device))
    summary = predict(model, inputs, out, batch_size=batch_size, write_maps=not no_maps,
                      write_overlays=not no_overlays)
    click.echo(f"scored {summary['n_scored']} image(s), {summary['n_anomalous']} anomalous "
               f"(threshold {summary['threshold']}), skipped {summary['n_skipped']} unreadable -> "
               f"{summary['scores_csv']}")
