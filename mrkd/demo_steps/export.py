"""The demo's export step: every trained category to ONNX (parity-checked) through export_checkpoint,
the first with its FP16 graph (one of its export set) and fidelity report and a Triton repository
(listed in mrkd/demo.py's DEMO_LAYER_STEPS)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import click


def export_step(context: Dict) -> None:
    from mrkd.export.onnx_graph import ExportOptions
    from mrkd.export.pipeline import export_checkpoint
    export_dir = Path(context["out"]) / "export"
    context["exports"] = {}
    for index, (category, checkpoint) in enumerate(sorted(context["checkpoints"].items())):
        first = index == 0
        triton_dir = export_dir / "triton" if first else None
        # The good training images also check bf16 against FP32 (OpenVINO, CPUs with native bf16): a passing
        # check lets `mrkd run --backend auto` run bf16 there.
        good = Path(context["data_root"]) / category / "train" / "good"
        notes = []
        # a second demo run replaces the first one's export (overwrite) and its stream calibration
        # (replace_line_calibration), which its own stream step sets again. The first category's FP16 graph
        # is one of the set (fp16, no engine): moved in with model.onnx, or not at all, and known to a
        # later `mrkd export --overwrite` into that folder as an earlier export's file.
        result = export_checkpoint(checkpoint, export_dir / category, ExportOptions(), fp16=first,
                                   engine=False, triton_dir=triton_dir,
                                   check_images=good if good.is_dir() else None, simplify="never",
                                   overwrite=True, replace_line_calibration=True,
                                   echo=lambda line: notes.append(line) if line.startswith(("bf16", "  bf16")) else None)
        context["exports"][category] = result.files["onnx"]
        parity = result.reports["parity"]
        click.echo(f"{category}: {result.files['onnx']} (ORT vs PyTorch map max |diff| {parity.map_max_abs_diff:.2g})")
        for note in notes:
            click.echo(f"   {note.strip()}")
        if first:
            click.echo(result.reports["fp16"].format())
            click.echo(f"Triton repository: {triton_dir} (TensorRT engines: `mrkd export CKPT --fp16` on the device)")
