"""A refit of a refit takes each reviewed image into the memory bank once: images its lineage took
(recorded by their decoded pixels) are skipped, and said to be; with nothing new it writes nothing.
The bank's images are kept out of the threshold's held-out images by their pixels, not their bytes
(the same cell saved as the source PNG and as evidence PNG). Real ELPV cells, test_refit's fixture."""

from __future__ import annotations

import hashlib
import shutil

import pytest

torch = pytest.importorskip("torch")

from cli_errors import assert_one_line_error  # noqa: E402
from test_refit import exact_nearest, good_marks, one_thread, parent, write_labels  # noqa: E402,F401

from mrkd.runtime.review import LabelFile, make_label  # noqa: E402
from mrkd.train.refit import RefitError, refit_checkpoint  # noqa: E402


def resaved(image, path):
    """``image`` written again by OpenCV at another compression: the same pixels, other bytes."""
    import cv2
    pixels = cv2.imread(str(image), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(path), pixels, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert hashlib.sha256(path.read_bytes()).digest() != hashlib.sha256(image.read_bytes()).digest()
    assert (cv2.imread(str(path), cv2.IMREAD_UNCHANGED) == pixels).all()
    return path


def good_folder(parent, folder, *extra):
    """The fixture's held-out good cells plus ``extra`` (path, name) pairs, in a folder of their own."""
    shutil.copytree(parent / "good", folder)
    for image, name in extra:
        resaved(image, folder / name)
    return folder


def held_out_threshold(model_path, images):
    """The calibration rule (fewer than 10 images: max + 10 % of the range) on the written model's own
    scores of ``images``."""
    from mrkd.train.calibrate import score_images
    from mrkd.train.checkpoint import load_checkpoint
    scores = score_images(load_checkpoint(model_path), [str(p) for p in images]).astype("float64")
    return scores.max() + 0.1 * (scores.max() - scores.min())


def test_refitting_a_refit_offers_only_new_images_and_refuses_when_none_is_new(parent, tmp_path):
    """The outside probe: `mrkd refit last.v2/model.ckpt` with the same, still-growing label file
    offered v2's images again (15 more patches of them; threshold 65.73 -> 58.85)."""
    from click.testing import CliRunner
    from mrkd.refit_cli import refit_command
    from mrkd.train.checkpoint import load_checkpoint, read_checkpoint
    from mrkd.train.refit import image_patches
    marks = good_marks(parent, 3)
    labels = write_labels(tmp_path / "labels.jsonl", marks[:2])
    good = str(parent / "good")
    refit_checkpoint(parent / "parent.ckpt", labels, good, tmp_path / "v2", export=False, radius_quantile=0.5,
                     echo=lambda line: None)
    with LabelFile(labels) as log:                  # the operator marks one more false alarm good
        log.append(make_label("ev2", marks[2][1], "good", who="tester"))
    lines = []
    result = refit_checkpoint(tmp_path / "v2" / "model.ckpt", labels, good, tmp_path / "v3", export=False,
                              radius_quantile=0.5, echo=lines.append)
    assert result.lineage["good_images"] == [str(marks[2][1])]
    assert result.already_in_bank == (str(marks[0][1]), str(marks[1][1]))
    summary = [line for line in lines if line.startswith("memory bank ")]
    assert len(summary) == 1 and "from 1 reviewed good image(s), 2 skipped as already in the bank" in summary[0]
    # every row v3 added is a patch of the new image
    before, after = (read_checkpoint(p)["memory_bank"] for p in (tmp_path / "v2" / "model.ckpt",
                                                                    tmp_path / "v3" / "model.ckpt"))
    added = after[len(before):]
    assert len(added) > 0
    new_rows = image_patches(load_checkpoint(tmp_path / "v3" / "model.ckpt"), [str(marks[2][1])])
    assert exact_nearest(added, new_rows).max() < 1e-4
    # v3's lineage names all three as the bank's images (v2's two through its parent), by their bytes too
    recorded = {entry["file_sha256"]: entry["version"] for entry in result.lineage["bank_images"]}
    assert recorded == {hashlib.sha256(m[1].read_bytes()).hexdigest(): v for m, v in zip(marks, (2, 2, 3))}
    # nothing new for v3 (two of them taken by its parent v2): one Error line, exit 1, nothing written
    outcome = CliRunner().invoke(refit_command, [str(tmp_path / "v3" / "model.ckpt"), "--reviewed", str(labels),
                                                 "--good", good, "--no-export"])
    error = assert_one_line_error(outcome, str(labels), "3 reviewed good image(s)", "already in the memory bank",
                                  "nothing written")
    assert outcome.exit_code == 1, error
    assert not (tmp_path / "v3" / "model.v4").exists()


def test_bank_images_are_kept_out_of_the_threshold_by_their_pixels_not_their_bytes(parent, tmp_path):
    """The same cell saved as the source PNG and as evidence PNG: the reviewed image's re-save among
    --good was calibrated on (its bytes differ), and so was an image an earlier version took into the bank
    (with a new label file that no longer names it); each scores ~0 against the bank, so it moves the
    threshold."""
    marks = good_marks(parent, 3)
    originals = sorted((parent / "good").iterdir())
    labels = write_labels(tmp_path / "labels.jsonl", marks[:2])
    good = good_folder(parent, tmp_path / "good2", (marks[0][1], "resaved-ev0.png"))
    lines = []
    result = refit_checkpoint(parent / "parent.ckpt", labels, str(good), tmp_path / "v2", export=False,
                              echo=lines.append)
    assert any(line.startswith("warning: 1 of the --good images") for line in lines), lines
    assert result.threshold_after == pytest.approx(held_out_threshold(tmp_path / "v2" / "model.ckpt", originals),
                                                   rel=1e-5)
    # v3 from a new label file (one new image): v2's bank image re-saved among --good is still left out
    labels3 = write_labels(tmp_path / "labels3.jsonl", marks[2:])
    good3 = good_folder(parent, tmp_path / "good3", (marks[1][1], "resaved-ev1.png"))
    lines = []
    result = refit_checkpoint(tmp_path / "v2" / "model.ckpt", labels3, str(good3), tmp_path / "v3", export=False,
                              echo=lines.append)
    assert any(line.startswith("warning: 1 of the --good images") for line in lines), lines
    assert result.threshold_after == pytest.approx(held_out_threshold(tmp_path / "v3" / "model.ckpt", originals),
                                                   rel=1e-5)


def test_a_confirmed_defects_pixels_among_the_good_images_are_refused_whatever_their_bytes(parent, tmp_path):
    """The defect-among-good refusal compared bytes: a re-save of the confirmed defect's image among
    --good was taken as a held-out good part."""
    defect = sorted((parent / "evidence").iterdir())[-1]          # a defect cell of the fixture
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 2) + [("evD", defect, "defect")])
    good = good_folder(parent, tmp_path / "good", (defect, "resaved-defect.png"))
    with pytest.raises(RefitError, match=r"1 of the --good images .*marked 'defect'") as refused:
        refit_checkpoint(parent / "parent.ckpt", labels, str(good), tmp_path / "out", export=False, force=True,
                         echo=lambda line: None)
    assert str(good / "resaved-defect.png") in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_a_parent_refit_by_an_older_mrkd_is_read_by_the_paths_its_lineage_names(parent, tmp_path):
    """A lineage of schema 1 names its reviewed images by path only: those still there count as taken."""
    from mrkd.train.checkpoint import read_checkpoint
    marks = good_marks(parent, 3)
    labels = write_labels(tmp_path / "labels.jsonl", marks[:2])
    refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "v2", export=False,
                     echo=lambda line: None)
    data = read_checkpoint(tmp_path / "v2" / "model.ckpt")
    old = {k: v for k, v in data["lineage"].items() if k != "bank_images"}
    old["schema_version"] = 1
    torch.save({**data, "lineage": old}, tmp_path / "old.ckpt")
    with LabelFile(labels) as log:
        log.append(make_label("ev2", marks[2][1], "good", who="tester"))
    result = refit_checkpoint(tmp_path / "old.ckpt", labels, str(parent / "good"), tmp_path / "v3", export=False,
                              echo=lambda line: None)
    assert result.lineage["good_images"] == [str(marks[2][1])] and len(result.already_in_bank) == 2
    assert [entry["version"] for entry in result.lineage["bank_images"]] == [2, 2, 3]
