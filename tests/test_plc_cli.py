"""`mrkd run --trigger software --modbus HOST:PORT` as a process a PLC (pymodbus' client) drives, and
its one-line errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from plc_fixtures import part_images
from runtime_fixtures import build_tiny_model

from mrkd.benchmarks.plc_peer import TRIGGER_ENABLE, ModbusError, SimulatedPlc

pytest.importorskip("pymodbus", reason="SKIPPED, NOT TESTED: pymodbus missing (pip install 'mrkd[plc]')")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def connect(port, process, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return SimulatedPlc(port)
        except ModbusError:
            assert process.poll() is None, process.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "mrkd run never listened"
            time.sleep(0.2)


def test_mrkd_run_serves_a_plc_until_max_parts(tmp_path):
    model = build_tiny_model(tmp_path / "tiny.onnx")
    part_images(tmp_path / "parts", "gdg")
    port = free_port()
    line = tmp_path / "line.toml"
    line.write_text(f'[[camera]]\nname = "cam"\nsource = "{tmp_path / "parts"}"\nmodel = "{model}"\n'
                    f'trigger = "software"\n[plc]\nmodbus = "127.0.0.1:{port}"\nresults_buffer = 2\n', encoding="utf-8")
    process = subprocess.Popen([sys.executable, "-m", "mrkd.cli", "run", "--line", str(line), "--max-parts", "3",
                                "--status-every", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        plc = connect(port, process)
        plc.coil(TRIGGER_ENABLE, True)
        codes = [plc.inspect(40 + i).reading for i in range(3)]
        plc.close()
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err[-2000:]
    assert [(r.inspection_id, r.part_id, r.result_code) for r in codes] == [(1, 40, 1), (2, 41, 2), (3, 42, 1)]
    summary = json.loads(out[out.index("{"):])
    assert summary["parts"] == 3 and summary["verdicts"]["NG"] == 1
    assert summary["outputs"]["modbus"]["state"] in ("stopped", "listening", "connected")
    assert f"Modbus TCP PLC server on 127.0.0.1:{port}" in err


@pytest.mark.parametrize("extra, message", [
    (["--modbus", "127.0.0.1:5020"], "--modbus (or [plc] in the line file) triggers parts: it needs --trigger"),
    (["--trigger", "software", "--modbus", "localhost:port"], "--modbus must look like HOST:PORT"),
])
def test_cli_plc_option_errors_are_one_line(tmp_path, extra, message):
    from mrkd.cli import main
    model = build_tiny_model(tmp_path / "tiny.onnx")
    part_images(tmp_path / "parts", "g")
    result = CliRunner().invoke(main, ["run", str(model), "--source", str(tmp_path / "parts"), *extra])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_cli_port_in_use_is_one_line(tmp_path):
    from mrkd.cli import main
    model = build_tiny_model(tmp_path / "tiny.onnx")
    part_images(tmp_path / "parts", "g")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["run", str(model), "--source", str(tmp_path / "parts"), "--trigger",
                                           "software", "--modbus", f"127.0.0.1:{port}"])
    assert result.exit_code != 0 and f"127.0.0.1:{port}: cannot listen there" in result.output
    assert "Traceback" not in result.output
