"""Evidence, review labels and `mrkd review`.

A real line (run_line over a folder of PNG frames, the tiny exported ONNX model, the real events-log
output) writes the evidence; the images are compared pixel for pixel with what the source delivered
(cv2.imread of the frame files, an independent read), hashes with hashlib. The label file's rules
(append-only, torn last line, last label wins, contradictions refused) and `mrkd review` as a
subprocess (one-line errors).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime_fixtures import defective_frame, export_tiny_model, fill_up, normal_frame, small_tmpfs, write_frames
from mrkd.runtime.review import (DEFECT, GOOD, LabelFile, ReviewError, ReviewLabel, latest_labels, make_label,
                                 read_labels)


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def line_run(tmp_path_factory):
    """10 frames (every third defective) through a real line with the evidence writer (OK sample 1 of 2)."""
    from mrkd.runtime.line.loop import Camera, Line, run_line
    from mrkd.runtime.outputs import OutputSettings, build_outputs
    from mrkd.runtime.outputs.evidence import EvidenceSettings, EvidenceWriter
    root = tmp_path_factory.mktemp("line")
    model = export_tiny_model(root / "model.onnx")
    rng = np.random.default_rng(0)
    frames = write_frames(root / "frames", [defective_frame(rng) if i % 3 == 2 else normal_frame(rng)
                                            for i in range(10)], "f{:02d}.png")
    outputs = build_outputs(OutputSettings(events=str(root / "events.jsonl"),
                                           evidence=EvidenceSettings(str(root / "evidence"), ok_every=2)))
    evidence = next(output for output in outputs if isinstance(output, EvidenceWriter))
    line = Line((Camera("cam0", str(frames), str(model), cooldown=0.0),))
    summary = run_line(line, outputs, status=lambda text: None)
    events = [json.loads(l) for l in (root / "events.jsonl").read_text().splitlines()]
    return root, summary, events, evidence


def test_every_alarm_has_its_lossless_image_and_hash_and_ok_frames_are_sampled(line_run):
    root, summary, events, evidence = line_run
    assert summary["frames"] == 10 and len(events) == 3
    sources = sorted((root / "frames").iterdir())
    for event in events:
        path = Path(event["evidence"])
        assert path == root / "evidence" / "cam0" / f"{event['event_id']}.png"
        assert event["evidence_sha256"] == sha(path)
        delivered = cv2.imread(str(sources[event["frame_index"]]), cv2.IMREAD_COLOR)
        assert np.array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), delivered)   # lossless, unannotated
    ok_files = sorted((root / "evidence" / "cam0" / "ok").iterdir())
    ok_frames = [i for i in range(10) if i % 3 != 2]
    assert [int(p.stem) for p in ok_files] == ok_frames[::2]
    assert evidence.health().sent == 3 + len(ok_files) and evidence.health().failed == 0


def test_retention_deletes_ok_samples_first_and_never_evidence(tmp_path, caplog):
    import logging
    from mrkd.runtime.outputs.base import FrameResult
    from mrkd.runtime.outputs.evidence import EvidenceSettings, EvidenceWriter
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)     # noise: PNG ~4.8 kB each
    size = len(cv2.imencode(".png", image)[1])
    writer = EvidenceWriter(EvidenceSettings(str(tmp_path), ok_every=1, max_bytes=int(size * 3.5)))

    def frame(i, event=None):
        return FrameResult("cam0", i, float(i), image, np.zeros((8, 8), np.float32), 0.0, 1.0, event is not None,
                           event=event)
    for i in range(3):
        writer.on_frame(frame(i))
    assert len(list((tmp_path / "cam0" / "ok").iterdir())) == 3
    writer.event_fields(frame(3, {"event_id": "e1"}))             # over budget: the oldest OK sample goes
    assert sorted(p.stem for p in (tmp_path / "cam0" / "ok").iterdir()) == ["0000000001", "0000000002"]
    with caplog.at_level(logging.WARNING, logger="mrkd.runtime.outputs"):
        for k in range(2, 6):                                     # evidence only, past the budget
            writer.event_fields(frame(3 + k, {"event_id": f"e{k}"}))
    # said once (rate-limited), not "over budget" / "delivering again" on every write
    said = [r.getMessage() for r in caplog.records if r.name == "mrkd.runtime.outputs"]
    assert sum("over its budget" in m for m in said) == 1 and not any("again" in m for m in said), said
    assert writer.health().sent == 3 + 5                          # every file written is counted
    assert sorted(p.stem for p in (tmp_path / "cam0").glob("*.png")) == ["e1", "e2", "e3", "e4", "e5"]
    assert not list((tmp_path / "cam0" / "ok").iterdir())
    writer.on_frame(frame(20))                                    # no room: the OK sample is skipped, counted
    health = writer.health()
    assert health.state == "over budget" and not health.ok and health.dropped == 1
    assert "never deleted" in health.detail
    # a restarted writer counts what is there
    again = EvidenceWriter(EvidenceSettings(str(tmp_path), ok_every=1, max_bytes=int(size * 3.5)))
    assert again.used_bytes == sum(p.stat().st_size for p in tmp_path.rglob("*.png"))


def test_a_full_disk_deletes_ok_samples_for_ng_evidence_and_a_camera_named_ok_keeps_its_own(tmp_path):
    """On a real 256 kB tmpfs filled with OK samples, every alarm's evidence is still written: the
    oldest OK samples make room (the byte budget alone did that before, not a full disk). Full from the
    start, evidence and the events log run and count. A camera named "ok" keeps its evidence on restart."""
    from mrkd.runtime.outputs.base import FrameResult
    from mrkd.runtime.outputs.events import EventLogOutput
    from mrkd.runtime.outputs.evidence import EvidenceSettings, EvidenceWriter
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)     # noise: PNG ~7 kB each

    def frame(camera, i, event=None):
        return FrameResult(camera, i, float(i), image, np.zeros((8, 8), np.float32), 0.0, 1.0, event is not None,
                           event=event)
    with small_tmpfs(tmp_path / "disk", "size=256k") as disk:
        writer = EvidenceWriter(EvidenceSettings(str(disk / "evidence"), ok_every=1))
        i = 0
        while writer.health().failed == 0 and i < 200:            # OK samples until the disk is full
            writer.on_frame(frame("cam0", i))
            i += 1
        samples = len(list((disk / "evidence" / "cam0" / "ok").iterdir()))
        assert writer.health().failed == 1 and samples >= 20, (writer.health(), samples)
        for k in range(10):
            fields = writer.event_fields(frame("cam0", 1000 + k, {"event_id": f"e{k}"}))
            assert fields["evidence"] is not None, writer.health()
            assert hashlib.sha256(Path(fields["evidence"]).read_bytes()).hexdigest() == fields["evidence_sha256"]
        assert writer.ok_deleted >= 10 and writer.health().failed == 1
        assert len(list((disk / "evidence" / "cam0" / "ok").iterdir())) == samples - writer.ok_deleted
    with small_tmpfs(tmp_path / "inodes", "nr_inodes=4") as disk:
        while True:
            try:
                (disk / f"f{len(list(disk.iterdir()))}").write_bytes(b"")
            except OSError:
                break
        writer = EvidenceWriter(EvidenceSettings(str(disk / "evidence"), ok_every=1))     # no folder, no inode
        assert writer.event_fields(frame("cam0", 1, {"event_id": "x"}))["evidence"] is None
        assert writer.health().failed == 1 and not writer.health().ok
        events = EventLogOutput(disk / "events.jsonl")
        events.on_event("cam0", {"event_id": "x", "time": "t"})
        assert events.health().failed == 1 and not events.health().ok
    settings = EvidenceSettings(str(tmp_path / "ev"), ok_every=1, max_bytes=1)
    writer = EvidenceWriter(settings)
    writer.event_fields(frame("ok", 1, {"event_id": "e1"}))       # DIR/ok/e1.png: camera ok's evidence
    again = EvidenceWriter(settings)
    again.on_frame(frame("cam0", 2))                              # over budget: only OK samples may go
    assert (tmp_path / "ev" / "ok" / "e1.png").is_file() and again.ok_deleted == 0


def test_label_file_is_append_only_and_read_back_validated(tmp_path):
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((4, 4, 3), np.uint8))
    path = tmp_path / "labels.jsonl"
    with LabelFile(path) as log:
        log.append(make_label("e1", image, GOOD, who="ann", note="scratch is dust"))
        log.append(make_label("e2", image, GOOD, who="ann"))
        log.append(make_label("e1", image, GOOD, who="bob", note="second look"))
    labels = read_labels(path)
    assert [(l.event_id, l.who) for l in labels] == [("e1", "ann"), ("e2", "ann"), ("e1", "bob")]
    assert labels[0].image_sha256 == sha(image) and labels[0].schema_version == 3
    latest = by_event(latest_labels(labels))
    assert list(latest) == ["e2", "e1"] and latest["e1"].note == "second look"     # last one wins
    # a crash mid-write leaves a torn last line: skipped on read, cut when the file is opened again
    size = path.stat().st_size
    with open(path, "ab") as handle:
        handle.write(b'{"event_id": "e3", "ima')
    assert len(read_labels(path)) == 3
    with LabelFile(path) as log:
        assert path.stat().st_size == size
        log.append(make_label("e3", image, DEFECT, who="ann"))
    assert path.read_bytes().count(b"\n") == 4
    # a malformed line in the middle is an error naming the line
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n{oops\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(ReviewError, match=r"labels.jsonl:2: not a JSON line"):
        read_labels(path)


def test_contradicting_and_malformed_labels_are_refused(tmp_path):
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((4, 4, 3), np.uint8))
    good, bad = make_label("e1", image, GOOD, who="ann"), make_label("e2", image, DEFECT, who="bob")
    with pytest.raises(ReviewError, match="labelled 'good' .*e1.* and 'defect' .*e2"):
        latest_labels([good, bad])
    base = json.loads(json.dumps(good.__dict__))
    for change, field in (({"label": "maybe"}, "label"), ({"image_sha256": "xyz"}, "image_sha256"),
                          ({"when": "yesterday"}, "when"), ({"who": ""}, "who"), ({"schema_version": 9}, "schema_version"),
                          ({"extra": 1}, "extra"), ({"note": "x" * 2000}, "note"),
                          ({"events_log": "/line/events.jsonl"}, "events_log"),          # path without identity
                          ({"events_log": "events.jsonl", "events_log_first_event": "e0"}, "absolute"),
                          ({"events_log": "/line/events.jsonl", "events_log_first_event": "e0", "schema_version": 1},
                           "schema_version 2")):
        with pytest.raises(ReviewError, match=field):
            ReviewLabel.from_dict({**base, **change}, "labels.jsonl:1")
    missing = dict(base)
    del missing["event_id"]
    with pytest.raises(ReviewError, match="field event_id is missing"):
        ReviewLabel.from_dict(missing, "labels.jsonl:1")


def by_event(by_image: dict) -> dict:
    """Labels (or label states) of frame alarms, one image each, by their event id (they are kept by
    event and camera: runtime.review.LabelKey)."""
    found = {key.event_id: value for key, value in by_image.items()}
    assert len(found) == len(by_image), list(by_image)
    return found


def mrkd(*args, timeout=120):
    code = f"import sys\nfrom mrkd.cli import main\nsys.argv[0] = 'mrkd'\nmain({list(map(str, args))!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def one_error(done, *needles):
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    errors = [l for l in done.stderr.splitlines() if l.startswith("Error:")]
    assert len(errors) == 1, done.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_review_cli_lists_marks_and_refuses_one_line(line_run, tmp_path):
    root, _, events, _ = line_run
    labels = tmp_path / "labels.jsonl"
    log = root / "events.jsonl"
    listed = mrkd("review", log, "--labels", labels)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("[unlabelled]") == 3 and "3 of 3 event(s)" in listed.stdout
    first = events[0]["event_id"]
    done = mrkd("review", log, "--labels", labels, "--mark", first, "--as", "good", "--note", "dust", "--who", "ann")
    assert done.returncode == 0, done.stderr
    label = read_labels(labels)[0]
    assert (label.event_id, label.label, label.who, label.note) == (first, GOOD, "ann", "dust")
    assert label.image_sha256 == events[0]["evidence_sha256"] == sha(events[0]["evidence"])
    listed = mrkd("review", log, "--labels", labels, "--unlabelled")
    assert first not in listed.stdout and "2 of 3" in listed.stdout
    one_error(mrkd("review", log, "--labels", labels, "--mark", "nope", "--as", "good"), "no event 'nope'")
    one_error(mrkd("review", log, "--labels", labels, "--mark", first), "--as")
    bare = tmp_path / "bare.jsonl"        # events of a run without --evidence
    bare.write_text("".join(json.dumps({k: v for k, v in e.items() if k != "evidence"}) + "\n" for e in events))
    one_error(mrkd("review", bare, "--labels", labels, "--mark", first, "--as", "good", "--evidence", tmp_path),
              "no evidence image")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"event_id": 1}\nnot json\n')
    one_error(mrkd("review", log, "--labels", broken), "broken.jsonl:1")


def _post(url, path, body=b"", token=None):
    import urllib.error
    import urllib.request
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url + path, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        try:
            return exc.code, json.loads(payload)
        except ValueError:
            return exc.code, {"text": payload.decode()}


def test_page_review_needs_the_token_and_appends_a_label(line_run, tmp_path):
    import urllib.request
    from mrkd.runtime.control import LineControl
    from mrkd.runtime.outputs.web import OperatorServer
    root, _, events, _ = line_run
    token = "s3cret-token-for-the-line"
    server = OperatorServer("127.0.0.1", 0)
    try:
        body = json.dumps({"event_id": events[1]["event_id"], "label": "defect", "note": "crack"}).encode()
        assert _post(server.url, "/review", body, token)[0] == 405          # no control: read-only
        labels = tmp_path / "labels.jsonl"
        server.control = LineControl(token, labels, root / "events.jsonl", root / "evidence")
        for given in (None, "wrong", token[:-1], token + "x", ""):
            code, answer = _post(server.url, "/review", body, given)
            assert code == 401 and "Bearer" in answer["error"], (given, code, answer)
        assert not labels.exists()
        code, answer = _post(server.url, "/review", body, token)
        assert code == 200, answer
        saved = read_labels(labels)
        assert [(l.event_id, l.label, l.note) for l in saved] == [(events[1]["event_id"], DEFECT, "crack")]
        assert saved[0].image_sha256 == events[1]["evidence_sha256"]
        assert _post(server.url, "/review", b"{nope", token)[0] == 400
        assert _post(server.url, "/review", json.dumps({"event_id": "x", "label": "good"}).encode(), token)[0] == 404
        assert _post(server.url, "/review", json.dumps({"event_id": "x", "label": "meh"}).encode(), token)[0] == 400
        assert _post(server.url, "/reload", b"", token)[0] == 403            # no model slots given
        with urllib.request.urlopen(server.url + "/", timeout=10) as response:   # the page itself stays open
            assert response.status == 200
        server.control = LineControl(None, labels, root / "events.jsonl", root / "evidence")
        assert _post(server.url, "/review", body, token)[0] == 403          # no token configured: off
    finally:
        server.close()


def _raw(url: str, data: bytes, wait: float = 5.0) -> bytes:
    """All the server answers to ``data`` sent as is, up to its closing the connection (socket.timeout
    when it keeps the connection open longer than ``wait``)."""
    import socket
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=wait) as conn:
        conn.sendall(data)
        answer = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return answer
            answer += chunk


def test_page_commands_never_wait_on_a_stranger_or_a_stalled_body(tmp_path):
    """A POST without the token is refused on its headers (its body never waited for); a body shorter than
    its Content-Length is answered 408 at its deadline, an idle connection dropped; odd lengths and chunked
    bodies are refused; an unread body is never taken for a next request (each refusal closes)."""
    import time
    from mrkd.runtime.control import LineControl
    from mrkd.runtime.outputs.web import OperatorServer
    token = "a-stalled-body-control-token"
    labels = tmp_path / "labels.jsonl"
    server = OperatorServer("127.0.0.1", 0, request_timeout_s=1.0)
    server.control = LineControl(token, labels, tmp_path / "events.jsonl", tmp_path / "evidence")
    head, auth = b"POST /review HTTP/1.1\r\nHost: 127.0.0.1\r\n", f"Authorization: Bearer {token}\r\n".encode()
    smuggled = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    try:
        started = time.monotonic()
        answer = _raw(server.url, head + b"Content-Length: 100\r\n\r\n{")        # the body never comes
        assert answer.startswith(b"HTTP/1.1 401") and time.monotonic() - started < 0.9, answer
        started = time.monotonic()
        answer = _raw(server.url, head + auth + b"Content-Length: 100\r\n\r\n{")      # 408 at the deadline
        assert answer.startswith(b"HTTP/1.1 408") and b"Connection: close" in answer, answer
        assert _raw(server.url, b"POST /rev") == b""                                  # a half-sent request too
        assert time.monotonic() - started < 4.5
        answer = _raw(server.url, head + auth + b"Content-Length: \xb2\r\n\r\n")     # "\u00b2".isdigit()
        assert answer.startswith(b"HTTP/1.1 400"), answer
        answer = _raw(server.url, head + auth + b"Content-Length: -1\r\n\r\n")        # not "too large"
        assert answer.startswith(b"HTTP/1.1 400") and b"whole number" in answer, answer
        started = time.monotonic()       # two lengths: refused at once, not left waiting for either body
        answer = _raw(server.url, head + auth + b"Content-Length: 2\r\nContent-Length: 40\r\n\r\n{}")
        assert answer.startswith(b"HTTP/1.1 400") and b"more than once" in answer, answer
        assert time.monotonic() - started < 0.9
        answer = _raw(server.url, head + auth + b"Content-Length: 20000\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 413"), answer
        answer = _raw(server.url, head + auth + b"Transfer-Encoding: chunked\r\n\r\n"
                      + b"%x\r\n" % len(smuggled) + smuggled + b"\r\n0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 411") and answer.count(b"HTTP/1.1 ") == 1, answer
        answer = _raw(server.url, head + b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
        assert answer.startswith(b"HTTP/1.1 401") and answer.count(b"HTTP/1.1 ") == 1, answer
        server.control = None                                                        # read-only: 405, closed
        answer = _raw(server.url, head + b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
        assert answer.startswith(b"HTTP/1.1 405") and answer.count(b"HTTP/1.1 ") == 1, answer
        assert not labels.exists()
    finally:
        server.close()


def _closed_within(conn, limit_s: float, trickle: bytes = b"", every_s: float = 0.2) -> float:
    """Seconds until the server closes ``conn`` (sending ``trickle`` every ``every_s`` meanwhile); inf when it
    is still open after ``limit_s``."""
    import select
    import time
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        try:
            if trickle:
                conn.sendall(trickle)
            readable, _, _ = select.select([conn], [], [], every_s)
            if readable and conn.recv(65536) == b"":
                return time.monotonic() - started
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
    return float("inf")


def test_page_drops_trickled_requests_caps_connections_and_answers_loopback_names_only(tmp_path):
    """A request whose bytes trickle in (each gap shorter than the socket timeout) is still dropped at the
    request deadline; connections beyond the cap (its places serving live streams) get 503 at once and a
    freed slot serves again (places held by requests that never arrive: test_page_hostile_requests); bound to
    127.0.0.1 the server refuses requests addressed to another host name (DNS rebinding), commands
    included, and serves 127.0.0.1, localhost and [::1]; bound to every interface, a name must be allowed
    with --http-allow-host (tests/test_page_hardening.py has the rest of that rule)."""
    import socket
    import time
    from mrkd.runtime.control import LineControl
    from mrkd.runtime.outputs.web import OperatorServer
    server = OperatorServer("127.0.0.1", 0, request_timeout_s=1.0)
    try:
        with socket.create_connection(server.httpd.server_address[:2], timeout=5) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            waited = _closed_within(conn, 6.0, trickle=b"X: y\r\n", every_s=0.2)
        assert 0.8 < waited < 2.5, waited      # 1 s deadline; without it: open as long as the trickle lasts
    finally:
        server.close()

    server = OperatorServer("127.0.0.1", 0, request_timeout_s=20.0, max_connections=3)
    address = server.httpd.server_address[:2]
    full = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    page = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    try:
        streams = [socket.create_connection(address, timeout=5) for _ in range(3)]
        for conn in streams:                               # the page's places, each serving a live stream
            conn.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        time.sleep(0.3)
        # past the cap, the probes' reserve: /healthz is still served (404: no metrics here), once per
        # connection; the page is not
        assert _raw(server.url, full).startswith(b"HTTP/1.1 404")
        answer = _raw(server.url, page)
        assert answer.startswith(b"HTTP/1.1 503") and b"Connection: close" in answer, answer
        holders = []
        for _ in range(8):
            conn = socket.create_connection(address, timeout=5)
            conn.sendall(b"GET /healthz HTTP/1.1\r\n")     # the reserve held too, by requests that never end
            holders.append(conn)
            time.sleep(0.02)                                 # in order: the oldest is known
        time.sleep(0.3)
        # Every connection is taken, all by requests still arriving: the one waiting longest is closed to
        # make room, so the scrape is served at once (before: 503 until a holder's 20 s ran out)
        for k in range(3):
            started = time.monotonic()
            answer = _raw(server.url, full)
            assert answer.startswith(b"HTTP/1.1 404") and time.monotonic() - started < 1.0, answer
            assert _closed_within(holders[k], 2.0) < 2.0              # it was that one, nobody younger
            assert all(_closed_within(conn, 0.05) == float("inf") for conn in holders[k + 1:] + streams)
            holders.append(socket.create_connection(address, timeout=5))   # every connection taken again
            holders[-1].sendall(b"GET /healthz HTTP/1.1\r\n")
            time.sleep(0.2)
        holders += streams
        for conn in holders:
            conn.close()
    finally:
        server.close()

    token = "a-rebinding-control-token"
    labels = tmp_path / "labels.jsonl"
    server = OperatorServer("127.0.0.1", 0)
    server.control = LineControl(token, labels, tmp_path / "events.jsonl", tmp_path / "evidence")
    port = server.httpd.server_address[1]
    body = b'{"event_id": "x", "label": "good"}'
    try:
        for host in (f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil.example", "10.0.0.8"):
            answer = _raw(server.url, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 421"), (host, answer)
            answer = _raw(server.url, f"POST /review HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                                      f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert answer.startswith(b"HTTP/1.1 421"), (host, answer)
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "127.3.4.5"):
            answer = _raw(server.url, f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 200"), (host, answer)
        assert not labels.exists()
    finally:
        server.close()

    server = OperatorServer("0.0.0.0", 0, allowed_hosts=("line7.plant.example",))
    try:
        url = f"http://127.0.0.1:{server.httpd.server_address[1]}"
        answer = _raw(url, b"GET / HTTP/1.1\r\nHost: line7.plant.example\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200"), answer
        answer = _raw(url, b"GET / HTTP/1.1\r\nHost: line8.plant.example\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 421"), answer
    finally:
        server.close()


def _self_signed(folder: Path):
    """A certificate for 127.0.0.1 and localhost and its key (PEM), made with cryptography, not our code."""
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mrkd test page")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return str(folder / "cert.pem"), str(folder / "key.pem")


def test_page_over_https_with_curl_and_a_stalled_handshake_holds_no_one_up(tmp_path):
    """--http-cert/--http-key: curl (trusting the certificate) gets the page and sends a command with the
    token; plain HTTP and an unverified certificate get nothing; a client that opens a connection and never
    starts its TLS handshake neither delays another client nor keeps its connection past the timeout."""
    import socket
    import time
    from peers import require_program
    from mrkd.runtime.control import LineControl
    from mrkd.runtime.outputs.web import OperatorServer
    curl = require_program("curl", ["curl"])
    cert, key = _self_signed(tmp_path)
    token = "an-https-control-token"
    server = OperatorServer("127.0.0.1", 0, request_timeout_s=2.0, tls=(cert, key))
    server.control = LineControl(token, tmp_path / "labels.jsonl", tmp_path / "events.jsonl", tmp_path / "evidence")

    def fetch(*args, url=None):
        done = subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", *args,
                               url or server.url + "/"], capture_output=True, text=True, timeout=30)
        return done.returncode, done.stdout

    stalled = socket.create_connection(server.httpd.server_address[:2], timeout=10)       # sends nothing
    try:
        assert server.url.startswith("https://127.0.0.1:")
        started = time.monotonic()
        assert fetch("--cacert", cert) == (0, "200")
        assert time.monotonic() - started < 1.5                          # not queued behind the stalled client
        assert fetch("--cacert", cert, "-X", "POST", "-H", f"Authorization: Bearer {token}",
                     url=server.url + "/reload") == (0, "403")           # token accepted: no model slots here
        assert fetch("--cacert", cert, "-X", "POST", "-H", "Authorization: Bearer wrong-token-wrong-token",
                     url=server.url + "/reload") == (0, "401")
        rc, code = fetch()                                                # certificate not trusted: refused
        assert rc == 60 and code == "000", (rc, code)
        rc, code = fetch(url=server.url.replace("https://", "http://") + "/")     # plain HTTP: no page
        assert rc != 0 and code == "000", (rc, code)
        assert _closed_within(stalled, 5.0) < 4.0                         # dropped at the 2 s deadline
    finally:
        stalled.close()        # first: a server stuck in its handshake (the bug) could not shut down
        server.close()


def _install_pair(source_folder: Path, cert: str, key: str) -> None:
    """Move a certificate and key over the served ones, each atomically (a renewal tool's way)."""
    for name, target in (("cert.pem", cert), ("key.pem", key)):
        Path(target + ".new").write_bytes((source_folder / name).read_bytes())
        os.replace(target + ".new", target)


def _served_certificate(url: str) -> bytes:
    """The DER certificate a new TLS connection to ``url`` is shown (Python's ssl client, unverified)."""
    import socket
    import ssl
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=parts.hostname) as tls:
            return tls.getpeercert(binary_form=True)


def _der(pem_path) -> bytes:
    import ssl
    return ssl.PEM_cert_to_DER_cert(Path(pem_path).read_text())


def test_page_certificate_reload_new_connections_get_it_a_broken_pair_is_refused(tmp_path):
    """reload_certificate: curl trusting only the new certificate is served after the reload and one
    trusting only the old is refused; a connection opened before keeps working with the old one; a
    pair that does not load leaves the served certificate as it was and says why in health()."""
    import socket
    import ssl
    from peers import require_program
    from mrkd.runtime.outputs.web import OperatorServer
    curl = require_program("curl", ["curl"])
    served, old, new = (tmp_path / name for name in ("served", "old", "new"))
    for folder in (served, old, new):
        folder.mkdir()
    _self_signed(old), _self_signed(new)
    cert, key = str(served / "cert.pem"), str(served / "key.pem")
    _install_pair(old, cert, key)
    server = OperatorServer("127.0.0.1", 0, request_timeout_s=5.0, tls=(cert, key))

    def fetch(trusted):
        done = subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                               "--cacert", str(trusted), server.url + "/"],
                              capture_output=True, text=True, timeout=30)
        return done.returncode, done.stdout

    context = ssl.create_default_context(cafile=str(old / "cert.pem"))
    early = context.wrap_socket(socket.create_connection(server.httpd.server_address[:2], timeout=10),
                                server_hostname="127.0.0.1")
    try:
        assert fetch(old / "cert.pem") == (0, "200")
        assert _served_certificate(server.url) == _der(old / "cert.pem")
        _install_pair(new, cert, key)
        assert _served_certificate(server.url) == _der(old / "cert.pem")      # nothing changes before the reload
        assert server.reload_certificate("test") is True
        assert _served_certificate(server.url) == _der(new / "cert.pem")
        assert fetch(new / "cert.pem") == (0, "200")
        assert fetch(old / "cert.pem")[0] == 60                              # the old one is no longer served
        early.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert early.recv(64).startswith(b"HTTP/1.1 200")                      # opened before: still served
        assert early.getpeercert(binary_form=True) == _der(old / "cert.pem")
        # a renewal that went wrong: the new certificate with a key that is not its own, then a junk file
        Path(key + ".new").write_bytes((old / "key.pem").read_bytes())
        os.replace(key + ".new", key)
        assert server.reload_certificate("test") is False
        assert "REFUSED" in server.health().detail and cert in server.health().detail
        (served / "cert.pem").write_text("not a certificate\n")
        assert server.reload_certificate("test") is False
        assert _served_certificate(server.url) == _der(new / "cert.pem")      # the last good pair stays
        assert fetch(new / "cert.pem") == (0, "200")
        _install_pair(new, cert, key)
        assert server.reload_certificate("test") is True and server.health().detail == ""
        assert server.certificate_reloads == 2
    finally:
        early.close()
        server.close()


def test_control_token_beyond_this_machine_needs_https(tmp_path, monkeypatch):
    """A token that would cross the network in clear text is refused at start, in one line; on 127.0.0.1
    or over HTTPS it is taken; certificate and key go together and must load."""
    from click.testing import CliRunner
    from runtime_fixtures import build_tiny_model
    from mrkd.cli import main
    from mrkd.runtime.control import ControlError, pop_control_options
    monkeypatch.setenv("MRKD_TEST_TOKEN", "a-long-enough-control-token")
    with pytest.raises(ControlError, match=r"--control-token-env with --http 0\.0\.0\.0:8080: the token would "
                                           r"cross the network unencrypted; add --http-cert and --http-key"):
        pop_control_options({"control_token_env": "MRKD_TEST_TOKEN"}, "0.0.0.0:8080")
    for http, tls in (("0.0.0.0:8080", True), ("127.0.0.1:8080", False), (":8080", False), ("[::1]:8080", False)):
        assert pop_control_options({"control_token_env": "MRKD_TEST_TOKEN"}, http, tls=tls)["token"]
    model = build_tiny_model(tmp_path / "tiny.onnx")
    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "a.png"), normal_frame(np.random.default_rng(0)))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    cert, key = _self_signed(tmp_path)
    for extra, message in (
            (["--http", "0.0.0.0:0", "--control-token-env", "MRKD_TEST_TOKEN"], "the token would cross the network"),
            (["--http", "127.0.0.1:0", "--http-cert", cert], "--http-cert and --http-key go together"),
            (["--http-cert", cert, "--http-key", key], "--http-cert/--http-key need --http HOST:PORT"),
            (["--http", "127.0.0.1:0", "--http-cert", str(tmp_path / "junk.pem"), "--http-key", key],
             "cannot load them"),
            (["--http", "127.0.0.1:0", "--control-token-env", "MRKD_TEST_TOKEN", "--events", str(tmp_path / "e.jsonl"),
              "--review-labels", str(tmp_path / "e.jsonl")], "is the --events log")):
        result = CliRunner().invoke(main, ["run", str(model), "--source", str(frames), *extra])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, \
            (extra, result.output)


def test_a_control_token_no_client_can_send_is_refused_at_start(monkeypatch):
    """Spaces at either end, a non-ASCII or a control character: the line started, and every command,
    with the exact token in the header (curl), was refused 401."""
    from mrkd.runtime.control import ControlError, LineControl, token_from_env
    for token in ("a-long-enough-control-token ", " a-long-enough-control-token", " " * 16,
                  "a-long-enough-control-tokén", "a-long-enough-control\ttoken"):
        monkeypatch.setenv("MRKD_TEST_TOKEN", token)
        with pytest.raises(ControlError, match="MRKD_TEST_TOKEN: the control token must be printable ASCII"):
            token_from_env("MRKD_TEST_TOKEN")
    token = "a-long-enough_control.token~!"
    monkeypatch.setenv("MRKD_TEST_TOKEN", token)
    control = LineControl(token_from_env("MRKD_TEST_TOKEN"))
    assert control.authorized({"Authorization": f"Bearer {token}"})[0]
    assert control.authorized({"Authorization": f"Bearer {token[:-1]}"})[1] == 401


@pytest.mark.slow
def test_review_from_the_page_in_chromium_with_and_without_the_token(line_run, tmp_path):
    """A browser on the operator page posts a review the way a page script would (fetch, same origin):
    refused without the token or with a wrong one, saved with it."""
    from peers import require_program
    require_program("/usr/bin/chromium", ["chromium"])
    from playwright.sync_api import sync_playwright
    from mrkd.runtime.control import LineControl
    from mrkd.runtime.outputs.web import OperatorServer
    root, _, events, _ = line_run
    token = "chromium-review-token-123"
    labels = tmp_path / "labels.jsonl"
    server = OperatorServer("127.0.0.1", 0)
    server.control = LineControl(token, labels, root / "events.jsonl", root / "evidence")
    script = """async ([eventId, auth]) => {
        const headers = {"Content-Type": "application/json"};
        if (auth) headers["Authorization"] = "Bearer " + auth;
        const response = await fetch("/review", {method: "POST", headers,
            body: JSON.stringify({event_id: eventId, label: "good", note: "from the page", who: "chromium"})});
        return [response.status, await response.json()];
    }"""
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                                 args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
            page = browser.new_page()
            page.goto(server.url + "/")
            event_id = events[2]["event_id"]
            assert page.evaluate(script, [event_id, None])[0] == 401
            assert page.evaluate(script, [event_id, "not-" + token])[0] == 401
            assert not labels.exists()
            status, answer = page.evaluate(script, [event_id, token])
            assert status == 200 and answer["saved"]["who"] == "chromium", answer
            browser.close()
    finally:
        server.close()
    saved = read_labels(labels)
    assert [(l.event_id, l.label, l.note) for l in saved] == [(event_id, GOOD, "from the page")]
    assert saved[0].image_sha256 == events[2]["evidence_sha256"]


def test_mrkd_run_evidence_option_keeps_the_delivered_image(line_run, tmp_path):
    """--evidence through the command line: each event names a PNG equal, pixel for pixel, to a frame file."""
    root = line_run[0]
    log, folder = tmp_path / "events.jsonl", tmp_path / "evidence"
    done = mrkd("run", root / "model.onnx", "--source", root / "frames", "--cooldown", "0", "--events", log,
                "--evidence", folder, "--status-every", "0", timeout=300)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in log.read_text().splitlines()]
    frames = [cv2.imread(str(path)) for path in sorted((root / "frames").iterdir())]
    assert len(events) == 3
    for event in events:
        assert event["evidence_sha256"] == sha(event["evidence"])
        kept = cv2.imread(event["evidence"])
        assert any(kept.shape == f.shape and np.array_equal(kept, f) for f in frames)
    one_error(mrkd("run", root / "model.onnx", "--source", root / "frames", "--evidence-ok-every", "2"),
              "--evidence")


def test_review_listing_into_a_pipe_whose_reader_left_ends_quietly(tmp_path):
    """`mrkd review EV | head -1`: the reader leaves, the listing ends like a shell tool (141, nothing
    on stderr), not with "Error: [Errno 32] Broken pipe"."""
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps({"event_id": f"e{i}", "time": "2026-12-05T00:00:00Z", "camera": "cam0",
                                          "score": 2.0, "threshold": 1.0}) + "\n" for i in range(200)))
    code = "import sys\nfrom mrkd.cli import main\nsys.argv[0] = 'mrkd'\nmain(sys.argv[1:])"
    reader, writer = os.pipe()
    os.close(reader)                       # the reader has gone before the first line
    try:
        done = subprocess.run([sys.executable, "-c", code, "review", str(events), "--labels", str(tmp_path / "l.jsonl")],
                              stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(writer)
    assert done.returncode == 141 and done.stderr == "", done.stderr


def test_a_label_on_a_full_disk_names_the_label_file_and_leaves_no_empty_one(tmp_path):
    image = tmp_path / "e1.png"
    cv2.imwrite(str(image), np.full((16, 16, 3), 128, np.uint8))
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps({"event_id": "e1", "time": "2026-12-05T00:00:00Z", "camera": "cam0", "score": 2.0,
                                  "threshold": 1.0, "evidence": str(image),
                                  "evidence_sha256": hashlib.sha256(image.read_bytes()).hexdigest()}) + "\n")
    with small_tmpfs(tmp_path / "disk", "size=64k") as disk:
        filler = fill_up(disk)
        labels = disk / "labels.jsonl"
        done = mrkd("review", events, "--labels", labels, "--mark", "e1", "--as", "good")
        one_error(done, str(labels), "label not saved")
        assert not labels.exists()
        filler.unlink()
        done = mrkd("review", events, "--labels", labels, "--mark", "e1", "--as", "good")
        assert done.returncode == 0, done.stderr
        assert [label.event_id for label in read_labels(labels)] == ["e1"]


@pytest.mark.parametrize("content", [b"Line 7 shift notes, no newline", b'{"a": 1}', b"notes\nmore notes\n",
                                     b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3])
def test_a_file_that_is_no_label_file_is_refused_and_left_unchanged(tmp_path, content):
    """Notes, minified JSON or an image given as --labels lost their last line (or bytes) to the torn
    line repair and got a label appended; now: one line, nothing changed."""
    victim = tmp_path / "notes.txt"
    victim.write_bytes(content)
    with pytest.raises(ReviewError, match="not an mrkd label file; it is left unchanged"):
        LabelFile(victim)
    assert victim.read_bytes() == content
    torn = tmp_path / "labels.jsonl"
    line = json.dumps({"event_id": "e1", "image_sha256": "ab" * 32, "label": GOOD, "who": "op",
                       "when": "2026-12-05T00:00:00Z"}) + "\n"
    torn.write_text(line + '{"event_id": "e2", "ima')       # a label file with a torn last label: repaired
    LabelFile(torn).close()
    assert torn.read_text() == line


def test_a_replaced_events_log_is_named_once_when_the_label_file_is_given_relative(tmp_path, monkeypatch):
    """`mrkd refit --reviewed run/labels.jsonl` (a relative path, as typed) after the run's events log was
    rotated by truncation: the note named the one log twice, by its recorded absolute path and again as
    the relative 'beside the label file' candidate, as if two logs had been looked at."""
    from mrkd.runtime.review import EventsLogRef, find_recorded_log
    run = tmp_path / "run"
    run.mkdir()
    log = run / "events.jsonl"
    log.write_text(json.dumps({"event_id": "b0", "camera": "cam0"}) + "\n")   # the log now: another first event
    monkeypatch.chdir(tmp_path)
    found = find_recorded_log(EventsLogRef(str(log), "a0"), Path("run") / "labels.jsonl")
    assert found.path is None and found.problem.startswith("was replaced by another log")
    assert found.problem.count("begins with event 'b0'") == 1, found.problem
    assert str(log) in found.problem
