"""``mrkd refit MODEL --reviewed LABELS --good DIR``: a new model version from reviewed false alarms.
Parses options and calls mrkd.train.refit.refit_checkpoint. Ctrl-C and SIGTERM stop it (mrkd.stopping):
the half-written version folder is removed and nothing is left behind."""

from __future__ import annotations

import click

from mrkd.errors import error_boundary
from mrkd.stopping import stops_in_one_line
from mrkd.options import FRACTION, FiniteFloatRange, IntegerRange
from mrkd.runtime.calibration import METHOD_HELP, QUANTILE_HELP, THRESHOLD_METHODS

DEFECT_GUARD_DEFAULT = 0.9      # train/refit.py GUARD_KEEP (not imported: that module loads torch)
AUGMENT_CHOICES = ("none", "flips", "flips+rot90")     # train/refit.py AUGMENT_PRESETS, likewise


@click.command("refit", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--reviewed", "labels", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Label file written by `mrkd review` (or the operator page): images marked good go into the "
                   "memory bank, images marked defect are the check.")
@click.option("--good", required=True,
              help="Folder or glob of held-out good images the threshold is set on again (not put into the bank; "
                   "e.g. the training hold-out or OK samples of the line).")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="New folder for the new version (default: MODEL's folder/<name>.v<N>); must not exist.")
@click.option("--events", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The events log the labels refer to: labels naming other event ids, or images whose sha256 is "
                   "not the evidence's the event recorded, are skipped with a warning. Default: the log each label "
                   "recorded when it was made, at its path or beside the label file; labels of an older mrkd (which "
                   "record none), or whose log is gone or was replaced, go unchecked (refit says so in one line).")
@click.option("--evidence", type=click.Path(exists=True, file_okay=False), default=None,
              help="The evidence folder of `mrkd run --evidence` (or a copy of it) where a label's image is looked "
                   "for when it is not at its path (the folder was moved on its own, e.g. to an archive disk): "
                   "<DIR>/<camera>/<file>, then <DIR>/<file>; taken only with the sha256 the label recorded. "
                   "Default: beside the label file, the events log and the current folder only.")
@click.option("--force", is_flag=True,
              help="Write the new model even when it no longer flags an image marked 'defect confirmed', or "
                   "when such an image is missing or changed so it cannot be checked (default: refuse, exit 1, "
                   "nothing written; with --force: a loud warning).")
@click.option("--no-export", is_flag=True, help="Write only the checkpoint (default: also model.onnx + sidecar).")
@click.option("--method", type=click.Choice(list(THRESHOLD_METHODS)), default=None,
              help="Threshold rule (default: the parent's). " + METHOD_HELP)
@click.option("--quantile", type=FRACTION, default=None, help="Default: the parent's. " + QUANTILE_HELP)
@click.option("--batch-size", type=IntegerRange(1, 4096), default=8, show_default=True,
              help="Images per forward pass.")
@click.option("--defect-guard", type=FiniteFloatRange(0, 1), default=DEFECT_GUARD_DEFAULT, show_default=True,
              help="Defect guard: the most anomalous patches of each image marked 'defect confirmed' keep at "
                   "least this share of their distance to the memory bank (a reviewed-good patch nearer to one "
                   "of them than that is not added); 1 = their distance never shrinks, 0 turns the guard off.")
@click.option("--reweight/--no-reweight", default=False, show_default=True,
              help="Also re-weight the two parts of a --score both map (2*s*MRKD + 2*(1-s)*kNN, s = 0.5 as trained) "
                   "with MRKD's share s from 0.25-0.75 that best separates the images marked defect from the good "
                   "ones (reviewed and --good); s moves only with at least 5 reviewed good images, 5 confirmed "
                   "defects and an AUROC gain of 0.02 on them. The choice is recorded in the lineage.")
@click.option("--augment", type=click.Choice(AUGMENT_CHOICES), default="none", show_default=True,
              help="Also offer the bank each reviewed image mirrored: 'flips' left-right, up-down and both; "
                   "'flips+rot90' every rotation and mirror of the square too. Only for parts that look the same "
                   "mirrored (solar cells, fabric, plain panels): on a part with a left and a right side it would "
                   "teach the bank that a part the wrong way round is good. Same growth stop and defect guard; 'flips' "
                   "takes about 4x the refit time, and on ELPV's test split it gained nothing over none "
                   "(benchmarks/RESULTS.md).")
@click.option("--ignore-mask", type=click.Path(), default=None,
              help="The camera's ignore mask (white: not judged, as `mrkd run --ignore-mask`): every score of the "
                   "refit (the threshold's on --good, the confirmed defects', the reviewed images') is taken under it, as "
                   "the camera takes it, and its sha256 is recorded with the threshold. Required when the reviewed "
                   "alarms were judged under a mask (their events record it): a threshold set on whole images would "
                   "let defects the camera flags now pass. The bank still learns the whole image.")
@error_boundary
def refit_command(model, labels, good, out, events, evidence, force, no_export, method, quantile, batch_size,
                  defect_guard, reweight, augment, ignore_mask):
    """Add the teacher patches of images an operator marked good to MODEL's memory bank (a checkpoint
    of a --score both/knn model; MRKD's weights are not touched), set the threshold again on --good,
    check the images marked defect, and write a new version (checkpoint, ONNX export; version,
    parent sha256 and label file sha256 in the metadata) into a new folder. The parent is never
    changed. Images MODEL's lineage already took into the bank (the same pixels) are not offered again
    (the summary counts them); with no new one nothing is written (exit 1). Images of the bank are left
    out of --good by their pixels, whatever their files' bytes."""
    from mrkd.train.refit_args import check_refit_args
    checked = check_refit_args(model, labels, out)   # refused in milliseconds: before torch's import (seconds)
    if ignore_mask is not None:
        from mrkd.runtime.ignore_mask import load_ignore_mask
        ignore_mask = load_ignore_mask(ignore_mask)
    with stops_in_one_line(lambda by: f"refit stopped ({by}); nothing written"):
        from mrkd.train.refit import refit_checkpoint
        result = refit_checkpoint(model, labels, good, out, force=force, export=not no_export, events=events,
                                  quantile=quantile, method=method, batch_size=batch_size,
                                  guard_keep=defect_guard, reweight=reweight, augment=augment, echo=click.echo,
                                  checked=checked, evidence=evidence, ignore_mask=ignore_mask)
    click.echo(f"version {result.lineage['version']} (parent {result.lineage['parent_sha256'][:12]}, labels "
               f"{result.lineage['labels_sha256'][:12]}) in {result.wall_seconds:.1f} s (the bank and threshold "
               f"{result.seconds:.1f} s): "
               + ", ".join(result.files.values()))
