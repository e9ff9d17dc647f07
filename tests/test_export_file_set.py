"""One export per output folder: a second one is refused unless --overwrite, which replaces the whole set at
once (an earlier export's other graphs removed); a failed or stopped export leaves nothing new there."""

from __future__ import annotations

import os
import signal

import pytest
from click.testing import CliRunner

from mrkd.export.cli import export_command
from mrkd.runtime.metadata import ModelMetadata, sidecar_path
from export_fixtures import small_model

FAST = ["--simplify", "never", "--batch", "1:1:2"]


def _files(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _export(checkpoint, out, *extra):
    return CliRunner().invoke(export_command, [str(checkpoint), "-o", str(out), *FAST, *extra])


def _errors(result) -> list:
    return [line for line in result.output.splitlines() if line.startswith("Error:")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    first, second = folder / "a.ckpt", folder / "b.ckpt"
    small_model(seed=0).save(first)
    small_model(seed=1).save(second)
    return first, second


def test_a_second_export_into_a_folder_is_refused_unless_overwrite(checkpoints, tmp_path):
    """`mrkd export` again into the same folder replaced model.onnx (the file a line may run) without a
    word when the checkpoint was the same. Now any folder holding an exported model is refused, in one
    line naming the folder and both ways out, before the checkpoint is read; nothing there changes."""
    first, second = checkpoints
    out = tmp_path / "out"
    assert _export(first, out).exit_code == 0
    before = _files(out)
    for checkpoint in (first, second):
        refused = _export(checkpoint, out)
        errors = _errors(refused)
        assert refused.exit_code == 1 and len(errors) == 1 and "Traceback" not in refused.output, refused.output
        assert str(out) in errors[0] and "--overwrite" in errors[0] and "new folder" in errors[0], errors
        assert _files(out) == before
    # a sidecar alone is part of an exported set too
    (out / "model.onnx").unlink()
    assert _export(first, out).exit_code == 1 and (out / "model.onnx.json").exists()
    help_text = CliRunner().invoke(export_command, ["--help"]).output
    assert "--overwrite" in help_text and "refused" in help_text


def test_overwrite_replaces_the_set_and_removes_the_earlier_exports_other_graphs(checkpoints, tmp_path):
    """An FP32 export over a folder holding another checkpoint's model.onnx and model_fp16.onnx left the FP16
    graph beside the new model as if it were its own. With --overwrite the set is replaced: model.onnx is the
    new checkpoint's and the earlier FP16 graph and its sidecar are removed, each named in a line."""
    first, second = checkpoints
    out = tmp_path / "out"
    assert _export(first, out, "--fp16", "--no-engine").exit_code == 0
    assert (out / "model_fp16.onnx").exists()
    done = _export(second, out, "--overwrite")
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.json"]
    assert [line for line in done.output.splitlines() if line.startswith("removed")] == [
        f"removed {sidecar_path(out / 'model_fp16.onnx')} (the earlier export's; this one does not write it)",
        f"removed {out / 'model_fp16.onnx'} (the earlier export's; this one does not write it)"]
    import hashlib
    assert ModelMetadata.load(sidecar_path(out / "model.onnx")).checkpoint_sha256 == \
        hashlib.sha256(second.read_bytes()).hexdigest()


def test_overwrite_moves_the_new_set_in_only_once_all_of_it_is_written(checkpoints, tmp_path, monkeypatch):
    """The new files are renamed into the folder one after another only at the end, each sidecar before its
    graph (a reader never meets a new graph with the old sidecar), all from one staging folder that is gone
    afterwards."""
    import mrkd.export.file_set as file_set
    first, second = checkpoints
    out = tmp_path / "out"
    assert _export(first, out, "--fp16", "--no-engine").exit_code == 0
    moves, real_replace = [], os.replace

    def replace(src, dst):        # os.replace is also each file's atomic write (inside the staging folder)
        if os.path.dirname(dst) == str(out):
            moves.append((str(src), str(dst), sorted(os.listdir(os.path.dirname(src)))))
        real_replace(src, dst)

    monkeypatch.setattr(file_set.os, "replace", replace)
    assert _export(second, out, "--fp16", "--no-engine", "--overwrite").exit_code == 0
    names = ["model.onnx.json", "model_fp16.onnx.json", "model.onnx", "model_fp16.onnx"]
    assert [os.path.basename(dst) for _, dst, _ in moves] == names
    assert len({os.path.dirname(src) for src, _, _ in moves}) == 1
    assert moves[0][2] == sorted(names)          # the whole set was in the staging folder before the first move
    assert sorted(p.name for p in out.iterdir()) == sorted(names)     # the staging folder is gone


def test_a_failed_overwrite_keeps_the_earlier_set_and_a_failed_first_export_leaves_no_folder(checkpoints, tmp_path,
                                                                                            monkeypatch):
    """A new export whose FP32 parity check failed removed its model.onnx, which had already replaced the
    earlier one: the folder lost the model a line ran. Now the earlier set stays as it was."""
    import mrkd.export.pipeline as pipeline
    first, second = checkpoints
    out = tmp_path / "out"
    assert _export(first, out).exit_code == 0
    before = _files(out)
    other, real_report = small_model(seed=5), pipeline.parity_report
    monkeypatch.setattr(pipeline, "parity_report",
                        lambda model, path, opts, **kwargs: real_report(other, path, opts, **kwargs))
    failed = _export(second, out, "--overwrite")
    assert failed.exit_code == 1 and "FP32 parity failed" in failed.output, failed.output
    assert ".export-" not in failed.output            # the message names the output folder, not the staging
    assert _files(out) == before
    assert _export(second, tmp_path / "new").exit_code == 1 and not (tmp_path / "new").exists()


@pytest.mark.parametrize("stop, code, by", [(KeyboardInterrupt, 130, "Ctrl-C"), ("sigterm", 143, "SIGTERM")])
def test_an_export_stopped_after_its_parity_check_leaves_nothing_new(checkpoints, tmp_path, monkeypatch, stop, code,
                                                                   by):
    """Stopped after FP32 parity passed (here while the FP16 graph was checked), the export left model.onnx,
    its sidecar and model_fp16.onnx: a checked but partial set, over the earlier export's files. Now the
    earlier set stays byte for byte and nothing new is there; the line says so."""
    import mrkd.export.pipeline as pipeline
    from mrkd.stopping import Terminated
    first, second = checkpoints

    def stopped(*args, **kwargs):
        raise Terminated() if stop == "sigterm" else stop()

    monkeypatch.setattr(pipeline, "fp16_fidelity_report", stopped)
    fresh = tmp_path / "fresh"
    result = _export(second, fresh, "--fp16", "--no-engine")
    assert result.exit_code == code, result.output
    assert f"export stopped ({by}) before its files were moved into {fresh}: nothing new there" in result.output
    assert not fresh.exists()
    monkeypatch.undo()
    out = tmp_path / "out"
    assert _export(first, out).exit_code == 0
    before = _files(out)
    monkeypatch.setattr(pipeline, "fp16_fidelity_report", stopped)
    result = _export(second, out, "--fp16", "--no-engine", "--overwrite")
    assert result.exit_code == code, result.output
    assert _files(out) == before


def test_a_sigterm_while_the_set_is_moved_in_waits_until_it_is_whole(checkpoints, tmp_path, monkeypatch):
    """A SIGTERM that arrives between two renames ends the export only once every file of the set is in
    place, and the line says the set is there, whole."""
    import mrkd.export.file_set as file_set
    first, _ = checkpoints
    out = tmp_path / "out"
    real_replace, moved = os.replace, []

    def replace(src, dst):
        if os.path.dirname(dst) == str(out):          # not a file's own atomic write in the staging folder
            if not moved:
                os.kill(os.getpid(), signal.SIGTERM)  # at the first move into place
            moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(file_set.os, "replace", replace)
    result = _export(first, out, "--fp16", "--no-engine")
    assert result.exit_code == 143, result.output
    assert f"export stopped (SIGTERM) after its files were moved into {out}, whole: model.onnx, model_fp16.onnx" \
        in result.output
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.json", "model_fp16.onnx",
                                                     "model_fp16.onnx.json"]


def test_a_sigterm_just_as_the_staging_folder_is_made_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    """A stop landing after mkdtemp made the staging folder and before its name was known left the folder
    (and the output folder made for it) behind: now the folder is made while stops wait."""
    import tempfile
    from mrkd.export.file_set import STAGING_PREFIX
    first, _ = checkpoints
    real_mkdtemp, made = tempfile.mkdtemp, []

    def mkdtemp_then_stopped(*args, **kwargs):
        folder = real_mkdtemp(*args, **kwargs)
        if os.path.basename(folder).startswith(STAGING_PREFIX) and not made:
            made.append(folder)
            os.kill(os.getpid(), signal.SIGTERM)
        return folder
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp_then_stopped)
    fresh = tmp_path / "fresh"
    result = _export(first, fresh, "--no-engine")
    assert len(made) == 1
    assert result.exit_code == 143, result.output
    assert not fresh.exists(), sorted(p.name for p in fresh.iterdir())


def test_a_killed_exports_staging_folder_is_named_and_left_alone(checkpoints, tmp_path):
    """SIGKILL skips the clean-up of the hidden staging folder; the next export into that folder says so
    (it may also be an export running now, so it is not deleted) and exports as usual."""
    first, _ = checkpoints
    out = tmp_path / "out"
    leftover = out / ".export-killed"
    leftover.mkdir(parents=True)
    (leftover / "model.onnx").write_bytes(b"half")
    result = _export(first, out)
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if line.startswith("warning:") and str(leftover) in line]
    assert len(warned) == 1 and "killed" in warned[0], result.output
    assert (leftover / "model.onnx").read_bytes() == b"half" and (out / "model.onnx").stat().st_size > 1000


@pytest.mark.parametrize("extra, failing, links", [(("--fp16", "--no-engine"), 2, True),
                                                   (("--fp16", "--no-engine"), 4, True), ((), 2, True),
                                                   ((), 1, False)])
def test_a_rename_that_fails_half_way_through_the_move_puts_the_earlier_set_back(checkpoints, tmp_path, monkeypatch,
                                                                                 extra, failing, links):
    """A rename into the folder that failed on the n-th file (EXDEV here; EACCES or a disk error alike) left
    the folder mixed: the new sidecars beside the earlier graphs, the earlier FP16 graph removed. Now the files
    already moved are put back from a kept copy of the earlier set: the folder holds exactly the earlier export,
    byte for byte (also where the file system has no hard links), and the error is one line naming the file
    that failed."""
    import errno
    import mrkd.export.file_set as file_set
    first, second = checkpoints
    out = tmp_path / "out"
    assert _export(first, out, "--fp16", "--no-engine").exit_code == 0
    before = _files(out)
    real_replace, moves = os.replace, []

    def replace(src, dst):
        if os.path.dirname(dst) == str(out):
            moves.append(os.path.basename(dst))
            if len(moves) == failing:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(src, dst)

    def no_links(src, dst):      # a file system without hard links (FAT): the earlier set is kept as copies
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(file_set.os, "replace", replace)
    if not links:
        monkeypatch.setattr(file_set.os, "link", no_links)
    failed = _export(second, out, *extra, "--overwrite")
    assert _files(out) == before         # no staging folder or kept copy left either
    errors = _errors(failed)
    assert failed.exit_code == 1 and len(errors) == 1 and "Traceback" not in failed.output, failed.output
    assert errors[0].startswith(f"Error: {out / moves[failing - 1]}: could not be moved into place") \
        and "Invalid cross-device link" in errors[0] and "earlier export again" in errors[0], errors


def test_the_demos_fp16_graph_is_one_of_its_exports_set(checkpoints, tmp_path, monkeypatch, capsys):
    """The demo wrote model_fp16.onnx into its export folder after the set was moved in, outside the set: an
    error in its FP16 check left a new model.onnx beside no FP16 graph (the earlier one removed as stale) and
    an earlier one could be left beside a new model. Now the FP16 graph is written and checked in the set's
    staging folder and moved in with model.onnx, or not at all; the fidelity report is still printed."""
    import mrkd.export.file_set as file_set
    import mrkd.export.fp16 as fp16
    import mrkd.export.pipeline as pipeline
    from mrkd.demo_steps.export import export_step
    first, second = checkpoints
    context = {"out": tmp_path, "checkpoints": {"cat": first}, "data_root": tmp_path / "data"}
    out = tmp_path / "export" / "cat"
    real_replace, moves = os.replace, []

    def replace(src, dst):
        if os.path.dirname(dst) == str(out):
            moves.append((os.path.dirname(src), os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(file_set.os, "replace", replace)
    export_step(context)
    names = ["model.onnx", "model.onnx.json", "model_fp16.onnx", "model_fp16.onnx.json"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert sorted(name for _, name in moves) == names and len({folder for folder, _ in moves}) == 1, moves
    assert "FP16 graph on " in capsys.readouterr().out
    before = _files(out)

    def broken(*args, **kwargs):
        raise RuntimeError("FP16 check failed")

    for module in (fp16, pipeline):
        monkeypatch.setattr(module, "fp16_fidelity_report", broken)
    with pytest.raises(RuntimeError):
        export_step(dict(context, checkpoints={"cat": second}))
    assert _files(out) == before
