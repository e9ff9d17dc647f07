"""`mrkd refit` writes its new version in a staging folder and renames it into place: until the folder
above is synced too, a power cut after the refit said it was written can leave no version there (only the
staging folder, which the next refit warns of). Seen from outside (strace of a real `mrkd refit`)."""

from __future__ import annotations

import pytest

from test_power_cut_leftovers import MRKD, folders_synced_after_rename, traced
from test_refit import good_marks, one_thread, parent, write_labels  # noqa: F401 (fixtures)


@pytest.mark.slow   # a subprocess that imports torch
def test_mrkd_refit_syncs_the_folder_its_new_version_is_renamed_into(parent, tmp_path):
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 1))
    out = tmp_path / "v2"
    calls = traced(MRKD + ["refit", parent / "parent.ckpt", "--reviewed", labels, "--good", parent / "good",
                           "-o", out, "--no-export"], tmp_path)
    assert str(tmp_path) in folders_synced_after_rename(calls, out)
