"""`mrkd train` as a newcomer misuses it: the same command typed again after `mrkd calibrate` set the
threshold in place, Ctrl-C before the first epoch was saved, an image file given where a folder of
images belongs. Each ends in a correct result or one line that says what happened."""

import shutil

import pytest
import torch
from click.testing import CliRunner

from mrkd.cli import main
from mrkd.train.calibrate import recalibrate_checkpoint
from mrkd.train.checkpoint import CheckpointError
from mrkd.train.trainer import TrainConfig, train
from cli_errors import assert_one_line_error
from train_fixtures import CATEGORY, TINY, tiny_data, trained_run


def _finished_run_recalibrated(tmp_path):
    """A copy of the tiny finished run whose last.ckpt `mrkd calibrate` then set again in place (on the
    test split's good images: other parts than training held out)."""
    out = tmp_path / CATEGORY
    shutil.copytree(trained_run()["out_dir"], out)
    good = sorted(str(p) for p in (tiny_data() / CATEGORY / "test" / "good").iterdir())
    recalibrate_checkpoint(out / "last.ckpt", good, accept_shift=True, warn=lambda text: None)
    return out


def _threshold(path) -> float:
    return torch.load(path, weights_only=True)["calibration"]["threshold"]


def test_a_finished_run_started_again_keeps_a_threshold_mrkd_calibrate_set_later(tmp_path):
    """Before: the same `mrkd train` command again re-fitted the bank and calibrated on the held-out
    training images, writing over the threshold set on the line's parts, without a word (exit 0)."""
    out = _finished_run_recalibrated(tmp_path)
    before = (out / "last.ckpt").read_bytes()
    with pytest.raises(CheckpointError, match="mrkd calibrate") as refused:
        train(tiny_data(), CATEGORY, out, TrainConfig(**TINY), backbone="resnet18", teacher_weights="random")
    assert f"{_threshold(out / 'last.ckpt'):g}" in str(refused.value)
    assert (out / "last.ckpt").read_bytes() == before


def test_a_recalibrated_run_given_more_epochs_trains_on_and_says_the_threshold_is_replaced(tmp_path):
    """More epochs make other weights, on which the earlier threshold says nothing: the run goes on (as
    README promises) and warns that the threshold set after training is replaced."""
    out = _finished_run_recalibrated(tmp_path)
    later = _threshold(out / "last.ckpt")
    config = TrainConfig(**{**TINY, "epochs": TINY["epochs"] + 1, "eval_every": 0})
    with pytest.warns(UserWarning, match="set after training") as said:
        summary = train(tiny_data(), CATEGORY, out, config, backbone="resnet18", teacher_weights="random")
    assert f"{later:g}" in str(said[0].message)
    assert [row["epoch"] for row in summary["history"]] == list(range(1, TINY["epochs"] + 2))
    assert _threshold(out / "last.ckpt") == summary["calibration"].threshold != later


@pytest.mark.parametrize("plain", [False, True], ids=["category", "plain folder"])
def test_ctrl_c_before_the_first_epoch_was_saved_says_nothing_was_kept(tmp_path, monkeypatch, plain):
    """Before: "every epoch saved so far is in last.ckpt under OUT: run the same command again to go on
    from the last one", with no last.ckpt anywhere (the next run starts from scratch)."""
    import mrkd.train.trainer as trainer

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer, "train", stopped)
    monkeypatch.setattr(trainer, "train_all", stopped)
    out = tmp_path / "runs"
    data = [tiny_data() / CATEGORY / "train" / "good"] if plain else [tiny_data(), "-c", CATEGORY]
    done = CliRunner().invoke(main, ["train", *map(str, data), "-o", str(out), "--backbone", "resnet18",
                                     "--teacher-weights", "random"])
    assert done.exit_code == 130, done.output
    said = [line for line in done.output.splitlines() if "training stopped" in line]
    assert len(said) == 1 and "Ctrl-C" in said[0], done.output
    assert "before its first epoch was saved" in said[0] and "in last.ckpt" not in said[0], said[0]
    assert not list(out.rglob("last.ckpt"))


def test_an_image_file_given_for_the_folder_of_good_images_is_called_a_file(tmp_path):
    """Before: "missing folder .../000.png", naming a file that is there."""
    image = sorted((tiny_data() / CATEGORY / "train" / "good").iterdir())[0]
    done = CliRunner().invoke(main, ["train", str(image), "-o", str(tmp_path / "runs")])
    line = assert_one_line_error(done, str(image), "is a file, not a folder")
    assert "missing" not in line


@pytest.mark.parametrize("images,batch_size", [(2, 1), (1, 4)], ids=["batch size 1", "one image"])
def test_batches_of_one_image_at_image_size_32_are_refused_in_one_line(tmp_path, images, batch_size):
    """At --image-size 32 the bottleneck's map is 1×1, where BatchNorm cannot train on a batch of one image.
    Before: a ValueError traceback from torch's batch_norm in the first step."""
    folder = tmp_path / "good"
    folder.mkdir()
    for image in sorted((tiny_data() / CATEGORY / "train" / "good").iterdir())[:images]:
        shutil.copy(image, folder / image.name)
    done = CliRunner().invoke(main, ["train", str(folder), "-o", str(tmp_path / "run"), "--backbone", "resnet18",
                                     "--teacher-weights", "random", "--image-size", "32", "--epochs", "1",
                                     "--holdout", "0", "--batch-size", str(batch_size), "--score", "mrkd"])
    assert_one_line_error(done, "--image-size 32", "batch")
    assert not (tmp_path / "run" / "last.ckpt").exists()
