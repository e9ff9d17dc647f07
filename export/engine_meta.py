"""TensorRT engine sidecar (``model.engine.json``): the model's metadata plus where the engine was built.

A serialized engine only runs on the TensorRT version and GPU it was built for;
``check_engine_compatible`` is what the runtime calls before deserialising.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence

from mrkd.runtime.metadata import MetadataError, ModelMetadata


class EngineIncompatibleError(MetadataError):
    """The engine was built for another TensorRT version or GPU; rebuild it on this device."""


def engine_metadata(onnx_meta: ModelMetadata, *, trt_version: str, gpu_name: str, compute_capability: str,
                    profile: Sequence[int], precision: str, builder: Optional[Dict] = None) -> ModelMetadata:
    """The engine's sidecar: the ONNX model's metadata (onnx_sha256 names the source graph) plus a
    ``tensorrt`` entry in ``extra`` with version, GPU, compute capability, profile and build settings."""
    extra = dict(onnx_meta.extra)
    extra["tensorrt"] = {"version": str(trt_version), "gpu_name": str(gpu_name),
                         "compute_capability": str(compute_capability), "profile": [int(v) for v in profile],
                         "precision": precision, "onnx_sha256": onnx_meta.onnx_sha256, **(builder or {})}
    return dataclasses.replace(onnx_meta, precision=precision, batch_range=tuple(int(v) for v in profile),
                               extra=extra)


def check_engine_compatible(sidecar, trt_version: str, gpu_name: str, compute_capability: str) -> ModelMetadata:
    """Raise EngineIncompatibleError unless the engine described by ``sidecar`` (a path or ModelMetadata)
    was built with this TensorRT version on a GPU of this name and compute capability."""
    meta = sidecar if isinstance(sidecar, ModelMetadata) else ModelMetadata.load(sidecar)
    built = meta.extra.get("tensorrt")
    source = "engine metadata" if isinstance(sidecar, ModelMetadata) else str(sidecar)
    if not built:
        raise EngineIncompatibleError(f"{source}: no 'tensorrt' entry: not an engine sidecar written by mrkd export")
    mismatches = []
    if str(built.get("version")) != str(trt_version):
        mismatches.append(f"TensorRT {built.get('version')} (here {trt_version})")
    if str(built.get("compute_capability")) != str(compute_capability):
        mismatches.append(f"compute capability {built.get('compute_capability')} (here {compute_capability})")
    if str(built.get("gpu_name")) != str(gpu_name):
        mismatches.append(f"GPU {built.get('gpu_name')!r} (here {gpu_name!r})")
    if mismatches:
        raise EngineIncompatibleError(
            f"{source}: the engine was built for {'; '.join(mismatches)}. TensorRT engines are tied to the "
            f"TensorRT version and GPU: rebuild on this device with `mrkd export CHECKPOINT --fp16` "
            f"(or --int8 --calib DIR), or build from the ONNX model with mrkd.export.build_engine.")
    return meta
