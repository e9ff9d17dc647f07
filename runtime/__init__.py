"""mrkd.runtime: the torch-free edge runtime (numpy, OpenCV, ONNX Runtime or TensorRT).

A frame's way: ``open_source`` (sources.py) -> ``Detector`` (detector.py: preprocess.py ->
backends/ -> postprocess.py) -> ``AlarmPolicy`` (alarms.py) -> ``EventSinks`` (events.py);
``run_line`` (line.py) is the frame loop for a ``Line`` of cameras, ``run_stream`` (stream.py) its
one-camera case, ``mrkd run`` (cli.py) its command line.
Submodules load on first use, so ``import mrkd.runtime`` stays cheap and never imports torch.
"""

import importlib

_EXPORTS = {
    "Detector": "detector", "DetectionResult": "detector",
    "open_source": "sources", "Frame": "sources", "Source": "sources", "SourceError": "sources",
    "AlarmPolicy": "alarms", "Alarm": "alarms",
    "EventSinks": "events", "EventLog": "events", "WebhookSender": "events", "read_events": "events",
    "run_stream": "stream",
    "run_line": "line", "Line": "line", "Camera": "line",
    "VideoFileSink": "video_output", "WindowSink": "video_output",
    "ModelMetadata": "metadata", "MetadataError": "metadata",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mrkd.runtime.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mrkd.runtime' has no attribute {name!r}")
