"""The lineage of a refit names the label file as the refit read it: the line's page (or a second
`mrkd review`) may append labels to it while the refit runs (README: `mrkd run ... --review-labels
labels.jsonl` and `mrkd refit last.ckpt --reviewed labels.jsonl` side by side).

Real refit (test_refit's parent: ELPV cells, small ResNet-18 model); the label is appended from inside
the refit's work (its refit_model), as a page click would land; hashes are recomputed with hashlib.
"""

from __future__ import annotations

import hashlib

import pytest

torch = pytest.importorskip("torch")

from test_refit import good_marks, one_thread, parent, write_labels  # noqa: E402,F401  (module fixtures)

import mrkd.train.refit as refit  # noqa: E402
from mrkd.runtime.review import LabelFile, make_label  # noqa: E402


def test_a_label_appended_while_the_refit_runs_is_not_in_the_lineages_label_hash(parent, tmp_path, monkeypatch):
    """The lineage's labels_sha256 was taken of the file at the end: a label the page appended meanwhile
    (not used: the images were read at the start) was counted in, so the hash named a file whose labels
    did not make this version. Now it is the hash of the bytes whose labels the refit used."""
    marks = good_marks(parent, 3)
    labels = write_labels(tmp_path / "labels.jsonl", marks[:2])
    read = labels.read_bytes()
    real = refit.refit_model

    def page_click_meanwhile(*args, **kwargs):
        with LabelFile(labels) as log:          # the third image, marked good from the page
            log.append(make_label("ev-late", marks[2][1], "good", who="page"))
        return real(*args, **kwargs)
    monkeypatch.setattr(refit, "refit_model", page_click_meanwhile)
    result = refit.refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "v2",
                                    export=False, echo=lambda text: None)
    assert labels.read_bytes() != read and labels.read_bytes().startswith(read)     # the click landed
    assert len(result.lineage["good_images"]) == 2           # ... after the labels were read
    assert result.lineage["labels_sha256"] == hashlib.sha256(read).hexdigest()
