"""Which PLC servers a triggered line runs (``mrkd run --modbus HOST:PORT``, or ``[plc]`` in the line
file) and starting them on the line's one trigger API. The CLI only parses options and calls these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional

import click

from mrkd.runtime.plc import PlcError
from mrkd.runtime.plc.handshake import RESULTS_BUFFER

PLC_SETTINGS_VERSION = 1
PLC_FIELDS = ("modbus", "results_buffer")


@dataclass(frozen=True)
class PlcSettings:
    """modbus: "HOST:PORT" of the Modbus TCP server (None: off). results_buffer: results held for
    the PLC, the presented one included (1..64)."""

    modbus: Optional[str] = None
    results_buffer: int = RESULTS_BUFFER
    schema_version: int = PLC_SETTINGS_VERSION

    def check(self, where: str = "") -> "PlcSettings":
        """Raise PlcError naming the field; returns self."""
        from mrkd.runtime.plc.modbus import parse_modbus_address
        if self.modbus is not None:
            try:
                parse_modbus_address(self.modbus)
            except PlcError as exc:
                raise PlcError(f"{where}modbus: {exc}") from None
        if not isinstance(self.results_buffer, int) or isinstance(self.results_buffer, bool) \
                or not 1 <= self.results_buffer <= 64:
            raise PlcError(f"{where}results_buffer: expected 1..64 results, got {self.results_buffer!r}")
        return self

    @property
    def wanted(self) -> bool:
        return self.modbus is not None

    @classmethod
    def from_table(cls, table: Any, where: str) -> "PlcSettings":
        """A line file's ``[plc]`` table (``where``: "line.toml: plc.")."""
        if not isinstance(table, dict):
            raise PlcError(f"{where.rstrip('.')}: expected a table ([plc])")
        unknown = sorted(set(table) - set(PLC_FIELDS))
        if unknown:
            raise PlcError(f"{where}{unknown[0]}: unknown field (known: {', '.join(PLC_FIELDS)})")
        modbus = table.get("modbus")
        if modbus is not None and not isinstance(modbus, str):
            raise PlcError(f"{where}modbus: expected \"HOST:PORT\", got {modbus!r}")
        return cls(modbus=modbus, results_buffer=table.get("results_buffer", RESULTS_BUFFER)).check(where)


def plc_options(command):
    """``mrkd run``'s PLC options."""
    options = [
        click.option("--modbus", "modbus", metavar="HOST:PORT", default=None,
                     help="Serve the PLC handshake over Modbus TCP (the map in docs/PLC.md; any unit id), e.g. "
                          "127.0.0.1:5020; 0.0.0.0:502 for the cell network. A trigger source for --trigger "
                          "software/hardware. Default bind 127.0.0.1. Line file: [plc] modbus = ... Needs the plc extra."),
        click.option("--plc-results-buffer", "plc_results_buffer", type=click.IntRange(1, 64), default=None,
                     help=f"Results held for the PLC until acknowledged, the presented one included (default "
                          f"{RESULTS_BUFFER}); newer ones are dropped and flagged as overrun."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def pop_plc_settings(options: dict, line_file_settings: Optional[PlcSettings] = None) -> PlcSettings:
    """PlcSettings from (and taken out of) run_command's options, over the line file's ``[plc]``."""
    base = line_file_settings or PlcSettings()
    modbus, buffer = options.pop("modbus"), options.pop("plc_results_buffer")
    return PlcSettings(modbus=modbus if modbus is not None else base.modbus,
                       results_buffer=buffer if buffer is not None else base.results_buffer).check("--")


def start_plc_servers(target, settings: PlcSettings, echo=None) -> List:
    """Start the servers ``settings`` asks for on ``target`` (the part runner); returns them as line
    observers (add them to the runner's before it starts). PlcError names one that cannot listen;
    the ones already started are closed again."""
    servers: List = []
    try:
        if settings.modbus is not None:
            from mrkd.runtime.plc.modbus import ModbusPlc, parse_modbus_address
            host, port = parse_modbus_address(settings.modbus)
            server = ModbusPlc(target, host, port, capacity=settings.results_buffer).start()
            servers.append(server)
            if echo:
                echo(f"Modbus TCP PLC server on {server.address[0]}:{server.address[1]} (map: docs/PLC.md)")
    except BaseException:
        for server in servers:
            server.close()
        raise
    return servers

