"""`mrkd run` without its TOML reader (tomli before Python 3.11, which a Jetson install with
pip install --no-deps can lack): a run without --line needs none, and one with --line says so in one line.
Before, every `mrkd run` imported the reader at start and ended in a ModuleNotFoundError traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from runtime_fixtures import export_tiny_model

# Imported first by the subprocess (PYTHONPATH): neither TOML reader can be imported there.
NO_TOML_READER = '''
import sys
class NoTomlReader:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tomllib", "tomli"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTomlReader())
'''


def mrkd_run_without_toml_reader(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(NO_TOML_READER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "mrkd.cli", "run", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_the_blocker_blocks(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_TOML_READER)
    env = dict(os.environ, PYTHONPATH=str(blocker))
    probe = subprocess.run([sys.executable, "-c", "import tomllib"], env=env, capture_output=True, text=True)
    assert probe.returncode == 1 and "No module named 'tomllib'" in probe.stderr


def test_a_run_without_a_line_file_needs_no_toml_reader(tmp_path):
    model = export_tiny_model(tmp_path / "model.onnx")
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        cv2.imwrite(str(frames / f"{i}.png"), np.full((48, 64, 3), 40, np.uint8))
    done = mrkd_run_without_toml_reader(tmp_path, str(model), "--source", str(frames), "--max-frames", "3",
                                        "--status-every", "0", "--summary", "summary.json")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert (tmp_path / "summary.json").is_file()


def test_a_line_file_without_a_toml_reader_is_one_error_line(tmp_path):
    model = export_tiny_model(tmp_path / "model.onnx")
    (tmp_path / "line.toml").write_text(f'[[camera]]\nname = "a"\nsource = "frames/"\nmodel = "{model}"\n')
    done = mrkd_run_without_toml_reader(tmp_path, "--line", "line.toml")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "TOML" in lines[0], done.stderr
