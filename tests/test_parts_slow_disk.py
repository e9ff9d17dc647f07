"""A slow disk under the parts log never delays a PLC's trigger or its answer, and loses no line.

The real part runner behind the real Modbus server, wired as `mrkd run` wires it, with the real parts
log whose every write takes SLOW_S seconds (a disk or network share that stalls on fsync), driven by
Debian's mbpoll (libmodbus): a second trigger while the first part's line is still being written, and a
refused trigger (the PLC holds the line offline) while the second's is, are each answered at once; the
second part's Results Valid comes as fast as the model allows; after a normal stop the log has every
trigger's line, in order."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from peers import require_program
from plc_fixtures import folder_cell

from mrkd.benchmarks.plc_peer import DI, RESULTS_ACK, SET_OFFLINE, TRIGGER, TRIGGER_ENABLE, mbpoll
from mrkd.runtime.outputs.base import LineObserver
from mrkd.runtime.outputs.events import EventLogOutput, read_events
from mrkd.runtime.outputs.parts_log import PartsLog, PartsLogOutput
from mrkd.runtime.outputs.snapshots import SnapshotWriter

pytest.importorskip("pymodbus", reason="SKIPPED, NOT TESTED: pymodbus missing (pip install 'mrkd[plc]')")

SLOW_S = 2.0
QUICK_S = 0.5


class SlowDiskPartsLog(PartsLog):
    """The parts log on a disk whose every write stalls SLOW_S seconds before it lands."""

    def write(self, event: dict) -> None:
        time.sleep(SLOW_S)
        super().write(event)


class SlowDiskPartsLogOutput(PartsLogOutput):
    log_class = SlowDiskPartsLog


def timed_write(port: int, ref: int, value: int) -> float:
    """Seconds mbpoll took to write one coil (the server answers a write once it has handled it)."""
    started = time.monotonic()
    rc, _, err = mbpoll(port, "0", ref, write=[value])
    assert rc == 0, err
    return time.monotonic() - started


def wait_input(port: int, name: str, level: int, since: float) -> float:
    """Seconds from ``since`` until discrete input ``name`` reads ``level``."""
    while True:
        rc, values, err = mbpoll(port, "1", 0, len(DI))
        assert rc == 0, err
        if int(values[DI[name]]) == level:
            return time.monotonic() - since
        assert time.monotonic() - since < 30, f"{name} never became {level}"
        time.sleep(0.01)


def test_a_slow_parts_log_delays_no_trigger_and_no_answer_and_keeps_every_line(tmp_path):
    require_program("mbpoll", ["mbpoll"])
    from mrkd.runtime.plc.modbus import ModbusPlc
    log_path = tmp_path / "parts.jsonl"
    parts_log = SlowDiskPartsLogOutput(log_path)
    runner = folder_cell(tmp_path, "gg", [parts_log])
    plc = ModbusPlc(runner, port=0).start()
    runner.observers.append(plc)           # as runtime/cli.py run_parts adds the PLC servers
    runner.start()
    try:
        port = plc.address[1]
        assert timed_write(port, TRIGGER_ENABLE, 1) < QUICK_S
        first = time.monotonic()
        assert timed_write(port, TRIGGER, 1) < QUICK_S
        assert wait_input(port, "results_valid", 1, first) < QUICK_S
        for ref, value in ((TRIGGER, 0), (RESULTS_ACK, 1), (RESULTS_ACK, 0)):
            assert timed_write(port, ref, value) < QUICK_S
        assert time.monotonic() - first < SLOW_S / 2       # the first part's line is still being written

        second = time.monotonic()
        took = timed_write(port, TRIGGER, 1)
        assert took < QUICK_S, f"the second trigger's write took {took:.2f} s behind the slow parts log"
        answered = wait_input(port, "results_valid", 1, second)
        assert answered < QUICK_S, f"the second part's Results Valid came {answered:.2f} s after its trigger"
        rc, values, err = mbpoll(port, "1", 0, len(DI))
        assert rc == 0 and int(values[DI["trigger_ack"]]) == 1, err

        assert timed_write(port, SET_OFFLINE, 1) < QUICK_S
        assert timed_write(port, TRIGGER, 0) < QUICK_S
        took = timed_write(port, TRIGGER, 1)     # refused (offline): its missed line is written too
        assert took < QUICK_S, f"a refused trigger's write took {took:.2f} s behind the slow parts log"
        assert wait_input(port, "missed_trigger", 1, time.monotonic()) < QUICK_S
        assert timed_write(port, SET_OFFLINE, 0) < QUICK_S
        assert not log_path.exists() or len(log_path.read_bytes().splitlines()) < 3   # still being written
    finally:
        summary = runner.stop()
    records = [json.loads(line) for line in log_path.read_bytes().splitlines()]
    assert [(r["kind"], r["sequence"]) for r in records] == [("part", 1), ("part", 2), ("missed", 3)]
    assert [r.get("verdict") for r in records] == ["OK", "OK", None] and records[2]["reason"] == "offline"
    assert summary["triggers"] == 3 and summary["missed_triggers"] == 1
    health = parts_log.health()
    assert (health.sent, health.failed, health.dropped) == (3, 0, 0)


def test_the_notifier_keeps_order_and_counts_what_a_stalled_output_makes_it_give_up():
    from mrkd.runtime.outputs.notifier import Notifier
    notifier = Notifier("test-outputs", max_waiting=2)
    made, release = [], threading.Event()
    notifier.put(lambda: release.wait(5))          # an output stalled on its disk
    started = time.monotonic()
    for number in range(2):
        notifier.put(lambda number=number: made.append(number))
    assert time.monotonic() - started < 0.1        # handing over never waits for the stalled call
    waited = time.monotonic()
    release_later = threading.Timer(0.3, release.set)
    release_later.start()
    notifier.wait_for_room()                       # two waiting: room only once the stall ends
    assert time.monotonic() - waited >= 0.25
    assert notifier.wait_idle(5) and made == [0, 1]

    stuck = threading.Event()
    notifier.put(lambda: stuck.wait(5))
    notifier.put(lambda: made.append(2))
    # the stuck call (cut short: its caller skips the outputs not reached, see `closed`) and the one waiting
    assert notifier.close(0.2) == 2 and notifier.given_up == 2 and notifier.closed
    notifier.put(lambda: made.append(3))           # after the stop: not made, counted
    stuck.set()
    time.sleep(0.1)
    assert made == [0, 1] and notifier.given_up == 3


class SlowDiskSnapshots(SnapshotWriter):
    """Snapshots on a disk whose every write stalls SLOW_S seconds."""

    def _write(self, *args, **kwargs):
        time.sleep(SLOW_S)
        return super()._write(*args, **kwargs)


def test_an_ng_part_is_answered_before_its_snapshot_is_written_and_the_event_names_it(tmp_path):
    require_program("mbpoll", ["mbpoll"])
    from mrkd.runtime.plc.modbus import ModbusPlc
    events = tmp_path / "events.jsonl"
    outputs = [SlowDiskSnapshots(tmp_path / "snapshots"), EventLogOutput(events)]
    runner = folder_cell(tmp_path, "d", outputs)
    plc = ModbusPlc(runner, port=0).start()
    runner.observers.append(plc)
    runner.start()
    try:
        port = plc.address[1]
        assert timed_write(port, TRIGGER_ENABLE, 1) < QUICK_S
        triggered = time.monotonic()
        assert timed_write(port, TRIGGER, 1) < QUICK_S
        answered = wait_input(port, "results_valid", 1, triggered)
        assert answered < QUICK_S, f"the NG part's Results Valid came {answered:.2f} s after its trigger"
        rc, values, err = mbpoll(port, "1", 0, len(DI))
        assert rc == 0 and int(values[DI["part_ng"]]) == 1, err
        assert not list((tmp_path / "snapshots").rglob("*.*"))     # its snapshot is still being written
        assert timed_write(port, RESULTS_ACK, 1) < QUICK_S
    finally:
        runner.stop()
    [event] = read_events(events)
    assert event["verdict"] == "NG" and Path(event["cameras"][0]["snapshot"]).is_file()


class AnswerTimes(LineObserver):
    """Stands where a PLC server stands (told first, ``answers_plc``): when each part's verdict reached it."""

    answers_plc = True

    def __init__(self):
        self.at, self.verdict_s = {}, {}

    def on_part(self, result) -> None:
        self.at[result.sequence] = time.monotonic()
        self.verdict_s[result.sequence] = result.verdict_s


def test_outputs_far_behind_hold_back_the_next_part_not_the_plcs_answer(tmp_path):
    """With the notifier's queue full behind a stalled parts log, the runner waits before judging on,
    but only after the PLC has had the part just judged (before, it waited first: the OK/NG waited for
    the disk)."""
    log_path = tmp_path / "parts.jsonl"
    plc = AnswerTimes()
    runner = folder_cell(tmp_path, "ggg", [SlowDiskPartsLogOutput(log_path), plc])
    runner._notifier.max_waiting = 1       # the queue's bound reached at the second part, not the 64th
    runner.start()
    try:
        triggered = {}
        for sequence in (1, 2, 3):
            triggered[sequence] = time.monotonic()
            assert runner.trigger().accepted
        deadline = time.monotonic() + 3 * SLOW_S + 10
        while len(plc.at) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(plc.at) == [1, 2, 3]
        # Part 1's line stalls the notifier for SLOW_S and part 2's call waits behind it (the bound), so
        # part 3 is judged late; yet every part reaches the PLC as soon as it is judged.
        assert plc.at[3] - triggered[3] >= SLOW_S / 2, "the bound did not hold the runner back"
        for sequence in (1, 2, 3):
            judged = triggered[sequence] + plc.verdict_s[sequence]
            assert plc.at[sequence] - judged < SLOW_S / 4, f"part {sequence}'s answer waited for the outputs"
    finally:
        runner.stop()
    records = [json.loads(line) for line in log_path.read_bytes().splitlines()]
    assert [r["sequence"] for r in records] == [1, 2, 3]


class LingeringPlc(AnswerTimes):
    """A PLC server whose stop lingers for the PLC's last acknowledgement, as the Modbus server's does;
    a trigger arrives meanwhile."""

    def __init__(self, runner_box: list):
        super().__init__()
        self.runner_box = runner_box
        self.receipts = []

    def on_trigger(self, receipt) -> None:
        self.receipts.append(receipt)

    def on_stop(self) -> None:
        self.runner_box[0].trigger("late")     # refused: the line is stopping
        time.sleep(0.2)


def test_a_trigger_while_the_plc_server_lingers_at_the_stop_is_a_missed_line(tmp_path):
    log_path = tmp_path / "parts.jsonl"
    box: list = []
    plc = LingeringPlc(box)
    runner = folder_cell(tmp_path, "g", [PartsLogOutput(log_path), plc])
    box.append(runner)
    runner.start()
    assert runner.trigger("first").accepted
    deadline = time.monotonic() + 30
    while not plc.at and time.monotonic() < deadline:
        time.sleep(0.01)
    summary = runner.stop()
    assert [r.accepted for r in plc.receipts] == [True, False]
    records = [json.loads(line) for line in log_path.read_bytes().splitlines()]
    assert [(r["kind"], r["part_id"]) for r in records] == [("part", "first"), ("missed", "late")]
    assert summary["triggers"] == 2 and summary["missed_triggers"] == 1
    assert summary.get("outputs_given_up", 0) == 0


class StalledOutput(LineObserver):
    """An output whose on_part never returns until released: a disk or share that hangs."""

    def __init__(self):
        self.release = threading.Event()

    def on_part(self, result) -> None:
        self.release.wait(60)


class CallsAfterStop(LineObserver):
    """Records on_part calls that come after its on_stop."""

    def __init__(self):
        self.stopped = False
        self.after_stop = []

    def on_part(self, result) -> None:
        if self.stopped:
            self.after_stop.append(result.sequence)

    def on_stop(self) -> None:
        self.stopped = True


def test_the_stop_ends_within_its_deadlines_behind_a_hung_output(tmp_path, monkeypatch):
    """Outputs hung and far behind (the queue's bound reached), parts still waiting: the stop reports them
    and returns within its drain and the outputs' deadline (before, the runner and the stop both waited
    for room behind the hung output, forever); what it gave up is counted."""
    monkeypatch.setattr("mrkd.runtime.line.parts.OUTPUTS_DRAIN_S", 0.5)
    hung = StalledOutput()
    runner = folder_cell(tmp_path, "gggggg", [hung])
    runner._notifier.max_waiting = 1
    runner.start()
    try:
        for _ in range(4):
            assert runner.trigger().accepted
        time.sleep(1.0)                    # part 1 hangs in the output, part 2 waits: the runner is held back
        done = {}
        stopping = threading.Thread(target=lambda: done.setdefault("summary", runner.stop(drain_s=0.5)),
                                    daemon=True)
        started = time.monotonic()
        stopping.start()
        stopping.join(15)
        assert not stopping.is_alive(), "the stop hung behind a hung output"
        assert time.monotonic() - started < 10
        summary = done["summary"]
        assert summary["outputs_given_up"] >= 1
        assert sum(summary["verdicts"].values()) == 4          # every accepted part judged or reported
    finally:
        hung.release.set()


def test_no_output_is_called_after_its_on_stop_when_the_drain_runs_out(tmp_path, monkeypatch):
    monkeypatch.setattr("mrkd.runtime.line.parts.OUTPUTS_DRAIN_S", 0.5)
    hung, recorder = StalledOutput(), CallsAfterStop()
    runner = folder_cell(tmp_path, "gg", [hung, recorder])
    runner.start()
    assert runner.trigger().accepted
    time.sleep(1.0)                        # part 1's call hangs in the first output
    summary = runner.stop(drain_s=2)
    assert recorder.stopped and summary["outputs_given_up"] == 1     # the call cut short is counted
    hung.release.set()                     # the hung call returns after the stop...
    time.sleep(0.5)
    assert recorder.after_stop == []       # ...and tells no output after its on_stop (before: [1])
