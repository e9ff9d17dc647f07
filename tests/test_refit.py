"""`mrkd refit`: reviewed good parts into the memory bank, threshold set again, MRKD weights untouched.

Real images: ELPV solar cells (elpv-dataset, a dev dependency) through a small model (ResNet-18
random teacher, 64 px, bank fitted by the trainer's own fit_memory_bank). The selection rule and the
distances are checked against brute force / scipy written here; the threshold against the
calibration rule recomputed from the model's own scores.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mrkd.runtime.metadata import file_sha256  # noqa: E402
from mrkd.runtime.review import LabelFile, make_label  # noqa: E402
from mrkd.train.refit import RefitError, defect_patches, farthest_first, guard_mask, nearest_distance, \
    refit_checkpoint  # noqa: E402


def elpv_cells(kind: str, probability: float, count: int, skip: int = 0):
    from mrkd.train.elpv import read_labels
    cells = sorted((c for c in read_labels() if c.module_type == kind and c.probability == probability),
                   key=lambda c: c.name)
    return [c.path for c in cells[skip:skip + count]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on the shared 2-core machine a second OpenMP thread spins against the other
    processes (a refit measured 22.8 s with two threads, 2.7 s with one, under load 7)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A --score both checkpoint fitted on 10 mono good cells, calibrated on 6 others."""
    from mrkd.train.calibrate import calibrate
    from mrkd.train.memory_bank import fit_memory_bank
    from mrkd.train.model import build_model
    root = tmp_path_factory.mktemp("refit")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model("resnet18", "random", image_size=64).eval()
    fit_memory_bank(model, elpv_cells("mono", 0.0, 10), "both", fraction=0.1, seed=0, batch_size=8)
    held_out = root / "good"
    held_out.mkdir()
    for path in elpv_cells("mono", 0.0, 6, skip=10):
        shutil.copy(path, held_out / Path(path).name)
    calibrate(model, sorted(str(p) for p in held_out.iterdir()))
    model.save(root / "parent.ckpt")
    reviewed = root / "evidence"
    reviewed.mkdir()
    for path in elpv_cells("mono", 0.0, 4, skip=16) + elpv_cells("mono", 1.0, 2):
        shutil.copy(path, reviewed / Path(path).name)
    return root


def write_labels(path, marks):
    with LabelFile(path) as log:
        for event_id, image, label in marks:
            log.append(make_label(event_id, image, label, who="tester"))
    return path


def good_marks(root, n=3):
    images = sorted(p for p in (root / "evidence").iterdir() if p.name in
                    {Path(c).name for c in elpv_cells("mono", 0.0, 4, skip=16)})
    return [(f"ev{i}", image, "good") for i, image in enumerate(images[:n])]



def exact_nearest(rows: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Each row's distance to its nearest bank row in float64 without the matmul shortcut (the reference)."""
    return torch.cdist(rows.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist").min(1).values

def test_nearest_distance_and_farthest_first_match_brute_force():
    from scipy.spatial.distance import cdist
    g = torch.Generator().manual_seed(3)
    bank, candidates = torch.randn(40, 5, generator=g), torch.randn(30, 5, generator=g) * 1.5
    expected = cdist(candidates.double().numpy(), bank.double().numpy()).min(1)
    np.testing.assert_allclose(nearest_distance(candidates, bank, chunk=7).numpy(), expected, rtol=1e-5, atol=1e-5)
    radius = float(np.median(expected))
    # brute force: recompute every distance to bank + chosen at each step
    chosen, pool = [], candidates.double().numpy()
    while True:
        kept = np.vstack([bank.double().numpy()] + [pool[chosen]] if chosen else [bank.double().numpy()])
        distance = cdist(pool, kept).min(1)
        best = int(np.argmax(distance))
        if distance[best] <= radius:
            break
        chosen.append(best)
    assert farthest_first(candidates, bank, radius).tolist() == chosen
    assert 0 < len(chosen) < len(candidates)


def test_defect_guard_excludes_a_candidate_on_a_defect_patch_and_keeps_one_far_from_all():
    from scipy.spatial.distance import cdist
    g = torch.Generator().manual_seed(5)
    bank = torch.randn(50, 6, generator=g)
    # two "defect images" of 9 patches each: mostly bank-like, three patches far out
    defects = torch.randn(2, 9, 6, generator=g) * 0.3
    defects[0, 2] += 6.0
    defects[1, 5] -= 6.0
    defects[1, 7] += torch.tensor([0.0, 7.0, 0.0, 0.0, 0.0, 0.0])
    rows = defects.reshape(-1, 6)
    guard = defect_patches(rows, 2, bank, top=2)
    # brute force: per image the 2 rows with the largest nearest-bank distance
    distance = cdist(rows.double().numpy(), bank.double().numpy()).min(1).reshape(2, 9)
    expected = np.vstack([defects[i, np.argsort(-distance[i])[:2]].numpy() for i in range(2)])
    np.testing.assert_allclose(np.sort(guard.numpy(), 0), np.sort(expected, 0))
    assert any(np.allclose(r, defects[0, 2].numpy()) for r in guard.numpy())
    reach = 1.0
    identical = defects[1, 5].clone()              # exactly a defect's most anomalous patch
    near = defects[0, 2] + 0.5 * reach / np.sqrt(6)  # within reach of one
    far = torch.full((6,), -20.0)                  # far from every defect patch
    candidates = torch.stack([identical, near, far])
    kept = guard_mask(candidates, guard, reach)
    brute = cdist(candidates.double().numpy(), guard.double().numpy()).min(1) > reach
    assert kept.tolist() == brute.tolist() == [False, False, True]
    assert guard_mask(candidates, guard[:0], reach).all()            # no defect confirmed: no guard


def test_defect_guard_with_a_reach_per_patch_matches_brute_force():
    from scipy.spatial.distance import cdist
    g = torch.Generator().manual_seed(7)
    guard, candidates = torch.randn(12, 5, generator=g), torch.randn(300, 5, generator=g) * 1.5
    reach = torch.rand(12, generator=g) * 2.0
    kept = guard_mask(candidates, guard, reach)
    brute = (cdist(candidates.double().numpy(), guard.double().numpy()) > reach.double().numpy()[None, :]).all(1)
    assert kept.tolist() == brute.tolist() and 0 < int(kept.sum()) < len(candidates)


def test_defect_guard_never_lets_a_confirmed_defects_patches_come_nearer_the_bank(parent):
    """The defect guard at keep 1.0: each guarded patch (a confirmed
    defect's most anomalous) keeps its nearest-bank distance; without the guard the same refit pulls
    some of them onto the bank."""
    from mrkd.train.checkpoint import load_checkpoint
    from mrkd.train.refit import GUARD_TOP, image_patches, refit_model
    reviewed = [str(m[1]) for m in good_marks(parent, 3)]
    defect = reviewed[:1]             # an image both reviewed good and confirmed defect: the worst case
    held = sorted(str(p) for p in (parent / "good").iterdir())
    drops = {}
    # a low growth stop (the median), so that on this small fixture the refit adds patches at all
    for name, options in (("keep", {"guard_keep": 1.0}), ("off", {"guard_keep": 0.0})):
        options["radius_quantile"] = 0.5
        model = load_checkpoint(parent / "parent.ckpt")
        before_bank = model.head.memory_bank.bank.detach().double()
        rows = image_patches(model, defect).double()
        guard = defect_patches(rows, 1, before_bank, GUARD_TOP)
        before = exact_nearest(guard, before_bank)
        result = refit_model(model, reviewed, held, defect, **options)
        assert result.added_patches > 0
        after_bank = model.head.memory_bank.bank.detach().double()
        after = exact_nearest(guard, after_bank)
        drops[name] = float((before - after).max())
    assert drops["keep"] <= 1e-6 * float(before.max())
    assert drops["off"] > 0.5 * float(before.min())


def test_refit_adds_only_reviewed_patches_keeps_mrkd_weights_and_sets_threshold_by_the_rule(parent, tmp_path):
    from mrkd.train.calibrate import score_images
    from mrkd.train.checkpoint import load_checkpoint, read_checkpoint
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent))
    parent_sha = file_sha256(parent / "parent.ckpt")
    # the fixture's reviewed cells are ordinary good cells, not false alarms: a low growth stop (the
    # median of the held-out patches' distances) makes the refit add some of their patches
    result = refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "v2", export=False,
                              radius_quantile=0.5, echo=lambda line: None)
    assert file_sha256(parent / "parent.ckpt") == parent_sha          # the parent is never written
    old, new = read_checkpoint(parent / "parent.ckpt"), read_checkpoint(tmp_path / "v2" / "model.ckpt")
    for part in ("bottleneck", "student"):                              # bit-identical MRKD weights
        assert old[part].keys() == new[part].keys()
        for key in old[part]:
            assert torch.equal(old[part][key], new[part][key]), (part, key)
    assert old["config"] == new["config"]
    assert {k: v for k, v in old["teacher"].items() if k != "state_dict"} == \
        {k: v for k, v in new["teacher"].items() if k != "state_dict"}
    for key, value in old["teacher"].get("state_dict", {}).items():
        assert torch.equal(value, new["teacher"]["state_dict"][key]), key
    # the old bank is kept whole, in order; the rows added are patches of the reviewed images
    before, after = old["memory_bank"], new["memory_bank"]
    assert torch.equal(after[:len(before)], before) and len(after) == result.bank_after > len(before)
    refit = load_checkpoint(tmp_path / "v2" / "model.ckpt")
    from mrkd.train.refit import image_patches
    reviewed_rows = image_patches(refit, [str(m[1]) for m in good_marks(parent)])
    added = after[len(before):]
    assert exact_nearest(added, reviewed_rows).max() < 1e-4
    # the threshold: the calibration rule on the held-out good images' new scores (6 < 10: max + 10 % range)
    held = sorted(str(p) for p in (parent / "good").iterdir())
    scores = score_images(refit, held).astype(np.float64)
    assert new["calibration"]["threshold"] == pytest.approx(scores.max() + 0.1 * (scores.max() - scores.min()),
                                                            rel=1e-5)
    assert new["calibration"]["previous_threshold"] == old["calibration"]["threshold"]
    # the reviewed false alarms now score lower, none higher
    assert all(a <= b + 1e-5 for a, b in zip(result.good_scores_after, result.good_scores_before))
    assert sum(result.good_scores_after) < sum(result.good_scores_before)
    lineage = new["lineage"]
    assert lineage["version"] == 2 and lineage["parent_sha256"] == parent_sha
    assert lineage["labels_sha256"] == file_sha256(labels)
    # a second refit from the refit model, with one more image marked good: version 3, parent = v2
    labels3 = write_labels(tmp_path / "labels3.jsonl", good_marks(parent, 4)[3:])
    result3 = refit_checkpoint(tmp_path / "v2" / "model.ckpt", labels3, str(parent / "good"), export=False,
                               echo=lambda line: None)
    assert result3.lineage["version"] == 3 and Path(result3.files["model.ckpt"]).parent.name == "model.v3"


def test_confirmed_defect_no_longer_flagged_refuses_unless_force(parent, tmp_path):
    # a held-out good cell labelled "defect": it lies below any threshold set on the held-out cells (one
    # pixel changed by one grey level, so it is not a --good image, which refit refuses as a confirmed
    # defect among the good by its pixels, whatever the file's bytes)
    import cv2
    sneaky = tmp_path / "sneaky.png"
    pixels = cv2.imread(str(sorted((parent / "good").iterdir())[0]), cv2.IMREAD_UNCHANGED)
    pixels[0, 0] = pixels[0, 0] + 1 if pixels[0, 0] < 255 else 254
    cv2.imwrite(str(sneaky), pixels)
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 2) + [("evD", sneaky, "defect")])
    with pytest.raises(RefitError, match="confirmed defect.*no longer flagged.*--force"):
        refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "out", export=False,
                         echo=lambda line: None)
    assert not (tmp_path / "out").exists()
    lines = []
    result = refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "out", export=False,
                              force=True, echo=lines.append)
    assert result.defects_missed == [str(sneaky)]
    assert any(line.startswith("warning: ") and "written anyway (--force)" in line for line in lines), lines
    # the missed defect is named with its score under the written model, below the written threshold
    from mrkd.train.calibrate import score_images
    from mrkd.train.checkpoint import load_checkpoint, read_checkpoint
    written = tmp_path / "out" / "model.ckpt"
    score = float(score_images(load_checkpoint(written), [str(sneaky)])[0])
    threshold = read_checkpoint(written)["calibration"]["threshold"]
    named = [line for line in lines if line.startswith(f"  {sneaky}: score ")]
    assert len(named) == 1 and score < threshold
    assert float(named[0].split("score ")[1].split()[0]) == pytest.approx(score, rel=1e-5)
    assert float(named[0].rsplit("threshold ", 1)[1]) == pytest.approx(threshold, rel=1e-5)
    with pytest.raises(RefitError, match="exists.*name another with -o"):      # never over an earlier version
        refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "out", export=False,
                         force=True, echo=lambda line: None)


def test_a_confirmed_defect_among_the_good_images_is_refused_not_calibrated_on(parent, tmp_path):
    """--good given the alarm evidence folder (evidence/cam0 instead of its ok/ samples): the images marked
    'defect confirmed' were taken as held-out good parts and the threshold set above them; the refit then
    said the new model 'no longer flags' them, as if the bank had done it. Refused in one line naming
    the image, before any work; nothing written."""
    good = tmp_path / "good"
    shutil.copytree(parent / "good", good)
    defect = sorted(good.iterdir())[0]
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 2) + [("evD", defect, "defect")])
    with pytest.raises(RefitError, match=r"1 of the --good images .*marked 'defect'") as refused:
        refit_checkpoint(parent / "parent.ckpt", labels, str(good), tmp_path / "out", export=False,
                         force=True, echo=lambda line: None)
    assert str(defect) in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_reviewed_images_missing_changed_or_of_unknown_events_are_skipped_with_a_warning(parent, tmp_path):
    marks = good_marks(parent, 3)
    copies = []
    for i, (_, image, _) in enumerate(marks):
        copies.append(tmp_path / f"c{i}.png")
        shutil.copy(image, copies[-1])
    labels = write_labels(tmp_path / "labels.jsonl", [("e0", copies[0], "good"), ("e1", copies[1], "good"),
                                                      ("e2", copies[2], "good")])
    copies[1].unlink()                                             # missing
    copies[2].write_bytes(copies[2].read_bytes() + b"\0")          # changed since review
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps({"event_id": e}) + "\n" for e in ("e0", "e1")))   # e2 unknown
    lines = []
    result = refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "out", export=False,
                              events=events, echo=lines.append)
    assert result.lineage["good_images"] == [str(copies[0])]
    assert any("e1" in l and "no longer exists" in l for l in lines)
    assert any("e2" in l and "not in the events log" in l for l in lines)
    copies[0].unlink()
    with pytest.raises(RefitError, match="no usable image marked good"):
        refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "out2", export=False,
                         echo=lambda line: None)


def test_refit_without_an_events_log_says_in_one_line_that_event_ids_went_unchecked(parent, tmp_path):
    """A label of an event that is in no events log is caught only with --events; without it refit went
    on without a word, as if every event id had been checked."""
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 2))
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps({"event_id": e}) + "\n" for e in ("ev0", "ev1")))
    runs = {}
    for name, log in (("without", None), ("with", events)):
        runs[name] = []
        refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / name, export=False,
                         events=log, echo=runs[name].append)
    unchecked = [line for line in runs["without"] if "not checked" in line]
    assert len(unchecked) == 1 and "--events" in unchecked[0] and str(labels) in unchecked[0], runs["without"]
    assert "\n" not in unchecked[0]
    assert not [line for line in runs["with"] if "not checked" in line], runs["with"]


def test_one_image_under_two_events_is_one_reviewed_image(parent, tmp_path):
    """Two alarms on one frame write one evidence file per event: the same bytes at two paths. Marked
    good under both, refit counted and listed it twice ('from 3 reviewed good images' for 2)."""
    from mrkd.train.refit import reviewed_images
    marks = good_marks(parent, 2)
    twin = tmp_path / "twin.png"
    shutil.copy(marks[0][1], twin)
    labels = write_labels(tmp_path / "labels.jsonl", marks + [("ev-twin", twin, "good")])
    reviewed = reviewed_images(labels)
    assert reviewed.good == (str(marks[0][1]), str(marks[1][1]))
    assert reviewed.skipped == ()


def test_a_confirmed_defect_whose_image_is_gone_refuses_the_refit_unless_force(parent, tmp_path):
    """The confirmed-defect check is the refit's safety net; an image marked "defect confirmed" that no
    longer exists (or changed) was skipped with a warning and the refit went on without that check."""
    defect = tmp_path / "defect.png"
    shutil.copy(sorted((parent / "evidence").iterdir())[-1], defect)
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 2) + [("evD", defect, "defect")])
    defect.unlink()
    lines = []
    with pytest.raises(RefitError, match=r"1 image\(s\) marked 'defect' cannot be checked.*--force"):
        refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "out", export=False,
                         echo=lines.append)
    assert any("evD" in line and "no longer exists" in line for line in lines)
    assert not (tmp_path / "out").exists()
    lines = []
    result = refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "out", export=False,
                              force=True, echo=lines.append)
    assert result.lineage["defect_images"] == [] and len(result.lineage["good_images"]) == 2
    assert any(line.startswith("warning: 1 image(s) marked 'defect'") for line in lines), lines
    # a missing image marked good only leaves that image out (it adds nothing to the bank): no refusal
    gone = tmp_path / "gone.png"
    shutil.copy(good_marks(parent, 3)[2][1], gone)
    labels = write_labels(tmp_path / "labels2.jsonl", good_marks(parent, 2) + [("evG", gone, "good")])
    gone.unlink()
    assert refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "out2", export=False,
                            echo=lambda line: None).lineage["good_images"] == [str(m[1]) for m in good_marks(parent, 2)]


def test_bank_over_its_cap_is_reselected_within_it(parent, tmp_path):
    from mrkd.train.checkpoint import load_checkpoint
    from mrkd.train.refit import refit_model
    model = load_checkpoint(parent / "parent.ckpt")
    cap = len(model.head.memory_bank.bank) + 5
    model.config.knn_max_patches = cap
    held = sorted(str(p) for p in (parent / "good").iterdir())
    result = refit_model(model, [str(m[1]) for m in good_marks(parent, 3)], held, radius=0.0)
    assert result.reselected and result.bank_after == cap == len(model.head.memory_bank.bank)


@pytest.mark.parametrize("quantile", [0.25, 0.9])
def test_growth_stops_at_the_asked_quantile_of_the_held_out_patches_distances(parent, quantile):
    from mrkd.train.checkpoint import load_checkpoint
    from mrkd.train.refit import image_patches, refit_model
    model = load_checkpoint(parent / "parent.ckpt")
    bank = model.head.memory_bank.bank.detach().double()
    held = sorted(str(p) for p in (parent / "good").iterdir())
    rows = image_patches(model, held).double()
    exact = exact_nearest(rows, bank).numpy()
    reviewed = [str(m[1]) for m in good_marks(parent, 3)]
    result = refit_model(model, reviewed, held, radius_quantile=quantile)
    assert result.radius == pytest.approx(float(np.quantile(exact, quantile)), rel=1e-4)
    # every reviewed patch now lies within the radius of the grown bank (the growth's stop)
    grown = model.head.memory_bank.bank.detach().double()
    candidates = image_patches(model, reviewed).double()
    reach = exact_nearest(candidates, grown)
    assert float(reach.max()) <= result.radius * (1 + 1e-4)


def mrkd(*args, timeout=300):
    code = f"import sys\nfrom mrkd.cli import main\nsys.argv[0] = 'mrkd'\nmain({list(map(str, args))!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})


@pytest.mark.slow   # two subprocesses that import torch
def test_cli_errors_are_one_line(parent, tmp_path):
    help_text = mrkd("refit", "--help").stdout
    assert "--force" in help_text and "refuse" in help_text
    bad = tmp_path / "labels.jsonl"
    bad.write_text('{"event_id": "x"}\n{"event_id": \n')
    for args, needle in ((("refit", parent / "parent.ckpt", "--reviewed", bad, "--good", parent / "good"),
                          "labels.jsonl:1: field image_sha256 is missing"),
                         (("refit", parent / "good" / "nope.onnx", "--reviewed", bad, "--good", parent / "good"),
                          "nope.onnx")):
        done = mrkd(*args)
        assert done.returncode != 0
        assert "Traceback" not in done.stderr, done.stderr
        errors = [l for l in done.stderr.splitlines() if l.startswith("Error:")]
        assert len(errors) == 1 and needle in errors[0], done.stderr


def test_cli_augment_reaches_the_refit_and_is_recorded_in_the_lineage(parent, tmp_path):
    """`mrkd refit --augment flips` offers each reviewed image's mirrored copies (the library's option,
    which the command did not have; its effect is checked by the test below); the new version's lineage
    says which, and the choices are the library's presets."""
    from mrkd.refit_cli import AUGMENT_CHOICES
    from mrkd.train.checkpoint import read_checkpoint
    from mrkd.train.refit import AUGMENT_PRESETS
    assert AUGMENT_CHOICES == tuple(AUGMENT_PRESETS)
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 2))
    for augment in ("none", "flips"):
        done = mrkd("refit", parent / "parent.ckpt", "--reviewed", labels, "--good", parent / "good",
                    "--out", tmp_path / augment, "--no-export", "--augment", augment)
        assert done.returncode == 0, done.stderr
        lineage = read_checkpoint(tmp_path / augment / "model.ckpt")["lineage"]
        assert lineage["augment"] == list(AUGMENT_PRESETS[augment])     # what it grew by: the library's test
        assert re.search(r"refit: +0%\|", done.stderr), done.stderr[-2000:]    # its progress bar, on stderr
    done = mrkd("refit", parent / "parent.ckpt", "--reviewed", labels, "--good", parent / "good",
                "--out", tmp_path / "bad", "--no-export", "--augment", "rot45")
    assert done.returncode == 2 and "rot45" in done.stderr and not (tmp_path / "bad").exists()


@pytest.mark.slow   # ONNX export + parity check
def test_cli_writes_checkpoint_and_export_with_lineage_the_runtime_loads(parent, tmp_path):
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 2))
    done = mrkd("refit", parent / "parent.ckpt", "--reviewed", labels, "--good", parent / "good",
                "--out", tmp_path / "v2")
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "v2" / "model.onnx.json").read_text())
    assert meta["extra"]["model_version"] == 2
    assert meta["extra"]["parent_sha256"] == file_sha256(parent / "parent.ckpt")
    assert meta["extra"]["labels_sha256"] == file_sha256(labels)
    # what it prints names the version's folder, never the staging folder it was built in (renamed away)
    printed = done.stdout + done.stderr
    assert str(tmp_path / "v2" / "model.onnx") in printed and f"{tmp_path / '.v2.'}" not in printed, printed
    total, bank = (float(x) for x in re.search(r"in ([\d.]+) s \(the bank and threshold ([\d.]+) s\)",
                                               printed).groups())
    assert total >= bank > 0              # the whole refit, export included, against its compute part
    from mrkd.runtime.detector import Detector
    from mrkd.train.checkpoint import load_checkpoint
    from mrkd.train.calibrate import score_images
    detector = Detector(tmp_path / "v2" / "model.onnx")
    image = str(good_marks(parent, 1)[0][1])
    import cv2
    got = detector(cv2.imread(image)).scores[0]
    expected = score_images(load_checkpoint(tmp_path / "v2" / "model.ckpt"), [image])[0]
    assert got == pytest.approx(expected, rel=1e-3)
    assert detector.threshold == pytest.approx(meta["calibration"]["threshold"])
    detector.close()


def test_refit_help_documents_the_defect_guard_and_its_default_is_the_rules():
    from click.testing import CliRunner

    from mrkd.refit_cli import DEFECT_GUARD_DEFAULT, refit_command
    from mrkd.train.refit import GUARD_KEEP
    assert DEFECT_GUARD_DEFAULT == GUARD_KEEP
    text = " ".join(CliRunner().invoke(refit_command, ["--help"]).output.split())
    assert "--defect-guard" in text and "turns the guard off" in text and f"default: {GUARD_KEEP}" in text
    from mrkd.train.refit import MRKD_SHARE_GRID, REWEIGHT_MARGIN, REWEIGHT_MIN_DEFECT, REWEIGHT_MIN_GOOD
    assert "--reweight / --no-reweight" in text and "default: no-reweight" in text
    assert f"{min(MRKD_SHARE_GRID)}-{max(MRKD_SHARE_GRID)}" in text and f"AUROC gain of {REWEIGHT_MARGIN}" in text
    assert f"at least {REWEIGHT_MIN_GOOD} reviewed good images, {REWEIGHT_MIN_DEFECT} confirmed" in text


def brute_share_choice(good, defect, reviewed, grid, min_good, min_defect, margin):
    """choose_mrkd_share's rule recomputed pixel by pixel and pair by pair."""
    def score(m, k, s):
        best = -np.inf
        for y in range(m.shape[0]):
            for x in range(m.shape[1]):
                best = max(best, 2 * s * m[y, x] + 2 * (1 - s) * k[y, x])
        return best

    table = {}
    for s in sorted(set(grid) | {0.5}):
        g = [score(m, k, s) for m, k in zip(*good)]
        d = [score(m, k, s) for m, k in zip(*defect)]
        right = sum(1.0 if b > a else 0.5 if b == a else 0.0 for a in g for b in d)
        table[s] = right / (len(g) * len(d))
    if reviewed < min_good or len(defect[0]) < min_defect:
        return 0.5, table
    best = max(table.values())
    share = min((s for s, v in table.items() if v >= best - 1e-9), key=lambda s: abs(s - 0.5))
    return (share if best - table[0.5] >= margin else 0.5), table


def synthetic_maps(seed, goods=8, defects=8, size=5):
    """Goods with one strong MRKD peak (false alarms from the MRKD part) and a weak kNN part;
    defects with a moderate peak in both parts: more kNN weight separates them."""
    rng = np.random.default_rng(seed)
    gm, gk = rng.uniform(0, 0.2, (goods, size, size)), rng.uniform(0, 0.2, (goods, size, size))
    dm, dk = rng.uniform(0, 0.2, (defects, size, size)), rng.uniform(0, 0.2, (defects, size, size))
    gm[:, 1, 1] += rng.uniform(1.2, 1.45, goods)
    gk[:, 3, 3] += rng.uniform(0.1, 0.3, goods)
    dm[:, 2, 2] += rng.uniform(0.5, 0.7, defects)
    dk[:, 2, 2] += rng.uniform(0.6, 0.8, defects)
    return (gm, gk), (dm, dk)


def test_reweight_moves_when_the_labels_support_it_as_brute_force_says():
    from mrkd.train.refit import MRKD_SHARE_GRID, REWEIGHT_MARGIN, choose_mrkd_share
    good, defect = synthetic_maps(0)
    chosen = choose_mrkd_share(good, defect, reviewed=6)
    expected, table = brute_share_choice(good, defect, 6, MRKD_SHARE_GRID, 5, 5, REWEIGHT_MARGIN)
    assert chosen.moved and chosen.share == expected < 0.5            # toward kNN, where the goods are quiet
    assert {row.share: row.auroc for row in chosen.table} == pytest.approx(table)
    assert table[expected] - table[0.5] >= REWEIGHT_MARGIN


def test_reweight_stays_with_few_labels_or_a_small_gain_as_brute_force_says():
    from mrkd.train.refit import MRKD_SHARE_GRID, REWEIGHT_MARGIN, choose_mrkd_share
    good, defect = synthetic_maps(0)
    few = choose_mrkd_share(good, defect, reviewed=4)                 # the same maps, 4 reviewed goods
    assert not few.moved and few.share == 0.5 and "too few" in few.reason
    assert brute_share_choice(good, defect, 4, MRKD_SHARE_GRID, 5, 5, REWEIGHT_MARGIN)[0] == 0.5
    short = choose_mrkd_share(good, (defect[0][:4], defect[1][:4]), reviewed=8)
    assert not short.moved and short.share == 0.5                     # 4 confirmed defects
    # parts that separate equally well at every share: the gain is 0, so nothing moves
    rng = np.random.default_rng(1)
    gm = rng.uniform(0, 0.2, (8, 5, 5))
    dm = gm + 1.0
    same = choose_mrkd_share((gm, gm.copy()), (dm, dm.copy()), reviewed=8)
    assert not same.moved and same.share == 0.5
    assert brute_share_choice((gm, gm), (dm, dm), 8, MRKD_SHARE_GRID, 5, 5, REWEIGHT_MARGIN)[0] == 0.5


def test_component_maps_sum_to_the_models_map_and_a_share_rescales_it(parent):
    from mrkd.train.calibrate import score_images
    from mrkd.train.checkpoint import load_checkpoint
    from mrkd.train.refit import apply_mrkd_share, component_maps, share_scores
    model = load_checkpoint(parent / "parent.ckpt").eval()
    held = sorted(str(p) for p in (parent / "good").iterdir())[:3]
    mrkd_maps, knn_maps = component_maps(model, held)
    np.testing.assert_allclose(share_scores(mrkd_maps, knn_maps, 0.5), score_images(model, held), rtol=1e-4)
    # the kNN part against an explicit bank equals the model's own when that bank is the model's
    bank = model.head.memory_bank.bank
    _, own = component_maps(model, held, [bank] * len(held))
    np.testing.assert_allclose(own, knn_maps, rtol=1e-4, atol=1e-5)
    apply_mrkd_share(model, 0.3)
    np.testing.assert_allclose(score_images(model, held), share_scores(mrkd_maps, knn_maps, 0.3), rtol=1e-4)
    assert model.config.knn_weight == pytest.approx(model.head.knn_weight)


def test_refit_with_reweight_records_the_choice_and_stays_with_few_labels(parent, tmp_path):
    from mrkd.train.checkpoint import read_checkpoint
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent))       # 3 reviewed goods: too few
    result = refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "v2", export=False,
                              reweight=True, echo=lambda line: None)
    assert result.reweight is not None and not result.reweight.moved and result.reweight.share == 0.5
    old, new = read_checkpoint(parent / "parent.ckpt"), read_checkpoint(tmp_path / "v2" / "model.ckpt")
    assert old["config"] == new["config"]                                        # weights as trained
    assert new["lineage"]["reweight"]["share"] == 0.5 and not new["lineage"]["reweight"]["moved"]
    assert len(new["lineage"]["reweight"]["table"]) == 5


def test_refit_says_when_a_reviewed_image_will_be_flagged_again(parent, tmp_path):
    """A defect cell marked good by mistake, its patches all kept out by a wide defect guard around the
    other defect cell: the new model still flags it, and the refit says so (counted here from the
    written checkpoint's own scores and threshold)."""
    from mrkd.train.calibrate import score_images
    from mrkd.train.checkpoint import load_checkpoint, read_checkpoint
    cells = elpv_cells("mono", 1.0, 8)
    parent_model = load_checkpoint(parent / "parent.ckpt")
    flagged = [c for c, s in zip(cells, score_images(parent_model, cells))
               if s >= read_checkpoint(parent / "parent.ckpt")["calibration"]["threshold"]]
    assert flagged, "the fixture's parent flags none of the first 8 defect cells"
    defects = [Path(shutil.copy(flagged[0], tmp_path / Path(flagged[0]).name)),
               Path(shutil.copy(next(c for c in cells if c != flagged[0]), tmp_path / "other.png"))]
    labels = write_labels(tmp_path / "labels.jsonl", [("ev0", defects[0], "good"), ("ev1", defects[1], "defect")])
    lines = []
    refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "v2", export=False,
                     guard_keep=1000.0, force=True, echo=lines.append)
    refit = load_checkpoint(tmp_path / "v2" / "model.ckpt")
    threshold = read_checkpoint(tmp_path / "v2" / "model.ckpt")["calibration"]["threshold"]
    assert float(score_images(refit, [str(defects[0])])[0]) >= threshold
    assert [line for line in lines if "still score at or above" in line] == \
        ["note: 1 of 1 reviewed good image(s) still score at or above the new threshold; the refit model will "
         "flag them again:"]
    named = [line for line in lines if line.startswith("  ") and " >= threshold " in line]
    assert len(named) == 1 and named[0].startswith(f"  {defects[0]}: score ")
    assert float(named[0].split("score ")[1].split()[0]) == \
        pytest.approx(float(score_images(refit, [str(defects[0])])[0]), rel=1e-5)
    # and a refit that takes the cell in (no guard) does not say it
    lines.clear()
    refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "v3", export=False,
                     guard_keep=0.0, force=True, echo=lines.append)
    refit = load_checkpoint(tmp_path / "v3" / "model.ckpt")
    threshold = read_checkpoint(tmp_path / "v3" / "model.ckpt")["calibration"]["threshold"]
    assert float(score_images(refit, [str(defects[0])])[0]) < threshold
    assert not [line for line in lines if "still score at or above" in line]
    assert not [line for line in lines if line.startswith("  ") and " >= threshold " in line]


def test_image_listing_names_each_image_up_to_the_limit_then_counts():
    from mrkd.train.refit import image_listing
    paths = [f"/cells/c{i}.png" for i in range(6)]
    scores = [1.0, 2.5, 3.0, 0.5, 4.0, 2.0]
    lines = image_listing(paths, scores, {"/cells/c1.png", "/cells/c2.png", "/cells/c4.png"}, ">=", 2.25, limit=2)
    assert lines == ["  /cells/c1.png: score 2.5 >= threshold 2.25", "  /cells/c2.png: score 3 >= threshold 2.25",
                     "  ... and 1 more"]
    assert image_listing(paths, scores, set(), "<", 1.0) == []


# ---------------------------------------------------------------- labels, paths, evidence, files (audit 2026-12-04)

def run_folder(parent, root: Path, count: int = 2, prefix: str = "ev"):
    """What `mrkd run` started in ``root`` leaves: evidence/<id>.png (reviewed cells) named relative to
    ``root`` by events.jsonl, with the sha256 each was written with; event ids ``<prefix><i>``."""
    (root / "evidence").mkdir(parents=True)
    events = []
    for i, (_, image, _) in enumerate(good_marks(parent, count)):
        shutil.copy(image, root / "evidence" / f"{prefix}{i}.png")
        events.append({"event_id": f"{prefix}{i}", "time": "2026-12-04T22:00:00.000+00:00", "camera": "cam0",
                       "evidence": f"evidence/{prefix}{i}.png",
                       "evidence_sha256": file_sha256(root / "evidence" / f"{prefix}{i}.png")})
    (root / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return events


def test_refit_from_another_folder_finds_the_images_of_a_label_file_in_a_subfolder(parent, tmp_path, monkeypatch):
    """One label made now (absolute path), one as an older mrkd wrote it (the evidence path relative to
    the run's folder, which holds the events log); the label file in a subfolder; refit run elsewhere."""
    run = tmp_path / "run"
    events = run_folder(parent, run)
    labels = run / "review" / "labels.jsonl"
    write_labels(labels, [("ev0", run / "evidence" / "ev0.png", "good")])
    old = make_label("ev1", run / "evidence" / "ev1.png", "good", who="tester")
    with open(labels, "a") as handle:
        handle.write(json.dumps({**old.__dict__, "image": events[1]["evidence"]}) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    lines = []
    result = refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "v2", export=False,
                              events=run / "events.jsonl", echo=lines.append)
    assert result.lineage["good_images"] == [str(run / "evidence" / "ev0.png"), str(run / "evidence" / "ev1.png")]
    assert not any("skipped" in line for line in lines), lines
    # without the events log the older relative path is looked for beside the label file only: skipped
    lines = []
    result = refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "v2b", export=False,
                              echo=lines.append)
    assert result.lineage["good_images"] == [str(run / "evidence" / "ev0.png")]
    assert any("ev1" in line and "no longer exists" in line for line in lines)


def test_refit_with_events_skips_an_image_that_is_not_the_evidence_its_event_recorded(parent, tmp_path):
    """A label of an image changed after the run (an older mrkd labelled it with its new hash)."""
    run = tmp_path / "run"
    events = run_folder(parent, run, 3)
    image = run / "evidence" / "ev1.png"
    image.write_bytes(image.read_bytes() + b"\0")                 # touched after the run, before review
    labels = tmp_path / "labels.jsonl"
    # labelled with the images' hashes now, unchecked against the events (what an older mrkd did)
    write_labels(labels, [(e["event_id"], run / e["evidence"], "good") for e in events])
    lines = []
    result = refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "v2", export=False,
                              events=run / "events.jsonl", echo=lines.append)
    assert result.lineage["good_images"] == [str(run / "evidence" / "ev0.png"), str(run / "evidence" / "ev2.png")]
    skipped = [line for line in lines if "skipped" in line]
    assert len(skipped) == 1 and "event ev1" in skipped[0] and "sha256 differs from the event's" in skipped[0]


def test_refit_folder_gets_a_new_folders_mode_under_the_umask(parent, tmp_path):
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 1))
    old_mask = os.umask(0o027)
    try:
        refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "v2", export=False,
                         echo=lambda line: None)
    finally:
        os.umask(old_mask)
    assert (tmp_path / "v2").stat().st_mode & 0o777 == 0o750          # as mkdir would make it, not 0700


def test_sigterm_during_a_refit_leaves_no_staging_folder(parent, tmp_path, monkeypatch):
    import signal
    import mrkd.export.pipeline
    from mrkd.stopping import Terminated, sigterm_interrupts
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 1))
    seen = []

    def terminated_export(checkpoint, out_dir, **_):
        seen.append(sorted(p.name for p in Path(out_dir).iterdir()))
        # the service manager stops `mrkd refit` mid-export: the handler is called as the signal would call
        # it (the suite's process died of a segfault, rc 139, at this test once when it sent a real SIGTERM to
        # itself with other tests' native threads alive; the subprocess test below sends a real one)
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        raise AssertionError("SIGTERM did not stop the refit")
    monkeypatch.setattr(mrkd.export.pipeline, "export_checkpoint", terminated_export)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with sigterm_interrupts():
            refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "out" / "v2",
                             echo=lambda line: None)
    assert seen == [["model.ckpt"]]                    # it was stopped with a half-written version
    assert list((tmp_path / "out").iterdir()) == []   # no staging folder, no version
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_sigterm_just_as_the_staging_folder_is_made_leaves_no_folder(parent, tmp_path, monkeypatch):
    """CI once found a `.v2.XXXX` folder after a Ctrl-C: the stop landed after mkdtemp's mkdir, before its
    name reached the code that removes it. Here SIGTERM's handler is called at that very point."""
    import signal
    import tempfile
    from mrkd.stopping import Terminated, sigterm_interrupts
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 1))
    real_mkdtemp, made = tempfile.mkdtemp, []

    def mkdtemp_then_stopped(*args, **kwargs):
        folder = real_mkdtemp(*args, **kwargs)
        if os.path.basename(folder).startswith(".v2."):
            made.append(folder)
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)    # as the signal would call it
        return folder
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp_then_stopped)
    with pytest.raises(Terminated):
        with sigterm_interrupts():
            refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "out" / "v2",
                             export=False, echo=lambda line: None)
    assert len(made) == 1                              # the folder was made, then the stop came
    assert list((tmp_path / "out").iterdir()) == []   # and it is gone


def test_refit_names_an_unreadable_good_image_without_a_train_option(parent, tmp_path):
    good = tmp_path / "good"
    shutil.copytree(parent / "good", good)
    (good / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 1))
    with pytest.raises(RefitError) as caught:
        refit_checkpoint(parent / "parent.ckpt", labels, str(good), tmp_path / "v2", export=False,
                         echo=lambda line: None)
    message = str(caught.value)
    assert "zz_broken.png" in message and "--good" in message and "mrkd train" not in message, message
    assert not (tmp_path / "v2").exists()


@pytest.mark.slow   # two ONNX exports + parity checks
def test_exporting_a_refit_checkpoint_again_keeps_its_lineage_in_every_sidecar(parent, tmp_path):
    from mrkd.export.pipeline import export_checkpoint
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 1))
    refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "v2", export=False,
                     echo=lambda line: None)
    result = export_checkpoint(tmp_path / "v2" / "model.ckpt", tmp_path / "out", fp16=True, engine=False,
                               echo=lambda line: None)
    expected = {"model_version": 2, "parent_sha256": file_sha256(parent / "parent.ckpt"),
                "labels_sha256": file_sha256(labels)}
    for key in ("onnx", "onnx_fp16"):
        extra = json.loads(Path(str(result.files[key]) + ".json").read_text())["extra"]
        assert {k: extra.get(k) for k in expected} == expected, key
    plain = export_checkpoint(parent / "parent.ckpt", tmp_path / "parent_out", engine=False, echo=lambda line: None)
    assert "model_version" not in json.loads(Path(str(plain.files["onnx"]) + ".json").read_text())["extra"]


@pytest.mark.slow   # a subprocess that imports torch and exports
@pytest.mark.parametrize("sig, status, by", [("SIGTERM", 143, "SIGTERM"), ("SIGINT", 130, "Ctrl-C")])
def test_mrkd_refit_stopped_by_a_signal_removes_its_staging_folder(parent, tmp_path, sig, status, by):
    """SIGTERM (a service manager) or Ctrl-C mid-write: no staging folder, one line, 128 + the signal
    as `mrkd train` (Ctrl-C said "Aborted!" with exit 1, SIGTERM an Error: line with exit 1)."""
    import signal
    import time
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 1))
    out = tmp_path / "out"
    out.mkdir()
    args = ["refit", parent / "parent.ckpt", "--reviewed", labels, "--good", parent / "good", "--out", out / "v2"]
    code = f"import sys\nfrom mrkd.cli import main\nsys.argv[0] = 'mrkd'\nmain({list(map(str, args))!r})"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while not any(p.name.startswith(".v2.") for p in out.iterdir()):      # the version is being written
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.01)
        process.send_signal(getattr(signal, sig))
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == status and "Traceback" not in stderr and "Aborted" not in stderr, stderr
    assert stderr.splitlines()[-1] == f"refit stopped ({by}); nothing written", stderr
    assert "Error:" not in stderr, stderr
    assert list(out.iterdir()) == []


def test_augmented_candidates_add_the_flipped_images_patches_a_plain_refit_leaves_out(parent, tmp_path):
    """augment=("hflip",): the mirror image of each reviewed cell is a candidate too. The mirror is
    written by PIL here (not the refit's tensor flip) and its patches compared by brute force."""
    from PIL import Image, ImageOps

    from mrkd.train.checkpoint import load_checkpoint
    from mrkd.train.refit import augment_names, image_patches, refit_model
    reviewed = [str(m[1]) for m in good_marks(parent, 2)]
    mirrored = []
    for path in reviewed:
        mirrored.append(str(tmp_path / f"mirror_{Path(path).name}"))
        ImageOps.mirror(Image.open(path)).save(mirrored[-1])
    held = sorted(str(p) for p in (parent / "good").iterdir())
    plain, augmented = load_checkpoint(parent / "parent.ckpt"), load_checkpoint(parent / "parent.ckpt")
    before = plain.head.memory_bank.bank.detach().double()
    plain_result = refit_model(plain, reviewed, held, radius_quantile=0.5)
    result = refit_model(augmented, reviewed, held, radius_quantile=0.5, augment=("hflip",))
    radius = result.radius
    assert radius == pytest.approx(plain_result.radius)
    own, flipped = image_patches(plain, reviewed).double(), image_patches(plain, mirrored).double()
    plain_bank, bank = plain.head.memory_bank.bank.detach().double(), augmented.head.memory_bank.bank.detach().double()
    # the plain refit leaves mirrored patches beyond the growth's stop; the augmented one brings all within it
    assert float(exact_nearest(flipped, plain_bank).max()) > radius * 1.01
    assert float(exact_nearest(flipped, bank).max()) <= radius * 1.01
    assert float(exact_nearest(own, bank).max()) <= radius * (1 + 1e-4)
    # the old bank is kept; every added row is a patch of a reviewed image or of its mirror, some of the mirror
    added = bank[len(before):]
    assert torch.equal(bank[:len(before)], before) and len(added) == result.added_patches > plain_result.added_patches
    scale = float(own.norm(dim=1).mean())
    to_own, to_flipped = exact_nearest(added, own), exact_nearest(added, flipped)
    assert float(torch.minimum(to_own, to_flipped).max()) < 0.02 * scale
    assert int((to_own > 0.05 * scale).sum()) > 0
    with pytest.raises(RefitError, match="'shear'"):
        augment_names(("hflip", "shear"))
    assert augment_names("flips") == ("hflip", "vflip", "rot180") and augment_names(None) == ()


def recorded_labels(run: Path, events, labels: Path) -> Path:
    """Labels as `mrkd review` and the page write them (label_events, recording the events log), and two
    that the log contradicts: ``<first>-ghost`` (an event the log never had) and the third event's label
    made of another image (not the evidence the run recorded)."""
    from mrkd.runtime.review import events_log_ref, label_events
    log = run / "events.jsonl"
    made = label_events(events[:2], "good", who="tester", events_path=log)
    made.append(make_label(events[2]["event_id"], run / events[1]["evidence"], "good", who="tester",
                           events_log=events_log_ref(log)))
    made.append(make_label(events[0]["event_id"] + "-ghost", run / events[0]["evidence"], "good", who="tester",
                           events_log=events_log_ref(log)))
    with LabelFile(labels) as handle:
        handle.extend(made)
    return labels


def checked(labels, **given):
    """(good images, {event id: skip reason}, note lines) of reviewed_images, as refit reads the labels."""
    from mrkd.train.refit import reviewed_images
    lines = []
    reviewed = reviewed_images(labels, warn=lines.append, **given)
    return (reviewed.good, {s.event_id: s.reason for s in reviewed.skipped},
            [line for line in lines if line.startswith("note:")])


def test_refit_without_events_checks_labels_against_the_log_they_recorded_moved_replaced_or_gone(parent, tmp_path):
    """A label file did not say which events log its events came from: without --events refit checked no
    event id (nor the evidence hash the event recorded). Each label records its log now (path, first event
    id): checked against it where it is, or where the folder moved; a log that is gone, or another run's
    log in its place, is said in one line, and those labels go unchecked, as before."""
    run = tmp_path / "line" / "run"
    events = run_folder(parent, run, 3, prefix="a")
    labels = recorded_labels(run, events, run / "labels.jsonl")
    ghost, wrong = events[0]["event_id"] + "-ghost", events[2]["event_id"]
    original = (run / "events.jsonl").read_bytes()

    good, skipped, notes = checked(labels)                                    # the log where it was
    assert good == (str(run / events[0]["evidence"]), str(run / events[1]["evidence"])) and notes == []
    assert set(skipped) == {ghost, wrong}
    assert f"is not in the events log it was labelled from ({run / 'events.jsonl'})" in skipped[ghost]
    assert "not the evidence the run recorded" in skipped[wrong]

    other = tmp_path / "other"                                                # a new run's log at its path
    run_folder(parent, other, 2, prefix="b")
    (run / "events.jsonl").write_bytes((other / "events.jsonl").read_bytes())
    good, skipped, notes = checked(labels)
    assert skipped == {} and len(good) == 2 and len(notes) == 1, notes
    assert "was replaced by another log" in notes[0] and "'b0'" in notes[0] and str(labels) in notes[0]
    assert "4 label(s)" in notes[0] and "not checked" in notes[0] and "\n" not in notes[0]

    (run / "events.jsonl").write_bytes(original)                             # the folder moved, log and all
    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "line"), str(moved))
    labels = moved / "run" / "labels.jsonl"
    good, skipped, notes = checked(labels)
    assert good == (str(moved / "run" / events[0]["evidence"]), str(moved / "run" / events[1]["evidence"]))
    assert set(skipped) == {ghost, wrong} and notes == []
    assert str(moved / "run" / "events.jsonl") in skipped[ghost]
    lines = []                                                                # and so through refit itself
    result = refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "v2", export=False,
                              echo=lines.append)
    assert len(result.lineage["good_images"]) == 2
    assert not [line for line in lines if "not checked" in line], lines
    assert [line for line in lines if "skipped" in line and ghost in line and "not in the events log" in line]

    (moved / "run" / "events.jsonl").unlink()                                # the log deleted
    good, skipped, notes = checked(labels)
    assert skipped == {} and len(good) == 2 and len(notes) == 1, notes
    assert "is gone" in notes[0] and str(run / "events.jsonl") in notes[0] and "--events" in notes[0]

    good, skipped, notes = checked(labels, events={e["event_id"]: e for e in events})   # --events still wins
    assert set(skipped) == {ghost, wrong} and notes == [] and skipped[ghost] == "is not in the events log"


def test_refit_reads_version_1_labels_and_files_mixing_them_with_version_2_lines(parent, tmp_path):
    """A label file of an older mrkd (schema_version 1: no events log recorded) is read as before: its event
    ids unchecked unless --events, said in one line; in a file mixing both, the version-2 lines are checked
    against their log and the note counts the version-1 ones."""
    run = tmp_path / "run"
    events = run_folder(parent, run, 3, prefix="a")
    made = recorded_labels(run, events, tmp_path / "made.jsonl")
    old_lines = []
    for line in made.read_text().splitlines():
        record = json.loads(line)
        del record["events_log"], record["events_log_first_event"]
        old_lines.append(json.dumps({**record, "schema_version": 1}) + "\n")
    v1 = tmp_path / "v1.jsonl"
    v1.write_text("".join(old_lines))
    ghost, wrong = events[0]["event_id"] + "-ghost", events[2]["event_id"]
    good, skipped, notes = checked(v1)
    assert skipped == {} and len(good) == 2 and len(notes) == 1 and "4 label(s)" in notes[0], notes
    assert "--events" in notes[0] and "not checked" in notes[0]
    good, skipped, notes = checked(v1, events={e["event_id"]: e for e in events}, events_path=run / "events.jsonl")
    assert set(skipped) == {ghost, wrong} and notes == []

    mixed = tmp_path / "mixed.jsonl"                  # events 0 and ghost as v1 lines, 1 and 2 as v2 lines
    new_lines = made.read_text().splitlines(keepends=True)
    mixed.write_text(old_lines[0] + new_lines[1] + new_lines[2] + old_lines[3])
    good, skipped, notes = checked(mixed)
    assert set(skipped) == {wrong} and len(notes) == 1 and "2 label(s)" in notes[0], (skipped, notes)
    assert good == (str(run / events[0]["evidence"]), str(run / events[1]["evidence"]))


def store_run(parent, run: Path, count: int):
    """What `mrkd run --evidence evidence` leaves now: evidence/cam0/<id>.png named by absolute path in
    events.jsonl with the sha256 each was written with, and labels of them all as good (label_events,
    recording the log), kept in another folder (review/labels.jsonl beside the run's folder)."""
    from mrkd.runtime.review import label_events
    (run / "evidence" / "cam0").mkdir(parents=True)
    events = []
    for i, (_, image, _) in enumerate(good_marks(parent, count)):
        stored = run / "evidence" / "cam0" / f"s{i}.png"
        shutil.copy(image, stored)
        events.append({"event_id": f"s{i}", "time": "2026-12-07T06:00:00.000+00:00", "camera": "cam0",
                       "evidence": str(stored), "evidence_sha256": file_sha256(stored)})
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    labels = run.parent / "review" / "labels.jsonl"
    labels.parent.mkdir()
    with LabelFile(labels) as handle:
        handle.extend(label_events(events, "good", who="tester", events_path=run / "events.jsonl"))
    return events, labels


def test_refit_finds_labelled_images_in_an_evidence_folder_moved_on_its_own(parent, tmp_path):
    """The evidence folder moved away from the line's (to an archive disk, renamed): the labels' absolute
    paths are gone and their last parts are not beside the labels, the log or the current folder, so refit
    skipped every reviewed image ('no longer exists') and wrote nothing, where `mrkd review` and the page
    find them by --evidence. `mrkd refit --evidence DIR` looks for <DIR>/<camera>/<file>, then <DIR>/<file>,
    and takes the file with the label's sha256 (a re-encoded copy at the first place is passed over)."""
    from click.testing import CliRunner
    from mrkd.refit_cli import refit_command
    run = tmp_path / "line"
    events, labels = store_run(parent, run, 2)
    archive = tmp_path / "archive" / "evidence-december"
    archive.parent.mkdir()
    shutil.move(str(run / "evidence"), str(archive))
    reencoded = archive / "cam0" / "s1.png"               # another copy's bytes where the store would keep it
    shutil.move(str(reencoded), str(archive / "s1.png"))
    reencoded.write_bytes((archive / "s1.png").read_bytes() + b"\0")

    good, skipped, _ = checked(labels)
    assert good == () and all("no longer exists" in why for why in skipped.values()) and len(skipped) == 2
    good, skipped, _ = checked(labels, evidence_dir=archive)
    assert good == (str(archive / "cam0" / "s0.png"), str(archive / "s1.png")) and skipped == {}
    assert [file_sha256(p) for p in good] == [e["evidence_sha256"] for e in events]

    args = [str(parent / "parent.ckpt"), "--reviewed", str(labels), "--good", str(parent / "good"), "--no-export"]
    refused = CliRunner().invoke(refit_command, args + ["--out", str(tmp_path / "v2")])
    assert refused.exit_code == 1 and "no longer exists" in refused.output and not (tmp_path / "v2").exists()
    done = CliRunner().invoke(refit_command, args + ["--out", str(tmp_path / "v2"), "--evidence", str(archive)])
    assert done.exit_code == 0, done.output
    lineage = torch.load(tmp_path / "v2" / "model.ckpt", weights_only=True)["lineage"]
    assert lineage["good_images"] == [str(archive / "cam0" / "s0.png"), str(archive / "s1.png")]
    assert sorted(image["file_sha256"] for image in lineage["bank_images"]) == \
        sorted(e["evidence_sha256"] for e in events)
    assert "--evidence" in CliRunner().invoke(refit_command, ["--help"]).output


def test_an_events_evidence_is_the_file_with_its_recorded_sha256_where_several_exist(parent, tmp_path):
    """find_evidence took the first file that existed: the event's own path rewritten since the run (a
    viewer saved over it) hid the pristine copy in --evidence, so `mrkd review` listed the event CHANGED
    and refused to label it. Of several files, the one with the event's sha256 is taken; with none, the
    first, whose change is then said."""
    from mrkd.runtime.review import FileHashes, find_evidence
    run = tmp_path / "line"
    events, _ = store_run(parent, run, 1)
    copy = tmp_path / "copy"
    shutil.copytree(run / "evidence", copy)
    named = Path(events[0]["evidence"])
    named.write_bytes(named.read_bytes() + b"\0")
    hashes = FileHashes()
    assert find_evidence(events[0], copy, run / "events.jsonl", hashes) == copy / "cam0" / "s0.png"
    assert find_evidence(events[0], None, run / "events.jsonl") == named         # the only one: said CHANGED
    (copy / "cam0" / "s0.png").write_bytes(b"not it")
    assert find_evidence(events[0], copy, run / "events.jsonl", hashes) == named  # none matches: the first


@pytest.mark.parametrize("settings", [dict(reweight=True), dict(radius=1.0, guard_keep=0.0)])
def test_refit_shows_a_progress_bar_that_reaches_every_image_its_passes_read(parent, monkeypatch, settings):
    """A refit ran its passes (seconds; minutes with --augment or many held-out images) with no output.
    Its bar counts each image a pass reads and ends at its total: with a defect guard and re-weighting,
    and with a given radius and no guard (passes left out)."""
    import io
    from tqdm import tqdm
    import mrkd.train.refit as refit
    from mrkd.train.checkpoint import load_checkpoint
    bars = []

    def captured(total):
        bars.append(tqdm(total=total, desc="refit", file=io.StringIO()))
        return bars[-1]
    monkeypatch.setattr(refit, "refit_bar", captured)
    held = sorted(str(p) for p in (parent / "good").iterdir())
    reviewed = [str(m[1]) for m in good_marks(parent, 3)]
    defects = sorted(str(p) for p in (parent / "evidence").iterdir() if str(p) not in reviewed)[:2]
    reads = []
    images = refit.DecodedImages.of(load_checkpoint(parent / "parent.ckpt"))
    real = images.square
    images.square = lambda path: reads.append(path) or real(path)        # every read, counted beside the bar
    refit.refit_model(load_checkpoint(parent / "parent.ckpt"), reviewed, held, defects, images=images, **settings)
    assert len(bars) == 1 and bars[0].total == bars[0].n == len(reads), (bars[0].total, bars[0].n, len(reads))
    assert len(reads) > len(reviewed) + len(held) + len(defects)
    assert images.on_square is None



def test_refit_says_its_confirmed_defects_are_still_flagged_and_both_thresholds_alike(parent, tmp_path):
    """A refit that passed its confirmed-defect check said nothing of it (only a miss was named), so the
    operator could not tell the check ran; and it printed the old threshold with every digit of a float
    (52.487849426269534 -> 49.4368). It now counts the confirmed defects still flagged, with the lowest
    one's score against the new threshold (checked here against the written checkpoint's own scores)."""
    from mrkd.train.calibrate import score_images
    from mrkd.train.checkpoint import load_checkpoint, read_checkpoint
    before = read_checkpoint(parent / "parent.ckpt")["calibration"]["threshold"]
    cells = elpv_cells("mono", 1.0, 8)
    flagged = [c for c, s in zip(cells, score_images(load_checkpoint(parent / "parent.ckpt"), cells)) if s >= before]
    assert len(flagged) >= 2, "the fixture's parent flags fewer than 2 of the first 8 defect cells"
    defects = [Path(shutil.copy(c, tmp_path / Path(c).name)) for c in flagged[:2]]
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 2) +
                          [(f"d{i}", image, "defect") for i, image in enumerate(defects)])
    lines = []
    refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "v2", export=False,
                     echo=lines.append)
    after = read_checkpoint(tmp_path / "v2" / "model.ckpt")["calibration"]["threshold"]
    lowest = float(min(score_images(load_checkpoint(tmp_path / "v2" / "model.ckpt"), [str(d) for d in defects])))
    assert lowest >= after
    assert f"threshold {before:.6g} -> {after:.6g} on " in "\n".join(lines), lines
    said = [line for line in lines if line.startswith("confirmed defects: ")]
    assert said == [f"confirmed defects: 2 of 2 still flagged (lowest score {lowest:.6g} >= threshold {after:.6g})"]


def test_a_refit_whose_evidence_folder_moved_says_to_give_evidence_and_counts_what_it_has(parent, tmp_path):
    """The evidence folder archived elsewhere: every label's image is gone from its path. The refit
    refused with '... cannot be checked (listed above); nothing written (--force refits without them)',
    pointing at --force (a refit blind to its confirmed defects) and not at --evidence DIR, which finds
    them; and a label file without a usable good image said '(of 0 skipped)'."""
    images = [Path(shutil.copy(image, tmp_path / image.name)) for _, image, _ in good_marks(parent, 2)]
    defect = Path(shutil.copy(elpv_cells("mono", 1.0, 1)[0], tmp_path / "defect.png"))
    labels = write_labels(tmp_path / "labels.jsonl", [("g0", images[0], "good"), ("g1", images[1], "good"),
                                                      ("d0", defect, "defect")])
    archive = tmp_path / "archive"
    archive.mkdir()
    for image in images + [defect]:
        image.rename(archive / image.name)
    with pytest.raises(RefitError, match=r"cannot be checked .*give --evidence DIR") as refused:
        refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "v2", export=False,
                         echo=lambda line: None)
    assert "\n" not in str(refused.value)
    only_defect = write_labels(tmp_path / "defects.jsonl", [("d0", archive / "defect.png", "defect")])
    with pytest.raises(RefitError, match=r"no usable image marked good \(0 marked good, 1 confirmed defect\)"):
        refit_checkpoint(parent / "parent.ckpt", only_defect, str(parent / "good"), tmp_path / "v3", export=False,
                         echo=lambda line: None)


def test_refit_given_one_events_log_of_a_label_file_that_records_two_says_to_leave_events_out(parent, tmp_path):
    """A label file outlives an events log (a new log per day): its labels record their logs. Given
    --events with one of them, the other log's labels are skipped as 'not in the events log', its
    confirmed defects among them, and the refit refused with '--force refits without them' only; leaving
    --events out checks each label against the log it records, which the refusal now says."""
    from mrkd.runtime.review import EventsLogRef
    from mrkd.runtime.metadata import file_sha256
    images = [image for _, image, _ in good_marks(parent, 2)]
    defect = Path(shutil.copy(elpv_cells("mono", 1.0, 1)[0], tmp_path / "defect.png"))
    day1, day2 = tmp_path / "day1.jsonl", tmp_path / "day2.jsonl"
    for log, rows in ((day1, [("a0", images[0]), ("a1", images[1])]), (day2, [("b0", defect)])):
        log.write_text("".join(json.dumps({"event_id": e, "camera": "cam0", "evidence": str(image),
                                           "evidence_sha256": file_sha256(image)}) + "\n" for e, image in rows))
    refs = {"a": EventsLogRef(str(day1), "a0"), "b": EventsLogRef(str(day2), "b0")}
    labels = tmp_path / "labels.jsonl"
    with LabelFile(labels) as file:
        for event_id, image, label in (("a0", images[0], "good"), ("a1", images[1], "good"), ("b0", defect, "defect")):
            file.append(make_label(event_id, image, label, who="tester", camera="cam0", events_log=refs[event_id[0]]))
    with pytest.raises(RefitError, match=r"cannot be checked .*1 of them record(s)? another events log "
                                         rf"\({re.escape(str(day2))}\): leave out --events") as refused:
        refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "v2", export=False,
                         events=day1, echo=lambda line: None)
    assert "\n" not in str(refused.value)
    result = refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "v3", export=False,
                              force=True, echo=lambda line: None)   # without --events: each label's own log
    assert result.lineage["defect_images"] == [str(defect)]           # checked (force: whether still flagged)


def test_held_out_good_images_with_the_same_pixels_count_once_in_the_threshold(parent, tmp_path):
    """OK samples of a line that saw the same frames twice (a looped clip, a restart: <evidence>/cam/ok/ then
    holds NNN.png and NNN_<pid>_<k>.png of one frame) were each a held-out image: 'threshold ... on 8
    held-out good image(s)' for 4 images, the repeats weighting the quantile. They now count once, said in
    one line, and the threshold is the one set on the distinct images."""
    import cv2
    good = tmp_path / "good"
    shutil.copytree(parent / "good", good)
    originals = sorted(good.iterdir())
    for image in originals[:4]:                                   # the same pixels, other bytes (re-saved)
        pixels = cv2.imread(str(image), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(good / f"{image.stem}_again.png"), pixels, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    labels = write_labels(tmp_path / "labels.jsonl", good_marks(parent, 2))
    lines = []
    twice = refit_checkpoint(parent / "parent.ckpt", labels, str(good), tmp_path / "v2", export=False,
                             echo=lines.append)
    once = refit_checkpoint(parent / "parent.ckpt", labels, str(parent / "good"), tmp_path / "v3", export=False,
                            echo=lambda line: None)
    assert f"on {len(originals)} held-out good image(s)" in "\n".join(lines), lines
    assert [l for l in lines if "same pixels as another --good image" in l] == \
        ["warning: 4 of the --good images have the same pixels as another --good image; each is counted once "
         "in the threshold"]
    assert twice.threshold_after == once.threshold_after
