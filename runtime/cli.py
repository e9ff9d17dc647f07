"""``mrkd run``: parse options, build the detector, source, alarm policy and sinks, call run_stream."""

from __future__ import annotations

import json
import logging
import threading

import click


@click.command("run", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--source", "-s", required=True,
              help="Frames to score: camera index (0), v4l2:///dev/video0, csi://0, rtsp://.., http://.., "
                   "a video file, an image folder or a glob.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True,
              help="Inference backend; auto = TensorRT for .engine/.plan, ONNX Runtime for .onnx.")
@click.option("--providers", default=None,
              help="ONNX Runtime execution providers in order, comma-separated (tensorrt,cuda,cpu); "
                   "default: every available one.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own).")
@click.option("--postprocess", type=click.Choice(["auto", "cuda", "cpu", "numpy"]), default="auto",
              show_default=True, help="Post-processing implementation for models with per-scale outputs.")
@click.option("--threshold", type=float, default=None,
              help="Alarm threshold on the image score (default: the calibrated one in the model metadata).")
@click.option("--debounce", default="1/1", show_default=True,
              help="K/N: alarm when K of the last N frames are anomalous.")
@click.option("--cooldown", type=float, default=5.0, show_default=True,
              help="Seconds (of frame time) after an alarm during which no new alarm is raised.")
@click.option("--cooldown-frames", type=int, default=0, show_default=True,
              help="Frames after an alarm during which no new alarm is raised (with --cooldown, both must pass).")
@click.option("--events", type=click.Path(dir_okay=False), default=None,
              help="JSON-lines event log to append alarms to.")
@click.option("--snapshots", type=click.Path(file_okay=False), default=None,
              help="Folder for one heat-map snapshot per alarm.")
@click.option("--snapshot-format", type=click.Choice([".jpg", ".png"]), default=".jpg", show_default=True,
              help="Snapshot image format.")
@click.option("--webhook", default=None, help="URL to POST each alarm event (JSON) to, in the background.")
@click.option("--webhook-timeout", type=float, default=2.0, show_default=True,
              help="Seconds per webhook POST before it counts as failed (it is retried).")
@click.option("--save-video", type=click.Path(dir_okay=False), default=None,
              help="Write annotated frames (heat-map, score, threshold) to this video file (.avi: MJPG).")
@click.option("--show", is_flag=True, help="Show annotated frames in a window (needs an OpenCV with GUI).")
@click.option("--max-frames", type=int, default=None, help="Stop after this many frames.")
@click.option("--status-every", type=float, default=5.0, show_default=True,
              help="Seconds between status lines (fps, latency p50/p99, dropped frames); 0 = none.")
@click.option("--batch", type=int, default=1, show_default=True,
              help="Frames per inference call (files and folders gain throughput; cameras lose latency).")
@click.option("--size", default=None, help="WIDTHxHEIGHT to resize source frames to (cameras are asked for it).")
@click.option("--fps", type=float, default=None,
              help="Camera rate to request, or the rate to replay files/folders at (default: as fast as read).")
@click.option("--loop", is_flag=True, help="Restart video files and folders at their end.")
@click.option("--summary", "summary_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the end-of-run summary as JSON to this file.")
def run_command(model, source, backend, providers, threads, postprocess, threshold, debounce, cooldown,
                cooldown_frames, events, snapshots, snapshot_format, webhook, webhook_timeout, save_video, show,
                max_frames, status_every, batch, size, fps, loop, summary_path):
    """Stream frames from SOURCE through MODEL (an .engine or an .onnx file with its .json sidecar) and
    raise alarms. Ctrl-C / SIGTERM stop cleanly: every event is written before exit."""
    from mrkd.atomic import atomic_write_text
    from mrkd.runtime.alarms import AlarmPolicy, parse_debounce
    from mrkd.runtime.detector import Detector
    from mrkd.runtime.events import EventSinks
    from mrkd.runtime.sources import open_source
    from mrkd.runtime.stream import run_stream, stop_on_signals
    from mrkd.runtime.video_output import VideoFileSink, WindowSink

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        frame_size = tuple(int(v) for v in size.lower().split("x")) if size else None
        detector = Detector(model, backend=backend, postprocess=postprocess, threshold=threshold,
                            providers=providers.split(",") if providers else None, threads=threads)
        policy = AlarmPolicy(detector.threshold, parse_debounce(debounce), cooldown, cooldown_frames)
        frames = open_source(source, size=frame_size, fps=fps, loop=loop)
    except (ValueError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(detector.describe(), err=True)
    outputs = [VideoFileSink(save_video, fps=fps or 15.0)] if save_video else []
    if show:
        outputs.append(WindowSink())
    sinks = EventSinks(events, snapshots, webhook, snapshot_format, webhook_timeout)
    stop = threading.Event()
    with stop_on_signals(stop):
        summary = run_stream(detector, frames, policy, sinks, outputs, max_frames=max_frames,
                             status_every=status_every, batch=batch, stop=stop,
                             status=lambda line: click.echo(line, err=True))
    click.echo(json.dumps(summary, indent=2))
    if summary_path:
        atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
