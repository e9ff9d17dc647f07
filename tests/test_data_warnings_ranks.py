"""The data set's warnings of `mrkd train` said once in a command's output, under torchrun as in one process.

Every torchrun rank scans the same folder, so a warning about the folder (an unread GIF, an orphan mask,
a defect image without its mask, a skipped unreadable file, 12-bit values in 16-bit files) or about the
run's settings (--holdout 0, the feature cache off) is rank 0's to say, not once per rank.
"""

import os
import warnings
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from mrkd.benchmarks.mosquitto import free_port
from mrkd.train.teachers import RANDOM_TEACHER_WARNING

CATEGORY = "grain"


def _folder_with_warnings(root: Path) -> dict:
    """A tiny grain category with one thing of each kind to warn about; {words of the warning: 1}."""
    from mrkd.train.synthetic import generate_dataset
    generate_dataset(root, [CATEGORY], image_size=64, n_train=5, n_test_good=1, n_test_defect=1, seed=0,
                     progress=False)
    base = root / CATEGORY
    train_dir = base / "train" / "good"
    Image.new("RGB", (64, 64), (90, 90, 90)).save(train_dir / "phone.gif")             # a format mrkd skips
    cv2.imwrite(str(train_dir / "000_camera12bit.png"), np.full((64, 64), 4000, np.uint16))   # 12 of 16 bits
    (train_dir / "broken.png").write_bytes(b"not a png at all")                         # --skip-unreadable
    defect_type = next(d for d in sorted((base / "ground_truth").iterdir()) if d.is_dir())
    cv2.imwrite(str(defect_type / "ghost_mask.png"), np.zeros((64, 64), np.uint8))      # no test image
    test_image = next(iter(sorted((base / "test" / defect_type.name).glob("*.png"))))
    (base / "test" / defect_type.name / "unmasked.png").write_bytes(test_image.read_bytes())   # no mask
    return {f"{train_dir}: skipped 1 image(s) in a format mrkd does not read": 1,
            f"{train_dir}: 16-bit images use only 12 of their 16 bits": 1,
            f"{CATEGORY}: skipped 1 unreadable file(s)": 1,
            f"{CATEGORY}: 1 mask(s) in ground_truth/ have no test image": 1,
            f"{CATEGORY}: 1 defect image(s) have no mask in ground_truth/": 1,
            "--holdout 0: training on every good image": 1,
            "feature cache off: ": 1}


def _train_arguments(root: Path, out: Path) -> list:
    return ["train", str(root), "-c", CATEGORY, "--epochs", "1", "--eval-every", "0", "--image-size", "64",
            "--batch-size", "2", "--backbone", "resnet18", "--teacher-weights", "random", "--score", "mrkd",
            "--holdout", "0", "--feature-cache-mb", "0", "--skip-unreadable", "--device", "cpu", "-o", str(out)]


def _said(command: list, warned: dict):
    """({words: times the command's output holds them}, the output), the random-teacher banner included."""
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    said = {words: output.count(words) for words in [*warned, RANDOM_TEACHER_WARNING]}
    return said, output


@pytest.mark.slow
def test_torchrun_ranks_say_each_data_warning_once(tmp_path):
    root = tmp_path / "data"
    warned = _folder_with_warnings(root)
    mrkd = Path(sys.executable).with_name("mrkd")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), str(mrkd)]
    said, output = _said(torchrun + _train_arguments(root, tmp_path / "run"), warned)
    assert said == {**warned, RANDOM_TEACHER_WARNING: 1}, (said, output[-3000:])


@pytest.mark.slow
def test_one_process_says_each_data_warning_once(tmp_path):
    root = tmp_path / "data"
    warned = _folder_with_warnings(root)
    mrkd = Path(sys.executable).with_name("mrkd")
    said, output = _said([str(mrkd)] + _train_arguments(root, tmp_path / "run"), warned)
    assert said == {**warned, RANDOM_TEACHER_WARNING: 1}, (said, output[-3000:])



@pytest.mark.parametrize("rank, said", [(None, 5), ("0", 5), ("1", 0)])
def test_scanning_a_category_warns_on_rank_0_alone(tmp_path, monkeypatch, rank, said):
    from mrkd.train.data import scan_category
    warned = _folder_with_warnings(tmp_path)
    monkeypatch.delenv("RANK", raising=False)
    if rank is not None:
        monkeypatch.setenv("RANK", rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = scan_category(tmp_path, CATEGORY, skip_unreadable=True)
    words = [w for w in warned if w.startswith((str(tmp_path), CATEGORY))]
    assert len(words) == 5 and len(data.skipped_unreadable) == 1
    assert sorted(w for w in words if any(w in str(c.message) for c in caught)) == (sorted(words) if said else [])
    assert len(caught) == said, [str(c.message) for c in caught]


@pytest.mark.parametrize("rank, said", [(None, 1), ("1", 0)])
def test_a_random_teacher_is_warned_about_on_rank_0_alone(monkeypatch, rank, said):
    from mrkd.train.teachers import build_teacher
    monkeypatch.delenv("RANK", raising=False)
    if rank is not None:
        monkeypatch.setenv("RANK", rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_teacher("resnet18", "random")
    assert [str(c.message) for c in caught] == [RANDOM_TEACHER_WARNING] * said
    assert all(c.filename == __file__ for c in caught)     # said at the caller's caller, as before
