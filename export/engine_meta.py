"""TensorRT engine sidecar (``model.engine.json``): the model's metadata plus where the engine was built.

A serialized engine only runs on the TensorRT version and GPU it was built for. ``check_engine_compatible``
here takes a sidecar path or metadata and runs the one check, mrkd.runtime.metadata.check_engine_compatible,
which the TensorRT backend also calls before deserialising.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence

from mrkd.runtime.metadata import (EngineBuild, EngineIncompatibleError, ModelMetadata,  # noqa: F401
                                   check_engine_compatible as _check)


def engine_metadata(onnx_meta: ModelMetadata, *, trt_version: str, gpu_name: str, compute_capability: str,
                    profile: Sequence[int], precision: str, builder: Optional[Dict] = None,
                    engine_sha256: Optional[str] = None) -> ModelMetadata:
    """The engine's sidecar: the ONNX model's metadata (onnx_sha256 names the source graph) plus an
    ``engine`` record with TensorRT version, GPU, compute capability, profile and build settings."""
    built = EngineBuild(trt_version=str(trt_version), gpu_name=str(gpu_name),
                        compute_capability=str(compute_capability), profile=tuple(int(v) for v in profile),
                        precision=precision, onnx_sha256=onnx_meta.onnx_sha256, engine_sha256=engine_sha256,
                        **(builder or {}))
    return dataclasses.replace(onnx_meta, precision=precision, batch_range=tuple(int(v) for v in profile),
                               engine=built)


def check_engine_compatible(sidecar, trt_version: str, gpu_name: str, compute_capability: str) -> ModelMetadata:
    """Raise EngineIncompatibleError unless the engine described by ``sidecar`` (a path or ModelMetadata)
    was built with this TensorRT version on a GPU of this name and compute capability. The same check
    (mrkd.runtime.metadata.check_engine_compatible) runs in the runtime before an engine is loaded."""
    meta = sidecar if isinstance(sidecar, ModelMetadata) else ModelMetadata.load(sidecar)
    source = "engine metadata" if isinstance(sidecar, ModelMetadata) else str(sidecar)
    return _check(meta, trt_version, gpu_name, compute_capability, source=source)
