"""Per-scale weights of the anomaly map: numpy reference, checkpoints (old ones keep 1, 1, 1), ONNX parity."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mrkd.train.head import AnomalyMapHead  # noqa: E402
from mrkd.train.model import MRKDConfig, build_model  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402
from test_model import random_features, reference_anomaly_map, reference_upsample  # noqa: E402


@pytest.mark.parametrize("weights", [(0.0, 1.0, 1.0), (0.5, 2.0, 1.0)])
def test_weighted_head_matches_numpy_reference(weights):
    shapes, size = [(16, 16), (8, 8), (4, 4)], (64, 64)
    teacher, student = random_features(shapes)
    head = AnomalyMapHead(size, sigma=4.0, scale_weights=weights)
    ref_scales, _, _ = reference_anomaly_map(teacher, student, size)
    weighted = [[w * m for m in scale] for w, scale in zip(weights, ref_scales)]
    summed = sum(np.stack([reference_upsample(m, size) for m in maps]) for maps in weighted)
    ref_smoothed = np.stack([gaussian_filter(m, sigma=4.0, mode="reflect", truncate=4.0) for m in summed])
    for ours, ref in zip(head.per_scale_maps(teacher, student), weighted):
        np.testing.assert_allclose(ours.numpy(), np.stack(ref), atol=1e-5, rtol=0)
    np.testing.assert_allclose(head(teacher, student)[:, 0].numpy(), ref_smoothed, atol=1e-5, rtol=0)


def test_bad_weights_are_refused():
    for bad in ((1.0, 1.0), (0.0, 0.0, 0.0), (-1.0, 1.0, 1.0)):
        with pytest.raises(ValueError, match="scale_weights"):
            MRKDConfig(scale_weights=bad)


def _model(weights):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model("resnet18", "random", image_size=64, scale_weights=weights).eval()


def test_checkpoint_keeps_weights_and_old_checkpoints_keep_the_official_sum(tmp_path):
    from mrkd.train import load_checkpoint
    model = _model((0.0, 1.0, 1.0))
    model.save(tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.config.scale_weights == (0.0, 1.0, 1.0) == loaded.head.scale_weights
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded.anomaly_map(x), model.anomaly_map(x), rtol=0, atol=0)
    # A checkpoint written before the field existed: its config has no scale_weights.
    old = model.config.to_dict()
    del old["scale_weights"]
    assert MRKDConfig.from_dict(old).scale_weights == (1.0, 1.0, 1.0)


@pytest.mark.slow   # two ONNX exports
def test_exported_graph_carries_the_weights(tmp_path):
    from mrkd.export import ExportOptions, export_onnx, parity_report
    from export_fixtures import run_onnx
    model = _model((0.0, 1.0, 1.0))
    model.calibration = {"threshold": 1.0, "threshold_method": "quantile", "quantile": 0.99,
                         "good_min": 0.5, "good_mean": 0.8}
    for options in (ExportOptions(), ExportOptions(per_scale_outputs=True)):
        exported = export_onnx(model, tmp_path / f"m{options.per_scale_outputs}.onnx", options,
                               checkpoint_sha256="ab" * 32, simplify="never")
        assert parity_report(model, exported.path, options).check().passed
    x = torch.randn(2, 3, 64, 64)
    out = run_onnx(tmp_path / "mTrue.onnx", x.numpy())
    assert np.abs(out["scale0"]).max() == 0.0            # the stride-4 scale is weighted out
    np.testing.assert_allclose(out["scale1"], model.per_scale_maps(x)[1].numpy(), atol=1e-4)
