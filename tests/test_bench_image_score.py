"""bench_image_score's variants of the --score both image score, each against an independent reference."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def _model_and_images(tmp_path):
    import cv2

    from mrkd.train.memory_bank import MemoryBank, patch_features
    from mrkd.train.model import build_model
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model("resnet18", "random", image_size=64).eval()
    rng = np.random.default_rng(1)
    paths = []
    for i in range(5):
        path = tmp_path / f"cell{i}.png"
        cv2.imwrite(str(path), (rng.random((64, 64, 3)) * 255).astype(np.uint8))
        paths.append(str(path))
    with torch.no_grad():       # a bank of another image's patches, pooled 3 x 3 as the 256 px default
        feats = model.teacher_features(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)))
        bank = patch_features(feats, 3).flatten(2).transpose(1, 2)[0]
    model.head.set_memory_bank(MemoryBank(bank, pool=3), 0.7)
    return model, paths


def test_variants_match_the_model_scipy_numpy_and_a_brute_force_patchcore(tmp_path):
    from scipy.ndimage import gaussian_filter
    from scipy.spatial.distance import cdist
    from scipy.special import softmax

    from mrkd.benchmarks.bench_image_score import image_score_variants
    from mrkd.train.calibrate import score_images
    from mrkd.train.memory_bank import patch_features
    from mrkd.train.refit import _batches
    model, paths = _model_and_images(tmp_path)
    variants = image_score_variants(model, paths, batch_size=2)
    # sigma 4 is what the model itself scores
    np.testing.assert_allclose(variants["sigma 4"], score_images(model, paths), rtol=1e-5)
    with torch.no_grad():
        x = next(iter(_batches(model, paths, 8)))
        teacher, student = model(x)
        summed = model.head(teacher, student, smooth=False)[:, 0].double().numpy()
        rows = patch_features(teacher, 3).flatten(2).transpose(1, 2).double().numpy()
    bank = model.head.memory_bank.bank.double().numpy()
    # the other sigmas: scipy's gaussian_filter (reflect border, truncate 4) of the unsmoothed summed map
    for sigma in (2.0, 6.0):
        expected = [gaussian_filter(m, sigma, mode="reflect", truncate=4.0).max() for m in summed]
        np.testing.assert_allclose(variants[f"sigma {sigma:g}"], expected, rtol=1e-4)
    np.testing.assert_allclose(variants["sigma 0"], summed.reshape(len(paths), -1).max(1), rtol=1e-5)
    # top-k mean of the shipped smoothed map, by a full sort
    smoothed = np.stack([gaussian_filter(m, 4.0, mode="reflect", truncate=4.0) for m in summed])
    expected = np.sort(smoothed.reshape(len(paths), -1), 1)[:, ::-1][:, :100].mean(1)
    np.testing.assert_allclose(variants["top 100 mean"], expected, rtol=1e-4)
    # PatchCore's re-weighted score, brute force over every bank row
    expected = []
    for r in rows:
        d = cdist(r, bank)
        worst = d.min(1).argmax()
        nearest_row = d[worst].argmin()
        around = np.argsort(cdist(bank[nearest_row:nearest_row + 1], bank)[0], kind="stable")[:9]
        weight = 1 - softmax(d[worst, around])[0]
        expected.append(weight * d[worst].min() * 0.7)
    np.testing.assert_allclose(variants["knn patchcore"], expected, rtol=1e-4)
    assert not np.allclose(variants["knn patchcore"], rows.shape[0] * [0.0])
