"""`mrkd run --trigger software --modbus HOST:PORT` as a process a PLC (pymodbus' client) drives, and
its one-line errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from plc_fixtures import connect_plc, modbus_line_run, part_images
from runtime_fixtures import build_tiny_model

from mrkd.benchmarks.mosquitto import free_port
from mrkd.benchmarks.plc_peer import TRIGGER_ENABLE

pytest.importorskip("pymodbus", reason="SKIPPED, NOT TESTED: pymodbus missing (pip install 'mrkd[plc]')")


def test_mrkd_run_serves_a_plc_until_sigterm(tmp_path):
    process, port = modbus_line_run(tmp_path, "gdg", "results_buffer = 2\n")
    try:
        plc = connect_plc(port, process)
        plc.coil(TRIGGER_ENABLE, True)
        codes = [plc.inspect(40 + i).reading for i in range(3)]
        plc.close()
        process.send_signal(signal.SIGTERM)       # a clean stop: the summary is printed
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err[-2000:]
    assert [(r.inspection_id, r.part_id, r.result_code) for r in codes] == [(1, 40, 1), (2, 41, 2), (3, 42, 1)]
    summary = json.loads(out[out.index("{"):])
    assert summary["parts"] == 3 and summary["verdicts"]["NG"] == 1
    assert summary["outputs"]["modbus"]["state"] in ("stopped", "listening", "connected")
    assert summary["outputs"]["modbus"]["ok"] and "did not deliver" not in err, err   # stopped is no failure
    assert f"Modbus TCP PLC server on 127.0.0.1:{port}" in err


@pytest.mark.parametrize("extra, message", [
    (["--modbus", "127.0.0.1:5020"], "--modbus/--opcua (or [plc] in the line file) trigger parts: they need --trigger"),
    (["--trigger", "software", "--opcua", "http://127.0.0.1:4840"], "--opcua must look like opc.tcp://HOST:PORT"),
    (["--trigger", "software", "--opcua", "opc.tcp://127.0.0.1:4840", "--opcua-user", "op"],
     "--opcua-user and --opcua-password-env go together"),
    (["--trigger", "software", "--opcua", "opc.tcp://127.0.0.1:0", "--opcua-user", "op", "--opcua-password-env",
      "MRKD_TEST_UNSET_PASSWORD"], "environment variable MRKD_TEST_UNSET_PASSWORD (--opcua-password-env, or "
                                   "plc.opcua_password_env in the line file) is not set"),
    (["--trigger", "software", "--modbus", "localhost:port"], "--modbus must look like HOST:PORT"),
    (["--trigger", "software", "--modbus", "0.0.0.0:0"], "--modbus 0.0.0.0:0 listens beyond this machine: name the "
                                                         "PLC's address with --modbus-allow"),
    (["--trigger", "software", "--modbus", "127.0.0.1:0", "--modbus-allow", "plc7"],
     "--modbus-allow: expected IP addresses or networks"),
    # a list that admits every address checks no client: it stood in for the one the network needs
    (["--trigger", "software", "--modbus", "0.0.0.0:0", "--modbus-allow", "0.0.0.0/0"],
     "--modbus-allow 0.0.0.0/0 admits every IPv4 address, so it checks no client"),
    (["--trigger", "software", "--modbus", "0.0.0.0:0", "--modbus-allow", "10.0.0.5, 0.0.0.0/1,128.0.0.0/1"],
     "--modbus-allow 10.0.0.5, 0.0.0.0/1,128.0.0.0/1 admits every IPv4 address"),
    (["--trigger", "software", "--modbus", "[::]:0", "--modbus-allow", "::/0"],
     "--modbus-allow ::/0 admits every IPv6 address"),
    (["--trigger", "software", "--opcua", "opc.tcp://127.0.0.1:0/other/path"],
     "the server's endpoint is always opc.tcp://HOST:PORT/mrkd/"),
    # a word without a colon was taken as a host name on port 502 and refused as 'beyond this machine'
    (["--trigger", "software", "--modbus", "nohostport"],
     "--modbus must look like HOST:PORT, HOST an address of this machine"),
    (["--trigger", "software", "--opcua", "opc.tcp://nohost.invalid:4840"],
     "--opcua must look like opc.tcp://HOST:PORT, HOST an address of this machine"),
])
@pytest.mark.timeout(120)    # an option error that is not refused starts a server, which serves until stopped
def test_cli_plc_option_errors_are_one_line(tmp_path, extra, message):
    from mrkd.cli import main
    model = build_tiny_model(tmp_path / "tiny.onnx")
    part_images(tmp_path / "parts", "g")
    result = CliRunner().invoke(main, ["run", str(model), "--source", str(tmp_path / "parts"), *extra])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert "--opcua: --opcua" not in result.output and "--modbus: --modbus" not in result.output   # named once


def test_an_unset_opcua_password_variable_is_refused_before_the_models_load(tmp_path):
    """The line file's unset password variable is named at once: it came only after every model had
    loaded (minutes on a Jetson's engines), in words that named neither the file's key nor the option."""
    from mrkd.cli import main
    part_images(tmp_path / "parts", "g")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")        # loading it would fail first
    line = tmp_path / "line.toml"
    line.write_text(f'[[camera]]\nname = "cam"\nsource = "{tmp_path / "parts"}"\nmodel = "broken.onnx"\n'
                    f'trigger = "software"\n[plc]\nopcua = "opc.tcp://127.0.0.1:0"\nopcua_user = "op"\n'
                    f'opcua_password_env = "MRKD_TEST_UNSET_PASSWORD"\n', encoding="utf-8")
    result = CliRunner().invoke(main, ["run", "--line", str(line)], env={"MRKD_TEST_UNSET_PASSWORD": None})
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert "MRKD_TEST_UNSET_PASSWORD (--opcua-password-env, or plc.opcua_password_env in the line file) is not " \
           "set" in result.output, result.output


@pytest.mark.parametrize("server", ["modbus", "opcua"])
def test_cli_port_in_use_is_one_line(tmp_path, server):
    """A port in use is the one-line error alone (asyncua logged a whole traceback of its failed start)."""
    if server == "opcua":
        pytest.importorskip("asyncua")
    model = build_tiny_model(tmp_path / "tiny.onnx")
    part_images(tmp_path / "parts", "g")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        address = f"127.0.0.1:{port}" if server == "modbus" else f"opc.tcp://127.0.0.1:{port}"
        done = subprocess.run([sys.executable, "-m", "mrkd.cli", "run", str(model), "--source", str(tmp_path / "parts"),
                               "--trigger", "software", f"--{server}", address],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and f"127.0.0.1:{port}: cannot listen there" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.slow
def test_mrkd_run_with_opcua_and_modbus_on_one_line(tmp_path):
    """An OPC UA client starts a job; the Modbus PLC is presented the same part (every part of the line)."""
    import asyncio
    pytest.importorskip("asyncua")
    from asyncua import Client
    process, modbus_port, opcua_port = start_line_with_modbus_and_opcua(tmp_path, "d")
    try:
        plc = connect_plc(modbus_port, process)

        async def start_job():
            client = Client(f"opc.tcp://127.0.0.1:{opcua_port}/mrkd/")
            client.set_user("op")
            client.set_password("pw")
            for _ in range(100):            # the OPC UA server starts after the Modbus one
                try:
                    await client.connect()
                    break
                except (OSError, asyncio.TimeoutError):
                    await asyncio.sleep(0.3)
            try:
                ns = await client.get_namespace_index("urn:mrkd:machinevision")
                machine = await client.nodes.objects.get_child([f"{ns}:VisionSystem", f"{ns}:VisionStateMachine"])
                return await machine.call_method(f"{ns}:StartSingleJob", "m", "77", "", "")
            finally:
                await client.disconnect()

        job = asyncio.run(start_job())
        plc.wait(lambda b: b["results_valid"], 10, "Results Valid")
        reading = plc.registers()
        plc.close()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err[-2000:]
    summary = json.loads(out[out.index("{"):])
    assert job == f"{summary['run_id']}-1"                    # the JobId names the run
    assert (reading.inspection_id, reading.part_id, reading.result_code) == (1, 77, 2)
    assert summary["parts"] == 1 and {"modbus", "opcua"} <= set(summary["outputs"])
    assert summary["outputs"]["opcua"]["ok"] and summary["outputs"]["modbus"]["ok"], summary["outputs"]
    assert "did not deliver" not in err, err


@pytest.mark.slow
def test_an_opcua_client_killed_mid_session_leaves_no_noise_at_the_stop(tmp_path):
    """node-opcua's client, running jobs, killed with SIGKILL (no session close); mrkd run stopped by
    SIGTERM: exit 0 and nothing on stderr but mrkd's own lines (asyncio said "Task was destroyed but
    it is pending!" for the vanished session's loops, asyncua logged its faults as ERRORs)."""
    pytest.importorskip("asyncua")
    from test_plc_opcua import CLIENT_DIR, node_client_ready
    node = node_client_ready()
    model = build_tiny_model(tmp_path / "tiny.onnx")
    part_images(tmp_path / "parts", "d")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mrkd.cli", "run", str(model), "--source", str(tmp_path / "parts"), "--loop",
         "--trigger", "software", "--opcua", f"opc.tcp://127.0.0.1:{port}", "--opcua-user", "op",
         "--opcua-password-env", "MRKD_TEST_PW", "--status-every", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", MRKD_TEST_PW="secret-pw"))
    client = None
    try:
        deadline = time.monotonic() + 60
        while True:                       # the server is up when the port answers
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
                time.sleep(0.3)
        # A certificate folder of its own (node-opcua keeps it under $XDG_CONFIG_HOME): every run is a
        # fresh machine's first, where node-opcua first prints "Creating default certificate" to stdout.
        client = subprocess.Popen([node, "client.js", f"opc.tcp://127.0.0.1:{port}/mrkd/", "op", "secret-pw", "500"],
                                  cwd=CLIENT_DIR, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                  env=dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "node-config")))
        said = [client.stdout.readline()]          # node-opcua writes its own messages there too
        while said[-1] and not said[-1].startswith('{"kind":"event"'):    # jobs running: a ResultReady seen
            said.append(client.stdout.readline())
        assert said[-1], "".join(said)[-2000:]
        client.kill()
        client.wait()
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        for proc in (client, process):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert process.returncode == 0, err[-2000:]
    foreign = [line for line in err.splitlines() if line.strip() and not line.startswith(("WARNING mrkd", "tiny.onnx",
                                                                                          "OPC UA VisionSystem"))]
    assert not foreign, err[-3000:]


def start_line_with_modbus_and_opcua(tmp_path, pattern: str):
    """`mrkd run` of a tiny model over a folder of parts (``pattern``: plc_fixtures.part_images') serving
    Modbus TCP and OPC UA (user op / pw) on free local ports: (process, modbus_port, opcua_port)."""
    model = build_tiny_model(tmp_path / "tiny.onnx")
    part_images(tmp_path / "parts", pattern)
    modbus_port, opcua_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mrkd.cli", "run", str(model), "--source", str(tmp_path / "parts"), "--trigger",
         "software", "--modbus", f"127.0.0.1:{modbus_port}", "--opcua", f"opc.tcp://127.0.0.1:{opcua_port}",
         "--opcua-user", "op", "--opcua-password-env", "MRKD_TEST_PW", "--status-every", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", MRKD_TEST_PW="pw"))
    return process, modbus_port, opcua_port
