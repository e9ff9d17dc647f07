"""The part runner's calls to its outputs that the notifier may fold while the outputs are far behind.

A refused trigger is answered on the trigger caller's thread (a PLC server's event loop) and its report
to the outputs is handed to the runner's ``Notifier`` (runtime/outputs/notifier.py); nothing waits for
room there, as the refusal holds no images. So a storm of refusals behind a stalled output (a parts log
on a share that hangs) would grow the queue without limit; past the notifier's bound a run of refusals
with consecutive sequences is folded into one report instead: one ``TriggerReceipt`` whose ``count``
says how many triggers it stands for (``sequence`` .. ``sequence + count - 1``), its part id the first's,
its reason theirs (each with its count where they differ). No refusal is lost or counted twice, and the
reports keep the order of the sequences. The PLC servers are told of each refusal on the spot, never
folded. The warning a refusal is logged with is written here too, on the notifier's thread: a stalled
stderr (a pipe nobody reads) holds back the outputs, never the PLC's loop.

A camera's status is running totals and its up/down state: past the bound a newer one replaces the
one still waiting (the outputs see the newest; a short down and up again while they are that far
behind is then seen by the log line the runner writes, not by them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Dict

from mrkd.runtime.outputs.base import CameraStatus, LineObserver, TriggerReceipt

logger = logging.getLogger("mrkd.runtime.line.parts")     # the runner's own records, as before

# Calls ``call(output)`` for every output but the PLC servers, one at a time (the runner's _tell_each).
Tell = Callable[[Callable[[LineObserver], object]], None]


@dataclass
class MissedTriggers:
    """The report of one refused trigger, or of a run of them folded together (module docstring)."""

    first: TriggerReceipt
    tell: Tell
    missed: int                   # the line's missed triggers so far, this one (the last folded) included
    last_sequence: int = 0
    reasons: Dict[str, int] = field(default_factory=dict)
    orderless = False

    def __post_init__(self) -> None:
        self.last_sequence = self.last_sequence or self.first.sequence
        self.reasons = self.reasons or {str(self.first.reason): 1}

    @property
    def count(self) -> int:
        return self.last_sequence - self.first.sequence + 1

    @property
    def refused_triggers(self) -> int:
        """What the notifier counts when it gives this report up (every trigger, not one call)."""
        return self.count

    def absorb(self, newer: object) -> bool:
        """Fold ``newer`` in when it is the refusal right after this run (no trigger between them)."""
        if not isinstance(newer, MissedTriggers) or newer.first.sequence != self.last_sequence + 1:
            return False
        self.last_sequence = newer.last_sequence
        self.missed = newer.missed
        for reason, count in newer.reasons.items():
            self.reasons[reason] = self.reasons.get(reason, 0) + count
        return True

    def receipt(self) -> TriggerReceipt:
        if self.count == 1:
            return self.first
        reason = next(iter(self.reasons)) if len(self.reasons) == 1 else \
            "; ".join(f"{reason} ({count})" for reason, count in self.reasons.items())
        return replace(self.first, reason=reason, count=self.count)

    def __call__(self) -> None:
        receipt = self.receipt()
        if receipt.count == 1:
            logger.warning("trigger %d (part %s) refused: %s (%d missed)", receipt.sequence, receipt.part_id,
                           receipt.reason, self.missed)
        else:
            logger.warning("triggers %d-%d (%d, the first part %s) refused while the outputs were far behind: "
                           "%s (%d missed)", receipt.sequence, self.last_sequence, receipt.count, receipt.part_id,
                           receipt.reason, self.missed)
        self.tell(lambda output: output.on_trigger(receipt))


@dataclass
class StatusReport:
    """The statuses of cameras, one each (the newest where folded), told in the order they first came."""

    statuses: Dict[str, CameraStatus]
    tell: Tell
    orderless = True

    def absorb(self, newer: object) -> bool:
        if not isinstance(newer, StatusReport):
            return False
        self.statuses.update(newer.statuses)
        return True

    def __call__(self) -> None:
        for status in self.statuses.values():
            self.tell(lambda output, status=status: output.on_status(status))
