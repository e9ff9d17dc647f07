"""The one trigger API: what every trigger source (a CLI/line-file test driver, the Modbus map, the
OPC UA server, a hardware I/O) calls on a line running in triggered mode.

The part runner (runtime/line/parts.py) implements it; adapters depend on this protocol only, so a
PLC adapter never reaches into the runner. Results come back to every LineObserver as ``on_part``
(runtime/outputs/base.py ``PartResult``), in trigger order, each carrying its inspection id and the
part id given here.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Protocol, Sequence, Tuple

from mrkd.errors import SettingError
from mrkd.runtime.outputs.base import TriggerReceipt

logger = logging.getLogger(__name__)

# Line and paragraph separators read as line breaks by some log readers, as C0/C1 controls by all.
_LINE_BREAKERS = {"\u2028", "\u2029"}
CONTROL_CHARACTERS_REFUSAL = "control characters in the part id"


def has_control_characters(text: str) -> bool:
    """Whether a part's id holds a control character (C0, DEL, C1, U+2028/9). An id travels into every
    log line, event and result of its part: a line break forges a log line, an escape sequence rewrites
    the operator's terminal, a NUL cuts C strings. Triggers refuse them."""
    return any(_is_control(c) for c in text)


def printable_id(text: str) -> str:
    """``text`` with its control characters escaped, for a refusal's report."""
    return "".join(_escaped(c) if _is_control(c) else c for c in text)


def _is_control(c: str) -> bool:
    return ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f or c in _LINE_BREAKERS


def _escaped(c: str) -> str:
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


class TriggerTarget(Protocol):
    """A line that judges parts on trigger."""

    def trigger(self, part_id: Optional[str] = None, recipe: Optional[int] = None) -> TriggerReceipt:
        """Queue one part (refused, counted and reported when the queue is full or the line offline).
        ``recipe``: the recipe number to judge it with (None: the active one)."""
        ...

    @property
    def ready(self) -> bool:
        """A trigger now would be accepted (online and the queue has room)."""
        ...

    @property
    def busy(self) -> bool:
        """A part is being acquired or judged, or waits in the queue."""
        ...

    @property
    def online(self) -> bool:
        ...

    def set_online(self, online: bool) -> None:
        """Offline: refuse triggers (the part in hand is still finished)."""
        ...

    @property
    def recipes(self) -> Sequence[int]:
        """The recipe numbers the line file lists (0 is the line's own model)."""
        ...

    @property
    def active_recipe(self) -> int:
        ...

    @property
    def run_id(self) -> str:
        """Names this run (UTC start time + random digits): the parts' ``run_id``, the prefix of ids that
        must not repeat after a restart (OPC UA ResultIds and JobIds)."""
        ...


# ---------------------------------------------------------------- how a line makes parts

PART_DEFAULTS = dict(images=1, queue=4, timeout=2.0, early=0.25)


@dataclass(frozen=True)
class PartSettings:
    """How a triggered line makes a part (line file ``[part]`` and ``[recipes]``, or the CLI).

    cameras: the cameras whose images make a part (empty: every camera of the line). images: images
    per camera per part. queue: triggers that may wait while a part is judged; one more is refused
    and counted as missed. timeout: seconds a camera may take to deliver each image. early: with
    ``trigger = "hardware"``, how long before mrkd hears of a trigger (the PLC's message) the camera's
    image may already have arrived and still be that part's; older images are a stray trigger's (the
    PLC fires the camera and tells mrkd within one scan, so a few tens of ms are usual). max_delay: the
    most seconds from a trigger to its image for a camera that takes the image when mrkd asks (software
    trigger, free-running): a part that waited longer in the queue, or whose image came later, is ERROR
    "late" (its image would show what is under the camera by then, on a moving line another part); None:
    no bound (a hardware-triggered camera exposes at the edge, so the wait does not move its image).
    recipes: recipe number -> model file (0 is each camera's own model and is always there).
    recipe_masks: (recipe number, camera, mask image): the ignore mask that camera's images are judged
    under when a part is judged with that recipe (a variant whose date code sits elsewhere); a camera a
    recipe does not name keeps its own ``ignore_mask``.
    """

    cameras: Tuple[str, ...] = ()
    images: int = PART_DEFAULTS["images"]
    queue: int = PART_DEFAULTS["queue"]
    timeout: float = PART_DEFAULTS["timeout"]
    early: float = PART_DEFAULTS["early"]
    recipes: Tuple[Tuple[int, str], ...] = ()
    max_delay: Optional[float] = None
    recipe_masks: Tuple[Tuple[int, str, str], ...] = ()

    def check(self, camera_names: Sequence[str]) -> "PartSettings":
        """Raise SettingError naming the setting that is out of range; returns self."""
        unknown = [c for c in self.cameras if c not in camera_names]
        if unknown:
            raise SettingError(f"part.cameras: {unknown[0]!r} is not a camera of this line "
                               f"(cameras: {', '.join(camera_names)})")
        if len(set(self.cameras)) != len(self.cameras):
            raise SettingError("part.cameras: a camera is listed twice")
        if not (isinstance(self.images, int) and 1 <= self.images <= 64):
            raise SettingError(f"part.images: expected 1..64 images per camera, got {self.images!r}")
        if not (isinstance(self.queue, int) and 0 <= self.queue <= 1000):
            raise SettingError(f"part.queue: expected 0..1000 waiting triggers, got {self.queue!r}")
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and 0 < self.timeout <= 600):
            raise SettingError(f"part.timeout: expected seconds in (0, 600], got {self.timeout!r}")
        if not (isinstance(self.early, (int, float)) and math.isfinite(self.early) and 0 <= self.early <= 10):
            raise SettingError(f"part.early: expected seconds in [0, 10], got {self.early!r}")
        if self.max_delay is not None and not (isinstance(self.max_delay, (int, float)) and
                                               math.isfinite(self.max_delay) and 0 < self.max_delay <= 600):
            raise SettingError(f"part.max_delay: expected seconds in (0, 600], got {self.max_delay!r}")
        for number, model in self.recipes:
            if not isinstance(number, int) or number < 1 or number > 65535:
                raise SettingError(f"recipes: recipe numbers are 1..65535 (0 is the line's own model), got {number!r}")
        numbers = {number for number, _ in self.recipes}
        for number, camera, _ in self.recipe_masks:
            if number not in numbers:
                raise SettingError(f"recipes.{number}.ignore_mask: recipe {number} has no model")
            if camera not in camera_names:
                raise SettingError(f"recipes.{number}.ignore_mask.{camera}: not a camera of this line "
                                   f"(cameras: {', '.join(camera_names)})")
        return self


# ---------------------------------------------------------------- test drivers (a shell, a timer)

class TriggerBudget:
    """The accepted triggers the test drivers may still make (``--max-parts``), one budget for all of them:
    each driver counted its own, so --trigger-stdin with --trigger-every judged up to twice the parts
    asked for. ``count`` None: no limit. A trigger is made and counted under one lock hold, so two drivers
    never both take the last one."""

    def __init__(self, count: Optional[int] = None):
        self.count = count
        self.accepted = 0
        self._lock = threading.Lock()

    @property
    def spent(self) -> bool:
        return self.count is not None and self.accepted >= self.count

    def trigger(self, target: TriggerTarget, *args) -> Optional[bool]:
        """target.trigger(*args) unless the budget is spent (None then); whether it was accepted."""
        with self._lock:
            if self.spent:
                return None
            accepted = bool(target.trigger(*args).accepted)
            self.accepted += accepted
            return accepted


def trigger_every(target: TriggerTarget, seconds: float, stop: threading.Event,
                  budget: Optional[TriggerBudget] = None) -> threading.Thread:
    """Trigger ``target`` every ``seconds`` (part ids counted by the line) until ``stop`` or ``budget``'s
    accepted triggers are spent (parts: a refused one, queue full, does not count; shared with the other
    drivers); then sets ``stop`` once the line is idle (a count given). Runs on its own thread."""
    budget = budget or TriggerBudget()

    def drive():
        next_at = time.monotonic()
        while not stop.is_set() and budget.trigger(target) is not None:
            next_at += seconds
            stop.wait(max(0.0, next_at - time.monotonic()))
        if budget.count is not None:
            _stop_when_idle(target, stop)

    thread = threading.Thread(target=drive, name="trigger-every", daemon=True)
    thread.start()
    return thread


def input_lines(stream) -> Iterator[str]:
    """The lines of ``stream`` (stdin) as text, bytes that are not UTF-8 read as U+FFFD. A text stream is
    read through its bytes: decoding it as the locale says either raised on the trigger thread (a UTF-8
    locale reads strictly), so no line after the byte was read, or (the C locale) carried lone
    surrogates into part ids, which strict JSON readers and MQTT's UTF-8 strings refuse."""
    for line in getattr(stream, "buffer", stream):
        yield line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line


def trigger_lines(target: TriggerTarget, lines: Iterable[str], stop: threading.Event,
                  budget: Optional[TriggerBudget] = None) -> threading.Thread:
    """One trigger per line of ``lines`` (stdin; ``input_lines``): the line is the part id (empty:
    the part is named by its trigger number), an optional ``@N`` suffix the recipe (``P-17@2``). At the end of input, or once ``budget``'s
    accepted triggers are spent (shared with the other drivers; the lines after are not read), sets
    ``stop`` once idle. Input that cannot be read any more (an I/O error) ends it as the end of input
    does, said once in the log."""
    budget = budget or TriggerBudget()

    def drive():
        text_lines = input_lines(lines)
        while not stop.is_set() and not budget.spent:
            try:
                line = next(text_lines, None)
            except (OSError, ValueError) as exc:    # a terminal gone (EIO after an ssh session drops), a closed stream
                logger.warning("--trigger-stdin: cannot read the input any more (%s); no more triggers from it", exc)
                break
            if line is None:
                break
            part_id, _, recipe = line.strip().partition("@")
            recipe = recipe.strip()
            # ASCII digits only, as the line file and OPC UA read recipes: int() also takes "\u0661" (1) and
            # "1_0" (10). Anything else ("P-4@one") is refused as an unknown recipe (counted), never judged with 0
            number = (int(recipe) if recipe.isascii() and recipe.isdigit() else recipe) if recipe else None
            if budget.trigger(target, part_id.strip() or None, number) is None:
                break       # the other driver took the last one while this line was read
        _stop_when_idle(target, stop)

    thread = threading.Thread(target=drive, name="trigger-lines", daemon=True)
    thread.start()
    return thread


def _stop_when_idle(target: TriggerTarget, stop: threading.Event) -> None:
    while not stop.is_set() and target.busy:
        stop.wait(0.02)
    stop.set()
