"""TensorRT: engine compatibility checks (pure Python), the no-TensorRT path, and a real build where possible."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mrkd.deps import available
from mrkd.export import (EngineIncompatibleError, ExportOptions, check_engine_compatible, engine_metadata,
                         export_onnx)
from mrkd.export.cli import EXIT_NO_TENSORRT, export_command
from mrkd.runtime.metadata import ModelMetadata, sidecar_path
from export_fixtures import small_model


def _has_gpu() -> bool:
    try:
        from mrkd.export.tensorrt_build import gpu_identity
        gpu_identity()
        return True
    except Exception:
        return False


HAS_TENSORRT = available("tensorrt")
needs_tensorrt = pytest.mark.skipif(not (HAS_TENSORRT and _has_gpu()), reason="needs TensorRT and an NVIDIA GPU")


def _engine_sidecar(tmp_path):
    meta = ModelMetadata(backbone="resnet18", image_size=64, onnx_sha256="cd" * 32)
    engine_meta = engine_metadata(meta, trt_version="10.3.0", gpu_name="Orin", compute_capability="8.7",
                                  profile=(1, 2, 4), precision="fp16")
    path = tmp_path / "model.engine.json"
    engine_meta.save(path)
    return path


def test_engine_sidecar_records_build(tmp_path):
    loaded = ModelMetadata.load(_engine_sidecar(tmp_path))
    assert loaded.precision == "fp16" and loaded.batch_range == (1, 2, 4)
    assert (loaded.engine.trt_version, loaded.engine.gpu_name, loaded.engine.compute_capability) == ("10.3.0", "Orin", "8.7")
    assert loaded.engine.profile == (1, 2, 4) and loaded.engine.precision == "fp16"
    assert loaded.engine.onnx_sha256 == "cd" * 32


def test_check_engine_compatible(tmp_path):
    sidecar = _engine_sidecar(tmp_path)
    assert check_engine_compatible(sidecar, "10.3.0", "Orin", "8.7").backbone == "resnet18"
    with pytest.raises(EngineIncompatibleError, match=r"TensorRT 10\.3\.0 \(here 10\.7\.0\).*rebuild on this device"):
        check_engine_compatible(sidecar, "10.7.0", "Orin", "8.7")
    with pytest.raises(EngineIncompatibleError, match=r"compute capability 8\.7 \(here 8\.9\)"):
        check_engine_compatible(sidecar, "10.3.0", "Orin", "8.9")
    with pytest.raises(EngineIncompatibleError, match="GPU 'Orin'"):
        check_engine_compatible(sidecar, "10.3.0", "RTX 4090", "8.7")
    plain = tmp_path / "model.onnx.json"
    ModelMetadata(backbone="resnet18", image_size=64).save(plain)
    with pytest.raises(EngineIncompatibleError, match="not an engine sidecar"):
        check_engine_compatible(plain, "10.3.0", "Orin", "8.7")


@pytest.mark.slow
@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the no-TensorRT path cannot be shown")
def test_fp16_without_tensorrt_writes_onnx_and_exits_with_instructions(tmp_path):
    ckpt = tmp_path / "ck.pt"
    small_model().save(ckpt)
    out = tmp_path / "out"
    result = CliRunner().invoke(export_command, [str(ckpt), "-o", str(out), "--fp16", "--simplify", "never"])
    assert result.exit_code == EXIT_NO_TENSORRT
    assert "JetPack" in result.output and "pip install" in result.output
    # one line, as every error: the reason and the install hint were three lines after "Error:"
    (error,) = [line for line in result.output.splitlines() if "Error:" in line]
    assert error.startswith("Error: TensorRT is not available here") and "No module named" in error \
        and "pip install" in error, result.output
    assert (out / "model.onnx").is_file() and (out / "model_fp16.onnx").is_file()
    assert ModelMetadata.load(out / "model_fp16.onnx.json").precision == "fp16"
    assert not (out / "model.engine").exists()


@needs_tensorrt
@pytest.mark.tensorrt
def test_real_fp16_engine_build(tmp_path):
    import tensorrt as trt
    from mrkd.export import BuildSettings, build_engine, fp16_options
    from mrkd.export.tensorrt_build import gpu_identity
    exported = export_onnx(small_model(), tmp_path / "m16.onnx", fp16_options(ExportOptions()), simplify="never")
    cache = tmp_path / "timing.cache"
    meta = build_engine(exported.path, tmp_path / "model.engine",
                        BuildSettings(workspace_mib=512, opt_level=1, timing_cache=str(cache)), (1, 1, 2))
    assert cache.is_file() and meta.precision == "fp16"
    name, capability = gpu_identity()
    check_engine_compatible(sidecar_path(tmp_path / "model.engine"), trt.__version__, name, capability)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine((tmp_path / "model.engine").read_bytes())
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    assert names == {"input", "anomaly_map", "score"}
    assert engine.get_tensor_dtype("anomaly_map") == trt.float32
