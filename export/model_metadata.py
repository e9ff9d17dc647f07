"""Fill mrkd.runtime.metadata.ModelMetadata for an export and write it into the ONNX file and sidecar."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from mrkd.export.onnx_graph import INPUT_NAME, ExportOptions, graph_outputs, has_knn_map, save_onnx, set_metadata_props
from mrkd.runtime.calibration import Calibration
from mrkd.runtime.metadata import ModelMetadata, file_sha256, sidecar_path  # noqa: F401 (file_sha256 re-exported)


def build_metadata(model, options: ExportOptions, *, precision: Optional[str] = None,
                   checkpoint_sha256: Optional[str] = None, extra: Optional[Dict] = None) -> ModelMetadata:
    """The metadata of an export of ``model`` (an MRKD) with ``options``; onnx_sha256 is set on save."""
    config = model.config
    calibration = Calibration.of(model.calibration, "checkpoint calibration")
    meta = ModelMetadata(
        backbone=config.backbone,
        image_size=int(config.image_size),
        input_format=options.input_format,
        input_name=INPUT_NAME,
        mean=tuple(float(v) for v in config.mean),
        std=tuple(float(v) for v in config.std),
        resize_mode=config.resize_mode,
        calibration=calibration,
        outputs=graph_outputs(options, int(config.image_size), float(config.sigma), has_knn_map(model)),
        smoothing_in_graph=bool(options.smooth_in_graph and not options.per_scale_outputs),
        per_scale_outputs=bool(options.per_scale_outputs),
        sigma=float(config.sigma),
        batch_range=tuple(int(v) for v in options.batch_range),
        precision=precision or options.precision,
        opset=int(options.opset),
        checkpoint_sha256=checkpoint_sha256,
        teacher_weights=config.teacher_weights,
        extra=dict(extra or {}),
    )
    meta.validate("export")
    return meta


def write_model(proto, path, meta: ModelMetadata) -> ModelMetadata:
    """Write the ONNX model with ``meta`` in its metadata_props, then the sidecar ``<path>.json``.

    The ONNX file cannot hold its own hash, so its props carry onnx_sha256=None; the sidecar (and
    the returned metadata) carry the sha256 of the file as written.
    """
    meta.onnx_sha256 = None
    set_metadata_props(proto, meta.to_onnx_props())
    save_onnx(proto, path)
    meta.onnx_sha256 = file_sha256(path)
    meta.save(sidecar_path(path))
    return meta
