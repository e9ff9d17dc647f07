"""``mrkd run``: parse options, build the line of cameras (one ``--source``, several ``NAME=URI``, or a
``--line`` file), the event sinks and outputs, and call run_line."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import click

from mrkd.errors import error_boundary
from mrkd.options import FINITE, FiniteFloatRange, seconds
from mrkd.runtime.backends import backend_choices
from mrkd.runtime.postprocess import IMPLS as POSTPROCESS_IMPLS


def line_output_options(command):
    """The options of the line's outputs beside the event log: signed webhooks, MQTT, --http."""
    options = [
        click.option("--webhook-header", "webhook_headers", multiple=True, metavar="'NAME: VALUE'",
                     help="Extra HTTP header on every webhook POST, e.g. 'Authorization: Bearer ...' (repeatable)."),
        click.option("--webhook-secret-env", metavar="VAR", default=None,
                     help="Sign each webhook body with HMAC-SHA256 using the secret in this environment variable "
                          "(header X-Mrkd-Signature: sha256=HEX; X-Mrkd-Event-Id names the event for dedup)."),
        click.option("--mqtt", "mqtt_url", metavar="mqtt://HOST:PORT/PREFIX", default=None,
                     help="Publish to an MQTT broker: PREFIX/<camera>/status (retained, offline as last will), "
                          "PREFIX/<camera>/event (QoS 1 per alarm); mqtts:// for TLS. Needs the line extra."),
        click.option("--mqtt-username", default=None, help="MQTT user name."),
        click.option("--mqtt-password-env", metavar="VAR", default=None,
                     help="Environment variable holding the MQTT password (never on the command line)."),
        click.option("--mqtt-tls", is_flag=True, help="Connect to the broker with TLS (as mqtts:// does)."),
        click.option("--mqtt-ca", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="CA certificate file for the broker's TLS certificate (default: the system's)."),
        click.option("--mqtt-results-rate", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="Also publish scored frames to PREFIX/<camera>/result, at most this many a second per "
                          "camera (0 = off)."),
        click.option("--http", "http_address", metavar="HOST:PORT", default=None,
                     help="Serve /metrics (Prometheus), /healthz and a read-only live operator page at / "
                          "(e.g. 127.0.0.1:8080; 0.0.0.0:8080 for the whole network). Needs the line extra."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def part_options(command):
    """The triggered-inspection options (runtime/line/parts.py): trigger mode, camera features, the
    part's queue/images/timeout and the test trigger drivers."""
    options = [
        click.option("--trigger", "trigger_mode", type=click.Choice(["free", "software", "hardware"]), default=None,
                     help="free: score frames as they come (default). software: mrkd triggers each camera once per "
                          "part trigger; hardware: the line's I/O triggers the camera and mrkd waits for its image. "
                          "Both judge parts (OK/NG/ERROR) and need a trigger source."),
        click.option("--feature", "features", multiple=True, metavar="NAME=VALUE",
                     help="GenICam feature of gige:// cameras, e.g. ExposureTime=5000 (repeatable; applied in order, "
                          "re-applied after a reconnect)."),
        click.option("--trigger-stdin", is_flag=True,
                     help="Trigger one part per line read from standard input (the line is the part id, empty: "
                          "counted; 'ID@N' judges it with recipe N). The run ends at the end of input."),
        click.option("--trigger-every", type=seconds(0, open_min=True, maximum=3600), default=None, metavar="SECONDS",
                     help="Trigger a part every SECONDS (a test driver; with --max-parts it ends after that many)."),
        click.option("--max-parts", type=click.IntRange(min=1), default=None, help="Stop after this many parts."),
        click.option("--part-queue", type=click.IntRange(0, 1000), default=None,
                     help="Triggers that may wait while a part is judged (default 4); one more is refused and "
                          "counted as a missed trigger."),
        click.option("--part-images", type=click.IntRange(1, 64), default=None,
                     help="Images per camera per part (default 1)."),
        click.option("--part-timeout", type=seconds(0, open_min=True, maximum=600), default=None,
                     help="Seconds a camera may take to deliver a part's image before the part is ERROR (default 2)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def pop_part_options(options: dict) -> dict:
    """Take the part options out of run_command's keyword options."""
    return {name: options.pop(name) for name in ("trigger_mode", "features", "trigger_stdin", "trigger_every",
                                                 "max_parts", "part_queue", "part_images", "part_timeout")}


def part_settings(line, part: dict):
    """The line's PartSettings with the command line's --part-* over them."""
    import dataclasses
    from mrkd.runtime.line.trigger import PartSettings
    settings = line.part or PartSettings()
    changes = {name: part[f"part_{name}"] for name in ("queue", "images", "timeout") if part[f"part_{name}"] is not None}
    return dataclasses.replace(settings, **changes).check([c.name for c in line.cameras])


def run_parts(line, part: dict, detectors, sinks, observers, status_every) -> dict:
    """Judge parts on trigger until the trigger source ends (stdin), --max-parts, or a signal."""
    import sys
    from mrkd.runtime.line.parts import PartRunner, open_part_sources
    from mrkd.runtime.line.stream import stop_on_signals
    from mrkd.runtime.line.trigger import trigger_every, trigger_lines

    settings = part_settings(line, part)
    sources = open_part_sources(line, settings)
    try:
        runner = PartRunner(line, sources, settings, detectors=detectors, observers=observers,
                            status_every=status_every, status=lambda text: click.echo(text, err=True))
    except BaseException:
        for source in sources.values():
            source.close()
        raise
    stop = threading.Event()
    with stop_on_signals(stop):
        if part["trigger_stdin"]:
            trigger_lines(runner, sys.stdin, stop)
        if part["trigger_every"]:
            trigger_every(runner, part["trigger_every"], stop, part["max_parts"])
        return runner.run(stop, part["max_parts"])


def webhook_auth(webhook, headers, secret_env):
    """(headers dict, secret bytes or None) from --webhook-header / --webhook-secret-env (ValueError)."""
    import os
    from mrkd.runtime.outputs.events import parse_header

    if (headers or secret_env) and not webhook:
        raise ValueError("--webhook-header and --webhook-secret-env need --webhook URL")
    parsed = dict(parse_header(text) for text in headers)
    secret = None
    if secret_env:
        value = os.environ.get(secret_env)
        if not value:
            raise ValueError(f"--webhook-secret-env {secret_env}: that environment variable is not set or empty")
        secret = value.encode("utf-8")
    return parsed, secret


def build_line_outputs(options: dict, sinks) -> list:
    """The LineObservers that the --mqtt* and --http options ask for (ValueError / OSError otherwise)."""
    import os
    from mrkd.deps import MissingDependencyError

    observers = []
    try:
        mqtt = None
        if options["mqtt_url"]:
            from mrkd.runtime.outputs.mqtt import MqttObserver, MqttSettings
            password = None
            if options["mqtt_password_env"]:
                password = os.environ.get(options["mqtt_password_env"])
                if password is None:
                    raise ValueError(f"--mqtt-password-env {options['mqtt_password_env']}: that environment "
                                     "variable is not set")
            settings = MqttSettings.from_url(options["mqtt_url"], tls=options["mqtt_tls"],
                                             ca_certs=options["mqtt_ca"], username=options["mqtt_username"],
                                             password=password, results_rate=options["mqtt_results_rate"])
            mqtt = MqttObserver(settings)
            observers.append(mqtt)
        elif any(options[k] for k in ("mqtt_username", "mqtt_password_env", "mqtt_tls", "mqtt_ca",
                                      "mqtt_results_rate")):
            raise ValueError("the --mqtt-* options need --mqtt mqtt://HOST:PORT/PREFIX")
        if options["http_address"]:
            from mrkd.runtime.outputs.metrics import MetricsObserver
            from mrkd.runtime.outputs.web import OperatorServer, parse_address
            host, port = parse_address(options["http_address"])
            metrics = MetricsObserver(mqtt_failures=mqtt.failures if mqtt else None,
                                      webhook_stats=sinks.webhook.stats if sinks.webhook else None)
            try:
                server = OperatorServer(host, port, metrics=metrics)
            except OSError as exc:
                raise OSError(f"--http {options['http_address']}: cannot listen there ({exc.strerror or exc})") from exc
            observers += [metrics, server]
            click.echo(f"operator page {server.url}/  metrics {server.url}/metrics", err=True)
    except MissingDependencyError as exc:
        raise ValueError(str(exc)) from exc
    return observers


@click.command("run", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(exists=True, dir_okay=False), required=False)
@click.option("--source", "-s", "sources", multiple=True,
              help="Frames to score: camera index (0), v4l2:///dev/video0, csi://0, rtsp://.., http://.., "
                   "a video file, an image folder or a glob. Repeat as NAME=URI for several cameras sharing "
                   "MODEL (a plain URI is named cam0, cam1, ...).")
@click.option("--line", "line_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TOML line file: [[camera]] tables with name, source, model and optional threshold, debounce, "
                   "cooldown, cooldown_frames, size, fps, loop (the options below are their defaults; MODEL "
                   "is the default model).")
@click.option("--backend", type=click.Choice(backend_choices()), default="auto", show_default=True,
              help="Inference backend (NAME:PRECISION sets OpenVINO's f32/bf16); auto = TensorRT for "
                   ".engine/.plan; for .onnx ONNX Runtime's TensorRT/CUDA on NVIDIA GPUs, OpenVINO on Intel "
                   "CPUs where installed, else ONNX Runtime.")
@click.option("--providers", default=None,
              help="ONNX Runtime execution providers in order, comma-separated (tensorrt,cuda,cpu); "
                   "default: every available one.")
@click.option("--threads", type=click.IntRange(0, 1024), default=None,
              help="CPU inference threads of ONNX Runtime / OpenVINO (default: their own).")
@click.option("--postprocess", type=click.Choice(("auto",) + POSTPROCESS_IMPLS), default="auto",
              show_default=True, help="Post-processing implementation for models with per-scale outputs.")
@click.option("--threshold", type=FINITE, default=None,
              help="Alarm threshold on the image score (default: the calibrated one in the model metadata).")
@click.option("--debounce", default="1/1", show_default=True,
              help="K/N: alarm when K of the last N frames are anomalous.")
@click.option("--cooldown", type=seconds(0), default=5.0, show_default=True,
              help="Seconds (of frame time) after an alarm during which no new alarm is raised.")
@click.option("--cooldown-frames", type=click.IntRange(min=0), default=0, show_default=True,
              help="Frames after an alarm during which no new alarm is raised (with --cooldown, both must pass).")
@click.option("--events", type=click.Path(dir_okay=False), default=None,
              help="JSON-lines event log to append alarms to.")
@click.option("--snapshots", type=click.Path(file_okay=False), default=None,
              help="Folder for one heat-map snapshot per alarm.")
@click.option("--snapshot-format", type=click.Choice([".jpg", ".png"]), default=".jpg", show_default=True,
              help="Snapshot image format.")
@click.option("--webhook", default=None, help="URL to POST each alarm event (JSON) to, in the background.")
@click.option("--webhook-timeout", type=seconds(0, open_min=True, maximum=3600), default=2.0, show_default=True,
              help="Seconds per webhook POST before it counts as failed (it is retried).")
@line_output_options
@part_options
@click.option("--save-video", type=click.Path(dir_okay=False), default=None,
              help="Write annotated frames (heat-map, score, threshold) to this video file (.avi: MJPG).")
@click.option("--show", is_flag=True, help="Show annotated frames in a window (needs an OpenCV with GUI).")
@click.option("--max-frames", type=click.IntRange(min=1), default=None, help="Stop each camera after this many frames.")
@click.option("--status-every", type=seconds(0), default=5.0, show_default=True,
              help="Seconds between status lines (fps, latency p50/p99, dropped frames); 0 = none.")
@click.option("--batch", type=click.IntRange(1, 4096), default=1, show_default=True,
              help="Frames per camera per inference call (files and folders gain throughput; cameras lose "
                   "latency). Cameras sharing a model are always scored together.")
@click.option("--batch-timeout", type=seconds(0, maximum=60), default=None,
              help="Seconds to wait for the other cameras' frames after the oldest one in hand (default: the "
                   "fastest camera's frame period, at most 0.2 s).")
@click.option("--size", default=None, help="WIDTHxHEIGHT to resize source frames to (cameras are asked for it).")
@click.option("--fps", type=FiniteFloatRange(0, 1000, min_open=True), default=None,
              help="Camera rate to request, or the rate to replay files/folders at (default: as fast as read).")
@click.option("--loop", is_flag=True, help="Restart video files and folders at their end.")
@click.option("--summary", "summary_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the end-of-run summary as JSON to this file.")
@error_boundary
def run_command(model, sources, line_file, backend, providers, threads, postprocess, threshold, debounce, cooldown,
                cooldown_frames, events, snapshots, snapshot_format, webhook, webhook_timeout, save_video, show,
                max_frames, status_every, batch, batch_timeout, size, fps, loop, summary_path, **line_outputs):
    """Stream frames from one or more cameras through MODEL (an .engine or an .onnx file with its .json
    sidecar) and raise alarms: `mrkd run MODEL --source URI`, `mrkd run MODEL --source left=URI
    --source right=URI`, or `mrkd run --line line.toml`. Ctrl-C / SIGTERM stop cleanly: every event
    is written before exit."""
    from mrkd.atomic import atomic_write_text
    from mrkd.runtime.line.alarms import parse_debounce
    from mrkd.runtime.outputs.events import EventSinks
    from mrkd.runtime.line.loop import open_detectors, open_sources, run_line
    from mrkd.runtime.line.stream import stop_on_signals
    from mrkd.runtime.outputs.video import VideoFileSink, WindowSink

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    detectors = {}
    part = pop_part_options(line_outputs)
    try:
        camera_defaults = dict(threshold=threshold, debounce=parse_debounce(debounce), cooldown=cooldown,
                               cooldown_frames=cooldown_frames, size=size, fps=fps, loop=loop)
        if part["trigger_mode"]:
            camera_defaults["trigger"] = part["trigger_mode"]
        if part["features"]:
            from mrkd.runtime.sources.gige import parse_feature
            camera_defaults["features"] = tuple(parse_feature(text) for text in part["features"])
        line = build_line(model, sources, line_file, camera_defaults,
                          backend=backend, postprocess=postprocess, threads=threads,
                          providers=tuple(providers.split(",")) if providers else None)
        if (save_video or show) and len(line.cameras) > 1:
            raise ValueError("--save-video and --show take one camera; this line has "
                             f"{len(line.cameras)}")
        webhook_headers, webhook_secret = webhook_auth(webhook, line_outputs.pop("webhook_headers"),
                                                       line_outputs.pop("webhook_secret_env"))
        triggered = any(c.trigger != "free" for c in line.cameras)
        if triggered and not (part["trigger_stdin"] or part["trigger_every"]):
            raise ValueError("--trigger software/hardware judges parts on trigger: give a trigger source "
                             "(--trigger-stdin or --trigger-every SECONDS)")
        if not triggered and (part["trigger_stdin"] or part["trigger_every"] or part["max_parts"]):
            raise ValueError("--trigger-stdin, --trigger-every and --max-parts need --trigger software or hardware "
                             "(or trigger = ... in the line file)")
        detectors = open_detectors(line)
        frames = {} if triggered else open_sources(line)
    except (ValueError, RuntimeError, OSError) as exc:
        for detector in detectors.values():
            detector.close()
        raise click.ClickException(str(exc)) from exc
    for detector in detectors.values():
        click.echo(detector.describe(), err=True)
    outputs = [VideoFileSink(save_video, fps=fps or 15.0)] if save_video else []
    if show:
        outputs.append(WindowSink())
    sinks = EventSinks(events, snapshots, webhook, snapshot_format, webhook_timeout, webhook_headers, webhook_secret)
    try:
        observers = build_line_outputs(line_outputs, sinks)
    except (ValueError, OSError) as exc:
        sinks.close(0)
        for source in frames.values():
            source.close()
        for detector in detectors.values():
            detector.close()
        raise click.ClickException(str(exc)) from exc
    stop = threading.Event()
    try:
        if triggered:
            try:
                summary = run_parts(line, part, detectors, sinks, observers, status_every)
            except (ValueError, RuntimeError, OSError) as exc:
                sinks.close(0)
                for observer in observers:
                    observer.on_stop()
                raise click.ClickException(str(exc)) from exc
        else:
            with stop_on_signals(stop):
                summary = run_line(line, sinks, outputs={line.cameras[0].name: outputs}, max_frames=max_frames,
                                   status_every=status_every, batch=batch, stop=stop,
                                   status=lambda text: click.echo(text, err=True), batch_timeout=batch_timeout,
                                   detectors=detectors, sources=frames, observers=observers)
    finally:
        for detector in detectors.values():
            detector.close()
    click.echo(json.dumps(summary, indent=2))
    if summary_path:
        atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")


def parse_named_source(text: str, index: int):
    """"NAME=URI" -> (NAME, URI); a plain URI (or one whose text before '=' is no camera name, as in
    rtsp://host/s?user=x) -> ("cam<index>", URI)."""
    from mrkd.runtime.line.loop import CAMERA_NAME
    name, sep, uri = text.partition("=")
    if sep and CAMERA_NAME.match(name) and uri and not Path(text).exists():
        return name, uri
    return f"cam{index}", text


def build_line(model, sources, line_file, camera_defaults: dict, **line_options):
    """The Line that `mrkd run`'s options describe (ValueError with a one-line message otherwise)."""
    from mrkd.runtime.line.loop import Camera, Line
    from mrkd.runtime.line.linefile import load_line
    from mrkd.runtime.sources import SourceOptions

    defaults = dict(camera_defaults, size=SourceOptions.parse_size(camera_defaults.get("size")))
    if line_file:
        if sources:
            raise ValueError("give cameras either with --source or in --line, not both")
        if model:
            defaults["model"] = model
        return load_line(line_file, defaults, **line_options)
    if not model or not sources:
        raise ValueError("give MODEL and at least one --source, or a --line file")
    cameras = [Camera(name, uri, model, **defaults)
               for name, uri in (parse_named_source(text, i) for i, text in enumerate(sources))]
    return Line(tuple(cameras), **line_options)
