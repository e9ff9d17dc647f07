"""docs/PLC.md is what PLC programs are written against: its map and error codes must be the code's."""

from __future__ import annotations

import re
from pathlib import Path

from mrkd.runtime.plc.handshake import error_codes
from mrkd.runtime.plc.modbus import COILS, DISCRETE_INPUTS, HOLDING_REGISTERS, INPUT_REGISTERS

DOC = Path(__file__).resolve().parents[1] / "docs" / "PLC.md"


def rows():
    table = {}
    current = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"\d+(–\d+)?", cells[1]):
            kind = cells[0].split(" (")[0] or current
            current = kind
            table.setdefault(kind, {})[cells[1]] = cells[2]
    return table


def test_the_printed_map_is_the_servers_map():
    table = rows()
    assert list(table["coil"].values()) == list(COILS) and list(table["coil"]) == [str(i) for i in range(len(COILS))]
    assert list(table["discrete input"].values()) == list(DISCRETE_INPUTS)
    assert list(table["holding register"].values()) == list(HOLDING_REGISTERS)
    printed = []
    for address, name in table["input register"].items():
        first, _, last = address.partition("–")
        span = int(last or first) - int(first) + 1
        printed += [name] if span == 1 else [f"{name} (high word)", f"{name} (low word)"]
    assert printed == list(INPUT_REGISTERS)


def test_every_error_code_is_documented():
    text = DOC.read_text(encoding="utf-8")
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", text, flags=re.M)}
    assert documented == set(error_codes())
