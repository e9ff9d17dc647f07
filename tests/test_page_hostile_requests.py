"""The operator page's HTTP server against requests an audit sent a live `mrkd run --http` (2026-12-05):
each answered in one status code, no traceback on the line's stderr, nothing written that the request did
not mean. A real server on a loopback port, python's http.client and raw sockets as the clients.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import struct
import time

import cv2
import numpy as np
import pytest

from mrkd.runtime.control import LineControl
from mrkd.runtime.outputs.base import CameraInfo
from mrkd.runtime.outputs.web import OperatorServer, outputs_from

TOKEN = "hostile-requests-control-token"


def _port(server: OperatorServer) -> int:
    return server.httpd.server_address[1]


def _request(server: OperatorServer, method: str, path: str, body: bytes = b"", token: str = None):
    """(status, headers, body) of one request over a fresh connection."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connection = http.client.HTTPConnection("127.0.0.1", _port(server), timeout=10)
    try:
        connection.request(method, path, body=body or None, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@pytest.fixture()
def review_server(tmp_path):
    """A page whose control may label event ev-1 (its evidence image is there, so a label can be written)."""
    (tmp_path / "evidence" / "cam0").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "evidence" / "cam0" / "ev-1.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "events.jsonl").write_text(json.dumps({"event_id": "ev-1", "camera": "cam0"}) + "\n")
    server = OperatorServer("127.0.0.1", 0)
    server.control = LineControl(TOKEN, tmp_path / "labels.jsonl", tmp_path / "events.jsonl",
                                 tmp_path / "evidence")
    try:
        yield server, tmp_path / "labels.jsonl"
    finally:
        server.close()


def test_a_body_nested_too_deeply_or_with_a_key_twice_is_refused_and_nothing_written(review_server, capfd):
    server, labels = review_server
    # json.loads raised RecursionError (no ValueError): the connection dropped unanswered, a traceback on stderr
    status, _, body = _request(server, "POST", "/review", b"[" * 15000, TOKEN)
    assert status == 400 and "nested too deeply" in json.loads(body)["error"], body
    # the last "label" silently won (a reader taking the first would see "defect"): now refused by name
    status, _, body = _request(server, "POST", "/review", b'{"event_id": "ev-1", "label": "defect", '
                                                          b'"label": "good"}', TOKEN)
    assert status == 400 and "'label' given twice" in json.loads(body)["error"], body
    assert not labels.exists()
    status, _, body = _request(server, "POST", "/review", b'{"event_id": "ev-1", "label": "good"}', TOKEN)
    assert status == 200 and json.loads(body)["saved"]["label"] == "good", body     # the same, meant once
    assert "Traceback" not in capfd.readouterr().err


def test_a_client_that_resets_its_connection_leaves_no_traceback(review_server, capfd):
    server, _ = review_server
    conn = socket.create_connection(("127.0.0.1", _port(server)), timeout=10)
    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")       # keep-alive: the server reads on
    assert conn.recv(65536).startswith(b"HTTP/1.1 404")
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()                                     # RST while the server waits for the next request
    time.sleep(0.5)
    assert _request(server, "GET", "/")[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ConnectionResetError" not in err, err


def test_every_answer_is_taken_for_its_type_and_never_framed(review_server, tmp_path):
    server, _ = review_server
    snapshot = tmp_path / "alarm.jpg"
    cv2.imwrite(str(snapshot), np.full((8, 8, 3), 255, np.uint8))
    server.snapshots = tmp_path.resolve()          # snapshot files are served from that folder only
    server.on_start([CameraInfo("cam0", "memory", "m.onnx", "00" * 32, "onnxruntime", "fp32", 0.5, "test")])
    server.on_event("cam0", {"event_id": "ev-1", "score": 0.9, "threshold": 0.5, "snapshot": str(snapshot)})
    answers = {"page": _request(server, "GET", "/"), "image": _request(server, "GET", "/alarm/ev-1.jpg"),
               "missing": _request(server, "GET", "/alarm/nope.jpg"),
               "command": _request(server, "POST", "/review", b"{}", "wrong-token-of-some-length")}
    assert [answers[k][0] for k in answers] == [200, 200, 404, 401]
    assert answers["image"][1]["Content-Type"] == "image/jpeg" and answers["image"][2] == snapshot.read_bytes()
    for name, (_, headers, _) in answers.items():
        assert headers.get("X-Content-Type-Options") == "nosniff", (name, headers)
        assert headers.get("X-Frame-Options") == "DENY", (name, headers)
        assert "frame-ancestors 'none'" in headers.get("Content-Security-Policy", ""), (name, headers)


def test_a_page_that_listens_beyond_this_machine_says_so(caplog):
    from mrkd.runtime.outputs import OutputSettings
    for address, warned in (("127.0.0.1:0", False), ("[::1]:0", False), ("0.0.0.0:0", True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mrkd.runtime.outputs.web"):
            servers = outputs_from(OutputSettings(http=address))
        try:
            said = [r.getMessage() for r in caplog.records if "beyond this machine" in r.getMessage()]
            assert bool(said) == warned, (address, said)
            if warned:
                assert "no login" in said[0] and "plain HTTP" in said[0] and "\n" not in said[0]
        finally:
            for server in servers:
                server.close()


def test_connections_that_send_nothing_cannot_hold_the_scrapers_reserve():
    """72 connections that never sent a byte filled the 64 page connections and the 8 kept for /metrics
    and /healthz: both answered 503 for as long as the flood lasted (each held up to 30 s, reopened at
    will). Now the connection idle longest is closed to make room for a new one: once the page's places are
    taken, for every new one, so the idle ones never hold more than those places (see the slowloris test)."""
    server = OperatorServer("127.0.0.1", 0, max_connections=4)
    address = server.httpd.server_address[:2]
    idle = []
    try:
        for _ in range(4 + 8 + 6):              # past the cap and the reserve: the oldest go first
            idle.append(socket.create_connection(address, timeout=5))
            time.sleep(0.01)
        time.sleep(0.3)
        started = time.monotonic()
        status, _, _ = _request(server, "GET", "/healthz")
        assert status == 404 and time.monotonic() - started < 1.0, status     # served (no metrics here)
        for conn in idle[:15]:                  # the 14 flood connections past the page's places, then the
            conn.settimeout(2.0)                # scrape's: closed by the server, oldest first
            assert conn.recv(1) == b""
        for conn in idle[15:]:
            conn.settimeout(0.05)
            with pytest.raises(socket.timeout):
                conn.recv(1)                    # the younger ones are still open
    finally:
        for conn in idle:
            conn.close()
        server.close()


def _answers(data: bytes, port: int) -> bytes:
    """Everything the server sends back for ``data`` on one connection, until it closes it (or 3 s pass)."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=3)
    conn.sendall(data)
    received = b""
    try:
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return received
            received += chunk
    except socket.timeout:
        return received + b"<still open>"
    finally:
        conn.close()


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_the_body_of_a_get_is_never_taken_for_a_second_request(review_server, method):
    """A GET or HEAD with a body (Content-Length or chunked) was answered and its body then read as the next
    request on the connection: two answers for one request (2026-12-07: GET /healthz with a body holding
    'GET /nothing-here' got 200 and 404; a POST /review in the body was carried out and its label written),
    how a proxy in front of the page is desynchronised and a request smuggled past it. Now the connection
    is closed after the one answer (which says so), the body unread."""
    server, labels = review_server
    label = b'{"event_id": "ev-1", "label": "good"}'
    inner = (f"POST /review HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
             f"Content-Length: {len(label)}\r\n\r\n").encode() + label
    for framing in (b"Content-Length: %d\r\n\r\n" % len(inner) + inner,
                    b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n"):
        got = _answers(f"{method} / HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + framing, _port(server))
        assert got.count(b"HTTP/1.1 ") == 1 and got.startswith(b"HTTP/1.1 200"), got[:300]
        assert b"\r\nConnection: close\r\n" in got and not got.endswith(b"<still open>")
    assert not labels.exists()        # the smuggled label was never read as a request
    # a GET without a body keeps its connection for the next request, as before
    two = _answers(b"GET /nothing HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /nothing HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   b"Connection: close\r\n\r\n", _port(server))
    assert two.count(b"HTTP/1.1 404") == 2, two[:300]


def test_connections_that_never_finish_a_request_cannot_keep_the_page_and_its_commands_away(review_server):
    """Slowloris: 72 connections that each trickled a request's headers and never finished them took the
    64 page places and the 8 kept for the scraper; a closed one only made room in the scraper's reserve, so
    the page and POST /review answered 503 for as long as the attack went on (2026-12-07, a probe of a live
    `mrkd run --http`: GET / 503 six times in 9 s, /metrics 200). Now a page place held by a connection still
    waiting for its request goes to the newcomer, the one that has waited longest first."""
    server, labels = review_server
    server.httpd.max_connections = 4
    address = server.httpd.server_address[:2]
    slow = []
    try:
        for _ in range(4 + 8 + 3):
            conn = socket.create_connection(address, timeout=5)
            conn.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")      # headers started, never finished
            slow.append(conn)
            time.sleep(0.01)
        time.sleep(0.3)
        for _ in range(3):
            for conn in slow:
                try:
                    conn.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass
            assert _request(server, "GET", "/")[0] == 200
            assert _request(server, "GET", "/healthz")[0] == 404          # served (no metrics here)
        status, _, body = _request(server, "POST", "/review", b'{"event_id": "ev-1", "label": "good"}', TOKEN)
        assert status == 200, body
        assert labels.exists()
        open_ = 0
        for conn in slow:          # at most the page's places stay with the slow ones: the reserve is free
            conn.settimeout(0.05)
            try:
                open_ += conn.recv(1) != b""
            except socket.timeout:
                open_ += 1
            except OSError:
                pass
        assert open_ <= 4, open_
    finally:
        for conn in slow:
            conn.close()
