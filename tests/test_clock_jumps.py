"""The wall clock of an edge device jumps: a Jetson without a real-time clock boots at 1970 (or at its
last shutdown) and NTP steps it forward by years mid-run; a technician sets it back an hour. `mrkd run`
is run as a real process whose wall clock libfaketime moves mid-run (``FAKETIME_TIMESTAMP_FILE``, read
again at every call), the monotonic clock left alone as the kernel leaves it. What counts time on the
line (cooldowns, latencies, health ages) must not follow the wall clock, and where the wall clock is what
mrkd writes (event ids and times) a step is said, once, in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from peers import require_libfaketime, require_program
from runtime_fixtures import build_tiny_model, defective_frame, write_frames

# libfaketime 0.9.10 leaving the monotonic clock alone (FAKETIME_DONT_FAKE_MONOTONIC=1) fails Python's
# time.sleep (clock_nanosleep on CLOCK_MONOTONIC, TIMER_ABSTIME) with EINVAL: the process under test sleeps
# on an Event instead (the same monotonic wait), everything else is mrkd's own. ONNX Runtime, not OpenVINO:
# OpenVINO's telemetry forks a process, which libfaketime's multi-threaded variant leaves deadlocked.
MRKD = """
import faulthandler, signal, threading, time
faulthandler.register(signal.SIGUSR1, all_threads=True)
_never = threading.Event()
time.sleep = lambda seconds: _never.wait(seconds)
from mrkd.cli import main
main()
"""


def faked_env(clock_file: Path, start: str = "+0") -> dict:
    clock_file.write_text(start + "\n")
    return {**os.environ, "PYTHONWARNINGS": "ignore", "LD_PRELOAD": require_libfaketime(),
            "FAKETIME_TIMESTAMP_FILE": str(clock_file), "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def set_clock(clock_file: Path, spec: str) -> None:
    """libfaketime's spec: "+0", "-3600" (offsets from the real clock), "@1970-01-01 00:00:10" (a start)."""
    staged = clock_file.with_suffix(".new")
    staged.write_text(spec + "\n")
    os.replace(staged, clock_file)          # never a half-written spec


def events_of(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(check, timeout: float, what: str, run: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if run.poll() is not None:
            pytest.fail(f"mrkd run ended ({run.returncode}) before {what}: {run.stderr.read()[-3000:]}")
        time.sleep(0.1)
    run.kill()
    pytest.fail(f"{what} within {timeout} s: {run.communicate()[1][-3000:]}")


def stop(run: subprocess.Popen) -> str:
    run.send_signal(signal.SIGTERM)
    try:
        _, err = run.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        run.kill()
        pytest.fail(f"mrkd run did not stop: {run.communicate()[1][-3000:]}")
    assert run.returncode == 0 and "Traceback" not in err, err[-3000:]
    return err


def free_run(tmp_path: Path, clock_file: Path, *extra: str, start: str = "+0") -> subprocess.Popen:
    """`mrkd run` over a looped folder of defective frames: every frame anomalous, one alarm per cooldown."""
    model = build_tiny_model(tmp_path / "m.onnx")
    rng = np.random.default_rng(3)
    folder = write_frames(tmp_path / "frames", [defective_frame(rng) for _ in range(4)])
    return subprocess.Popen([sys.executable, "-c", MRKD, "run", str(model), "--source", str(folder), "--loop",
                             "--backend", "onnxruntime", "--status-every", "0", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=faked_env(clock_file, start))


@pytest.mark.slow
def test_a_clock_set_back_an_hour_does_not_silence_the_alarms_for_an_hour(tmp_path):
    """The cooldown was counted in the frames' wall-clock stamps: set back an hour, every later frame was
    "within the cooldown" of the last alarm (its time minus an hour is less than the cooldown), so the
    line raised no alarm for an hour (old code: 0 alarms in the 6 s after the step, cooldown 1 s). It is
    counted on the monotonic clock now."""
    clock, events = tmp_path / "clock", tmp_path / "events.jsonl"
    run = free_run(tmp_path, clock, "--cooldown", "1", "--events", str(events))
    wait_for(lambda: len(events_of(events)) >= 2, 120, "two alarms before the step", run)
    set_clock(clock, "-3600")
    stepped_at = time.monotonic()
    before = len(events_of(events))
    while time.monotonic() - stepped_at < 6 and run.poll() is None:
        time.sleep(0.1)
    after = events_of(events)[before:]
    err = stop(run)
    assert len(after) >= 3, (len(after), err[-2000:])          # about one a second, as before the step


def said(err: str, words: str) -> list:
    return [line for line in err.splitlines() if words in line]


@pytest.mark.slow
def test_a_clock_set_back_is_said_once_and_the_events_after_it_sort_before(tmp_path):
    """Events written after the clock went back an hour carry times, and ids, an hour before those written
    before it: the log's order is the order they happened, their ids' is not. Old code: not a word. Now
    one line says it (not one per frame or event), how far and from when to when."""
    clock, events = tmp_path / "clock", tmp_path / "events.jsonl"
    run = free_run(tmp_path, clock, "--cooldown", "0.5", "--events", str(events))
    wait_for(lambda: len(events_of(events)) >= 2, 120, "two alarms before the step", run)
    set_clock(clock, "-3600")
    before = len(events_of(events))
    wait_for(lambda: len(events_of(events)) >= before + 3, 60, "three alarms after the step", run)
    err = stop(run)
    logged = events_of(events)
    ids = [event["event_id"] for event in logged]
    assert any(b < a for a, b in zip(ids, ids[1:]))     # what the line must say: ids after the step sort before
    lines = said(err, "the wall clock went back")
    assert len(lines) == 1, err[-3000:]
    assert "went back 3" in lines[0] and "(1.0 hours)" in lines[0], lines      # 3599..3601 s


@pytest.mark.slow
def test_a_device_booted_at_1970_says_its_clock_is_wrong_and_when_ntp_sets_it(tmp_path):
    """A Jetson without a real-time clock starts at 1970; NTP steps its clock forward ~57 years mid-run.
    Old code: events dated 1970 without a word, then dated 2026. Now the start says the clock is before
    mrkd was installed, and the step forward is said once; the line goes on across it."""
    clock, events = tmp_path / "clock", tmp_path / "events.jsonl"
    run = free_run(tmp_path, clock, "--cooldown", "0.5", "--events", str(events),
                   start=f"-{int(time.time()) - 60}")      # a minute after 1970-01-01T00:00:00Z
    wait_for(lambda: len(events_of(events)) >= 2, 120, "two alarms at 1970", run)
    set_clock(clock, "+0")
    before = len(events_of(events))
    wait_for(lambda: len(events_of(events)) >= before + 2, 60, "two alarms after NTP's step", run)
    err = stop(run)
    logged = events_of(events)
    assert logged[0]["time"].startswith("1970-01-01") and logged[-1]["time"][:4] >= "2026", logged
    assert len(said(err, "before this mrkd was installed")) == 1, err[-3000:]
    lines = said(err, "the wall clock jumped forward")
    assert len(lines) == 1 and "years)" in lines[0] and "from 1970-01-01T" in lines[0], err[-3000:]


@pytest.mark.slow
def test_a_triggered_line_says_a_step_of_its_clock_once_and_judges_on(tmp_path):
    """Triggered (--trigger-every): parts judged after the clock went back an hour go on being judged,
    each NG part an event, and the step is said once by the part runner."""
    model = build_tiny_model(tmp_path / "m.onnx")
    folder = write_frames(tmp_path / "frames", [defective_frame(np.random.default_rng(4)) for _ in range(4)])
    clock, events, parts = tmp_path / "clock", tmp_path / "events.jsonl", tmp_path / "parts.jsonl"
    run = subprocess.Popen([sys.executable, "-c", MRKD, "run", str(model), "--source", str(folder), "--loop",
                            "--backend", "onnxruntime", "--status-every", "0", "--trigger", "software",
                            "--trigger-every", "0.2", "--events", str(events), "--parts-log", str(parts)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=faked_env(clock))
    wait_for(lambda: len(events_of(events)) >= 2, 120, "two NG parts before the step", run)
    set_clock(clock, "-3600")
    before = len(events_of(events))
    wait_for(lambda: len(events_of(events)) >= before + 3, 60, "three NG parts after the step", run)
    err = stop(run)
    assert len(said(err, "the wall clock went back")) == 1, err[-3000:]
    assert all(event["verdict"] == "NG" for event in events_of(events))


TRUST_AT_1970 = """
import sys
from pathlib import Path
from mrkd.runtime.plc.trust import TrustFolder, refusal_said
trust = TrustFolder(sys.argv[1])
der = Path(sys.argv[2]).read_bytes()
refusal = trust.refusal(der)
print(refusal)
print(refusal_said(trust, der, refusal))
"""


def test_a_trust_folder_read_at_1970_says_the_clock_is_wrong(tmp_path):
    """A device booted at 1970 refuses every PLC client's certificate as "not yet valid"
    (BadCertificateTimeInvalid), which names no clock: an operator hunts for a bad certificate. Old code:
    the folder loaded without a word and the refusal was the status name alone. Now the load says the
    clock is before the certificates are valid, and each refusal says from when the certificate is valid
    and what the clock says."""
    from pki_fixtures import application, authority
    folder = tmp_path / "trust"
    folder.mkdir()
    ca = authority().save(folder, "ca")
    (folder / "ca.pem").unlink()
    client = application(ca, "plc")
    (tmp_path / "plc.der").write_bytes(client.der)
    done = subprocess.run([sys.executable, "-c", TRUST_AT_1970, str(folder), str(tmp_path / "plc.der")],
                          capture_output=True, text=True, timeout=120,
                          env=faked_env(tmp_path / "clock", f"-{int(time.time()) - 60}"))
    assert done.returncode == 0, done.stderr[-3000:]
    refusal, explained = done.stdout.splitlines()[:2]
    assert refusal == "BadCertificateTimeInvalid"
    assert "valid from 20" in explained and "this machine's clock says 1970-01-01" in explained, explained
    warned = said(done.stderr, "clock says 1970-01-01")
    assert len(warned) == 1 and "is the clock wrong" in warned[0] and str(folder) in warned[0], done.stderr


def test_healthz_counts_a_cameras_silence_on_the_monotonic_clock(monkeypatch):
    """/healthz's last_frame_age_s was the wall clock now minus the wall clock at the last frame: a clock
    set back an hour right after a camera's last frame made its age about -3600 s, "fresh", so a dead camera
    read as ok for an hour (old code: ok, age -3570 s 30 s after its last frame); stepped forward, a working camera read as failing
    until its next frame. Its age counts on the monotonic clock now; the gauge of the last frame's time
    stays Unix time."""
    from mrkd.runtime.outputs.base import CameraInfo, CameraStatus, FrameResult
    from mrkd.runtime.outputs.metrics import MetricsObserver
    import mrkd.runtime.outputs.metrics as metrics_module
    wall, mono = [1_796_000_000.0], [1000.0]
    monkeypatch.setattr(metrics_module.time, "time", lambda: wall[0])
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: mono[0])
    metrics = MetricsObserver(stale_s=10.0)
    metrics.on_start([CameraInfo(name="cam0", source="memory", model="m.onnx", model_sha256="ab" * 32,
                                 backend="onnxruntime", precision="fp32", threshold=0.5,
                                 threshold_source="sidecar m.json")])
    metrics.on_status(CameraStatus("cam0", up=True))
    metrics.on_frame(FrameResult("cam0", 0, 0.0, np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.float32),
                                 0.1, 0.5, False, infer_s=0.001, latency_s=0.002))
    wall[0] -= 3600 - 30; mono[0] += 30                     # set back an hour, the camera silent for 30 s
    healthy, details = metrics.line_health()
    assert details["cameras"]["cam0"]["last_frame_age_s"] == 30.0 and not healthy, details
    metrics.on_frame(FrameResult("cam0", 1, 0.0, np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.float32),
                                 0.1, 0.5, False, infer_s=0.001, latency_s=0.002))
    wall[0] += 7200 + 5; mono[0] += 5                        # the camera's next frame: then forward 2 h, 5 s on
    healthy, details = metrics.line_health()
    assert details["cameras"]["cam0"]["last_frame_age_s"] == 5.0 and healthy, details


EVIDENCE_AT_1970 = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
from mrkd.runtime.outputs.evidence import EvidenceSettings, EvidenceWriter
writer = EvidenceWriter(EvidenceSettings(sys.argv[1], max_bytes=10 ** 9))
print(len(writer._ok_files), writer.used_bytes)
"""


def test_ok_samples_dated_after_a_clock_at_1970_are_said_at_the_start(tmp_path):
    """The evidence folder's OK samples go oldest first by their files' dates. A device that wrote them in
    2026 and boots at 1970 finds them all "in the future"; the samples it writes now, dated 1970, will be
    the first deleted at its next start, whatever their age. mrkd cannot know their order: it says so,
    once, naming the folder (old code: not a word). Alarm evidence is counted and never touched."""
    folder = tmp_path / "evidence"
    (folder / "cam0" / "ok").mkdir(parents=True)
    for index in range(3):
        (folder / "cam0" / "ok" / f"{index:010d}.png").write_bytes(b"x" * 100)
    alarm = folder / "cam0" / "20261207T101010.123Z-0123abcd.png"
    alarm.write_bytes(b"y" * 50)
    done = subprocess.run([sys.executable, "-c", EVIDENCE_AT_1970, str(folder)], capture_output=True, text=True,
                          timeout=120, env=faked_env(tmp_path / "clock", f"-{int(time.time()) - 60}"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["3", "350"]
    lines = said(done.stderr, "dated after this machine's clock")
    assert len(lines) == 1 and str(folder) in lines[0] and "3 OK sample(s)" in lines[0], done.stderr
    assert "the clock says 1970-01-01" in lines[0], lines
    assert alarm.read_bytes() == b"y" * 50


def test_a_clock_set_back_between_hardware_triggers_is_no_spacing_warning(tmp_path, monkeypatch, caplog):
    """Hardware triggers closer than the part timeout are warned about once (a camera that skips one
    would answer with the next part's image). Their spacing was the wall clock's: set back an hour between
    two triggers 1.2 s apart, they were "-3.6e+03 s apart", warned about, and the once-only warning was
    spent, so triggers truly 0 s apart later went unsaid (old code). It is counted on the monotonic clock."""
    from plc_fixtures import part_images
    from mrkd.runtime.line import parts as parts_module
    from mrkd.runtime.line.loop import Camera, Line
    from mrkd.runtime.line.parts import FrameGrabber, PartRunner, open_part_sources
    from mrkd.runtime.line.trigger import PartSettings

    class HardwareFolder:
        """A folder that stands for a hardware-triggered camera: it grabs itself (grabber_for)."""
        trigger_mode = "hardware"

        def __init__(self, source):
            self._source, self._grabber = source, FrameGrabber(source)

        def grab(self, *args, **kwargs):
            return self._grabber.grab(*args, **kwargs)

        @property
        def up(self):
            return self._grabber.up

        def __getattr__(self, name):
            return getattr(self._source, name)

    model = str(build_tiny_model(tmp_path / "tiny.onnx"))
    part_images(tmp_path / "parts", "ggg")
    line = Line((Camera("cam", str(tmp_path / "parts"), model, trigger="software"),))
    settings = PartSettings(queue=4, timeout=1.0)
    sources = {name: HardwareFolder(source) for name, source in open_part_sources(line, settings).items()}
    runner = PartRunner(line, sources, settings, status=lambda text: None)
    wall = [time.time()]
    monkeypatch.setattr(parts_module.time, "time", lambda: wall[0])
    with caplog.at_level("WARNING", logger="mrkd.runtime.line.parts"):
        runner.start()
        try:
            runner.trigger("A")
            time.sleep(1.2)
            wall[0] -= 3600 - 1.2                  # 1.2 s later by the monotonic clock, an hour back by the wall
            runner.trigger("B")
            runner.trigger("C")                    # truly at once: this is the spacing to warn about
            deadline = time.monotonic() + 30
            while runner.inspections < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            runner.stop()
    warnings = [r.getMessage() for r in caplog.records if "shorter than the part timeout" in r.getMessage()]
    assert len(warnings) == 1 and "parts -" not in warnings[0], warnings


def test_a_live_cameras_image_after_a_clock_set_back_is_its_parts(monkeypatch):
    """A live stream grabbed for a part (--trigger software on a stream: its next frame) skipped every frame
    stamped before the trigger's wall-clock time: set back an hour between the trigger and its image, every
    frame was "before the trigger" and the part an ERROR after its timeout (old code: "timeout: no image
    within 2 s"). Frames of a live source carry their monotonic arrival, which the grab compares now."""
    from runtime_fixtures import MjpegServer
    from mrkd.runtime.line.parts import FrameGrabber
    from mrkd.runtime.sources import open_source
    import mrkd.runtime.sources as sources_module
    real_time, offset = time.time, [0.0]
    server = MjpegServer(frames_per_connection=2000, interval=0.01)
    try:
        source = open_source(server.url, timeout=2.0)
        assert source.read(timeout=5.0) is not None
        monkeypatch.setattr(sources_module.time, "time", lambda: real_time() + offset[0])
        trigger_mono = time.monotonic()
        offset[0] = -3600.0                                  # set back an hour right after the trigger
        grab = FrameGrabber(source).grab(trigger_mono, 2.0)
        source.close()
    finally:
        server.close()
    assert grab.error is None and len(grab.frames) == 1, grab.error
    assert grab.frames[0].arrived >= trigger_mono


@pytest.mark.slow
def test_an_mqtt_broker_refused_at_1970_names_the_clock_not_the_ca(tmp_path):
    """mrkd at 1970 against a TLS broker (real mosquitto) whose certificate is valid from yesterday: the
    handshake fails as "certificate is not yet valid", which the old code told as "the broker presents a
    certificate --mqtt-ca does not trust", sending the operator to the CA file. It says the clock now."""
    from test_mqtt import _certificates
    from mrkd.benchmarks.mosquitto import Mosquitto
    require_program("mosquitto", ["mosquitto"])
    folder = tmp_path / "broker"
    folder.mkdir()
    ca, cert, key = _certificates(folder)
    broker = Mosquitto(folder=folder, tls=(ca, cert, key)).start()
    try:
        run = free_run(tmp_path, tmp_path / "clock", "--cooldown", "1", "--mqtt", broker.url("p"), "--mqtt-ca", ca,
                       start=f"-{int(time.time()) - 60}")
        time.sleep(8)
        err = stop(run)
    finally:
        broker.kill()
    lines = said(err, "output mqtt")
    assert lines and "not yet valid by this machine's clock" in lines[0] and "1970-01-01" in lines[0], err[-3000:]
    assert "does not trust" not in lines[0]


def test_the_clock_watch_follows_slewing_and_says_each_step_once():
    """NTP slews a clock by a little all the time: that never adds up to a step (each check compares with
    the last); a step is said once, the checks after it say nothing more."""
    from mrkd.runtime.clock_steps import ClockWatch
    said_lines = []
    watch = ClockWatch(warn=said_lines.append)
    wall, mono = 1_796_000_000.0, 100.0
    for _ in range(50):                                   # 50 checks, each 1.5 s off: 75 s in all
        watch.check(wall, mono)
        wall, mono = wall + 11.5, mono + 10.0
    watch.check(wall, mono)
    assert said_lines == []
    watch.check(wall - 3600, mono)                        # set back an hour
    for step in range(1, 6):                              # running on from there: nothing more said
        watch.check(wall - 3600 + step, mono + step)
    assert len(said_lines) == 1 and said_lines[0].startswith("the wall clock went back 3600 s (1.0 hours)")
    watch.check(wall + 10 * 365.25 * 86400, mono + 6.0)   # NTP: ten years forward
    assert len(said_lines) == 2 and "jumped forward" in said_lines[1] and "(10.0 years)" in said_lines[1]


def test_slewing_over_a_long_pause_between_checks_is_no_step():
    """A triggered line checks its clock once a part: idle over a weekend (60 h), NTP slewing at up to
    500 ppm (Linux's most) moves the wall clock up to 108 s against the monotonic one, which the old
    watch said as a step at the first part on Monday. A real step after such a pause is still said."""
    from mrkd.runtime.clock_steps import ClockWatch
    said_lines = []
    watch = ClockWatch(warn=said_lines.append)
    wall, mono = 1_796_000_000.0, 100.0
    watch.check(wall, mono)
    pause = 60 * 3600.0
    watch.check(wall + pause * (1 + 400e-6), mono + pause)     # slewed 86 s over the weekend
    assert said_lines == []
    watch.check(wall + 2 * pause * (1 + 400e-6) - 3600, mono + 2 * pause)   # then a real hour back
    assert len(said_lines) == 1 and "went back" in said_lines[0], said_lines


GIGE_GRABS = """
import sys, threading, time
_never = threading.Event()
time.sleep = lambda seconds: _never.wait(seconds)
from pathlib import Path
from mrkd.runtime.sources import open_source
from mrkd.runtime.sources.gige import GigeSource
clock_file, uri = Path(sys.argv[1]), sys.argv[2]
send = GigeSource._send_trigger
steps = iter(["-3600", "+0"])

def stepped_send(self, *args, **kwargs):
    # the wall clock steps after the grab noted when it triggered and before the camera is triggered:
    # the image's leader packet is always stamped on the stepped clock
    staged = clock_file.with_suffix(".new")
    staged.write_text(next(steps) + chr(10))
    staged.replace(clock_file)
    return send(self, *args, **kwargs)

source = open_source(uri, trigger="software")
try:
    print("first", source.grab(time.monotonic(), 3.0).error, flush=True)
    GigeSource._send_trigger = stepped_send
    for name in ("set back", "set forward again"):
        grab = source.grab(time.monotonic(), 3.0)
        print(name, grab.error, len(grab.images), source.stats.unclaimed, flush=True)
finally:
    source.close()
"""


@pytest.mark.slow
def test_a_gige_cameras_image_after_a_clock_step_is_its_triggers(tmp_path):
    """A software-triggered GigE camera's image belongs to the trigger whose send came before the image's
    leader packet. Aravis stamps the leader on the host's wall clock and the old code compared that with
    the wall-clock time of the send: a clock set back an hour between the two made the image "older than
    its trigger", discarded as an earlier trigger's (old code: "timeout: no image within 3 s", unclaimed
    1). Run under libfaketime against Aravis' simulator, so Aravis' own stamp follows the stepped clock;
    the leader's time is moved onto the monotonic clock when the buffer is popped, and compared there."""
    from peers import require_gige_simulator, require_loopback_address
    from mrkd.benchmarks.fake_gige import FakeGigeCamera
    require_gige_simulator()
    require_loopback_address("127.0.86.29")
    clock_file = tmp_path / "clock"
    with FakeGigeCamera("127.0.86.29", "STEPPED") as camera:
        run = subprocess.run([sys.executable, "-c", GIGE_GRABS, str(clock_file), camera.uri],
                             env=faked_env(clock_file), capture_output=True, text=True, timeout=120)
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and lines[0] == "first None", (run.stdout, run.stderr[-2000:])
    assert lines[1:] == ["set back None 1 0", "set forward again None 1 0"], (run.stdout, run.stderr[-2000:])
