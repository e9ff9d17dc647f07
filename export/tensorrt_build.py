"""TensorRT engine building (TensorRT 10+ Python API), imported lazily.

Steps, each a small function: network from the ONNX parser (strongly typed: the graph's own FP16 /
FP32 / Q/DQ types decide precision) → builder config (one batch profile, workspace pool, optimisation
level, timing cache, optional DLA with GPU fallback) → serialized engine written atomically → sidecar.
See mrkd.export.fp16.TENSORRT_SUPPORT for supported versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

from mrkd.atomic import atomic_write_bytes
from mrkd.export.engine_meta import check_engine_compatible, engine_metadata
from mrkd.export.onnx_graph import ExportError, check_batch_range
from mrkd.runtime.metadata import ModelMetadata, file_sha256, sidecar_path

MIN_TENSORRT = (10, 3)
NO_TENSORRT_HINT = ("TensorRT is not available here, so no engine was built (the ONNX model is written). "
                    "To build the engine: on Jetson install JetPack 6 (TensorRT 10.3+); on x86 with an "
                    "NVIDIA GPU `pip install 'mrkd[tensorrt]'` (the tensorrt wheel), then re-run this export.")


class TensorRTUnavailableError(ExportError):
    """TensorRT (or a GPU) is missing; the message says how to get it."""


@dataclass
class BuildSettings:
    """Builder settings (all recorded in the engine sidecar)."""

    workspace_mib: int = 2048
    opt_level: int = 3                      # TensorRT's default builder optimisation level
    timing_cache: Optional[str] = None      # loaded if present, saved after the build
    dla_core: Optional[int] = None          # DLA core with GPU fallback (Jetson Orin/Xavier)


def require_tensorrt():
    """Import tensorrt (>= 10.3) or raise TensorRTUnavailableError with install instructions."""
    from mrkd.deps import MissingDependencyError, require
    try:
        trt = require("tensorrt")
    except MissingDependencyError as exc:
        raise TensorRTUnavailableError(f"{NO_TENSORRT_HINT}\n  ({exc})") from exc
    version = tuple(int(p) for p in trt.__version__.split(".")[:2])
    if version < MIN_TENSORRT:
        raise TensorRTUnavailableError(f"TensorRT {trt.__version__} is too old: mrkd builds strongly typed "
                                       f"networks, which need TensorRT >= {MIN_TENSORRT[0]}.{MIN_TENSORRT[1]}")
    return trt


def tensorrt_unavailable_reason() -> Optional[str]:
    """None when an engine can be built here (TensorRT >= 10.3 and an NVIDIA GPU), else why not, in
    words ("TensorRT is not installed here ...", "no NVIDIA GPU / CUDA driver found ...")."""
    from mrkd.deps import available
    if not available("tensorrt"):
        return "TensorRT is not installed here"
    try:
        require_tensorrt()
        gpu_identity()
    except TensorRTUnavailableError as exc:
        return str(exc).splitlines()[0]
    return None


def network_from_onnx(trt, builder, logger, onnx_path):
    """(network, parser) for ``onnx_path``, strongly typed (explicit batch is TensorRT 10's only mode)."""
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    return network, parser


def builder_config(trt, builder, network, batch_range: Sequence[int], settings: BuildSettings):
    """Config with one optimisation profile over the batch range and the settings' limits."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_mib) << 20)
    config.builder_optimization_level = int(settings.opt_level)
    lo, opt, hi = check_batch_range(batch_range)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (lo, *rest), (opt, *rest), (hi, *rest))
    config.add_optimization_profile(profile)
    if settings.dla_core is not None:
        if builder.num_DLA_cores <= settings.dla_core:
            raise ExportError(f"--dla-core {settings.dla_core}: this device has {builder.num_DLA_cores} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(settings.dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    return config


def _attach_timing_cache(config, path: Optional[str]):
    data = Path(path).read_bytes() if path and Path(path).is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def gpu_identity() -> Tuple[str, str]:
    """(GPU name, compute capability "major.minor") of device 0 (runtime.gpu, what the runtime checks)."""
    from mrkd.runtime.gpu import NoGpuError
    from mrkd.runtime.gpu import gpu_identity as device_identity
    try:
        return device_identity(0)
    except NoGpuError as exc:
        raise TensorRTUnavailableError(f"{exc}: TensorRT engines must be built on the device that will run "
                                       "them") from None


def build_engine(onnx_path, engine_path, settings: Optional[BuildSettings] = None,
                 batch_range: Optional[Sequence[int]] = None,
                 onnx_metadata: Optional[ModelMetadata] = None) -> ModelMetadata:
    """Build a TensorRT engine from an mrkd ONNX model; writes ``engine_path`` and its ``.json`` sidecar.

    Precision comes from the graph (fp32, fp16 with FP32 head, or Q/DQ int8), read from its sidecar."""
    trt = require_tensorrt()
    settings = settings or BuildSettings()
    onnx_meta = onnx_metadata or ModelMetadata.load(sidecar_path(onnx_path))   # the export passes its own
    batch_range = tuple(batch_range or onnx_meta.batch_range)
    gpu_name, capability = gpu_identity()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = network_from_onnx(trt, builder, logger, onnx_path)
    config = builder_config(trt, builder, network, batch_range, settings)
    cache = _attach_timing_cache(config, settings.timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    atomic_write_bytes(engine_path, bytes(serialized))
    if settings.timing_cache:
        atomic_write_bytes(settings.timing_cache, bytes(cache.serialize()))
    meta = engine_metadata(onnx_meta, trt_version=trt.__version__, gpu_name=gpu_name,
                           compute_capability=capability, profile=batch_range, precision=onnx_meta.precision,
                           builder={"strongly_typed": True, "workspace_mib": settings.workspace_mib,
                                    "opt_level": settings.opt_level, "dla_core": settings.dla_core},
                           engine_sha256=file_sha256(engine_path))
    meta.save(sidecar_path(engine_path))
    # The sidecar is read back through the runtime's own loader and check: what the runtime will see.
    check_engine_compatible(sidecar_path(engine_path), trt.__version__, gpu_name, capability)
    return meta
