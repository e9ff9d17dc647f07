"""Detector: pre-processing, backend and post-processing against independent numpy/scipy references,
batch splitting, and clear errors for models that disagree with their metadata."""

import json

import numpy as np
import pytest
from scipy import ndimage

from runtime_fixtures import (SIZE, THRESHOLD, build_tiny_model, defective_frame, normal_frame,
                              reference_map)

from mrkd.runtime import Detector, MetadataError
from mrkd.runtime.metadata import sidecar_path


def _squares(frames):
    import cv2
    # The fixture frames are 48×64, the model 32×32: "resize" mode = squash with INTER_AREA.
    return np.stack([cv2.resize(f, (SIZE, SIZE), interpolation=cv2.INTER_AREA) for f in frames])


@pytest.fixture
def frames():
    rng = np.random.default_rng(3)
    return [normal_frame(rng), defective_frame(rng), normal_frame(rng, 40, 40), defective_frame(rng, 60, 90)]


@pytest.mark.parametrize("uint8_input", [False, True])
def test_scores_and_maps_match_numpy_reference(tmp_path, frames, uint8_input):
    detector = Detector(build_tiny_model(tmp_path / "m.onnx", uint8_input=uint8_input))
    result = detector(frames)
    expected = reference_map(_squares(frames))
    np.testing.assert_allclose(result.maps, expected, atol=1e-5)
    np.testing.assert_allclose(result.scores, expected.reshape(len(frames), -1).max(axis=1), atol=1e-5)
    assert result.decisions.tolist() == [False, True, False, True]
    assert result.frame_sizes == [(48, 64), (48, 64), (40, 40), (60, 90)]
    assert set(result.timings) == {"preprocess", "infer", "postprocess"}


def test_per_scale_outputs_are_postprocessed_like_scipy(tmp_path, frames):
    detector = Detector(build_tiny_model(tmp_path / "s.onnx", per_scale=True))
    result = detector(frames)
    x = _squares(frames).astype(np.float64) / 255.0
    deviation = np.maximum(x.mean(axis=3) - 0.6, 0.0)
    expected = np.zeros_like(deviation)
    for stride in (4, 8, 16):
        h = SIZE // stride
        pooled = deviation.reshape(len(frames), h, stride, h, stride).mean(axis=(2, 4))
        # scipy zoom with grid_mode=False maps corner to corner: bilinear with align_corners=True.
        expected += np.stack([ndimage.zoom(p, SIZE / h, order=1, grid_mode=False) for p in pooled])
    expected = np.stack([ndimage.gaussian_filter(m, sigma=1.0, mode="reflect", truncate=4.0) for m in expected])
    np.testing.assert_allclose(result.maps, expected, atol=1e-5)
    np.testing.assert_allclose(result.scores, expected.max(axis=(1, 2)), atol=1e-5)


def test_batches_larger_than_the_model_are_split(tmp_path):
    rng = np.random.default_rng(0)
    frames = np.stack([defective_frame(rng) if i % 3 == 0 else normal_frame(rng) for i in range(11)])
    detector = Detector(build_tiny_model(tmp_path / "m.onnx", max_batch=4))
    assert detector.max_batch == 4
    batched = detector(frames)
    one_by_one = np.concatenate([detector(f).scores for f in frames])
    np.testing.assert_allclose(batched.scores, one_by_one, atol=1e-6)
    assert batched.maps.shape == (11, SIZE, SIZE)
    assert batched.decisions.tolist() == [i % 3 == 0 for i in range(11)]


def test_threshold_override(tmp_path, frames):
    detector = Detector(build_tiny_model(tmp_path / "m.onnx"), threshold=0.5)
    assert detector.threshold == 0.5
    assert not detector(frames).decisions.any()


def test_bad_frames_are_named(tmp_path):
    detector = Detector(build_tiny_model(tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match="frame 1"):
        detector([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32)])


def _rewrite_sidecar(model, **changes):
    path = sidecar_path(model)
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("changes, field", [
    ({"image_size": 64}, "image_size"),
    ({"input_name": "images"}, "input_name"),
    ({"input_format": "uint8_nhwc_bgr"}, "input_format"),
    ({"outputs": {"anomaly_map": "", "score": "", "heatmap": ""}}, "outputs"),
    ({"outputs": {"anomaly_map": "", "score": "", "scale1": ""}}, "outputs.scales"),   # scale0 missing
    ({"outputs": {"score": ""}}, "outputs.anomaly_map"),
])
def test_model_metadata_mismatch_is_a_clear_error(tmp_path, changes, field):
    model = build_tiny_model(tmp_path / "m.onnx")
    _rewrite_sidecar(model, **changes)
    with pytest.raises(MetadataError) as info:
        Detector(model)
    assert field in str(info.value) and "m.onnx.json" in str(info.value)


def test_a_version_1_sidecar_with_per_scale_outputs_migrates_to_typed_outputs(tmp_path, frames):
    """A sidecar in the layout version-1 exporters wrote (threshold and score_norm at the top level,
    calibration under extra, outputs as name -> description) loads with its outputs by role and runs
    like today's sidecar of the same graph."""
    from mrkd.runtime.metadata import ModelMetadata
    model = build_tiny_model(tmp_path / "m.onnx", per_scale=True)
    today = Detector(model)
    expected = today(frames)
    today.close()
    now = json.loads(sidecar_path(model).read_text())
    v1_fields = ("backbone", "image_size", "input_format", "input_name", "mean", "std", "resize_mode",
                 "smoothing_in_graph", "per_scale_outputs", "sigma", "batch_range", "precision", "opset",
                 "checkpoint_sha256", "onnx_sha256", "teacher_weights", "format")
    old = {**{k: now[k] for k in v1_fields}, "format_version": 1, "threshold": THRESHOLD,
           "score_norm": {"good_mean": 0.01},
           "extra": {"calibration": {"threshold_method": "quantile", "quantile": 0.99}},
           "outputs": {"scale2": "stride 16", "scale0": "stride 4", "scale1": "stride 8"}}   # any key order
    sidecar_path(model).write_text(json.dumps(old))
    meta = ModelMetadata.load(sidecar_path(model))
    assert meta.format_version == 2 and meta.per_scale_outputs and meta.threshold == THRESHOLD
    assert meta.calibration.method == "quantile" and meta.calibration.quantile == 0.99
    assert meta.outputs.scales == ("scale0", "scale1", "scale2")
    assert meta.outputs.anomaly_map is None and meta.outputs.score is None
    assert meta.outputs.descriptions["scale1"] == "stride 8"
    detector = Detector(model)
    result = detector(frames)
    detector.close()
    np.testing.assert_array_equal(result.scores, expected.scores)
    assert result.decisions.tolist() == expected.decisions.tolist()
    meta.save(tmp_path / "again.json")          # written back in today's layout, read back the same
    assert ModelMetadata.load(tmp_path / "again.json").outputs == meta.outputs


def test_missing_sidecar_without_embedded_metadata(tmp_path):
    model = build_tiny_model(tmp_path / "m.onnx")
    sidecar_path(model).unlink()
    with pytest.raises(MetadataError, match="m.onnx.json"):
        Detector(model)


def test_engine_sidecar_for_another_tensorrt_or_gpu_is_refused(tmp_path):
    """The exporter's engine_metadata writes, the runtime's loader and check read (the one check
    the TensorRT backend calls before deserialising); a version-1 sidecar as the old export wrote it
    (build details nested under extra.tensorrt) is migrated and checked the same way."""
    import json
    from mrkd.export.engine_meta import engine_metadata
    from mrkd.runtime.metadata import EngineIncompatibleError, ModelMetadata, check_engine_compatible
    onnx_meta = ModelMetadata.load(sidecar_path(build_tiny_model(tmp_path / "m.onnx")))
    written = engine_metadata(onnx_meta, trt_version="10.3.0", gpu_name="Orin", compute_capability="8.7",
                              profile=(1, 2, 4), precision="fp16", engine_sha256="ab" * 32)
    written.save(tmp_path / "m.engine.json")
    loaded = ModelMetadata.load(tmp_path / "m.engine.json")
    assert loaded.engine == written.engine and loaded.model_sha256 == "ab" * 32
    check_engine_compatible(loaded, "10.3.0", "Orin", "8.7")
    with pytest.raises(EngineIncompatibleError, match=r"TensorRT 10\.3\.0 \(here 10\.7\.0\)"):
        check_engine_compatible(loaded, "10.7.0", "Orin", "8.7")
    with pytest.raises(EngineIncompatibleError, match=r"compute capability 8\.7 \(here 9\.0\)"):
        check_engine_compatible(loaded, "10.3.0", "Orin", "9.0")
    old = {**json.loads((tmp_path / "m.engine.json").read_text()), "format_version": 1, "engine": None,
           "threshold": 0.1, "extra": {"tensorrt": {"version": "10.3.0", "gpu_name": "Orin",
                                                    "compute_capability": "8.7", "profile": [1, 2, 4],
                                                    "precision": "fp16", "onnx_sha256": None}}}
    (tmp_path / "v1.engine.json").write_text(json.dumps(old))
    migrated = ModelMetadata.load(tmp_path / "v1.engine.json")
    assert migrated.engine.trt_version == "10.3.0" and migrated.threshold == 0.1
    with pytest.raises(EngineIncompatibleError, match="GPU 'Orin'"):
        check_engine_compatible(migrated, "10.3.0", "NVIDIA H100", "8.7", source="v1.engine.json")
