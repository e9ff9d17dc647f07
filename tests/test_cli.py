"""The click commands: help lists every option, torch stays unimported for --help, errors are one line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from mrkd.cli import main

COMMANDS = tuple(main.list_commands(None))      # every command `mrkd --help` lists


@pytest.mark.parametrize("name", COMMANDS)
def test_help_lists_every_option_with_help_text(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "None]" not in result.output, result.output      # a range shown as "x<=None"
    command = main.get_command(None, name)
    options = [p for p in command.params if isinstance(p, click.Option) and not p.hidden]   # hidden: old names
    assert options
    for option in options:
        for flag in option.opts + option.secondary_opts:
            assert flag in result.output, f"{name} --help does not show {flag}"
        assert option.help, f"{name} {option.opts[0]} has no help text"


def test_train_cli_module_does_not_import_torch():
    code = ("import sys; from click.testing import CliRunner; from mrkd.cli import main; "
            "r = CliRunner().invoke(main, ['train', '--help']); assert r.exit_code == 0; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_bad_checkpoint_is_a_one_line_error(tmp_path):
    not_a_checkpoint = tmp_path / "model.ckpt"
    not_a_checkpoint.write_text("hello")
    (tmp_path / "data").mkdir()
    result = CliRunner().invoke(main, ["eval", str(not_a_checkpoint), str(tmp_path / "data")])
    assert result.exit_code == 1
    assert "Error:" in result.output and str(not_a_checkpoint) in result.output
    assert "Traceback" not in result.output



def test_eval_of_a_run_folder_refuses_a_category_the_data_lacks_before_evaluating_any(tmp_path):
    """A run folder that also holds a plain-folder run (`mrkd train "good/*.jpg" --out runs/part7`) named a
    category the data set lacks: `mrkd eval runs/ data/ --out eval/` evaluated and wrote the categories
    before it, then stopped at that one, and the same command again was refused (eval/ holds an evaluation)."""
    import mrkd.train as mt
    from mrkd.runtime.calibration import Calibration
    from mrkd.train.synthetic import generate_dataset
    generate_dataset(tmp_path / "data", ["grain"], image_size=32, n_train=2, n_test_good=2, n_test_defect=1,
                     progress=False)
    model = mt.efficientnet_lite0(teacher_weights="random", image_size=32)
    model.calibration = Calibration(threshold=1.0)
    for name in ("grain", "part7"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        model.save(tmp_path / "runs" / name / "last.ckpt")
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "runs"), str(tmp_path / "data"),
                                       "--out", str(tmp_path / "eval")])
    assert result.exit_code == 1, result.output
    assert f"missing folder {tmp_path / 'data' / 'part7'}" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "eval").exists() or not any((tmp_path / "eval").iterdir()), \
        f"evaluated before refusing: {sorted(p.name for p in (tmp_path / 'eval').rglob('*'))}"


@pytest.mark.slow
def test_eval_and_predict_commands_write_their_files(tmp_path):
    from train_fixtures import CATEGORY, tiny_data, trained_run
    run_root = str(Path(trained_run()["out_dir"]).parent)
    result = CliRunner().invoke(main, ["eval", run_root, str(tiny_data()), "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert "img AUROC" in result.output and CATEGORY in result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics[CATEGORY]["image_auroc"] <= 1.0
    assert (tmp_path / "eval" / CATEGORY / "roc.png").is_file()

    images = str(tiny_data() / CATEGORY / "test" / "good" / "*.png")
    result = CliRunner().invoke(main, ["predict", str(Path(run_root) / CATEGORY / "last.ckpt"), images,
                                       "--out", str(tmp_path / "pred")])
    assert result.exit_code == 0, result.output
    assert "scored 12 image(s)" in result.output
    assert len((tmp_path / "pred" / "scores.csv").read_text().splitlines()) == 13


@pytest.mark.slow
def test_train_command_on_a_plain_folder_warns_about_the_random_teacher(tmp_path):
    from train_fixtures import CATEGORY, tiny_data
    folder = tmp_path / "good"
    folder.mkdir()
    for path in sorted((tiny_data() / CATEGORY / "train" / "good").glob("*.png"))[:5]:
        shutil.copy(path, folder)
    result = CliRunner().invoke(main, ["train", str(folder), "--out", str(tmp_path / "run"), "--backbone", "resnet18",
                                       "--teacher-weights", "random", "--image-size", "64", "--epochs", "1",
                                       "--batch-size", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "RANDOM weights" in result.output
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and "image_auroc" not in history[0]        # a plain folder: no test split
    final = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    assert final["calibration"]["n_good"] == 2 and final["calibration"]["threshold"] > 0   # 2 of 5 held out
    assert not (tmp_path / "run" / "best.ckpt").exists()

    bad = CliRunner().invoke(main, ["train", str(folder), "--out", str(tmp_path / "run"), "--image-size", "50"])
    assert bad.exit_code == 2 and "multiple of 32" in bad.output


def test_every_command_is_installed_as_a_script_and_listed_once():
    """mrkd/commands.py is the one list: `mrkd --help`, the mrkd-<name> aliases and setup.py's scripts."""
    from importlib.metadata import entry_points

    import mrkd.cli
    from mrkd.commands import COMMANDS as ALL
    assert list(main.list_commands(None)) == list(ALL)
    scripts = {e.name: e.value for e in entry_points(group="console_scripts") if e.value.startswith("mrkd.cli:")}
    for name in ALL:
        assert scripts[f"mrkd-{name}"] == f"mrkd.cli:{name}_alias"
        assert callable(getattr(mrkd.cli, f"{name}_alias"))
    assert set(scripts) == {"mrkd"} | {f"mrkd-{name}" for name in ALL}


def test_every_path_parameter_refuses_an_empty_path():
    """"" is the current folder to the system: `mrkd generate ""` wrote six categories into it and
    `mrkd export ckpt -o ""` its model.onnx; every path parameter of every command refuses it."""
    from mrkd.cli import PATH_TEXT_PARAMS, NonEmptyPath, load_command
    from mrkd.commands import COMMANDS
    checked = 0
    for name in COMMANDS:
        command = load_command(name)
        for param in command.params:
            inner = param.type.inner if isinstance(param.type, NonEmptyPath) else param.type
            if isinstance(inner, click.Path) or (inner is click.STRING and param.name in PATH_TEXT_PARAMS):
                assert isinstance(param.type, NonEmptyPath), (name, param.name)
                for empty in ("", "  "):
                    with pytest.raises(click.BadParameter, match="empty path"):
                        param.type.convert(empty, param, None)
                checked += 1
    assert checked >= 50                     # the whole CLI, not a few options


def test_an_empty_output_folder_writes_nothing_into_the_current_one(tmp_path):
    cwd = tmp_path / "here"
    cwd.mkdir()
    done = subprocess.run([sys.executable, "-m", "mrkd.cli", "generate", "", "-c", "grain"], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and list(cwd.iterdir()) == []
    assert done.stderr.count("\n") == 1 and 'empty path ("")' in done.stderr and "OUT" in done.stderr


def test_bare_mrkd_prints_the_help_as_written():
    done = subprocess.run([sys.executable, "-m", "mrkd.cli"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("Usage: ")     # not one "Error: Usage: ... |" line
    assert "\n  generate " in done.stderr and " | " not in done.stderr


def test_no_number_option_of_any_command_takes_nan_or_infinity():
    """click's FLOAT and FloatRange let "nan" through (every comparison with it is false): it reached
    the training loop, the evidence budget and the refit's defect guard as a number."""
    from mrkd.cli import load_command
    from mrkd.commands import COMMANDS
    checked = 0
    for name in COMMANDS:
        for param in load_command(name).params:
            if isinstance(param.type, (click.types.FloatParamType, click.FloatRange)):
                for value in ("nan", "inf", "-inf"):
                    with pytest.raises(click.BadParameter):
                        param.type.convert(value, param, None)
                checked += 1
    assert checked >= 20


def test_a_number_option_given_text_names_the_kind_of_number_expected():
    """click's range types said "'abc' is not a valid integer range" (and "finite float range") for
    `--batch abc`; the message names what to type, and --help shows INTEGER / NUMBER."""
    from mrkd.cli import load_command
    from mrkd.commands import COMMANDS
    expected = {click.types.IntParamType: "integer", click.types.FloatParamType: "number"}
    checked = 0
    for name in COMMANDS:
        for param in load_command(name).params:
            kind = next((word for cls, word in expected.items() if isinstance(param.type, cls)), None)
            if kind is None:
                continue
            with pytest.raises(click.BadParameter) as refused:
                param.type.convert("abc", param, None)
            message = refused.value.format_message()
            assert message.endswith((f"'abc' is not a valid {kind}.",) + (("'abc' is not a valid float.",)
                                    if kind == "number" else ())), (name, param.name, message)
            assert "range" not in param.type.name, (name, param.name)
            checked += 1
    assert checked >= 50                     # the whole CLI (55 number options today)
    done = subprocess.run([sys.executable, "-m", "mrkd.cli", "run", "x.onnx", "0", "--batch", "abc"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "'abc' is not a valid integer." in done.stderr


def test_ctrl_c_while_a_command_loads_exits_130_in_one_line(tmp_path):
    """A Ctrl-C in the first second or two of `mrkd export` (torch and the exporter importing, before the
    command's own stop handling) said click's "Aborted!" and exited 1, where a Ctrl-C a moment later says
    one line and exits 130 (mrkd.stopping): a script could not tell a stop from a failure."""
    code = ("import os, signal, sys\nimport mrkd.cli as cli\nload = cli.load_command\n"
            "def load_interrupted(name):\n    os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C during the import\n"
            "    return load(name)\n"
            "cli.load_command = load_interrupted\nsys.argv[0] = 'mrkd'\ncli.main(sys.argv[1:])")
    done = subprocess.run([sys.executable, "-c", code, "export", str(tmp_path / "none.ckpt"), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, (done.returncode, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["stopped (Ctrl-C)"], done.stderr
    assert not (tmp_path / "out").exists()
