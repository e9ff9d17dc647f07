"""One error hierarchy, one boundary (issue 19.3) and hints that lead somewhere (issue 20.9).

Every command of mrkd/commands.py is run as a subprocess with a classic user mistake: exactly one
``Error:`` line naming what was wrong, a non-zero exit, no traceback. Then: the expected errors of
the library are MrkdError subclasses; a training checkpoint given to `mrkd run` says "export it
first"; the ImageNet download that cannot happen names the choices; an unnamed --source never takes
a name another --source has; a folder with --loop runs past its first pass; a source that dies ends
the run with a non-zero exit and one line.
"""

import json
import os
import subprocess
import sys

import cv2
import pytest

from cli_errors import assert_one_line_error
from runtime_fixtures import export_tiny_model, normal_then_defective

from mrkd.commands import COMMANDS

TIMEOUT_S = 120


def mrkd(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    code = f"import sys\nfrom mrkd.cli import main\nsys.argv[0] = 'mrkd'\nmain({list(map(str, args))!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mistakes")
    images = folder / "images"
    images.mkdir()
    for i, frame in enumerate(normal_then_defective(12, 0, seed=3)):
        cv2.imwrite(str(images / f"{i:02d}.png"), frame)
    not_a_checkpoint = folder / "last.ckpt"
    not_a_checkpoint.write_text("this is no checkpoint\n")
    events = folder / "events.jsonl"
    events.write_text("{not json\n")
    labels = folder / "labels.jsonl"     # a label file that reads (no labels yet): refit's mistake is the checkpoint
    labels.write_text("")
    model = export_tiny_model(folder / "model.onnx")
    return {"dir": folder, "images": images, "ckpt": not_a_checkpoint, "events": events, "labels": labels, "model": model}


# One classic mistake per command, and the words its one Error: line must contain.
MISTAKES = {
    "generate": (lambda f: ["generate", f["dir"] / "data", "--categories", "nope"], ["nope"]),
    "train": (lambda f: ["train", f["images"], "--backbone", "resnet9000", "--epochs", "1", "-o", f["dir"] / "runs"],
              ["resnet9000"]),
    "calibrate": (lambda f: ["calibrate", f["model"], f["dir"] / "missing-folder"], ["missing-folder"]),
    "eval": (lambda f: ["eval", f["ckpt"], f["images"]], ["last.ckpt"]),
    "predict": (lambda f: ["predict", f["ckpt"], f["images"], "-o", f["dir"] / "pred"], ["last.ckpt"]),
    "export": (lambda f: ["export", f["ckpt"], "-o", f["dir"] / "exported"], ["last.ckpt"]),
    "run": (lambda f: ["run", f["model"]], ["--source"]),
    "cameras": (lambda f: ["cameras", "--all-of-them"], ["--all-of-them"]),
    "bench": (lambda f: ["bench", "--only", "nothing"], ["nothing"]),
    "review": (lambda f: ["review", f["events"], "--labels", f["dir"] / "labels.jsonl"], ["events.jsonl"]),
    "refit": (lambda f: ["refit", f["ckpt"], "--reviewed", f["labels"], "--good", f["images"]], ["last.ckpt"]),
    "demo": (lambda f: ["demo", "--out", f["ckpt"]], ["last.ckpt"]),
}


def test_every_command_has_a_mistake_here():
    assert sorted(MISTAKES) == sorted(COMMANDS)


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(MISTAKES))
def test_a_classic_mistake_is_assert_one_line_error(files, command):
    args, names = MISTAKES[command]
    assert_one_line_error(mrkd(*args(files), cwd=files["dir"]), *names)


def test_library_errors_for_user_mistakes_are_mrkd_errors():
    from mrkd.errors import MrkdError, SettingError
    from mrkd.runtime.gpu import NoGpuError
    from mrkd.runtime.line.linefile import LineFileError
    from mrkd.runtime.line.loop import LineError
    from mrkd.runtime.outputs.mqtt import MqttSettingsError
    from mrkd.runtime.sources import SourceUnreachable
    from mrkd.train.elpv import ElpvError
    for error in (LineError, LineFileError, MqttSettingsError, NoGpuError, ElpvError, SettingError,
                  SourceUnreachable):
        assert issubclass(error, MrkdError), error
    from mrkd.train.teachers import teacher_spec
    from mrkd.train.trainer import TrainConfig
    with pytest.raises(SettingError, match="resnet9000"):
        teacher_spec("resnet9000")
    with pytest.raises(SettingError, match="holdout_fraction"):
        TrainConfig(holdout_fraction=1.5)
    with pytest.raises(ValueError):     # still a ValueError for callers that catch that
        TrainConfig(image_size=33)


def test_a_training_checkpoint_given_to_run_says_export_it_first(files):
    line = assert_one_line_error(mrkd("run", files["ckpt"], "--source", files["images"]), "export it first", "mrkd export")
    assert "last.ckpt" in line
    line = assert_one_line_error(mrkd("run", files["ckpt"], "--backend", "onnxruntime", "--source", files["images"]),
                          "export it first")


@pytest.mark.slow
def test_imagenet_weights_that_cannot_be_downloaded_name_the_choices(tmp_path, files):
    # Offline, reproducibly: an empty torch hub cache and a proxy on a closed port.
    env = {"TORCH_HOME": str(tmp_path / "hub"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    done = mrkd("train", files["images"], "--backbone", "resnet18", "--epochs", "1", "-o", tmp_path / "runs", env=env)
    line = assert_one_line_error(done, "could not download", "--teacher-weights", "--backbone efficientnet_lite0")
    assert "urlopen error" in line      # the cause is kept, after what to do about it


@pytest.mark.parametrize("content", [b"not a checkpoint, just text\n", bytes(range(256)) * 2])
def test_teacher_weights_that_are_no_state_dict_say_so_without_torch_advice(tmp_path, files, content):
    """A text file gave "(101)", random bytes torch's advice to load with weights_only=False."""
    weights = tmp_path / "teacher.pth"
    weights.write_bytes(content)
    done = mrkd("train", files["images"], "--backbone", "resnet18", "--teacher-weights", weights, "--epochs", "1",
                "-o", tmp_path / "runs")
    line = assert_one_line_error(done, str(weights), "not a readable PyTorch state dict", "teacher weights")
    assert "weights_only=False" not in line.replace("mrkd never loads with weights_only=False", "")
    assert "Please file an issue" not in line and not (tmp_path / "runs").exists()


def test_unreadable_image_hint_names_the_cli_option(tmp_path):
    from mrkd.train.data import DataError, load_square
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="--skip-unreadable") as caught:
        load_square(bad, 64, "resize")
    assert "broken.png" in str(caught.value)


def test_an_unnamed_source_takes_a_free_name(files, tmp_path):
    summary_path = tmp_path / "summary.json"
    done = mrkd("run", files["model"], "--source", f"cam1={files['images']}", "--source", files["images"],
                "--max-frames", "3", "--status-every", "0", "--summary", summary_path)
    assert done.returncode == 0, done.stderr
    cameras = json.loads(summary_path.read_text())["cameras"]
    assert sorted(cameras) == ["cam1", "cam2"]
    assert cameras["cam1"]["frames"] == cameras["cam2"]["frames"] == 3


def test_a_folder_with_loop_runs_past_its_first_pass(files, tmp_path):
    summary_path = tmp_path / "summary.json"
    done = mrkd("run", files["model"], "--source", files["images"], "--loop", "--max-frames", "30",
                "--status-every", "0", "--summary", summary_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    camera = json.loads(summary_path.read_text())["cameras"]["cam0"]
    assert camera["frames"] == 30 and camera["source_failed"] is None      # 12 images: two passes and a half


def test_a_source_that_dies_is_reported_never_a_success(files):
    from mrkd.runtime.line.loop import Camera, Line, run_line
    from mrkd.runtime.sources import ImageFilesSource
    from mrkd.runtime.images import list_images

    class DiesAfterFour(ImageFilesSource):     # a source with a bug: its fifth read raises
        def _raw(self):
            if self._next_index >= 4:
                raise RuntimeError("decoder state lost")
            return super()._raw()

    paths = list_images(files["images"])
    line = Line((Camera("belt", str(files["images"]), str(files["model"])),))
    summary = run_line(line, sources={"belt": DiesAfterFour(paths, uri=str(files["images"]))},
                       status=lambda text: None)
    assert summary["failed_cameras"] == ["belt"]
    assert summary["cameras"]["belt"]["frames"] == 4
    assert "decoder state lost" in summary["cameras"]["belt"]["source_failed"]


def test_exit_status_says_which_kind_of_mistake(files):
    """A setting given wrongly exits 2 (as click's usage errors); a file or data that cannot be used, 1."""
    setting = mrkd("generate", files["dir"] / "data", "--categories", "nope")
    assert_one_line_error(setting, "nope")
    assert setting.returncode == 2
    missing = mrkd("calibrate", files["model"], files["dir"] / "missing-folder")
    assert_one_line_error(missing, "missing-folder")
    assert missing.returncode == 1


def test_a_checkpoint_a_weights_only_load_refuses_never_suggests_loading_it_unsafely(tmp_path):
    """torch.load's error for such a file advises weights_only=False (it would run the file's code): the
    one line mrkd prints names torch's reason and never that advice."""
    import torch
    from mrkd.train.checkpoint import CheckpointError, read_checkpoint
    garbage, pickled = tmp_path / "garbage.ckpt", tmp_path / "code.ckpt"
    garbage.write_bytes(b"garbage" * 10)
    torch.save({"state": os.getcwd}, pickled)        # a function reference: what weights-only loads refuse
    # a file that does not start like a checkpoint is named so by its first bytes (no torch reason at all)
    for path, reason, refusal in ((garbage, "not a PyTorch checkpoint (it starts with b'garb'", False),
                                  (pickled, "getcwd", True)):
        with pytest.raises(CheckpointError) as caught:
            read_checkpoint(path)
        text = str(caught.value)
        assert str(path) in text and reason in text and "\n" not in text, text
        assert "weights_only` set to `False`" not in text
        assert ("never loads with weights_only=False" in text) == refusal, text


def test_every_command_writes_a_warning_as_one_line():
    # Only train/eval/predict/generate had one-line warnings: mrkd calibrate (and every other command of
    # the shared boundary) printed Python's "path.py:129: UserWarning: ..." and the code line under it,
    # and a file name with a newline split any warning in two. Run apart: pytest records warnings itself.
    script = ("import warnings\n"
              "from mrkd.errors import error_boundary\n"
              "shown = warnings.formatwarning\n"
              "@error_boundary\n"
              "def command():\n"
              "    warnings.warn('good: skipped 1 unreadable file(s), e.g. good/bro\\nken.png')\n"
              "command()\n"
              "assert warnings.formatwarning is shown, 'not put back after the command'\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "PYTHONWARNINGS": "always"})
    assert done.returncode == 0, done.stderr
    assert done.stderr == "warning: good: skipped 1 unreadable file(s), e.g. good/bro | ken.png\n"
