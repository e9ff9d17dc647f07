"""The one check every hostile-input test makes of a command that refused: a non-zero exit, no
traceback, exactly one "Error:" line, naming what it should. Takes a click CliRunner result (commands
run in-process) or a finished subprocess (commands run as a user runs them)."""

from __future__ import annotations

import subprocess


def assert_one_line_error(outcome, *names: str) -> str:
    """The single "Error:" line of a refused command, after checking it names each of ``names``."""
    if isinstance(outcome, subprocess.CompletedProcess):
        assert outcome.returncode != 0, outcome.stdout + outcome.stderr
        text = outcome.stderr
    else:                                    # click.testing.Result: stdout and stderr in .output
        assert outcome.exit_code != 0, outcome.output
        assert outcome.exception is None or isinstance(outcome.exception, SystemExit), repr(outcome.exception)
        text = outcome.output
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, text
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]
