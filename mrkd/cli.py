"""The ``mrkd`` command: a thin click group whose subcommands live beside the library they drive.

Subcommands are imported only when invoked, so ``mrkd run`` on a Jetson never imports PyTorch and
``mrkd --help`` works on any install.
"""

from __future__ import annotations

import importlib
import sys

import click

from mrkd.errors import error_boundary, one_line

# name -> ("module:attribute", one-line help shown by `mrkd --help` without importing the module)
COMMANDS = {
    "generate": ("mrkd.train.cli:generate_command",
                 "Write the embedded synthetic MVTec-layout data set (procedural surfaces and defects)."),
    "train": ("mrkd.train.cli:train_command", "Train an MRKD model on good images (one or all categories)."),
    "calibrate": ("mrkd.calibrate_cli:calibrate_command",
                  "Set the alarm threshold of a checkpoint or exported model from good (or labelled) images."),
    "eval": ("mrkd.train.cli:eval_command", "Image/pixel AUROC, AUPRO, F1 at the threshold, ROC plots."),
    "predict": ("mrkd.train.cli:predict_command", "Score images: scores.csv, maps (.npy) and heatmap overlays."),
    "export": ("mrkd.export.cli:export_command", "Export a checkpoint to ONNX (and TensorRT with --fp16/--int8)."),
    "run": ("mrkd.runtime.cli:run_command", "Stream camera/video frames through an exported model; raise alarms."),
    "bench": ("mrkd.benchmarks.cli:bench_command", "Measure every stage and backend against the official pipeline."),
    "demo": ("mrkd.demo:demo_command", "The whole path on the embedded data: generate, train, eval, export, run."),
}


def load_command(name: str) -> click.Command:
    """The subcommand, with the one error boundary (mrkd.errors) around it: mrkd's errors and the
    system's refusals print as one line, exit 1."""
    target, _ = COMMANDS[name]
    module_name, attribute = target.split(":")
    command = getattr(importlib.import_module(module_name), attribute)
    if command.callback is not None:
        command.callback = error_boundary(command.callback)
    return command


def main_one_line(click_main, *args, **kwargs):
    """Run a click entry point so that every error, usage mistakes included, is one ``Error:`` line on
    stderr with click's exit status (2 for usage, 1 otherwise)."""
    try:
        result = click_main(*args, standalone_mode=False, **kwargs)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"Error: {one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)


class LazyGroup(click.Group):
    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        return main_one_line(super().main, *args, **kwargs)

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return load_command(name)

    def format_commands(self, ctx, formatter):
        rows = [(name, short_help) for name, (_, short_help) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mrkd")
def main():
    """mrkd: train MRKD anomaly detectors on good parts, export them to ONNX/TensorRT and run them
    on camera streams that raise alarms. Every command is also installed as mrkd-<command>."""


def _alias(name: str):
    def run_alias():
        main_one_line(load_command(name).main, prog_name=f"mrkd-{name}")
    return run_alias


# console_scripts entry points: mrkd-train, mrkd-eval, ...
generate_alias = _alias("generate")
train_alias = _alias("train")
calibrate_alias = _alias("calibrate")
eval_alias = _alias("eval")
predict_alias = _alias("predict")
export_alias = _alias("export")
run_alias = _alias("run")
bench_alias = _alias("bench")
demo_alias = _alias("demo")


if __name__ == "__main__":   # python -m mrkd.cli ..., and torchrun -m mrkd.cli train ... for DDP
    main()
