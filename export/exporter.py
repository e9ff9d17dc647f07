"""Export steps that take a model and write files: checkpoint → model, model → ONNX + metadata."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from mrkd.export.model_metadata import build_metadata, file_sha256, write_model
from mrkd.export.onnx_graph import ExportOptions, trace_to_onnx
from mrkd.export.parity import parity_inputs
from mrkd.export.simplify import maybe_simplify
from mrkd.runtime.metadata import ModelMetadata


@dataclass
class ExportedModel:
    """One written model file and what describes it."""

    path: Path
    metadata: ModelMetadata
    simplify: Dict[str, object]


def load_model(checkpoint) -> Tuple[object, str]:
    """(MRKD in eval mode, checkpoint sha256). Missing/corrupt files raise CheckpointError naming the path.
    A refit checkpoint's lineage rides along as ``model.lineage`` (export_onnx writes it into the sidecar),
    the checkpoint's record of its training data as ``model.trained_on`` (None in files that have none)."""
    from mrkd.train.checkpoint import TRAINED_ON, model_from_dict, read_checkpoint
    from mrkd.train.refit import LINEAGE_KEY
    data = read_checkpoint(checkpoint)
    model = model_from_dict(data, source=str(checkpoint))
    model.lineage = data.get(LINEAGE_KEY)
    model.trained_on = data.get(TRAINED_ON)     # where the INT8 check finds held-out defect images
    return model.eval(), file_sha256(checkpoint)


def export_onnx(model, path, options: ExportOptions, *, checkpoint_sha256: Optional[str] = None,
                simplify: str = "auto") -> ExportedModel:
    """Trace ``model`` with ``options`` to ``path`` (+ ``path``.json sidecar), simplifying when it helps."""
    options.validate()
    proto = trace_to_onnx(model, options)
    # Slimming is measured on the graph's own input type; fp16 graphs are slimmed too (types are kept).
    batch = parity_inputs(model.config.image_size, options, n=1)
    proto, record = maybe_simplify(proto, batch, simplify)
    from mrkd.train.refit import sidecar_lineage
    # a refit model's version, parent and labels stay with every export of it (INT8/FP16 copy this one)
    # the timings stay out of the file (printed only): the same checkpoint exported twice is the same bytes
    recorded = {key: value for key, value in record.items() if not key.startswith("latency_")}
    meta = build_metadata(model, options, checkpoint_sha256=checkpoint_sha256,
                          extra={"onnxslim": recorded, **sidecar_lineage(getattr(model, "lineage", None))})
    write_model(proto, path, meta)
    return ExportedModel(Path(path), meta, record)
