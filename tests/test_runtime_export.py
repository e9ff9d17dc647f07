"""A real exported MRKD model (resnet18 random teacher, 64 px) through the Detector agrees with PyTorch."""

import numpy as np
import pytest


@pytest.mark.slow
@pytest.mark.parametrize("per_scale, smooth_in_graph", [(False, True), (True, False), (False, False)])
def test_exported_model_scores_match_torch(tmp_path, per_scale, smooth_in_graph):
    """Every output layout: smoothed in the graph, per-scale maps, and the unsmoothed full-size map
    that the runtime smooths itself."""
    torch = pytest.importorskip("torch")
    from mrkd.export.exporter import export_onnx
    from mrkd.export.onnx_graph import ExportOptions
    from mrkd.runtime import Detector
    from mrkd.train import resnet18

    model = resnet18(teacher_weights="random", image_size=64).eval()
    path = tmp_path / "model.onnx"
    export_onnx(model, path, ExportOptions(per_scale_outputs=per_scale, smooth_in_graph=smooth_in_graph), simplify="never")
    detector = Detector(path, threshold=1.0)
    frames = np.random.default_rng(0).integers(0, 256, (3, 48, 80, 3), dtype=np.uint8)
    result = detector(frames)
    with torch.no_grad():
        expected_maps = model.anomaly_map(torch.from_numpy(detector.preprocess(list(frames)))).numpy()
    expected_maps = expected_maps.reshape(3, 64, 64)
    np.testing.assert_allclose(result.maps, expected_maps, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(result.scores, expected_maps.max(axis=(1, 2)), rtol=1e-3, atol=1e-3)
