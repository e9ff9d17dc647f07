"""Hostile input to `mrkd generate / train / eval / predict`: option values past their limits, a run
whose loss stops being finite, checkpoints with NaN weights, an exported model where a checkpoint
belongs, and inputs with no readable image. Each must end in one ``Error:`` line and a non-zero exit
(no traceback, no exit 0 that did nothing, no file that looks like a finished model)."""

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from mrkd.cli import main
from mrkd.errors import SettingError
from cli_errors import assert_one_line_error
from train_fixtures import CATEGORY, IMAGE_SIZE, tiny_data, trained_run


def invoke(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


TRAIN_REFUSED = [
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--lr", "-0.1"), ("--lr", "1e6"),
    ("--mask-ratio", "nan"), ("--mask-ratio", "1"), ("--mask-ratio", "-0.1"), ("--mask-ratio", "inf"),
    ("--seed", "-1"), ("--seed", str(2 ** 32)),
    ("--eval-every", "-1"),
    ("--feature-cache-mb", "nan"), ("--feature-cache-mb", "inf"), ("--feature-cache-mb", "-1"),
    ("--holdout", "nan"), ("--holdout", "1"),
    ("--image-size", "100000"), ("--image-size", "0"),
    ("--epochs", "0"), ("--epochs", "-1"),
]


@pytest.mark.parametrize("option,value", TRAIN_REFUSED)
def test_train_refuses_an_option_past_its_limit_in_one_line(tmp_path, option, value):
    """Before: --lr nan/-1/1e300 and --feature-cache-mb nan/inf were tracebacks; --lr inf and 1e6 trained
    NaN or dead weights with exit 0; --mask-ratio nan/-1/1.5, --seed 2**32 and --eval-every -1 were taken
    silently."""
    out = tmp_path / "run"
    done = invoke("train", tiny_data(), "-c", CATEGORY, "--out", out, "--epochs", 1, "--image-size", IMAGE_SIZE,
                  option, value)
    assert_one_line_error(done, option)
    assert not out.exists()


@pytest.mark.parametrize("pool", ["5", "99"])
def test_train_refuses_a_knn_pool_wider_than_the_feature_map(tmp_path, pool):
    """--knn-pool 99 at 64 px trained with every bank patch averaged over the whole map, exit 0."""
    done = invoke("train", tiny_data(), "-c", CATEGORY, "--out", tmp_path / "run", "--epochs", 1,
                  "--image-size", IMAGE_SIZE, "--knn-pool", pool)
    assert_one_line_error(done, "knn_pool", "at most 3")
    from mrkd.train.trainer import TrainConfig
    assert TrainConfig(image_size=64, knn_pool=3).knn_pool == 3
    assert TrainConfig(image_size=256, knn_pool=15).knn_pool == 15
    with pytest.raises(SettingError, match="at most 15"):
        TrainConfig(image_size=256, knn_pool=17)


@pytest.mark.parametrize("option,value", [("--image-size", "100000"), ("--image-size", "31"), ("--seed", "-1"),
                                          ("--seed", str(2 ** 32)), ("--n-train", "0"), ("--n-test-good", "-1"),
                                          ("--n-test-defect", "-1")])
def test_generate_refuses_an_option_past_its_limit_in_one_line(tmp_path, option, value):
    """Before: --image-size 100000 ran out of memory, --seed -1 was a traceback, negative test counts were
    taken silently."""
    done = invoke("generate", tmp_path / "data", "-c", "grain", "--image-size", 32, "--n-train", 1, option, value)
    assert_one_line_error(done, option)
    assert not (tmp_path / "data").exists()


def _nan_loss_from_call(monkeypatch, first_bad: int) -> None:
    import mrkd.train.trainer as trainer
    real, calls = trainer.distillation_loss, {"n": 0}

    def diverging(target, student):
        calls["n"] += 1
        loss = real(target, student)
        return loss * float("nan") if calls["n"] >= first_bad else loss
    monkeypatch.setattr(trainer, "distillation_loss", diverging)


def _train_args(out, epochs=3):
    return ("train", tiny_data(), "-c", CATEGORY, "--out", out, "--epochs", epochs, "--image-size", IMAGE_SIZE,
            "--batch-size", 4, "--eval-every", 0, "--score", "mrkd", "--backbone", "resnet18",
            "--teacher-weights", "random", "--seed", 3)


def _all_finite(path: Path) -> bool:
    data = torch.load(path, weights_only=True)
    return all(torch.isfinite(t).all() for part in ("bottleneck", "student") for t in data[part].values()
               if t.is_floating_point())


@pytest.mark.slow
def test_a_diverging_run_stops_with_one_line_and_leaves_only_the_epoch_before(tmp_path, monkeypatch):
    """Before: a run whose loss became NaN (--lr inf) went on, saved NaN weights as its finished last.ckpt
    and exited 0; eval, predict and export then failed with tracebacks. Now it stops at the end of that
    epoch, names epoch and step, and last.ckpt stays the previous epoch's (unfinished, finite)."""
    _nan_loss_from_call(monkeypatch, 6)           # 14 training images, batch 4: 4 steps an epoch -> epoch 2, step 2
    out = tmp_path / "run"
    error = assert_one_line_error(invoke(*_train_args(out)), "diverged in epoch 2", "step 2 of 4", "--lr")
    assert "holds the last epoch saved before it" in error
    data = torch.load(out / CATEGORY / "last.ckpt", weights_only=True)
    assert data["train_state"]["epoch"] == 1 and data["train_state"]["finished"] is False
    assert _all_finite(out / CATEGORY / "last.ckpt")


@pytest.mark.slow
def test_a_run_diverging_in_its_first_epoch_saves_nothing(tmp_path, monkeypatch):
    _nan_loss_from_call(monkeypatch, 1)
    out = tmp_path / "run"
    error = assert_one_line_error(invoke(*_train_args(out)), "diverged in epoch 1", "step 1 of 4")
    assert "nothing of this run was saved" in error
    assert not (out / CATEGORY / "last.ckpt").exists()


@pytest.mark.slow
def test_weights_broken_by_an_epochs_last_step_stop_the_run(tmp_path, monkeypatch):
    """The last step's update can make the weights NaN while every loss of the epoch was finite."""
    import mrkd.train.trainer as trainer
    real, calls = trainer._train_step, {"n": 0}

    def breaking(run, batch):
        loss = real(run, batch)
        calls["n"] += 1
        if calls["n"] == 4:                       # the last step of epoch 1
            with torch.no_grad():
                next(run.model.student.parameters()).fill_(float("inf"))
        return loss
    monkeypatch.setattr(trainer, "_train_step", breaking)
    out = tmp_path / "run"
    assert_one_line_error(invoke(*_train_args(out)), "diverged in epoch 1", "weights were no longer finite")
    assert not (out / CATEGORY / "last.ckpt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["predict", "eval", "export"])
def test_a_checkpoint_with_nan_weights_is_refused_in_one_line(tmp_path, command):
    """Before: eval and predict on a diverged run's checkpoint ended in 'ValueError: maps contains NaN/inf',
    export in 'Out of range float values are not JSON compliant'."""
    data = torch.load(Path(trained_run()["out_dir"]) / "last.ckpt", weights_only=True)
    name = next(iter(data["student"]))
    data["student"][name] = torch.full_like(data["student"][name], float("nan"))
    broken = tmp_path / "broken.ckpt"
    torch.save(data, broken)
    args = {"predict": ("predict", broken, tiny_data() / CATEGORY / "test" / "good", "-o", tmp_path / "out"),
            "eval": ("eval", broken, tiny_data(), "-c", CATEGORY),
            "export": ("export", broken, "-o", tmp_path / "out")}[command]
    assert_one_line_error(invoke(*args), str(broken), "not finite", f"student.{name}", "--lr")
    assert not (tmp_path / "out").exists()


def _onnx_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [value],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize("name", ["model.onnx", "renamed.bin"])
def test_predict_and_eval_given_an_exported_model_point_to_mrkd_run(tmp_path, name):
    """Before: 'not a readable PyTorch checkpoint (UnpicklingError: ... Unsupported operand 8 ...)'."""
    model = _onnx_model(tmp_path / name)
    images = tiny_data() / CATEGORY / "test" / "good"
    for args in (("predict", model, images, "-o", tmp_path / "out"), ("eval", model, tiny_data())):
        error = assert_one_line_error(invoke(*args), str(model), "exported model", "mrkd run")
        assert "Unsupported operand" not in error
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_predict_with_no_readable_image_fails_and_writes_nothing(tmp_path):
    """Before: a folder of unreadable images ended 'scored 0 image(s) ...' with exit 0 and an empty
    scores.csv."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    (folder / "b.jpg").write_bytes(b"")
    done = invoke("predict", Path(trained_run()["out_dir"]) / "last.ckpt", folder, "-o", tmp_path / "out")
    assert_one_line_error(done, "none of the 2 image file(s)", "a.png")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, said", [
    (b"hi\n", "not a PyTorch checkpoint"),                    # was: (KeyError: 105)
    (b"\x89PNG\r\n\x1a\n" + bytes(64), "not a PyTorch checkpoint"),  # was: 'what a weights-only load refuses'
    (b"", "empty"),                                           # was: (EOFError: unreadable)
    (None, "cut short"),                                      # was: miniz's 'failed finding central directory'
], ids=["text", "png", "empty", "cut_zip"])
def test_a_file_that_is_not_a_checkpoint_is_named_so(tmp_path, content, said):
    """A text file, an image or an empty file given as the checkpoint said what torch's unpickler tripped
    on (a KeyError of a byte value, or a 'refused' load that sounds like a dangerous file)."""
    import io
    from mrkd.train.checkpoint import CheckpointError, read_checkpoint
    path = tmp_path / "last.ckpt"
    if content is None:
        buffer = io.BytesIO()
        torch.save({"weights": torch.zeros(4096)}, buffer)
        content = buffer.getvalue()[:len(buffer.getvalue()) // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    message = str(error.value)
    assert said in message and str(path) in message and "\n" not in message
    for torch_detail in ("KeyError", "refuses", "EOFError", "miniz"):
        assert torch_detail not in message
    done = invoke("predict", path, tiny_data() / CATEGORY / "test" / "good", "-o", tmp_path / "out")
    assert_one_line_error(done, str(path), said)
