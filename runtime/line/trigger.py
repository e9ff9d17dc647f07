"""The one trigger API: what every trigger source (a CLI/line-file test driver, the Modbus map, the
OPC UA server, a hardware I/O) calls on a line running in triggered mode.

The part runner (runtime/line/parts.py) implements it; adapters depend on this protocol only, so a
PLC adapter never reaches into the runner. Results come back to every LineObserver as ``on_part``
(runtime/outputs/base.py ``PartResult``), in trigger order, each carrying its inspection id and the
part id given here.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

from mrkd.runtime.outputs.base import TriggerReceipt


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
