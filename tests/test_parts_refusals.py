"""Refused triggers in the part runner: a storm of them, from many threads at once, behind a stalled
output or a stalled log handler, never reorders, loses or double-counts one, never holds the trigger
caller (a PLC server's event loop) back, and never grows the outputs' queue past its bound.

The real part runner judging a folder with the tiny model, its real parts log read back: its missed
lines, each ``count`` triggers from ``sequence`` on (1 unless folded), and its part lines together name
every trigger's sequence once, and the missed lines' sequences increase."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import List

from plc_fixtures import folder_cell

from mrkd.runtime.outputs.base import LineObserver
from mrkd.runtime.outputs.parts_log import PartsLogOutput

QUICK_S = 1.0        # a trigger is answered well within this, whatever the outputs or the log do


def read_log(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def missed_sequences(records: List[dict]) -> List[int]:
    """The sequences the missed lines stand for, in the file's order."""
    return [record["sequence"] + i for record in records if record["kind"] == "missed"
            for i in range(record.get("count", 1))]


def hold_the_grab(runner) -> threading.Event:
    """The camera gives no image until the returned event is set: the part in hand (and the queue behind
    it) stays, so every trigger past the queue is refused "queue full"."""
    go = threading.Event()
    camera = runner.cameras[0]
    grab = camera.grabber.grab

    def held(*args, **kwargs):
        go.wait(30)
        return grab(*args, **kwargs)

    camera.grabber.grab = held
    return go


class RefusalCount(LineObserver):
    """Sums the refused triggers the outputs are told of (a folded receipt stands for ``count``)."""

    def __init__(self):
        self.refused = 0

    def on_trigger(self, receipt) -> None:
        if not receipt.accepted:
            self.refused += getattr(receipt, "count", 1)


class StalledTriggers(LineObserver):
    """An output whose on_trigger hangs until released: a parts log on a share that stalls."""

    def __init__(self):
        self.release = threading.Event()

    def on_trigger(self, receipt) -> None:
        self.release.wait(60)


class BlockingHandler(logging.Handler):
    """stderr as a pipe nobody reads: every record blocks until released."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.unblock = threading.Event()       # (not "release": a Handler's lock method)
        self.entered = threading.Event()       # a record is blocked in it
        self.records: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.entered.set()
        self.unblock.wait(60)
        self.records.append(record.getMessage())


def test_missed_lines_follow_the_sequence_when_many_threads_are_refused_at_once(tmp_path):
    log_path = tmp_path / "parts.jsonl"
    runner = folder_cell(tmp_path, "gg", [PartsLogOutput(log_path)], queue=1)
    go = hold_the_grab(runner)
    runner.start()
    try:
        assert runner.trigger("a").accepted and runner.trigger("b").accepted     # in hand, and waiting
        threads, each = 8, 60
        barrier = threading.Barrier(threads)
        receipts: list = []

        def storm() -> None:
            barrier.wait()
            receipts.extend(runner.trigger() for _ in range(each))

        workers = [threading.Thread(target=storm) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert len(receipts) == threads * each and not any(r.accepted for r in receipts)
    finally:
        go.set()
        summary = runner.stop()
    total = 2 + threads * each
    assert summary["triggers"] == total and summary["missed_triggers"] == threads * each
    records = read_log(log_path)
    missed = missed_sequences(records)
    assert missed == sorted(missed), "missed lines out of sequence order"
    parts = [r["sequence"] for r in records if r["kind"] == "part"]
    assert parts == [1, 2]
    assert sorted(parts + missed) == list(range(1, total + 1))      # each trigger once


def test_a_stalled_log_handler_never_holds_a_trigger_back_and_every_refusal_is_counted(tmp_path):
    log_path = tmp_path / "parts.jsonl"
    counted = RefusalCount()
    runner = folder_cell(tmp_path, "g", [PartsLogOutput(log_path), counted])
    handler = BlockingHandler()
    logger = logging.getLogger("mrkd.runtime.line.parts")
    runner.start()
    runner.set_online(False)        # every trigger is refused (as the Modbus PLC's Set Offline does)
    logger.addHandler(handler)
    storm = 500
    try:
        done = threading.Event()
        took: list = []

        def triggers() -> None:
            for _ in range(storm):
                started = time.monotonic()
                runner.trigger()
                took.append(time.monotonic() - started)
            done.set()

        caller = threading.Thread(target=triggers, daemon=True)     # the PLC server's loop
        caller.start()
        assert handler.entered.wait(10), "no refusal was logged"      # the log is stalled from here on
        assert done.wait(10), f"a trigger waited for the log handler ({len(took)} of {storm} answered)"
        assert max(took) < QUICK_S
    finally:
        handler.unblock.set()
        logger.removeHandler(handler)
    summary = runner.stop()
    assert summary["triggers"] == storm and summary["missed_triggers"] == storm
    assert counted.refused == storm
    missed = missed_sequences(read_log(log_path))
    assert missed == list(range(1, storm + 1))
    assert handler.records and any("refused" in message for message in handler.records)


def offline_behind_a_stalled_output(tmp_path, stalled_first: bool):
    """A started cell, offline (every trigger refused), whose outputs are a parts log, a refusal count
    and an output stalled on refused triggers (first, so that the report it holds reaches no other
    output, or last); returns (runner, stalled, counted, the parts log's path)."""
    log_path = tmp_path / "parts.jsonl"
    stalled, counted = StalledTriggers(), RefusalCount()
    others = [PartsLogOutput(log_path), counted]
    runner = folder_cell(tmp_path, "g", [stalled, *others] if stalled_first else [*others, stalled])
    runner.start()
    runner.set_online(False)
    return runner, stalled, counted, log_path


def test_refusals_behind_a_stalled_output_fold_into_counted_lines_within_the_bound(tmp_path):
    runner, stalled, counted, log_path = offline_behind_a_stalled_output(tmp_path, stalled_first=False)
    storm = 5000
    try:
        for _ in range(storm):
            runner.trigger()
        waiting = runner._notifier.waiting
        bound = runner._notifier.max_waiting
        assert waiting <= bound + 1, f"{waiting} calls wait for the outputs (bound {bound})"
    finally:
        stalled.release.set()
    summary = runner.stop()
    assert summary["missed_triggers"] == storm and counted.refused == storm
    records = read_log(log_path)
    assert missed_sequences(records) == list(range(1, storm + 1))
    assert len(records) <= bound + 2              # folded: far fewer lines than triggers, none lost
    folded = [r for r in records if r.get("count", 1) > 1]
    assert folded and all(r["reason"] == "offline" for r in folded)


def test_a_folded_report_given_up_at_the_stop_counts_every_trigger_it_stands_for(tmp_path, monkeypatch):
    """The stop gives up the reports still waiting behind an output stalled through it: the summary
    counted calls, while one folded report stands for ``count`` refused triggers. What the outputs were
    told plus what was given up is now every refused trigger, exactly."""
    monkeypatch.setattr("mrkd.runtime.line.parts.OUTPUTS_DRAIN_S", 0.5)
    # stalled first: the report it holds reaches no other output (cut short)
    runner, stalled, counted, log_path = offline_behind_a_stalled_output(tmp_path, stalled_first=True)
    storm = 5000
    try:
        for _ in range(storm):
            runner.trigger()
        summary = runner.stop()           # stalled through the stop: the waiting reports are given up
    finally:
        stalled.release.set()
    assert summary["missed_triggers"] == storm and counted.refused == 0
    assert missed_sequences(read_log(log_path)) == []
    calls = summary["outputs_given_up"]
    assert 1 < calls <= runner._notifier.max_waiting + 1          # calls: the stalled one and those waiting
    assert summary["outputs_given_up_refused_triggers"] == storm   # folded: far more triggers than calls
