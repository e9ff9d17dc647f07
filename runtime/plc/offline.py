"""The line's one "offline", held by each PLC interface for its own reason.

A line may serve a Modbus PLC (Set Offline coil) and an OPC UA client (the VisionStateMachine's Halt)
at once. Each of them takes the line offline for its own reason, and neither may bring it back online
while the other still holds it: the line is offline while ANY holder holds it. Every interface reads
the same state, so each reports the truth (Modbus Online bit, OPC UA CurrentState) whoever took the
line offline.

``LineOffline.of(target)`` is the one object of a line (a ``TriggerTarget``): every server built on
the same line finds the same one, however it was built (``mrkd run``, a test, a benchmark).
"""

from __future__ import annotations

import enum
import logging
import threading
import weakref
from typing import Callable, Dict, List, Optional

from mrkd.runtime.line.trigger import TriggerTarget

logger = logging.getLogger(__name__)


class OfflineHolder(enum.Enum):
    """Who may hold a line offline."""

    MODBUS = "Modbus Set Offline = 1"
    OPCUA = "OPC UA VisionStateMachine"


class LineOffline:
    """Holders of one line's offline, each with its reason; the line (``target.set_online``) follows:
    offline while any holder holds it. Listeners are called (no arguments, must not block) after each
    change of the holders."""

    _of_line: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
    _of_line_lock = threading.Lock()

    def __init__(self, target: TriggerTarget):
        self.target = target
        self._lock = threading.Lock()
        self._reasons: Dict[OfflineHolder, str] = {}
        self._listeners: List[Callable[[], None]] = []

    @classmethod
    def of(cls, target: TriggerTarget) -> "LineOffline":
        """The one ``LineOffline`` of ``target``."""
        with cls._of_line_lock:
            offline = cls._of_line.get(target)
            if offline is None:
                offline = cls._of_line[target] = cls(target)
            return offline

    def hold(self, holder: OfflineHolder, detail: str = "") -> None:
        """``holder`` holds the line offline; its reason reads '<holder> <detail>'."""
        self._set(holder, f"{holder.value} {detail}".strip())

    def release(self, holder: OfflineHolder) -> None:
        self._set(holder, None)

    def _set(self, holder: OfflineHolder, reason: Optional[str]) -> None:
        with self._lock:
            was_held, before = bool(self._reasons), set(self._reasons)
            if reason is None:
                self._reasons.pop(holder, None)
            else:
                self._reasons[holder] = reason
            if bool(self._reasons) != was_held:
                # under our lock: two holders changing at once never leave the line in the other's state
                self.target.set_online(not self._reasons)
            changed = set(self._reasons) != before
        if changed:
            for listener in list(self._listeners):
                try:
                    listener()
                except Exception:   # a listener's bug must not leave the holders half told
                    logger.exception("line offline: listener failed")

    @property
    def held(self) -> bool:
        """The line is offline (some holder holds it)."""
        return bool(self._reasons)

    def held_by_another(self, holder: OfflineHolder) -> bool:
        """A holder other than ``holder`` holds the line offline."""
        with self._lock:
            return any(h is not holder for h in self._reasons)

    def reasons(self) -> Dict[OfflineHolder, str]:
        with self._lock:
            return dict(self._reasons)

    def describe(self) -> str:
        """'Modbus Set Offline = 1; OPC UA VisionStateMachine Halted' (for logs and refusals)."""
        return "; ".join(reason for reason in self.reasons().values()) or "online"

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)
