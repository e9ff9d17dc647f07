"""`mrkd refit` refuses what it can judge in milliseconds before torch and the checkpoint load (seconds):
an existing new-version folder, the default one (MODEL's folder/<stem>.v<N>, N read from the checkpoint's
lineage without torch) as well as -o's, and an events log given as the label file. Each test checks the
order, not a time: the checkpoint's read is made to fail, or the command runs in a fresh interpreter
that must not have imported torch when it refuses."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile

import pytest

torch = pytest.importorskip("torch")

from test_refit import good_marks, one_thread, parent, write_labels  # noqa: E402,F401  (module fixtures)

from mrkd.train.refit import RefitError, refit_checkpoint  # noqa: E402
from mrkd.train.refit_args import checkpoint_lineage_version  # noqa: E402

EVENT = {"event_id": "20261206T120000.000Z-1a2b3c4d", "time": "2026-12-06T12:00:00.000+00:00", "kind": "alarm",
         "camera": "cam0", "score": 1.2, "threshold": 1.0}


class CheckpointRead(Exception):
    """Raised by the stand-in for read_checkpoint: the refit got as far as reading the checkpoint."""


@pytest.fixture
def no_checkpoint_read(monkeypatch):
    import mrkd.train.checkpoint as checkpoint

    def read(*args, **kwargs):
        raise CheckpointRead()
    monkeypatch.setattr(checkpoint, "read_checkpoint", read)


def model_copy(parent, folder, version=None, name="parent.ckpt", **save):
    """The fixture's checkpoint under ``folder`` (a link), or re-saved with a lineage of ``version``."""
    path = folder / name
    if version is None:
        path.symlink_to(parent / "parent.ckpt")
    else:
        data = torch.load(parent / "parent.ckpt", map_location="cpu", weights_only=True)
        data["lineage"] = {"version": version, "parent_sha256": "0" * 64}
        torch.save(data, path, **save)
    return path


def refit(model, parent, tmp_path, labels=None):
    labels = labels or write_labels(tmp_path / "labels.jsonl", good_marks(parent, 1))
    return refit_checkpoint(model, labels, str(parent / "good"), None, export=False, echo=lambda line: None)


def test_an_existing_default_folder_is_refused_before_the_checkpoint_is_read(parent, tmp_path, no_checkpoint_read):
    model = model_copy(parent, tmp_path)
    (tmp_path / "parent.v2").mkdir()
    with pytest.raises(RefitError) as refused:       # before: CheckpointRead (the folder was checked after it)
        refit(model, parent, tmp_path)
    assert str(refused.value).startswith(f"{tmp_path / 'parent.v2'}: exists"), refused.value


def test_the_default_folder_follows_the_lineage_read_without_torch(parent, tmp_path, no_checkpoint_read):
    model = model_copy(parent, tmp_path, version=3, name="child.ckpt")
    assert checkpoint_lineage_version(model) == 3
    (tmp_path / "child.v2").mkdir()                   # not this version's folder: the refit goes on to read
    with pytest.raises(CheckpointRead):
        refit(model, parent, tmp_path)
    (tmp_path / "child.v4").mkdir()
    with pytest.raises(RefitError, match="child.v4: exists"):
        refit(model, parent, tmp_path)


def test_a_checkpoint_whose_lineage_cannot_be_peeked_is_still_refused_after_its_read(parent, tmp_path):
    # torch's old (pickle, not zip) format: its version is known only once read, and the check then holds
    model = model_copy(parent, tmp_path, version=2, name="old.ckpt", _use_new_zipfile_serialization=False)
    assert checkpoint_lineage_version(model) is None
    (tmp_path / "old.v3").mkdir()
    with pytest.raises(RefitError, match="old.v3: exists"):
        refit(model, parent, tmp_path)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_peeking_at_the_lineage_runs_nothing_the_file_names(tmp_path):
    marker = str(tmp_path / "ran")
    model = tmp_path / "evil.ckpt"
    with zipfile.ZipFile(model, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"lineage": {"version": 5}, "x": Payload(marker)},
                                                          protocol=2))
    assert checkpoint_lineage_version(model) is None and not os.path.exists(marker)
    model.write_bytes(b"not a zip at all")
    assert checkpoint_lineage_version(model) is None


def test_an_events_log_as_the_label_file_is_named_before_the_checkpoint_is_read(parent, tmp_path,
                                                                                no_checkpoint_read):
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps(EVENT) + "\n")
    with pytest.raises(RefitError) as refused:
        refit(model_copy(parent, tmp_path), parent, tmp_path, labels=events)
    message = str(refused.value)
    assert "is an events log" in message and "--events" in message and "--reviewed" in message, message


REFIT_WITHOUT_TORCH = """
import sys
from mrkd.cli import main
try:
    main.main(sys.argv[1:], prog_name="mrkd")
except SystemExit as stop:
    print("exit", stop.code)
print("torch imported:", "torch" in sys.modules)
"""


def cli_refit(model, labels, good) -> str:
    done = subprocess.run([sys.executable, "-c", REFIT_WITHOUT_TORCH, "refit", str(model), "--reviewed", str(labels),
                           "--good", str(good)], capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr


def test_mrkd_refit_refuses_these_without_importing_torch(parent, tmp_path):
    model = model_copy(parent, tmp_path)
    (tmp_path / "parent.v2").mkdir()
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 1))
    output = cli_refit(model, labels, parent / "good")
    assert "parent.v2: exists" in output and "exit 1" in output and "torch imported: False" in output, output
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps(EVENT) + "\n")
    output = cli_refit(model, events, parent / "good")
    assert "is an events log" in output and "exit 1" in output and "torch imported: False" in output, output
