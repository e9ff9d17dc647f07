"""The real part runner judging a folder of parts with the tiny model, behind the Modbus server, driven
with Debian's mbpoll (libmodbus) as a PLC programmer following docs/PLC.md would:
- a refused trigger: Trigger Ready never invites a write that cannot trigger (Trigger still 1 after a
  refusal), and a trigger the line refuses while a PLC holds it offline is counted by the line, not
  by the PLC alone;
- the end of a run: a part the PLC got Trigger Ack for is still judged and its result readable."""

from __future__ import annotations

import pytest

from peers import require_program
from plc_fixtures import folder_cell

from mrkd.benchmarks.plc_peer import (DI, INPUT_COUNT, PART_ID, RESULTS_ACK, SET_OFFLINE, TRIGGER, TRIGGER_ENABLE,
                                      Reading, mbpoll)
from mrkd.runtime.outputs.base import LineObserver
from mrkd.runtime.plc.modbus import ModbusPlc

pytest.importorskip("pymodbus", reason="SKIPPED, NOT TESTED: pymodbus missing (pip install 'mrkd[plc]')")

MISSED_TRIGGERS = 12        # input registers 12-13, uint32 high word first


class Receipts(LineObserver):
    """Every trigger receipt the line reports to its outputs."""

    def __init__(self):
        self.receipts = []

    def on_trigger(self, receipt):
        self.receipts.append(receipt)


@pytest.fixture
def cell(tmp_path):
    require_program("mbpoll", ["mbpoll"])
    receipts = Receipts()
    runner = folder_cell(tmp_path, "gggg", [receipts])
    plc = ModbusPlc(runner, port=0).start()
    runner.observers.append(plc)
    runner.start()
    state = {"summary": None}

    def stop():
        state["summary"] = runner.stop()
        return state["summary"]

    yield plc.address[1], receipts, stop
    if state["summary"] is None:
        runner.stop()


def write(port, table, ref, value):
    rc, _, err = mbpoll(port, table, ref, write=[value])
    assert rc == 0, err


def bits(port):
    rc, values, err = mbpoll(port, "1", 0, 10)
    assert rc == 0, err
    return {name: int(values[i]) for name, i in DI.items()}


def missed(port):
    rc, values, err = mbpoll(port, "3", MISSED_TRIGGERS, 2)
    assert rc == 0, err
    return int(values[0]) << 16 | int(values[1])


def test_trigger_ready_stays_0_while_a_refused_trigger_is_still_1(cell):
    port, _, _ = cell
    write(port, "4", PART_ID, 17)
    write(port, "0", TRIGGER, 1)                 # Trigger Enable is 0: refused
    assert bits(port)["missed_trigger"] == 1 and missed(port) == 1
    write(port, "0", TRIGGER_ENABLE, 1)
    state = bits(port)
    # Trigger is still 1: writing it 1 again makes no edge, so no trigger could be accepted now
    assert state["trigger_ready"] == 0 and state["trigger_ack"] == 0
    write(port, "0", TRIGGER, 0)
    assert bits(port)["trigger_ready"] == 1
    write(port, "0", TRIGGER, 1)
    assert bits(port)["trigger_ack"] == 1


def test_a_trigger_refused_while_the_plc_holds_the_line_offline_is_the_lines_missed_trigger(cell):
    port, receipts, stop = cell
    write(port, "0", TRIGGER_ENABLE, 1)
    write(port, "0", SET_OFFLINE, 1)
    write(port, "4", PART_ID, 21)
    write(port, "0", TRIGGER, 1)
    state = bits(port)
    assert state["online"] == 0 and state["trigger_ack"] == 0 and state["missed_trigger"] == 1
    assert missed(port) == 1                     # counted once, not once by the PLC and once by the line
    refused = [r for r in receipts.receipts if not r.accepted]
    assert [(r.part_id, r.reason) for r in refused] == [("21", "offline")]    # every output hears of it
    write(port, "0", TRIGGER, 0)
    write(port, "0", SET_OFFLINE, 0)
    summary = stop()
    assert summary["missed_triggers"] == 1 and summary["parts"] == 0


def wait_bits(port, predicate, timeout=10.0):
    import time
    deadline = time.monotonic() + timeout
    while True:
        state = bits(port)
        if predicate(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.02)


@pytest.mark.parametrize("acknowledged", [True, False])
def test_a_part_acknowledged_before_the_run_ends_still_gets_its_readable_result(cell, acknowledged):
    """The server closed as the run ended (within ~0.3 s of SIGTERM): a part accepted just before was
    judged, but its result never became readable. Now the server answers until the PLC acknowledges
    every result, at most ModbusPlc.RESULTS_LINGER_S, with Online 0 and triggers refused."""
    import threading
    import time
    from mrkd.runtime.plc.modbus import ModbusPlc
    port, _, stop = cell
    write(port, "0", TRIGGER_ENABLE, 1)
    write(port, "4", PART_ID, 31)
    write(port, "0", TRIGGER, 1)
    assert bits(port)["trigger_ack"] == 1
    write(port, "0", TRIGGER, 0)
    ended = {}
    stopping = threading.Thread(target=lambda: ended.update(summary=stop(), at=time.monotonic()))
    began = time.monotonic()
    stopping.start()          # the run ends before the PLC has read the result
    # both: the part may be judged (Results Valid) before the stop has reached the server (Online 0)
    state = wait_bits(port, lambda s: s["results_valid"] == 1 and s["online"] == 0)
    assert state["results_valid"] == 1 and state["online"] == 0 and state["trigger_ready"] == 0, state
    rc, values, err = mbpoll(port, "3", 0, INPUT_COUNT)
    assert rc == 0, err
    reading = Reading.of([int(v) for v in values])
    assert (reading.part_id, reading.inspection_id) == (31, 1), reading
    write(port, "4", PART_ID, 32)
    write(port, "0", TRIGGER, 1)                  # the line has ended: refused, never a part
    assert bits(port)["trigger_ack"] == 0
    if acknowledged:
        write(port, "0", RESULTS_ACK, 1)
        stopping.join(ModbusPlc.RESULTS_LINGER_S)
        assert not stopping.is_alive() and ended["at"] - began < ModbusPlc.RESULTS_LINGER_S
    else:
        stopping.join(ModbusPlc.RESULTS_LINGER_S + 5)      # bounded: a PLC that never acknowledges
        assert not stopping.is_alive() and ended["at"] - began >= ModbusPlc.RESULTS_LINGER_S
    assert ended["summary"]["parts"] == 1
    with pytest.raises(AssertionError):           # and then the server is gone
        bits(port)
