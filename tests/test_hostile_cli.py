"""Hostile command lines: every `mrkd run` / `mrkd calibrate` / `mrkd export` option at and past its
limits, each run as a subprocess with a timeout (a hang fails the test). Past a limit: exit status
!= 0, exactly one ``Error:`` line naming the option or file, no traceback. At a limit: a normal run.
Also: a stop request (SIGTERM) mid-run, a truncated video, --loop across passes, calibration without
SciPy, and the tracebacks reported in the runtime-contract issue.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_errors import assert_one_line_error
from runtime_fixtures import export_tiny_model, normal_then_defective, write_video

TIMEOUT_S = 60


def mrkd(*args, timeout=TIMEOUT_S, prelude: str = "") -> subprocess.CompletedProcess:
    """``python -m mrkd.cli ARGS`` (``prelude``: Python run before it, e.g. to hide a package)."""
    code = f"{prelude}\nimport sys\nfrom mrkd.cli import main\nsys.argv[0] = 'mrkd'\nmain({list(map(str, args))!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def summary_of(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return json.loads(done.stdout[done.stdout.index("{"):])


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    folder = tmp_path_factory.mktemp("line")
    model = export_tiny_model(folder / "model.onnx")
    video = write_video(folder / "clip.avi", normal_then_defective(20, 5), fps=25)
    data = video.read_bytes()
    cut = folder / "cut.avi"
    cut.write_bytes(data[:int(len(data) * 0.6)])
    good = folder / "good"
    good.mkdir()
    import cv2
    for i, frame in enumerate(normal_then_defective(12, 0, seed=3)):
        cv2.imwrite(str(good / f"{i:02d}.png"), frame)
    return {"model": model, "video": video, "cut": cut, "good": good, "dir": folder}


RUN_PAST_LIMITS = [
    (["--batch", "0"], "--batch"), (["--batch", "-1"], "--batch"), (["--batch", "100000"], "--batch"),
    (["--batch", "abc"], "--batch"), (["--threads", "-1"], "--threads"), (["--threshold", "nan"], "--threshold"),
    (["--threshold", "inf"], "--threshold"), (["--threshold", "abc"], "--threshold"),
    (["--cooldown", "-1"], "--cooldown"), (["--cooldown", "nan"], "--cooldown"),
    (["--cooldown-frames", "-1"], "--cooldown-frames"), (["--webhook-timeout", "0"], "--webhook-timeout"),
    (["--max-frames", "0"], "--max-frames"), (["--max-frames", "-5"], "--max-frames"),
    (["--status-every", "-1"], "--status-every"), (["--status-every", "nan"], "--status-every"),
    (["--batch-timeout", "-1"], "--batch-timeout"), (["--fps", "0"], "--fps"), (["--fps", "-1"], "--fps"),
    (["--fps", "nan"], "--fps"), (["--fps", "5000"], "--fps"), (["--size", "0x10"], "size"),
    (["--size", "abc"], "size"), (["--size", "100000x10"], "size"), (["--debounce", "0/0"], "debounce"),
    (["--debounce", "3/2"], "debounce"), (["--debounce", "abc"], "debounce"), (["--backend", "foo"], "--backend"),
    (["--providers", "bogus"], "bogus"), (["--snapshot-format", ".gif"], "--snapshot-format"),
    (["--postprocess", "gpu"], "--postprocess"),
    # click's FloatRange let nan through (a traceback in int(), or a rate every comparison ignores)
    (["--evidence-max-mb", "nan"], "--evidence-max-mb"), (["--evidence-max-mb", "1e308"], "--evidence-max-mb"),
    (["--mqtt-results-rate", "nan"], "--mqtt-results-rate"),
    # an extension no writer takes recorded nothing, exit 0; "" was read as not given (no webhook, exit 0)
    (["--save-video", "out.xyz"], "--save-video"), (["--save-video", "out"], "--save-video"),
    (["--webhook", ""], "--webhook"), (["--mqtt", ""], "--mqtt"), (["--http", " "], "--http"),
    (["--providers", ""], "--providers"), (["--trigger", "software", "--modbus", ""], "--modbus"),
    # wildcards ('#' even ended the URL: mqtt://h/line/# published under line/), a prefix no broker takes
    (["--mqtt", "mqtt://127.0.0.1:1883/line/#"], "'#'"), (["--mqtt", "mqtt://127.0.0.1:1883/#"], "'#'"),
    (["--mqtt", "mqtt://127.0.0.1:1883/" + "a" * 70000], "65535 bytes"),
    (["--debounce", "1/99999999999999999999"], "--debounce"),      # an OverflowError traceback at the start
    (["--trigger", "software", "--trigger-every", "1", "--modbus", "nohostport"],
     "--modbus must look like HOST:PORT, HOST an address of this machine"),
]


@pytest.mark.parametrize("options, name", RUN_PAST_LIMITS, ids=[" ".join(o) for o, _ in RUN_PAST_LIMITS])
def test_run_option_past_its_limit_is_one_line_error(line, options, name):
    done = mrkd("run", line["model"], "--source", line["video"], "--status-every", "0", *options)
    assert_one_line_error(done, name)


def test_run_postprocess_the_machine_cannot_run_is_one_line_error(line, tmp_path):
    """--postprocess cuda without a CUDA device: a traceback at the first frame of a per-scale model."""
    from mrkd.runtime import postprocess
    if "cuda" in postprocess.available_impls():
        pytest.skip("this machine runs the CUDA post-processing")
    assert_one_line_error(mrkd("run", line["model"], "--source", line["video"], "--status-every", "0",
                               "--postprocess", "cuda"), "--postprocess cuda", "unavailable")


def test_run_postprocess_cuda_over_a_backend_with_host_outputs_is_refused(monkeypatch):
    """On a GPU machine --postprocess cuda with ONNX Runtime/OpenVINO (outputs on the host) ended in a
    ValueError traceback at the first frame of a per-scale model: refused once the models are open."""
    from types import SimpleNamespace
    from mrkd.errors import SettingError
    from mrkd.runtime import postprocess
    from mrkd.runtime.cli import check_postprocess
    monkeypatch.setattr(postprocess, "resolve_impl", lambda impl, on_device=False: impl)    # as with a GPU
    host = SimpleNamespace(has_device_outputs=False, describe=lambda: "onnxruntime (CPUExecutionProvider)")
    per_scale = SimpleNamespace(metadata=SimpleNamespace(per_scale_outputs=True), backend=host,
                                model_path=Path("ps.onnx"))
    with pytest.raises(SettingError, match="--postprocess cuda: ps.onnx runs on a backend that hands its outputs"):
        check_postprocess("cuda", {"ps": per_scale})
    check_postprocess("cpu", {"ps": per_scale})
    on_device = SimpleNamespace(metadata=per_scale.metadata, backend=SimpleNamespace(has_device_outputs=True),
                                model_path=Path("ps.engine"))
    check_postprocess("cuda", {"ps": on_device})


def test_run_stream_url_without_a_host_is_refused_at_the_start(line):
    """rtsp:// was retried with backoff until a signal stopped the run, judging nothing."""
    error = assert_one_line_error(mrkd("run", line["model"], "--source", "rtsp://", "--status-every", "0",
                                       timeout=30), "rtsp://")
    assert "without a host" in error


RUN_AT_LIMITS = [["--batch", "1"], ["--batch", "4096"], ["--max-frames", "1"], ["--cooldown", "0"],
                 ["--status-every", "0"], ["--fps", "1000"], ["--threads", "0"], ["--cooldown-frames", "0"],
                 ["--batch-timeout", "0"], ["--threshold", "-1e30"], ["--size", "1x1"]]


def test_run_names_the_threshold_it_uses_when_one_is_given(line):
    """The first lines say which threshold judges: the one given, not the sidecar's it overrides."""
    done = mrkd("run", line["model"], "--source", line["video"], "--status-every", "0", "--threshold", "0.125",
                "--events", str(Path(line["model"]).parent / "given_threshold.jsonl"))
    assert done.returncode == 0, done.stderr
    assert "camera cam0: threshold 0.125 given" in done.stderr, done.stderr
    events = [json.loads(x) for x in (Path(line["model"]).parent / "given_threshold.jsonl").read_text().splitlines()]
    assert events and all(e["threshold"] == 0.125 for e in events)


def test_run_outputs_never_write_over_another_file(line, tmp_path):
    """--summary replaces an earlier run's summary only, never a model, its sidecar or an events log;
    --save-video never writes over a file. Refused before the line starts: nothing is changed."""
    import shutil
    model = tmp_path / "model.onnx"
    shutil.copy(line["model"], model)
    shutil.copy(str(line["model"]) + ".json", str(model) + ".json")
    run = ("run", model, "--source", line["video"], "--status-every", "0", "--max-frames", "3")
    summary = tmp_path / "summary.json"
    for _ in range(2):                     # the second run replaces the first one's summary
        assert summary_of(mrkd(*run, "--summary", summary))["frames"] == 3
    assert json.loads(summary.read_text())["frames"] == 3
    events = tmp_path / "events.jsonl"
    assert summary_of(mrkd(*run, "--events", events, "--threshold", "0"))["frames"] == 3
    notes = tmp_path / "notes.csv"
    notes.write_text("part,ok\n")
    for victim in (model, Path(str(model) + ".json"), events, notes):
        before = victim.read_bytes()
        assert_one_line_error(mrkd(*run, "--summary", victim), "--summary", "never written over")
        assert victim.read_bytes() == before, victim
    video = tmp_path / "old.avi"
    video.write_bytes(b"an earlier recording")
    assert_one_line_error(mrkd(*run, "--save-video", video), "--save-video", "exists", "%Y%m%d-%H%M%S")
    assert video.read_bytes() == b"an earlier recording"


def test_save_video_names_its_start_time_so_a_restarted_line_records_again(line, tmp_path, monkeypatch):
    """A supervised line with --save-video FILE was refused at every restart (the file of the run before
    exists, and is never written over). strftime fields in the name take the start time: each start
    records into a new file; one whose expanded name exists is still refused, nothing written over."""
    import time
    from mrkd.errors import SettingError
    from mrkd.runtime.outputs.video import VideoFileSink, recording_path
    at = time.strptime("2026-12-07 06:41:05", "%Y-%m-%d %H:%M:%S")
    assert recording_path(tmp_path / "rec-%Y%m%d-%H%M%S.avi", at) == tmp_path / "rec-20261207-064105.avi"
    assert recording_path(tmp_path / "100%%-%H.avi", at) == tmp_path / "100%-06.avi"
    assert recording_path(tmp_path / "plain.avi", at) == tmp_path / "plain.avi"
    run = ("run", line["model"], "--source", line["video"], "--status-every", "0", "--max-frames", "3",
           "--save-video", tmp_path / "videos" / "rec-%Y%m%d-%H%M%S.avi")
    started = time.localtime()
    assert summary_of(mrkd(*run))["frames"] == 3
    made = sorted((tmp_path / "videos").iterdir())
    assert len(made) == 1 and made[0].stat().st_size > 0, made
    assert made[0].name in {time.strftime("rec-%Y%m%d-%H%M%S.avi", time.localtime(time.mktime(started) + dt))
                            for dt in range(0, 30)}, made
    taken = tmp_path / "videos" / "rec-20261207-064105.avi"                # an earlier start's, same second
    made[0].rename(taken)
    before = taken.read_bytes()
    monkeypatch.setattr(time, "localtime", lambda *_: at)
    with pytest.raises(SettingError, match="exists"):
        VideoFileSink(tmp_path / "videos" / "rec-%Y%m%d-%H%M%S.avi")
    assert taken.read_bytes() == before


def test_summary_and_line_file_that_are_no_regular_files_are_refused_not_read(line, tmp_path):
    """A FIFO as --summary or --line hung the start (and /dev/full as --summary filled the memory);
    a line file saved with a byte-order mark (Windows editors) is read."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    run = ("run", line["model"], "--source", line["video"], "--status-every", "0", "--max-frames", "3")
    assert_one_line_error(mrkd(*run, "--summary", fifo, timeout=30), "--summary", "not a regular file")
    assert_one_line_error(mrkd("run", "--line", fifo, timeout=30), str(fifo), "not a regular file")
    bom = tmp_path / "bom.toml"
    bom.write_bytes("\ufeff[[camera]]\nname = 'a'\n".encode("utf-8")
                    + f"source = '{line['video']}'\nmodel = '{line['model']}'\n".encode("utf-8"))
    assert summary_of(mrkd("run", "--line", bom, "--status-every", "0", "--max-frames", "3"))["frames"] == 3


def test_run_over_a_folder_with_no_readable_image_is_an_error(line, tmp_path):
    """Files none of which decodes: nothing was judged, so not exit 0 (the summary still counts them)."""
    folder = tmp_path / "junk"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"not a png" * (i + 1))
    done = mrkd("run", line["model"], "--source", folder, "--status-every", "0")
    assert_one_line_error(done, "none of its 3 frame(s) could be read")
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["frames"] == 0
    # the summary says why, beside the count: the last file's own error
    assert summary["cameras"]["cam0"]["source"]["last_error"].startswith("frame 2: "), summary["cameras"]


@pytest.mark.parametrize("options", RUN_AT_LIMITS, ids=[" ".join(o) for o in RUN_AT_LIMITS])
def test_run_option_at_its_limit_runs(line, options):
    options = list(options) + ([] if "--status-every" in options else ["--status-every", "0"])
    summary = summary_of(mrkd("run", line["model"], "--source", line["video"], *options))
    expected = 1 if options[:2] == ["--max-frames", "1"] else 25
    assert summary["frames"] == expected


def test_run_on_missing_or_broken_inputs_is_one_line_error(line, tmp_path):
    assert_one_line_error(mrkd("run", tmp_path / "none.onnx", "--source", line["video"]), "none.onnx")
    assert_one_line_error(mrkd("run", line["model"], "--source", tmp_path / "none.avi"), "none.avi")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    assert_one_line_error(mrkd("run", broken, "--source", line["video"]), "broken.onnx")


@pytest.mark.parametrize("where", ["missing_dir", "is_dir", "read_only"])
def test_run_with_an_unwritable_events_path_is_one_line_error(line, tmp_path, where):
    target = {"missing_dir": tmp_path / "no" / "such" / "dir" / "events.jsonl", "is_dir": tmp_path,
              "read_only": Path("/proc/mrkd_events.jsonl")}[where]
    done = mrkd("run", line["model"], "--source", line["video"], "--status-every", "0", "--events", target)
    if where == "missing_dir" and done.returncode == 0:      # creating the folders is right too
        assert target.exists()
        return
    assert_one_line_error(done, str(target.name))


def test_an_engine_without_tensorrt_is_one_line_error(line, tmp_path):
    pytest.importorskip("onnxruntime")
    if __import__("mrkd.deps").deps.available("tensorrt"):
        pytest.skip("TensorRT is installed here")
    engine = tmp_path / "model.engine"
    engine.write_bytes(line["model"].read_bytes())
    (tmp_path / "model.engine.json").write_text((line["dir"] / "model.onnx.json").read_text())
    assert_one_line_error(mrkd("run", engine, "--source", line["video"]), "TensorRT")


def test_truncated_video_ends_with_the_unreadable_frames_counted(line):
    start = time.monotonic()
    summary = summary_of(mrkd("run", line["model"], "--source", line["cut"], "--status-every", "0"))
    assert time.monotonic() - start < TIMEOUT_S
    camera = summary["cameras"]["cam0"]
    assert summary["frames"] > 0 and summary["frames"] + camera["source"]["bad_frames"] == 25


def test_loop_keeps_raising_alarms_on_every_pass(line):
    # 25 frames at 25 fps, the last 5 defective; a 0.5 s cooldown: one alarm per pass when frame
    # times keep increasing (times that restart would hold the cooldown forever: one alarm in all).
    summary = summary_of(mrkd("run", line["model"], "--source", line["video"], "--loop", "--max-frames", "75",
                              "--cooldown", "0.5", "--status-every", "0"))
    assert summary["frames"] == 75 and summary["alarms"] == 3


def _sigterm_and_wait(process, timeout: float = 10.0):
    """SIGTERM ``process`` and wait for it: (stdout, stderr, seconds from the signal to its exit)."""
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=timeout)
    return out, err, time.monotonic() - sent


def test_sigterm_stops_a_looping_run_within_a_second(line):
    code = ("import sys\nfrom mrkd.cli import main\n"
            f"main(['run', {str(line['model'])!r}, '--source', {str(line['video'])!r}, '--loop', '--fps', '50', "
            "'--status-every', '0'])")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 30
        first = process.stderr.readline()            # the detector's line: the run has started
        assert "threshold" in first and time.monotonic() < deadline
        time.sleep(1.0)
        out, err, stopped_after = _sigterm_and_wait(process)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0 and "Traceback" not in err, err
    assert stopped_after < 1.5, stopped_after
    summary = json.loads(out[out.index("{"):])
    assert summary["stopped_early"] and summary["frames"] > 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_the_line_starts_ends_it_cleanly(line, tmp_path, sig):
    """Ctrl-C or SIGTERM while the run still opens its models or cameras (a GigE camera can take 10 s):
    a KeyboardInterrupt inside Aravis' open came out as a traceback; now the run stops as soon as it is
    up, with its summary and exit 0. A prelude holds the run just after its models are open."""
    code = ("import sys, time\nimport mrkd.runtime.line.loop as loop\nreal = loop.open_detectors\n"
            "def held(*args, **kwargs):\n    opened = real(*args, **kwargs)\n"
            "    print('models opened', file=sys.stderr, flush=True)\n    time.sleep(2)\n    return opened\n"
            "loop.open_detectors = held\nfrom mrkd.cli import main\n"
            f"main(['run', {str(line['model'])!r}, '--source', {str(line['video'])!r}, '--loop', '--fps', '50', "
            "'--status-every', '0'])")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        assert process.stderr.readline().strip() == "models opened"
        process.send_signal(sig)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0 and "Traceback" not in err, err
    summary = json.loads(out[out.index("{"):])
    assert summary["stopped_early"] and summary["frames"] <= 2, summary
    # the camera was never opened, and its 0 frames say why (it had no reason in the summary)
    assert summary["cameras"]["cam0"]["source"]["last_error"] == "not opened: the run stopped while it started", \
        summary["cameras"]


def test_the_summary_is_strict_json_when_a_camera_never_delivered(line, tmp_path):
    """A camera that never delivered a frame has no latency: its percentiles are null, not bare NaN
    (not JSON: jq and JavaScript refused the summary), in the printed summary and --summary's file."""
    def strict(text):
        return json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    code = ("import sys\nfrom mrkd.cli import main\n"
            f"main(['run', {str(line['model'])!r}, '--source', 'rtsp://127.0.0.1:1/cam', '--status-every', '0', "
            f"'--summary', {str(tmp_path / 's.json')!r}])")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        time.sleep(4.0)
        out, err, _ = _sigterm_and_wait(process, timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    summary = strict(out[out.index("{"):])
    assert summary["frames"] == 0 and strict((tmp_path / "s.json").read_text()) == summary
    latency = summary["cameras"]["cam0"]["latency_ms"]
    assert latency and all(value is None for value in latency.values()), latency


def test_first_status_line_names_the_threshold_and_where_it_comes_from(line):
    done = mrkd("run", line["model"], "--source", line["video"], "--status-every", "0")
    first = done.stderr.splitlines()[0]
    assert "threshold 0.1 from" in first and "model.onnx.json" in first and "quantile" in first


CALIBRATE_PAST_LIMITS = [
    (["--quantile", "0"], "--quantile"), (["--quantile", "1"], "--quantile"), (["--quantile", "1.5"], "--quantile"),
    (["--quantile", "nan"], "--quantile"), (["--confidence", "0"], "--confidence"),
    (["--confidence", "1"], "--confidence"), (["--max-frames", "0"], "--max-frames"),
    (["--batch-size", "0"], "--batch-size"), (["--size", "0x5"], "size"), (["--method", "median"], "--method"),
    (["--out", "x.onnx"], "--out"), (["--labelled", "/nonexistent/labelled"], "labelled"),
    # checkpoint options were ignored on an exported model without a word; "" read as not given
    (["--device", "cuda"], "--device"), (["--batch-size", "4"], "--batch-size"), (["--size", ""], "--size"),
]


@pytest.mark.parametrize("options, name", CALIBRATE_PAST_LIMITS, ids=[" ".join(o) for o, _ in CALIBRATE_PAST_LIMITS])
def test_calibrate_option_past_its_limit_is_one_line_error(line, tmp_path, options, name):
    model = tmp_path / "model.onnx"
    model.write_bytes(line["model"].read_bytes())
    (tmp_path / "model.onnx.json").write_text((line["dir"] / "model.onnx.json").read_text())
    assert_one_line_error(mrkd("calibrate", model, line["good"], *options), name)
    assert (tmp_path / "model.onnx.json").read_text() == (line["dir"] / "model.onnx.json").read_text()


def test_calibrate_with_tolerance_runs_without_scipy(line, tmp_path):
    """The runtime's calibration never needs SciPy (a Jetson has none): hide it and calibrate."""
    model = tmp_path / "model.onnx"
    model.write_bytes(line["model"].read_bytes())
    (tmp_path / "model.onnx.json").write_text((line["dir"] / "model.onnx.json").read_text())
    hide = "import sys\nsys.modules['scipy'] = None\nsys.modules['torch'] = None"
    # The clip ends with 5 defective frames, so the threshold moves far: accepted on purpose here
    # (tests/test_calibration_checks.py has the refusal).
    done = mrkd("calibrate", model, line["video"], "--method", "tolerance", "--accept-shift", prelude=hide)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "tolerance" in done.stdout or "max_margin" in done.stdout
    assert_one_line_error(mrkd("calibrate", model, line["cut"], "--max-frames", "0", prelude=hide), "--max-frames")


@pytest.mark.slow
def test_checkpoint_commands_with_a_missing_gpu_or_a_corrupt_checkpoint_are_one_line_errors(tmp_path):
    import torch
    from export_fixtures import small_model
    checkpoint = tmp_path / "model.ckpt"
    small_model().save(checkpoint)
    good = tmp_path / "good"
    good.mkdir()
    import cv2
    for i, frame in enumerate(normal_then_defective(3, 0)):
        cv2.imwrite(str(good / f"{i}.png"), frame)
    if not torch.cuda.is_available():
        assert_one_line_error(mrkd("calibrate", checkpoint, good, "--device", "cuda"), "cuda")
        assert_one_line_error(mrkd("predict", checkpoint, good, "-o", tmp_path / "p", "--device", "cuda"), "cuda")
    assert_one_line_error(mrkd("calibrate", checkpoint, good, "--device", "tpu:9"), "tpu:9")
    # a video for a checkpoint was called a "missing folder": say what a checkpoint takes, and where a video goes
    video = write_video(tmp_path / "clip.avi", normal_then_defective(3, 0), fps=5)
    error = assert_one_line_error(mrkd("calibrate", checkpoint, video), "clip.avi")
    assert "missing folder" not in error and "folder (or a glob) of good images" in error and "exported" in error
    assert_one_line_error(mrkd("calibrate", checkpoint, good, "--max-frames", "3"), "--max-frames", "exported models")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(checkpoint.read_bytes()[:1000])
    assert_one_line_error(mrkd("export", corrupt, "-o", tmp_path / "out"), "corrupt.ckpt")
    for options, name in ((["--workspace", "0"], "--workspace"), (["--dla-core", "-1"], "--dla-core"),
                          (["--opt-level", "6"], "--opt-level"), (["--batch", "0:1:1"], "batch")):
        assert_one_line_error(mrkd("export", checkpoint, "-o", tmp_path / "out", *options), name)


def test_sigterm_stops_a_run_whose_stream_keeps_failing_within_a_second(line):
    from runtime_fixtures import MjpegServer
    server = MjpegServer(frames_per_connection=5, interval=0.01)
    code = ("import sys\nfrom mrkd.cli import main\n"
            f"main(['run', {str(line['model'])!r}, '--source', {server.url!r}, '--status-every', '0'])")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        # the detector's line: the run has started (FFmpeg's own "[http @ ...]" lines, from the camera's
        # thread, may come first: the camera is opened on a thread of its own, runtime/line/loop.py)
        first = next((text for text in iter(process.stderr.readline, "") if not text.startswith("[")), "")
        assert "threshold" in first
        time.sleep(0.5)
        server.close()                                # from now on every reconnect fails
        time.sleep(2.0)
        out, err, stopped_after = _sigterm_and_wait(process)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0 and "Traceback" not in err, err
    assert stopped_after < 1.5, stopped_after
    assert json.loads(out[out.index("{"):])["stopped_early"]
    ours = [line for line in err.splitlines() if line.startswith("WARNING mrkd")]
    assert len(ours) < 8, err                        # our reconnect warnings are rate-limited
