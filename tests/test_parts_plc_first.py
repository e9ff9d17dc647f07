"""A part's result reaches the PLC before any other output is told of it: an output that takes its time
in ``on_part`` (a parts log fsyncing to a slow disk, the events log) must not hold back Results Valid.
The real part runner behind the real Modbus server, wired as `mrkd run` wires it (the server added to
the runner's outputs after the line's own), driven by Debian's mbpoll (libmodbus)."""

from __future__ import annotations

import time

import pytest

from peers import require_program
from plc_fixtures import folder_cell

from mrkd.benchmarks.plc_peer import DI, TRIGGER, TRIGGER_ENABLE, mbpoll
from mrkd.runtime.outputs.base import LineObserver

pytest.importorskip("pymodbus", reason="SKIPPED, NOT TESTED: pymodbus missing (pip install 'mrkd[plc]')")

SLOW_S = 2.0


class SlowDisk(LineObserver):
    """An output whose every part takes SLOW_S seconds (a file on a disk that stalls)."""

    def __init__(self):
        self.done_at = []

    def on_part(self, result):
        time.sleep(SLOW_S)
        self.done_at.append(time.monotonic())


def test_the_plc_has_its_result_while_a_slow_output_still_writes(tmp_path):
    require_program("mbpoll", ["mbpoll"])
    from mrkd.runtime.plc.modbus import ModbusPlc
    slow = SlowDisk()
    runner = folder_cell(tmp_path, "gg", [slow])
    plc = ModbusPlc(runner, port=0).start()
    runner.observers.append(plc)           # as runtime/cli.py run_parts adds the PLC servers
    runner.start()
    try:
        port = plc.address[1]
        for table, ref, value in (("0", TRIGGER_ENABLE, 1), ("0", TRIGGER, 1)):
            rc, _, err = mbpoll(port, table, ref, write=[value])
            assert rc == 0, err
        triggered = time.monotonic()
        while True:
            rc, values, err = mbpoll(port, "1", 0, len(DI))
            assert rc == 0, err
            if int(values[DI["results_valid"]]):
                answered = time.monotonic()
                break
            assert time.monotonic() - triggered < 30, "no result"
            time.sleep(0.02)
        assert answered - triggered < SLOW_S / 2, f"Results Valid {answered - triggered:.2f} s after the trigger"
        deadline = time.monotonic() + 30
        while not slow.done_at and time.monotonic() < deadline:
            time.sleep(0.02)
        assert slow.done_at and answered < slow.done_at[0]      # the slow output was still writing
    finally:
        runner.stop()
