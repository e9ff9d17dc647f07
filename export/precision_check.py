"""The export's check of lower CPU precisions: the FP32 graph run at bf16 by OpenVINO against the same
graph at FP32 on ONNX Runtime, on good images, recorded in the sidecar as a typed PrecisionCheck.

`--backend auto` runs OpenVINO at bf16 only where such a check passed (runtime/backends/openvino_backend
``checked_precision``; the rule is PrecisionCheck.passed: every score within 1 % of the threshold of its
FP32 value). bf16 keeps 8 bits of mantissa, so a score moves by a fraction of a percent, and a part that
close to the threshold can change its verdict: the report counts how often that happened on the images.
The check needs a calibrated threshold and a CPU with native bf16 (OpenVINO would otherwise run fp32
and the check would prove nothing).
"""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

from mrkd.export.int8 import backend_agreement_report, int8_image_paths, load_images
from mrkd.export.parity import Comparison
from mrkd.runtime.metadata import ModelMetadata, PrecisionCheck, sidecar_path

BF16_SPEC = "openvino:bf16"


def bf16_unavailable_reason() -> Optional[str]:
    """Why bf16 cannot be checked here (None: it can)."""
    from mrkd.runtime.backends import backend_entry
    if not backend_entry("openvino").available():
        return "OpenVINO is not installed (pip install 'mrkd[openvino]')"
    from mrkd.runtime.backends.openvino_backend import cpu_capabilities
    capabilities = cpu_capabilities()
    if "BF16" not in capabilities:
        return f"this CPU has no native bf16 (OpenVINO offers {', '.join(capabilities)})"
    return None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), where the check was measured."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check_bf16(fp32_path, metadata: ModelMetadata, images_dir,
               echo: Callable[[str], None] = print, *, paths: Optional[Sequence[Path]] = None,
               notes: Sequence[str] = ()) -> Tuple[ModelMetadata, Optional[Comparison]]:
    """Run the check on the good images in ``images_dir`` (or on ``paths``, chosen by the caller) and
    write it into ``fp32_path``'s sidecar (atomically). ``notes`` go into the report (the export says
    there, as for INT8, when the images are the ones INT8 quantisation saw). Returns the metadata now in
    the sidecar and the report; where the check cannot run (no OpenVINO, no native bf16, no threshold)
    the metadata is returned unchanged with a note echoed."""
    why = bf16_unavailable_reason()
    if why is None and metadata.threshold is None:
        why = "the model has no calibrated threshold to judge decisions at"
    if why is not None:
        echo(f"bf16 not checked: {why}; --backend auto runs this model at fp32")   # on whichever backend it picks
        return metadata, None
    images = load_images(int8_image_paths(images_dir) if paths is None else paths, metadata)
    report = backend_agreement_report(fp32_path, fp32_path, images, metadata.threshold, BF16_SPEC, "FP32 graph",
                                      candidate_metadata=metadata)
    report.subset, report.notes = "good", report.notes + list(notes)
    check = PrecisionCheck(backend=BF16_SPEC, precision="bf16", images=report.n_images,
                           decision_agreement=float(report.decision_agreement),
                           score_max_abs_diff=float(report.score_max_abs_diff),
                           threshold=float(metadata.threshold), cpu=cpu_name())
    others = tuple(c for c in metadata.precision_checks if c.backend != BF16_SPEC)
    updated = dataclasses.replace(metadata, precision_checks=others + (check,))
    updated.save(sidecar_path(fp32_path))
    echo(report.format())
    limit = PrecisionCheck.SCORE_TOLERANCE * abs(check.threshold)
    echo(f"  bf16 check {'passed' if check.passed else 'FAILED'}: score max |diff| {check.score_max_abs_diff:.3g} "
         f"{'<=' if check.passed else '>'} {limit:.3g} (1 % of the threshold; {check.decision_agreement:.1%} of "
         f"{check.images} decisions equal): --backend auto runs OpenVINO at "
         f"{'bf16 on CPUs that have it' if check.passed else 'fp32'}")
    return updated, report
