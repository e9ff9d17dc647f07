"""Every benchmark module run on its own answers --help with its description and options, and runs
nothing: several used to look for "--quick" among their arguments and start the full benchmark (minutes
to hours of work) on anything else, --help included."""

import importlib
import re
import runpy
import sys
from pathlib import Path

import pytest

MODULES = sorted(path.stem for path in (Path(__file__).parent.parent / "benchmarks").glob("bench_*.py"))


def options_without_help(shown: str) -> list:
    """The options in argparse's help text that have no words of help after them."""
    lines = shown.split("options:", 1)[1].splitlines()[1:]
    bare = []
    for number, line in enumerate(lines):
        flags = re.match(r"  (-\S.*?)(?:\s{2,}(\S.*))?$", line)
        if not flags or flags.group(2):
            continue
        following = lines[number + 1] if number + 1 < len(lines) else ""
        if not following.startswith(" " * 6):          # help on the next line is indented past the flags
            bare.append(flags.group(1))
    return bare


@pytest.mark.timeout(60)
@pytest.mark.parametrize("module", MODULES)
def test_a_benchmark_module_answers_help_and_runs_nothing(module, monkeypatch, capsys):
    name = f"mrkd.benchmarks.{module}"
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_module(name, run_name="__main__", alter_sys=True)
    assert stopped.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: ")
    # The description is the docstring's whole first paragraph, not its first line cut mid-sentence.
    # (Compared without white space: argparse wraps lines, at hyphens too.)
    first_paragraph = "".join(importlib.import_module(name).__doc__.split("\n\n")[0].split())
    assert first_paragraph in "".join(shown.split())
    assert options_without_help(shown) == []


def test_the_check_for_options_without_help_finds_one():
    shown = ("usage: x\n\noptions:\n  -h, --help       show this help message and exit\n"
             "  --rounds ROUNDS\n  --quick          small sizes\n  --x X            --quick: this\n  --a-very-long-option-name LONG\n"
             "                   help on the next line\n  --last\n")
    assert options_without_help(shown) == ["--rounds ROUNDS", "--last"]
