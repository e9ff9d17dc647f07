"""A live view (/stream/CAMERA.mjpg) whose browser went away gives its connection and thread back even
while no frame comes to write: a triggered cell (its cameras send no frames between parts, so none to
the page) or a free-running camera that is down.

Found by a soak of `mrkd run --trigger software --trigger-stdin --http` (2026-12-07): a client reopening
the live view every 11 s left one CLOSE-WAIT socket and one thread behind each time (fds 14 -> 20,
threads 17 -> 23 in 70 s): the stream only noticed a closed connection when it wrote a frame. Every
page load or reload leaves one, and once the page's 64 places are taken the page answers 503 for the
rest of the run. A real server on a loopback port; python's http.client is the browser.
"""

from __future__ import annotations

import http.client
import threading
import time

from mrkd.runtime.outputs.base import CameraInfo
from mrkd.runtime.outputs.web import OperatorServer

PLACES = 4


def _get(server: OperatorServer, path: str):
    """(status, connection, response) of a GET; the caller closes the connection."""
    connection = http.client.HTTPConnection("127.0.0.1", server.httpd.server_address[1], timeout=10)
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, connection, response


def _threads_back_to(count: int, seconds: float = 15.0) -> int:
    deadline = time.monotonic() + seconds
    while threading.active_count() > count and time.monotonic() < deadline:
        time.sleep(0.05)
    return threading.active_count()


def test_live_views_closed_while_no_frame_comes_give_their_places_and_threads_back():
    server = OperatorServer("127.0.0.1", 0, max_connections=PLACES)
    info = CameraInfo("cell", "folder", "m.onnx", "00" * 32, "onnxruntime", "fp32", 0.5, "test", triggered=True)
    server.on_start([info])
    try:
        baseline = threading.active_count()
        for reload in range(5):          # 20 page loads, 5 times the page's places: no frame comes meanwhile
            opened = []
            for _ in range(PLACES):
                status, connection, response = _get(server, "/stream/cell.mjpg")
                opened.append((connection, response))
                assert status == 200, f"reload {reload}: the live view was refused ({status})"
                assert response.getheader("Content-Type").startswith("multipart/x-mixed-replace")
            for connection, response in opened:    # the browser navigates away: its socket is closed
                response.close()
                connection.close()
            assert _threads_back_to(baseline) <= baseline, f"reload {reload}: closed live views kept their threads"
        status, connection, response = _get(server, "/")
        response.close()
        connection.close()
        assert status == 200
    finally:
        server.close()


def test_a_live_view_still_open_stays_open_while_no_frame_comes():
    """The check for a closed connection must not end a stream whose browser is still there."""
    server = OperatorServer("127.0.0.1", 0, max_connections=PLACES)
    info = CameraInfo("cell", "folder", "m.onnx", "00" * 32, "onnxruntime", "fp32", 0.5, "test", triggered=True)
    server.on_start([info])
    try:
        status, connection, response = _get(server, "/stream/cell.mjpg")
        assert status == 200
        time.sleep(2.5)                 # a few of the stream's 1 s waits without a frame
        assert server.views["cell"].watchers == 1
        response.close()
        connection.close()
    finally:
        server.close()


def test_over_https_live_views_that_curl_closed_give_their_places_back(tmp_path):
    """The same over --http-cert/--http-key: curl (an independent TLS client) opens the live view and
    gives up after a second, PLACES + 2 times; the page's places all come back."""
    import subprocess
    from peers import require_program
    from test_review import _self_signed
    curl = require_program("curl", ["curl"])
    cert, key = _self_signed(tmp_path)
    server = OperatorServer("127.0.0.1", 0, max_connections=PLACES, tls=(cert, key))
    info = CameraInfo("cell", "folder", "m.onnx", "00" * 32, "onnxruntime", "fp32", 0.5, "test", triggered=True)
    server.on_start([info])
    try:
        baseline = threading.active_count()
        for reload in range(PLACES + 2):
            done = subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", cert,
                                   "--max-time", "1", server.url + "/stream/cell.mjpg"],
                                  capture_output=True, text=True, timeout=30)
            assert (done.returncode, done.stdout) == (28, "200"), (reload, done.returncode, done.stdout)  # 28: timed out
            assert _threads_back_to(baseline) <= baseline, f"reload {reload}: a closed live view kept its thread"
    finally:
        server.close()
