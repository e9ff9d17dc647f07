"""Modbus TCP adapter of the PLC handshake: the fixed map of docs/PLC.md over pymodbus' server.

pymodbus 3.16 (setup.py pins >=3.16.1,<3.17: its server API changed in 3.10, 3.13 and 3.16) keeps a
server's registers in a ``SimDevice`` and calls its ``action`` coroutine on every access, before a
write lands and before a read is answered. That hook is the whole adapter: a write of a coil or
holding register goes to ``Handshake`` (edges are seen there, in address order), and every read
copies one ``PlcImage`` snapshot into the block being read, so one read never mixes two results.
The action runs on the server's event loop thread; pymodbus slices the answer right after it
returns, with no await in between.

Any unit id is answered (``SimDevice`` id 0 serves every id). Coils and discrete inputs are stored
in one 16-bit word each: reads of the reserved bits after the map answer 0, a read that starts past
the map or a write of a reserved coil answers exception 02 (illegal data address); unknown function
codes answer exception 01; a recipe the line does not list, or a function 05 value other than 0xFF00 /
0x0000, answers exception 03.

Modbus TCP has no authentication: the client's address is the one thing a server can check. With
``allow`` (``--modbus-allow``) a connection from any other address is closed before it is read.
With ``security`` (runtime/plc/modbus_security.py) the server speaks Modbus/TCP Security instead: TLS
with a client certificate the trust folder admits, checked before any byte is read. Listening beyond
this machine needs one of the two (PlcSettings.check).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import struct
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Deque, List, Optional, Sequence, Tuple, Union

IpNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

from mrkd.runtime.line.trigger import TriggerTarget
from mrkd.runtime.outputs.base import LineObserver, OutputHealth, PartResult, TriggerReceipt
from mrkd.runtime.plc import PlcError, known_host
from mrkd.runtime.plc.aio import AsyncioServerThread
from mrkd.runtime.plc.handshake import RESULTS_BUFFER, Handshake, HandshakeError, PlcImage, refusal_warnings

if TYPE_CHECKING:
    from mrkd.runtime.plc.modbus_security import ModbusSecurity, SecureListener

logger = logging.getLogger(__name__)


class _PymodbusNoise(logging.Filter):
    """pymodbus logs a PLC that drops its connection with a reply in flight as an ERROR, followed by
    its last 20 frames in hex (other connections' too). The connection count and the handshake
    already say it; other pymodbus errors keep their first line, without the frame dump. A frame too
    short for its function is answered (exception 03) but warned about per frame: said once a minute."""

    UNDECODABLE = ("Unable to decode frame", "Repeating....")
    UNDECODABLE_EVERY_S = 60.0

    def __init__(self):
        super().__init__()
        self.undecodable_said = -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text.startswith("Cancel send, because not connected"):
            return False
        if text.startswith(self.UNDECODABLE):
            now = time.monotonic()
            if now - self.undecodable_said < self.UNDECODABLE_EVERY_S or text.startswith("Repeating"):
                return False
            self.undecodable_said = now
        if "\n>>>>> " in text:
            record.msg, record.args = text.split("\n>>>>> ", 1)[0], ()
        return True


def _quiet_pymodbus() -> None:
    target = logging.getLogger("pymodbus.logging")
    if not any(isinstance(f, _PymodbusNoise) for f in target.filters):
        target.addFilter(_PymodbusNoise())

DEFAULT_PORT = 502

# The map (0-based protocol addresses). docs/PLC.md prints it; tests/test_plc_docs.py keeps them in step.
COILS = ("Trigger Enable", "Trigger", "Results Ack", "Clear Error", "Set Offline")
DISCRETE_INPUTS = ("Online", "Trigger Ready", "Trigger Ack", "Busy", "Results Valid", "Part OK", "Part NG",
                   "Results Buffer Overrun", "Missed Trigger", "Error")
HOLDING_REGISTERS = ("Recipe", "Part Id")
INPUT_REGISTERS = ("Result Code", "Inspection Id", "Part Id", "Score per mille of threshold", "Score (high word)",
                   "Score (low word)", "Processing Time", "Error Code", "Parts Judged (high word)",
                   "Parts Judged (low word)", "Parts NG (high word)", "Parts NG (low word)",
                   "Missed Triggers (high word)", "Missed Triggers (low word)", "Active Recipe",
                   "Results Dropped (high word)", "Results Dropped (low word)", "Results Waiting", "Result Recipe")
BIT_WORD = 16
# Coils written together (function 15) take effect in this order: levels first, the trigger last.
COIL_ORDER = (0, 4, 3, 2, 1)

# MBAP: transaction id, protocol id, length (2 bytes each), then the unit id; the length counts the unit id,
# the function code and at most 252 data bytes (a PDU is at most 253 bytes).
MBAP_HEADER, MIN_MBAP_LENGTH, MAX_MBAP_LENGTH = 6, 2, 254
READ_CHUNK = 256 * 1024        # the most asyncio's socket transport hands over in one read
MAX_CONNECTIONS = 32           # a cell has a PLC or a few, and perhaps an HMI or a monitor
# A frame started and not whole after this closes its connection (else it held its place and its buffer
# for good). A PLC sends a frame (at most 260 bytes) in one segment: its bytes come within milliseconds,
# and even a segment lost on the way is sent again well within this (TCP's retransmission timeout on a
# LAN starts near 0.2 s and doubles). An idle connection between frames is not affected.
FRAME_DEADLINE_S = 3.0

FUNCTION_TABLE = {1: "c", 5: "c", 15: "c", 2: "d", 3: "h", 6: "h", 16: "h", 22: "h", 23: "h", 4: "i"}


def parse_modbus_address(text: str, name: str = "--modbus") -> Tuple[str, int]:
    """'HOST:PORT', ':PORT' or 'HOST' (port 502) -> (host, port); PlcError naming the text (and ``name``,
    the option or line-file field it came from)."""
    text = str(text).strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:     # not "5²": int() refuses it
        raise PlcError(f"{name} must look like HOST:PORT (e.g. 127.0.0.1:5020), got {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    if not known_host(host):
        # 'nohostport' read as a host name with port 502 was reported as an address beyond this machine
        raise PlcError(f"{name} must look like HOST:PORT, HOST an address of this machine (e.g. 127.0.0.1:5020, or "
                       f"0.0.0.0:502 for the cell network), got {text!r}: {host!r} is no IP address or host name "
                       f"this machine knows")
    return host, int(port)


def parse_client_networks(text: str) -> Tuple[IpNetwork, ...]:
    """'10.0.0.5, 10.0.1.0/24' -> the networks a client address may lie in; PlcError naming the entry."""
    networks = []
    for entry in str(text).split(","):
        entry = entry.strip()
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise PlcError(f"expected IP addresses or networks separated by commas (10.0.0.5,10.0.1.0/24), "
                           f"got {entry!r}") from None
    return tuple(networks)


def admits_every_address(networks: Sequence[IpNetwork]) -> Optional[int]:
    """The IP version (4 or 6) whose every address ``networks`` admit together (0.0.0.0/0, or 0.0.0.0/1 with
    128.0.0.0/1), else None: such a list checks no client, so it cannot stand in for authentication."""
    for version in (4, 6):
        merged = list(ipaddress.collapse_addresses(n for n in networks if n.version == version))
        if merged and merged[0].prefixlen == 0:
            return version
    return None


def client_admitted(peer, allow: Optional[Sequence[IpNetwork]]) -> bool:
    """Is a connection from ``peer`` (a socket's peername) in ``allow``? None: every client is."""
    if allow is None:
        return True
    try:
        address = ipaddress.ip_address(peer[0].split("%", 1)[0])
    except (TypeError, ValueError, IndexError):
        return False
    if address.version == 6 and address.ipv4_mapped is not None:      # a dual-stack socket's IPv4 client
        address = address.ipv4_mapped
    return any(address in network for network in allow)


def words32(value: int) -> List[int]:
    value %= 1 << 32
    return [value >> 16, value & 0xFFFF]


def float_words(value: float) -> List[int]:
    """float32, high word first (NaN stays NaN: 0x7FC0 0x0000)."""
    high, low = struct.unpack(">HH", struct.pack(">f", value if math.isfinite(value) or math.isnan(value)
                                                 else math.copysign(3.4028234663852886e38, value)))
    return [high, low]


def discrete_inputs(image: PlcImage) -> List[bool]:
    return [image.online, image.trigger_ready, image.trigger_ack, image.busy, image.results_valid, image.part_ok,
            image.part_ng, image.overrun, image.missed_trigger, image.error]


def input_registers(image: PlcImage) -> List[int]:
    r = image.result
    result = ([r.result_code, r.inspection_id, r.part_id, r.per_mille, *float_words(r.score), r.processing_ms]
              if r is not None else [0] * 7)
    return (result + [image.error_code] + words32(image.parts_judged) + words32(image.parts_ng)
            + words32(image.missed_triggers) + [image.active_recipe] + words32(image.results_dropped)
            + [image.results_waiting, r.recipe if r is not None else 0])


class ModbusPlc(AsyncioServerThread, LineObserver):
    """A Modbus TCP server carrying the handshake of one ``TriggerTarget``; also the line observer
    that feeds the handshake its parts. ``start()`` listens (PlcError when it cannot), ``close()``
    stops; ``address`` is the (host, port) listened on (port 0 asks for a free one)."""

    answers_plc = True       # told of triggers and parts on the spot, the others later (base.plc_and_others)

    def __init__(self, target: TriggerTarget, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 capacity: int = RESULTS_BUFFER, allow: Optional[Sequence[IpNetwork]] = None,
                 security: Optional["ModbusSecurity"] = None):
        self.handshake = Handshake(target, capacity, name="modbus")
        self.host, self.port = host, port
        self.allow = tuple(allow) if allow is not None else None
        self.security = security
        self._secure: Optional["SecureListener"] = None
        self.address: Optional[Tuple[str, int]] = None
        self.clients = self.connections = self.requests = self.refused = 0
        self._refusals = refusal_warnings(logger)     # refused writes: a few lines, however many
        self.clients_refused = 0          # connections closed at once: address not in ``allow``, or untrusted
        self._refused_seen: set = set()   # refusals already logged (a scanner must not flood the log)
        self.writes_refused = 0           # writes of clients whose role may not write (exception 01)
        self.frames_refused = 0           # connections closed for a header no Modbus TCP frame has
        self.connections_closed = 0       # idle connections closed to keep at most MAX_CONNECTIONS
        self.frames_stalled = 0           # connections closed for a frame not whole within FRAME_DEADLINE_S
        self._watch: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._server = None
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._closed = False

    # ------------------------------------------------------------ server
    def start(self) -> "ModbusPlc":
        from mrkd.deps import require
        require("pymodbus", "the Modbus TCP server (--modbus) needs pymodbus")
        if self.security is not None:
            from mrkd.runtime.plc.modbus_security import SecureListener, told_handshakes
            self._secure = SecureListener(self.security)        # PlcError naming a file that does not load
            self._secure.context.sslobject_class = told_handshakes(self._handshake_refused)
        _quiet_pymodbus()
        self._start_loop("modbus", 30)
        if self._error is not None or self.address is None:
            raise PlcError(f"--modbus {self.host}:{self.port}: cannot listen there ({self._error or 'no answer'})")
        logger.info("Modbus TCP server on %s:%d", *self.address)
        return self

    async def _listen(self) -> None:
        from pymodbus.simulator import DataType, SimData, SimDevice
        ModbusServer = _server_class(self._admit, self._write_refused, self._malformed, self._crowded,
                                     self._stalled, secure=self._secure is not None)
        bits = lambda: [SimData(0, count=BIT_WORD, values=False, datatype=DataType.BITS)]   # noqa: E731
        registers = lambda n: [SimData(0, count=n, values=0, datatype=DataType.REGISTERS)]  # noqa: E731
        device = SimDevice(0, simdata=(bits(), bits(), registers(len(HOLDING_REGISTERS)),
                                       registers(len(INPUT_REGISTERS))), action=self._action)
        tls = {"sslctx": self._secure.context} if self._secure is not None else {}
        self._server = ModbusServer(device, address=(self.host, self.port), trace_connect=self._connected,
                                    custom_pdu=[_strict_write_single_coil()], **tls)
        await self._server.serve_forever(background=True)
        if self._secure is not None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_trust())
        sockets = getattr(self._server.transport, "sockets", None) or []
        if not sockets:
            raise OSError("the server did not listen (address in use or not local?)")
        self.address = sockets[0].getsockname()[:2]

    def reload_certificate(self, reason: str = "request") -> bool:
        """Modbus/TCP Security: read the server's certificate and key again (`mrkd run` does it on SIGHUP);
        new connections get them. False (the old pair stays, logged in one line) when they do not load."""
        if self._secure is None:
            return False
        try:
            self._secure.reload_certificate()
        except PlcError as exc:
            logger.warning("modbus: certificate reload (%s) REFUSED, the previous one stays: %s", reason, exc)
            return False
        logger.warning("modbus: certificate reloaded (%s) from %s", reason, self.security.certificate)
        return True

    async def _watch_trust(self) -> None:
        """Modbus/TCP Security: the trust folder looked at once a second, so a certificate added to it
        reaches the TLS handshake without a restart."""
        while True:
            await asyncio.sleep(1.0)
            try:
                self._secure.refresh()
            except Exception as exc:       # a folder gone: keep the last good list, say so once
                logger.warning("modbus: trust folder: %s", exc)

    async def _shutdown(self, server) -> None:
        if self._watch is not None:
            self._watch.cancel()
            try:
                await self._watch
            except asyncio.CancelledError:
                pass
        await server.shutdown()

    def _admit(self, transport) -> Optional[bool]:
        """Called on the loop thread as a connection is made (over TLS: once its handshake is done),
        before any byte of it is read: None refuses it, else whether it may write (Modbus/TCP Security's
        roles; every admitted plain client may)."""
        peer, who = transport.get_extra_info("peername"), _client_address(transport)
        if not client_admitted(peer, self.allow):
            why = "not in --modbus-allow"
        elif self._secure is not None and (refusal := self._secure.refusal(transport)) is not None:
            why = f"client certificate refused: {self._secure.refusal_said(transport, refusal)}"
        else:
            return self._secure is None or self._secure.may_write(transport)
        self.clients_refused += 1
        self._log_once(who, f"modbus: refused a connection from {who} ({why})")
        return None

    def _handshake_refused(self, transport, why: str) -> None:
        """(The loop thread.) OpenSSL refused a client in the TLS handshake: counted, and said once per client
        address and reason."""
        self.clients_refused += 1
        who = _client_address(transport) if transport is not None else "?"
        self._log_once((who, why), f"modbus: refused a connection from {who} ({why})")

    def _write_refused(self, transport, function_code: int) -> None:
        """A read-only client (its role may not write) asked for a write: answered exception 01."""
        self.writes_refused += 1          # only a Modbus/TCP Security connection is ever read-only
        who = _client_address(transport)
        role = self._secure.role(transport)
        self._log_once((who, role), f"modbus: refused a write (function {function_code}) from {who}: its "
                                    f"certificate's role {role!r} is not among --modbus-write-roles")

    def _malformed(self, transport, why: str) -> None:
        """A connection sent a header no Modbus TCP frame has: it is closed (logged once per address)."""
        self.frames_refused += 1
        who = _client_address(transport)
        self._log_once((who, "malformed"), f"modbus: closed a connection from {who}: {why}")

    def _crowded(self, transport) -> None:
        """The connection idle longest, closed to keep at most MAX_CONNECTIONS (logged once per address)."""
        self.connections_closed += 1
        who = _client_address(transport)
        self._log_once((who, "crowded"), f"modbus: more than {MAX_CONNECTIONS} connections: closed the one from "
                                         f"{who} that had gone longest without a request")

    def _stalled(self, transport) -> None:
        """A frame was started and not completed within FRAME_DEADLINE_S: the connection is closed
        (logged once per address)."""
        self.frames_stalled += 1
        who = _client_address(transport)
        self._log_once((who, "stalled"), f"modbus: closed a connection from {who}: a frame started and not "
                                         f"completed within {FRAME_DEADLINE_S:g} s")

    def _log_once(self, key, message: str) -> None:
        if key not in self._refused_seen and len(self._refused_seen) < 64:
            self._refused_seen.add(key)
            logger.warning("%s", message)

    def _connected(self, connect: bool) -> None:
        self.clients += 1 if connect else -1
        self.connections += bool(connect)

    def close(self) -> None:
        if self._closed or self._loop is None:
            return
        self._closed = True
        loop, server = self._loop, self._server
        if server is not None and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(server), loop).result(5)
            except Exception:   # closing must not raise at the end of a run
                logger.exception("modbus: shutdown")
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        for refusals in (self._refusals, self.handshake.refusals):    # no write comes now: say what was held
            refusals.flush()

    # ------------------------------------------------------------ the map
    async def _action(self, function_code: int, start_address: int, address: int, count: int,
                      registers: list, set_values: Optional[Sequence]) -> Optional[int]:
        from pymodbus.constants import ExcCodes
        from pymodbus.simulator.simutils import SimUtils
        self.requests += 1
        table = FUNCTION_TABLE.get(function_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        try:
            if set_values is not None:
                return self._write(table, address, list(set_values), ExcCodes)
            if table == "c":
                if address >= len(COILS):
                    return ExcCodes.ILLEGAL_ADDRESS
                levels = self.handshake.levels
                registers[0] = SimUtils.bitsToRegisters(_word([levels[k] for k in (
                    "trigger_enable", "trigger", "results_ack", "clear_error", "set_offline")]))[0]
            elif table == "d":
                if address >= len(DISCRETE_INPUTS):
                    return ExcCodes.ILLEGAL_ADDRESS
                registers[0] = SimUtils.bitsToRegisters(_word(discrete_inputs(self.handshake.image())))[0]
            elif table == "h":
                levels = self.handshake.levels
                registers[0:2] = [levels["recipe"], levels["part_id"]]
            else:
                values = input_registers(self.handshake.image())
                registers[0:len(values)] = values
        except Exception:   # a bug answers one request with exception 04, never stops the server
            logger.exception("modbus: function %d at %d failed", function_code, address)
            return ExcCodes.DEVICE_FAILURE
        return None

    def _write(self, table: str, address: int, values: list, exc) -> Optional[int]:
        if table == "c":
            if address + len(values) > len(COILS):
                self.refused += 1
                return exc.ILLEGAL_ADDRESS
            written = {address + i: bool(v) for i, v in enumerate(values)}
            setters = (self.handshake.set_trigger_enable, self.handshake.set_trigger, self.handshake.set_results_ack,
                       self.handshake.set_clear_error, self.handshake.set_offline)
            for coil in COIL_ORDER:
                if coil in written:
                    setters[coil](written[coil])
            return None
        if table == "h":
            written = {address + i: int(v) for i, v in enumerate(values)}
            try:
                if 0 in written:
                    self.handshake.set_recipe(written[0])
                if 1 in written:
                    self.handshake.set_part_id(written[1])
            except HandshakeError as error:
                self._refusals.warn("write refused", "modbus: write refused: %s", error)
                self.refused += 1
                return exc.ILLEGAL_VALUE
            return None
        return exc.ILLEGAL_FUNCTION     # discrete inputs and input registers are read-only

    # ------------------------------------------------------------ LineObserver
    def on_part(self, result: PartResult) -> None:
        self.handshake.on_part(result)

    def on_trigger(self, receipt: TriggerReceipt) -> None:
        self.handshake.on_trigger(receipt)

    def on_stop(self) -> None:
        # Online 0 and every trigger refused, the server answers until the PLC has acknowledged every
        # presented result (_linger), where a PLC has connected at all.
        self.handshake.on_stop()
        if self._linger(lambda: bool(self.connections) and self.handshake.image().results_valid):
            logger.warning("modbus: run ended with %d result(s) the PLC did not acknowledge within %g s",
                           self.handshake.image().results_waiting, self.RESULTS_LINGER_S)
        self.close()

    def health(self) -> Optional[OutputHealth]:
        image = self.handshake.image()
        where = f"{self.address[0]}:{self.address[1]}" if self.address else f"{self.host}:{self.port}"
        state = "stopped" if self._closed else ("connected" if self.clients > 0 else "listening")
        # stopped with the run is not a failure; results the PLC never took (overrun) are
        return OutputHealth(name="modbus", ok=not image.overrun, state=state,
                            sent=image.parts_judged - image.results_dropped, failed=image.results_dropped,
                            detail=f"{where}{' (Modbus/TCP Security)' if self._secure else ''}, "
                                   f"{max(self.clients, 0)} PLC connection(s)"
                                   + (f", {self.clients_refused} refused" if self.clients_refused else "")
                                   + (f", {self.writes_refused} write(s) refused by role" if self.writes_refused
                                      else "")
                                   # connections the server closed on its own: said, never silent
                                   + (f", {self.frames_refused} closed for a malformed header" if self.frames_refused
                                      else "")
                                   + (f", {self.frames_stalled} closed with a frame left unfinished"
                                      if self.frames_stalled else "")
                                   + (f", {self.connections_closed} idle closed to stay at {MAX_CONNECTIONS}"
                                      if self.connections_closed else "")
                                   + (", results buffer overrun" if image.overrun else ""))


def _server_class(admit, write_refused, malformed, crowded, stalled, secure: bool = False):
    """pymodbus' ModbusTcpServer (ModbusTlsServer when ``secure``: the same MBAP frames over TLS) whose
    connections are first put to ``admit(transport)``: a refused one (None) is aborted in connection_made
    (after the TLS handshake), before its handler is set up or any of its bytes is read; one admitted
    read-only (False) has each write answered with exception 01 and reported to ``write_refused``; one
    whose frame is not whole within FRAME_DEADLINE_S of its first bytes is closed, told to ``stalled``."""
    from pymodbus.constants import ExcCodes
    from pymodbus.exceptions import ModbusIOException
    from pymodbus.pdu import ExceptionResponse
    from pymodbus.server import ModbusTcpServer, ModbusTlsServer
    from pymodbus.server.requesthandler import ServerRequestHandler
    from pymodbus.transaction import TransactionManager

    from mrkd.runtime.plc.modbus_security import WRITE_FUNCTIONS

    class AdmittingHandler(ServerRequestHandler):
        may_write = True
        closing = False
        _frame_deadline: Optional[asyncio.TimerHandle] = None    # set while a frame's start waits

        def connection_made(self, transport) -> None:
            access = admit(transport)
            if access is None:
                transport.abort()
                if self.listener is not None:      # registered by the listener before this call
                    self.listener.active_connections.pop(self.unique_id, None)
                return
            self.may_write, self._admitted_transport = access, transport
            self._requests: Deque[tuple] = deque()
            self._answering = False
            self.last_request = time.monotonic()
            self._make_room()
            # pymodbus drops everything it holds, silently, past one frame's size (264 bytes): a burst of
            # requests was lost whole. Every whole frame is taken at once here and a header that could
            # never end closes the connection, so at most one frame's start waits with the new bytes.
            self.max_buffer_size = MBAP_HEADER + MAX_MBAP_LENGTH + READ_CHUNK
            super().connection_made(transport)

        def _make_room(self) -> None:
            """Past MAX_CONNECTIONS, close the connection that has gone longest without a request: a
            client holding connections open and silent would otherwise use up the process' file
            descriptors (the line's cameras and files too); a polling PLC is never the one closed."""
            open_ = [c for c in (getattr(self.listener, "active_connections", None) or {}).values()
                     if hasattr(c, "last_request") and not c.closing]     # admitted, not being closed
            if len(open_) <= MAX_CONNECTIONS:
                return
            idle = min((c for c in open_ if c is not self), key=lambda c: c.last_request)
            idle.closing = True            # it stays listed until its transport says it is lost
            crowded(idle._admitted_transport)
            idle._admitted_transport.close()

        def callback_data(self, data: bytes, addr=None) -> int:
            """Take every whole request in ``data`` and answer them one after another, in the order sent.
            (pymodbus took the first request of what had arrived and left the rest unread until more bytes
            came, and its handler read "the last request" again after an await: two requests close together
            were answered as the second, twice.) Returns the bytes used."""
            used = 0
            while used < len(data):
                why = _malformed_header(data[used:used + MBAP_HEADER])
                if why is not None:                    # no frame boundary to find again: close, unanswered
                    malformed(self._admitted_transport, why)
                    self._admitted_transport.close()
                    return len(data)
                try:
                    cut = TransactionManager.callback_data(self, data[used:], addr)
                except ModbusIOException as exc:       # a whole frame pymodbus cannot decode: that one refused
                    size = MBAP_HEADER + int.from_bytes(data[used + 4:used + 6], "big")
                    function_code = data[used + 7] if size > MBAP_HEADER + 1 else 0
                    # a known function whose quantity is out of range or whose length does not add up is
                    # exception 03 (Modbus Application Protocol 6.1-6.12); pymodbus answered 01
                    response = ExceptionResponse(function_code, ExcCodes.ILLEGAL_VALUE if function_code in
                                                 FUNCTION_TABLE else ExcCodes.ILLEGAL_FUNCTION,
                                                 device_id=exc.dev_id, transaction=exc.transaction_id)
                    self._requests.append((None, addr, response))     # answered in its turn
                    used += size
                    continue
                if self.last_pdu is not None:
                    self._requests.append((self.last_pdu, addr, None))
                    self.last_request = time.monotonic()
                if not cut:
                    break
                used += cut
            if self._requests and not self._answering:
                self._answering = True
                self.loop.create_task(self._answer_all())
            self._watch_frame(started=used > 0 or self._frame_deadline is None, waiting=used < len(data))
            return used

        def _watch_frame(self, started: bool, waiting: bool) -> None:
            """The deadline of the frame whose start waits for its rest: set when a new one starts, kept
            while the same one waits (more bytes do not extend it), gone when none waits."""
            if waiting and not started:
                return
            if self._frame_deadline is not None:
                self._frame_deadline.cancel()
            self._frame_deadline = self.loop.call_later(FRAME_DEADLINE_S, self._frame_stalled) if waiting else None

        def _frame_stalled(self) -> None:
            self._frame_deadline = None
            if not self.closing and not self._admitted_transport.is_closing():
                self.closing = True
                stalled(self._admitted_transport)
                self._admitted_transport.close()

        def callback_disconnected(self, exc) -> None:
            self._watch_frame(started=True, waiting=False)
            super().callback_disconnected(exc)

        async def _answer_all(self) -> None:
            try:
                while self._requests:
                    request, addr, refusal = self._requests.popleft()
                    if refusal is not None:
                        self.server_send(refusal, addr)
                    else:
                        await self._answer(request, addr)
            finally:
                self._answering = False

        async def _answer(self, request, addr) -> None:
            refusal = None
            if not self.may_write and request.function_code in WRITE_FUNCTIONS:
                write_refused(self._admitted_transport, request.function_code)
                refusal = ExcCodes.ILLEGAL_FUNCTION
            elif request.function_code not in FUNCTION_TABLE:
                refusal = ExcCodes.ILLEGAL_FUNCTION   # pymodbus' own answers (08 diagnostics, 43 device id, ...)
            elif getattr(request, "illegal_value", False):
                refusal = ExcCodes.ILLEGAL_VALUE      # FC 05 with a value other than 0x0000 / 0xFF00
            if refusal is None:
                try:
                    response = await request.datastore_update(self.server.context, request.dev_id)
                except Exception as exc:             # one request answered 04, the connection goes on
                    logger.warning("modbus: function %d failed: %s", request.function_code, exc)
                    refusal = ExcCodes.DEVICE_FAILURE
            if refusal is not None:
                response = ExceptionResponse(request.function_code, refusal)
            response.transaction_id, response.dev_id = request.transaction_id, request.dev_id
            self.server_send(response, addr)

    class AdmittingServer(ModbusTlsServer if secure else ModbusTcpServer):
        def callback_new_connection(self):
            return AdmittingHandler(self, self.trace_packet, self.trace_pdu, self.trace_connect)

    return AdmittingServer


def _client_address(transport) -> str:
    """The client's IP address as the log names it ("?" when the socket no longer says)."""
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if peer else "?"


def _malformed_header(header: bytes) -> Optional[str]:
    """Why the start of an MBAP header (up to its 6 first bytes) is no Modbus TCP frame's, or None."""
    if len(header) >= 4 and header[2:4] != b"\x00\x00":
        return f"protocol id {int.from_bytes(header[2:4], 'big')}, not Modbus (0)"
    if len(header) >= 6 and not MIN_MBAP_LENGTH <= int.from_bytes(header[4:6], "big") <= MAX_MBAP_LENGTH:
        return (f"MBAP length {int.from_bytes(header[4:6], 'big')}, outside {MIN_MBAP_LENGTH}..{MAX_MBAP_LENGTH} "
                f"(unit id, function code and at most 252 data bytes)")
    return None


def _strict_write_single_coil():
    """Function 05 as the Modbus spec has it: the value is 0xFF00 (on) or 0x0000 (off); any other is
    answered exception 03 (illegal data value) with nothing written. pymodbus reads any non-zero
    value as on (so 0x0001 pulsed Trigger); this request keeps the raw value for the handler."""
    from pymodbus.pdu.bit_message import WriteSingleCoilRequest

    class StrictWriteSingleCoil(WriteSingleCoilRequest):
        illegal_value = False

        def decode(self, data: bytes) -> None:
            super().decode(data)
            self.illegal_value = struct.unpack(">H", data[2:4])[0] not in (0x0000, 0xFF00)
    return StrictWriteSingleCoil


def _word(bits: List[bool]) -> List[bool]:
    return list(bits) + [False] * (BIT_WORD - len(bits))
