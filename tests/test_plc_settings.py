"""PLC settings from the line file's [plc] table and the command line: errors name the file and field."""

from __future__ import annotations

import pytest

from runtime_fixtures import build_tiny_model

from mrkd.runtime.line.linefile import LineFileError, load_line, load_plc_settings
from mrkd.runtime.plc import PlcError
from mrkd.runtime.plc.servers import PlcSettings, pop_plc_settings


def line_file(tmp_path, plc: str):
    model = build_tiny_model(tmp_path / "tiny.onnx")
    path = tmp_path / "line.toml"
    path.write_text(f'[[camera]]\nname = "cam"\nsource = "{tmp_path}"\nmodel = "{model}"\ntrigger = "software"\n'
                    f"{plc}\n", encoding="utf-8")
    return path


def test_line_file_plc_table(tmp_path):
    path = line_file(tmp_path, '[plc]\nmodbus = "127.0.0.1:5020"\nresults_buffer = 4')
    load_line(path)
    assert load_plc_settings(path) == PlcSettings(modbus="127.0.0.1:5020", results_buffer=4)
    assert load_plc_settings(line_file(tmp_path, "")) is None


@pytest.mark.parametrize("table, message", [
    ('modbus = 5020', r"plc\.modbus: expected \"HOST:PORT\""),
    ('modbus = "127.0.0.1:99999"', r"plc\.modbus: .*HOST:PORT"),
    ('results_buffer = 0', r"plc\.results_buffer: expected 1\.\.64"),
    ('results_buffer = true', r"plc\.results_buffer"),
    ('opcua_port = 1', r"plc\.opcua_port: unknown field"),
])
def test_line_file_plc_errors_name_the_field(tmp_path, table, message):
    path = line_file(tmp_path, f"[plc]\n{table}")
    with pytest.raises(LineFileError, match=rf"line\.toml: {message}"):
        load_line(path)


def test_command_line_over_line_file():
    base = PlcSettings(modbus="127.0.0.1:5020", results_buffer=4)
    assert pop_plc_settings({"modbus": None, "plc_results_buffer": None}, base) == base
    assert pop_plc_settings({"modbus": ":6000", "plc_results_buffer": 2}, base) == PlcSettings(":6000", 2)
    with pytest.raises(PlcError, match="--modbus"):
        pop_plc_settings({"modbus": "host:port", "plc_results_buffer": None})
