"""The once-per-file notes (several pages, transparency) of a training folder said once in a command's
output when it runs as several processes: torchrun ranks, each with DataLoader workers."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train_fixtures import CATEGORY, tiny_data

from mrkd.benchmarks.mosquitto import free_port

pytestmark = pytest.mark.slow


def _noted_files(root: Path) -> dict:
    """Turn one training and one test image into a 3-page TIFF and a partly transparent PNG (PIL);
    {path as the command names it: words of its note}."""
    notes = {}
    for split in ("train/good", "test/good"):
        folder = root / CATEGORY / split
        first, second = sorted(folder.glob("*.png"))[:2]
        image = Image.open(first).convert("RGB")
        image.save(folder / "stack.tiff", save_all=True, append_images=[image, image])
        rgba = np.dstack([np.asarray(Image.open(second).convert("RGB")), np.full(image.size[::-1], 255, np.uint8)])
        rgba[:8, :8, 3] = 0
        Image.fromarray(rgba, "RGBA").save(folder / "clear.png")
        first.unlink()
        second.unlink()
        notes[f"{folder / 'stack.tiff'}: a TIFF of 3 pages"] = 1
        notes[f"{folder / 'clear.png'}: "] = 1
    return notes


def test_torchrun_ranks_with_workers_say_each_files_note_once(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data(), root)
    notes = _noted_files(root)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    mrkd = Path(sys.executable).with_name("mrkd")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(mrkd), "train", str(root), "-c", CATEGORY, "--workers", "2",
               "--epochs", "2", "--eval-every", "1", "--image-size", "64", "--backbone", "resnet18",
               "--teacher-weights", "random", "--device", "cpu", "-o", str(tmp_path / "run")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    said = {note: output.count(note) for note in notes}
    assert said == notes, (list(said.values()), output[-3000:])
    from mrkd.train.teachers import RANDOM_TEACHER_WARNING
    assert output.count(RANDOM_TEACHER_WARNING) == 1, output[-3000:]     # the banner, from rank 0 alone
