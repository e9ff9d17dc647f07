"""mrkd.runtime: the torch-free edge runtime (numpy, OpenCV, ONNX Runtime, OpenVINO or TensorRT).

A frame's way: ``open_source`` (sources/) -> ``Detector`` (detector.py: preprocess.py ->
backends/ -> postprocess.py) -> ``AlarmPolicy`` (line/alarms.py) -> the line's outputs (outputs/);
``run_line`` (line/loop.py) is the frame loop for a ``Line`` of cameras, ``run_stream``
(line/stream.py) its one-camera case, ``mrkd run`` (cli.py) its command line.
Submodules load on first use, so ``import mrkd.runtime`` stays cheap and never imports torch.
"""

import importlib

_EXPORTS = {
    "Detector": "detector", "DetectionResult": "detector",
    "open_source": "sources", "Frame": "sources", "Source": "sources", "SourceError": "sources",
    "AlarmPolicy": "line.alarms", "Alarm": "line.alarms",
    "build_outputs": "outputs", "OutputSettings": "outputs", "EventLog": "outputs.events",
    "WebhookSender": "outputs.webhook", "WebhookSettings": "outputs.webhook", "read_events": "outputs.events",
    "RunSettings": "line.loop",
    "run_stream": "line.stream",
    "run_line": "line.loop", "Line": "line.loop", "Camera": "line.loop",
    "VideoFileSink": "outputs.video", "WindowSink": "outputs.video",
    "ModelMetadata": "metadata", "MetadataError": "metadata",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mrkd.runtime.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mrkd.runtime' has no attribute {name!r}")
