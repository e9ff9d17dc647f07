"""`mrkd refit` decodes each image file once and reads its label file once.

Each reviewed and --good image was decoded to hash its pixels (pixels_sha256: the lineage's bank_images,
the --good images that are images of the bank or confirmed defects), then again by every pass of the
refit over it (scores before, the bank's radius, candidate patches, the defect guard, re-weighting, the
threshold, scores after): 3 to 6 decodes of each file, about 10 s per 1000 large images each time. And
the cheap checks (`mrkd refit`'s, before torch's import) ran again in the library: the label file was read
and parsed three times, a torn last line said three times.

Real refit of test_refit's parent (ELPV cells, small ResNet-18 model); decodes are counted at the one
function that decodes a file (mrkd.runtime.images._decode); the pixel hashes are recomputed here with
PIL and hashlib.
"""

from __future__ import annotations

import collections
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_refit import good_marks, one_thread, parent, write_labels  # noqa: E402,F401  (module fixtures)

import mrkd.runtime.images as images  # noqa: E402
from mrkd.train.refit import refit_checkpoint  # noqa: E402


def defect_mark(root):
    cells = sorted(p for p in (root / "evidence").iterdir() if p not in {m[1] for m in good_marks(root, 4)})
    return ("evD", cells[0], "defect")


@pytest.fixture
def decodes(monkeypatch):
    """path -> how many times a file was decoded."""
    counted = collections.Counter()
    real = images._decode

    def counting(path):
        counted[str(Path(path).resolve())] += 1
        return real(path)
    monkeypatch.setattr(images, "_decode", counting)
    return counted


def test_each_image_file_is_decoded_once_per_refit(parent, tmp_path, decodes):
    """Before: each reviewed good image 5 times (its hash, scores before, candidates, re-weighting, scores
    after), each held-out one and the confirmed defect 4 (hash, radius or guard, re-weighting, threshold
    or check), the --good copy of a reviewed image 1."""
    good = tmp_path / "good"
    shutil.copytree(parent / "good", good)
    marks = good_marks(parent, 3)
    shutil.copy(marks[0][1], good / "copy_of_a_reviewed_image.png")       # left out of the threshold
    labels = write_labels(tmp_path / "labels.jsonl", marks + [defect_mark(parent)])
    result = refit_checkpoint(parent / "parent.ckpt", labels, str(good), tmp_path / "v2", export=False,
                              force=True, reweight=True, echo=lambda line: None)
    assert result.reweight is not None and len(result.lineage["good_images"]) == 3
    expected = {str(p.resolve()) for p in good.iterdir()} | {str(Path(m[1]).resolve()) for m in marks} | \
        {str(defect_mark(parent)[1].resolve())}
    assert set(decodes) == expected
    assert {path: n for path, n in decodes.items() if n != 1} == {}


def independent_pixels_sha256(path) -> str:
    """The lineage's pixel hash by its definition (the decoded image as the model is given it, uint8
    H x W x 3 BGR, with its dtype and shape), decoded here by PIL."""
    from PIL import Image
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))[:, :, ::-1]
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    digest = hashlib.sha256(f"{pixels.dtype.str}{pixels.shape}".encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()


def test_the_lineage_records_each_bank_images_pixel_hash_and_file_hash(parent, tmp_path):
    marks = good_marks(parent, 3)
    labels = write_labels(tmp_path / "labels.jsonl", marks)
    result = refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "v2", export=False,
                              echo=lambda line: None)
    recorded = {entry["path"]: entry for entry in result.lineage["bank_images"]}
    assert set(recorded) == {str(m[1]) for m in marks}
    for path, entry in recorded.items():
        assert entry["pixels_sha256"] == independent_pixels_sha256(path), path
        assert entry["file_sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest(), path
        assert entry["version"] == 2
    # the hashes tell images apart: three cells, three hashes
    assert len({entry["pixels_sha256"] for entry in recorded.values()}) == 3


def test_a_refit_reads_its_label_file_once(parent, tmp_path, monkeypatch):
    """Before: twice (the library's checks, then its own read for the lineage's hash and the labels;
    `mrkd refit` read it a third time, in its checks before torch)."""
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 2))
    reads = []
    real = Path.read_bytes

    def counting(self):
        if self == labels:
            reads.append(self)
        return real(self)
    monkeypatch.setattr(Path, "read_bytes", counting)
    result = refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "v2", export=False,
                              echo=lambda line: None)
    assert len(reads) == 1 and result.lineage["labels_sha256"] == hashlib.sha256(labels.read_bytes()).hexdigest()


def test_mrkd_refit_says_a_torn_last_label_line_once(parent, tmp_path):
    """The label file's torn last line (a crash mid-write) is skipped with a warning: `mrkd refit` said it
    three times (its checks before torch, the library's checks again, the labels' read)."""
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 2))
    with open(labels, "ab") as handle:
        handle.write(b'{"event_id": "ev-torn", "lab')
    done = subprocess.run([sys.executable, "-m", "mrkd.cli", "refit", str(parent / "parent.ckpt"), "--reviewed",
                           str(labels), "--good", str(parent / "good"), "-o", str(tmp_path / "v2"), "--no-export"],
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert output.count("torn last line") == 1, output
    assert (tmp_path / "v2" / "model.ckpt").is_file()
