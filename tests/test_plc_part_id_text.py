"""Parts triggered elsewhere (stdin, a barcode, OPC UA) carry text ids; the Modbus PLC reads each one's
Part Id register as the decimal number it spells in ASCII digits, else 0 (docs/PLC.md). An id of
characters Python calls digits but int() refuses (a superscript "²", a circled "①") raised inside the
Modbus server's on_part: that part's result never entered the PLC's buffer (Inspection Id jumped by
one, Parts Judged one short) and the log got a traceback. Read with Debian's mbpoll as the PLC."""

from __future__ import annotations

import time

import pytest

from peers import require_program
from plc_fixtures import folder_cell

from mrkd.benchmarks.plc_peer import INPUT_COUNT, RESULTS_ACK, Reading, mbpoll
from mrkd.runtime.plc.modbus import ModbusPlc

pytest.importorskip("pymodbus", reason="SKIPPED, NOT TESTED: pymodbus missing (pip install 'mrkd[plc]')")

IDS = ["41", "\u00b2", "\u2460", "\u0661\u0667", "0043"]     # 41, ², ①, Arabic-Indic 17, 0043
PLC_IDS = [41, 0, 0, 0, 43]


def read_result(port):
    rc, values, err = mbpoll(port, "3", 0, INPUT_COUNT)
    assert rc == 0, err
    return Reading.of([int(v) for v in values])


def acknowledge(port):
    for level in (1, 0):
        rc, _, err = mbpoll(port, "0", RESULTS_ACK, write=[level])
        assert rc == 0, err


def test_every_part_id_text_reaches_the_plc_with_a_part_id_number(tmp_path, caplog):
    require_program("mbpoll", ["mbpoll"])
    runner = folder_cell(tmp_path, "g" * len(IDS))
    plc = ModbusPlc(runner, port=0).start()
    runner.observers.append(plc)
    runner.start()
    try:
        for part_id in IDS:             # what --trigger-stdin does with each line
            assert runner.trigger(part_id).accepted
        deadline = time.monotonic() + 20
        while runner.busy and time.monotonic() < deadline:
            time.sleep(0.02)
        seen = []
        for _ in IDS:
            reading = read_result(plc.address[1])
            seen.append((reading.inspection_id, reading.part_id))
            acknowledge(plc.address[1])
        last = read_result(plc.address[1])
    finally:
        runner.stop()
        plc.close()
    assert seen == list(zip(range(1, len(IDS) + 1), PLC_IDS)), seen
    assert last.parts_judged == len(IDS), last
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
