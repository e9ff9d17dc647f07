"""`mrkd refit` hashes each reviewed image file once per run, however many labels name it.

refit checks every label's image against the sha256 the operator saw (and, with its events log, the one
the run recorded) and the lineage records each bank image's file hash. Each of those read the whole file:
a label file whose events share one evidence file (a line that flagged the same frame again and again, a
part's cameras writing one mosaic) read that file twice per label, and once more for the lineage.

Real refit of test_refit's parent (ELPV cells, small ResNet-18 model); the labels are `mrkd review`'s
(label_events, recording the events log); hashing is counted by wrapping ``image_sha256`` (the file's
sha256, metadata.file_sha256) where the refit's modules bind it, runtime/review.py and train/refit.py.
The hashes the test compares with are hashlib's.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from test_refit import good_marks, one_thread, parent  # noqa: E402,F401  (module fixtures)

import mrkd.runtime.review as review  # noqa: E402
import mrkd.train.refit as refit  # noqa: E402
from mrkd.runtime.review import LabelFile, label_events  # noqa: E402

SHARED_EVENTS = 12


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def hashed(monkeypatch):
    """resolved path -> how many times its file was hashed (the real hash is still taken)."""
    counted = collections.Counter()
    real = review.image_sha256

    def counting(path):
        counted[str(Path(path).resolve())] += 1
        return real(path)
    for module in (review, refit):
        if hasattr(module, "image_sha256"):
            monkeypatch.setattr(module, "image_sha256", counting)
    return counted


def test_a_file_named_by_many_labels_is_hashed_once_per_refit(parent, tmp_path, hashed):
    """Before: the shared file 2 x 12 + 1 = 25 times (each label's sha256 check, its events-log check,
    the lineage), the file of one label 3 times."""
    run = tmp_path / "run"
    (run / "evidence").mkdir(parents=True)
    (shared_cell, _, other_cell) = [image for _, image, _ in good_marks(parent, 3)]
    shared, other = run / "evidence" / "shared.png", run / "evidence" / "other.png"
    shutil.copy(shared_cell, shared)
    shutil.copy(other_cell, other)
    events = [{"event_id": f"ev{i}", "camera": "cam0", "evidence": str(shared), "evidence_sha256": sha256(shared)}
              for i in range(SHARED_EVENTS)]
    events.append({"event_id": "ev-other", "camera": "cam0", "evidence": str(other), "evidence_sha256": sha256(other)})
    log = run / "events.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    labels = tmp_path / "labels.jsonl"
    with LabelFile(labels) as handle:
        handle.extend(label_events(events, "good", who="tester", events_path=log))
    hashed.clear()                  # the labels' own making hashed each event's file: not the refit's
    result = refit.refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "v2",
                                    export=False, echo=lambda line: None)
    assert {path: hashed[path] for path in (str(shared.resolve()), str(other.resolve()))} == \
        {str(shared.resolve()): 1, str(other.resolve()): 1}
    # the checks still ran on those hashes: the lineage records each file's hash, one bank image each
    assert sorted((e["path"], e["file_sha256"]) for e in result.lineage["bank_images"]) == \
        sorted([(str(shared), sha256(shared)), (str(other), sha256(other))])


def test_a_file_replaced_meanwhile_is_hashed_again(tmp_path):
    """FileHashes keys a file by its path, inode, size and modification time: the same bytes are read once,
    a file rewritten (another inode, or the same inode with another time) is read again."""
    from mrkd.runtime.review import FileHashes
    image = tmp_path / "a.png"
    image.write_bytes(b"first")
    hashes = FileHashes()
    assert hashes.sha256(image) == hashes.sha256(str(image)) == sha256(image)
    assert hashes.reads == 1
    image.write_bytes(b"other")                         # same size, same inode
    info = image.stat()
    os.utime(image, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))
    assert hashes.sha256(image) == sha256(image) != hashlib.sha256(b"first").hexdigest()
    replacement = tmp_path / "b.png"
    replacement.write_bytes(b"third")
    os.replace(replacement, image)                      # another inode
    assert hashes.sha256(image) == hashlib.sha256(b"third").hexdigest()
    assert hashes.reads == 3
