"""MQTT output of a line (paho-mqtt, the ``line`` extra): status, alarm events, rate-limited results.

Topics, per camera (``PREFIX`` from ``mqtt://HOST:PORT/PREFIX``):

* ``PREFIX/<camera>/status``: retained, QoS 1. ``{"state": "online", ...}`` (model hash, backend,
  threshold and where it came from, whether the source is up) on every connect and when the source
  goes up or down; the same topic is the connection's last will, ``{"state": "offline"}``, so a
  runtime that dies (SIGKILL, power, network) shows as offline; a clean stop publishes it itself.
* ``PREFIX/<camera>/event``: QoS 1, one message per alarm: the event record (event id, time,
  score, threshold, boxes, snapshot path) plus the camera and the model hash.
* ``PREFIX/<camera>/result``: QoS 0, one scored frame at most ``results_rate`` times a second (off
  by default); dropped, not queued, while the broker is away. A frame that raised an alarm names its
  ``event_id``; its result goes out once the event's record is complete (the snapshot writer draws
  the id again on a clash, on the alarm notifier's thread), so it names the id the event message has.

The stream never waits for the broker: the hooks put messages on a bounded drop-oldest queue per
camera; a sender thread hands them to paho only while connected and while fewer than
``max_inflight`` are unacknowledged. paho keeps those few and resends them after a reconnect; the
rest wait in the queue. So events raised while the broker is away are delivered when it is back,
the oldest dropped (and counted) only when more than ``queue_size`` pile up. One MQTT connection
per camera, because each camera needs its own last will.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import ssl
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence
from urllib.parse import unquote, urlsplit

from mrkd.deps import require
from mrkd.errors import MrkdError
from mrkd.runtime.clock_steps import utc_text
from mrkd.runtime.outputs.base import CameraInfo, CameraStatus, FrameResult, LineObserver, OutputHealth, PartResult
from mrkd.runtime.outputs.delivery import Delivery
from mrkd.runtime.outputs.events import DropOldestQueue, part_event
from mrkd.runtime.redact import redact_uri

logger = logging.getLogger(__name__)

MQTT_SCHEMA_VERSION = 1
# OpenSSL's verify codes that are the clock's (X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED),
# said as such: at 1970 every certificate is "not yet valid", and "--mqtt-ca does not trust" misleads
CLOCK_REFUSALS = {9: "not yet valid", 10: "expired"}
MAX_TOPIC_BYTES = 65535          # MQTT's limit on a topic name (a UTF-8 string with a 16-bit length)
# PREFIX + this is the longest topic published: a camera name has at most 64 characters (runtime/line/loop.py)
LONGEST_TOPIC_TAIL = "/" + "c" * 64 + "/status"


class MqttSettingsError(MrkdError, ValueError):
    """An --mqtt URL or option that cannot work; the message names it."""


@dataclass(frozen=True)
class MqttSettings:
    """Where and how to publish. ``password`` is the value itself (the CLI reads it from an env var)."""

    host: str
    port: int = 1883
    prefix: str = "mrkd"
    tls: bool = False
    ca_certs: Optional[str] = None
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)     # never in a log line or a traceback
    results_rate: float = 0.0          # result messages per second per camera; 0 = none
    queue_size: int = 1000             # events/status waiting per camera while the broker is away
    max_inflight: int = 20             # handed to paho, not yet acknowledged
    keepalive: int = 15
    connect_timeout: float = 3.0       # a broker that has not answered by then is reported as failing
    schema_version: int = MQTT_SCHEMA_VERSION

    def __post_init__(self):
        if not self.host:
            raise MqttSettingsError("MQTT: no broker host")
        if not 0 < self.port < 65536:
            raise MqttSettingsError(f"MQTT: port must be 1..65535, got {self.port}")
        if not self.prefix or any(c in self.prefix for c in "+#\0") or self.prefix.startswith("/"):
            raise MqttSettingsError(f"MQTT: topic prefix {self.prefix!r} must be non-empty, without + # or a "
                                    "leading /")
        longest = len(self.prefix.encode("utf-8", "surrogatepass")) + len(LONGEST_TOPIC_TAIL)
        if longest > MAX_TOPIC_BYTES:     # the broker would refuse every message, each counted as a drop
            raise MqttSettingsError(f"MQTT: topic prefix of {longest - len(LONGEST_TOPIC_TAIL)} bytes: topics are at "
                                    f"most {MAX_TOPIC_BYTES} bytes (UTF-8), so the prefix may be at most "
                                    f"{MAX_TOPIC_BYTES - len(LONGEST_TOPIC_TAIL)}")
        if not self.results_rate >= 0:
            raise MqttSettingsError(f"MQTT: results rate must be >= 0, got {self.results_rate}")
        if self.queue_size < 1 or self.max_inflight < 1:
            raise MqttSettingsError("MQTT: queue size and in-flight limit must be >= 1")
        if self.ca_certs is not None and not os.path.isfile(self.ca_certs):
            raise MqttSettingsError(f"MQTT: CA file {self.ca_certs} does not exist")
        if self.ca_certs is not None:      # said at the start, not as a traceback when the first camera starts
            try:
                ssl.create_default_context(cafile=self.ca_certs)
            except (ssl.SSLError, ValueError) as exc:
                raise MqttSettingsError(f"MQTT: CA file {self.ca_certs} holds no usable certificate "
                                        f"({getattr(exc, 'reason', None) or exc})") from None

    @classmethod
    def from_url(cls, url: str, **options) -> "MqttSettings":
        """``mqtt://HOST[:PORT]/PREFIX`` (``mqtts://`` = TLS, port 8883 by default); user@ in the URL is
        accepted too (options override it), a password is not (it comes from an environment variable)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise MqttSettingsError(f"MQTT URL must look like mqtt://HOST:PORT/PREFIX, got {url!r}")
        if "#" in url or "?" in url:
            # a URL reads '#' and '?' as the start of a fragment or a query and drops what follows: mqtt://h/line/#
            # published under line/ and mqtt://h/# under mrkd/; a wildcard is for subscribing, never publishing
            raise MqttSettingsError(f"MQTT URL {redact_uri(url)}: the topic prefix may not hold '#', '+' (wildcards "
                                    "are for subscribing) or '?'; give mqtt://HOST:PORT/PREFIX with a plain PREFIX")
        try:
            port = parts.port
        except ValueError:
            raise MqttSettingsError(f"MQTT URL {url!r}: the port is not a number 1..65535") from None
        if parts.password:     # it would show in the process list; the password comes from a variable
            raise MqttSettingsError(f"MQTT URL {redact_uri(url)}: carries a password; give the user in the URL or "
                                    "--mqtt-username and the password in an environment variable "
                                    "(--mqtt-password-env VAR)")
        asked_tls = bool(options.pop("tls", False))     # popped whatever the scheme: "mqtts" must not be undone
        tls = parts.scheme == "mqtts" or asked_tls
        prefix = unquote(parts.path.strip("/")) or "mrkd"
        values = dict(host=parts.hostname, port=port if port is not None else (8883 if tls else 1883), prefix=prefix,
                      tls=tls,
                      username=unquote(parts.username) if parts.username else None,
                      password=unquote(parts.password) if parts.password else None)
        values.update({k: v for k, v in options.items() if v is not None})
        return cls(**values)


def topic(settings: MqttSettings, camera: str, kind: str) -> str:
    return f"{settings.prefix}/{camera}/{kind}"


def _now_iso() -> str:
    import datetime as dt
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class _Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass
class _Result:
    """A frame's result waiting for the sender. ``event``: the alarm record it raised, whose id is read
    once every output's ``event_fields`` are in (``complete``, set by ``on_event``), not before."""
    body: dict
    event: Optional[dict] = None
    complete: bool = True

    def payload(self) -> bytes:
        event_id = self.event.get("event_id") if self.event is not None else None
        return json.dumps({**self.body, "event_id": event_id}).encode("utf-8")


class _CameraLink:
    """One camera's MQTT connection, its queue and its sender thread."""

    def __init__(self, settings: MqttSettings, info: CameraInfo, delivery: Delivery):
        mqtt = require("paho.mqtt.client", "MQTT output needs paho-mqtt (pip install 'mrkd[line]')")
        self.settings, self.info, self.delivery = settings, info, delivery
        self.broker = f"{settings.host}:{settings.port}"
        self.started = time.monotonic()
        self.ever_connected = False
        self.status_topic = topic(settings, info.name, "status")
        self.event_topic = topic(settings, info.name, "event")
        self.result_topic = topic(settings, info.name, "result")
        self.queue = DropOldestQueue(settings.queue_size)
        self.connected = threading.Event()
        self.closing = threading.Event()
        self.source_up: Optional[bool] = None
        self.published = self.errors = self.results_dropped = self.connect_failures = 0
        self._inflight: List = []
        self._result: Optional[_Result] = None
        self._result_lock = threading.Lock()
        self._last_result = float("-inf")
        self._wake = threading.Event()
        self._abandon = threading.Event()     # close: the sender stops, even holding an undelivered message
        client_id = f"mrkd-{socket.gethostname()}-{info.name}-{uuid.uuid4().hex[:6]}"[:64]
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        if settings.username is not None:
            self.client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            self.client.tls_set(ca_certs=settings.ca_certs)
        self.client.will_set(self.status_topic, self._status_payload("offline", stamped=False), qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=2.0)
        self.client.connect_timeout = settings.connect_timeout
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.connect_async(settings.host, settings.port, keepalive=settings.keepalive)
        self.client.loop_start()          # paho's network thread: connects and reconnects
        self._thread = threading.Thread(target=self._send_loop, name=f"mqtt:{info.name}", daemon=True)
        self._thread.start()

    # -- payloads
    def _status_payload(self, state: str, stamped: bool = True) -> bytes:
        """stamped=False for the last will: the broker sends it later, so a time of now would be wrong."""
        info = self.info
        body = {"schema_version": MQTT_SCHEMA_VERSION, "state": state, "camera": info.name}
        if stamped:
            body["time"] = _now_iso()
        if state == "online":
            body.update(source=redact_uri(info.source), model=info.model, model_sha256=info.model_sha256,
                        backend=info.backend, precision=info.precision, threshold=info.threshold,
                        threshold_source=info.threshold_source, source_up=self.source_up)
        return json.dumps(body).encode("utf-8")

    # -- paho callbacks (its network thread)
    def _on_connect(self, client, _userdata, _flags, reason_code, _properties=None):
        if getattr(reason_code, "is_failure", False):
            # not a lost message (the queue keeps them): the state says it; failed/dropped count messages
            self.errors += 1
            self.delivery.set_failing(f"broker {self.broker} refused camera {self.info.name}: {reason_code}",
                                      state="refused")
            return
        # Online on every connect: a broker that restarted without persistence has lost the retained one.
        client.publish(self.status_topic, self._status_payload("online"), qos=1, retain=True)
        self.ever_connected = True
        self.connected.set()
        self.delivery.set_ok("connected")
        self._wake.set()

    def _on_connect_fail(self, _client, _userdata):
        """paho could not reach the broker (refused, unknown host, no answer, a TLS handshake that
        failed); it keeps retrying. The output is failing (state and detail, rate-limited warnings), but
        nothing is lost yet: the queue keeps the messages, and failed/dropped count messages only."""
        self.connect_failures += 1
        try:
            socket.getaddrinfo(self.settings.host, self.settings.port)
            why = self._tls_refusal() or (f"no MQTT broker reachable at {self.broker} (connection refused or no "
                                          f"answer within {self.settings.connect_timeout:g} s)")
        except OSError:
            why = f"unknown broker host {self.settings.host!r}"
        self.delivery.set_failing(f"{why}; retrying ({self.connect_failures} attempts)", state="unreachable")

    def _tls_refusal(self) -> Optional[str]:
        """Why a TLS broker that accepts TCP refuses the handshake (paho only says the connect failed):
        its certificate not trusted by --mqtt-ca, or no TLS on that port; None when that is not it."""
        if not self.settings.tls:
            return None
        context = ssl.create_default_context(cafile=self.settings.ca_certs)
        try:
            with socket.create_connection((self.settings.host, self.settings.port), timeout=1.0) as raw:
                with context.wrap_socket(raw, server_hostname=self.settings.host):
                    return None
        except ssl.SSLCertVerificationError as exc:
            clock = CLOCK_REFUSALS.get(exc.verify_code)
            if clock is not None:     # a device booted at 1970 (no real-time clock): the clock, not the CA
                return (f"the broker at {self.broker} presents a certificate {clock} by this machine's clock, which "
                        f"says {utc_text(time.time())}: is the clock wrong (no real-time clock, NTP not synchronised "
                        f"yet)?")
            return f"the broker at {self.broker} presents a certificate --mqtt-ca does not trust ({exc.verify_message})"
        except ssl.SSLError as exc:
            return f"no TLS handshake with {self.broker} ({exc.reason or exc}; is it a TLS port?)"
        except OSError:
            return None

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _properties=None):
        if self.connected.is_set() and not self.closing.is_set():
            self.delivery.set_failing(f"broker {self.broker} went away ({reason_code}); queueing until it is back",
                                      state="disconnected")
        self.connected.clear()

    # -- the loop thread's side: never blocks
    def enqueue(self, message: _Message) -> None:
        self.queue.put(message)
        self._wake.set()

    def offer_result(self, body: dict, now: float, event: Optional[dict] = None) -> None:
        """Keep the newest result for the sender, which polls for it (no wake-up per frame: waking a
        thread on every frame costs the loop thread a GIL hand-over each time). ``event``: the alarm the
        frame raised; the result waits for ``event_complete`` (a newer result replaces it meanwhile)."""
        rate = self.settings.results_rate
        if rate <= 0 or now - self._last_result < 1.0 / rate:
            return
        self._last_result = now
        with self._result_lock:
            if self._result is not None:
                self.results_dropped += 1
            self._result = _Result(body, event, complete=event is None)

    def event_complete(self, event: dict) -> None:
        """Every output has added its fields to ``event`` (on_event): a result waiting for it may go."""
        with self._result_lock:
            if self._result is not None and self._result.event is event:
                self._result.complete = True

    def set_source_up(self, up: bool) -> None:
        if up != self.source_up:
            self.source_up = up
            self.enqueue(_Message(self.status_topic, self._status_payload("online"), 1, True))

    # -- sender thread
    def _settle_inflight(self) -> None:
        still = []
        for info in self._inflight:
            if info.is_published():
                self.published += 1
                self.delivery.delivered()
            else:
                still.append(info)
        self._inflight = still

    def _hand_over(self, message: _Message) -> bool:
        info = self.client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
        if info.rc not in (0, 4):       # 0 success; 4 NO_CONN: paho keeps a QoS 1 message and resends it
            self.errors += 1
            self.delivery.failed_one(f"publish to {message.topic} on {self.broker} failed: rc {info.rc}")
            return False
        if message.qos:
            self._inflight.append(info)
        return True

    def _send_loop(self) -> None:
        pending = None
        while not self._abandon.is_set():
            self._settle_inflight()
            if (not self.ever_connected and self.delivery.ok
                    and time.monotonic() - self.started > self.settings.connect_timeout + 0.5):
                self.delivery.set_failing(f"no MQTT connection to {self.broker} after "
                                          f"{self.settings.connect_timeout:g} s", state="unreachable")
            with self._result_lock:
                result = self._result if self._result is not None and self._result.complete else None
                if result is not None:
                    self._result = None
            if result is not None:
                if self.connected.is_set():
                    self._hand_over(_Message(self.result_topic, result.payload(), 0, False))
                else:
                    self.results_dropped += 1
            if pending is None:
                try:
                    pending = self.queue.get(timeout=0)
                except queue.Empty:
                    if self._wake.wait(0.05):
                        self._wake.clear()
                    continue
            if not self.connected.is_set() or len(self._inflight) >= self.settings.max_inflight:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            if pending.topic == self.status_topic:
                # a status queued while the broker was away is sent as the camera is now: sent after the one
                # the connect published, the older one would have become the retained status
                pending = _Message(pending.topic, self._status_payload("online"), pending.qos, pending.retain)
            if self._hand_over(pending) or pending.qos == 0:
                self.queue.done()
                pending = None
            else:
                time.sleep(0.05)
        if pending is not None:        # closing past the deadline with the broker still away
            self.queue.dropped += 1
            self.queue.done()


    def pending(self) -> int:
        self._settle_inflight()
        return len(self.queue) + len(self._inflight)

    def close(self, deadline: float) -> None:
        """Deliver what is queued until ``deadline`` (monotonic), publish offline, disconnect."""
        self.closing.set()
        self.queue.wait_empty(deadline)
        while self._inflight and time.monotonic() < deadline:
            self._settle_inflight()
            time.sleep(0.01)
        self._abandon.set()
        self._wake.set()
        self._thread.join(timeout=1.0)
        self.queue.drain()                 # what is left counts as dropped
        if self.queue.dropped:
            self.delivery.set_failing(f"{self.queue.dropped} messages of camera {self.info.name} never reached "
                                      f"{self.broker}", state=self.delivery.state if not self.delivery.ok else "failing")
        if self.connected.is_set():
            info = self.client.publish(self.status_topic, self._status_payload("offline"), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=max(0.2, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                pass
        self._settle_inflight()
        self.client.disconnect()
        self.client.loop_stop()

    def stats(self) -> dict:
        return {"published": self.published, "dropped": self.queue.dropped, "errors": self.errors,
                "connect_failures": self.connect_failures,
                "results_dropped": self.results_dropped, "unacknowledged": len(self._inflight) + len(self.queue),
                "connected": self.connected.is_set()}


class MqttObserver(LineObserver):
    """Publishes a line's status, events and (optionally) results to an MQTT broker; see the module text."""

    stop_waits_for_peer = True

    def __init__(self, settings: MqttSettings, close_deadline_s: float = 3.0):
        require("paho.mqtt.client", "MQTT output needs paho-mqtt (pip install 'mrkd[line]')")
        self.settings = settings
        self.close_deadline_s = close_deadline_s
        self.links: Dict[str, _CameraLink] = {}
        self.delivery = Delivery("mqtt", f"{settings.host}:{settings.port}/{settings.prefix}", state="connecting")
        self._part_link: Optional[_CameraLink] = None
        self._stopped = False

    def on_start(self, cameras: Sequence[CameraInfo]) -> None:
        for info in cameras:
            self.links[info.name] = _CameraLink(self.settings, info, self.delivery)
        self._part_link = next(iter(self.links.values()), None)

    def on_part(self, result: PartResult) -> None:
        """PREFIX/part, QoS 1: every judged part (OK too: a PLC-less cell reads verdicts here)."""
        link = self._part_link
        if link is None:
            return
        body = {"schema_version": MQTT_SCHEMA_VERSION, **part_event(result)}
        link.enqueue(_Message(f"{self.settings.prefix}/part", json.dumps(body).encode("utf-8"), 1, False))

    def health(self) -> OutputHealth:
        links = list(self.links.values())
        dropped = sum(link.queue.dropped for link in links)
        connected = self._stopped or (bool(links) and all(link.connected.is_set() for link in links))
        health = self.delivery.health(dropped=dropped, state="stopped" if self._stopped and self.delivery.ok else None)
        waiting = sum(len(link.queue) for link in links)
        if waiting and not connected:
            health = OutputHealth(**{**health.__dict__, "detail": f"{health.detail} ({waiting} messages waiting)"})
        if links and not connected and health.ok:     # e.g. still connecting at start: not delivering yet
            return OutputHealth(**{**health.__dict__, "ok": False,
                                   "state": "connecting" if not any(l.ever_connected for l in links)
                                   else "disconnected"})
        return health

    def on_model(self, info: CameraInfo) -> None:
        """A hot swap: the retained status names the model that judges from now on."""
        link = self.links.get(info.name)
        if link is None:
            return
        link.info = info
        link.enqueue(_Message(link.status_topic, link._status_payload("online"), 1, True))

    def on_event(self, camera: str, event: dict) -> None:
        link = self.links.get(camera)
        if link is None:
            return
        # The event names the model that judged it (the loop sets it; a swap may have come since).
        body = {"schema_version": MQTT_SCHEMA_VERSION, **event, "camera": camera,
                "model_sha256": event.get("model_sha256") or link.info.model_sha256}
        link.enqueue(_Message(link.event_topic, json.dumps(body).encode("utf-8"), 1, False))
        link.event_complete(event)

    def on_frame(self, result: FrameResult) -> None:
        link = self.links.get(result.camera)
        if link is None or self.settings.results_rate <= 0:
            return
        now = time.monotonic()
        if now - link._last_result < 1.0 / self.settings.results_rate:
            return          # the cheap check first: most frames stop here
        body = {"schema_version": MQTT_SCHEMA_VERSION, "camera": result.camera, "frame_index": result.frame_index,
                "frame_time": result.frame_time, "score": result.score, "threshold": result.threshold,
                "anomalous": result.anomalous, "latency_ms": result.latency_s * 1000.0}
        # The event's id is read on the sender thread once the record is complete: here, on the loop's
        # thread, the alarm notifier may not have run the outputs' event_fields yet (they may redraw it).
        link.offer_result(body, now, result.event)     # serialised on the sender thread

    def on_status(self, status: CameraStatus) -> None:
        link = self.links.get(status.camera)
        if link is not None:
            link.set_source_up(status.up)

    def on_stop(self) -> None:
        deadline = time.monotonic() + self.close_deadline_s
        for link in self.links.values():
            link.close(deadline)
        self._stopped = True

    def failures(self) -> Dict[str, int]:
        """Per camera: messages lost: events/status dropped (queue full, or still queued at the stop) plus
        publish errors and refused connects (results skipped while the broker is away are counted in
        ``stats`` only: they are optional). Failed connection attempts are in ``health()``."""
        return {name: link.queue.dropped + link.errors for name, link in self.links.items()}

    def stats(self) -> Dict[str, dict]:
        return {name: link.stats() for name, link in self.links.items()}


def outputs_from(settings) -> list:
    """``--mqtt URL`` (OutputSettings.mqtt)."""
    return [MqttObserver(settings.mqtt, min(3.0, settings.close_deadline_s))] if settings.mqtt else []
