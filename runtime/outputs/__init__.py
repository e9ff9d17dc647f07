"""What the line tells the outside world: every output is a ``LineObserver`` (base.py), built from
the line's ``OutputSettings`` by ``build_outputs`` (the CLI and the Python API both call it).

A new output is one new module with ``outputs_from(settings) -> list of LineObserver`` and one line
in ``SINKS``. Today: snapshots.py (one image per alarm), evidence.py (the image as delivered, lossless), events.py
(JSON-lines log), parts_log.py (every judged part, OK too, JSON lines), webhook.py,
video.py (annotated video file, window), mqtt.py, metrics.py (Prometheus), web.py (the operator
page, /metrics, /healthz). overlay.py draws heat-maps; delivery.py counts and warns for them all.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple

from mrkd.errors import SettingError

if TYPE_CHECKING:      # the modules load only when their output is asked for
    from mrkd.runtime.outputs.base import LineObserver
    from mrkd.runtime.outputs.evidence import EvidenceSettings
    from mrkd.runtime.outputs.mqtt import MqttSettings
    from mrkd.runtime.outputs.webhook import WebhookSettings

OUTPUT_SCHEMA_VERSION = 4      # 2: http_cert, http_key; 3: http_allowed_hosts; 4: parts_log

# A host name as --http-allow-host takes it: DNS labels, no port, no scheme, no wildcard.
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9_-]{0,62}))*\.?$")

# The outputs, in the order their hooks are called (modules of this package).
# evidence comes after snapshots: the snapshot writer may draw the event id anew, evidence files use the final one.
SINKS = ("snapshots", "evidence", "events", "parts_log", "webhook", "video", "mqtt", "metrics", "web")


@dataclass(frozen=True)
class OutputSettings:
    """Where a line's results go; every field off by default.

    events: JSON-lines log file. parts_log: JSON-lines file of every judged part (triggered runs).
    snapshots: folder of alarm images (snapshot_format .jpg/.png).
    webhook: WebhookSettings. mqtt: MqttSettings. http: "HOST:PORT" of /metrics, /healthz and the
    operator page; http_allowed_hosts: names (besides IP addresses and localhost) the page answers
    requests for when it listens beyond this machine (web.py). save_video / show: annotated frames of
    ``video_camera`` (default: the first camera) to a file (at video_fps) / a window. evidence: lossless
    images of alarms/NG parts (and a sample of OK ones) within a disk budget (EvidenceSettings).
    close_deadline_s: how long network outputs may take to flush at the stop.
    """

    events: Optional[str] = None
    snapshots: Optional[str] = None
    snapshot_format: str = ".jpg"
    evidence: Optional["EvidenceSettings"] = None
    webhook: Optional["WebhookSettings"] = None
    mqtt: Optional["MqttSettings"] = None
    http: Optional[str] = None
    save_video: Optional[str] = None
    video_fps: float = 15.0
    show: bool = False
    video_camera: Optional[str] = None
    close_deadline_s: float = 5.0
    http_cert: Optional[str] = None
    http_key: Optional[str] = None
    http_allowed_hosts: Tuple[str, ...] = ()
    parts_log: Optional[str] = None
    schema_version: int = OUTPUT_SCHEMA_VERSION

    def __post_init__(self):
        if self.snapshot_format not in (".jpg", ".png"):
            raise SettingError(f"snapshot format must be .jpg or .png, got {self.snapshot_format!r}")
        if not self.video_fps > 0 or not self.close_deadline_s >= 0:
            raise SettingError("video fps must be > 0 and the close deadline >= 0")
        if (self.http_cert is None) != (self.http_key is None):
            raise SettingError("--http-cert and --http-key go together")
        if self.http_cert is not None and not self.http:
            raise SettingError("--http-cert/--http-key need --http HOST:PORT")
        for name in self.http_allowed_hosts:
            if not isinstance(name, str) or not _HOST_NAME.match(name):
                raise SettingError(f"--http-allow-host must be a host name without port or scheme "
                                   f"(e.g. line3.plant.example), got {name!r}")
        if self.http_allowed_hosts and not self.http:
            raise SettingError("--http-allow-host needs --http HOST:PORT")
        # both would append to one file, and each log refuses the other's lines at the next start
        if self.parts_log and self.events and os.path.realpath(self.parts_log) == os.path.realpath(self.events):
            raise SettingError(f"--parts-log and --events name the same file ({self.events}); give each its own")


def build_outputs(settings: OutputSettings) -> List["LineObserver"]:
    """Every output ``settings`` asks for, in ``SINKS`` order; each has seen the whole list
    (``see_outputs``). Raises MrkdError/OSError naming the output that cannot start (a busy port,
    a file that is not an events log); the outputs already started are stopped again."""
    from mrkd.runtime.outputs.base import call_each, stop_each
    outputs: List["LineObserver"] = []
    try:
        for name in SINKS:
            outputs += importlib.import_module(f"mrkd.runtime.outputs.{name}").outputs_from(settings)
    except BaseException:
        stop_each(outputs)
        raise
    call_each(outputs, lambda output: output.see_outputs(outputs))
    return outputs
