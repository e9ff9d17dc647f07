"""bench_knn_radius's position-restricted nearest distance and smoothed maximum against brute force and scipy."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_radius_nearest_matches_a_brute_force_over_positions():
    from scipy.spatial.distance import cdist

    from mrkd.benchmarks.bench_knn_radius import radius_nearest
    rng = np.random.default_rng(0)
    train = rng.normal(size=(4, 3, 5, 6)).astype(np.float32)
    test = rng.normal(size=(2, 3, 5, 6)).astype(np.float32)
    for radius in (0, 1, 2, 9):
        got = radius_nearest(torch.from_numpy(train), torch.from_numpy(test), radius).numpy()
        want = np.empty((2, 5, 6))
        for i in range(5):
            for j in range(6):
                near = [train[n, :, a, b] for n in range(4) for a in range(5) for b in range(6)
                        if abs(a - i) <= radius and abs(b - j) <= radius]
                want[:, i, j] = cdist(test[:, :, i, j], np.array(near)).min(1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    whole = cdist(test.transpose(0, 2, 3, 1).reshape(-1, 3), train.transpose(0, 2, 3, 1).reshape(-1, 3)).min(1)
    np.testing.assert_allclose(radius_nearest(torch.from_numpy(train), torch.from_numpy(test), 9).numpy().ravel(),
                               whole, rtol=1e-5, atol=1e-5)


def test_smoothed_max_matches_scipy_gaussian_filter():
    from scipy.ndimage import gaussian_filter

    from mrkd.benchmarks.bench_knn_radius import smoothed_max
    rng = np.random.default_rng(1)
    maps = rng.random((3, 32, 32)).astype(np.float32)
    assert np.allclose(smoothed_max(torch.from_numpy(maps), 0).numpy(), maps.reshape(3, -1).max(1))
    for sigma in (0.5, 1.0):
        want = [gaussian_filter(m.astype(np.float64), sigma, mode="mirror", truncate=4.0).max() for m in maps]
        np.testing.assert_allclose(smoothed_max(torch.from_numpy(maps), sigma).numpy(), want, rtol=1e-5)
