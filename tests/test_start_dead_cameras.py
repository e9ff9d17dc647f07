"""A free run starts with the cameras that answer; the network cameras that do not are tried beside them.

`mrkd run` opened its cameras one after another, and each network camera that did not answer (powered
off: its SYNs go unanswered) ran its whole 5 s connect before the next was tried: a line with two such
cameras judged its working camera's first frame ~10 s later than the same line without them. Real
processes side by side (the same load on both), a real MJPEG camera, real unanswered listeners.
"""

import logging
import threading
import time

import pytest

from mrkd.runtime.line.loop import START_GRACE_S, Camera, Line, open_sources
from mrkd.runtime.sources import SourceError
from mrkd.runtime.sources.late import LateSource
from runtime_fixtures import MjpegServer, build_tiny_model
from test_open_lock_dead_cameras import LineRun, UnansweredPeer

EXTRA_START_BOUND_S = 4.0    # the old code: ~10 s (2 × the 5 s connect); now the start-up grace (~1.5 s)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("start_dead") / "model.onnx")


def test_a_line_judges_its_working_camera_without_waiting_for_dead_ones_one_after_another(model):
    dead = [UnansweredPeer("127.0.86.96"), UnansweredPeer("127.0.86.97")]
    cameras = {name: MjpegServer(frames_per_connection=100000, interval=0.04) for name in ("alone", "beside")}
    dead_urls = [f"rtsp://127.0.86.{96 + i}:{peer.port}/x" for i, peer in enumerate(dead)]
    runs = {"alone": LineRun(model, cameras["alone"].url, status_every=0.25),
            "beside": LineRun(model, cameras["beside"].url, *dead_urls, status_every=0.25)}
    try:
        deadline = time.monotonic() + 60
        while not all(any(frames for _, frames in run.counts) for run in runs.values()):
            assert time.monotonic() < deadline, {name: run.lines[-5:] for name, run in runs.items()}
            time.sleep(0.1)
    finally:
        logs = {name: run.stop() for name, run in runs.items()}
        for server in cameras.values():
            server.close()
        for peer in dead:
            peer.close()
    alone, beside = runs["alone"].first_frames_after(), runs["beside"].first_frames_after()
    assert beside - alone < EXTRA_START_BOUND_S, (alone, beside, logs["beside"][-3000:])
    for name in ("dead", "dead1"):     # both still opening in the background, shown down (their connects
        assert f"{name}: DOWN" in logs["beside"], logs["beside"][-3000:]     # are said once they time out)


def test_a_camera_that_cannot_open_fails_the_start_and_the_opens_beside_it_are_closed():
    """The first opens run together: the start fails naming the camera at once (the unanswered camera's
    connect is given up, not run out), after every open has ended, and the one that opened is closed."""
    dead, camera = UnansweredPeer("127.0.86.98"), MjpegServer(frames_per_connection=100000, interval=0.04)
    line = Line((Camera("good", camera.url, "model.onnx"),
                 Camera("dead", f"rtsp://127.0.86.98:{dead.port}/x", "model.onnx"),
                 Camera("bad", "rtsp:///no-host", "model.onnx")))
    try:
        started = time.monotonic()
        with pytest.raises(SourceError, match="camera 'bad': rtsp:///no-host: a rtsp:// URL without a host"):
            open_sources(line, stop=threading.Event())
        took = time.monotonic() - started
        left = [t.name for t in threading.enumerate() if t.name.startswith(("open:", "source:"))]
    finally:
        camera.close()
        dead.close()
    assert took < 3.0, f"the failed start took {took:.2f} s"
    assert left == [], f"opens or readers still running after the failed start: {left}"


class SlowMjpegServer(MjpegServer):
    """An MJPEG camera that answers each request only after ``delay`` seconds (a camera still starting)."""

    def __init__(self, delay: float):
        super().__init__(frames_per_connection=100000, interval=0.04)
        serve = self.server.RequestHandlerClass

        class Slow(serve):
            def do_GET(self):
                time.sleep(delay)
                serve.do_GET(self)
        self.server.RequestHandlerClass = Slow


def test_a_camera_that_answers_after_the_start_up_grace_is_read_from_its_first_open(caplog):
    """The line starts without it, and its LateSource takes over the open still in flight: the first frame
    comes when the camera answers, from that one request (the old code waited for it before starting).
    A camera slow to open (an RTSP stream's probing takes seconds) is no failure: no warning is raised
    for it at every start."""
    caplog.set_level(logging.INFO)
    camera = SlowMjpegServer(delay=START_GRACE_S + 1.0)
    line = Line((Camera("slow", camera.url, "model.onnx"),))
    started = time.monotonic()
    try:
        sources = open_sources(line, stop=threading.Event())
        opened_after = time.monotonic() - started
        source = sources["slow"]
        frame = None
        while frame is None and time.monotonic() - started < 10:
            frame = source.read(timeout=0.25)
        first_frame_after = time.monotonic() - started
        source.close()
    finally:
        camera.close()
    assert opened_after < START_GRACE_S + 0.5, f"the start waited {opened_after:.2f} s for the slow camera"
    assert isinstance(source, LateSource)
    assert frame is not None and first_frame_after < START_GRACE_S + 3.0, first_frame_after
    assert camera.connections == 1, f"{camera.connections} requests: the first open was not taken over"
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "start" in r.getMessage() or "answered" in
            r.getMessage()]
    assert [level for level, _ in said] == [logging.INFO, logging.INFO], said     # still opening; answered
