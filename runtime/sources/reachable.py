"""Whether a network camera is worth an open now: a plain TCP connect first, outside the open lock.

OpenCV's FFmpeg backend opens one stream at a time (open_turns.py). A camera that is powered off or
unreachable held that lock for its whole open timeout on every retry, about half the time, and a working
camera's reconnects waited behind it (measured: 44 % of its frames lost). A TCP connect to the camera's
host and port, made before the open takes its turn and ended by the same stop, finds such a camera
without the lock. A camera that accepts the connect and then says nothing (hung firmware) held the lock
for its whole open: the connect now also asks what FFmpeg's open asks first (``first_request``: an RTSP
OPTIONS, an HTTP HEAD of the URL's path, the RTMP handshake's C0+C1; over rtsps:// and https:// after a
TLS handshake, whose certificate the probe does not check) and waits, still outside the lock, for any
answer (a reply, an error status, a TLS alert or a close all count). A camera that answers that and then
hangs in its open (a stream that never starts) still holds the lock; its opens that run out their time
are spaced out (``HungOpens``), ever further apart up to ``HUNG_QUIET_MAX_S``, until one opens.

Not probed (opened as before): schemes whose connection is not to the URL's host and port (udp://,
tcp:// may listen) and URLs FFmpeg may reach through an HTTP proxy (its http and tls protocols read the
``http_proxy`` environment variable; rtsp may tunnel over http) or may listen on.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, TypeVar
from urllib.parse import urlsplit

from mrkd.runtime.sources.open_turns import POLL_S, given_up, in_turn

Capture = TypeVar("Capture")

DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "rtmp": 1935, "http": 80, "https": 443}   # FFmpeg's defaults
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY")      # FFmpeg reads the first; the second is skipped too, to be safe
CAPTURE_OPTIONS = "OPENCV_FFMPEG_CAPTURE_OPTIONS"   # FFmpeg options OpenCV passes to every open
HUNG_QUIET_MAX_S = 30.0
RAN_OUT = 0.9        # an open that failed after this share of its timeout ran out of time (it held the lock)

_WHY = {errno.ECONNREFUSED: "refused", errno.ETIMEDOUT: "timed out", errno.EHOSTUNREACH: "no route",
        errno.ENETUNREACH: "no route", errno.ECONNRESET: "reset"}


class Unreachable(Exception):
    """The camera is not worth an open now; the message says why (sources/__init__.py makes it a
    SourceUnreachable naming the camera, so it takes the path of a failed open)."""


@dataclass(frozen=True)
class Target:
    """Where a network URL's stream connects."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def probe_target(url: str) -> Optional[Target]:
    """The host and port FFmpeg connects to for ``url``; None where a connect there would not say whether
    the camera answers (module docstring): such a URL is opened as before."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    options = os.environ.get(CAPTURE_OPTIONS, "").lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or "listen" in parts.query.lower():
        return None
    if "proxy" in options or "listen" in options:
        return None
    tunnels = scheme in ("http", "https") or "http" in options     # rtsp_transport;http(s) tunnels rtsp
    if tunnels and any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        return None
    return Target(parts.hostname, port)


NO_ANSWER = "no answer"     # connect_failure's word for a camera that accepted and did not answer
NO_TLS_ANSWER = "no TLS answer"     # ... that accepted and did not answer the TLS handshake
TLS_SCHEMES = ("rtsps", "https")    # FFmpeg shakes hands (TLS) before it sends its first request
_OPTIONS = "OPTIONS {scheme}://{where}{path} RTSP/1.0\r\nCSeq: 1\r\nUser-Agent: mrkd\r\n\r\n"
_HEAD = "HEAD {path} HTTP/1.0\r\nHost: {where}\r\nUser-Agent: mrkd\r\n\r\n"
# What FFmpeg's open of each scheme sends first, and what the probe's one-line failure calls it
FIRST_WORDS = {"rtsp": (_OPTIONS, "request"), "rtsps": (_OPTIONS, "request"), "http": (_HEAD, "request"),
               "https": (_HEAD, "request"), "rtmp": (None, "handshake")}


def first_request(url: str) -> Optional[bytes]:
    """What FFmpeg's open of ``url`` sends first (FIRST_WORDS; over TLS for TLS_SCHEMES), for the probe to
    ask (credentials left out: any answer will do, a 401 too); for rtmp the handshake's C0 (version 3)
    and C1 (time, 4 zero bytes, 1528 random ones). None for schemes not probed."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in FIRST_WORDS:
        return None
    if scheme == "rtmp":
        return b"\x03" + struct.pack(">I", int(time.monotonic() * 1000) & 0xFFFFFFFF) + bytes(4) + os.urandom(1528)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
    where = f"{host}:{parts.port}" if parts.port else f"{host}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return FIRST_WORDS[scheme][0].format(scheme=scheme, where=where, path=path).encode()


def connect_failure(target: Target, timeout_s: float, request: Optional[bytes] = None,
                    tls: bool = False) -> Optional[str]:
    """Why a TCP connect to ``target`` failed within ``timeout_s`` ("timed out", "refused", "no route",
    "name not resolved"), or, with ``request``, why the camera did not answer it within the same time
    (NO_ANSWER; with ``tls``, sent after a TLS handshake: NO_TLS_ANSWER where that went unanswered); None
    once one address connected (and answered), or once this thread's camera stopped (the open that
    follows gives up too, open_turns.in_turn)."""
    deadline = time.monotonic() + timeout_s
    try:
        addresses = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except OSError:
        return "name not resolved"
    failure = "timed out"
    for family, kind, protocol, _, address in addresses:
        failure = _connect(family, kind, protocol, address, deadline, request, target.host if tls else None)
        if failure is None or failure in ("timed out", NO_ANSWER, NO_TLS_ANSWER):   # done, stopped, or no time left for another
            return failure
    return failure


def _connect(family: int, kind: int, protocol: int, address, deadline: float,
             request: Optional[bytes] = None, tls_host: Optional[str] = None) -> Optional[str]:
    """One non-blocking connect (then, with ``tls_host``, a TLS handshake naming it, and ``request`` sent
    and any answer awaited), watched in POLL_S slices for the stop and the deadline."""
    with socket.socket(family, kind, protocol) as sock, selectors.DefaultSelector() as selector:
        sock.setblocking(False)
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
            return _why(code)
        selector.register(sock, selectors.EVENT_WRITE)
        while code:
            if given_up():
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return "timed out"
            if selector.select(min(POLL_S, left)):
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    return _why(code)
                break
        if request is None:
            return None
        if tls_host is None:
            return _answered(sock, selector, request, deadline)
        selector.unregister(sock)        # the TLS socket takes its descriptor over
        with _probe_tls().wrap_socket(sock, server_hostname=tls_host, do_handshake_on_connect=False) as tls:
            selector.register(tls, selectors.EVENT_WRITE)
            return _answered(tls, selector, request, deadline)


def _probe_tls() -> ssl.SSLContext:
    """A liveness probe's TLS: any certificate will do (FFmpeg's open checks it, or not, as it is set)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _answered(sock: socket.socket, selector: selectors.BaseSelector, request: bytes,
              deadline: float) -> Optional[str]:
    """None once the connected camera answers ``request`` with anything (bytes, a reset, a close or, over
    TLS, an alert; a small request fits the send buffer of a fresh connection), NO_ANSWER at the deadline.
    An ``ssl.SSLSocket`` shakes hands first (NO_TLS_ANSWER at the deadline); TLS records that carry no
    data (TLS 1.3's session tickets) are no answer."""
    shaking, sent = isinstance(sock, ssl.SSLSocket), False
    while True:
        try:
            if shaking:
                sock.do_handshake()
                shaking = False
            if not sent:
                sock.send(request)
                sent = True
            sock.recv(1)
            return None       # bytes, or a close
        except (BlockingIOError, ssl.SSLWantReadError):
            selector.modify(sock, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            selector.modify(sock, selectors.EVENT_WRITE)
        except OSError:
            return None       # a reset, an alert: it answers, and the open will say what it says
        while True:
            if given_up():
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return NO_TLS_ANSWER if shaking else NO_ANSWER
            if selector.select(min(POLL_S, left)):
                break


def _why(code: int) -> str:
    return _WHY.get(code, os.strerror(code).lower())


@dataclass
class _Hung:
    ran_out: int = 0           # opens in a row that ran out their time after the connect succeeded
    quiet_until: float = 0.0   # monotonic; no open before


class HungOpens:
    """Per URL, the opens in a row that ran out their time although the camera accepted the connect, and
    when the next may run: the quiet after the n-th is the open timeout × 2^(n+1), at most
    HUNG_QUIET_MAX_S (with 5 s opens such a camera holds the lock 5 s in 25, then 5 s in 35, not half the
    time). Forgotten at the first open that succeeds (FFmpeg has read the stream's first packets by then)
    and when a connect fails (the camera is rebooting: it is opened as soon as it accepts again)."""

    def __init__(self) -> None:
        self._by_url: Dict[str, _Hung] = {}
        self._lock = threading.Lock()

    def quiet_left(self, url: str) -> float:
        with self._lock:
            hung = self._by_url.get(url)
            return 0.0 if hung is None else max(0.0, hung.quiet_until - time.monotonic())

    def ran_out(self, url: str, timeout_s: float) -> None:
        with self._lock:
            hung = self._by_url.setdefault(url, _Hung())
            hung.ran_out += 1
            hung.quiet_until = time.monotonic() + min(timeout_s * 2 ** (hung.ran_out + 1), HUNG_QUIET_MAX_S)

    def forget(self, url: str) -> None:
        with self._lock:
            self._by_url.pop(url, None)


HUNG = HungOpens()     # process-wide, like the lock: a camera reopened by a new source keeps its pacing


def probed_open(url: str, target: Target, timeout_s: float,
                open_stream: Callable[[], Capture], opened: Callable[[Capture], bool]) -> Optional[Capture]:
    """``open_stream()`` in its turn (open_turns.in_turn) once the camera at ``target`` accepted a TCP
    connect (and answered its first request, ``first_request``, after a TLS handshake for TLS_SCHEMES)
    and is not being left quiet after hung opens; Unreachable, without the turn, otherwise. None where
    this thread's camera stopped first. ``opened(capture)``: whether the open succeeded."""
    if HUNG.quiet_left(url) > 0:
        raise Unreachable(f"{target} accepts connections but its stream did not open in {timeout_s:g} s; "
                          f"its opens are spaced out, up to {HUNG_QUIET_MAX_S:g} s apart, until one succeeds")
    scheme = urlsplit(url).scheme.lower()
    failure = connect_failure(target, timeout_s, first_request(url), scheme in TLS_SCHEMES)
    if failure in (NO_ANSWER, NO_TLS_ANSWER):
        unanswered = "TLS handshake" if failure == NO_TLS_ANSWER else f"{scheme} {FIRST_WORDS[scheme][1]}"
        raise Unreachable(f"{target} accepts connections but does not answer (its {unanswered} unanswered "
                          f"for {timeout_s:g} s)")
    if failure is not None:
        HUNG.forget(url)
        raise Unreachable(f"cannot connect to {target} ({failure})")
    started = []      # when the open itself began: the wait for the turn is not the camera's

    def timed_open() -> Capture:
        started.append(time.monotonic())
        return open_stream()

    capture = in_turn(timed_open)
    if capture is not None and opened(capture):
        HUNG.forget(url)
    elif started and time.monotonic() - started[0] >= RAN_OUT * timeout_s:
        HUNG.ran_out(url, timeout_s)
    return capture
