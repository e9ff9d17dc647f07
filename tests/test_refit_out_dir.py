"""`mrkd refit -o OUT`: every refusal to write the new version names OUT, as typed, never the hidden
staging folder the version is built in; a staging folder a killed refit left is reported."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from test_refit import good_marks, one_thread, parent, write_labels  # noqa: E402,F401  (module fixtures)

from mrkd.train.refit import RefitError, refit_checkpoint  # noqa: E402


def refit(parent, tmp_path, out, lines=None):
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 1))
    return refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), out, export=False,
                            echo=(lines.append if lines is not None else lambda line: None))


def refusal(parent, tmp_path, out) -> str:
    with pytest.raises(RefitError) as caught:
        refit(parent, tmp_path, out)
    return str(caught.value)


def test_a_file_in_outs_path_is_named_with_out(parent, tmp_path):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "v2"
    message = refusal(parent, tmp_path, out)
    # was "[Errno 17] File exists: '.../afile'", after the whole refit had run
    assert message.startswith(f"{out}: ") and "afile is a file" in message, message


def test_a_parent_the_system_refuses_to_write_into_is_named_with_out(parent, tmp_path):
    # /sys refuses new folders even to root (EPERM; EACCES for other accounts): the old message named
    # '/sys/.mrkd_v2.<random>', the staging folder
    out = Path("/sys/mrkd_refit_v2")
    if not Path("/sys").is_dir():
        pytest.skip("no /sys")
    message = refusal(parent, tmp_path, out)
    assert message.startswith(f"{out}: cannot be created") and ".mrkd_refit_v2." not in message, message


def test_a_write_error_inside_the_staging_folder_is_named_with_out(parent, tmp_path, monkeypatch):
    import errno

    import mrkd.train.checkpoint as checkpoint

    def disk_full(model, path, **_):
        raise OSError(errno.ENOSPC, f"{path}: No space left on device")
    monkeypatch.setattr(checkpoint, "save_checkpoint", disk_full)
    out = tmp_path / "out" / "v2"
    message = refusal(parent, tmp_path, out)
    assert f"{out}/model.ckpt: No space left on device" in message and f"{out.parent}/.v2." not in message, message
    assert list(out.parent.iterdir()) == []


def test_outs_existing_folder_is_named(parent, tmp_path):
    out = tmp_path / "v2"
    out.mkdir()
    assert refusal(parent, tmp_path, out).startswith(f"{out}: exists")


def test_an_existing_out_is_refused_before_the_checkpoint_is_read(parent, tmp_path, monkeypatch):
    """-o naming a folder that exists was refused only after the checkpoint had loaded (seconds of torch
    and the model): a checkpoint whose reading fails shows which comes first."""
    import mrkd.train.checkpoint as checkpoint

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was read before -o was checked")
    monkeypatch.setattr(checkpoint, "read_checkpoint", never)
    out = tmp_path / "v2"
    out.mkdir()
    assert refusal(parent, tmp_path, out).startswith(f"{out}: exists")
    (tmp_path / "afile").write_text("x")
    assert "afile is a file" in refusal(parent, tmp_path, tmp_path / "afile" / "v3")


def test_a_staging_folder_a_killed_refit_left_is_reported_and_left_alone(parent, tmp_path):
    out = tmp_path / "out" / "v2"
    left = tmp_path / "out" / ".v2.k1lled00"
    left.mkdir(parents=True)
    lines = []
    refit(parent, tmp_path, out, lines)
    assert (out / "model.ckpt").is_file() and left.is_dir()
    assert [line for line in lines if str(left) in line and "killed" in line], lines


def test_mrkd_refit_with_out_a_file_names_it(parent, tmp_path):
    from click.testing import CliRunner

    from mrkd.cli import main
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 1))
    (tmp_path / "afile").write_text("x")
    result = CliRunner().invoke(main, ["refit", str(parent / "parent.ckpt"), "--reviewed", str(labels), "--good",
                                       str(parent / "good"), "-o", str(tmp_path / "afile")])
    assert result.exit_code == 2 and f"'{tmp_path / 'afile'}' is a file" in result.stderr, result.output
