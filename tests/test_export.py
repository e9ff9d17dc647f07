"""FP32 export: parity with PyTorch, graph variants, in-graph smoothing vs scipy, metadata, CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.ndimage import gaussian_filter

from mrkd.export import ExportOptions, export_onnx, parity_report, read_onnx_props
from mrkd.export.cli import export_command
from mrkd.runtime.metadata import ModelMetadata, sidecar_path
from export_fixtures import IMAGE_SIZE, run_onnx, small_model


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("exports")


_EXPORTS = {}


def _export(model, folder, **options):
    """Export once per option set for the whole module (tracing dominates these tests' time)."""
    key = tuple(sorted(options.items()))
    if key not in _EXPORTS:
        opts = ExportOptions(**options)
        path = folder / f"m{len(_EXPORTS)}.onnx"
        _EXPORTS[key] = export_onnx(model, path, opts, checkpoint_sha256="ab" * 32, simplify="never"), opts
    return _EXPORTS[key]


def test_fp32_parity_small_model_and_dynamic_batch(model, export_dir):
    exported, opts = _export(model, export_dir)
    report = parity_report(model, exported.path, opts).check()
    assert report.map_max_abs_diff < 1e-4 and report.decision_agreement == 1.0
    # Batch 3 (not the traced batch 1) runs and matches the model's own API.
    x = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    out = run_onnx(exported.path, x.numpy())
    expected = model.anomaly_map(x)
    assert out["anomaly_map"].shape == (3, 1, IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_allclose(out["anomaly_map"], expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(out["score"], expected.flatten(1).amax(1).numpy(), atol=1e-4)


def test_parity_report_fails_on_a_wrong_graph(model, export_dir):
    exported, opts = _export(model, export_dir)
    other = small_model(seed=1)                     # a different model: the graph is not its export
    report = parity_report(other, exported.path, opts)
    assert not report.passed
    with pytest.raises(AssertionError, match="FAIL"):
        report.check()


def test_uint8_input_matches_numpy_preprocessing(model, export_dir):
    exported, _ = _export(model, export_dir, uint8_input=True)
    frames = np.random.default_rng(0).integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    # Independent pre-processing written here: BGR->RGB, /255, (x-mean)/std, HWC->CHW.
    rgb = frames[..., ::-1].astype(np.float64) / 255.0
    x = ((rgb - np.array(model.config.mean)) / np.array(model.config.std)).transpose(0, 3, 1, 2)
    expected = model.anomaly_map(torch.from_numpy(x.astype(np.float32))).numpy()
    out = run_onnx(exported.path, frames)
    assert out["anomaly_map"].shape == expected.shape
    np.testing.assert_allclose(out["anomaly_map"], expected, atol=1e-4)


def test_per_scale_outputs_match_pytorch(model, export_dir):
    exported, _ = _export(model, export_dir, per_scale_outputs=True)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    out = run_onnx(exported.path, x.numpy())
    assert sorted(out) == ["scale0", "scale1", "scale2"]
    for i, ref in enumerate(model.per_scale_maps(x)):
        side = IMAGE_SIZE // (4 * 2 ** i)
        assert out[f"scale{i}"].shape == (2, side, side)
        np.testing.assert_allclose(out[f"scale{i}"], ref.numpy(), atol=1e-5)
    assert exported.metadata.per_scale_outputs and not exported.metadata.smoothing_in_graph
    assert exported.metadata.outputs.scales == ("scale0", "scale1", "scale2")


def test_in_graph_smoothing_equals_scipy_gaussian_filter(model, export_dir):
    smooth, _ = _export(model, export_dir)
    raw, _ = _export(model, export_dir, smooth_in_graph=False)
    x = np.random.default_rng(1).standard_normal((2, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    unsmoothed = run_onnx(raw.path, x)
    assert list(unsmoothed) == ["anomaly_map"]      # no score from an unsmoothed map
    smoothed = run_onnx(smooth.path, x)
    reference = np.stack([gaussian_filter(m[0].astype(np.float64), sigma=model.config.sigma, mode="reflect",
                                          truncate=4.0) for m in unsmoothed["anomaly_map"]])
    np.testing.assert_allclose(smoothed["anomaly_map"][:, 0], reference, atol=1e-5)
    np.testing.assert_allclose(smoothed["score"], reference.reshape(2, -1).max(1), atol=1e-5)
    assert not raw.metadata.smoothing_in_graph and smooth.metadata.smoothing_in_graph


def test_metadata_round_trip_props_and_sidecar(model, export_dir):
    import hashlib
    exported, _ = _export(model, export_dir, uint8_input=True, batch_range=(1, 2, 8))
    from_sidecar = ModelMetadata.load(sidecar_path(exported.path))
    from_props = ModelMetadata.from_onnx_props(read_onnx_props(exported.path))
    assert from_sidecar.onnx_sha256 == hashlib.sha256(exported.path.read_bytes()).hexdigest()
    assert from_props.onnx_sha256 is None           # a file cannot contain its own hash
    for meta in (from_sidecar, from_props):
        assert meta.backbone == "resnet18" and meta.image_size == IMAGE_SIZE
        assert meta.input_format == "uint8_nhwc_bgr" and meta.threshold == 3.0
        assert meta.score_norm == {"good_min": 2.5, "good_mean": 2.9}   # quantile is not a score statistic
        assert meta.batch_range == (1, 2, 8) and meta.precision == "fp32" and meta.opset == 17
        assert meta.checkpoint_sha256 == "ab" * 32 and meta.sigma == model.config.sigma
        assert set(meta.outputs.names) == {"anomaly_map", "score"}
    graph_outputs = {o.name for o in __import__("onnx").load(str(exported.path)).graph.output}
    assert graph_outputs == set(from_sidecar.outputs.names)


def test_per_scale_export_is_read_by_the_runtime_as_typed_outputs(model, export_dir):
    """The exporter writes the per-scale layout; the runtime's loader gives the names by role, in the
    graph's output order, and the Detector finishes exactly those maps (scores as PyTorch's)."""
    import onnx
    from mrkd.runtime import Detector
    exported, _ = _export(model, export_dir, per_scale_outputs=True)
    on_disk = json.loads(sidecar_path(exported.path).read_text())["outputs"]
    assert sorted(on_disk) == ["scale0", "scale1", "scale2"] and all(on_disk.values())   # described for people
    graph_order = tuple(o.name for o in onnx.load(str(exported.path)).graph.output)
    detector = Detector(exported.path, threshold=1.0)
    outputs = detector.metadata.outputs
    assert outputs.scales == graph_order and outputs.anomaly_map is None and outputs.score is None
    assert outputs == ModelMetadata.from_onnx_props(read_onnx_props(exported.path)).outputs
    frames = np.random.default_rng(3).integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    result = detector(frames)
    detector.close()
    with torch.no_grad():
        expected = model.anomaly_map(torch.from_numpy(detector.preprocess(list(frames)))).numpy()
    np.testing.assert_allclose(result.scores, expected.reshape(2, -1).max(1), rtol=1e-3, atol=1e-3)


def test_simplify_always_keeps_outputs(model, export_dir):
    import onnx
    from mrkd.export import maybe_simplify
    exported, opts = _export(model, export_dir)
    proto = onnx.load(str(exported.path))
    batch = np.random.default_rng(2).standard_normal((1, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    slim, record = maybe_simplify(proto, batch, "always", repeats=1)
    assert record["kept"] and len(slim.graph.node) == record["nodes_after"] < record["nodes_before"]
    assert record["max_output_change"] <= 1e-5
    out = run_onnx(exported.path, batch)["anomaly_map"]
    from mrkd.runtime.backends.onnxruntime_backend import ort_session
    session = ort_session(slim.SerializeToString(), ["cpu"])
    np.testing.assert_allclose(session.run(["anomaly_map"], {"input": batch})[0], out, atol=1e-5)
    unchanged, never = maybe_simplify(proto, batch, "never")
    assert unchanged is proto and not never["kept"]


def test_cli_missing_and_corrupt_checkpoint(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(export_command, [str(tmp_path / "nope.pt"), "-o", str(tmp_path / "out")])
    assert missing.exit_code != 0 and "nope.pt" in missing.output
    assert "not found" in missing.output or "does not exist" in missing.output   # click checks the path now
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    result = runner.invoke(export_command, [str(corrupt), "-o", str(tmp_path / "out")])
    assert result.exit_code != 0 and "corrupt.pt" in result.output
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_cli_rejects_low_opset_and_bad_batch(tmp_path):
    ckpt = tmp_path / "ck.pt"
    small_model().save(ckpt)
    runner = CliRunner()
    result = runner.invoke(export_command, [str(ckpt), "-o", str(tmp_path / "o"), "--opset", "16"])
    assert result.exit_code != 0 and "opset 16" in result.output and ">= 17" in result.output
    result = runner.invoke(export_command, [str(ckpt), "-o", str(tmp_path / "o"), "--batch", "4:2:8"])
    assert result.exit_code != 0 and "4:2:8" in result.output


def test_cli_export_writes_model_and_prints_parity(tmp_path):
    ckpt = tmp_path / "ck.pt"
    small_model().save(ckpt)
    result = CliRunner().invoke(export_command, [str(ckpt), "-o", str(tmp_path / "out"), "--batch", "1:2:4",
                                                 "--simplify", "never"])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "map max |diff|" in result.output
    meta = json.loads((tmp_path / "out" / "model.onnx.json").read_text())
    assert meta["batch_range"] == [1, 2, 4]
    assert len(meta["checkpoint_sha256"]) == 64


@pytest.mark.slow
def test_fp32_parity_wide_resnet50_256(tmp_path):
    import warnings
    from mrkd.train.model import build_model
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = build_model("wide_resnet50_2", "random", image_size=256).eval()
    opts = ExportOptions()
    exported = export_onnx(big, tmp_path / "wrn.onnx", opts, simplify="never")
    report = parity_report(big, exported.path, opts)
    print(report.format())
    assert report.check().map_max_abs_diff < 1e-4


def test_cli_fails_and_removes_graph_when_parity_fails(tmp_path, monkeypatch):
    import mrkd.export.pipeline as pipeline
    ckpt = tmp_path / "ck.pt"
    small_model().save(ckpt)
    other = small_model(seed=1)
    real_report = pipeline.parity_report
    # Compare the export against a *different* model, as a broken exporter would look.
    monkeypatch.setattr(pipeline, "parity_report",
                        lambda model, path, opts, **kwargs: real_report(other, path, opts, **kwargs))
    result = CliRunner().invoke(export_command, [str(ckpt), "-o", str(tmp_path / "out"), "--simplify", "never"])
    assert result.exit_code == 1 and "FP32 parity failed" in result.output and "FAIL" in result.output
    assert not (tmp_path / "out" / "model.onnx").exists()
    assert not (tmp_path / "out" / "model.onnx.json").exists()


@pytest.mark.parametrize("stop, code, by", [(KeyboardInterrupt, 130, "Ctrl-C"), ("sigterm", 143, "SIGTERM")])
def test_export_stopped_before_its_parity_check_ends_removes_the_unchecked_graph(tmp_path, monkeypatch, stop,
                                                                               code, by):
    """Stopped while FP32 parity ran, the export left the new model.onnx and its sidecar in place, never
    checked against PyTorch, and said click's 'Aborted!' with exit 1. Now the pair is removed as on a
    failed check, and the command ends as train and refit do: one line, 130 / 143."""
    import mrkd.export.pipeline as pipeline
    from mrkd.stopping import Terminated
    ckpt = tmp_path / "ck.pt"
    small_model().save(ckpt)

    def stopped(model, path, *args, **kwargs):
        assert path.exists() and path.parent.parent == tmp_path / "out"     # written in the staging folder
        raise Terminated() if stop == "sigterm" else stop()

    monkeypatch.setattr(pipeline, "parity_report", stopped)
    result = CliRunner().invoke(export_command, [str(ckpt), "-o", str(tmp_path / "out"), "--simplify", "never"])
    assert result.exit_code == code, result.output
    assert f"export stopped ({by})" in result.output and "Aborted!" not in result.output
    assert not (tmp_path / "out" / "model.onnx").exists()
    assert not (tmp_path / "out" / "model.onnx.json").exists()
    assert not (tmp_path / "out").exists()          # made for this export, removed with its staging folder


def test_the_export_pipeline_passes_its_metadata_along(tmp_path, monkeypatch):
    """export_checkpoint hands each step the metadata the step before wrote: the sidecars are written,
    never read back (they used to be reloaded by every report), and what was passed is what is on disk."""
    from mrkd.export.pipeline import export_checkpoint
    ckpt = tmp_path / "ck.pt"
    small_model().save(ckpt)
    loaded = []
    original = ModelMetadata.load.__func__
    monkeypatch.setattr(ModelMetadata, "load", classmethod(lambda cls, path: loaded.append(path) or
                                                           original(cls, path)))
    result = export_checkpoint(ckpt, tmp_path / "out", ExportOptions(batch_range=(1, 1, 2)), engine=False,
                               triton_dir=tmp_path / "triton", simplify="never", echo=lambda line: None)
    assert loaded == []
    monkeypatch.undo()
    on_disk = ModelMetadata.load(sidecar_path(result.files["onnx"]))
    triton_copy = ModelMetadata.load(tmp_path / "triton" / "mrkd" / "1" / "model.onnx.json")
    assert on_disk == triton_copy and on_disk.onnx_sha256 is not None and result.reports["parity"].passed


def test_the_same_checkpoint_exported_twice_is_the_same_file_and_one_triton_version(tmp_path):
    """The graph's embedded metadata held onnxslim's timings, so every export of one checkpoint was
    another file (another hash, another Triton version). The timings are printed, not recorded."""
    import hashlib
    from mrkd.export.pipeline import export_checkpoint
    ckpt = tmp_path / "ck.pt"
    small_model().save(ckpt)
    lines = []
    for out in ("a", "b"):
        export_checkpoint(ckpt, tmp_path / out, ExportOptions(batch_range=(1, 1, 2)), engine=False,
                          triton_dir=tmp_path / "triton", simplify="always", echo=lines.append)
    digest = [hashlib.sha256((tmp_path / out / "model.onnx").read_bytes()).hexdigest() for out in ("a", "b")]
    assert digest[0] == digest[1]
    assert sorted(p.name for p in (tmp_path / "triton" / "mrkd").iterdir()) == ["1", "config.pbtxt"]
    recorded = ModelMetadata.load(sidecar_path(tmp_path / "a" / "model.onnx")).extra["onnxslim"]
    assert recorded["mode"] == "always" and "nodes_after" in recorded and not any("latency" in k for k in recorded)
    assert sum("onnxslim: kept" in line and " ms)" in line for line in lines) == 2      # timings still shown


def test_an_opset_newer_than_the_installed_libraries_is_refused_in_one_line(tmp_path, monkeypatch):
    """--opset 24 (past what torch's exporter writes) ended in torch's traceback 'Unsupported
    onnx_opset_version'; now one line names the range this installation supports, before any work."""
    import mrkd.export.onnx_graph as onnx_graph
    highest, _ = onnx_graph.max_opset()
    ckpt = tmp_path / "ck.pt"
    ckpt.write_bytes(b"")          # the options are checked before the checkpoint is read
    for opset in (highest + 1, 999):
        result = CliRunner().invoke(export_command, [str(ckpt), "-o", str(tmp_path / "o"), "--opset", str(opset)])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert f"opset {opset} is not supported here" in result.output and f"17 to {highest}" in result.output
    assert not (tmp_path / "o").exists()
    # ONNX Runtime's own limit counts too (every export's parity check runs on it)
    monkeypatch.setattr(onnx_graph, "_ort_loads_opset", lambda onnx, opset: opset <= 18)
    onnx_graph.max_opset.cache_clear()
    try:
        highest, limits = onnx_graph.max_opset()
        assert highest == 18 and "onnxruntime" in limits and "up to 18" in limits
    finally:
        monkeypatch.undo()
        onnx_graph.max_opset.cache_clear()
