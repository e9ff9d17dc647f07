"""Signed webhooks against a loopback receiver that checks each body's HMAC-SHA256 itself (hashlib's
hmac, not ours), sees the custom headers, and drops the duplicate a retry delivers by its event id."""

import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from runtime_fixtures import build_tiny_model, normal_then_defective, write_video

from mrkd.runtime import (AlarmPolicy, Detector, OutputSettings, WebhookSettings, build_outputs, open_source,
                          read_events, run_stream)
from mrkd.runtime.outputs.webhook import parse_header, sign_body, verify_signature

TESTS = Path(__file__).parent
SECRET = b"line-7-shared-secret"


class VerifyingReceiver:
    """Accepts POSTs whose X-Mrkd-Signature is the HMAC-SHA256 of the body under ``secret``; answers
    500 (without keeping the event) to the first ``fail_first`` requests, so the sender retries."""

    def __init__(self, secret: bytes, fail_first: int = 0):
        self.secret, self.fail_first = secret, fail_first
        self.accepted, self.rejected, self.headers = [], [], []
        self.seen_ids = set()
        self.duplicates = 0
        owner = self
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                expected = "sha256=" + hmac.new(owner.secret, body, hashlib.sha256).hexdigest()
                with lock:
                    owner.headers.append(dict(self.headers))
                    if not hmac.compare_digest(expected, self.headers.get("X-Mrkd-Signature", "")):
                        owner.rejected.append(body)
                        code = 401
                    elif owner.fail_first > 0:
                        owner.fail_first -= 1
                        code = 500
                    else:
                        event_id = self.headers["X-Mrkd-Event-Id"]
                        assert json.loads(body)["event_id"] == event_id
                        if event_id in owner.seen_ids:
                            owner.duplicates += 1
                        else:
                            owner.seen_ids.add(event_id)
                            owner.accepted.append(json.loads(body))
                        code = 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alarm"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_signature_helpers_agree_with_hashlib():
    body = b'{"event_id": "x", "score": 0.5}'
    assert sign_body(body, SECRET) == "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    assert verify_signature(body, SECRET, sign_body(body, SECRET))
    assert not verify_signature(body + b" ", SECRET, sign_body(body, SECRET))
    assert not verify_signature(body, b"other", sign_body(body, SECRET)) and not verify_signature(body, SECRET, None)


@pytest.mark.parametrize("text", ["no colon", ": value", "Two Words: v", "X-A: line\nbreak"])
def test_bad_headers_are_refused(text):
    with pytest.raises(ValueError, match="Name: value"):
        parse_header(text)


def test_signed_events_with_headers_and_a_retry_the_receiver_deduplicates(tmp_path):
    receiver = VerifyingReceiver(SECRET, fail_first=1)
    sinks = build_outputs(OutputSettings(events=str(tmp_path / "events.jsonl"), webhook=WebhookSettings(
        receiver.url, secret=SECRET, headers=(("Authorization", "Bearer abc123"), ("X-Line", "7")), backoff=0.05)))
    detector = Detector(build_tiny_model(tmp_path / "m.onnx"))
    summary = run_stream(detector, open_source(normal_then_defective(2, 3)), AlarmPolicy(0.1), sinks,
                         status=lambda line: None)
    receiver.close()
    logged = read_events(tmp_path / "events.jsonl")
    webhook = summary["outputs"]["webhook"]
    assert {k: webhook[k] for k in ("sent", "failed", "dropped")} == {"sent": 3, "failed": 0, "dropped": 0}
    assert [e["event_id"] for e in receiver.accepted] == [e["event_id"] for e in logged]
    assert receiver.accepted == logged and not receiver.rejected
    assert len(receiver.headers) == 4          # the first event twice: refused with 500, then retried
    first, retry = receiver.headers[0], receiver.headers[1]
    assert first["X-Mrkd-Event-Id"] == retry["X-Mrkd-Event-Id"] == logged[0]["event_id"]
    assert first["X-Mrkd-Signature"] == retry["X-Mrkd-Signature"]
    assert all(h["Authorization"] == "Bearer abc123" and h["X-Line"] == "7" for h in receiver.headers)


def test_a_receiver_with_another_secret_rejects_every_post(tmp_path):
    receiver = VerifyingReceiver(b"not the line's secret")
    sinks = build_outputs(OutputSettings(webhook=WebhookSettings(receiver.url, secret=SECRET, retries=0)))
    detector = Detector(build_tiny_model(tmp_path / "m.onnx"))
    summary = run_stream(detector, open_source(normal_then_defective(1, 2)), AlarmPolicy(0.1), sinks,
                         status=lambda line: None)
    receiver.close()
    webhook = summary["outputs"]["webhook"]
    assert webhook["sent"] == 0 and webhook["failed"] == 2
    assert len(receiver.rejected) == 2 and not receiver.accepted


@pytest.mark.slow
def test_mrkd_run_signs_with_the_secret_from_the_environment(tmp_path):
    receiver = VerifyingReceiver(SECRET)
    video = write_video(tmp_path / "v.avi", normal_then_defective(3, 2))
    model = build_tiny_model(tmp_path / "m.onnx")
    env = dict(os.environ, PYTHONPATH=str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               LINE_WEBHOOK_SECRET=SECRET.decode())
    done = subprocess.run([sys.executable, "-c", "from mrkd.cli import main; main()", "run", str(model),
                           "--source", str(video), "--cooldown", "0", "--status-every", "0",
                           "--webhook", receiver.url, "--webhook-header", "Authorization: Bearer t0ken",
                           "--webhook-secret-env", "LINE_WEBHOOK_SECRET"],
                          capture_output=True, text=True, env=env, timeout=120)
    receiver.close()
    assert done.returncode == 0, done.stderr
    assert len(receiver.accepted) == 2 and not receiver.rejected
    assert all(h["Authorization"] == "Bearer t0ken" for h in receiver.headers)


@pytest.mark.parametrize("extra, message", [
    (["--webhook-header", "nocolon", "--webhook", "http://127.0.0.1:9/"], "Name: value"),
    (["--webhook-secret-env", "MRKD_TEST_UNSET_VAR", "--webhook", "http://127.0.0.1:9/"], "not set"),
    (["--webhook-header", "A: b"], "need --webhook"),
])
def test_webhook_option_mistakes_are_one_line_errors(tmp_path, extra, message):
    from mrkd.runtime.cli import run_command
    model = build_tiny_model(tmp_path / "m.onnx")
    os.environ.pop("MRKD_TEST_UNSET_VAR", None)
    result = CliRunner().invoke(run_command, [str(model), "--source", str(tmp_path)] + extra)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
