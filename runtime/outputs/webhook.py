"""``--webhook URL``: each alarm event (and NG/ERROR part event) POSTed as JSON, in the background.

Posts go from a bounded queue (oldest dropped and counted when full) on their own thread, with a
timeout and retries with backoff, so a dead or slow receiver never stalls the line. Each event is
counted once: ``sent`` when a POST was answered 2xx, else ``failed`` after its retries (or
``dropped``), never both. Posts may carry custom headers and an HMAC-SHA256 signature of the body
(``X-Mrkd-Signature: sha256=<hex>``); ``X-Mrkd-Event-Id`` lets receivers drop a retried duplicate.

Redirects: a 307 or 308 is followed (at most 5 times) with the same method, body and headers, and
only to the same scheme, host and port (the headers may hold credentials); any other 3xx
(301/302/303 would turn the POST into a body-less GET) and a redirect elsewhere are failures.
The URL is checked at start: http:// or https:// with a host, or a one-line error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple
from urllib.parse import urlsplit

from mrkd.errors import MrkdError
from mrkd.runtime.outputs.base import LineObserver, OutputHealth, PartResult
from mrkd.runtime.outputs.delivery import Delivery
from mrkd.runtime.outputs.events import DropOldestQueue, part_event, wants_event
from mrkd.runtime.redact import redact_uri

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Mrkd-Signature"
EVENT_ID_HEADER = "X-Mrkd-Event-Id"
FOLLOWED_REDIRECTS = (307, 308)
MAX_REDIRECTS = 5


class WebhookError(MrkdError, ValueError):
    """A webhook URL or header that cannot work; the message names it."""


def sign_body(body: bytes, secret: bytes) -> str:
    """The signature header value for ``body``: ``sha256=`` + hex HMAC-SHA256 with ``secret``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, secret: bytes, header_value: Optional[str]) -> bool:
    """True when ``header_value`` is the signature of ``body`` (constant-time comparison)."""
    return bool(header_value) and hmac.compare_digest(sign_body(body, secret), header_value)


def parse_header(text: str) -> tuple:
    """'Name: value' -> (name, value); WebhookError naming the text otherwise."""
    name, sep, value = str(text).partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not name or any(c in name for c in " \t\r\n") or "\n" in value or "\r" in value:
        raise WebhookError(f"webhook header must look like 'Name: value', got {text!r}")
    return name, value


def check_url(url: str) -> str:
    """``url`` if it is an http(s) URL with a host (WebhookError naming it otherwise)."""
    try:
        parts = urlsplit(str(url))
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        parts, port_ok = None, False
    if (parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname or not port_ok
            or any(c.isspace() for c in str(url))):
        raise WebhookError(f"--webhook {redact_uri(url)}: not an http:// or https:// URL with a host "
                           "(e.g. http://plc-gateway:8080/alarm)")
    return str(url)


@dataclass(frozen=True)
class WebhookSettings:
    url: str
    timeout: float = 2.0
    retries: int = 2
    backoff: float = 0.5
    queue_size: int = 100
    headers: Tuple[Tuple[str, str], ...] = field(default=(), repr=False)     # may hold a token
    secret: Optional[bytes] = field(default=None, repr=False)

    def __post_init__(self):
        check_url(self.url)
        if not self.timeout > 0 or self.retries < 0 or self.backoff < 0 or self.queue_size < 1:
            raise WebhookError("webhook: timeout must be > 0, retries and backoff >= 0, queue size >= 1")


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """307/308 to the same origin: the same request again at the new URL; anything else: not followed
    (urllib then raises HTTPError with the 3xx code, which counts as a failure)."""

    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urlsplit(req.full_url), urlsplit(newurl)
        if code not in FOLLOWED_REDIRECTS:
            return None
        if (old.scheme, old.hostname, old.port) != (new.scheme, new.hostname, new.port):
            return None
        return urllib.request.Request(newurl, data=req.data, method=req.get_method(),
                                      headers=dict(req.header_items()))


class WebhookSender:
    """POSTs event JSON from a background thread (see the module text); ``delivery`` counts."""

    def __init__(self, settings: WebhookSettings):
        self.settings = settings
        self.url, self.timeout, self.retries, self.backoff = settings.url, settings.timeout, settings.retries, \
            settings.backoff
        self.headers = dict(settings.headers)
        self.secret = settings.secret
        self.delivery = Delivery("webhook", redact_uri(settings.url))
        self._opener = urllib.request.build_opener(_SameOriginRedirects())
        self._queue = DropOldestQueue(settings.queue_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._worker, name="webhook", daemon=True)
        self._thread.start()

    @property
    def sent(self) -> int:
        return self.delivery.sent

    @property
    def failed(self) -> int:
        return self.delivery.failed

    @property
    def dropped(self) -> int:
        return self._queue.dropped

    def post(self, event: dict) -> None:
        """Queue an event; never blocks."""
        self._queue.put(event)

    def request_headers(self, event: dict, body: bytes) -> Dict[str, str]:
        headers = {"Content-Type": "application/json", **self.headers}
        if event.get("event_id"):
            headers[EVENT_ID_HEADER] = str(event["event_id"])
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign_body(body, self.secret)
        return headers

    def _send(self, event: dict) -> Optional[str]:
        """None when delivered, else why the last attempt failed."""
        body = json.dumps(event).encode("utf-8")
        headers = self.request_headers(event, body)
        why = "not sent"
        for attempt in range(self.retries + 1):
            if attempt and self._stop.wait(self.backoff * 2 ** (attempt - 1)):
                return f"{why} (closing: no more retries)"
            request = urllib.request.Request(self.url, data=body, method="POST", headers=headers)
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    if 200 <= response.status < 300:
                        return None
                    why = f"HTTP {response.status}"
            except urllib.error.HTTPError as exc:
                if 300 <= exc.code < 400:
                    target = exc.headers.get("Location", "?") if exc.headers else "?"
                    why = (f"HTTP {exc.code} redirect to {redact_uri(target)} not followed (only 307/308 to the "
                           "same host are)")
                else:
                    why = f"HTTP {exc.code} {exc.reason}"
            except Exception as exc:   # refused, timed out, unknown host: retry
                why = str(getattr(exc, "reason", exc))
            logger.debug("webhook %s attempt %d failed: %s", self.delivery.target, attempt + 1, why)
        return why

    def _worker(self) -> None:
        while True:
            event = self._queue.get()
            try:
                if event is None:
                    return
                why = self._send(event)
                if why is None:
                    self.delivery.delivered()
                else:
                    self.delivery.failed_one(f"event {event.get('event_id')}: {why}")
            finally:
                self._queue.done()

    def close(self, deadline_s: float = 5.0) -> None:
        """Give queued events until ``deadline_s`` to go out, then stop (the rest count as dropped)."""
        end = time.monotonic() + deadline_s
        self._queue.wait_empty(end)
        self._stop.set()
        self._queue.drain()          # whatever did not make it is dropped, then the sentinel ends the worker
        self._queue.put(None)
        self._thread.join(timeout=max(0.0, end - time.monotonic()) + self.timeout + 1)
        if self.dropped:             # said, never silent (after the worker's last post, which would say "ok")
            self.delivery.set_failing(f"{self.dropped} event(s) never posted to {self.delivery.target} "
                                      f"(queue full, or still queued at the stop)", state="dropped")

    def stats(self) -> dict:
        return {"sent": self.sent, "failed": self.failed, "dropped": self.dropped}

    def health(self) -> OutputHealth:
        return self.delivery.health(dropped=self.dropped)


class WebhookOutput(LineObserver):
    """The webhook as a line output: every alarm event and every NG/ERROR part event."""

    stop_waits_for_peer = True

    def __init__(self, settings: WebhookSettings, close_deadline_s: float = 5.0):
        self.sender = WebhookSender(settings)
        self.close_deadline_s = close_deadline_s

    def on_event(self, camera: str, event: dict) -> None:
        self.sender.post(event)

    def on_part(self, result: PartResult) -> None:
        if wants_event(result):
            self.sender.post(part_event(result))

    def health(self) -> OutputHealth:
        return self.sender.health()

    def on_stop(self) -> None:
        self.sender.close(self.close_deadline_s)


def outputs_from(settings) -> list:
    """``--webhook URL`` (OutputSettings.webhook)."""
    return [WebhookOutput(settings.webhook, settings.close_deadline_s)] if settings.webhook else []
