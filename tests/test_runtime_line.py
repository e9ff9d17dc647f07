"""Many cameras in one process: run_line against a numpy reference per camera, cross-camera batching,
a stalled camera that must not hold the others back, observers, the CLI and the line file."""

import hashlib
import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from runtime_fixtures import SIZE, build_tiny_model, defective_frame, normal_frame, reference_map

from mrkd.runtime import OutputSettings, build_outputs, read_events
from mrkd.runtime.line.loop import Camera, Line, LineError, run_line
from mrkd.runtime.line.linefile import LineFileError, parse_line
from mrkd.runtime.outputs.base import LineObserver


def reference_scores(frames):
    """The tiny model's image scores computed in numpy (resize mode squashes with INTER_AREA)."""
    squares = np.stack([cv2.resize(f, (SIZE, SIZE), interpolation=cv2.INTER_AREA) for f in frames])
    return reference_map(squares).reshape(len(frames), -1).max(axis=1)


def reference_alarms(scores, threshold, k, n):
    """Indices where a k-of-n alarm fires (no cooldown), a second implementation of the policy."""
    return [i for i, s in enumerate(scores)
            if s >= threshold and sum(v >= threshold for v in scores[max(0, i - n + 1):i + 1]) >= k]


def pattern_frames(seed, count, defective_every):
    rng = np.random.default_rng(seed)
    return [defective_frame(rng) if i % defective_every == defective_every - 1 else normal_frame(rng)
            for i in range(count)]


def write_folder(folder: Path, frames) -> Path:
    folder.mkdir(parents=True)
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:04d}.png"), frame)      # lossless: the reference sees the same pixels
    return folder


class Recorder(LineObserver):
    def __init__(self):
        self.cameras, self.frames, self.events, self.statuses, self.stopped = None, [], [], [], 0

    def on_start(self, cameras):
        self.cameras = list(cameras)

    def on_frame(self, result):
        self.frames.append((result.camera, result.frame_index, result.score, result.anomalous, time.monotonic(),
                            result.latency_s))

    def on_event(self, camera, event):
        self.events.append((camera, event))

    def on_status(self, status):
        self.statuses.append(status)

    def on_stop(self):
        self.stopped += 1


class Broken(LineObserver):
    def on_frame(self, result):
        raise RuntimeError("an output that fails")


@pytest.fixture
def two_models(tmp_path):
    return (build_tiny_model(tmp_path / "a.onnx", threshold=0.1),
            build_tiny_model(tmp_path / "b.onnx", uint8_input=True, threshold=0.05))


def test_three_cameras_two_models_match_the_reference_per_camera(tmp_path, two_models):
    model_a, model_b = two_models
    frames = {"left": pattern_frames(1, 24, 4), "right": pattern_frames(2, 24, 6), "top": pattern_frames(3, 24, 5)}
    write_folder(tmp_path / "left", frames["left"])
    write_folder(tmp_path / "right", frames["right"])
    paced = dict(cooldown=0, fps=100.0)     # replayed like cameras, so that rounds hold every camera
    line = Line((Camera("left", str(tmp_path / "left"), str(model_a), debounce=(1, 1), **paced),
                 Camera("right", str(tmp_path / "right"), str(model_a), debounce=(1, 2), **paced),
                 Camera("top", frames["top"], str(model_b), threshold=0.2, debounce=(1, 1), **paced)))
    recorder = Recorder()
    outputs = build_outputs(OutputSettings(events=str(tmp_path / "events.jsonl"), snapshots=str(tmp_path / "snaps")))
    summary = run_line(line, [*outputs, recorder, Broken()], status=lambda text: None)

    events = read_events(tmp_path / "events.jsonl")
    thresholds = {"left": 0.1, "right": 0.1, "top": 0.2}
    for name, camera_frames in frames.items():
        expected = reference_scores(camera_frames)
        scored = [(index, score) for cam, index, score, *_ in recorder.frames if cam == name]
        assert [index for index, _ in scored] == list(range(24))            # every frame, in order
        np.testing.assert_allclose([score for _, score in scored], expected, atol=1e-5)
        camera = next(c for c in line.cameras if c.name == name)
        fired = reference_alarms(list(expected), thresholds[name], *camera.debounce)
        assert fired, name
        assert [e["frame_index"] for e in events if e["camera"] == name] == fired
        snaps = sorted(p.name for p in (tmp_path / "snaps" / name).iterdir())
        assert len(snaps) == len(fired)
        assert summary["cameras"][name]["frames"] == 24 and summary["cameras"][name]["alarms"] == len(fired)
    assert [c for c, _ in recorder.events] == [e["camera"] for e in events]
    assert summary["frames"] == 72 and summary["alarms"] == len(events) == summary["events"]
    # left and right share model a: one call scores both cameras' frames (at most 3 frames in 2 calls a round).
    assert summary["frames_per_call"] > 1.3
    info = {c.name: c for c in recorder.cameras}
    assert info["left"].model_sha256 == hashlib.sha256(model_a.read_bytes()).hexdigest()
    assert info["top"].threshold == 0.2 and info["left"].threshold == 0.1
    # --backend auto: OpenVINO on an x86 CPU with openvino installed, else ONNX Runtime (choose_auto_backend);
    # f32 either way: this model's sidecar records no bf16 check
    from mrkd.runtime.backends import resolve_backend_name
    assert info["top"].backend == resolve_backend_name(model_a) and info["left"].precision == "fp32"
    assert recorder.stopped == 1
    assert {s.camera for s in recorder.statuses if s.up} == {"left", "right", "top"}


def test_without_batching_each_camera_gets_its_own_call(tmp_path, two_models):
    model_a, _ = two_models
    line = Line(tuple(Camera(f"c{i}", pattern_frames(i, 10, 3), str(model_a), fps=50.0) for i in range(3)))
    batched = run_line(line, status=lambda text: None)
    separate = run_line(line, status=lambda text: None, cross_camera_batching=False)
    assert batched["frames"] == separate["frames"] == 30
    assert separate["frames_per_call"] == 1.0 and batched["frames_per_call"] >= 2.0


def _stalling_frames(count_before, stall_s, release: threading.Event):
    """A camera that delivers a few frames and then hangs inside its read (a frozen driver)."""
    rng = np.random.default_rng(9)
    for _ in range(count_before):
        yield normal_frame(rng)
    release.wait(stall_s)


def test_a_stalled_camera_never_holds_the_others_back(tmp_path, two_models):
    model_a, _ = two_models
    release = threading.Event()
    good = pattern_frames(4, 40, 8)
    line = Line((Camera("good", good, str(model_a), fps=20.0, cooldown=0),
                 Camera("frozen", _stalling_frames(3, 30.0, release), str(model_a), fps=20.0)))
    recorder = Recorder()

    class ReleaseWhenGoodIsDone(LineObserver):
        def on_frame(self, result):
            if result.camera == "good" and result.frame_index == len(good) - 1:
                release.set()

    started = time.monotonic()
    summary = run_line(line, observers=[recorder, ReleaseWhenGoodIsDone()], status=lambda text: None,
                       stale_after_s=0.3)
    elapsed = time.monotonic() - started
    good_frames = [f for f in recorder.frames if f[0] == "good"]
    assert len(good_frames) == 40 and summary["cameras"]["frozen"]["frames"] == 3
    # 40 frames at 20 fps take 2 s; the frozen camera would have held them for 30 s.
    assert elapsed < 8.0
    latencies = sorted(f[5] for f in good_frames)
    # Waits are bounded by one frame period (50 ms) plus scheduling on a loaded machine; a loop that
    # waited for every camera would have held these frames for the whole 30 s stall.
    assert latencies[-3] < 1.0, latencies[-5:]
    downs = [s for s in recorder.statuses if s.camera == "frozen" and not s.up]
    assert downs, "the frozen camera was never reported down"


def test_a_slow_camera_is_waited_for_one_frame_period_at_most(two_models):
    model_a, _ = two_models
    line = Line((Camera("fast", pattern_frames(1, 40, 8), str(model_a), fps=20.0),
                 Camera("slow", pattern_frames(2, 5, 8), str(model_a), fps=2.0)))
    recorder = Recorder()
    started = time.monotonic()
    summary = run_line(line, observers=[recorder], status=lambda text: None)
    fast_done = max(t for camera, _, _, _, t, _ in recorder.frames if camera == "fast") - started
    assert summary["cameras"]["fast"]["frames"] == 40 and summary["cameras"]["slow"]["frames"] == 5
    # 40 frames at 20 fps: 2 s. A round that waited for the 2 fps camera would score one fast frame
    # per 0.5 s (20 s); the deadline is the fast camera's period, so it keeps its own rate.
    assert fast_done < 5.0, fast_done
    # ... and the slow camera's frames still share a call with a fast one when they come together.
    assert summary["detector_calls"] < 45


def test_stop_event_ends_every_camera(tmp_path, two_models):
    model_a, _ = two_models
    rng = np.random.default_rng(0)
    pool = [normal_frame(rng) for _ in range(5)]
    line = Line(tuple(Camera(f"c{i}", pool, str(model_a), loop=True, fps=50.0) for i in range(2)))
    stop = threading.Event()

    class StopOnceBothRun(LineObserver):
        """Sets ``stop`` once each camera has had 10 frames judged (a timer of 1 s let a loaded CI machine
        judge fewer than 10 of a camera's 50 frames, and the test failed on load, not on stopping)."""
        def __init__(self):
            self.seen, self.set_at = {}, None

        def on_frame(self, result):
            self.seen[result.camera] = self.seen.get(result.camera, 0) + 1
            if self.set_at is None and len(self.seen) == 2 and min(self.seen.values()) >= 10:
                self.set_at = time.monotonic()
                stop.set()
    stopper = StopOnceBothRun()
    backstop = threading.Timer(60.0, stop.set)       # a loop that judged too little fails below, never hangs
    backstop.start()
    try:
        summary = run_line(line, [stopper], stop=stop, status=lambda text: None)
    finally:
        backstop.cancel()
    ended = time.monotonic()
    assert stopper.set_at is not None and summary["stopped_early"]
    assert ended - stopper.set_at < 5.0                      # every camera ended, soon after the stop
    assert summary["cameras"]["c0"]["frames"] >= 10 and summary["cameras"]["c1"]["frames"] >= 10


def test_max_frames_is_per_camera(two_models):
    model_a, _ = two_models
    line = Line(tuple(Camera(f"c{i}", pattern_frames(i, 30, 3), str(model_a)) for i in range(2)))
    summary = run_line(line, max_frames=7, status=lambda text: None)
    assert [summary["cameras"][n]["frames"] for n in ("c0", "c1")] == [7, 7]


@pytest.mark.parametrize("cameras, message", [
    ((), "at least one camera"),
    (("a", "a"), "used twice"),
    (("bad name",), "camera name 'bad name'"),
    (("../up",), "camera name '../up'"),
])
def test_bad_camera_names_are_refused(two_models, cameras, message):
    with pytest.raises(LineError, match=message):
        Line(tuple(Camera(name, [], str(two_models[0])) for name in cameras))


def test_one_gige_camera_opened_by_two_cameras_of_a_line_is_refused(two_models):
    """A GigE camera takes one controlling client: the second open failed after a 10 s control timeout
    with an error about trigger mode; now the line says so before opening anything. A video file may be
    read by two cameras (two models on one recording)."""
    with pytest.raises(LineError, match=r"cameras 'a' and 'b' both open gige://CAM-7"):
        Line((Camera("a", "gige://CAM-7", str(two_models[0])), Camera("b", "gige://CAM-7", str(two_models[1]))))
    Line((Camera("a", "clip.avi", str(two_models[0])), Camera("b", "clip.avi", str(two_models[1]))))


# ---------------------------------------------------------------- line file

def _line_text(model, body):
    return body + f'[defaults]\nmodel = "{model}"\n'     # last: top-level keys in body stay top-level


@pytest.mark.parametrize("body, field", [
    ('[[camera]]\nname = "a"\nsource = "x"\nthreshold = "high"\n', "camera[0] ('a').threshold"),
    ('[[camera]]\nname = "a"\nsource = "x"\ndebounce = "3/2"\n', "camera[0] ('a').debounce"),
    ('[[camera]]\nname = "a"\nsource = "x"\ndebounce = "three"\n', "camera[0] ('a').debounce"),
    ('[[camera]]\nname = "a"\nsource = "x"\ncooldown = -1\n', "camera[0] ('a').cooldown"),
    ('[[camera]]\nname = "a"\nsource = "x"\ncooldown_frames = 1.5\n', "camera[0] ('a').cooldown_frames"),
    ('[[camera]]\nname = "a"\nsource = "x"\nsize = "640by480"\n', "camera[0] ('a').size"),
    ('[[camera]]\nname = "a"\nsource = "x"\nsize = [0, 480]\n', "camera[0] ('a').size"),
    ('[[camera]]\nname = "a"\nsource = "x"\nfps = 0\n', "camera[0] ('a').fps"),
    ('[[camera]]\nname = "a"\nsource = "x"\nfps = nan\n', "camera[0] ('a').fps"),
    ('[[camera]]\nname = "a"\nsource = "x"\nloop = "yes"\n', "camera[0] ('a').loop"),
    ('[[camera]]\nname = "a"\nsource = "x"\nthreshhold = 0.3\n', "camera[0] ('a').threshhold"),
    ('[[camera]]\nname = "a"\n', "camera[0] ('a').source"),
    ('[[camera]]\nsource = "x"\n', "camera[0].name"),
    ('[[camera]]\nname = "a"\nsource = "x"\nmodel = "missing.onnx"\n', "camera[0] ('a').model"),
    # a folder named as the model was said to be missing; true is 1 to Python: a 1x1 camera, version 1
    ('[[camera]]\nname = "a"\nsource = "x"\nmodel = "."\n', "camera[0] ('a').model: " ),
    ('[[camera]]\nname = "a"\nsource = "x"\nsize = [true, true]\n', "camera[0] ('a').size"),
    ('schema_version = true\n[[camera]]\nname = "a"\nsource = "x"\n', "schema_version True"),
    ('[[camera]]\nname = "a"\nsource = "x"\n[[camera]]\nname = "a"\nsource = "y"\n', "used twice"),
    ('[[camera]]\nname = "a b"\nsource = "x"\n', "camera name 'a b'"),
    ('[[cameras]]\nname = "a"\nsource = "x"\n', "unknown top-level key 'cameras'"),
    ('name = "a"\n', "unknown top-level key 'name'"),
    ('', "no cameras"),
    ('[[camera]]\nname = "a"\nsource = "x"\nfps = 10\nfps = 11\n', "not valid TOML"),
    ('schema_version = 7\n[[camera]]\nname = "a"\nsource = "x"\n', "schema_version 7"),
    ('inference = 3\n[[camera]]\nname = "a"\nsource = "x"\n', "inference: expected a table"),
    ('[inference]\nbackend = "openvino:fp8"\n[[camera]]\nname = "a"\nsource = "x"\n', "inference.backend: expected one of"),
    ('[inference]\nthreads = "two"\n[[camera]]\nname = "a"\nsource = "x"\n', "inference.threads"),
    ('[inference]\nthreads = true\n[[camera]]\nname = "a"\nsource = "x"\n', "inference.threads"),
    ('[inference]\nthreads = 2000\n[[camera]]\nname = "a"\nsource = "x"\n', "inference.threads"),
    ('[inference]\nproviders = ["cpu", ""]\n[[camera]]\nname = "a"\nsource = "x"\n', "inference.providers"),
    ('[inference]\npostprocess = "gpu"\n[[camera]]\nname = "a"\nsource = "x"\n', "inference.postprocess"),
    ('[inference]\nbackends = "openvino"\n[[camera]]\nname = "a"\nsource = "x"\n', "inference.backends: unknown field"),
])
def test_bad_line_file_fields_are_named(tmp_path, two_models, body, field):
    text = _line_text(two_models[0], body)
    with pytest.raises(LineFileError) as caught:
        parse_line(text, "line.toml", tmp_path)
    message = str(caught.value)
    assert message.startswith("line.toml") and field in message and "\n" not in message, message
    assert "file not found" not in message or "missing" in body, message


def test_line_file_fields_and_relative_paths(tmp_path, two_models):
    (tmp_path / "parts").mkdir()
    text = ('[defaults]\nmodel = "a.onnx"\ndebounce = "2/3"\n'
            '[[camera]]\nname = "left"\nsource = "parts"\n'
            '[[camera]]\nname = "right"\nsource = "rtsp://10.0.0.5/s?user=x"\nmodel = "b.onnx"\n'
            'threshold = 0.4\ndebounce = [1, 2]\ncooldown = 0.5\ncooldown_frames = 3\nsize = "320x240"\nfps = 12\n'
            '[[camera]]\nname = "usb"\nsource = 0\nsize = [640, 480]\nloop = true\n')
    line = parse_line(text, "line.toml", tmp_path, defaults={"cooldown": 9.0})
    left, right, usb = line.cameras
    assert (left.source, left.model, left.debounce, left.cooldown) == (str(tmp_path / "parts"),
                                                                       str(tmp_path / "a.onnx"), (2, 3), 9.0)
    assert (right.source, right.model, right.threshold, right.debounce, right.cooldown, right.cooldown_frames,
            right.size, right.fps) == ("rtsp://10.0.0.5/s?user=x", str(tmp_path / "b.onnx"), 0.4, (1, 2), 0.5, 3,
                                       (320, 240), 12.0)
    assert (usb.source, usb.size, usb.loop) == ("0", (640, 480), True)


# ---------------------------------------------------------------- mrkd run

def _run(args):
    from mrkd.runtime.cli import run_command
    return CliRunner().invoke(run_command, args, catch_exceptions=False)


def test_cli_named_sources_share_one_model(tmp_path, two_models):
    model_a, _ = two_models
    write_folder(tmp_path / "l", pattern_frames(5, 12, 4))
    write_folder(tmp_path / "r", pattern_frames(6, 12, 3))
    result = _run([str(model_a), "--source", f"left={tmp_path / 'l'}", "--source", f"right={tmp_path / 'r'}",
                   "--events", str(tmp_path / "e.jsonl"), "--snapshots", str(tmp_path / "s"), "--cooldown", "0",
                   "--status-every", "0"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["cameras"]["left"]["alarms"] == 3 and summary["cameras"]["right"]["alarms"] == 4
    events = read_events(tmp_path / "e.jsonl")
    assert sorted({e["camera"] for e in events}) == ["left", "right"]
    assert len(list((tmp_path / "s" / "right").iterdir())) == 4


def test_cli_line_file_with_two_models(tmp_path, two_models):
    write_folder(tmp_path / "l", pattern_frames(7, 10, 5))
    write_folder(tmp_path / "r", pattern_frames(8, 10, 2))
    (tmp_path / "line.toml").write_text(
        '[defaults]\ncooldown = 0\n'
        '[[camera]]\nname = "left"\nsource = "l"\nmodel = "a.onnx"\n'
        '[[camera]]\nname = "right"\nsource = "r"\nmodel = "b.onnx"\nthreshold = 0.3\n')
    result = _run(["--line", str(tmp_path / "line.toml"), "--events", str(tmp_path / "e.jsonl"),
                   "--status-every", "0"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["cameras"]["left"]["alarms"] == 2 and summary["cameras"]["right"]["alarms"] == 5
    assert summary["cameras"]["right"]["threshold"] == 0.3
    assert summary["cameras"]["right"]["model"].endswith("b.onnx")


def test_a_camera_threshold_off_the_models_scale_is_warned_about(tmp_path, two_models):
    """The README's line-file example gave threshold = 0.42; against a model whose good parts score near
    85 every frame alarmed with no word but "the model's is not used". Past 2x from the model's calibrated
    threshold (0.1 here; the hot swap's test of another scale) a warning names the camera and the ratio."""
    write_folder(tmp_path / "l", pattern_frames(7, 3, 1))
    (tmp_path / "line.toml").write_text(
        '[[camera]]\nname = "low"\nsource = "l"\nmodel = "a.onnx"\nthreshold = 0.002\n'
        '[[camera]]\nname = "near"\nsource = "l"\nmodel = "a.onnx"\nthreshold = 0.15\n'
        '[[camera]]\nname = "high"\nsource = "l"\nmodel = "a.onnx"\nthreshold = 1.0\n'
        # 0 (as if it meant "the model's") alarmed on every frame without a warning; 1e308 read "infx"
        '[[camera]]\nname = "zero"\nsource = "l"\nmodel = "a.onnx"\nthreshold = 0\n'
        '[[camera]]\nname = "huge"\nsource = "l"\nmodel = "a.onnx"\nthreshold = 1e308\n')
    result = _run(["--line", str(tmp_path / "line.toml"), "--status-every", "0", "--max-frames", "1"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: camera")]
    assert len(warnings) == 4, result.output
    assert warnings[0].startswith("warning: camera low: threshold 0.002 is 0.02x the model's calibrated 0.1 ")
    assert "almost every frame or part would alarm" in warnings[0]
    assert warnings[1].startswith("warning: camera high: threshold 1 is 10x the model's calibrated 0.1 ")
    assert "defects may never reach it" in warnings[1]
    assert warnings[2].startswith("warning: camera zero: threshold 0 is at or below 0, under the model's calibrated 0.1")
    assert "almost every frame or part would alarm" in warnings[2]
    assert warnings[3].startswith("warning: camera huge: threshold 1e+308 is far above the model's calibrated 0.1")


def test_a_command_line_camera_option_the_line_file_overrides_is_warned_about(tmp_path, two_models):
    """The line file's camera fields win over --threshold and the other camera options (their defaults):
    `--line line.toml --threshold 0.5` ran the camera at the file's 0.3, said only as "given (--threshold
    or the line file)". Each option typed and overridden is named; one the file leaves alone is used."""
    write_folder(tmp_path / "l", pattern_frames(7, 2, 3))
    (tmp_path / "line.toml").write_text('[[camera]]\nname = "left"\nsource = "l"\nmodel = "a.onnx"\n'
                                        'threshold = 0.3\ndebounce = "2/3"\n'
                                        '[[camera]]\nname = "right"\nsource = "l"\nmodel = "a.onnx"\n')
    result = _run(["--line", str(tmp_path / "line.toml"), "--status-every", "0", "--max-frames", "1",
                   "--threshold", "0.5", "--cooldown", "0", "--debounce", "2/3"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "from the line file" in line]
    assert warnings == ["warning: camera left: threshold 0.3 from the line file, not --threshold 0.5 (a camera's "
                        "fields in the line file win over these options); set it in one place"], result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert (summary["cameras"]["left"]["threshold"], summary["cameras"]["right"]["threshold"]) == (0.3, 0.5)


def test_line_file_inference_table_chooses_the_backend_and_the_command_line_wins(tmp_path, two_models):
    """Issue 24: the backend in the line file as on the command line (it was refused as an unknown key)."""
    write_folder(tmp_path / "l", pattern_frames(7, 4, 2))
    (tmp_path / "line.toml").write_text(
        '[inference]\nbackend = "onnxruntime"\nthreads = 1\n'
        '[[camera]]\nname = "left"\nsource = "l"\nmodel = "a.onnx"\n')
    line = parse_line((tmp_path / "line.toml").read_text(), "line.toml", tmp_path)
    assert (line.backend, line.threads, line.providers, line.postprocess) == ("onnxruntime", 1, None, "auto")
    for providers in ('"cuda, cpu"', '["cuda", " cpu"]'):
        text = f'[inference]\nproviders = {providers}\n[[camera]]\nname = "left"\nsource = "l"\nmodel = "a.onnx"\n'
        assert parse_line(text, "line.toml", tmp_path).providers == ("cuda", "cpu")
    line = parse_line((tmp_path / "line.toml").read_text(), "line.toml", tmp_path, backend="openvino:f32",
                      threads=None, providers=None)
    assert (line.backend, line.threads) == ("openvino:f32", 1)          # given wins, None leaves the file's
    def described(args):      # the line each opened model prints: backend, device, precision
        result = _run(["--line", str(tmp_path / "line.toml"), "--status-every", "0", *args])
        assert result.exit_code == 0, result.output
        return [line for line in result.output.splitlines() if line.startswith("a.onnx: ")]

    assert [line.split(" (")[0] for line in described([])] == ["a.onnx: onnxruntime CPUExecutionProvider"]
    # the command line's --backend over the file's
    pytest.importorskip("openvino", reason="SKIPPED, NOT TESTED: openvino missing (pip install 'mrkd[openvino]')")
    ran = described(["--backend", "openvino:f32"])
    assert len(ran) == 1 and ran[0].startswith("a.onnx: openvino CPU") and " fp32" in ran[0], ran


@pytest.mark.parametrize("args, message", [
    (["--line", "{line}", "--source", "x"], "not both"),
    (["{model}"], "at least one --source"),
    (["{model}", "--source", "a=x", "--source", "a=y"], "used twice"),
    (["{model}", "--source", "a={folder}", "--source", "b={folder}", "--show"], "take one camera"),
    (["--line", "{line}"], "camera[0] ('a').fps"),
    (["{model}", "--source", "left=/no/such/folder"], "camera 'left'"),
])
def test_cli_mistakes_are_one_line_errors(tmp_path, two_models, args, message):
    write_folder(tmp_path / "f", pattern_frames(0, 2, 2))
    (tmp_path / "line.toml").write_text('[[camera]]\nname = "a"\nsource = "f"\nmodel = "a.onnx"\nfps = -3\n')
    args = [a.format(line=tmp_path / "line.toml", model=two_models[0], folder=tmp_path / "f") for a in args]
    result = _run(args)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output


class SlowObserver(LineObserver):
    """Holds the loop on every frame, so that frames wait in the camera's buffer when the line stops."""

    def on_frame(self, result):
        time.sleep(0.05)


def test_frames_read_but_never_judged_at_a_stop_are_counted_and_the_model_is_named(two_models):
    """A stop left frames read from the source but never judged (waiting in the buffer, or read while
    the reader stopped): the summary's frames_read exceeded frames + dropped with nothing saying why.
    They are now "unjudged"; frames_read == frames + dropped + unjudged holds exactly. The camera's
    entry names the model file's sha256 (a free run's summary had only its path)."""
    model_a, _ = two_models
    rng = np.random.default_rng(0)
    pool = [normal_frame(rng) for _ in range(5)]
    line = Line((Camera("c0", pool, str(model_a), loop=True),))
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    summary = run_line(line, [SlowObserver()], stop=stop, status=lambda text: None)
    camera = summary["cameras"]["c0"]
    assert summary["stopped_early"] and camera["frames"] > 5
    assert camera["unjudged"] > 0, camera
    assert camera["source"]["frames_read"] == camera["frames"] + camera["source"]["dropped"] + camera["unjudged"], camera
    assert camera["model_sha256"] == hashlib.sha256(Path(model_a).read_bytes()).hexdigest()


def test_a_run_to_its_end_leaves_nothing_unjudged(two_models):
    model_a, _ = two_models
    line = Line((Camera("c0", pattern_frames(0, 12, 3), str(model_a)),))
    camera = run_line(line, status=lambda text: None)["cameras"]["c0"]
    assert (camera["frames"], camera["unjudged"], camera["source"]["frames_read"]) == (12, 0, 12)
