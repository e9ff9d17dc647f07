"""Training: it learns, writes loadable checkpoints, and calibrates to the quantile of good scores."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mrkd.runtime.images import read_image
from mrkd.runtime.preprocess import normalize_batch, resize_square
from mrkd.train.calibrate import calibrate
from mrkd.train.checkpoint import CheckpointError, load_checkpoint
from mrkd.train.data import scan_category
from mrkd.train.trainer import TrainConfig, split_holdout, train
from train_fixtures import CATEGORY, IMAGE_SIZE, TINY, tiny_data, trained_run


def _images(paths):
    squares = np.stack([resize_square(read_image(p), IMAGE_SIZE) for p in paths])
    return torch.from_numpy(normalize_batch(squares))


def _scores_by_hand(model, paths):
    """Image scores computed here: the max over each image's smoothed map."""
    with torch.no_grad():
        return model.anomaly_map(_images(paths)).flatten(1).max(1).values.numpy().astype(np.float64)


@pytest.mark.slow
def test_tiny_training_learns_and_writes_checkpoints():
    summary = trained_run()
    out = Path(summary["out_dir"])
    losses = [row["loss"] for row in summary["history"]]
    assert len(losses) == TINY["epochs"] and losses[-1] < losses[0]

    # The final checkpoint separates defects from good images (computed here, with sklearn) well above chance.
    model = load_checkpoint(out / "last.ckpt")
    items = scan_category(tiny_data(), CATEGORY).test_items
    scores = _scores_by_hand(model, [i.path for i in items])
    auroc = roc_auc_score([i.label for i in items], scores)
    assert auroc > 0.7, auroc

    raw = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)
    assert raw["format"] == "mrkd-checkpoint" and raw["calibration"]["threshold"] > 0
    assert raw["trained_on"]["category"] == CATEGORY
    state = torch.load(out / "last.ckpt", weights_only=True)["train_state"]
    assert state["epoch"] == TINY["epochs"] and len(state["history"]) == TINY["epochs"]
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.5, 0.999)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2] and "image_auroc" in history[-1]
    # Test-split numbers are monitoring only: labelled so, and no checkpoint is chosen with them.
    assert all("monitoring only" in row["monitoring"] for row in history)
    assert sorted(p.name for p in out.glob("*.ckpt")) == ["last.ckpt"]
    assert summary["checkpoint"] == str(out / "last.ckpt") and summary["errors"] == []


def test_holdout_split_is_seeded_and_disjoint():
    paths = [f"img{i:02d}.png" for i in range(30)]
    fit, held = split_holdout(paths, TrainConfig(holdout_fraction=0.1, seed=5))
    assert len(held) == 3 and not set(fit) & set(held) and sorted(fit + held) == paths
    assert split_holdout(paths, TrainConfig(holdout_fraction=0.1, seed=5)) == (fit, held)
    assert len(split_holdout(paths[:5], TrainConfig(holdout_fraction=0.1))[1]) == 2   # at least min_holdout


@pytest.mark.slow
def test_calibration_threshold_is_the_quantile_of_good_scores():
    model = load_checkpoint(Path(trained_run()["out_dir"]) / "last.ckpt")
    data = scan_category(tiny_data(), CATEGORY)
    good = data.train_paths[:12]
    expected = _scores_by_hand(model, good)

    result = calibrate(model, good, quantile=0.9)      # the default rule
    assert result.method == "quantile"
    assert result.threshold == pytest.approx(np.quantile(expected, 0.9), rel=1e-5)
    assert result.good_mean == pytest.approx(expected.mean(), rel=1e-5)
    assert model.calibration is result

    # Too few good images for a quantile: max + 10 % of the range.
    few = calibrate(model, good[:3])
    assert few.method == "max_margin"
    assert few.threshold == pytest.approx(expected[:3].max() + 0.1 * np.ptp(expected[:3]), rel=1e-5)

    # A normal tolerance bound on the same scores (k is checked by simulation in test_calibrate).
    bound = calibrate(model, good, quantile=0.99, method="tolerance")
    assert bound.method == "tolerance" and bound.tolerance_k > 2.33
    assert bound.threshold == pytest.approx(expected.mean() + bound.tolerance_k * expected.std(ddof=1),
                                           rel=1e-5)

    # Labelled images: the F1-optimal threshold, checked by brute force over every candidate.
    items = data.test_items
    labels = np.array([i.label for i in items])
    labelled = calibrate(model, good, labelled=([i.path for i in items], labels))
    scores = _scores_by_hand(model, [i.path for i in items])
    f1s = []
    for t in scores:
        flagged = scores >= t
        tp = np.sum(flagged & (labels == 1))
        f1s.append(2 * tp / (flagged.sum() + labels.sum()))
    assert labelled.method == "f1"
    assert labelled.f1_at_threshold == pytest.approx(max(f1s), rel=1e-6)


@pytest.mark.slow
def test_resume_with_other_settings_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run()["out_dir"], out)
    changed = TrainConfig(**{**TINY, "lr": 0.001})
    with pytest.raises(CheckpointError, match="lr"):
        train(tiny_data(), CATEGORY, out, changed, backbone="resnet18", teacher_weights="random")


@pytest.mark.slow
def test_resume_on_another_data_folder_is_a_clear_error(tmp_path):
    """The same --out on another folder of images resumed (or "finished") the first folder's model without
    a word: the run's identity now holds the data folder."""
    out = tmp_path / "run"
    shutil.copytree(trained_run()["out_dir"], out)
    other = tmp_path / "copy"
    shutil.copytree(tiny_data(), other)                       # the same images, but not the folder it trained on
    with pytest.raises(CheckpointError, match=r"data_root: saved .* != now .*copy"):
        train(other, CATEGORY, out, TrainConfig(**TINY), backbone="resnet18", teacher_weights="random")


def test_skip_unreadable_skips_in_a_plain_folder_too(tmp_path):
    """--skip-unreadable was honoured for the MVTec layout only: a plain folder with a cut file failed,
    naming the option it had been given."""
    import warnings
    from mrkd.train.data import DataError, scan_folder
    folder = tmp_path / "good"
    shutil.copytree(Path(tiny_data()) / CATEGORY / "train" / "good", folder)
    whole = sorted(folder.iterdir())
    (folder / "zz_cut.png").write_bytes(whole[0].read_bytes()[:40])
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        paths = scan_folder(folder, skip_unreadable=True)
    assert sorted(paths) == sorted(str(p) for p in whole)
    assert any("skipped 1 unreadable" in str(w.message) for w in said)
    assert len(scan_folder(folder)) == len(whole) + 1            # without the option it is listed (and fails later)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="no readable training images"):
        scan_folder(tmp_path / "junk", skip_unreadable=True)


def test_an_unfinished_runs_checkpoint_is_named_so_by_what_uses_it(tmp_path):
    """last.ckpt is also the snapshot of a run that was killed (or still runs): evaluating, predicting
    with, exporting or recalibrating it said nothing, though its bank and threshold are not the finished
    model's. A finished run records finished=True and gets no such line."""
    from click.testing import CliRunner
    from mrkd.cli import main
    finished = Path(trained_run()["out_dir"]) / "last.ckpt"
    data = torch.load(finished, weights_only=True)
    assert data["train_state"]["finished"] is True and data["train_state"]["epochs_planned"] == TINY["epochs"]
    killed = tmp_path / "killed" / "last.ckpt"
    killed.parent.mkdir()
    torch.save({**data, "train_state": {**data["train_state"], "finished": False, "epoch": 1, "epochs_planned": 200}},
               killed)
    good = str(Path(tiny_data()) / CATEGORY / "train" / "good")
    for args in (["predict", killed, good, "-o", tmp_path / "p"], ["export", killed, "-o", tmp_path / "e"],
                 ["calibrate", killed, good, "-o", tmp_path / "c.ckpt", "--accept-shift"]):
        done = CliRunner().invoke(main, [str(a) for a in args])
        assert done.exit_code == 0, done.output
        assert "unfinished training run (epoch 1 of 200)" in done.output, (args[0], done.output)
    clean = CliRunner().invoke(main, ["predict", str(finished), good, "-o", str(tmp_path / "p2")])
    assert clean.exit_code == 0 and "unfinished training run" not in clean.output, clean.output


def test_training_with_workers_leaves_sigchld_as_it_found_it(tmp_path, monkeypatch):
    """DataLoader workers install torch's SIGCHLD handler for the whole process (with OpenVINO loaded,
    the next child's exit crashed the interpreter); train() and the test-split evaluation keep torch
    from installing it while their workers run (a full suite run crashed once in this very test, with
    the handler installed during training) and leave it as it was."""
    import signal

    from torch.utils.data._utils import signal_handling
    monkeypatch.setattr(signal_handling, "_SIGCHLD_handler_set", False)   # as in a fresh process
    before = signal.getsignal(signal.SIGCHLD)
    seen = []
    install = signal_handling._set_SIGCHLD_handler

    def watched():      # what the workers' start leaves installed
        install()
        seen.append(signal.getsignal(signal.SIGCHLD))

    monkeypatch.setattr(signal_handling, "_set_SIGCHLD_handler", watched)
    config = TrainConfig(**{**TINY, "epochs": 1, "num_workers": 1})
    train(tiny_data(), CATEGORY, tmp_path / "run", config, backbone="resnet18", teacher_weights="random",
          resume=False)
    assert seen and all(handler is before for handler in seen)      # workers started, SIGCHLD untouched
    assert signal.getsignal(signal.SIGCHLD) is before
    assert signal_handling._SIGCHLD_handler_set is False             # a loader of the caller's may set it


def test_a_glob_of_good_images_is_named_after_its_folder_not_its_pattern():
    """`mrkd train "good_parts/*.jpg"` recorded the category '*.jpg' in the checkpoint (and printed
    '*.jpg: loss ...'): the pattern names no part; the folder it lives in does."""
    from mrkd.train.checkpoint import plain_images_name, trained_on
    assert trained_on("good_parts/*.jpg", None)["category"] == "good_parts"
    assert trained_on("/mnt/line7/cam*/ok_*.png", None)["category"] == "line7"
    assert trained_on("good_parts/", None)["category"] == "good_parts"
    assert trained_on("data", "washer")["category"] == "washer"
    assert plain_images_name("*.png") == "images"
    assert plain_images_name("good_parts/*.jpg") == "good_parts"


def test_train_help_says_where_a_plain_folders_checkpoint_goes(tmp_path):
    """--out's help said <out>/<category>/last.ckpt only; a plain folder or glob of good images is
    written to <out>/last.ckpt, with no category folder."""
    from click.testing import CliRunner
    from mrkd.cli import main
    help_text = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    good = Path(tiny_data()) / CATEGORY / "train" / "good"
    done = CliRunner().invoke(main, ["train", f"{good}/*.png", "--out", str(tmp_path / "run"), "--epochs", "1",
                                     "--image-size", str(IMAGE_SIZE), "--batch-size", "8", "--backbone", "resnet18",
                                     "--teacher-weights", "random", "--score", "mrkd"])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "run" / "last.ckpt").is_file() and not (tmp_path / "run" / "good").exists()
    assert "a plain folder or glob of images: <out>/last.ckpt" in help_text
    # a small set holds out a handful of images: the threshold then rests on too few to trust, said once
    held = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["calibration"]["n_good"]
    said = [line for line in done.output.splitlines() if "rests on" in line]
    assert held < 10 and len(said) == 1, done.output
    assert said[0].startswith("warning:") and f"rests on {held} good image(s)" in said[0]
    assert f"mrkd calibrate {tmp_path / 'run' / 'last.ckpt'} GOOD_IMAGES" in said[0]


def test_few_good_images_judges_the_count_behind_a_threshold_from_good_scores():
    from mrkd.runtime.calibration import MIN_SCORES_FOR_QUANTILE, Calibration, few_good_images
    assert MIN_SCORES_FOR_QUANTILE == 10
    assert "rests on 4 good image(s) (max_margin)" in few_good_images(Calibration(1.0, "max_margin", n_good=4))
    assert few_good_images(Calibration(1.0, "quantile", n_good=10)) is None
    assert few_good_images(Calibration(1.0, "tolerance", n_good=9)) is not None
    assert few_good_images(Calibration(1.0, "manual")) is None and few_good_images(Calibration(1.0, "f1", n_good=3)) is None


def test_an_unreadable_held_out_image_stops_training_before_the_first_epoch(tmp_path):
    """The held-out images were read only after the last epoch: a broken one there ended a long run
    uncalibrated with exit status 0 (the same file among the fitted images stopped it at once)."""
    from mrkd.train.data import DataError, scan_folder
    good = tmp_path / "good"
    shutil.copytree(Path(tiny_data()) / CATEGORY / "train" / "good", good)
    config = TrainConfig(**{**TINY, "epochs": 1, "eval_every": 0}, score="mrkd")
    _, held_out = split_holdout(scan_folder(good), config)
    Path(held_out[0]).write_text("not an image")
    with pytest.raises(DataError, match=r"held out for calibration"):
        train(good, None, tmp_path / "run", config, backbone="resnet18", teacher_weights="random", resume=False)
    assert not (tmp_path / "run").exists()          # stopped before anything was trained or written
    summary = train(good, None, tmp_path / "run", config, backbone="resnet18", teacher_weights="random",
                    resume=False, skip_unreadable=True)
    assert summary["calibration"] is not None and summary["errors"] == []
    assert held_out[0] not in summary["holdout"]


def test_no_resume_never_replaces_a_finished_runs_model(tmp_path):
    """--no-resume wrote its first epoch over whatever last.ckpt held: a finished, calibrated model was
    lost (and only half replaced when the new run was stopped). It starts over on an unfinished run's
    snapshot only, as the resume errors advise."""
    from click.testing import CliRunner
    from mrkd.cli import main
    finished = Path(trained_run()["out_dir"]) / "last.ckpt"
    out = tmp_path / CATEGORY
    out.mkdir()
    shutil.copy(finished, out / "last.ckpt")
    before = (out / "last.ckpt").read_bytes()
    done = CliRunner().invoke(main, ["train", str(tiny_data()), "-c", CATEGORY, "--out", str(tmp_path), "--epochs",
                                     "1", "--image-size", str(IMAGE_SIZE), "--backbone", "resnet18",
                                     "--teacher-weights", "random", "--score", "mrkd", "--no-resume"])
    assert done.exit_code == 1, done.output
    assert "Error: " in done.output and "finished training run's model" in done.output
    assert (out / "last.ckpt").read_bytes() == before and "Traceback" not in done.output

    data = torch.load(finished, weights_only=True)
    torch.save({**data, "train_state": {**data["train_state"], "finished": False, "epoch": 1}}, out / "last.ckpt")
    config = TrainConfig(**{**TINY, "epochs": 1, "eval_every": 0}, score="mrkd")
    summary = train(tiny_data(), CATEGORY, out, config, backbone="resnet18", teacher_weights="random", resume=False)
    assert [row["epoch"] for row in summary["history"]] == [1]      # started over, not resumed
    assert torch.load(out / "last.ckpt", weights_only=True)["train_state"]["finished"] is True


@pytest.mark.parametrize("as_given", ["absolute", "relative"])
def test_a_category_that_is_a_path_is_refused_before_anything_is_written(tmp_path, as_given):
    """--category is joined to DATA_ROOT to read and to --out to write: an absolute path or "../x"
    trained (or evaluated) and put last.ckpt, history.jsonl and metrics into the data folder itself."""
    from click.testing import CliRunner
    from mrkd.cli import main
    from mrkd.errors import SettingError
    from mrkd.train.evaluate import evaluate_all
    shutil.copytree(Path(tiny_data()) / CATEGORY, tmp_path / "data" / CATEGORY)
    category = str(tmp_path / "data" / CATEGORY) if as_given == "absolute" else f"../data/{CATEGORY}"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done = CliRunner().invoke(main, ["train", str(tmp_path / "data"), "-c", category, "--out", str(tmp_path / "runs"),
                                     "--epochs", "1", "--image-size", str(IMAGE_SIZE), "--backbone", "resnet18",
                                     "--teacher-weights", "random", "--score", "mrkd", "--eval-every", "0"])
    assert done.exit_code == 2, done.output
    assert done.output.strip().splitlines()[-1].startswith("Error: category ") and "Traceback" not in done.output
    with pytest.raises(SettingError, match="name of one folder"):
        evaluate_all(Path(trained_run()["out_dir"]) / "last.ckpt", tmp_path / "data", [category],
                     out_dir=tmp_path / "eval", progress=False)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_knn_memory_takes_every_patch_as_the_library_does(tmp_path):
    """TrainConfig takes knn_memory_fraction in (0, 1]; `mrkd train --knn-memory 1` was refused ("not in
    the range 0.0<x<1.0"), so the whole bank (up to --knn-max-patches) could not be asked for."""
    from click.testing import CliRunner
    from mrkd.cli import main
    args = ["train", str(Path(tiny_data()) / CATEGORY / "train" / "good"), "--epochs", "1", "--image-size",
            str(IMAGE_SIZE), "--backbone", "resnet18", "--teacher-weights", "random", "--knn-max-patches", "0"]
    refused = CliRunner().invoke(main, args + ["--out", str(tmp_path / "over"), "--knn-memory", "1.01"])
    assert refused.exit_code == 2 and "--knn-memory" in refused.output
    done = CliRunner().invoke(main, args + ["--out", str(tmp_path / "all"), "--knn-memory", "1"])
    assert done.exit_code == 0, done.output
    data = torch.load(tmp_path / "all" / "last.ckpt", weights_only=True)
    fitted = 16 - len(data["train_state"]["holdout"])
    assert data["memory_bank"].shape[0] == fitted * (IMAGE_SIZE // 8) ** 2     # every stride-8 patch


def test_a_calibration_failure_at_the_end_of_mrkd_train_is_said_once(tmp_path, monkeypatch):
    """The trainer says a calibration failure when it happens; `mrkd train` said it a second time in
    its summary, so the one problem looked like two."""
    from click.testing import CliRunner

    import mrkd.train.calibrate
    from mrkd.cli import main

    def failing(*_args, **_kwargs):
        raise RuntimeError("no finite score on the held-out images")
    monkeypatch.setattr(mrkd.train.calibrate, "calibrate", failing)
    good = Path(tiny_data()) / CATEGORY / "train" / "good"
    done = CliRunner().invoke(main, ["train", f"{good}/*.png", "--out", str(tmp_path / "run"), "--epochs", "1",
                                     "--image-size", str(IMAGE_SIZE), "--batch-size", "8", "--backbone", "resnet18",
                                     "--teacher-weights", "random", "--score", "mrkd", "--eval-every", "0"])
    assert done.exit_code == 0, done.output
    said = [line for line in done.stderr.splitlines() if "no finite score on the held-out images" in line]
    assert len(said) == 1, done.stderr
    assert "uncalibrated" in said[0] and str(tmp_path / "run" / "last.ckpt") in said[0]
    assert "threshold None" in done.stdout and "(1 problem(s) reported above)" in done.stdout


def test_warnings_and_reports_during_the_epoch_bar_start_a_line_of_their_own(tmp_path):
    """The epoch bar is redrawn in place (a carriage return, no newline): a warning or a failed
    monitoring report printed while it was live came after the bar on the same line
    ("train grain:  50%|#####     | 1/2 [...]mrkd train: epoch 1: ..."). Run in a process of its own:
    under pytest every warning is recorded, never written."""
    import re
    import subprocess
    import sys

    script = (
        "import sys, warnings\n"
        "import mrkd.train.trainer as trainer\n"
        "from mrkd.cli import main\n"
        "def monitoring(*args, **kwargs):\n"
        "    warnings.warn('a warning while the epoch bar is live')\n"
        "    raise RuntimeError('monitoring broke')\n"
        "trainer.metrics_on_test_split = monitoring\n"
        "main(sys.argv[1:])\n")
    done = subprocess.run([sys.executable, "-c", script, "train", str(tiny_data()), "-c", CATEGORY, "--out",
                           str(tmp_path / "run"), "--epochs", "2", "--eval-every", "1", "--image-size",
                           str(IMAGE_SIZE), "--batch-size", "8", "--backbone", "resnet18", "--teacher-weights",
                           "random", "--score", "mrkd"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"train {CATEGORY}:" in done.stderr                   # the bar was drawn
    segments = re.split(r"[\r\n]", done.stderr)                  # what a terminal shows from a line's start
    for said in ("warning: a warning while the epoch bar is live",
                 "mrkd train: epoch 1: test-split evaluation failed (RuntimeError: monitoring broke)"):
        assert any(segment.startswith(said) for segment in segments), done.stderr
        assert not any(said in segment and not segment.startswith(said) for segment in segments), done.stderr


def test_a_run_folders_hidden_folders_are_no_categories(tmp_path):
    # A category folder put aside as .washer.old/ (or Jupyter's .ipynb_checkpoints/) with a last.ckpt in it:
    # mrkd evaluate RUN_DIR evaluated it as one more category.
    from mrkd.train.evaluate import find_checkpoints
    for folder in ("washer", ".washer.old", ".ipynb_checkpoints"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "last.ckpt").write_bytes(b"x")     # find_checkpoints looks at names only
    assert find_checkpoints(tmp_path) == {"washer": tmp_path / "washer" / "last.ckpt"}


def test_one_default_epoch_count_for_the_cli_and_the_library():
    """mrkd train and TrainConfig run the same DEFAULT_EPOCHS (chosen in benchmarks/bench_epochs.py)."""
    from click.testing import CliRunner

    from mrkd.cli import main
    from mrkd.train import DEFAULT_EPOCHS
    from mrkd.train.trainer import TrainConfig
    assert TrainConfig().epochs == DEFAULT_EPOCHS == 10
    help_text = " ".join(CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output.split())
    assert f"goes on from its model. [default: {DEFAULT_EPOCHS};" in help_text
