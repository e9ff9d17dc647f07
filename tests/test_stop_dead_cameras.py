"""A stop (SIGTERM) of `mrkd run` whose network cameras never answer: real silent TCP peers (they accept
the connection and never say a word), three cameras through OpenCV's FFmpeg, a subprocess as in the field.

On the old code the stop took ~14 s once the line ran (each camera's reader opened its camera again after
the stop and the readers were waited for one after another, 5 s each) and a stop during start-up went on
opening the other cameras (~24 s); both then died with SIGABRT ("terminate called without an active
exception": the process exited while a reader was still inside OpenCV's open). Now the readers are asked
to stop together, nothing is opened after the stop, at most one open in flight is waited for (its 5 s
timeout), and the run exits 0 with its summary.
"""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mrkd.runtime.sources import open_source
from mrkd.runtime.sources.late import LateSource
from runtime_fixtures import build_tiny_model

PEERS = ("127.0.86.73", "127.0.86.74", "127.0.86.75")     # one silent peer per camera
OPEN_TIMEOUT_S = 5.0            # open_sources' timeout for a network camera
STOP_BOUND_S = OPEN_TIMEOUT_S + 1.5    # one open in flight at the stop, then the teardown (~0.2 s; slack for a busy CI)


class SilentPeer:
    """A TCP server that accepts every connection, holds it and never answers; notes when each came."""

    def __init__(self, host: str):
        self.server = socket.create_server((host, 0))
        self.port = self.server.getsockname()[1]
        self.connections = []
        self.times = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.times.append(time.monotonic())
            self.connections.append(connection)
            self.connected(connection)

    def connected(self, connection) -> None:
        """What the peer does with a new connection: nothing (a subclass may answer)."""

    def close(self) -> None:
        self.server.close()
        for connection in self.connections:
            connection.close()


class Run:
    """`mrkd run` over three cameras at the peers; stderr read as it comes."""

    def __init__(self, model: Path, peers):
        args = [sys.executable, "-c", "from mrkd.cli import main; main()", "run", str(model), "--status-every", "0"]
        for i, peer in enumerate(peers):
            args += ["--source", f"c{i}=http://{PEERS[i]}:{peer.port}/video{i}.mjpg"]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for text in self.process.stderr:
            self.lines.append(text)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline and self.process.poll() is None, "".join(self.lines)
            time.sleep(0.05)

    def stop(self, timeout: float = 60.0):
        """SIGTERM; (stdout, stderr, seconds from the signal to the exit)."""
        sent = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        out = self.process.stdout.read()
        self.process.wait(timeout)
        took = time.monotonic() - sent
        self._reader.join(5)
        return out, "".join(self.lines), took, sent

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("stop_dead") / "model.onnx")


@pytest.fixture
def peers():
    made = [SilentPeer(host) for host in PEERS]
    yield made
    for peer in made:
        peer.close()


def assert_clean_stop(out: str, err: str, code: int, took: float) -> dict:
    assert code == 0, (code, err[-3000:])
    assert "terminate called" not in err and "Traceback" not in err, err[-3000:]
    assert took <= STOP_BOUND_S, (took, err[-3000:])
    summary = json.loads(out[out.index("{"):])
    assert summary["stopped_early"] and summary["frames"] == 0, summary
    assert set(summary["cameras"]) == {"c0", "c1", "c2"}
    return summary


@pytest.mark.slow      # start-up waits for each camera's 5 s open timeout
def test_a_stop_of_a_running_line_with_dead_cameras_ends_cleanly_and_opens_nothing_more(model, peers):
    run = Run(model, peers)
    try:
        run.wait_for("threshold 0.1 from", 60)     # the models are described once every camera was tried
        time.sleep(1.0)                            # the readers are trying their cameras again
        out, err, took, sent = run.stop()
    finally:
        run.kill()
    assert_clean_stop(out, err, run.process.returncode, took)
    late = [t - sent for peer in peers for t in peer.times if t > sent + 0.5]
    assert not late, f"connections made after the stop: {late}"


@pytest.mark.slow
def test_a_stop_during_start_up_opens_no_further_camera(model, peers):
    """The start tries the three cameras together (runtime/line/loop.py open_sources): the stop comes
    while it waits for them, one open in flight inside OpenCV and two waiting for their turn."""
    run = Run(model, peers)
    try:
        deadline = time.monotonic() + 30
        while not all(peer.times for peer in peers):       # every camera's connect answered: opens under way
            assert time.monotonic() < deadline and run.process.poll() is None, "".join(run.lines)
            time.sleep(0.01)
        out, err, took, sent = run.stop()
    finally:
        run.kill()
    assert_clean_stop(out, err, run.process.returncode, took)
    assert "the line starts without it" not in err, "the stop came after the start-up"
    late = [t - sent for peer in peers for t in peer.times if t > sent + 0.5]
    assert not late, f"start-up went on to open cameras after the stop: {late}"


def test_a_late_camera_waiting_for_its_turn_to_open_is_not_opened_once_the_line_stops(peers):
    """OpenCV opens one FFmpeg stream at a time: a late camera's reader waited inside OpenCV for another
    camera's open (its whole timeout) and then opened its own, stop or not. Now it waits for its turn in
    Python and gives up at the stop, at once, without a connection."""
    first = threading.Thread(target=lambda: _unreachable(f"http://{PEERS[0]}:{peers[0].port}/a.mjpg"), daemon=True)
    first.start()
    while not peers[0].times:       # the first camera's open is in flight
        time.sleep(0.01)
    stop = threading.Event()
    uri = f"http://{PEERS[1]}:{peers[1].port}/b.mjpg"
    late = LateSource(uri, lambda: open_source(uri, timeout=1.0), "did not answer", backoff=(0.0, 0.0), stop=stop)
    read = threading.Thread(target=late.read, kwargs=dict(timeout=0.25), daemon=True)
    read.start()
    time.sleep(0.2)
    stopped_at = time.monotonic()
    stop.set()
    read.join(0.5)
    alive = read.is_alive()
    first.join(5)
    late.close()
    assert not alive, "the reader still waited for OpenCV after the stop"
    time.sleep(0.2)
    # its one connection before the stop is the plain TCP connect made before it waits (sources/reachable.py)
    assert len(peers[1].times) <= 1
    assert [t for t in peers[1].times if t >= stopped_at] == [], "the late camera was opened after the stop"


def _unreachable(uri: str) -> None:
    with pytest.raises(Exception):
        open_source(uri, timeout=1.0)
