"""Every warning mrkd writes for the person at the terminal begins the same way: ``warning: `` and the
message on one line, made by mrkd.errors.warning_line (Python warnings under the command boundary too).
Hand-written prefixes had drifted apart (``WARNING camera ...``, ``WARNING: ...``, ``warning: ...``), so
a grep or a log filter for one missed the others. The log records of a running line keep logging's
``WARNING logger.name: ...``: they are a log, not these lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from mrkd.errors import WARNING_PREFIX, _one_line_warning, warning_line

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mrkd", "runtime", "train", "export")
HAND_WRITTEN = re.compile(r"\s*warning\s*[:!-]|\s*warning ", re.IGNORECASE)    # "WARNING camera", "warning: ..."


def literal_starts(tree: ast.AST):
    """(node, text) of each string literal (an f-string's parts among them)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node, node.value


def test_no_warning_line_is_written_by_hand():
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "mrkd" / "errors.py":     # where the one prefix is
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                          if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                          and node.body and isinstance(node.body[0], ast.Expr)}
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {text[:60]!r}" for node, text in literal_starts(tree)
                      if HAND_WRITTEN.match(text) and id(node) not in docstrings]
    assert found == [], "write these through mrkd.errors.warning_line:\n" + "\n".join(found)


def test_the_warning_line_is_one_line_with_the_one_prefix():
    assert WARNING_PREFIX == "warning: "
    assert warning_line("camera top: threshold 2\n  is far off") == "warning: camera top: threshold 2 | is far off"
    # a Python warning under the command boundary reads the same
    shown = _one_line_warning(UserWarning("good: skipped 1 file\n"), UserWarning, "x.py", 1)
    assert shown == warning_line("good: skipped 1 file") + "\n"
