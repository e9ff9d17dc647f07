"""``mrkd run``: parse options into settings records (the Line of cameras from one ``--source``, several
``NAME=URI`` or a ``--line`` file; OutputSettings; RunSettings), build the outputs with
``mrkd.runtime.outputs.build_outputs`` (as the Python API does) and call run_line."""

from __future__ import annotations

import contextlib
import json
import math
import threading
from pathlib import Path
from typing import Mapping, Optional

import click

from mrkd.errors import SettingError, error_boundary, warning_line
from mrkd.options import FINITE, BackendChoice, FiniteFloatRange, IntegerRange, seconds
from mrkd.runtime.plc.servers import plc_options
from mrkd.runtime.postprocess import IMPLS as POSTPROCESS_IMPLS
from mrkd.runtime.queued_stderr_log import logging_through_queue, status_to_stderr


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
        click.option("--mqtt-results-rate", type=FiniteFloatRange(min=0), default=0.0, show_default=True,
                     help="Also publish scored frames to PREFIX/<camera>/result, at most this many a second per "
                          "camera (0 = off)."),
        click.option("--control-token-env", metavar="VAR", default=None,
                     help="Accept commands on the --http page (POST /reload: load the model file again; POST "
                          "/review: label an alarm) with 'Authorization: Bearer TOKEN', TOKEN from this environment "
                          "variable (>= 16 characters); without it the page is read-only."),
        click.option("--shadow", "shadow_model", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="A candidate model that scores the same frames without raising alarms; the summary (and the "
                          "outputs' health) says how often its decisions differ and how its scores correlate."),
        click.option("--review-labels", type=click.Path(dir_okay=False), default=None,
                     help="Label file POST /review appends to (mrkd refit --reviewed reads it); needs "
                          "--control-token-env, --events and --evidence (a label names an event of that log and "
                          "the image it was judged on)."),
        click.option("--http", "http_address", metavar="HOST:PORT", default=None,
                     help="Serve /metrics (Prometheus), /healthz and a read-only live operator page at / "
                          "(e.g. 127.0.0.1:8080, or :8080, this machine only; 0.0.0.0:8080 for the whole network; "
                          "IPv6 in brackets: [::1]:8080). "
                          "Needs the line extra."),
        click.option("--http-cert", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Certificate (PEM) for --http: the page then speaks HTTPS only (TLS 1.2+); with "
                          "--http-key. Needed for --control-token-env when --http listens beyond this machine. SIGHUP reads both "
                          "files again (a renewed certificate without a restart; one that does not load is refused "
                          "and the old one stays)."),
        click.option("--http-key", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="The --http-cert certificate's private key (PEM, unencrypted)."),
        click.option("--http-allow-host", "http_allowed_hosts", multiple=True, metavar="NAME",
                     help="A host name the --http page answers to when it listens beyond this machine (repeat for "
                          "several), e.g. the name operators type in their browser. Requests addressed to an IP "
                          "address or localhost are always answered; any other name is refused (421), so that a "
                          "web page whose own name was re-pointed at the line (DNS rebinding) cannot read it."),
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
                     help="Trigger one part per line read from standard input (the line is the part id; an empty "
                          "line is a part named by its trigger number; 'ID@N' judges it with recipe N). The run ends at the end of input."),
        click.option("--trigger-every", type=seconds(0, open_min=True, maximum=3600), default=None, metavar="SECONDS",
                     help="Trigger a part every SECONDS (a test driver; with --max-parts it ends after that many)."),
        click.option("--max-parts", type=IntegerRange(min=1), default=None,
                     help="Judge this many parts, then stop: --trigger-every and --trigger-stdin send no more "
                          "(refused triggers do not count); parts a PLC triggered by then are still judged."),
        click.option("--part-queue", type=IntegerRange(0, 1000), default=None,
                     help="Triggers that may wait while a part is judged (default 4); one more is refused and "
                          "counted as a missed trigger."),
        click.option("--part-images", type=IntegerRange(1, 64), default=None,
                     help="Images per camera per part (default 1)."),
        click.option("--part-timeout", type=seconds(0, open_min=True, maximum=600), default=None,
                     help="Seconds a camera may take to deliver a part's image before the part is ERROR (default 2)."),
        click.option("--part-early", type=seconds(0, maximum=10), default=None,
                     help="--trigger hardware: how long before the PLC's trigger message a camera's image may "
                          "arrive and still be that part's (default 0.25); older ones are a stray trigger's."),
        click.option("--part-max-delay", type=seconds(0, open_min=True, maximum=600), default=None, metavar="SECONDS",
                     help="Most seconds from a trigger to its image for software-triggered and free-running "
                          "cameras: a part that waited longer (queued behind others) is ERROR 'late', not judged "
                          "on what is under the camera by then (default: no bound, a warning once)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def pop_part_options(options: dict) -> dict:
    """Take the part options out of run_command's keyword options."""
    return {name: options.pop(name) for name in ("trigger_mode", "features", "trigger_stdin", "trigger_every",
                                                 "max_parts", "part_queue", "part_images", "part_timeout",
                                                 "part_early", "part_max_delay")}


def part_settings(line, part: dict):
    """The line's PartSettings with the command line's --part-* over them."""
    import dataclasses
    from mrkd.runtime.line.trigger import PartSettings
    settings = line.part or PartSettings()
    changes = {name: part[f"part_{name}"] for name in ("queue", "images", "timeout", "early", "max_delay")
               if part[f"part_{name}"] is not None}
    return dataclasses.replace(settings, **changes).check([c.name for c in line.cameras])


def run_parts(line, part: dict, detectors, observers, status_every, plc=None, slots=None, shadows=(),
              stop: Optional[threading.Event] = None) -> dict:
    """Judge parts on trigger until the trigger source ends (stdin), --max-parts, or ``stop`` (set by a
    signal: run_command's stop_on_signals); ``plc`` (PlcSettings): the PLC servers that trigger it too;
    ``slots``/``shadows``: live_model_controls'."""
    import sys
    from mrkd.runtime.line.parts import PartRunner, open_part_sources
    from mrkd.runtime.line.trigger import TriggerBudget, trigger_every, trigger_lines

    settings = part_settings(line, part)
    sources = open_part_sources(line, settings)
    try:
        runner = PartRunner(line, sources, settings, detectors=detectors, observers=observers,
                            status_every=status_every, status=status_to_stderr,
                            slots=slots, shadows=shadows)
        observers.extend(shadows)            # their health in the run's summary, as in the frame loop
        if plc is not None and plc.wanted:
            from mrkd.runtime.plc.servers import start_plc_servers
            servers = start_plc_servers(runner, plc, echo=status_to_stderr)
            runner.observers.extend(servers)
            observers.extend(servers)        # their health in the run's summary
    except BaseException:
        for source in sources.values():
            source.close()
        raise
    stop = stop or threading.Event()
    budget = TriggerBudget(part["max_parts"])      # --max-parts: one budget for both test drivers
    if part["trigger_stdin"]:
        trigger_lines(runner, sys.stdin, stop, budget)
    if part["trigger_every"]:
        trigger_every(runner, part["trigger_every"], stop, budget)
    return runner.run(stop, part["max_parts"])


def live_model_controls(line, detectors, outputs, control: dict, output_settings, shadow_model):
    """The hot swap and shadow run of `mrkd run`, one set-up for the frame loop and the part runner:
    (ModelSlots over the line's detectors, [ShadowScorer of --shadow] or []); POST /reload and
    /review on the page are wired to those slots (the caller wraps the run in reload_on_sighup)."""
    from mrkd.runtime.control import attach_control
    from mrkd.runtime.line.swap import line_slots
    slots = line_slots(line, detectors, status=status_to_stderr)
    attach_control(outputs, control, output_settings, slots)
    shadow = []
    if shadow_model:     # runtime/line/shadow.py: scores beside the live model, no alarms
        from mrkd.runtime.line.shadow import ShadowScorer
        # each swap starts a new comparison; the candidate reads each image under the ignore mask the live
        # model's score was taken under (FrameResult.ignore_mask)
        shadow = [ShadowScorer(slots.open(shadow_model), slots=slots)]
    return slots, shadow


def pop_output_settings(options: dict):
    """OutputSettings from (and taken out of) run_command's keyword options: --events, --snapshots,
    --webhook*, --mqtt*, --http, --save-video, --show (SettingError / MrkdError naming the option)."""
    import os
    from mrkd.runtime.outputs import OutputSettings
    from mrkd.runtime.outputs.webhook import WebhookSettings, parse_header

    webhook, headers, secret_env = (options.pop(k) for k in ("webhook", "webhook_headers", "webhook_secret_env"))
    webhook_timeout = options.pop("webhook_timeout")
    if (headers or secret_env) and not webhook:
        raise SettingError("--webhook-header and --webhook-secret-env need --webhook URL")
    webhook_settings = None
    if webhook:
        secret = None
        if secret_env:
            value = os.environ.get(secret_env)
            if not value:
                raise SettingError(f"--webhook-secret-env {secret_env}: that environment variable is not set or empty")
            secret = value.encode("utf-8")
        webhook_settings = WebhookSettings(webhook, timeout=webhook_timeout, secret=secret,
                                           headers=tuple(parse_header(text) for text in headers))
    mqtt_url, username, password_env, tls, ca, results_rate = (options.pop(k) for k in (
        "mqtt_url", "mqtt_username", "mqtt_password_env", "mqtt_tls", "mqtt_ca", "mqtt_results_rate"))
    mqtt_settings = None
    if mqtt_url:
        from mrkd.runtime.outputs.mqtt import MqttSettings
        password = None
        if password_env:
            password = os.environ.get(password_env)
            if password is None:
                raise SettingError(f"--mqtt-password-env {password_env}: that environment variable is not set")
        mqtt_settings = MqttSettings.from_url(mqtt_url, tls=tls, ca_certs=ca, username=username, password=password,
                                              results_rate=results_rate)
    elif username or password_env or tls or ca or results_rate:
        raise SettingError("the --mqtt-* options need --mqtt mqtt://HOST:PORT/PREFIX")
    http, http_cert, http_key, http_allowed_hosts = (options.pop(k) for k in ("http_address", "http_cert", "http_key",
                                                                             "http_allowed_hosts"))
    if http:
        from mrkd.runtime.outputs.web import parse_address
        parse_address(http)
    evidence = None
    folder, ok_every, max_mb = (options.pop(k) for k in ("evidence_folder", "evidence_ok_every", "evidence_max_mb"))
    if folder:
        from mrkd.runtime.outputs.evidence import EvidenceSettings
        evidence = EvidenceSettings(folder, ok_every=ok_every, max_bytes=int(max_mb * 2 ** 20))
    elif ok_every:
        raise SettingError("--evidence-ok-every needs --evidence DIR")
    return OutputSettings(events=options.pop("events"), parts_log=options.pop("parts_log"),
                          snapshots=options.pop("snapshots"), evidence=evidence,
                          snapshot_format=options.pop("snapshot_format"), webhook=webhook_settings, mqtt=mqtt_settings,
                          http=http, http_cert=http_cert, http_key=http_key,
                          http_allowed_hosts=tuple(http_allowed_hosts), save_video=options.pop("save_video"),
                          video_fps=options["fps"] or 15.0, show=options.pop("show"))


def pop_run_settings(options: dict):
    """RunSettings from (and taken out of) run_command's keyword options."""
    from mrkd.runtime.line.loop import RunSettings
    return RunSettings(**{name: options.pop(name) for name in ("max_frames", "status_every", "batch",
                                                               "batch_timeout")})


def pop_camera_defaults(options: dict, part: dict) -> dict:
    """The camera fields the command line gives every camera (the line file may override them): the
    alarm settings (AlarmSettings' fields, the options of the same names) and the source's."""
    from mrkd.runtime.line.alarms import ALARM_FIELDS, parse_debounce
    defaults = {name: options.pop(name) for name in (*ALARM_FIELDS, "size", "fps", "loop", "ignore_mask")}
    defaults["debounce"] = parse_debounce(defaults["debounce"])
    from mrkd.runtime.line.linefile import MAX_DEBOUNCE_WINDOW
    if defaults["debounce"][1] > MAX_DEBOUNCE_WINDOW:
        k, n = defaults["debounce"]
        raise SettingError(f"--debounce {k}/{n}: N is at most {MAX_DEBOUNCE_WINDOW} frames")
    if part["trigger_mode"]:
        defaults["trigger"] = part["trigger_mode"]
    if part["features"]:
        from mrkd.runtime.sources.gige import parse_feature
        defaults["features"] = tuple(parse_feature(text) for text in part["features"])
    return defaults


def refuse_empty_text(command: click.Command, values: dict) -> None:
    """SettingError for a text option given as "" (an unset shell variable, ``--webhook "$URL"``): these
    options were read as not given, so the run went on without the webhook, MQTT or page it was asked
    for, or (--modbus "") served on a default address. Paths are refused empty by mrkd/cli.py."""
    for param in command.params:
        value = values.get(param.name)
        texts = value if isinstance(value, (tuple, list)) else (value,)
        empty = [text for text in texts if isinstance(text, str) and not text.strip()]
        if param.type is click.STRING and empty:
            raise SettingError(f"{param.opts[0] if param.opts else param.name} {empty[0]!r}: an empty value; give "
                               f"one, or leave the option out")


# camera field -> (run_command's parameter, its option): the command line's camera options
CAMERA_OPTIONS = {"threshold": ("threshold", "--threshold"), "debounce": ("debounce", "--debounce"),
                  "cooldown": ("cooldown", "--cooldown"), "cooldown_frames": ("cooldown_frames", "--cooldown-frames"),
                  "size": ("size", "--size"), "fps": ("fps", "--fps"), "loop": ("loop", "--loop"),
                  "trigger": ("trigger_mode", "--trigger"), "features": ("features", "--feature"),
                  "ignore_mask": ("ignore_mask", "--ignore-mask")}


def line_file_overrides(line, camera_defaults: dict, ctx: click.Context) -> list:
    """One warning per camera option typed on the command line that the line file sets otherwise for a
    camera: the file's fields win (the options are their defaults), and `--line line.toml --threshold 0.5`
    ran a camera at the file's threshold, said only as "given (--threshold or the line file)"."""
    from mrkd.runtime.sources import SourceOptions
    typed = {field for field, (param, _) in CAMERA_OPTIONS.items()
             if ctx.get_parameter_source(param) in (click.core.ParameterSource.COMMANDLINE,
                                                    click.core.ParameterSource.ENVIRONMENT)}
    wanted = dict(camera_defaults, size=SourceOptions.parse_size(camera_defaults.get("size")))
    def shown(field, value):
        if field == "debounce":
            return "%d/%d" % value
        if field == "size" and value:
            return "%dx%d" % value
        if field == "features":
            return ",".join(f"{name}={setting}" for name, setting in value) or "none"
        return f"{value:g}" if isinstance(value, float) else str(value)

    warnings = []
    for camera in line.cameras:
        for field in sorted(typed):
            value = getattr(camera, field)
            if value != wanted.get(field):
                warnings.append(warning_line(
                    f"camera {camera.name}: {field} {shown(field, value)} from the line file, not "
                    f"{CAMERA_OPTIONS[field][1]} {shown(field, wanted.get(field))} (a camera's fields in the line "
                    f"file win over these options); set it in one place"))
    return warnings


def check_postprocess(impl: str, detectors=None) -> None:
    """SettingError when ``--postprocess`` names an implementation this machine or a model's backend
    cannot run: `--postprocess cuda` without a CUDA device ended in a traceback at the first frame of a
    per-scale model. Without ``detectors``: the machine; with them: each one's backend too."""
    if impl in ("auto", "numpy"):
        return
    from mrkd.runtime import postprocess
    try:
        postprocess.resolve_impl(impl, on_device=impl == "cuda")
    except RuntimeError as exc:
        raise SettingError(f"--postprocess {impl}: {exc}; use --postprocess auto") from None
    for detector in (detectors or {}).values():
        if impl == "cuda" and detector.metadata.per_scale_outputs and not detector.backend.has_device_outputs:
            raise SettingError(f"--postprocess cuda: {detector.model_path.name} runs on a backend that hands its "
                               f"outputs to the host ({detector.backend.describe()}); the CUDA post-processing needs "
                               f"them on the GPU (TensorRT): use --postprocess auto or cpu")


def summary_json(summary: dict) -> str:
    """The summary as strict JSON: a number that is not finite (the latency of a camera that never
    delivered a frame) is null, as /healthz has it; bare NaN broke jq and JavaScript readers."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value
    return json.dumps(finite(summary), indent=2, allow_nan=False)


def check_summary_target(path) -> Optional[str]:
    """``--summary FILE`` may replace an earlier run's summary, never another file (a model, its sidecar,
    an events log): said before the line starts, not after a shift's work. A file that holds no data (size
    0, or only zeros: what a power cut leaves of a file whose data never reached the disk) is no one's
    either: replaced, and the warning that says so returned; else None."""
    if not path or not Path(path).exists():
        return None
    if not Path(path).is_file():       # a device or a FIFO: reading it hung or filled the memory
        raise SettingError(f"--summary {path}: not a regular file; the summary is written to a file (name a new "
                           "one); it is also printed on standard output")
    try:
        data = Path(path).read_bytes() if Path(path).stat().st_size < 1 << 24 else None
        earlier = json.loads(data.decode("utf-8")) if data and data.strip(b"\0") else None
    except (OSError, UnicodeDecodeError, ValueError):
        data = earlier = None
    if data is not None and not data.strip(b"\0"):
        size = f"{len(data)} bytes, all zero" if data else "0 bytes"
        return warning_line(f"--summary {path}: holds no data ({size}: a power cut before its data reached the "
                            "disk?); this run's summary replaces it")
    if not (isinstance(earlier, dict) and "outputs" in earlier and ("frames" in earlier or "parts" in earlier)):
        raise SettingError(f"--summary {path}: exists and is not an earlier `mrkd run` summary; it is never "
                           "written over (name a new file)")
    return None


def threshold_off_scale(threshold: float, detector) -> str:
    """Why a camera's own threshold looks like another model's (empty when it does not): off the
    model's calibrated threshold's scale (swap.on_one_scale, the hot swap's test: within 2x), a copied
    example value (0.42 against scores near 85) alarms on every frame, or a number far above the scores
    lets every defect pass, without a word."""
    from mrkd.runtime.line.swap import on_one_scale
    calibrated = detector.threshold
    if calibrated is None or not calibrated > 0:
        return ""
    ratio = threshold / calibrated
    if on_one_scale(ratio):
        return ""
    outcome = "almost every frame or part would alarm" if ratio < 1 else "defects may never reach it"
    # 0 or below (threshold = 0 read as "the model's") alarmed on every frame without a word; a ratio
    # past a float's range read "infx"
    times = ("at or below 0, under" if threshold <= 0 else f"{ratio:.3g}x" if math.isfinite(ratio)
             else "far above")
    return (f"threshold {threshold:g} is {times} the model's calibrated {calibrated:.4g} (its good parts "
            f"score near that): {outcome}; give a threshold on this model's scale, or leave it out")


@click.command("run", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(exists=True, dir_okay=False), required=False)
@click.option("--source", "-s", "sources", multiple=True,
              help="Frames to score: camera index (0), v4l2:///dev/video0, csi://0, rtsp://.., http://.., "
                   "a video file, an image folder or a glob. Repeat as NAME=URI for several cameras sharing "
                   "MODEL (a plain URI is named cam0, cam1, ...).")
@click.option("--line", "line_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TOML line file: [[camera]] tables with name, source, model and optional threshold, debounce, "
                   "cooldown, cooldown_frames, size, fps, loop, trigger, features (the options below are their "
                   "defaults; MODEL "
                   "is the default model); an [inference] table sets backend, threads, providers, postprocess.")
@click.option("--backend", type=BackendChoice(), default=None,
              help="Inference backend (NAME:PRECISION sets OpenVINO's fp32/bf16); auto (the default) = TensorRT for "
                   ".engine/.plan; for .onnx ONNX Runtime's TensorRT/CUDA on NVIDIA GPUs, OpenVINO on x86 "
                   "(Intel, AMD) CPUs where installed, else ONNX Runtime. Over the line file's [inference] backend.")
@click.option("--providers", default=None,
              help="ONNX Runtime execution providers in order, comma-separated (tensorrt,cuda,cpu); "
                   "default: every available one.")
@click.option("--threads", type=IntegerRange(0, 1024), default=None,
              help="CPU inference threads of ONNX Runtime / OpenVINO (default: their own).")
@click.option("--postprocess", type=click.Choice(("auto",) + POSTPROCESS_IMPLS), default=None,
              help="Post-processing implementation for models with per-scale outputs (default: auto; over the line "
                   "file's [inference] postprocess).")
@click.option("--threshold", type=FINITE, default=None,
              help="Alarm threshold on the image score (default: the calibrated one in the model metadata).")
@click.option("--debounce", default="1/1", show_default=True,
              help="K/N: alarm when K of the last N frames are anomalous.")
@click.option("--cooldown", type=seconds(0), default=5.0, show_default=True,
              help="Seconds (of frame time) after an alarm during which no new alarm is raised.")
@click.option("--cooldown-frames", type=IntegerRange(min=0), default=0, show_default=True,
              help="Frames after an alarm during which no new alarm is raised (with --cooldown, both must pass).")
@click.option("--events", type=click.Path(dir_okay=False), default=None,
              help="JSON-lines event log to append alarms to.")
@click.option("--parts-log", type=click.Path(dir_okay=False), default=None,
              help="JSON-lines traceability log of every judged part, OK included (--trigger software/hardware): "
                   "one appended line per part with its id, time, verdict, score and threshold per camera, model "
                   "sha256, recipe, and the event id / snapshot / evidence of an NG part.")
@click.option("--snapshots", type=click.Path(file_okay=False), default=None,
              help="Folder for one heat-map snapshot per alarm.")
@click.option("--snapshot-format", type=click.Choice([".jpg", ".png"]), default=".jpg", show_default=True,
              help="Snapshot image format.")
@click.option("--evidence", "evidence_folder", type=click.Path(file_okay=False), default=None,
              help="Folder for the evidence of every alarm / NG part: the image the model judged, lossless PNG "
                   "(8-bit BGR: a Mono8 or 8-bit colour frame exactly, a 10-16-bit, Bayer or RGBA one as converted "
                   "for the model), its path and sha256 in the event (what mrkd review and refit read).")
@click.option("--evidence-ok-every", type=IntegerRange(min=0), default=0, show_default=True,
              help="Also keep one OK frame/part of every N per camera as evidence (0 = none).")
@click.option("--evidence-max-mb", type=FiniteFloatRange(min=1, max=1e9), default=2048.0, show_default=True,
              help="Disk budget of the evidence folder: past it OK samples are deleted first; alarm/NG evidence "
                   "is never deleted (health shows 'over budget').")
@click.option("--webhook", default=None, help="URL to POST each alarm event (JSON) to, in the background.")
@click.option("--webhook-timeout", type=seconds(0, open_min=True, maximum=3600), default=2.0, show_default=True,
              help="Seconds per webhook POST before it counts as failed (it is retried).")
@line_output_options
@part_options
@plc_options
@click.option("--save-video", type=click.Path(dir_okay=False), default=None,
              help="Write annotated frames (heat-map, score, threshold) to this video file: .avi (MJPG), .mp4 or .mkv. "
                   "An existing file is never written over; strftime fields in the name take the start time "
                   "(rec-%Y%m%d-%H%M%S.avi: a new file at each start of a line its supervisor restarts).")
@click.option("--show", is_flag=True, help="Show annotated frames in a window (needs an OpenCV with GUI).")
@click.option("--max-frames", type=IntegerRange(min=1), default=None,
              help="Stop each camera after this many frames; the run ends when every camera has (a network camera "
                   "that never comes up keeps it running: it is tried again until a signal stops the run).")
@click.option("--status-every", type=seconds(0), default=5.0, show_default=True,
              help="Seconds between status lines (fps, latency p50/p99, dropped frames); 0 = none.")
@click.option("--batch", type=IntegerRange(1, 4096), default=1, show_default=True,
              help="Frames per camera per inference call (files and folders gain throughput; cameras lose "
                   "latency). Cameras sharing a model are always scored together.")
@click.option("--batch-timeout", type=seconds(0, maximum=60), default=None,
              help="Seconds to wait for the other cameras' frames after the oldest one in hand (default: the "
                   "fastest camera's frame period, at most 0.2 s).")
@click.option("--size", default=None, help="WIDTHxHEIGHT to resize source frames to (cameras are asked for it).")
@click.option("--fps", type=FiniteFloatRange(0, 1000, min_open=True), default=None,
              help="Camera rate to request, or the rate to replay files/folders at (default: as fast as read).")
@click.option("--loop", is_flag=True, help="Restart video files and folders at their end.")
@click.option("--ignore-mask", type=click.Path(), default=None,
              help="Image of the cameras' frame size, white where they are not judged (a date code, a clamp): "
                   "the anomaly map there is set to 0 before the image score is taken (a line file's camera may "
                   "set its own ignore_mask).")
@click.option("--summary", "summary_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the end-of-run summary as JSON to this file.")
@error_boundary
@logging_through_queue      # a stderr nobody reads blocks no thread that logs (the PLC's event loop)
def run_command(model, sources, line_file, **options):
    """Stream frames from one or more cameras through MODEL (an .engine or an .onnx file with its .json
    sidecar) and raise alarms: `mrkd run MODEL --source URI`, `mrkd run MODEL --source left=URI
    --source right=URI`, or `mrkd run --line line.toml`. Ctrl-C / SIGTERM stop cleanly: every event
    is written before exit."""
    from mrkd.atomic import atomic_write_text
    from mrkd.runtime.line.loop import open_detectors, open_sources, outputs_summary, run_line
    from mrkd.runtime.line.linefile import load_plc_settings
    from mrkd.runtime.plc.servers import pop_plc_settings
    from mrkd.runtime.line.stream import stop_on_signals
    from mrkd.runtime.outputs import build_outputs
    from mrkd.runtime.outputs.base import stop_each

    refuse_empty_text(click.get_current_context().command, click.get_current_context().params)
    summary_path = options.pop("summary_path")
    empty_summary = check_summary_target(summary_path)
    if empty_summary:
        status_to_stderr(empty_summary)
    part = pop_part_options(options)
    plc = pop_plc_settings(options, load_plc_settings(line_file) if line_file else None)
    plc.opcua_password()     # an unset variable is refused now, not after the models have loaded
    output_settings = pop_output_settings(options)
    from mrkd.runtime.control import pop_control_options     # POST /reload, /review
    control = pop_control_options(options, output_settings.http, tls=output_settings.http_cert is not None,
                                  events=output_settings.events, evidence=output_settings.evidence is not None)
    shadow_model = options.pop("shadow_model")
    run_settings = pop_run_settings(options)
    camera_defaults = pop_camera_defaults(options, part)
    providers = options.pop("providers")
    check_postprocess(options["postprocess"] or "auto")
    line = build_line(model, sources, line_file, camera_defaults, backend=options.pop("backend"),
                      postprocess=options.pop("postprocess"), threads=options.pop("threads"),
                      providers=tuple(providers.split(",")) if providers else None)
    if line_file:
        for warning in line_file_overrides(line, camera_defaults, click.get_current_context()):
            status_to_stderr(warning)
    if (output_settings.save_video or output_settings.show) and len(line.cameras) > 1:
        raise SettingError("--save-video and --show take one camera; this line has "
                           f"{len(line.cameras)}")
    triggered = any(c.trigger != "free" for c in line.cameras)
    if triggered and not (part["trigger_stdin"] or part["trigger_every"] or plc.wanted):
        raise SettingError("--trigger software/hardware judges parts on trigger: give a trigger source "
                           "(--trigger-stdin, --trigger-every SECONDS, --modbus or --opcua)")
    if not triggered and plc.wanted:
        raise SettingError("--modbus/--opcua (or [plc] in the line file) trigger parts: they need --trigger software or "
                           "hardware (or trigger = ... in the line file)")
    part_only = [flag for flag, name in (("--trigger-stdin", "trigger_stdin"), ("--trigger-every", "trigger_every"),
                                         ("--max-parts", "max_parts"), ("--part-queue", "part_queue"),
                                         ("--part-images", "part_images"), ("--part-timeout", "part_timeout"),
                                         ("--part-early", "part_early"), ("--part-max-delay", "part_max_delay"))
                 if part[name] is not None and part[name] is not False]   # 0 is a value given
    if line.part is not None:
        part_only.append("[part]/[recipes] in the line file")
    if triggered and (output_settings.save_video or output_settings.show):   # they would record nothing, exit 0
        raise SettingError("--save-video and --show show a free run's frames; a triggered line (--trigger software/"
                           "hardware) judges parts, whose images --evidence (with --evidence-ok-every) and "
                           "--snapshots keep")
    if not triggered and output_settings.parts_log:     # a free run judges no parts: the log would stay empty
        raise SettingError("--parts-log records judged parts: it needs --trigger software or hardware (or "
                           "trigger = ... in the line file); a free run's alarms go to --events")
    if not triggered and part_only:     # silently ignored, they would let a user believe parts are judged
        raise SettingError(f"{', '.join(part_only)} judge parts: they need --trigger software or hardware "
                           "(or trigger = ... in the line file)")
    detectors, frames, outputs, running = {}, {}, [], False
    from mrkd.runtime.line.swap import hangups_held, ignore_hangups_from_now, reload_on_sighup   # hot swap
    signals = contextlib.ExitStack()     # both handlers go back in the finally below
    # a SIGHUP while the models load is answered once the line runs, not fatal
    held = signals.enter_context(hangups_held())
    # Ctrl-C / SIGTERM from here on end the run cleanly, also while models load or a camera takes seconds
    # to open (a KeyboardInterrupt inside Aravis' open came out as a traceback): the line then stops at once.
    stop = signals.enter_context(stop_on_signals(threading.Event()))
    try:       # the error itself goes to mrkd.errors.error_boundary
        from mrkd.runtime.clock_steps import warn_if_before_install
        warn_if_before_install()      # a device booted at 1970: every stamp and certificate check is off
        detectors = open_detectors(line)
        check_postprocess(line.postprocess, detectors)
        frames = {} if triggered else open_sources(line, stop=stop)
        for detector in detectors.values():
            status_to_stderr(detector.describe())
        for camera in line.cameras:       # a camera's own threshold wins over its model's: say which is used
            if camera.ignore_mask is not None:
                from mrkd.runtime.line.loop import camera_mask
                status_to_stderr(f"camera {camera.name}: {camera_mask(camera).describe()}")
            if camera.alarm.threshold is not None:
                status_to_stderr(f"camera {camera.name}: threshold {camera.alarm.threshold} given (--threshold or "
                                 "the line file); the model's is not used")
                off_scale = threshold_off_scale(camera.alarm.threshold, detectors[str(Path(camera.model).resolve())])
                if off_scale:
                    status_to_stderr(warning_line(f"camera {camera.name}: {off_scale}"))
        outputs = build_outputs(output_settings)
        page = outputs_summary(outputs).get("page")
        if page:
            status_to_stderr(f"operator page {page['target']}/  metrics {page['target']}/metrics")
        slots, shadow = live_model_controls(line, detectors, outputs, control, output_settings, shadow_model)
        for candidate in shadow:        # said as the live models are: it may run another precision
            status_to_stderr(f"shadow candidate {candidate.detector.describe()}")
        # SIGHUP also reads the servers' certificates again (the page's --http-cert, the OPC UA and Modbus/TCP
        # Security servers': a renewal, no restart); the PLC servers join ``outputs`` once run_parts starts
        # them. Called from the signal handler: the loads run on a thread of their own.
        def reload_certificates(reason: str) -> None:
            servers = [o for o in list(outputs) if callable(getattr(o, "reload_certificate", None))]
            if servers:
                threading.Thread(target=lambda: [server.reload_certificate(reason) for server in servers],
                                 name="certificate-reload", daemon=True).start()
        reload_also = [reload_certificates]
        running = True       # from here the runner tells every output on_stop itself
        if triggered:
            with reload_on_sighup(slots, reload_also, held):
                summary = run_parts(line, part, detectors, outputs, run_settings.status_every, plc, slots, shadow,
                                    stop=stop)
            summary.setdefault("outputs", outputs_summary(outputs))
        else:
            with reload_on_sighup(slots, reload_also, held):
                summary = run_line(line, list(outputs) + [slots] + shadow, run_settings, stop=stop,
                                   detectors=detectors, sources=frames, slots=slots,
                                   status=status_to_stderr)
            frames = {}       # run_line closed them
        # a reload a late SIGHUP started is still loading: let it finish (an OpenVINO model compiling on a
        # daemon thread while the interpreter exits aborts the process) and show it in the report
        if not slots.wait_idle(120):
            status_to_stderr(warning_line("a model reload was still running at the stop"))
        slots.drop_unapplied()      # a version staged as the run finished: said, not left unanswered
        summary["model_swaps"] = slots.report()
        if shadow:
            summary["shadow"] = shadow[0].summary()
        text = summary_json(summary)
        click.echo(text)
        undelivered = undelivered_outputs(summary.get("outputs", {}))
        if undelivered:
            status_to_stderr(undelivered)
        if summary_path:
            atomic_write_text(summary_path, text + "\n")
        # held's handler took the SIGHUPs after the line's (its default would end the run before the summary)
        if held is not None and held.is_set():
            status_to_stderr("SIGHUP: the run is stopping; the model is not reloaded")
    except BaseException:
        for source in frames.values():
            source.close()
        if not running:
            stop_each(outputs)         # a failed start: stop what started
        raise
    finally:
        signals.close()
        ignore_hangups_from_now()
        for detector in detectors.values():
            detector.close()
    unread = [name for name, camera in (summary.get("cameras") or {}).items() if not triggered
              and camera.get("frames") == 0 and (camera.get("source") or {}).get("bad_frames")]
    if unread:      # a folder of files none of which is an image judged nothing: not a successful run
        from mrkd.runtime.sources import SourceError
        raise SourceError("; ".join(f"camera {name!r}: none of its {summary['cameras'][name]['source']['bad_frames']}"
                                    f" frame(s) could be read, nothing was judged" for name in unread)
                          + " (the summary above counts them)")
    failed = summary.get("failed_cameras") or []
    if failed:      # never exit 0 after a camera's source died: the run did not do what was asked
        from mrkd.runtime.sources import SourceError
        raise SourceError("; ".join(f"camera {name!r}: its source failed and stopped "
                                    f"({summary['cameras'][name]['source_failed']})" for name in failed)
                          + " (the summary above counts what was read before)")


def undelivered_outputs(outputs: Mapping[str, dict]) -> Optional[str]:
    """The end-of-run warning naming each output (the summary's "outputs") that did not deliver everything,
    with its last error where it has one (frames dropped behind a slow encoder have none); None if all did."""
    failing = [f"{name} ({health['failed']} failed, {health.get('dropped', 0)} dropped"
               + (f": {health['detail']})" if health["detail"] else ")")
               for name, health in outputs.items() if not health["ok"] or health["failed"] or health.get("dropped")]
    return warning_line("outputs that did not deliver everything: " + "; ".join(failing)) if failing else None


def parse_named_source(text: str, index: int):
    """"NAME=URI" -> (NAME, URI); a plain URI (or one whose text before '=' is no camera name, as in
    rtsp://host/s?user=x) -> (None, URI): named by named_sources."""
    from mrkd.runtime.line.loop import CAMERA_NAME
    name, sep, uri = text.partition("=")
    if sep and CAMERA_NAME.match(name) and uri and not Path(text).exists():
        return name, uri
    return None, text


def named_sources(texts):
    """[(name, URI)] for --source texts: an unnamed source is "cam<its position>", or the next free
    cam<N> when another source already took that name (``--source cam1=A --source B``: B is cam2)."""
    parsed = [parse_named_source(text, i) for i, text in enumerate(texts)]
    taken = {name for name, _ in parsed if name is not None}
    named = []
    for index, (name, uri) in enumerate(parsed):
        if name is None:
            number = index
            while f"cam{number}" in taken:
                number += 1
            name = f"cam{number}"
            taken.add(name)
        named.append((name, uri))
    return named


def build_line(model, sources, line_file, camera_defaults: dict, **line_options):
    """The Line that `mrkd run`'s options describe (ValueError with a one-line message otherwise)."""
    from mrkd.runtime.line.loop import Camera, Line
    from mrkd.runtime.line.linefile import load_line
    from mrkd.runtime.sources import SourceOptions

    defaults = dict(camera_defaults, size=SourceOptions.parse_size(camera_defaults.get("size")))
    if line_file:
        if sources:
            raise SettingError("give cameras either with --source or in --line, not both")
        if model:
            defaults["model"] = model
        return load_line(line_file, defaults, **line_options)
    if not model or not sources:
        raise SettingError("give MODEL and at least one --source, or a --line file")
    cameras = [Camera(name, uri, model, **defaults)
               for name, uri in named_sources(sources)]
    return Line(tuple(cameras), **{name: value for name, value in line_options.items() if value is not None})
