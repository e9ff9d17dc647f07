"""--score knn|both: the memory-bank distance map against scipy, checkpoints, ONNX parity, the trainer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mrkd.errors import SettingError  # noqa: E402
from mrkd.train.memory_bank import BOTH_SCALE_WEIGHTS, MemoryBank, fit_memory_bank, patch_features  # noqa: E402
from mrkd.train.model import build_model  # noqa: E402


def _model():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model("resnet18", "random", image_size=64).eval()


def test_distance_map_matches_scipy_cdist_with_any_chunking():
    from scipy.spatial.distance import cdist
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 6, 8, 8, generator=g),
             torch.randn(2, 5, 4, 4, generator=g)]
    bank = torch.randn(300, 11, generator=g)
    f = patch_features(feats).permute(0, 2, 3, 1).reshape(-1, 11).double().numpy()
    # Independent upsampling reference for the deep features is not needed: compare on the same patches.
    expected = cdist(f, bank.double().numpy()).min(1).reshape(2, 8, 8)
    for chunk in (7, 128, 4096):
        got = MemoryBank(bank, chunk=chunk)(feats).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # A patch that is in the bank is at distance 0.
    bank_with = torch.cat([bank, torch.tensor(f[:1], dtype=torch.float32)])
    assert MemoryBank(bank_with)(feats)[0, 0, 0] < 1e-2


def _images(tmp_path, n=6):
    import cv2
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = tmp_path / f"good{i}.png"
        cv2.imwrite(str(path), (rng.random((64, 64, 3)) * 255).astype(np.uint8))
        paths.append(str(path))
    return paths


@pytest.mark.slow   # two ONNX exports
@pytest.mark.parametrize("score, pool", [("knn", None), ("both", None), ("both", 3)])
def test_fitted_model_checkpoint_and_onnx_parity(tmp_path, score, pool):
    """pool None: the default at 64 px (no averaging); 3: the 256 px default's AveragePool in the graph."""
    from mrkd.export import ExportOptions, export_onnx, parity_report
    from mrkd.train import load_checkpoint
    from export_fixtures import run_onnx
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    plain = model.anomaly_map(x)
    model.head.scale_weights = BOTH_SCALE_WEIGHTS
    plain_both = model.anomaly_map(x)             # the MRKD part of "both"
    model.head.scale_weights = (1.0, 1.0, 1.0)
    info = fit_memory_bank(model, _images(tmp_path), score, fraction=0.5, seed=0, batch_size=4, pool=pool)
    assert info["bank_patches"] == 6 * 8 * 8 // 2 and info["pool"] == (pool or 1)
    maps = model.anomaly_map(x)
    assert not torch.allclose(maps, plain)
    if score == "both":   # the sum of the two maps, each scaled as documented
        knn_only = model.head.blur(model.head.upsample_sum([model.head.memory_bank(model.teacher(x))]))
        expected = plain_both / info["mrkd_train_score_std"] + knn_only / info["knn_train_score_std"]
        torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-4)
    model.calibration = {"threshold": float(model.scores(x).max()), "threshold_method": "quantile",
                         "quantile": 0.99, "good_min": 0.0, "good_mean": 0.0}
    model.save(tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.config.score == score and loaded.head.memory_bank.pool == (pool or 1)
    torch.testing.assert_close(loaded.anomaly_map(x), maps, rtol=0, atol=0)
    options = ExportOptions()
    exported = export_onnx(loaded, tmp_path / "m.onnx", options, checkpoint_sha256="ab" * 32, simplify="never")
    assert parity_report(loaded, exported.path, options).check().passed
    out = run_onnx(exported.path, x.numpy())
    np.testing.assert_allclose(out["anomaly_map"], maps.numpy(), rtol=1e-4, atol=1e-4)
    # Per-scale outputs: the kNN map is one more "scale"; the runtime's post-processing (C++) sums,
    # smooths and scores them into the same map as the in-graph head.
    from mrkd.runtime.metadata import ModelMetadata, sidecar_path
    from mrkd.runtime.postprocess import anomaly_map
    per_scale = ExportOptions(per_scale_outputs=True)
    exported = export_onnx(loaded, tmp_path / "p.onnx", per_scale, checkpoint_sha256="ab" * 32, simplify="never")
    assert parity_report(loaded, exported.path, per_scale).check().passed
    meta = ModelMetadata.load(sidecar_path(exported.path))
    assert meta.outputs.scales == ("scale0", "scale1", "scale2", "scale3")
    assert "memory bank" in meta.outputs.descriptions["scale3"]
    out = run_onnx(exported.path, x.numpy())
    runtime_maps, runtime_scores = anomaly_map([out[name] for name in meta.outputs.scales], 64, meta.sigma,
                                               impl="cpu")
    np.testing.assert_allclose(runtime_maps, maps.numpy()[:, 0], rtol=1e-4, atol=1e-4 * float(maps.max()))
    np.testing.assert_allclose(runtime_scores, loaded.scores(x).numpy(), rtol=1e-4)


def test_checkpoint_without_its_bank_is_refused(tmp_path):
    from mrkd.train import CheckpointError, load_checkpoint
    model = _model()
    fit_memory_bank(model, _images(tmp_path, 2), "knn", fraction=0.5)
    model.save(tmp_path / "m.pt")
    data = torch.load(tmp_path / "m.pt", weights_only=True)
    del data["memory_bank"]
    torch.save(data, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="broken.pt.*memory_bank"):
        load_checkpoint(tmp_path / "broken.pt")


@pytest.mark.slow
def test_trainer_score_both_ships_bank_and_calibrates_on_the_summed_map(tmp_path):
    from mrkd.train import load_checkpoint
    from mrkd.train.trainer import TrainConfig, train
    from train_fixtures import CATEGORY, TINY, tiny_data
    config = TrainConfig(**{**TINY, "epochs": 1, "eval_every": 0}, score="both", knn_memory_fraction=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = train(tiny_data(), CATEGORY, tmp_path, config, backbone="resnet18", teacher_weights="random",
                        resume=False)
    model = load_checkpoint(tmp_path / "last.ckpt")
    assert model.config.score == "both" and model.head.memory_bank is not None
    assert model.config.knn_weight > 0 and model.calibration.threshold > 0
    held_out = summary["model"].head.memory_bank.bank
    torch.testing.assert_close(model.head.memory_bank.bank, held_out.cpu(), rtol=0, atol=0)


def test_a_finished_run_resumes_with_another_score_and_keeps_its_weights(tmp_path):
    """--score and the bank's settings do not change the epochs, so a run resumes across them: a
    finished run started again with --score mrkd gets no bank and the same student weights."""
    from mrkd.train import load_checkpoint
    from mrkd.train.trainer import TrainConfig, train
    from train_fixtures import CATEGORY, TINY, tiny_data
    settings = {**TINY, "epochs": 1, "eval_every": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(tiny_data(), CATEGORY, tmp_path, TrainConfig(**settings, score="both"), backbone="resnet18",
              teacher_weights="random")
        first = load_checkpoint(tmp_path / "last.ckpt")
        train(tiny_data(), CATEGORY, tmp_path, TrainConfig(**settings, score="mrkd", knn_sampler="random"),
              backbone="resnet18", teacher_weights="random")
    second = load_checkpoint(tmp_path / "last.ckpt")
    assert first.head.memory_bank is not None and second.head.memory_bank is None
    assert second.config.score == "mrkd" and second.config.scale_weights == (1.0, 1.0, 1.0)
    for a, b in zip(first.student.parameters(), second.student.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _brute_force_k_center(points: np.ndarray, keep: int, first: int) -> list:
    """Greedy k-center written out plainly: every step, the point whose nearest chosen point is farthest."""
    chosen = [first]
    for _ in range(keep - 1):
        nearest = np.min([[np.linalg.norm(p - points[c]) for c in chosen] for p in points], axis=1)
        chosen.append(int(np.argmax(nearest)))
    return chosen


def test_greedy_coreset_is_k_center_selection():
    from mrkd.train.memory_bank import greedy_coreset
    g = torch.Generator().manual_seed(3)
    points = torch.randn(120, 6, generator=g)     # narrower than the projection: distances are exact
    chosen = greedy_coreset(points, 9, seed=4).tolist()
    assert chosen == _brute_force_k_center(points.double().numpy(), 9, chosen[0])
    assert len(set(chosen)) == 9


def test_coreset_covers_rare_patches_that_random_sampling_misses():
    """A bank of 12 from 1,000 normal patches plus 5 of a rare, distant kind: k-center always keeps
    one of the rare kind (their covering radius is what it minimises); a random 1.2 % keeps one in
    about 6 % of draws (1 - C(1000, 12) / C(1005, 12))."""
    from scipy.spatial.distance import cdist

    from mrkd.train.memory_bank import subsample_patches
    g = torch.Generator().manual_seed(0)
    common = torch.randn(1000, 16, generator=g)
    rare = torch.randn(5, 16, generator=g) * 0.1 + 12.0     # ~48 away from the common ones
    patches = torch.cat([common, rare])
    fraction = 12 / len(patches)

    def rare_is_covered(bank):
        return cdist(rare.numpy(), bank.numpy()).min(1).max() < 1.0

    seeds = range(30)
    coreset = [subsample_patches(patches, fraction, seed=s, sampler="coreset") for s in seeds]
    assert all(len(bank) == 12 for bank in coreset)
    assert all(rare_is_covered(bank) for bank in coreset)
    random_hits = sum(rare_is_covered(subsample_patches(patches, fraction, seed=s, sampler="random")) for s in seeds)
    assert random_hits <= 8


def test_bank_size_rules_and_refusals():
    from mrkd.train.memory_bank import bank_size, subsample_patches
    assert bank_size(1000, 0.05) == 50 and bank_size(1000, 0.05, max_patches=20) == 20
    assert bank_size(3, 0.01) == 1                      # never empty
    patches = torch.randn(200, 4)
    assert len(subsample_patches(patches, 0.5, max_patches=30)) == 30
    for bad in (dict(fraction=0.0), dict(fraction=1.5), dict(fraction=0.1, sampler="kmeans"),
                dict(fraction=0.1, max_patches=-1)):
        with pytest.raises(ValueError):
            subsample_patches(patches, **bad)


def test_score_spread_is_the_population_std_and_never_zero_or_nan():
    from mrkd.train.memory_bank import score_spread
    values = torch.tensor([1.0, 2.0, 4.0, 7.0])
    assert score_spread(values) == pytest.approx(float(np.std(values.numpy())))
    assert score_spread(torch.tensor([0.3])) == pytest.approx(0.3)          # one image: its score
    assert score_spread(torch.tensor([0.5, 0.5, 0.5])) == pytest.approx(0.5)  # identical images
    for hopeless in (torch.zeros(3), torch.tensor([float("nan")] * 2), torch.tensor([])):
        assert score_spread(hopeless) == 1.0


def test_score_both_on_one_training_image_gives_finite_weights(tmp_path):
    model = _model()
    report = fit_memory_bank(model, _images(tmp_path, n=1), "both")
    weights = list(model.config.scale_weights) + [model.config.knn_weight]
    assert all(np.isfinite(w) and 0 <= w < 1e6 for w in weights), (weights, report)
    assert torch.isfinite(model.anomaly_map(torch.randn(1, 3, 64, 64))).all()


def test_training_patches_past_the_limit_are_a_bounded_uniform_sample(tmp_path):
    from mrkd.train.data import TestDataset, TestItem
    from mrkd.train.memory_bank import training_patches
    model = _model()
    items = [TestItem(p, 0, "good", None) for p in _images(tmp_path, n=6)]
    dataset = TestDataset(items, 64, "resize", model.config.mean, model.config.std)

    def batches():   # two images a batch, so the sample is merged across batches
        for image, _, _, _ in torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=False):
            yield image

    everything = training_patches(model, batches())
    assert everything.total == len(everything.rows) == 6 * 8 * 8     # stride 8 at 64 px
    sample = training_patches(model, batches(), limit=100, seed=1)
    assert sample.total == 384 and sample.rows.shape == (100, everything.rows.shape[1])
    # Every sampled row is one of the real rows, none twice, and the later images are drawn from too.
    match = (sample.rows[:, None, :] == everything.rows[None, :, :]).all(-1).nonzero()[:, 1]
    assert len(match) == 100 and len(set(match.tolist())) == 100
    assert (match >= 4 * 64).any() and (match < 2 * 64).any()
    again = training_patches(model, batches(), limit=100, seed=1)
    torch.testing.assert_close(again.rows, sample.rows, rtol=0, atol=0)
    assert not torch.equal(training_patches(model, batches(), limit=100, seed=2).rows, sample.rows)


# ----------------------------------------------------------------------------- issue 24: the bank in seconds

def test_greedy_coreset_in_a_projection_is_k_center_of_the_projected_rows():
    """Wider rows than the projection: the chosen rows are brute-force greedy k-center on the projected
    rows (the projection recomputed here from the same seeded generator)."""
    from mrkd.train.memory_bank import greedy_coreset, random_projection
    g = torch.Generator().manual_seed(5)
    points = torch.randn(150, 40, generator=g)
    chosen = greedy_coreset(points, 8, seed=2, projection_dim=12).tolist()
    projected = (points @ random_projection(40, 12, torch.Generator().manual_seed(2))).double().numpy()
    assert chosen == _brute_force_k_center(projected, 8, chosen[0])


def test_projected_coreset_covering_radius_within_the_k_center_bound_of_the_optimum():
    """Greedy k-center is a 2-approximation of the smallest covering radius; in a projection that
    distorts distances by at most (1 ± eps) (measured here on every pair), the radius in full dimensions
    stays within 2 (1 + eps) / (1 - eps) of the optimum, found by trying every 3-subset."""
    from itertools import combinations

    from scipy.spatial.distance import cdist

    from mrkd.train.memory_bank import greedy_coreset, random_projection
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 152, generator=g) * 6
    points = (centres.repeat_interleave(10, 0) + torch.randn(40, 152, generator=g)).double()
    full = cdist(points.numpy(), points.numpy())
    projected_points = points.float() @ random_projection(152, 64, torch.Generator().manual_seed(0))
    projected = cdist(projected_points.double().numpy(), projected_points.double().numpy())
    off = ~np.eye(40, dtype=bool)
    ratio = projected[off] / full[off]
    eps = max(1 - ratio.min(), ratio.max() - 1)
    assert eps < 0.5
    optimum = min(full[:, list(subset)].min(1).max() for subset in combinations(range(40), 3))
    chosen = greedy_coreset(points.float(), 3, seed=0, projection_dim=64).tolist()
    radius = full[:, chosen].min(1).max()
    assert radius <= 2 * (1 + eps) / (1 - eps) * optimum + 1e-9


def test_random_projection_distorts_squared_distances_as_chi_square():
    """What the coreset relies on (random_projection's note): projected over true squared distance is
    chi²(64)/64 per pair; over 2,000 pairs of 152-wide rows about 0.2 % fall outside the 0.1 % / 99.9 %
    quantiles, and the mean is 1 within its standard error."""
    from scipy.stats import chi2

    from mrkd.train.memory_bank import random_projection
    g = torch.Generator().manual_seed(7)
    rows = torch.randn(4000, 152, generator=g).double()
    projection = random_projection(152, 64, torch.Generator().manual_seed(3)).double()
    diff = rows[:2000] - rows[2000:]
    ratio = ((diff @ projection).pow(2).sum(1) / diff.pow(2).sum(1)).numpy()
    low, high = chi2.ppf([0.001, 0.999], 64) / 64
    assert np.mean((ratio < low) | (ratio > high)) < 0.01
    assert abs(ratio.mean() - 1) < 4 * np.sqrt(2 / 64) / np.sqrt(2000)


def test_new_coreset_covers_rare_patches_as_well_as_the_previous_one():
    """Rare-patch coverage (largest distance, full dimensions, of any candidate to its nearest bank
    row: what k-center minimises), brute force with scipy: today's coreset (64-dim projection, addmv on
    one thread) against the previous one (128 dims) on 3,000 patches with a few rare kinds."""
    from scipy.spatial.distance import cdist

    from mrkd.benchmarks.memory_bank_previous import subsample_patches as previous
    from mrkd.train.memory_bank import subsample_patches
    g = torch.Generator().manual_seed(11)
    common = torch.randn(3000, 152, generator=g)
    rare = torch.cat([torch.randn(3, 152, generator=g) * 0.1 + 8 * torch.randn(152, generator=g)
                      for _ in range(4)])
    patches = torch.cat([common, rare])
    radii = {}
    for name, fit in (("previous", previous), ("now", subsample_patches)):
        bank = fit(patches, 0.02, seed=0, sampler="coreset")
        nearest = cdist(patches.numpy(), bank.numpy()).min(1)
        radii[name] = nearest.max()
        assert cdist(rare.numpy(), bank.numpy()).min(1).max() < 3.0        # every rare kind is in
    assert radii["now"] <= 1.1 * radii["previous"], radii


def test_one_pass_gives_the_same_scores_as_separate_passes(tmp_path):
    """fit_memory_bank's single teacher pass (patches + MRKD scores from the same features) gives the
    spreads the three separate passes give: MRKD scores of the head with the "both" scales and no bank,
    then the kNN scores with the bank alone, each computed here through model.scores."""
    from mrkd.train.memory_bank import score_spread
    paths = _images(tmp_path, n=5)
    model = _model()
    report = fit_memory_bank(model, paths, "both", progress=False, batch_size=2)
    batch = torch.stack([_tensor(model, p) for p in paths])
    head, bank = model.head, model.head.memory_bank
    with torch.no_grad():
        head.set_memory_bank(None, 0.0)
        head.scale_weights = BOTH_SCALE_WEIGHTS
        mrkd = model.scores(batch)
        head.set_memory_bank(bank, 1.0)
        head.scale_weights = (0.0, 0.0, 0.0)
        knn = model.scores(batch)
    assert report["mrkd_train_score_std"] == pytest.approx(score_spread(mrkd), rel=1e-5)
    assert report["knn_train_score_std"] == pytest.approx(score_spread(knn), rel=1e-5)
    assert set(report["seconds"]) == {"teacher", "patches", "mrkd_scores", "coreset", "knn_scores"}


def _tensor(model, path):
    from mrkd.train.data import TestDataset, TestItem
    config = model.config
    return TestDataset([TestItem(path, 0, "good", None)], config.image_size, config.resize_mode,
                       config.mean, config.std)[0][0]


def test_score_spreads_are_measured_on_a_seeded_sample_of_many_images():
    from mrkd.train.memory_bank import spread_images
    assert spread_images(10, limit=256) == list(range(10))
    sample = spread_images(700, seed=3, limit=256)
    assert len(sample) == len(set(sample)) == 256 and sample == sorted(sample) and max(sample) < 700
    assert sample == spread_images(700, seed=3, limit=256) != spread_images(700, seed=4, limit=256)


def test_each_step_of_the_fit_shows_a_progress_bar(tmp_path, capsys):
    fit_memory_bank(_model(), _images(tmp_path, n=3), "both", progress=True)
    err = capsys.readouterr().err
    for step in ("memory bank: features", "memory bank: coreset", "memory bank: kNN scores"):
        assert step in err, err


def _brute_force_continued(points: np.ndarray, chosen: list, keep: int) -> list:
    """Greedy k-center continued from ``chosen`` over every point, written out plainly."""
    chosen = list(chosen)
    while len(chosen) < keep:
        nearest = np.min([[np.linalg.norm(p - points[c]) for c in chosen] for p in points], axis=1)
        chosen.append(int(np.argmax(nearest)))
    return chosen


def test_tailed_coreset_is_k_center_on_the_pool_then_continued_over_every_row():
    """The pool's part of the bank is greedy k-center on the first ``candidates`` rows; the tail is
    greedy k-center continued over all rows (both brute force here, rows narrower than the projection)."""
    from mrkd.train.memory_bank import tailed_coreset
    g = torch.Generator().manual_seed(8)
    points = torch.randn(300, 6, generator=g)
    chosen = tailed_coreset(points, 20, seed=1, candidates=100, tail=0.25).tolist()
    reference = points.double().numpy()
    head = _brute_force_k_center(reference[:100], 15, chosen[0])
    assert chosen[:15] == head
    assert chosen == _brute_force_continued(reference, head, 20)
    assert any(c >= 100 for c in chosen[15:])     # the tail reaches past the pool


def test_the_tail_covers_rare_patches_outside_the_pool():
    """Rare, distant patches all outside the pool: the pool alone never sees them (covering radius over
    every row ~ their distance), the tail takes one of each kind (radius back to the common rows')."""
    from scipy.spatial.distance import cdist

    from mrkd.train.memory_bank import tailed_coreset
    g = torch.Generator().manual_seed(2)
    common = torch.randn(2000, 152, generator=g)
    rare = torch.cat([torch.randn(3, 152, generator=g) * 0.1 + 8 * torch.randn(152, generator=g)
                      for _ in range(4)])
    patches = torch.cat([common, rare])                 # the pool is the first 1,000 rows: no rare ones
    radii = {}
    for tail in (0.0, 0.1):
        chosen = tailed_coreset(patches, 60, seed=0, candidates=1000, tail=tail)
        radii[tail] = cdist(patches.numpy(), patches[chosen].numpy()).min(1).max()
    far = cdist(rare.numpy(), common.numpy()).min()
    assert radii[0.0] > 0.8 * far and radii[0.1] < 0.5 * far, (radii, far)


def test_the_tail_steps_over_the_farthest_rows_only_and_still_matches_greedy_over_all():
    """6,000 rows, the tail's 50 steps look at the 4,096 farthest only: same choice as greedy k-center
    continued over every row (numpy, every distance recomputed each step)."""
    from scipy.spatial.distance import cdist

    from mrkd.train.memory_bank import tailed_coreset
    g = torch.Generator().manual_seed(4)
    points = torch.randn(6000, 6, generator=g)
    chosen = tailed_coreset(points, 100, seed=3, candidates=500, tail=0.5).tolist()
    reference = points.double().numpy()
    expected = chosen[:50]
    while len(expected) < 100:
        expected.append(int(np.argmax(cdist(reference, reference[expected]).min(1))))
    assert chosen == expected


def _brute_force_k_center_fast(points: np.ndarray, keep: int, first: int) -> list:
    """Greedy k-center in float64, every distance to every chosen point recomputed each step (scipy)."""
    from scipy.spatial.distance import cdist
    chosen = [first]
    while len(chosen) < keep:
        chosen.append(int(np.argmax(cdist(points, points[chosen]).min(1))))
    return chosen


@pytest.mark.parametrize("settle_every", [1, 5, 64])
def test_blocked_kernel_chooses_as_one_centre_a_step_and_as_brute_force(settle_every):
    """_blocked_greedy (settled distances in blocked matrix products, only the rows that can be the
    farthest kept current) against _greedy_steps (every row every step) and a float64 brute force, on
    continuous random rows with unequal spreads per dimension; with settle_every=1 every step settles,
    with 64 the rows kept current grow and are extended many times. ``finish`` gives every row's
    distance to the nearest chosen row, as _greedy_steps leaves it."""
    from mrkd.train.memory_bank import _blocked_greedy, _greedy_steps
    g = torch.Generator().manual_seed(6)
    points = torch.randn(2000, 8, generator=g) * torch.linspace(0.5, 3.0, 8)
    squared = points.pow(2).sum(1)
    keep, first = 150, 17
    one_a_step = torch.full((keep,), first, dtype=torch.long)
    nearest = torch.full((len(points),), float("inf"))
    _greedy_steps(points, squared, nearest, one_a_step, 1)
    blocked = torch.full((keep,), first, dtype=torch.long)
    finished = _blocked_greedy(points, squared, blocked, settle_every=settle_every, finish=True)
    assert blocked.tolist() == one_a_step.tolist()
    assert blocked.tolist() == _brute_force_k_center_fast(points.double().numpy(), keep, first)
    torch.testing.assert_close(finished, nearest, rtol=1e-4, atol=1e-4)


def test_greedy_coreset_kernels_choose_the_same_rows_in_a_projection():
    """Both kernels through greedy_coreset on 152-wide rows projected to 64 dims (the fit's path), and
    an unknown kernel refused."""
    from mrkd.errors import SettingError
    from mrkd.train.memory_bank import greedy_coreset
    g = torch.Generator().manual_seed(9)
    rows = torch.randn(8000, 152, generator=g) * torch.rand(152, generator=g)
    blocked = greedy_coreset(rows, 600, seed=1, projection_dim=64)
    assert torch.equal(blocked, greedy_coreset(rows, 600, seed=1, projection_dim=64, kernel="addmv"))
    assert len(set(blocked.tolist())) == 600
    with pytest.raises(SettingError, match="kernel"):
        greedy_coreset(rows, 10, kernel="elkan")


def test_fitting_distance_map_matches_scipy_and_the_bank_module():
    from scipy.spatial.distance import cdist

    from mrkd.train.memory_bank import nearest_distance
    g = torch.Generator().manual_seed(12)
    feats = [None, torch.randn(3, 6, 8, 8, generator=g), torch.randn(3, 5, 4, 4, generator=g)]
    bank = torch.randn(5000, 11, generator=g)     # more rows than one block: the blocks' minimum
    f = patch_features(feats).permute(0, 2, 3, 1).reshape(-1, 11).double().numpy()
    expected = cdist(f, bank.double().numpy()).min(1).reshape(3, 8, 8)
    got = nearest_distance(bank, feats, block=1024)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, MemoryBank(bank)(feats), rtol=1e-4, atol=1e-4)


def test_spread_features_recomputed_past_the_cache_give_the_same_spreads(tmp_path, monkeypatch):
    """The kNN scores of the spread images from the features kept in the first pass, or (cache too
    small) from a second teacher pass: the same spreads and the same bank."""
    import mrkd.train.memory_bank as memory_bank
    paths = _images(tmp_path, n=5)
    kept_model, recomputed_model = _model(), _model()
    kept = fit_memory_bank(kept_model, paths, "both", progress=False, batch_size=2)
    monkeypatch.setattr(memory_bank, "SPREAD_CACHE_BYTES", 0)
    recomputed = fit_memory_bank(recomputed_model, paths, "both", progress=False, batch_size=2)
    assert recomputed["knn_train_score_std"] == pytest.approx(kept["knn_train_score_std"], rel=1e-5)
    assert recomputed["mrkd_train_score_std"] == pytest.approx(kept["mrkd_train_score_std"], rel=1e-6)
    torch.testing.assert_close(recomputed_model.head.memory_bank.bank, kept_model.head.memory_bank.bank,
                               rtol=0, atol=0)


def test_pooled_patches_match_scipy_neighbourhood_mean_through_bank_and_fitting():
    """pool=3 (the default): each stride-8/16 feature averaged over its 3 × 3 neighbourhood, zeros past
    the border counted (scipy's uniform_filter, mode "constant"), in the graph's module and the fitting
    kernel alike. The deep map is given at the stride-8 size so the upsampling is the identity."""
    from scipy.ndimage import uniform_filter
    from scipy.spatial.distance import cdist

    from mrkd.train.memory_bank import default_pool, nearest_distance
    assert [default_pool(s) for s in (64, 128, 255, 256, (256, 320), 512)] == [1, 1, 1, 3, 3, 3]
    g = torch.Generator().manual_seed(5)
    feats = [None, torch.randn(2, 6, 8, 8, generator=g), torch.randn(2, 5, 8, 8, generator=g)]
    reference = np.concatenate([uniform_filter(f.double().numpy(), size=(1, 1, 3, 3), mode="constant", cval=0.0)
                                for f in feats[1:]], axis=1)
    np.testing.assert_allclose(patch_features(feats, 3).numpy(), reference, rtol=1e-5, atol=1e-6)
    assert not np.allclose(patch_features(feats, 1).numpy(), reference, atol=1e-3)   # the pooling did something
    bank = torch.randn(700, 11, generator=g)
    expected = cdist(reference.transpose(0, 2, 3, 1).reshape(-1, 11), bank.double().numpy()).min(1).reshape(2, 8, 8)
    np.testing.assert_allclose(MemoryBank(bank, chunk=128, pool=3)(feats).numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(nearest_distance(bank, feats, block=256, pool=3).numpy(), expected,
                               rtol=1e-4, atol=1e-4)
    for bad in (0, 2, -1, 1.0, True):
        with pytest.raises(SettingError, match="pool"):
            MemoryBank(bank, pool=bad)


def test_checkpoints_from_before_pooling_keep_unpooled_patches(tmp_path):
    """A checkpoint written before knn_pool existed was fitted on unaveraged patches: it loads with
    pool 1, and a new fit records (and its saved checkpoint restores) the pool it used."""
    from mrkd.train import load_checkpoint, save_checkpoint
    from mrkd.train.model import MRKDConfig
    old = MRKDConfig(backbone="resnet18", image_size=256, score="both").to_dict()
    assert old["knn_pool"] == 3          # today's default at 256 px
    del old["knn_pool"]
    assert MRKDConfig.from_dict(old).knn_pool == 1
    model = _model()                     # 64 px: the default is no averaging
    assert fit_memory_bank(model, _images(tmp_path, 3), "both", fraction=0.5, progress=False)["pool"] == 1
    report = fit_memory_bank(model, _images(tmp_path, 3), "both", fraction=0.5, progress=False, batch_size=2,
                             pool=3)
    assert report["pool"] == 3 and model.config.knn_pool == 3 and model.head.memory_bank.pool == 3
    save_checkpoint(model, tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.head.memory_bank.pool == 3
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded.anomaly_map(x), model.anomaly_map(x), rtol=1e-5, atol=1e-5)


def test_eager_distance_maps_stay_within_the_block_budget_whatever_the_batch(monkeypatch):
    """Calibration and eval at 512 px and batch 8 held 1.5 GiB of distances at once (queries × bank
    chunk): eager MemoryBank.forward and nearest_distance now work in blocks of query rows of at most
    QUERY_BLOCK_BYTES, with the same map (scipy's cdist as the reference)."""
    from scipy.spatial.distance import cdist
    from mrkd.train import memory_bank
    budget = 64 * 2 ** 10
    monkeypatch.setattr(memory_bank, "QUERY_BLOCK_BYTES", budget, raising=False)
    g = torch.Generator().manual_seed(0)
    feats = [None, torch.randn(4, 6, 32, 32, generator=g), torch.randn(4, 5, 16, 16, generator=g)]
    bank = torch.randn(500, 11, generator=g)
    largest = []
    for name in ("matmul", "addmm"):
        original = getattr(torch, name)

        def recording(*args, _original=original, **kwargs):
            result = _original(*args, **kwargs)
            largest.append(result.numel() * result.element_size())
            return result
        monkeypatch.setattr(torch, name, recording)
    f = patch_features(feats, 3).permute(0, 2, 3, 1).reshape(-1, 11).double().numpy()
    expected = cdist(f, bank.double().numpy()).min(1).reshape(4, 32, 32)
    with torch.no_grad():
        for got in (MemoryBank(bank, chunk=200, pool=3)(feats), memory_bank.nearest_distance(bank, feats, 200, 3)):
            np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert largest and max(largest) <= budget      # unblocked: 4 × 1024 × 200 floats = 3.2 MB
