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

from peers import require_libfaketime
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


def faked_env(clock_file: Path) -> dict:
    clock_file.write_text("+0\n")
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


def free_run(tmp_path: Path, clock_file: Path, *extra: str) -> subprocess.Popen:
    """`mrkd run` over a looped folder of defective frames: every frame anomalous, one alarm per cooldown."""
    model = build_tiny_model(tmp_path / "m.onnx")
    rng = np.random.default_rng(3)
    folder = write_frames(tmp_path / "frames", [defective_frame(rng) for _ in range(4)])
    return subprocess.Popen([sys.executable, "-c", MRKD, "run", str(model), "--source", str(folder), "--loop",
                             "--backend", "onnxruntime", "--status-every", "0", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=faked_env(clock_file))


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
