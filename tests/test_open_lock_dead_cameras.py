"""A network camera that is off, unreachable or hung must not keep a working one's reconnects waiting.

OpenCV's FFmpeg backend opens one stream at a time in the process (sources/open_turns.py). Real peers
on loopback: an "unanswered" address (a listener whose one-slot backlog is full, so the kernel drops
further SYNs: a camera that is powered off), a silent peer (accepts and never answers: hung firmware)
and an MJPEG camera that drops its client every 4 s. On the old code a dead camera held the open lock
for its 5 s open on every retry, and the working camera beside it judged ~52 % of the frames it judged
alone (alone 441, beside the unanswered one 229, beside the silent one 232, in 20 s). Now a plain TCP
connect, outside the lock, finds the unanswered camera, its first request unanswered the hung one (over
rtsps and https after a TLS handshake; over rtmp the handshake's C0+C1), and the opens of a camera that
answers that and then hangs are spaced out.
"""

import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

from mrkd.runtime.sources import SourceUnreachable, open_source
from mrkd.runtime.sources.late import LateSource
from mrkd.runtime.sources.reachable import Target, Unreachable, first_request, probe_target, probed_open
from peers import require_program
from runtime_fixtures import MjpegServer, build_tiny_model
from test_stop_dead_cameras import SilentPeer

WINDOW_S = 12.0          # the working camera's frames are counted over this long once the line runs
# ... from this long after the process started, when the dead camera's first open (5 s, tried at the start
# beside the working camera's since e3a8744) is over: a reconnect of the working camera while a hung
# camera's open is in flight still waits it out (a known gap); this test is about the reconnects after it.
# (Counted from the first status line, a window that began inside that open fell to 19.5 fps of 24.4.)
FIRST_OPEN_OVER_S = 6.5
FRAMES_PER_DROP = 50     # at 25 fps: the camera drops its client every 2 s


class UnansweredPeer:
    """A listener that never accepts, its one-slot queue filled: the kernel drops the SYNs of every
    further connect, as from a camera that is powered off (no root needed, unlike a firewall rule)."""

    def __init__(self, host: str):
        self.server = socket.socket()
        self.server.bind((host, 0))
        self.server.listen(0)
        self.port = self.server.getsockname()[1]
        self.filler = socket.create_connection((host, self.port))

    def close(self) -> None:
        self.filler.close()
        self.server.close()


class LineRun:
    """`mrkd run` with a working camera "good" (and dead ones beside it: "dead", "dead1", ...); the good
    camera's frames from its status lines, (seconds since start, frames) each."""

    def __init__(self, model, good_url: str, *dead_urls, status_every: float = 1.0, count_after: float = 0.0):
        args = [sys.executable, "-c", "from mrkd.cli import main; main()", "run", str(model),
                "--status-every", f"{status_every:g}", "--source", f"good={good_url}"]
        for i, dead_url in enumerate(url for url in dead_urls if url):
            args += ["--source", f"dead{i or ''}={dead_url}"]
        self.started, self.count_after = time.monotonic(), count_after
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines, self.counts = [], []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for text in self.process.stderr:
            self.lines.append(text)
            match = re.search(r"good: \w+ (\d+) frames", text)
            if match:
                self.counts.append((time.monotonic() - self.started, int(match.group(1))))

    def first_frames_after(self) -> float:
        """Seconds from the process start to the first status line with frames judged from "good"."""
        return next(t for t, frames in self.counts if frames > 0)

    def _counted(self) -> list:
        """The status lines from ``count_after`` seconds after the start (all, by default)."""
        return [(t, frames) for t, frames in self.counts if t >= self.count_after]

    def running_for(self) -> float:
        """Seconds since the first status line counted (the line runs); 0 before it."""
        counted = self._counted()
        return counted[-1][0] - counted[0][0] if counted else 0.0

    def frames_per_s(self) -> float:
        counted = self._counted()
        (t0, n0), (t1, n1) = counted[0], counted[-1]
        return (n1 - n0) / (t1 - t0)

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        return "".join(self.lines)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("open_lock") / "model.onnx")


@pytest.mark.slow      # three lines side by side, each counted for WINDOW_S once it runs
def test_a_working_camera_beside_an_unanswered_or_hung_camera_keeps_its_frames(model):
    unanswered, silent = UnansweredPeer("127.0.86.91"), SilentPeer("127.0.86.92")
    cameras = {name: MjpegServer(frames_per_connection=FRAMES_PER_DROP, interval=0.04)
               for name in ("alone", "unanswered", "silent")}
    dead = {"alone": None, "unanswered": f"rtsp://127.0.86.91:{unanswered.port}/x",
            "silent": f"rtsp://127.0.86.92:{silent.port}/x"}
    runs = {name: LineRun(model, cameras[name].url, dead[name], count_after=FIRST_OPEN_OVER_S) for name in cameras}
    try:
        deadline = time.monotonic() + WINDOW_S + 30
        while not all(run.running_for() >= WINDOW_S for run in runs.values()):
            assert time.monotonic() < deadline, {name: run.lines[-5:] for name, run in runs.items()}
            time.sleep(0.2)
        for run in runs.values():
            run.process.send_signal(signal.SIGTERM)
    finally:
        logs = {name: run.stop() for name, run in runs.items()}
        for server in cameras.values():
            server.close()
        unanswered.close()
        silent.close()
    rates = {name: round(run.frames_per_s(), 1) for name, run in runs.items()}
    assert rates["alone"] > 15, (rates, logs["alone"][-2000:])
    assert rates["unanswered"] >= 0.8 * rates["alone"], (rates, logs["unanswered"][-3000:])
    assert rates["silent"] >= 0.8 * rates["alone"], (rates, logs["silent"][-3000:])
    assert f"cannot connect to 127.0.86.91:{unanswered.port} (timed out)" in logs["unanswered"]
    assert f"127.0.86.92:{silent.port} accepts connections but does not answer" in logs["silent"]


def test_an_open_beside_an_unanswered_camera_does_not_wait_for_it():
    """The old code: the working camera's open waited ~1.7 s, until the unanswered camera's 2 s open ended."""
    unanswered, camera = UnansweredPeer("127.0.86.93"), MjpegServer(frames_per_connection=1000, interval=0.04)
    failures = []

    def open_dead():
        try:
            open_source(f"rtsp://127.0.86.93:{unanswered.port}/x", timeout=2.0)
        except SourceUnreachable as exc:
            failures.append(str(exc))
    dead = threading.Thread(target=open_dead, daemon=True)
    try:
        dead.start()
        time.sleep(0.3)
        started = time.monotonic()
        source = open_source(camera.url, timeout=2.0)
        took = time.monotonic() - started
        source.close()
        dead.join(5)
    finally:
        camera.close()
        unanswered.close()
    assert took < 1.0, f"the working camera's open waited {took:.2f} s"
    assert failures == [f"rtsp://127.0.86.93:{unanswered.port}/x: cannot connect to 127.0.86.93:{unanswered.port} "
                        f"(timed out)"]


@pytest.mark.parametrize("scheme, host, peer_kind", [("rtsp", "127.0.86.94", "unanswered"),
                                                     ("rtsps", "127.0.86.86", "silent")])
def test_a_stop_ends_the_probe_of_a_camera_at_once(scheme, host, peer_kind):
    """The old code ran the whole 5 s open inside OpenCV, where the stop does not reach: for a camera
    that never answers the connect (rtsp), and for one that accepts and never answers the TLS handshake
    (rtsps, probed with a connect only until 1f90094). The probe, outside the lock, ends at the stop."""
    peer = UnansweredPeer(host) if peer_kind == "unanswered" else SilentPeer(host)
    stop = threading.Event()
    uri = f"{scheme}://{host}:{peer.port}/x"
    late = LateSource(uri, lambda: open_source(uri, timeout=5.0), "did not answer", backoff=(0.0, 0.0), stop=stop)
    read = threading.Thread(target=late.read, kwargs=dict(timeout=0.25), daemon=True)
    try:
        read.start()
        time.sleep(0.3)
        stop.set()
        read.join(0.5)
        alive = read.is_alive()
        read.join(6)
    finally:
        late.close()
        peer.close()
    assert not alive, "the reader still tried to reach the camera after the stop"


class AnswersOptionsOnlyPeer(SilentPeer):
    """Answers each connection's first RTSP request (OPTIONS) and then nothing: a camera whose stream
    hangs after the first exchange. The probe's question is answered; FFmpeg's open runs out its time."""

    def connected(self, connection) -> None:
        threading.Thread(target=self._answer_once, args=(connection,), daemon=True).start()

    @staticmethod
    def _answer_once(connection) -> None:
        try:
            if connection.recv(4096):
                connection.sendall(b"RTSP/1.0 200 OK\r\nCSeq: 1\r\nPublic: OPTIONS, DESCRIBE, SETUP, PLAY\r\n\r\n")
        except OSError:
            pass


def test_the_probe_asks_what_ffmpeg_asks_first():
    assert first_request("rtsp://user:pw@10.0.0.7:8554/cam/1?x=2") == \
        b"OPTIONS rtsp://10.0.0.7:8554/cam/1?x=2 RTSP/1.0\r\nCSeq: 1\r\nUser-Agent: mrkd\r\n\r\n"
    assert first_request("rtsps://user:pw@10.0.0.7/cam") == \
        b"OPTIONS rtsps://10.0.0.7/cam RTSP/1.0\r\nCSeq: 1\r\nUser-Agent: mrkd\r\n\r\n"
    assert first_request("http://[fe80::1]/video.mjpg") == \
        b"HEAD /video.mjpg HTTP/1.0\r\nHost: [fe80::1]\r\nUser-Agent: mrkd\r\n\r\n"
    assert first_request("https://user:pw@10.0.0.7:8443/v") == \
        b"HEAD /v HTTP/1.0\r\nHost: 10.0.0.7:8443\r\nUser-Agent: mrkd\r\n\r\n"
    c0c1 = first_request("rtmp://10.0.0.7/live")      # the RTMP handshake's C0 (version 3) and C1
    assert len(c0c1) == 1 + 1536 and c0c1[0] == 3 and c0c1[5:9] == bytes(4)
    assert c0c1[9:] != first_request("rtmp://10.0.0.7/live")[9:]       # C1's random part


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A throwaway self-signed certificate and its key (the openssl command line, not our code)."""
    openssl = require_program("openssl", ["openssl"])
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=camera.test"],
                   check=True, capture_output=True)
    return cert, key


class TlsPeer(SilentPeer):
    """Completes each connection's TLS handshake (Python's ssl; TLS 1.3 sends session tickets after it)
    and then answers the first request it reads with ``answer``, or never (None); ``requests``: those read."""

    def __init__(self, host: str, certificate, answer):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(*certificate)
        self.answer, self.requests = answer, []
        super().__init__(host)

    def connected(self, connection) -> None:
        threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection) -> None:
        try:
            tls = self.context.wrap_socket(connection, server_side=True)
            self.connections.append(tls)
            self.requests.append(tls.recv(4096))
            if self.answer is not None:
                tls.sendall(self.answer)
        except OSError:
            pass


class RtmpPeer(SilentPeer):
    """Reads the RTMP handshake's C0+C1 and answers S0+S1, as an RTMP server does; ``handshakes``: C0+C1s."""

    def __init__(self, host: str):
        self.handshakes = []
        super().__init__(host)

    def connected(self, connection) -> None:
        threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection) -> None:
        read = b""
        try:
            while len(read) < 1537 and (chunk := connection.recv(4096)):
                read += chunk
            self.handshakes.append(read)
            connection.sendall(b"\x03" + bytes(1536))
        except OSError:
            pass


@pytest.mark.parametrize("scheme, unanswered", [("rtsp", "rtsp request"), ("rtsps", "TLS handshake"),
                                                ("https", "TLS handshake"), ("rtmp", "rtmp handshake")])
def test_an_open_beside_a_hung_camera_does_not_wait_for_its_open(scheme, unanswered):
    """A camera that accepts the connect and never answers took the open lock for its whole open (2 s
    here) and a working camera's open beside it waited (the old code: ~1.7 s; the last note's 7.3 s to the
    first frame in a line). Its unanswered first words (rtsp's OPTIONS; rtsps, https and rtmp were probed
    with a TCP connect only until 1f90094: the TLS ClientHello, the RTMP C0+C1) now end it outside the
    lock, with a line that says so, and the working camera opens at once."""
    silent, camera = SilentPeer("127.0.86.82"), MjpegServer(frames_per_connection=1000, interval=0.04)
    uri = f"{scheme}://127.0.86.82:{silent.port}/hung"
    failures = []

    def open_hung():
        try:
            open_source(uri, timeout=2.0)
        except SourceUnreachable as exc:
            failures.append(str(exc))
    hung = threading.Thread(target=open_hung, daemon=True)
    try:
        hung.start()
        time.sleep(0.3)
        started = time.monotonic()
        source = open_source(camera.url, timeout=2.0)
        took = time.monotonic() - started
        source.close()
        hung.join(5)
    finally:
        camera.close()
        silent.close()
    assert took < 1.0, f"the working camera's open waited {took:.2f} s"
    assert failures == [f"{uri}: 127.0.86.82:{silent.port} accepts connections but does not answer (its "
                        f"{unanswered} unanswered for 2 s)"]


def _probed(uri: str, host: str, peer, timeout_s: float = 1.0):
    """probed_open's result for ``uri`` at ``peer``, with an open that only notes it ran; (result or the
    Unreachable's line, the opens run, seconds taken)."""
    opens = []
    started = time.monotonic()
    try:
        result = probed_open(uri, Target(host, peer.port), timeout_s, lambda: opens.append(1) or "opened",
                             lambda capture: capture == "opened")
    except Unreachable as exc:
        result = str(exc)
    return result, len(opens), time.monotonic() - started


@pytest.mark.parametrize("scheme, asked", [("rtsps", b"OPTIONS rtsps://127.0.86.83:{port}/cam RTSP/1.0\r\n"),
                                           ("https", b"HEAD /cam HTTP/1.0\r\n")])
def test_a_tls_camera_that_shakes_hands_and_answers_passes_the_probe(certificate, scheme, asked):
    peer = TlsPeer("127.0.86.83", certificate, answer=b"RTSP/1.0 401 Unauthorized\r\nCSeq: 1\r\n\r\n")
    try:
        result, opens, _ = _probed(f"{scheme}://admin:secret@127.0.86.83:{peer.port}/cam", "127.0.86.83", peer)
    finally:
        peer.close()
    assert (result, opens) == ("opened", 1)
    assert len(peer.requests) == 1 and peer.requests[0].startswith(asked.replace(b"{port}", str(peer.port).encode()))
    assert b"admin" not in peer.requests[0] and b"secret" not in peer.requests[0]


@pytest.mark.parametrize("scheme", ["rtsps", "https"])
def test_a_tls_camera_that_shakes_hands_and_then_says_nothing_is_one_line(certificate, scheme):
    """Its session tickets (TLS 1.3) are no answer; the request it read goes unanswered."""
    peer = TlsPeer("127.0.86.84", certificate, answer=None)
    try:
        result, opens, took = _probed(f"{scheme}://127.0.86.84:{peer.port}/cam", "127.0.86.84", peer)
    finally:
        peer.close()
    assert result == (f"127.0.86.84:{peer.port} accepts connections but does not answer (its {scheme} request "
                      f"unanswered for 1 s)")
    assert opens == 0 and len(peer.requests) == 1 and 0.9 < took < 1.5, (opens, peer.requests, took)


def test_an_rtmp_camera_that_answers_the_handshake_passes_and_a_silent_one_is_one_line():
    peer, silent = RtmpPeer("127.0.86.85"), SilentPeer("127.0.86.85")
    try:
        answered = _probed(f"rtmp://127.0.86.85:{peer.port}/live/cam", "127.0.86.85", peer)
        unanswered = _probed(f"rtmp://127.0.86.85:{silent.port}/live/cam", "127.0.86.85", silent)
    finally:
        peer.close()
        silent.close()
    assert answered[:2] == ("opened", 1)
    assert len(peer.handshakes) == 1 and len(peer.handshakes[0]) == 1537 and peer.handshakes[0][0] == 3
    assert unanswered[:2] == (f"127.0.86.85:{silent.port} accepts connections but does not answer (its rtmp "
                              f"handshake unanswered for 1 s)", 0)
    assert 0.9 < unanswered[2] < 1.5


def test_a_camera_that_answers_and_then_hangs_is_opened_less_often():
    """The old code opened it again at once, holding the open lock for its timeout each time."""
    silent = AnswersOptionsOnlyPeer("127.0.86.95")
    uri = f"rtsp://127.0.86.95:{silent.port}/hung"
    try:
        with pytest.raises(SourceUnreachable, match="cannot open"):
            open_source(uri, timeout=1.0)                # ran out its 1 s: the next opens wait
        connections = len(silent.times)
        started = time.monotonic()
        with pytest.raises(SourceUnreachable, match="accepts connections but its stream did not open in 1 s"):
            open_source(uri, timeout=1.0)
        took = time.monotonic() - started
    finally:
        silent.close()
    assert took < 0.3, f"the hung camera was opened again ({took:.2f} s)"
    assert len(silent.times) == connections


def test_urls_a_connect_cannot_vouch_for_are_opened_as_before(monkeypatch):
    monkeypatch.delenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", raising=False)
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert probe_target("rtsp://user:pw@cam.local/stream") == Target("cam.local", 554)
    assert probe_target("http://10.0.0.7/video.mjpg") == Target("10.0.0.7", 80)
    assert probe_target("https://[fe80::1]:8443/v") == Target("fe80::1", 8443)
    assert str(Target("fe80::1", 8443)) == "[fe80::1]:8443"
    assert probe_target("udp://@:1234") is None and probe_target("tcp://10.0.0.7:9000") is None
    monkeypatch.setenv("http_proxy", "http://proxy.local:3128")   # FFmpeg's http and tls go through it
    assert probe_target("http://10.0.0.7/video.mjpg") is None
    assert probe_target("https://10.0.0.7/video.mjpg") is None
    assert probe_target("rtsp://10.0.0.7/stream") == Target("10.0.0.7", 554)
    monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;http")   # rtsp tunnelled over http
    assert probe_target("rtsp://10.0.0.7/stream") is None
