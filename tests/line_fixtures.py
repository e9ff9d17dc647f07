"""Helpers for the line-output tests (MQTT, metrics, operator page): a frame source the test drives,
a line run on a background thread, and an MQTT subscriber that records what arrives."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from typing import List, Optional, Sequence

import numpy as np
import pytest

from runtime_fixtures import defective_frame, normal_frame

from mrkd.runtime.line.loop import Camera, Line, run_line
from mrkd.runtime.outputs.base import LineObserver


class DrivenFrames:
    """An endless iterable of normal frames (h×w) at ``fps``; ``defects(n)`` makes the next n frames
    defective (one alarm each with cooldown 0); ``pause()``/``resume()`` make the camera go silent and
    come back; ``end()`` stops it. ``yielded``/``yielded_defects`` count frames delivered."""

    def __init__(self, fps: float = 40.0, seed: int = 0, size: tuple = (48, 64)):
        self.fps, self.rng, self.size = fps, np.random.default_rng(seed), size
        # The fixtures' 12×12 white patch; on large frames a white third, so the 32 px model still sees it.
        self.big_defect = min(size) > 200
        self._defects = 0
        self._lock = threading.Lock()
        self._end = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self.yielded = self.yielded_defects = 0

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def defects(self, count: int) -> None:
        with self._lock:
            self._defects += count

    def end(self) -> None:
        self._end.set()
        self._running.set()

    def __iter__(self):
        while not self._end.is_set():
            time.sleep(1.0 / self.fps)
            if not self._running.is_set():
                continue
            with self._lock:
                defect = self._defects > 0
                self._defects -= defect
            self.yielded += 1
            self.yielded_defects += defect
            if defect and self.big_defect:
                frame = normal_frame(self.rng, *self.size)
                frame[: self.size[0] // 3, : self.size[1] // 3] = 255
                yield frame
            else:
                yield defective_frame(self.rng, *self.size) if defect else normal_frame(self.rng, *self.size)


class Recorder(LineObserver):
    """Keeps what the loop told the observers (and when), for checking the outputs against it."""

    def __init__(self):
        self.frames: List = []
        self.events: List[tuple] = []      # (time.monotonic(), camera, event)
        self.statuses: List = []
        self.cameras: dict = {}

    def on_start(self, cameras):
        self.cameras = {info.name: info for info in cameras}

    def on_frame(self, result):
        self.frames.append(result)

    def on_event(self, camera, event):
        self.events.append((time.monotonic(), camera, event))

    def on_status(self, status):
        self.statuses.append(status)


class LineRun:
    """``run_line`` on a background thread; ``stop()`` ends the sources and returns the summary."""

    def __init__(self, model, sources: dict, observers: Sequence = (), outputs: Sequence = (), **kwargs):
        self.sources = sources
        cameras = tuple(Camera(name, source, str(model), cooldown=0.0) for name, source in sources.items())
        self.line = Line(cameras)
        self.summary: Optional[dict] = None
        self.error: Optional[BaseException] = None
        self.stop_event = threading.Event()

        def target():
            try:
                self.summary = run_line(self.line, [*outputs, *observers], stop=self.stop_event, status=lambda s: None,
                                        **kwargs)
            except BaseException as exc:   # surfaced by stop()
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> dict:
        for source in self.sources.values():
            if hasattr(source, "end"):
                source.end()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "run_line did not end"
        if self.error:
            raise self.error
        return self.summary


def wait_for(condition, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


class MqttRecorder:
    """A paho subscriber on ``topic_filter`` (QoS 1) that records (topic, JSON body, retain flag).
    ``client_id`` + ``persistent``: a session the broker keeps while this subscriber is away."""

    def __init__(self, port: int, topic_filter: str, client_id: Optional[str] = None, persistent: bool = False,
                 username: Optional[str] = None, password: Optional[str] = None, ca: Optional[str] = None):
        import paho.mqtt.client as mqtt

        self.messages: List[tuple] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or "",
                                  clean_session=not persistent)
        if username:
            self.client.username_pw_set(username, password)
        if ca:
            self.client.tls_set(ca_certs=ca)
        self.client.reconnect_delay_set(0.1, 1.0)

        def on_connect(client, _userdata, _flags, _reason, _props=None):
            client.subscribe(topic_filter, qos=1)

        def on_subscribe(*_args):
            self.subscribed.set()

        def on_message(_client, _userdata, message):
            self.messages.append((message.topic, json.loads(message.payload), bool(message.retain)))

        self.client.on_connect, self.client.on_subscribe, self.client.on_message = on_connect, on_subscribe, on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self.subscribed.wait(10), "subscriber never subscribed"

    def bodies(self, suffix: str) -> List[dict]:
        return [body for topic, body, _ in list(self.messages) if topic.endswith(suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def http_get(url: str, timeout: float = 5.0):
    """(status, body) of a GET, error statuses included (urllib raises on them)."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def broker(tmp_path):
    """A Mosquitto on a free loopback port for one test (installed when missing); import it to use it."""
    from peers import require_program
    from mrkd.benchmarks.mosquitto import Mosquitto
    require_program("mosquitto", ["mosquitto"])
    folder = tmp_path / "broker"
    folder.mkdir()
    server = Mosquitto(folder=folder).start()
    yield server
    server.kill()


class PageRun:
    """`mrkd run ARGS --http 127.0.0.1:0` as a process, its stdin open (triggers for --trigger-stdin) and its
    stderr lines collected (``lines``); ``url`` once the page said where it listens. ``close()`` ends the
    input, waits for the run and returns its exit status."""

    def __init__(self, *args, timeout: float = 60):
        self.proc = subprocess.Popen([sys.executable, "-c", "from mrkd.cli import main; main()", "run",
                                      *map(str, args), "--http", "127.0.0.1:0"],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        self.lines: list = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")),
                                        daemon=True)
        self._reader.start()
        if not wait_for(lambda: any("operator page" in line for line in self.lines), timeout):
            self.close()
            raise AssertionError(f"the run's page did not start: {self.stderr}")
        self.url = re.search(r"operator page (http://\S+)/", self.stderr).group(1)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def trigger(self, *part_ids: str) -> None:
        self.proc.stdin.write("".join(f"{part_id}\n" for part_id in part_ids))
        self.proc.stdin.flush()

    def close(self, timeout: float = 60) -> int:
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.wait(timeout=timeout)
        self._reader.join(10)
        return self.proc.returncode
