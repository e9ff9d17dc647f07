"""The operator page in a real headless Chromium (Debian's, driven by Playwright): it loads, the live
view changes, an alarm raised by the stream shows up (with its snapshot) within 2 seconds; read-only.
Set MRKD_OPERATOR_SCREENSHOT=path to also save the screenshot there (docs/operator_page.png)."""

import os
import time
import urllib.error
import urllib.request

import pytest

from line_fixtures import DrivenFrames, LineRun, Recorder, wait_for
from peers import require_program
from runtime_fixtures import build_tiny_model

from mrkd.runtime import OutputSettings, build_outputs, read_events
from mrkd.runtime.outputs.metrics import MetricsObserver
from mrkd.runtime.outputs.base import CameraInfo, FrameResult
from mrkd.runtime.outputs.web import OperatorServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def test_nothing_is_encoded_for_the_browser_until_someone_watches(tmp_path):
    import numpy as np
    server = OperatorServer("127.0.0.1", 0)
    info = CameraInfo("a", "memory", "m.onnx", "00" * 32, "onnxruntime", "fp32", 0.5, "test")
    server.on_start([info])
    image = np.zeros((16, 16, 3), np.uint8)
    for i in range(50):
        server.on_frame(FrameResult("a", i, float(i), image, np.zeros((8, 8), np.float32), 0.1, 0.5, False))
    time.sleep(0.3)
    assert server.views["a"].encoded == 0 and server.views["a"].encoder is None
    with urllib.request.urlopen(server.url + "/stream/a.mjpg", timeout=5) as stream:
        for i in range(50, 60):
            server.on_frame(FrameResult("a", i, float(i), image, np.zeros((8, 8), np.float32), 0.1, 0.5, False))
            time.sleep(0.02)
        assert stream.read(9) == b"--frame\r\n"
    assert server.views["a"].encoded >= 1
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(server.url + "/", data=b"x", method="POST"), timeout=5)
    assert refused.value.code == 405
    server.close()


def test_the_page_listens_on_an_ipv6_address(tmp_path):
    """--http [::1]:PORT failed with 'Address family for hostname not supported' (an IPv4 socket)."""
    import socket
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    outputs = build_outputs(OutputSettings(http="[::1]:0"))
    try:
        server = next(o for o in outputs if isinstance(o, OperatorServer))
        assert server.url.startswith("http://[::1]:"), server.url
        with urllib.request.urlopen(server.url + "/metrics", timeout=5) as answer:
            assert answer.status == 200
    finally:
        for output in outputs:
            output.on_stop()


def test_hello_says_whether_review_can_record_labels(tmp_path):
    """The page offers its review buttons only where POST /review can record: a token and a label file."""
    import json
    from mrkd.runtime.control import LineControl

    def hello_review(server):
        with urllib.request.urlopen(server.url + "/events", timeout=5) as stream:
            lines = iter(stream.readline, b"")
            assert next(lines) == b"event: hello\n"
            return json.loads(next(lines)[len(b"data: "):])["review"]

    server = OperatorServer("127.0.0.1", 0)
    try:
        assert hello_review(server)["enabled"] is False and "--control-token-env" in hello_review(server)["why"]
        server.control = LineControl(None, tmp_path / "labels.jsonl")
        assert hello_review(server)["enabled"] is False
        server.control = LineControl("a-token-of-sixteen-chars", None)
        assert hello_review(server)["enabled"] is False
        server.control = LineControl("a-token-of-sixteen-chars", tmp_path / "labels.jsonl")
        assert hello_review(server) == {"enabled": True, "why": ""}
    finally:
        server.close()


@pytest.mark.slow
def test_page_loads_live_view_changes_and_an_alarm_appears_within_two_seconds(tmp_path):
    require_program(CHROMIUM, ["chromium"])
    from playwright.sync_api import sync_playwright

    model = build_tiny_model(tmp_path / "m.onnx")
    cameras = {"left": DrivenFrames(fps=25, seed=1, size=(96, 128)), "right": DrivenFrames(fps=25, seed=2, size=(96, 128))}
    recorder, metrics = Recorder(), MetricsObserver()
    server = OperatorServer("127.0.0.1", 0, metrics=metrics)
    run = LineRun(model, cameras, [recorder, metrics, server],
                  build_outputs(OutputSettings(events=str(tmp_path / "events.jsonl"), snapshots=str(tmp_path / "snaps"))))
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(server.url + "/")
            page.wait_for_selector("#cam-left .state.up", timeout=10000)
            page.wait_for_selector("#cam-right .state.up", timeout=10000)
            live = page.locator("#cam-left img.live")
            page.wait_for_function("document.querySelector('#cam-left img.live').naturalWidth > 0", timeout=10000)
            before = live.screenshot()
            time.sleep(0.6)
            after = live.screenshot()
            assert before != after, "the live view did not change"
            # fps and the threshold with where it came from are on the card.
            assert float(page.locator("#cam-left dd[data-key=fps]").inner_text()) > 5
            threshold_text = page.locator("#cam-left dd[data-key=threshold]").inner_text()
            info = recorder.cameras["left"]
            shown, _, where = threshold_text.partition(" (")
            assert float(shown) == pytest.approx(info.threshold, rel=1e-4) and where == info.threshold_source + ")"
            cameras["right"].defects(1)
            assert wait_for(lambda: recorder.events, 5), "the stream raised no alarm"
            raised_at, camera, event = recorder.events[0]
            item = page.locator(f'.alarm[data-event-id="{event["event_id"]}"]')
            item.wait_for(timeout=2000)
            shown_after = time.monotonic() - raised_at
            assert camera == "right" and shown_after < 2.0, shown_after
            assert item.get_attribute("data-camera") == "right"
            page.wait_for_function(
                f"document.querySelector('.alarm[data-event-id=\"{event['event_id']}\"] img').naturalWidth > 0",
                timeout=5000)
            assert read_events(tmp_path / "events.jsonl")[0]["event_id"] == event["event_id"]
            time.sleep(0.3)
            shot = tmp_path / "operator_page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10000
            if os.environ.get("MRKD_OPERATOR_SCREENSHOT"):
                page.screenshot(path=os.environ["MRKD_OPERATOR_SCREENSHOT"], full_page=True)
            browser.close()
    finally:
        run.stop()


def test_viewers_and_a_broker_that_never_read_do_not_stall_the_line(tmp_path):
    """Two page clients that connect and then never read (their socket buffers fill, so the server's
    writes block) and a 'broker' that accepts TCP and never answers: the line scores every frame."""
    import socket
    from mrkd.runtime.outputs.mqtt import MqttObserver, MqttSettings

    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(8)
    model = build_tiny_model(tmp_path / "m.onnx")
    frames, recorder = DrivenFrames(fps=40, size=(480, 640)), Recorder()
    server = OperatorServer("127.0.0.1", 0, stream_fps=30)
    mqtt = MqttObserver(MqttSettings.from_url(f"mqtt://127.0.0.1:{black_hole.getsockname()[1]}/x"),
                        close_deadline_s=0.5)
    run = LineRun(model, {"cam0": frames}, [recorder, server, mqtt],
                  build_outputs(OutputSettings(events=str(tmp_path / "events.jsonl"))))
    stalled = []
    for path in ("/stream/cam0.mjpg", "/events"):
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(server.httpd.server_address[:2])
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        stalled.append(client)
    # 20 noisy VGA JPEGs (~100 kB each) are more than a 4 kB receive buffer and the send buffer hold.
    assert wait_for(lambda: server.views and server.views["cam0"].encoded >= 20, 20)
    frames.defects(3)
    assert wait_for(lambda: len(recorder.events) == 3, 10)
    before = len(recorder.frames)
    time.sleep(1.0)
    assert len(recorder.frames) - before >= 10        # still scoring at the source's pace (40/s, loaded VM)
    summary = run.stop()
    for client in stalled:
        client.close()
    black_hole.close()
    assert summary["frames"] == frames.yielded and summary["events"] == 3
    link = mqtt.links["cam0"]
    # The events the broker never took are counted as MQTT failures, and the sender has ended.
    assert not link.connected.is_set() and not link._thread.is_alive() and mqtt.failures()["cam0"] >= 3
