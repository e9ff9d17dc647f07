"""The operator page's HTTP server against four gaps a review found (2026-12): a name that is not this
machine's in the Host header when it listens beyond loopback (DNS rebinding), a snapshot file replaced by a
link, HEAD/OPTIONS answered with Python's default HTML 501 page, and a POST body that trickles in.
A real server on a port, raw sockets and python's http.client as the clients.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import time

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from test_review import _raw as raw_answer

from mrkd.errors import SettingError
from mrkd.runtime.control import LineControl
from mrkd.runtime.outputs import OutputSettings
from mrkd.runtime.outputs.base import CameraInfo
from mrkd.runtime.outputs.web import OperatorServer, outputs_from

TOKEN = "page-hardening-control-token"
GUARDS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY"}


def _raw(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Everything the server answers to ``data`` up to its closing the connection."""
    return raw_answer(f"http://127.0.0.1:{port}", data, wait)


def _get(port: int, host: str) -> bytes:
    return _raw(port, f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())


# -- 1. Host names when listening beyond loopback


def test_beyond_loopback_only_ip_literals_this_machine_and_allowed_names_are_answered():
    """Bound to 0.0.0.0 any Host was served: a rebinding page (its own name re-pointed at the line's address)
    could read the page and the events from an operator's browser. Now an IP address (any port), localhost
    or a name given with --http-allow-host is served; any other name is refused with one line."""
    servers = outputs_from(OutputSettings(http="0.0.0.0:0", http_allowed_hosts=("Line3.Plant.Example",)))
    server = servers[0]
    port = server.httpd.server_address[1]
    try:
        for host in ("evil.example", f"evil.example:{port}", "line3.plant.example.evil.example",
                     "10.0.0.8.evil.example", "plant.example"):
            answer = _get(port, host)
            assert answer.startswith(b"HTTP/1.1 421"), (host, answer)
            body = answer.split(b"\r\n\r\n", 1)[1]
            assert body.count(b"\n") == 1 and b"--http-allow-host" in body, body
            assert b"X-Content-Type-Options: nosniff" in answer, answer
        answer = _raw(port, f"POST /review HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer {TOKEN}\r\n"
                            f"Content-Length: 2\r\n\r\n{{}}".encode())
        assert answer.startswith(b"HTTP/1.1 421"), answer
        for host in ("10.0.0.8", f"192.168.1.20:{port}", "[fe80::1]:8080", "[2001:db8::5]", "127.0.0.1",
                     "localhost", "line3.plant.example", f"LINE3.plant.example:{port}"):
            answer = _get(port, host)
            assert answer.startswith(b"HTTP/1.1 200"), (host, answer)
        # HTTP/1.0 without a Host header (no browser sends that): served, as on loopback
        assert _raw(port, b"GET /index.html HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200")
    finally:
        server.close()


def test_allowed_host_names_are_checked_and_need_http():
    for bad in ("line3.plant.example:8080", "http://line3", "", "two words", "*.plant.example"):
        with pytest.raises(SettingError, match="--http-allow-host"):
            OutputSettings(http="0.0.0.0:0", http_allowed_hosts=(bad,))
    with pytest.raises(SettingError, match="--http-allow-host.*--http"):
        OutputSettings(http_allowed_hosts=("line3.plant.example",))


def test_the_run_command_takes_http_allow_host(tmp_path):
    from mrkd.cli import main
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")      # refused later: the options are checked first
    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0 and "--http-allow-host" in result.output, result.output
    for extra, said in ((["--http-allow-host", "line3.plant.example"], "--http-allow-host needs --http"),
                        (["--http", "0.0.0.0:0", "--http-allow-host", "line3:80"], "without port")):
        result = CliRunner().invoke(main, ["run", str(model), "--source", "0", *extra])
        assert result.exit_code != 0 and said in result.output, result.output
        assert "Traceback" not in result.output and result.output.count("\n") == 1, result.output


# -- 2. snapshot files: regular files inside the snapshots folder only


def test_a_snapshot_replaced_by_a_link_is_not_served(tmp_path):
    folder = tmp_path / "snaps"
    (folder / "cam0").mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"operator password file")
    snapshot = folder / "cam0" / "ev-1.jpg"
    cv2.imwrite(str(snapshot), np.full((8, 8, 3), 255, np.uint8))
    outside = tmp_path / "outside.jpg"
    cv2.imwrite(str(outside), np.zeros((8, 8, 3), np.uint8))
    server = OperatorServer("127.0.0.1", 0, snapshots=str(folder))
    port = server.httpd.server_address[1]
    try:
        server.on_start([CameraInfo("cam0", "memory", "m.onnx", "00" * 32, "onnxruntime", "fp32", 0.5, "test")])
        server.on_event("cam0", {"event_id": "ev-1", "score": 0.9, "threshold": 0.5, "snapshot": str(snapshot)})
        server.on_event("cam0", {"event_id": "ev-2", "score": 0.9, "threshold": 0.5, "snapshot": str(outside)})
        answer = _raw(port, b"GET /alarm/ev-1.jpg HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(snapshot.read_bytes()), answer[:200]
        answer = _raw(port, b"GET /alarm/ev-2.jpg HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 404"), answer[:200]        # a file outside the folder
        snapshot.unlink()
        os.symlink(secret, snapshot)                                  # the snapshot replaced by a link
        answer = _raw(port, b"GET /alarm/ev-1.jpg HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 404") and b"password" not in answer, answer
        snapshot.unlink()
        os.mkfifo(snapshot)                                           # not a regular file: never blocks
        started = time.monotonic()
        answer = _raw(port, b"GET /alarm/ev-1.jpg HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 404") and time.monotonic() - started < 2.0, answer
        snapshot.unlink()
        os.symlink(folder / "cam0", folder / "cam1")                # a link inside the folder is a link too:
        cv2.imwrite(str(snapshot), np.full((8, 8, 3), 255, np.uint8))    # no link on the way is followed
        server.on_event("cam0", {"event_id": "ev-3", "score": 0.9, "threshold": 0.5,
                                 "snapshot": str(folder / "cam1" / "ev-1.jpg")})
        answer = _raw(port, b"GET /alarm/ev-3.jpg HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
        for number, name in enumerate((f"{folder}/cam0/../cam0/ev-1.jpg", f"{folder}/cam0/ev-1.jpg\0", f"{folder}/cam0",
                                       str(folder), "/etc/hostname", "cam0/ev-1.jpg")):
            event_id = f"odd-{number}"
            server.on_event("cam0", {"event_id": event_id, "score": 0.9, "threshold": 0.5, "snapshot": name})
            answer = _raw(port, f"GET /alarm/{event_id}.jpg HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                f"Connection: close\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 404"), (name, answer[:200])    # only a plain path below it
    finally:
        server.close()


def test_a_hard_link_in_the_snapshots_folder_is_not_served_but_mrkds_own_snapshot_is(tmp_path, caplog):
    """A hard link put in the folder to a file elsewhere on the disk was served: the walk sees a regular
    file below the folder. A file with a second name is refused now; the snapshot mrkd writes (staged,
    then linked to its name, the staged name removed) has one name and is served."""
    from mrkd.runtime.outputs.snapshots import write_snapshot
    folder = tmp_path / "snaps"
    (folder / "cam0").mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"operator password file")
    linked = folder / "cam0" / "ev-2.jpg"
    os.link(secret, linked)
    own = write_snapshot(folder / "cam0" / "ev-1.jpg", np.full((8, 8, 3), 200, np.uint8),
                         np.zeros((4, 4), np.float32), 0.5)
    server = OperatorServer("127.0.0.1", 0, snapshots=str(folder))
    port = server.httpd.server_address[1]
    try:
        server.on_start([CameraInfo("cam0", "memory", "m.onnx", "00" * 32, "onnxruntime", "fp32", 0.5, "test")])
        for event_id, path in (("ev-1", own), ("ev-2", linked)):
            server.on_event("cam0", {"event_id": event_id, "score": 0.9, "threshold": 0.5, "snapshot": str(path)})
        with caplog.at_level("WARNING", logger="mrkd.runtime.outputs.web"):
            answer = _raw(port, b"GET /alarm/ev-1.jpg HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(own.read_bytes()), answer[:200]
            answer = _raw(port, b"GET /alarm/ev-2.jpg HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 404") and b"password" not in answer, answer
        refusals = [r.getMessage() for r in caplog.records if "ev-2" in r.getMessage()]
        assert len(refusals) == 1 and "hard link" in refusals[0] and "\n" not in refusals[0], refusals
        os.link(own, tmp_path / "copy.jpg")        # mrkd's own snapshot given a second name elsewhere: refused too
        answer = _raw(port, b"GET /alarm/ev-1.jpg HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
    finally:
        server.close()


def test_the_snapshots_folder_is_learnt_from_the_line_outputs(tmp_path):
    from mrkd.runtime.outputs import build_outputs
    outputs = build_outputs(OutputSettings(http="127.0.0.1:0", snapshots=str(tmp_path / "snaps")))
    try:
        server = next(o for o in outputs if isinstance(o, OperatorServer))
        assert server.snapshots == (tmp_path / "snaps").resolve()
    finally:
        for output in outputs:
            output.on_stop()


# -- 3. HEAD, OPTIONS and unknown methods


@pytest.fixture()
def page():
    server = OperatorServer("127.0.0.1", 0)
    try:
        yield server
    finally:
        server.close()


def _ask(server: OperatorServer, method: str, path: str):
    connection = http.client.HTTPConnection("127.0.0.1", server.httpd.server_address[1], timeout=10)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_head_answers_as_get_without_a_body(page):
    for path in ("/", "/index.html", "/alarm/nope.jpg", "/nowhere", "/events"):
        got_status, got_headers, got_body = _ask(page, "GET", path) if path != "/events" else (200, {}, b"")
        status, headers, body = _ask(page, "HEAD", path)
        assert status == got_status and body == b"", (path, status, body[:100])
        if path != "/events":
            assert headers["Content-Length"] == got_headers["Content-Length"], (path, headers)
            assert headers["Content-Type"] == got_headers["Content-Type"], (path, headers)
        else:
            assert headers["Content-Type"] == "text/event-stream", headers
        for key, value in GUARDS.items():
            assert headers.get(key) == value, (path, headers)
    # on one kept-alive connection: no body was sent that could be taken for the next answer
    with socket.create_connection(page.httpd.server_address[:2], timeout=5) as conn:
        conn.sendall(b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Connection: close\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    heads = [part for part in answer.split(b"\r\n\r\n") if part.startswith(b"HTTP/1.1")]
    assert [h.split(b" ", 2)[1] for h in heads] == [b"200", b"404"], answer[:300]
    assert answer.endswith(b"\r\n\r\nnot found\n"), answer[-100:]


def test_options_and_unknown_methods_get_405_with_allow_and_the_guards(page):
    for method in ("OPTIONS", "TRACE", "PROPFIND", "PUT"):
        status, headers, body = _ask(page, method, "/")
        assert status == 405 and headers.get("Allow") == "GET, HEAD", (method, status, headers)
        assert b"<html" not in body.lower() and body.count(b"\n") == 1, (method, body)
        for key, value in GUARDS.items():
            assert headers.get(key) == value, (method, headers)
    page.control = LineControl(TOKEN, None, None, None)
    status, headers, _ = _ask(page, "OPTIONS", "/review")
    assert status == 405 and headers.get("Allow") == "GET, HEAD, POST", headers
    # Python's own answer to a malformed request carries the guards too (here: 101 headers)
    answer = _raw(page.httpd.server_address[1], b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 "), answer
    assert b"X-Content-Type-Options: nosniff" in answer and b"<html" not in answer.lower(), answer
    # a request line no version can be read from gets no answer it could be mistaken for (no headers
    # possible: HTTP/0.9), only the close; Python wrote its HTML error page there
    assert _raw(page.httpd.server_address[1], b"GET / HTTP/9\r\n\r\n") == b""


# -- 4. a POST body that trickles


def test_a_trickling_body_is_answered_408_long_before_the_request_deadline(tmp_path):
    """Headers whole, then one byte every 0.3 s of a 2000-byte body: the connection was held to the 30 s request
    deadline (and closed without an answer). Now a body must come at 1 KB/s or within 5 s: 408, closed."""
    server = OperatorServer("127.0.0.1", 0)
    server.control = LineControl(TOKEN, tmp_path / "labels.jsonl", tmp_path / "events.jsonl", tmp_path / "ev")
    try:
        with socket.create_connection(server.httpd.server_address[:2], timeout=5) as conn:
            conn.sendall(f"POST /review HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                         f"Content-Length: 2000\r\n\r\n{{".encode())
            started, answer = time.monotonic(), b""
            while time.monotonic() - started < 15.0:
                try:
                    conn.sendall(b" ")
                except (BrokenPipeError, ConnectionResetError):
                    break
                if select.select([conn], [], [], 0.3)[0]:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
            waited = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408"), (waited, answer)
        assert 4.0 < waited < 8.0, waited
        assert "did not arrive" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert not (tmp_path / "labels.jsonl").exists()
    finally:
        server.close()


def test_on_loopback_the_refusal_names_the_allowed_names_only_when_there_are_some():
    """The 421 on loopback said '127.0.0.1 or localhost only' even where --http-allow-host names were
    being answered too: a user reading it would not look for the option."""
    for allowed, mentions in (((), False), (("proxy.plant.example",), True)):
        server = outputs_from(OutputSettings(http="127.0.0.1:0", http_allowed_hosts=allowed))[0]
        port = server.httpd.server_address[1]
        try:
            answer = _get(port, "evil.example")
            assert answer.startswith(b"HTTP/1.1 421"), answer
            assert (b"--http-allow-host" in answer.split(b"\r\n\r\n", 1)[1]) is mentions, answer
            if allowed:
                assert _get(port, allowed[0]).startswith(b"HTTP/1.1 200")
        finally:
            server.close()


# -- 5. The snapshots folder (or a folder in it) swapped for a link after the page started

_FLIPPER = r"""
import os, sys, time
real, aside, outside, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
end = time.monotonic() + seconds
while time.monotonic() < end:           # the folder, then a link to a folder outside, then the folder ...
    os.rename(real, aside)
    os.symlink(outside, real)
    os.unlink(real)
    os.rename(aside, real)
"""


def _snapshot_server(tmp_path, caplog):
    """A page serving tmp/snaps (its alarm ev-1 is snaps/cam0/ev-1.jpg) and a folder tmp/outside laid out
    the same way whose ev-1.jpg is a secret."""
    folder, outside = tmp_path / "snaps", tmp_path / "outside"
    for where in (folder, outside):
        (where / "cam0").mkdir(parents=True)
    snapshot = folder / "cam0" / "ev-1.jpg"
    cv2.imwrite(str(snapshot), np.full((8, 8, 3), 255, np.uint8))
    (outside / "cam0" / "ev-1.jpg").write_bytes(b"operator password file")
    server = OperatorServer("127.0.0.1", 0, snapshots=str(folder))
    server.on_start([CameraInfo("cam0", "memory", "m.onnx", "00" * 32, "onnxruntime", "fp32", 0.5, "test")])
    server.on_event("cam0", {"event_id": "ev-1", "score": 0.9, "threshold": 0.5, "snapshot": str(snapshot)})
    return server, folder, outside, snapshot.read_bytes()


_GET_EV1 = b"GET /alarm/ev-1.jpg HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def test_a_snapshots_folder_swapped_for_a_link_is_refused_with_one_line(tmp_path, caplog):
    """The folder (then its camera folder) renamed away and a link to a folder outside put in its place
    after the page started: 404 and one warning naming the folder, never the file outside; put back, the
    snapshot is served again."""
    import logging
    caplog.set_level(logging.WARNING, logger="mrkd.runtime.outputs.web")
    server, folder, outside, jpeg = _snapshot_server(tmp_path, caplog)
    port = server.httpd.server_address[1]
    try:
        assert _raw(port, _GET_EV1).endswith(jpeg)
        for swapped, target in ((folder, outside), (folder / "cam0", outside / "cam0")):
            os.rename(swapped, tmp_path / "aside")
            os.symlink(target, swapped)
            caplog.clear()
            answer = _raw(port, _GET_EV1)
            assert answer.startswith(b"HTTP/1.1 404") and b"password" not in answer, answer
            lines = [r.getMessage() for r in caplog.records]
            assert len(lines) == 1 and "link" in lines[0] and str(folder) in lines[0], lines
            os.unlink(swapped)
            os.rename(tmp_path / "aside", swapped)
            assert _raw(port, _GET_EV1).endswith(jpeg)
    finally:
        server.close()


def test_a_folder_flipping_to_a_link_while_snapshots_are_asked_never_serves_the_file_outside(tmp_path, caplog):
    """Checking where a path resolves and then opening it by name are two looks at the folder: a folder
    swapped for a link between them was followed (the old realpath check, then open). Another process
    flips the folder to a link and back as fast as it can while the page is asked for the snapshot; each
    answer is the snapshot or 404, never the secret."""
    import subprocess
    import sys
    server, folder, outside, jpeg = _snapshot_server(tmp_path, caplog)
    port = server.httpd.server_address[1]
    flipper = subprocess.Popen([sys.executable, "-c", _FLIPPER, str(folder), str(tmp_path / "aside"),
                                str(outside), "6"])
    answers = {"snapshot": 0, "404": 0}
    try:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            answer = _raw(port, _GET_EV1)
            assert b"password" not in answer, f"the file outside was served after {answers}"
            answers["snapshot" if answer.startswith(b"HTTP/1.1 200") and answer.endswith(jpeg) else "404"] += 1
            assert answer.startswith((b"HTTP/1.1 200", b"HTTP/1.1 404")), answer[:200]
    finally:
        flipper.wait(30)
        server.close()
    assert answers["snapshot"] and answers["404"], answers     # both states were seen: the race was run
