"""bench_position_refit: the per-position nearest search (appended and left-out patches, a query's own
image excluded) and its guard against brute force written here; its split of the "both" map into the MRKD
part and a kNN part against the shipped model's own image scores (real ELPV cells, a small ResNet-18
random-teacher model at 64 px whose bank the trainer's fit_memory_bank fits)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def brute_nearest(bank, valid, queries, radius, exclude):
    """Every (query, position) against every bank patch in reach, one at a time, in float64."""
    k, c, h, w = bank.shape
    out = np.full((len(queries), h, w), np.inf)
    for m in range(len(queries)):
        for i in range(h):
            for j in range(w):
                for n in range(k):
                    if n == exclude[m]:
                        continue
                    for a in range(h):
                        for b in range(w):
                            if abs(a - i) <= radius and abs(b - j) <= radius and valid[n, a, b]:
                                d = np.linalg.norm(queries[m, :, i, j].astype(np.float64) - bank[n, :, a, b])
                                out[m, i, j] = min(out[m, i, j], d)
    return out


def test_position_nearest_with_appended_and_left_out_patches_matches_brute_force():
    from mrkd.benchmarks.bench_position_refit import position_nearest
    rng = np.random.default_rng(0)
    train = rng.normal(size=(4, 3, 5, 6)).astype(np.float32)
    appended = rng.normal(size=(2, 3, 5, 6)).astype(np.float32) * 0.5
    queries = np.concatenate([train[:2], rng.normal(size=(3, 3, 5, 6)).astype(np.float32)])
    bank = np.concatenate([train, appended])
    valid = rng.random((6, 5, 6)) > 0.3
    valid[:4] = True                                   # training patches all in, some appended left out
    exclude = np.array([0, 1, -1, -1, 5])              # the first two queries are training images
    for radius in (0, 1, 2):
        got = position_nearest(torch.from_numpy(bank), torch.from_numpy(queries), radius,
                               torch.from_numpy(valid), torch.from_numpy(exclude), chunk=2).numpy()
        np.testing.assert_allclose(got, brute_nearest(bank, valid, queries, radius, exclude), rtol=1e-5, atol=1e-5)
    # radius 0 and no exclusion: a bank image's own patches are at distance 0 (its positions are its own)
    same = position_nearest(torch.from_numpy(bank), torch.from_numpy(bank[4:]), 0).numpy()
    assert np.allclose(same, 0, atol=1e-3)


def test_position_guard_matches_brute_force():
    from mrkd.benchmarks.bench_position_refit import position_guard
    rng = np.random.default_rng(2)
    train = rng.normal(size=(5, 3, 4, 4)).astype(np.float32)
    defects = rng.normal(size=(2, 3, 4, 4)).astype(np.float32) * 2.0
    candidates = np.concatenate([defects + rng.normal(size=defects.shape).astype(np.float32) * 0.3,
                                 rng.normal(size=(2, 3, 4, 4)).astype(np.float32)])
    top, keep = 3, 0.9
    for radius in (0, 1):
        got = position_guard(torch.from_numpy(train), torch.from_numpy(defects), torch.from_numpy(candidates),
                             radius, top, keep).numpy()
        distance = brute_nearest(train, np.ones((5, 4, 4), bool), defects, radius, [-1, -1])
        want = np.ones((4, 4, 4), bool)
        for d in range(2):
            for flat in np.argsort(-distance[d].ravel(), kind="stable")[:top]:
                i, j = divmod(int(flat), 4)
                for r in range(4):
                    for a in range(4):
                        for b in range(4):
                            if abs(a - i) <= radius and abs(b - j) <= radius and np.linalg.norm(
                                    candidates[r, :, a, b].astype(np.float64) - defects[d, :, i, j]) \
                                    <= keep * distance[d, i, j]:
                                want[r, a, b] = False
        np.testing.assert_array_equal(got, want)
        assert 0 < (~got).sum() and got[2:].sum() > 0


def test_the_two_halves_reproduce_the_shipped_model_scores():
    from mrkd.benchmarks.bench_position_refit import Parts, image_scores, whole_bank_distance
    from mrkd.train.calibrate import score_images
    from mrkd.train.elpv import read_labels
    from mrkd.train.memory_bank import fit_memory_bank
    from mrkd.train.model import build_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cells = sorted((c for c in read_labels() if c.module_type == "poly"), key=lambda c: c.name)
        good = [c.path for c in cells if c.probability == 0.0]
        defect = [c.path for c in cells if c.probability == 1.0]
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_model("resnet18", "random", image_size=64).eval()
        fit_memory_bank(model, good[:10], "both", fraction=0.1, seed=0, batch_size=8, progress=False)
        assert model.head.knn_weight > 0 and model.head.scale_weights[0] == 0
        paths = good[10:14] + defect[:4]
        parts = Parts(model, paths)
        bank = model.head.memory_bank.bank
        got = image_scores(model.head, parts.mrkd, whole_bank_distance(parts.feats, bank), model.head.knn_weight)
        want = score_images(model, paths)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        # the training images' own patch maps, as the bank's rows were taken
        fit = Parts(model, good[:10], mrkd=False).feats
        rows = fit.permute(0, 2, 3, 1).reshape(-1, fit.shape[1])
        exact = torch.cdist(bank.double(), rows.double(), compute_mode="donot_use_mm_for_euclid_dist")
        assert exact.amin(1).max() < 1e-3
    finally:
        torch.set_num_threads(threads)


def test_options_have_help_and_a_negative_radius_is_refused(capsys):
    from mrkd.benchmarks.bench_position_refit import main
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for option in ("--seeds", "--categories", "--radii", "--work", "--fresh", "--out"):
        assert option in text
    with pytest.raises(SystemExit) as stop:
        main(["--radii", "0", "-1", "--work", "/nonexistent/never-made"])
    assert stop.value.code == 2
    assert "Error: --radii takes radii of 0 or more" in capsys.readouterr().err
