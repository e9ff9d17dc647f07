"""MQTT output against a real Mosquitto on loopback: events arrive with their ids and the model hash,
the retained status greets a late subscriber, a SIGKILLed runtime's last will says offline, and no
event is lost while the broker restarts. The broker is started by each test on a free port."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from line_fixtures import DrivenFrames, LineRun, MqttRecorder, broker, wait_for  # noqa: F401 (broker: a fixture)
from peers import require_program
from runtime_fixtures import build_tiny_model, normal_then_defective, write_video

from mrkd.benchmarks.mosquitto import Mosquitto
from mrkd.runtime import OutputSettings, build_outputs, read_events
from mrkd.runtime.outputs.mqtt import MqttObserver, MqttSettings, MqttSettingsError

TESTS = Path(__file__).parent
MRKD = [sys.executable, "-c", "from mrkd.cli import main; main()"]


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("url, message", [
    ("http://host/x", "mqtt://HOST:PORT/PREFIX"), ("mqtt:///prefix", "mqtt://HOST:PORT/PREFIX"),
    ("mqtt://host:99999/p", "port"), ("mqtt://host:1883/a/+/b", "prefix"), ("mqtt://host:abc/p", "port"),
    # '#' starts a URL fragment: mqtt://h/line/# published under line/, mqtt://h/# under mrkd/
    ("mqtt://host:1883/line/#", "may not hold '#'"), ("mqtt://host:1883/#", "may not hold '#'"),
    ("mqtt://host/line?x=1", "'\\?'"),
    # the broker refuses a topic over 65535 bytes: every message would be dropped
    ("mqtt://host/" + "a" * 70000, "at most 65535 bytes"), ("mqtt://host/" + "\u00e9" * 32732, "65535 bytes")])
def test_bad_urls_are_refused_naming_the_problem(url, message):
    with pytest.raises(MqttSettingsError, match=message.replace("+", r"\+")):
        MqttSettings.from_url(url)


def test_the_longest_prefix_a_broker_takes_is_accepted():
    from mrkd.runtime.outputs.mqtt import LONGEST_TOPIC_TAIL, MAX_TOPIC_BYTES
    longest = "a" * (MAX_TOPIC_BYTES - len(LONGEST_TOPIC_TAIL))
    assert MqttSettings.from_url("mqtt://host/" + longest).prefix == longest


def test_url_parts():
    s = MqttSettings.from_url("mqtts://u%40x@broker.local/plant/line1", results_rate=2.0, password="pw")
    assert (s.host, s.port, s.prefix, s.tls, s.username, s.password, s.results_rate) == \
        ("broker.local", 8883, "plant/line1", True, "u@x", "pw", 2.0)
    assert MqttSettings.from_url("mqtts://h/x", tls=False).tls                # the CLI's default cannot undo it
    with pytest.raises(MqttSettingsError, match=r"mqtt://u:\*\*\*@h/x: carries a password") as refused:
        MqttSettings.from_url("mqtt://u:s3cret@h/x")                        # it would show in the process list
    assert "s3cret" not in str(refused.value)


def test_a_ca_file_that_is_no_certificate_is_refused_at_the_start(tmp_path):
    junk = tmp_path / "ca.pem"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n an image, not a certificate")
    with pytest.raises(MqttSettingsError, match="holds no usable certificate"):
        MqttSettings.from_url("mqtts://h/x", ca_certs=str(junk))
    assert MqttSettings.from_url("mqtt://h").port == 1883 and MqttSettings.from_url("mqtt://h").prefix == "mrkd"


def test_events_and_a_retained_status_for_late_subscribers(tmp_path, broker):
    model = build_tiny_model(tmp_path / "m.onnx")
    early = MqttRecorder(broker.port, "plant/#")
    frames = DrivenFrames()
    observer = MqttObserver(MqttSettings.from_url(broker.url("plant"), results_rate=5.0))
    run = LineRun(model, {"left": frames}, [observer], build_outputs(OutputSettings(
        events=str(tmp_path / "events.jsonl"), snapshots=str(tmp_path / "snaps"))))
    assert wait_for(lambda: early.bodies("/left/status"), 10), "no online status"
    frames.defects(3)
    assert wait_for(lambda: len(early.bodies("/left/event")) == 3, 10), early.messages
    late = MqttRecorder(broker.port, "plant/+/status")
    assert wait_for(lambda: late.messages, 5)
    started = time.monotonic()
    time.sleep(1.0)
    summary = run.stop()
    seconds = time.monotonic() - started
    # The late subscriber got the retained online status, with where the threshold came from.
    topic, status, retained = late.messages[0]
    assert topic == "plant/left/status" and retained and status["state"] == "online"
    assert status["model_sha256"] == _sha256(model) and status["threshold"] == pytest.approx(0.1)
    from mrkd.runtime.backends import resolve_backend_name   # auto: OpenVINO on Intel CPUs where installed
    assert status["threshold_source"] and status["backend"] == resolve_backend_name(model)
    logged = read_events(tmp_path / "events.jsonl")
    events = early.bodies("/left/event")
    assert [e["event_id"] for e in events] == [e["event_id"] for e in logged]
    for sent, written in zip(events, logged):
        assert sent["model_sha256"] == _sha256(model) and sent["camera"] == "left"
        assert {k: sent[k] for k in ("score", "threshold", "boxes", "snapshot", "time")} == \
               {k: written[k] for k in ("score", "threshold", "boxes", "snapshot", "time")}
        assert sent["score"] >= sent["threshold"] and sent["boxes"] and Path(sent["snapshot"]).exists()
    # Results: at most 5 a second, not one per frame.
    results = early.bodies("/left/result")
    assert 1 <= len(results) <= 5 * (seconds + 4) < summary["frames"]
    # A clean stop publishes offline itself, retained for the next subscriber.
    after = MqttRecorder(broker.port, "plant/left/status")
    assert wait_for(lambda: after.messages, 5)
    assert after.messages[0][1]["state"] == "offline" and after.messages[0][2]
    assert observer.failures() == {"left": 0}
    for recorder in (early, late, after):
        recorder.close()


def test_an_alarm_frames_result_names_the_id_its_event_has_once_complete(tmp_path, broker, monkeypatch):
    """The snapshot writer draws an event's id again when a file of that name exists (32 random bits that
    clash within a millisecond), on the alarm notifier's thread; the result message read the id on the loop's
    thread before that, so it named an id no event had. The clash is forced here: every id the loop draws is
    one whose snapshot files already exist."""
    from mrkd.runtime.outputs import events as events_module
    clashing = "20260101T000000.000Z-deadbeef"
    monkeypatch.setattr(events_module, "new_event_id", lambda now=None: clashing)     # make_event's draw only
    snapshots = tmp_path / "snaps"
    (snapshots / "left").mkdir(parents=True)
    for index in range(1000):
        (snapshots / "left" / f"alarm_{clashing}_frame{index:08d}.jpg").touch()
    model = build_tiny_model(tmp_path / "m.onnx")
    subscriber = MqttRecorder(broker.port, "clash/#")
    frames = DrivenFrames(fps=10.0)          # a result per frame: the sender polls every 50 ms
    observer = MqttObserver(MqttSettings.from_url(broker.url("clash"), results_rate=100.0))
    run = LineRun(model, {"left": frames}, [observer], build_outputs(OutputSettings(
        events=str(tmp_path / "events.jsonl"), snapshots=str(snapshots))))
    assert wait_for(lambda: subscriber.bodies("/left/status"), 10), "no online status"
    frames.defects(3)
    assert wait_for(lambda: len(subscriber.bodies("/left/event")) == 3, 10), subscriber.messages
    assert wait_for(lambda: sum(1 for r in subscriber.bodies("/left/result") if r["event_id"]) >= 3, 5), \
        subscriber.bodies("/left/result")
    run.stop()
    subscriber.close()
    events = {e["event_id"]: e for e in subscriber.bodies("/left/event")}
    assert clashing not in events and set(events) == {e["event_id"] for e in read_events(tmp_path / "events.jsonl")}
    named = [r for r in subscriber.bodies("/left/result") if r["event_id"]]
    assert [r["event_id"] for r in named] == list(events), named     # each alarm frame's result, in order
    for result in named:
        event = events[result["event_id"]]
        assert (result["frame_index"], result["score"]) == (event["frame_index"], event["score"])
        assert Path(event["snapshot"]).name == f"alarm_{result['event_id']}_frame{result['frame_index']:08d}.jpg"


def test_a_status_queued_while_the_broker_was_away_is_not_retained_stale(tmp_path):
    """The camera's status, queued while no broker answered, went out after the fresh one published on
    connect, so the retained status was the old one (its time from before the broker came up)."""
    import datetime as dt
    from mrkd.benchmarks.mosquitto import free_port
    require_program("mosquitto", ["mosquitto"])
    model = build_tiny_model(tmp_path / "m.onnx")
    port = free_port()
    observer = MqttObserver(MqttSettings.from_url(f"mqtt://127.0.0.1:{port}/st", connect_timeout=1.0))
    frames = DrivenFrames()
    run = LineRun(model, {"cam": frames}, [observer], [])
    broker = None
    try:
        # the camera is up: its status went to the sender, which holds it until a broker answers
        assert wait_for(lambda: "cam" in observer.links and observer.links["cam"].source_up, 10)
        time.sleep(1.2)
        up = dt.datetime.now(dt.timezone.utc)
        (tmp_path / "b").mkdir()
        broker = Mosquitto(folder=tmp_path / "b", port=port).start()
        assert wait_for(lambda: observer.links["cam"].connected.is_set() and not observer.links["cam"].pending(), 15)
        time.sleep(0.5)                                          # whatever was queued has gone out
        late = MqttRecorder(port, "st/cam/status")
        assert wait_for(lambda: late.messages, 5)
        _, status, retained = late.messages[-1]
        assert retained and status["state"] == "online"
        assert dt.datetime.fromisoformat(status["time"]) >= up, (status["time"], up.isoformat())
        late.close()
    finally:
        run.stop()
        if broker is not None:
            broker.kill()


def test_a_hot_swap_is_published_events_name_the_model_that_judged_them(broker):
    """After on_model (a hot swap) the retained status names the new model for late subscribers, and
    each event keeps the model that judged it, also one judged by the old model and sent after the swap."""
    import dataclasses

    from mrkd.runtime.outputs.base import CameraInfo
    old = CameraInfo("left", "memory", "m.onnx", "aa" * 32, "openvino", "fp32", 0.1, "test")
    new = dataclasses.replace(old, model_sha256="bb" * 32, threshold=0.2)
    early = MqttRecorder(broker.port, "swap/#")
    observer = MqttObserver(MqttSettings.from_url(broker.url("swap")))
    observer.on_start([old])
    assert wait_for(lambda: early.bodies("/left/status"), 10), "no online status"
    observer.on_event("left", {"event_id": "e1", "score": 1.0, "model_sha256": old.model_sha256})
    observer.on_model(new)
    observer.on_event("left", {"event_id": "e2", "score": 1.0, "model_sha256": old.model_sha256})  # judged before
    observer.on_event("left", {"event_id": "e3", "score": 1.0, "model_sha256": new.model_sha256})
    assert wait_for(lambda: len(early.bodies("/left/event")) == 3, 10), early.messages
    assert [(e["event_id"], e["model_sha256"]) for e in early.bodies("/left/event")] == \
        [("e1", "aa" * 32), ("e2", "aa" * 32), ("e3", "bb" * 32)]
    late = MqttRecorder(broker.port, "swap/left/status")
    assert wait_for(lambda: late.messages, 5)
    topic, status, retained = late.messages[0]
    assert retained and status["state"] == "online"
    assert (status["model_sha256"], status["threshold"]) == ("bb" * 32, pytest.approx(0.2))
    observer.on_stop()
    for recorder in (early, late):
        recorder.close()


def test_no_event_is_lost_while_the_broker_restarts(tmp_path, broker):
    model = build_tiny_model(tmp_path / "m.onnx")
    # A persistent session: the broker keeps the subscription, and the messages for it, across its restart.
    subscriber = MqttRecorder(broker.port, "line/+/event", client_id="test-subscriber", persistent=True)
    frames = DrivenFrames()
    observer = MqttObserver(MqttSettings.from_url(broker.url("line")))
    run = LineRun(model, {"cam0": frames}, [observer], build_outputs(OutputSettings(events=str(tmp_path / "events.jsonl"))))
    frames.defects(3)
    assert wait_for(lambda: len(subscriber.bodies("/event")) == 3, 10)
    broker.stop()
    frames.defects(4)                               # raised while the broker is away
    assert wait_for(lambda: frames.yielded_defects == 7, 10)
    time.sleep(0.5)
    assert len(read_events(tmp_path / "events.jsonl")) == 7
    assert not observer.links["cam0"].connected.is_set()
    broker.start()
    frames.defects(2)
    assert wait_for(lambda: len({e["event_id"] for e in subscriber.bodies("/event")}) == 9, 20), \
        (len(subscriber.bodies("/event")), observer.stats())
    run.stop()
    logged = read_events(tmp_path / "events.jsonl")
    assert {e["event_id"] for e in subscriber.bodies("/event")} == {e["event_id"] for e in logged}
    assert len(logged) == 9 and observer.failures() == {"cam0": 0}
    subscriber.close()


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(TESTS) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_sigkill_of_the_runtime_publishes_its_last_will(tmp_path, broker):
    frames = [f for seed in range(100) for f in normal_then_defective(9, 1, seed=seed)]   # 1000 frames
    video = write_video(tmp_path / "long.avi", frames)
    model = build_tiny_model(tmp_path / "m.onnx")
    watcher = MqttRecorder(broker.port, "plant/#")
    proc = subprocess.Popen(MRKD + ["run", str(model), "--source", f"press={video}", "--fps", "25",
                                    "--cooldown", "0", "--status-every", "0", "--mqtt", broker.url("plant")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    try:
        assert wait_for(lambda: watcher.bodies("/press/event") or proc.poll() is not None, 30)
        assert proc.poll() is None, proc.stderr.read().decode()
        assert watcher.bodies("/press/status")[0]["state"] == "online"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert wait_for(lambda: watcher.bodies("/press/status")[-1]["state"] == "offline", 10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Retained: a subscriber that comes later also sees the camera as offline.
    late = MqttRecorder(broker.port, "plant/press/status")
    assert wait_for(lambda: late.messages, 5)
    assert late.messages[0][1] == {"schema_version": 1, "state": "offline", "camera": "press"}
    watcher.close()
    late.close()


def _certificates(folder: Path):
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    openssl = require_program("openssl", ["openssl"])
    run = lambda *args: subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=mrkd test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "san.ext")
    return tuple(str(folder / name) for name in ("ca.crt", "server.crt", "server.key"))


@pytest.mark.slow
def test_password_and_tls_a_wrong_password_is_counted_not_fatal(tmp_path):
    require_program("mosquitto", ["mosquitto"])
    require_program("mosquitto_passwd", ["mosquitto"])      # writes the broker's password file
    folder = tmp_path / "broker"
    folder.mkdir()
    ca, cert, key = _certificates(folder)
    broker = Mosquitto(folder=folder, passwords={"line7": "s3cret"}, tls=(ca, cert, key)).start()
    try:
        model = build_tiny_model(tmp_path / "m.onnx")
        subscriber = MqttRecorder(broker.port, "#", username="line7", password="s3cret", ca=ca)
        assert broker.url("p").startswith("mqtts://")
        # tls=False is what the CLI passes without --mqtt-tls: mqtts:// must stay TLS (it connected in clear)
        good = MqttObserver(MqttSettings.from_url(broker.url("good"), username="line7", password="s3cret",
                                                  ca_certs=ca, tls=False))
        assert good.settings.tls
        wrong = MqttObserver(MqttSettings.from_url(broker.url("wrong"), username="line7", password="guess",
                                                   ca_certs=ca), close_deadline_s=0.5)
        other = tmp_path / "other"
        other.mkdir()
        untrusting = MqttObserver(MqttSettings.from_url(broker.url("untrusted"), username="line7", password="s3cret",
                                                        ca_certs=_certificates(other)[0]), close_deadline_s=0.5)
        frames = DrivenFrames()
        run = LineRun(model, {"cam0": frames}, [good, wrong, untrusting],
                      build_outputs(OutputSettings(events=str(tmp_path / "events.jsonl"))))
        frames.defects(2)
        assert wait_for(lambda: len(subscriber.bodies("good/cam0/event")) == 2, 10), subscriber.messages
        assert wait_for(lambda: wrong.failures()["cam0"] >= 1, 10)
        # a broker whose certificate --mqtt-ca does not trust is named so, not "unreachable: no answer"
        assert wait_for(lambda: "does not trust" in untrusting.health().detail, 15), untrusting.health()
        run.stop()
        assert not [t for t, _, _ in subscriber.messages if t.startswith("wrong/")]
        assert good.failures() == {"cam0": 0} and not wrong.links["cam0"].connected.is_set()
        subscriber.close()
    finally:
        broker.kill()
