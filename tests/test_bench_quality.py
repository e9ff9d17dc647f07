"""mrkd bench quality: the kNN baseline's distances against scipy, and the quick run on real ELPV cells."""

import numpy as np
import pytest
import torch

pytest.importorskip("elpv_dataset")

from mrkd.benchmarks.bench_quality import PatchKNN, image_scores, quick_settings, run_quality  # noqa: E402


class _NoTeacher(torch.nn.Module):
    def forward(self, x):
        return [x]


def test_knn_nearest_distance_matches_scipy_in_any_chunking():
    from scipy.spatial.distance import cdist
    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(1000, 7)), rng.normal(size=(50, 7))
    expected = cdist(queries, bank).min(1)
    for chunk in (1, 64, 999, 5000):
        knn = PatchKNN(_NoTeacher(), None, chunk=chunk)
        knn.bank = torch.tensor(bank, dtype=torch.float32)
        got = knn.nearest_distance(torch.tensor(queries, dtype=torch.float32)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_image_score_rules():
    maps = torch.tensor(np.random.default_rng(1).random((3, 1, 20, 10)), dtype=torch.float32)
    flat = maps.numpy().reshape(3, -1)
    np.testing.assert_allclose(image_scores(maps, "max").numpy(), flat.max(1))
    np.testing.assert_allclose(image_scores(maps, "topk").numpy(), np.sort(flat, 1)[:, -2:].mean(1), rtol=1e-6)
    with pytest.raises(ValueError, match="image score rule"):
        image_scores(maps, "median")


@pytest.mark.slow
def test_quick_quality_imagenet_teacher_beats_random_on_real_images(tmp_path):
    results = run_quality(quick_settings(), data_root=tmp_path, log=lambda _: None)
    assert results["layout"]["uncertain_left_out"]["elpv_mono"] > 0
    summary = results["summary"]
    for category in ("elpv_mono", "elpv_poly"):
        imagenet = summary[f"{category}/mrkd_imagenet"]["image_auroc"]["mean"]
        random = summary[f"{category}/mrkd_random"]["image_auroc"]["mean"]
        knn = summary[f"{category}/knn"]["image_auroc"]["mean"]
        assert imagenet > random, (category, imagenet, random)
        assert knn > 0.6, (category, knn)       # the baseline sees the defects at all
        assert 0.5 < summary[f"{category}/mrkd+knn"]["image_auroc"]["mean"] <= 1.0
        assert summary[f"{category}/knn_coreset"]["image_auroc"]["mean"] > 0.6, category
        assert 0.5 < summary[f"{category}/score_both"]["image_auroc"]["mean"] <= 1.0   # the shipped default


def test_maps_in_chunks_equal_the_maps_of_all_images_at_once():
    """mrkd_maps works MAPS_CHUNK images at a time (the blur of 508 cells at 512 px at once needed ~17 GB);
    every image's map must equal the one computed over the whole batch, with and without a sigma."""
    from types import SimpleNamespace

    from mrkd.benchmarks.bench_quality import MAPS_CHUNK, mrkd_maps
    from mrkd.train.head import AnomalyMapHead, GaussianBlur
    head = AnomalyMapHead(64, 4.0)
    rng = np.random.default_rng(2)
    count = 2 * MAPS_CHUNK + 5
    per_scale = [torch.tensor(rng.random((count, size, size)), dtype=torch.float32) for size in (16, 8, 4)]
    for weights, sigma, blur in (((1, 1, 1), None, head.blur), ((0, 1, 2), 2.0, GaussianBlur(2.0))):
        whole = blur(head.upsample_sum([w * m for w, m in zip(weights, per_scale) if w]))
        got = mrkd_maps(SimpleNamespace(head=head), per_scale, weights, sigma)
        assert got.shape == (count, 1, 64, 64)
        torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-6)
