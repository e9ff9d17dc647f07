"""The PLC handshake, written once: what a PLC sees of a triggered line and what its writes do.

A PLC writes levels (Trigger Enable, Trigger, Results Ack, Clear Error, Set Offline) and two values
(Recipe, Part Id); it reads bits (Online, Trigger Ready, Trigger Ack, Busy, Results Valid, Part OK/NG,
Results Buffer Overrun, Missed Trigger, Error) and the presented result. ``Handshake`` turns rising
edges into calls of the one trigger API (``TriggerTarget``) and the line's ``PartResult`` records into
a results buffer the PLC acknowledges one by one. Protocol adapters (runtime/plc/modbus.py) only map
``PlcImage`` and the write methods to their wire format.

Rules (docs/PLC.md is the printable version):
- A rising edge of Trigger while Trigger Ready is 0 is refused: counted, Missed Trigger set, never
  queued. Trigger Ack is set when a trigger is accepted and cleared when Trigger goes back to 0.
- Every judged part of the line enters the results buffer in order (at most ``capacity`` results,
  the presented one included). When it is full, the presented and buffered results stay as they
  are; each newer result is dropped, counted and flagged (Results Buffer Overrun).
- Results Valid stays 1 until a rising edge of Results Ack; that edge presents the next buffered
  result (if any) at once, so Inspection Id changes and Results Valid stays 1.
- Clear Error's rising edge clears Error, Error Code, Missed Trigger and Overrun.
- Set Offline is the Modbus PLC's hold on the line's one offline (runtime/plc/offline.py): Online is
  0 while any interface holds the line offline (an OPC UA Halt too), and Set Offline = 0 releases the
  PLC's own hold only.
- State belongs to the line, not to a connection: a PLC that reconnects finds it as it left it.

Locking: ``_lock`` guards the state and is never held while calling the target (the part runner
calls ``on_part`` with its own notify lock held; holding ours across ``target.trigger`` could
deadlock against it). ``image()`` composes one snapshot under the lock, so what a read returns
never mixes two results.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, List, Optional

from mrkd.runtime.line.trigger import TriggerTarget
from mrkd.runtime.outputs.base import LineObserver, PartResult, TriggerReceipt, Verdict
from mrkd.runtime.plc.offline import LineOffline, OfflineHolder
from mrkd.runtime.warning_limiter import WarningLimiter

logger = logging.getLogger(__name__)

PLC_SCHEMA_VERSION = 1
RESULTS_BUFFER = 8          # results held for the PLC, the presented one included
UINT16, UINT32 = 1 << 16, 1 << 32
# A PLC program (or a client) repeating a refused write or trigger edge in a loop wrote a line per
# refusal (8 clients: 33,626 lines in 10 s). Of each kind the first few are said, then one a minute
# with the count held back, and the rest at the stop; the counts themselves are in the map.
REFUSALS_SAID_FIRST, REFUSALS_EVERY_S = 3, 60.0


def refusal_warnings(log: logging.Logger) -> WarningLimiter:
    """The limiter a PLC adapter says its refusals of a PLC's writes through."""
    return WarningLimiter(log, every_s=REFUSALS_EVERY_S, first=REFUSALS_SAID_FIRST)


class ResultCode:
    """Result Code of the presented result."""

    NONE, OK, NG, ERROR = 0, 1, 2, 3


# Error Code: the part runner's codes (runtime/line/parts.py ERROR_CODES) as they are, plus one for
# an ERROR part that carries none. docs/PLC.md lists them all; a test keeps the two in step.
ERROR_UNKNOWN = 99


def error_codes() -> dict:
    """Every Error Code a PLC can read -> what it means."""
    from mrkd.runtime.line.parts import ERROR_CODES
    codes = {0: "no error"}
    codes.update({code: reason for reason, code in ERROR_CODES.items()})
    codes[ERROR_UNKNOWN] = "a part was judged ERROR without a more specific code"
    return codes


def per_mille(score: float, threshold: float) -> int:
    """Score per mille of threshold: min(65535, round(1000 * score / threshold)); 0 for no score (NaN)
    or a score <= 0; with threshold <= 0, 65535 when the part is at/over it, else 0."""
    if not math.isfinite(score) or score <= 0:
        return 0
    if not (math.isfinite(threshold) and threshold > 0):
        return 65535 if score >= threshold else 0
    return min(65535, int(round(1000.0 * score / threshold)))


def plc_part_id(part_id: str) -> int:
    """The part id as a PLC register holds it: the decimal number 0..65535 in ASCII digits, else 0.
    (str.isdigit() is true of "²" and "①", which int() refuses: such an id from stdin or OPC UA raised
    here, and its part never reached the PLC.)"""
    text = str(part_id).strip()
    return int(text) if text.isascii() and text.isdigit() and int(text) < UINT16 else 0


@dataclass(frozen=True)
class PlcResult:
    """One judged part as the PLC reads it."""

    result_code: int             # ResultCode
    inspection_id: int           # PartResult.inspection_id modulo 65536
    part_id: int                 # plc_part_id(PartResult.part_id)
    per_mille: int
    score: float                 # NaN when the part has no score (ERROR)
    processing_ms: int           # trigger -> verdict, ms, at most 65535
    recipe: int
    part: PartResult

    @classmethod
    def of(cls, part: PartResult) -> "PlcResult":
        code = {Verdict.OK: ResultCode.OK, Verdict.NG: ResultCode.NG}.get(part.verdict, ResultCode.ERROR)
        return cls(result_code=code, inspection_id=part.inspection_id % UINT16, part_id=plc_part_id(part.part_id),
                   per_mille=per_mille(part.score, part.threshold), score=float(part.score),
                   processing_ms=min(65535, max(0, int(round(part.verdict_s * 1000.0)))), recipe=int(part.recipe),
                   part=part)


@dataclass(frozen=True)
class PlcImage:
    """Everything a PLC reads, taken at one instant (one read never mixes two states)."""

    online: bool
    trigger_ready: bool
    trigger_ack: bool
    busy: bool
    results_valid: bool
    part_ok: bool
    part_ng: bool
    overrun: bool
    missed_trigger: bool
    error: bool
    result: Optional[PlcResult]  # the presented result (None: Results Valid 0)
    error_code: int
    parts_judged: int            # uint32, wraps
    parts_ng: int
    missed_triggers: int
    results_dropped: int
    results_waiting: int         # results held, the presented one included
    active_recipe: int           # the recipe the next trigger is judged with
    schema_version: int = PLC_SCHEMA_VERSION


class HandshakeError(ValueError):
    """A PLC write the handshake refuses (an unknown recipe); the adapter answers it as an error."""


class Handshake(LineObserver):
    """The PLC handshake over one ``TriggerTarget`` (module docstring). Also a ``LineObserver``: give
    it to the part runner so it sees every ``on_part`` and ``on_trigger``."""

    def __init__(self, target: TriggerTarget, capacity: int = RESULTS_BUFFER, name: str = "plc"):
        if not 1 <= capacity <= 64:
            raise ValueError(f"results buffer: 1..64 results, got {capacity}")
        self.target, self.capacity, self.name = target, capacity, name
        self.offline = LineOffline.of(target)       # shared with the line's other interfaces
        self._lock = threading.Lock()
        # PLC levels and values as last written
        self._enable = self._trigger = self._ack = self._clear = self._offline = False
        self._recipe = int(target.active_recipe)
        self._part_id = 0
        # state the PLC reads
        self._trigger_ack = False
        self._buffer: Deque[PlcResult] = deque()
        self._overrun = self._missed_flag = False
        self._error_code = 0
        self._judged = self._ng = self._missed = self._dropped = 0
        self._stopped = False
        self._listeners: List[Callable[[], None]] = []
        self.refusals = refusal_warnings(logger)      # refused edges: a few lines, however many
        self.offline.subscribe(self._changed)        # Online follows another interface's hold too

    # ------------------------------------------------------------ PLC writes
    def set_trigger_enable(self, level: bool) -> None:
        with self._lock:
            self._enable = bool(level)
        self._changed()

    def set_trigger(self, level: bool) -> Optional[TriggerReceipt]:
        """The Trigger level; a rising edge triggers one part. Returns the line's receipt for an edge
        the line saw (None for no edge or a trigger the handshake refused itself)."""
        with self._lock:
            rising = bool(level) and not self._trigger
            self._trigger = bool(level)
            if not level:
                self._trigger_ack = False
            if not rising:
                refusal = "no edge"
            elif self._stopped:
                refusal = "the line has stopped"
            elif self.offline.held:
                # The line refuses it itself (offline follows the holders): counted and reported to
                # every output like any other trigger of an offline line, not by this PLC alone.
                refusal = None
            elif not self._enable:
                refusal = "Trigger Enable is 0"
            else:
                refusal = None
            if refusal is not None and rising:
                self._missed += 1
                self._missed_flag = True
            part_id, recipe = self._part_id, self._recipe
        if refusal is not None:
            if rising:
                self.refusals.warn(refusal, "%s: trigger refused: %s (%d missed)", self.name, refusal, self._missed)
                self._changed()
            return None
        receipt = self.target.trigger(str(part_id), recipe)   # outside our lock (see module docstring)
        with self._lock:
            if receipt.accepted:
                self._trigger_ack = self._trigger   # Trigger may already be back at 0
            else:
                self._missed_flag = True            # counted in on_trigger, which every refusal reaches
        if not receipt.accepted and self.offline.held:
            self.refusals.warn("offline", "%s: trigger refused: the line is offline (%s)", self.name,
                               self.offline.describe())
        self._changed()
        return receipt

    def set_results_ack(self, level: bool) -> None:
        with self._lock:
            rising = bool(level) and not self._ack
            self._ack = bool(level)
            if rising and self._buffer:
                self._buffer.popleft()
        self._changed()

    def set_clear_error(self, level: bool) -> None:
        with self._lock:
            if level and not self._clear:
                self._error_code = 0
                self._overrun = self._missed_flag = False
            self._clear = bool(level)
        self._changed()

    def set_offline(self, level: bool) -> None:
        """The PLC's own hold on the line's offline: 0 releases it, not another interface's."""
        with self._lock:
            changed = bool(level) != self._offline
            self._offline = bool(level)
        if changed:
            if level:     # the holders' listeners (our _changed among them) hear of it
                self.offline.hold(OfflineHolder.MODBUS)
            else:
                self.offline.release(OfflineHolder.MODBUS)

    def set_recipe(self, number: int) -> None:
        """The recipe of the next trigger on (HandshakeError for one the line does not list)."""
        recipes = list(self.target.recipes)
        if number not in recipes:
            raise HandshakeError(f"recipe {number} is not one of the line's recipes {recipes}")
        with self._lock:
            self._recipe = int(number)
        self._changed()

    def set_part_id(self, value: int) -> None:
        if not 0 <= int(value) < UINT16:
            raise HandshakeError(f"part id {value}: 0..65535")
        with self._lock:
            self._part_id = int(value)

    @property
    def levels(self) -> dict:
        """What the PLC wrote last (coil read-back)."""
        with self._lock:
            return dict(trigger_enable=self._enable, trigger=self._trigger, results_ack=self._ack,
                        clear_error=self._clear, set_offline=self._offline, recipe=self._recipe,
                        part_id=self._part_id)

    # ------------------------------------------------------------ what the PLC reads
    def image(self) -> PlcImage:
        online, ready, busy = bool(self.target.online), bool(self.target.ready), bool(self.target.busy)
        with self._lock:
            online = online and not self._stopped and not self.offline.held
            result = self._buffer[0] if self._buffer else None
            return PlcImage(
                # Trigger still 1 (acknowledged or refused) makes no edge: nothing a write could trigger
                online=online, trigger_ready=online and ready and self._enable and not self._trigger,
                trigger_ack=self._trigger_ack, busy=busy and not self._stopped, results_valid=result is not None,
                part_ok=result is not None and result.result_code == ResultCode.OK,
                part_ng=result is not None and result.result_code == ResultCode.NG,
                overrun=self._overrun, missed_trigger=self._missed_flag, error=self._error_code != 0,
                result=result, error_code=self._error_code, parts_judged=self._judged % UINT32,
                parts_ng=self._ng % UINT32, missed_triggers=self._missed % UINT32,
                results_dropped=self._dropped % UINT32, results_waiting=len(self._buffer),
                active_recipe=self._recipe)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (no arguments, must not block) after every change of the state."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:   # a listener's bug must not break the handshake
                logger.exception("%s: listener failed", self.name)

    # ------------------------------------------------------------ LineObserver
    def on_part(self, result: PartResult) -> None:
        presented = PlcResult.of(result)
        with self._lock:
            self._judged += 1
            self._ng += result.verdict == Verdict.NG
            if result.verdict == Verdict.ERROR:
                self._error_code = int(result.error_code) or ERROR_UNKNOWN
            dropped = len(self._buffer) >= self.capacity
            if dropped:
                self._dropped += 1
                self._overrun = True
            else:
                self._buffer.append(presented)
        if dropped and math.log10(self._dropped).is_integer():     # 1st, 10th, 100th...: no flood
            logger.warning("%s: results buffer full (%d): inspection %d (part %s) dropped, %d so far", self.name,
                           self.capacity, result.inspection_id, result.part_id, self._dropped)
        self._changed()

    def on_trigger(self, receipt: TriggerReceipt) -> None:
        if receipt.accepted:
            return
        with self._lock:
            self._missed += 1
            self._missed_flag = True
        self._changed()

    def on_stop(self) -> None:
        with self._lock:
            self._stopped = True
        self.refusals.flush()
        self._changed()
