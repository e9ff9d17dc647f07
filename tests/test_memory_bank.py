"""--score knn|both: the memory-bank distance map against scipy, checkpoints, ONNX parity, the trainer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

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
@pytest.mark.parametrize("score", ["knn", "both"])
def test_fitted_model_checkpoint_and_onnx_parity(tmp_path, score):
    from mrkd.export import ExportOptions, export_onnx, parity_report
    from mrkd.train import load_checkpoint
    from export_fixtures import run_onnx
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    plain = model.anomaly_map(x)
    model.head.scale_weights = BOTH_SCALE_WEIGHTS
    plain_both = model.anomaly_map(x)             # the MRKD part of "both"
    model.head.scale_weights = (1.0, 1.0, 1.0)
    info = fit_memory_bank(model, _images(tmp_path), score, fraction=0.5, seed=0, batch_size=4)
    assert info["bank_patches"] == 6 * 8 * 8 // 2
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
    assert loaded.config.score == score
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
