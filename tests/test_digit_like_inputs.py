"""Numbers a user types or writes into a line file are read from ASCII digits only. str.isdigit() is
true of "²", "①" and the like, which int() refuses: each place that checked isdigit() and then called
int() ended `mrkd run` with a ValueError traceback (a camera index, a --modbus or --http port, a line
file's recipe number) instead of the one-line error the same mistake in ASCII letters gets. Each case
runs `mrkd run` as a user does, in a subprocess with a timeout."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from cli_errors import assert_one_line_error
from runtime_fixtures import build_tiny_model

TIMEOUT_S = 60


def mrkd(*args, cwd) -> subprocess.CompletedProcess:
    code = f"import sys\nfrom mrkd.cli import main\nsys.argv[0] = 'mrkd'\nmain({list(map(str, args))!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    import cv2
    folder = tmp_path_factory.mktemp("digits")
    build_tiny_model(folder / "tiny.onnx")
    (folder / "parts").mkdir()
    cv2.imwrite(str(folder / "parts" / "a.png"), np.zeros((40, 40, 3), np.uint8))
    return folder


def line_file(folder, source="parts", recipes=""):
    path = folder / "line.toml"
    path.write_text(f'[[camera]]\nname = "top"\nsource = "{source}"\nmodel = "tiny.onnx"\ntrigger = "software"\n'
                    f'{recipes}', encoding="utf-8")
    return path


@pytest.mark.parametrize("args, names", [
    (["--source", "\u00b2"], ["\u00b2"]),                                                  # a camera index?
    (["--source", "top=\u2460"], ["\u2460"]),
    (["--source", "parts", "--trigger", "software", "--trigger-every", "1", "--modbus", "127.0.0.1:5\u00b2"],
     ["--modbus"]),
    (["--source", "parts", "--http", "127.0.0.1:8\u00b2"], ["--http"]),
])
def test_digit_like_characters_on_the_command_line_are_one_line_errors(cell, args, names):
    assert_one_line_error(mrkd("run", "tiny.onnx", *args, "--max-frames", "1", cwd=cell), *names)


@pytest.mark.parametrize("source, recipes, names", [
    ("\u00b2", "", ["top", "\u00b2"]),
    ("parts", '[recipes]\n"\u00b2" = "tiny.onnx"\n', ["recipes.\u00b2"]),
])
def test_digit_like_characters_in_a_line_file_are_one_line_errors(cell, source, recipes, names):
    path = line_file(cell, source, recipes)
    assert_one_line_error(mrkd("run", "--line", path, "--trigger-every", "1", "--max-parts", "1", cwd=cell), *names)
