"""Import OpenVINO without its usage telemetry, unless this machine's user opted in.

``import openvino`` imports its model converter, whose import sends a usage event to Google Analytics by
default (OpenVINO's telemetry is collected unless `opt_in_out --opt_out` was run; docs.openvino.ai,
"OpenVINO Telemetry"), from a process forked off a thread pool inside the line's process. A line PC
should send nothing that its owner did not ask for, and a fork of a threaded process can hang its
child. So where no consent file exists (the user never chose), mrkd counts that as declined; a user who
ran `opt_in_out --opt_in` (file says 1) or `--opt_out` (0) is taken at their word.
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType

from mrkd.deps import require

_lock = threading.Lock()


def _no_file_means_declined() -> None:
    """Make openvino_telemetry's consent check answer DECLINED where it would answer NO_FILE (which its
    converter's telemetry takes as consent). Nothing when that package or its checker is missing."""
    try:
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:
        return
    check = OptInChecker.check
    if getattr(check, "mrkd_declines_no_file", False):
        return

    def checked(self, *args, **kwargs):
        result = check(self, *args, **kwargs)
        return ConsentCheckResult.DECLINED if result == ConsentCheckResult.NO_FILE else result
    checked.mrkd_declines_no_file = True
    OptInChecker.check = checked


def import_openvino() -> ModuleType:
    """The openvino module (MissingDependencyError naming the extra when it is not installed), imported
    with telemetry declined unless opted in (module docstring)."""
    with _lock:
        if "openvino" not in sys.modules:
            _no_file_means_declined()
        return require("openvino")
