"""The demo's export step: every trained category to ONNX (parity-checked), plus one FP16 fidelity
report and a Triton repository (listed in mrkd/demo.py's DEMO_LAYER_STEPS)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import click


def export_step(context: Dict) -> None:
    from mrkd.export.exporter import export_onnx, load_model
    from mrkd.export.fp16 import fp16_fidelity_report, fp16_options
    from mrkd.export.onnx_graph import ExportOptions
    from mrkd.export.pipeline import export_checkpoint
    export_dir = Path(context["out"]) / "export"
    context["exports"] = {}
    for index, (category, checkpoint) in enumerate(sorted(context["checkpoints"].items())):
        triton_dir = export_dir / "triton" if index == 0 else None
        result = export_checkpoint(checkpoint, export_dir / category, ExportOptions(), triton_dir=triton_dir,
                                   simplify="never", echo=lambda line: None)
        context["exports"][category] = result.files["onnx"]
        parity = result.reports["parity"]
        click.echo(f"{category}: {result.files['onnx']} (ORT vs PyTorch map max |diff| {parity.map_max_abs_diff:.2g})")
        if index == 0:
            model, sha = load_model(checkpoint)
            half = export_onnx(model, export_dir / category / "model_fp16.onnx", fp16_options(ExportOptions()),
                               checkpoint_sha256=sha, simplify="never")
            click.echo(fp16_fidelity_report(model, half.path, ExportOptions()).format())
            click.echo(f"Triton repository: {triton_dir} (TensorRT engines: `mrkd export CKPT --fp16` on the device)")
