"""The ``mrkd`` command: a thin click group whose subcommands live beside the library they drive.

Subcommands are imported only when invoked, so ``mrkd run`` on a Jetson never imports PyTorch and
``mrkd --help`` works on any install.
"""

from __future__ import annotations

import importlib
import sys

import click

from mrkd.commands import COMMANDS
from mrkd.errors import error_boundary, one_line


# Text parameters that name files or folders (data roots, image folders, camera sources, weights files),
# refused empty as the click.Path ones are.
PATH_TEXT_PARAMS = ("data_root", "good", "inputs", "sources", "teacher_weights")


class NonEmptyPath(click.ParamType):
    """Another parameter type (a click.Path, or text naming a file) that also refuses an empty value:
    the system reads "" as the current folder, so `-o ""` wrote into it and `calibrate model ""`
    calibrated on whatever images it held."""

    def __init__(self, inner: click.ParamType):
        self.inner = inner
        self.name = inner.name

    def __getattr__(self, attribute):       # metavar, completion, envvar splitting: the inner type's
        return getattr(self.inner, attribute)

    def get_metavar(self, *args, **kwargs):
        return self.inner.get_metavar(*args, **kwargs)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail('an empty path ("") names no file or folder (give "." for the current folder).', param, ctx)
        return self.inner.convert(value, param, ctx)


def refuse_empty_paths(command: click.Command) -> None:
    """Every path parameter of ``command`` refuses "" (NonEmptyPath)."""
    for param in command.params:
        if isinstance(param.type, click.Path) or (param.type is click.STRING and param.name in PATH_TEXT_PARAMS):
            param.type = NonEmptyPath(param.type)


def load_command(name: str) -> click.Command:
    """The subcommand, with the one error boundary (mrkd.errors) around it: mrkd's errors and the
    system's refusals print as one line, exit 1; an empty path is refused as a usage mistake."""
    target, _ = COMMANDS[name]
    module_name, attribute = target.split(":")
    command = getattr(importlib.import_module(module_name), attribute)
    if command.callback is not None and not getattr(command, "_mrkd_loaded", False):
        command.callback = error_boundary(command.callback)
        refuse_empty_paths(command)
        command._mrkd_loaded = True      # loaded twice in one process (tests): wrapped once
    return command


def main_one_line(click_main, *args, **kwargs):
    """Run a click entry point so that every error, usage mistakes included, is one ``Error:`` line on
    stderr with click's exit status (2 for usage, 1 otherwise)."""
    try:
        _one_line(click_main, *args, **kwargs)
    except SystemExit as exc:
        # a camera's reader a stop could not wait for, still inside OpenCV: the interpreter's shutdown
        # would abort the process (exit -6) after its clean stop (mrkd/unjoined_threads.py)
        from mrkd.unjoined_threads import leave_if_stuck
        leave_if_stuck(exc.code)
        raise


def _one_line(click_main, *args, **kwargs):
    try:
        result = click_main(*args, standalone_mode=False, **kwargs)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as exc:   # bare `mrkd`: the help, as written
        exc.show()
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"Error: {one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):
            # Ctrl-C before a command's own stop handling (mrkd.stopping), e.g. while torch imports: a stop
            # as a moment later, not a failure
            from mrkd.stopping import SIGINT_EXIT
            click.echo("stopped (Ctrl-C)", err=True)
            sys.exit(SIGINT_EXIT)
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


# console_scripts entry points mrkd-<name> = mrkd.cli:<name>_alias (setup.py), one per COMMANDS entry
for _name in COMMANDS:
    globals()[f"{_name}_alias"] = _alias(_name)


if __name__ == "__main__":   # python -m mrkd.cli ..., and torchrun -m mrkd.cli train ... for DDP
    main()
