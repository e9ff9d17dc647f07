"""Line outputs off the hot path: frames/s of one camera with the outputs off, and with MQTT, metrics
and the operator page on and the page open, alternated in the same process on the same frames.

"On": MqttObserver to a real Mosquitto on loopback (events, and results at 10/s), MetricsObserver,
the OperatorServer, and a watcher in a separate process that reads the camera's MJPEG live view and
the SSE stream as a browser would (without a browser's rendering, which runs on the viewer's own
machine). "Off": the same loop with only the JSON-lines event log. Both score VGA frames as fast as
the model allows, with alarms (threshold at the median score, cooldown 0.2 s) so events flow too.
Mosquitto missing: the MQTT part is left out and the result says so.

Evidence rows (``--evidence DIR --evidence-ok-every 1``, the case a probe measured at 19.6 -> 9.5 frames/s):
1000x800 noise frames (the PNG encoder's worst case), the threshold near the top of their scores so
that a few alarm too, alternated in the same process: "on the loop thread" is where the lossless encode
and fsync ran before (every OK sample and each alarm's evidence written by the loop's own hooks),
"off the loop" is the writer as ``build_outputs`` makes it (OK samples on its worker, bounded; the
alarm's evidence on the loop's alarm notifier), and the same frames without evidence. Only the
JSON-lines event log besides. The worker's encode still takes CPU: on a machine with few cores the
loop gains less than it would with a core to spare.

Video rows (``--save-video out.avi``, MJPG), alternated with the evidence rows on the same noise frames:
"on the loop thread" is the annotation (heat-map blend, text) and encode where they ran before
(``VideoFileSink`` without ``background``), "off the loop" the sink as ``build_outputs`` makes it (its
worker, a bounded queue: frames past it are left out of the file and counted, ``video_dropped``). Their
``hooks_us_per_frame_VideoFileSink`` is the time the sink's hook took on the loop thread per frame.

    python -m mrkd.benchmarks.bench_line_outputs [--quick]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

from mrkd.runtime.outputs.base import LineObserver

FRAME_SIZE = (640, 480)
EVIDENCE_FRAME_SIZE = (1000, 800)     # width, height: the probe's frames
EVIDENCE_ROWS = {"none": "noise frames, no evidence", "loop": "evidence ok-every 1, on the loop thread (before)",
                 "worker": "evidence ok-every 1, off the loop"}
VIDEO_ROWS = {"loop": "video .avi, on the loop thread (before)", "worker": "video .avi, off the loop"}
STEADY_FROM = 0.2     # fps is measured from this fraction of a run's frames on (page open, models warm)

# Runs in its own process: reads the live view and the event stream until killed, counts what came.
WATCHER = r"""
import sys, threading, urllib.request
base = sys.argv[1]
def read(path, size):
    with urllib.request.urlopen(base + path) as stream:
        while stream.read(size):
            pass
threading.Thread(target=read, args=("/events", 256), daemon=True).start()
read("/stream/cam0.mjpg", 65536)
"""


def _frames(category_dir: Path, count: int):
    import cv2

    from mrkd.runtime.images import read_image
    paths = sorted((category_dir / "test").rglob("*.png"))
    return [cv2.resize(read_image(p), FRAME_SIZE) for p in (paths * (count // max(len(paths), 1) + 1))[:count]]


class _FrameClock(LineObserver):
    """Times each scored frame (both conditions carry it, so its own cost cancels out); ``probe`` says
    whether the page is being watched at that frame."""

    def __init__(self):
        self.times: List[float] = []
        self.watched: List[bool] = []
        self.probe = None

    def on_frame(self, result):
        self.times.append(time.perf_counter())
        if self.probe is not None:
            self.watched.append(self.probe())

    def steady_fps(self) -> float:
        first = int(len(self.times) * STEADY_FROM)
        span = self.times[-1] - self.times[first]
        return (len(self.times) - 1 - first) / span if span > 0 else float("nan")


class _Timed(LineObserver):
    """Wraps an observer and adds up the loop-thread time its hooks take (what the outputs cost scoring)."""

    def __init__(self, inner):
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def _timed(self, hook, *args):
        started = time.perf_counter()
        getattr(self.inner, hook)(*args)
        self.seconds += time.perf_counter() - started
        self.calls += hook == "on_frame"

    def on_start(self, cameras):
        self.inner.on_start(cameras)

    def on_frame(self, result):
        self._timed("on_frame", result)

    def on_event(self, camera, event):
        self._timed("on_event", camera, event)

    def on_status(self, status):
        self._timed("on_status", status)

    def on_stop(self):
        self.inner.on_stop()

    def health(self):
        return self.inner.health()


class _EvidenceOnLoop(LineObserver):
    """The evidence writer's work where it ran before: on the loop thread, in the frame's own hooks (an
    OK sample in on_frame, an alarm's lossless evidence with the alarm); the cost "before" in this process."""

    def __init__(self, writer):
        self.writer = writer

    def on_frame(self, result):
        if result.event is not None:
            self.writer.event_fields(result)
        else:
            self.writer.on_frame(result)

    def health(self):
        return self.writer.health()


def _evidence_observers(workdir: Path, label: str, on_loop: bool) -> list:
    from mrkd.runtime.outputs import OutputSettings, build_outputs
    from mrkd.runtime.outputs.evidence import EvidenceSettings, EvidenceWriter
    settings = EvidenceSettings(str(workdir / f"evidence_{label}"), ok_every=1)
    if on_loop:
        return [_EvidenceOnLoop(EvidenceWriter(settings, background=False))]
    return build_outputs(OutputSettings(evidence=settings))


def _video_observers(workdir: Path, label: str, on_loop: bool) -> list:
    from mrkd.runtime.outputs import OutputSettings, build_outputs
    from mrkd.runtime.outputs.video import VideoFileSink
    path = workdir / f"video_{label}.avi"
    if on_loop:
        return [VideoFileSink(path, fps=15.0, background=False)]
    return build_outputs(OutputSettings(save_video=str(path), video_fps=15.0))


def _noise_frames(count: int) -> list:
    import numpy as np
    rng = np.random.default_rng(0)
    width, height = EVIDENCE_FRAME_SIZE
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def _one_run(onnx_path: Path, frames: list, frames_per_run: int, threshold: float, threads: int, workdir: Path,
             label: str, outputs_on: bool, broker, evidence: Optional[str] = None,
             video: Optional[str] = None) -> dict:
    from mrkd.runtime.line.alarms import AlarmPolicy
    from mrkd.runtime.detector import Detector
    from mrkd.runtime.outputs import OutputSettings, build_outputs
    from mrkd.runtime.line.loop import Camera, Line, run_line
    from mrkd.runtime.sources import open_source

    clock = _FrameClock()
    observers, watcher, server, mqtt = [clock], None, None, None
    if evidence in ("loop", "worker"):     # the work on the loop thread (as before), or off it (now)
        observers += _evidence_observers(workdir, label, on_loop=evidence == "loop")
    if video in ("loop", "worker"):        # annotation + encode on the loop thread (before), or off it (now)
        # timed: the loop thread's own cost per frame (the hook), less noisy than frames/s on a busy machine
        observers += [_Timed(o) for o in _video_observers(workdir, label, on_loop=video == "loop")]
    if outputs_on:
        from mrkd.runtime.outputs.metrics import MetricsObserver
        from mrkd.runtime.outputs.web import OperatorServer
        if broker is not None:
            from mrkd.runtime.outputs.mqtt import MqttObserver, MqttSettings
            mqtt = MqttObserver(MqttSettings.from_url(broker.url("bench"), results_rate=10.0))
            observers.append(mqtt)
        metrics = MetricsObserver()
        server = OperatorServer("127.0.0.1", 0, metrics=metrics)
        observers += [metrics, server]
        metrics.see_outputs(observers)
        clock.probe = lambda: server.views["cam0"].watchers > 0 if server.started.is_set() else False
        observers = [clock] + [_Timed(o) for o in observers[1:]]
        watcher = subprocess.Popen([sys.executable, "-c", WATCHER, server.url],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    detector = Detector(onnx_path, backend="onnxruntime", threads=threads, threshold=threshold)
    line = Line((Camera("cam0", frames, str(onnx_path), threshold=threshold, cooldown=0.2),))
    source = open_source(frames, loop=True)
    if watcher is not None:       # the page is open (its event stream connected) before the first frame
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not server._clients:
            time.sleep(0.05)
    started = time.perf_counter()
    events = build_outputs(OutputSettings(events=str(workdir / f"events_{label}.jsonl")))
    summary = run_line(line, [*events, *observers], max_frames=frames_per_run,
                       status=lambda text: None, detectors={str(Path(onnx_path).resolve()): detector},
                       sources={"cam0": source},
                       policies={"cam0": AlarmPolicy(threshold, (1, 1), cooldown_s=0.2)})
    seconds = time.perf_counter() - started
    detector.close()
    row = {"outputs": "on, page open" if outputs_on else "off", "frames": summary["frames"],
           "alarms": summary["alarms"], "seconds": seconds, "fps": clock.steady_fps()}
    if evidence is not None:
        health = summary["outputs"].get("evidence", {})
        row.update(outputs=EVIDENCE_ROWS[evidence],
                   latency_p50_ms=summary["cameras"]["cam0"]["latency_ms"]["p50"],
                   evidence_written=health.get("sent", 0), evidence_dropped=health.get("dropped", 0),
                   evidence_failed=health.get("failed", 0))
    if video is not None:
        health = summary["outputs"].get("video", {})
        row.update(outputs=VIDEO_ROWS[video], latency_p50_ms=summary["cameras"]["cam0"]["latency_ms"]["p50"],
                   video_written=health.get("sent", 0), video_dropped=health.get("dropped", 0),
                   video_failed=health.get("failed", 0))
    for timed in (o for o in observers if isinstance(o, _Timed)):
        row[f"hooks_us_per_frame_{type(timed.inner).__name__}"] = 1e6 * timed.seconds / max(timed.calls, 1)
    if server is not None:
        row["live_view_jpegs"] = server.views["cam0"].encoded
        steady = clock.watched[int(len(clock.watched) * STEADY_FROM):]
        row["share_of_frames_watched"] = sum(steady) / max(len(steady), 1)
    if mqtt is not None:
        stats = mqtt.stats()["cam0"]
        row.update(mqtt_published=stats["published"], mqtt_dropped=stats["dropped"], mqtt_errors=stats["errors"])
    if watcher is not None:
        watcher.kill()
        watcher.wait()
    return row


def run(quick: bool = False, backbone: Optional[str] = None, image_size: Optional[int] = None, threads: int = 2,
        checkpoint: Optional[str] = None) -> dict:
    import numpy as np
    import torch

    from mrkd.benchmarks.bench_model import bench_data, load_or_build, test_batch
    from mrkd.benchmarks.mosquitto import Mosquitto
    from mrkd.export.exporter import export_onnx
    from mrkd.export.onnx_graph import ExportOptions

    backbone = backbone or ("resnet18" if quick else "wide_resnet50_2")    # a checkpoint brings its own
    image_size = image_size or (64 if quick else 256)
    frames_per_run, repeats = (30, 1) if quick else (300, 3)
    torch.set_num_threads(threads)
    model = load_or_build(checkpoint, backbone, image_size)
    rows: List[dict] = []
    broker = None
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        category = bench_data(model.config.image_size, workdir, quick)
        frames = _frames(category, 16)
        threshold = float(np.median(model.scores(torch.from_numpy(
            test_batch(category, model.config.image_size, model.config.mean, model.config.std))).numpy()))
        onnx_path = export_onnx(model, workdir / "fp32.onnx", ExportOptions(batch_range=(1, 1, 4))).path
        mqtt_note = "Mosquitto on loopback"
        if shutil.which("mosquitto"):
            (workdir / "broker").mkdir()
            broker = Mosquitto(folder=workdir / "broker").start()
        else:
            mqtt_note = "mosquitto not installed: MQTT left out (apt install mosquitto)"
        try:
            _one_run(onnx_path, frames, 10, threshold, threads, workdir, "warmup", False, None)
            for repeat in range(repeats):      # alternate, so drift in machine load hits both alike
                for on in (False, True):
                    rows.append(_one_run(onnx_path, frames, frames_per_run, threshold, threads, workdir,
                                         f"{repeat}_{on}", on, broker) | {"repeat": repeat})
            noise = _noise_frames(16)
            noise_threshold = _near_the_top(onnx_path, noise, threads)
            for repeat in range(1 if quick else 3):     # --quick is CI's smoke run: one alternation shows it works
                for where in ("none", "loop", "worker"):
                    rows.append(_one_run(onnx_path, noise, 2 * frames_per_run, noise_threshold, threads, workdir,
                                         f"evidence_{repeat}_{where}", False, None, evidence=where)
                                | {"repeat": repeat})
                for where in ("loop", "worker"):
                    rows.append(_one_run(onnx_path, noise, 2 * frames_per_run, noise_threshold, threads, workdir,
                                         f"video_{repeat}_{where}", False, None, video=where)
                                | {"repeat": repeat})
        finally:
            if broker is not None:
                broker.kill()
    off = [r["fps"] for r in rows if r["outputs"] == "off"]
    on = [r["fps"] for r in rows if r["outputs"] == "on, page open"]
    evidence_before, evidence_now, no_evidence, video_before, video_now = (
        [r["fps"] for r in rows if r["outputs"] == label] for label in (
            EVIDENCE_ROWS["loop"], EVIDENCE_ROWS["worker"], EVIDENCE_ROWS["none"], VIDEO_ROWS["loop"],
            VIDEO_ROWS["worker"]))
    return {"bench": "line_outputs", "backbone": model.config.backbone, "image_size": model.config.image_size,
            "frame_size": list(FRAME_SIZE), "frames_per_run": frames_per_run, "threads": threads, "mqtt": mqtt_note,
            "rows": rows, "fps_off_median": float(np.median(off)), "fps_on_median": float(np.median(on)),
            "on_over_off": float(np.median(on) / np.median(off)),
            "evidence_frame_size": list(EVIDENCE_FRAME_SIZE),
            "evidence_fps_none_median": float(np.median(no_evidence)),
            "evidence_fps_on_loop_median": float(np.median(evidence_before)),
            "evidence_fps_off_loop_median": float(np.median(evidence_now)),
            "evidence_off_over_on_loop": float(np.median(evidence_now) / np.median(evidence_before)),
            "video_fps_on_loop_median": float(np.median(video_before)),
            "video_fps_off_loop_median": float(np.median(video_now)),
            "video_off_over_on_loop": float(np.median(video_now) / np.median(video_before)),
            "video_dropped_off_loop": [r["video_dropped"] for r in rows if r["outputs"] == VIDEO_ROWS["worker"]],
            "video_hook_ms_per_frame_on_loop_median": _hook_ms(rows, VIDEO_ROWS["loop"]),
            "video_hook_ms_per_frame_off_loop_median": _hook_ms(rows, VIDEO_ROWS["worker"])}


def _hook_ms(rows: List[dict], label: str) -> float:
    """The median over ``label``'s runs of the loop-thread milliseconds per frame in the video sink's hook."""
    import numpy as np
    return float(np.median([r["hooks_us_per_frame_VideoFileSink"] / 1000 for r in rows if r["outputs"] == label]))


def _near_the_top(onnx_path: Path, frames: list, threads: int) -> float:
    """A threshold that the highest-scoring of ``frames`` reach (a few alarms, most frames OK)."""
    from mrkd.runtime.detector import Detector
    detector = Detector(onnx_path, backend="onnxruntime", threads=threads)
    try:
        scores = sorted(float(s) for k in range(0, len(frames), 4) for s in detector(frames[k:k + 4]).scores)
    finally:
        detector.close()
    return scores[-2]


if __name__ == "__main__":
    from mrkd.benchmarks.module_main import benchmark_main
    benchmark_main(__doc__, run)
