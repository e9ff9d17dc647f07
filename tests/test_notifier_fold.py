"""The Notifier's bound for calls nobody waits for: past ``max_waiting`` a call is folded into a waiting
one that absorbs it, only ever past calls whose order does not matter, so the calls still run in the
order they were handed over (a folded one where it was absorbed) and none is lost."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import List

from mrkd.runtime.line.handover import MissedTriggers, StatusReport
from mrkd.runtime.outputs.base import CameraStatus, TriggerReceipt
from mrkd.runtime.outputs.notifier import Notifier


@dataclass
class Run:
    """A foldable call: consecutive numbers fold into one run."""

    ran: List[tuple]
    first: int
    last: int = 0
    orderless = False

    def __post_init__(self):
        self.last = self.last or self.first

    def absorb(self, newer) -> bool:
        if isinstance(newer, Run) and newer.first == self.last + 1:
            self.last = newer.last
            return True
        return False

    def __call__(self):
        self.ran.append(("run", self.first, self.last))


@dataclass
class Plain:
    ran: List[tuple]
    name: str

    def __call__(self):
        self.ran.append(("plain", self.name))


@dataclass
class Latest:
    """An orderless call (a status): the newest wins."""

    ran: List[tuple]
    value: int
    orderless = True

    def absorb(self, newer) -> bool:
        if isinstance(newer, Latest):
            self.value = newer.value
            return True
        return False

    def __call__(self):
        self.ran.append(("latest", self.value))


def held_notifier(max_waiting: int):
    """A notifier whose first call blocks until the returned event is set (a stalled output)."""
    notifier = Notifier("test", max_waiting=max_waiting)
    go, running = threading.Event(), threading.Event()

    def stall():
        running.set()
        go.wait(10)
    notifier.put(stall)
    assert running.wait(5)
    return notifier, go


def test_under_the_bound_nothing_folds():
    ran: List[tuple] = []
    notifier, go = held_notifier(max_waiting=10)
    for n in range(1, 6):
        notifier.put(Run(ran, n))
    assert notifier.waiting == 5
    go.set()
    assert notifier.wait_idle(5)
    assert ran == [("run", n, n) for n in range(1, 6)]


def test_past_the_bound_a_run_folds_and_keeps_its_place():
    ran: List[tuple] = []
    notifier, go = held_notifier(max_waiting=2)
    notifier.put(Run(ran, 1))
    notifier.put(Run(ran, 2))
    for n in range(3, 1000):
        notifier.put(Run(ran, n))
    assert notifier.waiting == 2
    notifier.put(Plain(ran, "part"))         # an ordered call: the runs after it never fold past it
    notifier.put(Run(ran, 1000))
    notifier.put(Run(ran, 1001))
    notifier.put(Latest(ran, 1))             # orderless: the run after it folds past it
    notifier.put(Run(ran, 1002))
    notifier.put(Latest(ran, 2))             # folds into the waiting one, past the run
    assert notifier.waiting == 5
    go.set()
    assert notifier.wait_idle(5)
    assert ran == [("run", 1, 1), ("run", 2, 999), ("plain", "part"), ("run", 1000, 1002), ("latest", 2)]


def test_a_gap_in_the_sequence_never_folds():
    """Refusals 1 and 3 with trigger 2 accepted between: two reports, never one standing for 2."""
    told: list = []
    notifier, go = held_notifier(max_waiting=1)

    def missed(sequence):
        receipt = TriggerReceipt(False, sequence, f"p{sequence}", "queue full", 0.0)
        return MissedTriggers(receipt, lambda call: told.append(call), sequence)
    notifier.put(missed(1))
    notifier.put(missed(3))
    notifier.put(missed(4))
    assert notifier.waiting == 2
    go.set()
    assert notifier.wait_idle(5)

    class Recorder:
        def __init__(self):
            self.receipts = []

        def on_trigger(self, receipt):
            self.receipts.append(receipt)
    recorder = Recorder()
    for call in told:
        call(recorder)
    assert [(r.sequence, r.count, r.part_id) for r in recorder.receipts] == [(1, 1, "p1"), (3, 2, "p3")]


def test_folded_refusals_of_different_reasons_keep_each_count_and_statuses_keep_the_newest():
    told: list = []
    first = MissedTriggers(TriggerReceipt(False, 5, "a", "queue full", 0.0), told.append, 1)
    assert first.absorb(MissedTriggers(TriggerReceipt(False, 6, "b", "offline", 0.0), told.append, 2))
    assert first.absorb(MissedTriggers(TriggerReceipt(False, 7, "c", "queue full", 0.0), told.append, 3))
    receipt = first.receipt()
    assert (receipt.sequence, receipt.count, receipt.part_id, first.missed) == (5, 3, "a", 3)
    assert receipt.reason == "queue full (2); offline (1)"
    report = StatusReport({"cam1": CameraStatus("cam1", up=False, frames=1)}, told.append)
    assert report.absorb(StatusReport({"cam2": CameraStatus("cam2", up=True)}, told.append))
    assert report.absorb(StatusReport({"cam1": CameraStatus("cam1", up=True, frames=9)}, told.append))
    assert list(report.statuses) == ["cam1", "cam2"] and report.statuses["cam1"].frames == 9
