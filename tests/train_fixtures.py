"""Helpers shared by the training tests: one tiny synthetic data set and one tiny trained run per session.

Cached at module level (not a pytest fixture) so test_train, test_eval_predict and test_cli share
one training run instead of training three times.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

IMAGE_SIZE = 64
CATEGORY = "grain"          # a texture: learnable by a random resnet18 teacher in two epochs
TINY = dict(epochs=2, batch_size=4, image_size=IMAGE_SIZE, eval_every=1, seed=3, progress=False)


def temp_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def tiny_data() -> Path:
    """grain at 64 px: 16 good train, 12 good test and 3 per defect type (15 defective) test images."""
    from mrkd.train.synthetic import generate_dataset
    root = temp_dir("mrkd-data-") / "data"
    generate_dataset(root, [CATEGORY], image_size=IMAGE_SIZE, n_train=16, n_test_good=12, n_test_defect=3,
                     seed=0, progress=False)
    return root


@functools.lru_cache(maxsize=None)
def trained_run() -> dict:
    """Two epochs of resnet18 (random teacher) on tiny_data(); the train() summary (+ "data_root")."""
    from mrkd.train.trainer import TrainConfig, train
    out = temp_dir("mrkd-run-") / CATEGORY
    summary = train(tiny_data(), CATEGORY, out, TrainConfig(**TINY), backbone="resnet18",
                    teacher_weights="random", resume=False)
    summary["data_root"] = tiny_data()
    return summary
