"""A training run killed after its first saved epoch resumes there and ends where an uninterrupted run ends."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from mrkd.train.trainer import TrainConfig, train
from train_fixtures import CATEGORY, tiny_data

pytestmark = pytest.mark.slow

SETTINGS = dict(epochs=2, batch_size=4, image_size=64, eval_every=0, seed=7, progress=False)
TRAIN_SCRIPT = """
import sys, warnings
warnings.simplefilter("ignore")
from mrkd.train.trainer import TrainConfig, train
train(sys.argv[1], sys.argv[2], sys.argv[3], TrainConfig(**{settings!r}), backbone="resnet18",
      teacher_weights="random")
"""


def _weights(path):
    data = torch.load(path, weights_only=True)
    return {f"{part}.{k}": v for part in ("bottleneck", "student") for k, v in data[part].items()}


def _train(out):
    return train(tiny_data(), CATEGORY, out, TrainConfig(**SETTINGS), backbone="resnet18", teacher_weights="random")


def test_killed_run_resumes_from_its_last_epoch_and_matches_an_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT.format(settings=SETTINGS), str(tiny_data()),
                                CATEGORY, str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "last.ckpt").exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.02)
    process.kill()
    process.wait()
    saved = torch.load(killed / "last.ckpt", weights_only=True)["train_state"]
    saved_epoch = saved["epoch"]
    assert 1 <= saved_epoch < SETTINGS["epochs"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # as the killed process: the same arithmetic, bit for bit
    try:
        resumed = _train(killed)
        uninterrupted = _train(tmp_path / "straight")
    finally:
        torch.set_num_threads(threads)

    epochs = [row["epoch"] for row in resumed["history"]]
    assert epochs == list(range(1, SETTINGS["epochs"] + 1))
    assert resumed["history"][:saved_epoch] == saved["history"]     # earlier epochs were not trained again
    lines = (killed / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == epochs

    assert [r["loss"] for r in resumed["history"]] == pytest.approx([r["loss"] for r in uninterrupted["history"]],
                                                                     rel=1e-6)
    ours, reference = _weights(killed / "last.ckpt"), _weights(tmp_path / "straight" / "last.ckpt")
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

    # Resuming a finished run trains no further and leaves the weights as they are.
    again = _train(killed)
    assert again["history"] == resumed["history"]
    after = _weights(killed / "last.ckpt")
    assert all(torch.equal(ours[k], after[k]) for k in ours)


def test_sigterm_during_mrkd_train_says_how_to_resume_and_the_same_command_goes_on(tmp_path):
    """SIGTERM after the first saved epoch: one line naming the signal and the resume, exit 143, no
    traceback; the same command again goes on from the epochs saved (its history keeps them)."""
    out = tmp_path / "runs"

    def command(epochs):
        return [sys.executable, "-m", "mrkd.cli", "train", str(tiny_data()), "-c", CATEGORY, "-o", str(out),
                "--backbone", "resnet18", "--teacher-weights", "random", "--image-size", "64", "--epochs", str(epochs),
                "--batch-size", "4", "--eval-every", "0", "--score", "mrkd", "--seed", "7"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command(30), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / CATEGORY / "last.ckpt").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    time.sleep(0.5)
    process.terminate()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, (stdout, stderr)
    assert "Traceback" not in stderr, stderr
    said = [line for line in stderr.splitlines() if "training stopped" in line]
    assert len(said) == 1 and "SIGTERM" in said[0] and "run the same command again" in said[0], stderr
    done_epochs = int(torch.load(out / CATEGORY / "last.ckpt", weights_only=True)["train_state"]["epoch"])
    assert 1 <= done_epochs < 30
    done = subprocess.run(command(done_epochs + 1), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (out / CATEGORY / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows if "epoch" in row] == list(range(1, done_epochs + 2)), rows
