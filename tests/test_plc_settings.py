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
    path = line_file(tmp_path, '[plc]\nmodbus = "0.0.0.0:502"\nmodbus_allow = "10.0.0.5, 10.0.1.0/24, fd00::7"')
    load_line(path)
    assert load_plc_settings(path).modbus_allow == "10.0.0.5, 10.0.1.0/24, fd00::7"
    for loopback in ("127.0.0.1:5020", ":5020", "localhost:5020", "[::1]:5020", "127.0.0.9:5020"):
        assert PlcSettings(modbus=loopback).check() is not None      # this machine only: no list needed


@pytest.mark.parametrize("table, message", [
    ('modbus = 5020', r"plc\.modbus: expected text"),
    ('modbus = "127.0.0.1:99999"', r"plc\.modbus must look like HOST:PORT"),
    ('results_buffer = 0', r"plc\.results_buffer: expected 1\.\.64"),
    ('results_buffer = true', r"plc\.results_buffer"),
    ('opcua_port = 1', r"plc\.opcua_port: unknown field"),
    ('modbus = "0.0.0.0:502"', r"plc\.modbus 0\.0\.0\.0:502 listens beyond this machine: name the PLC's address "
                               r"with plc\.modbus_allow"),
    # a name no resolver knows (.invalid never resolves) is said to be one, not "beyond this machine"
    ('modbus = "plc-pc.invalid:502"', r"plc\.modbus must look like HOST:PORT, HOST an address of this machine .*"
                                      r"'plc-pc\.invalid' is no IP address or host name this machine knows"),
    ('modbus = "plc7"', r"plc\.modbus must look like HOST:PORT, HOST an address of this machine"),
    ('opcua = "opc.tcp://plc-pc.invalid:4840"', r"plc\.opcua must look like opc\.tcp://HOST:PORT, HOST an address"),
    ('modbus = "127.0.0.1:5020"\nmodbus_allow = 5', r"plc\.modbus_allow: expected text"),
    ('modbus = "0.0.0.0:502"\nmodbus_allow = "10.0.0.300"', r"plc\.modbus_allow: expected IP addresses .*'10\.0\.0\.300'"),
    ('modbus = "0.0.0.0:502"\nmodbus_allow = "10.0.0.5,"', r"plc\.modbus_allow: expected IP addresses .*''"),
    ('modbus_allow = "10.0.0.5"', r"plc\.modbus_allow needs plc\.modbus"),
    ('modbus = "0.0.0.0:502"\nmodbus_allow = "0.0.0.0/0"',
     r"plc\.modbus_allow 0\.0\.0\.0/0 admits every IPv4 address, so it checks no client"),
])
def test_line_file_plc_errors_name_the_field(tmp_path, table, message):
    path = line_file(tmp_path, f"[plc]\n{table}")
    with pytest.raises(LineFileError, match=rf"line\.toml: {message}"):
        load_line(path)


def options(**given):
    keys = ("modbus", "plc_results_buffer", "opcua", "opcua_user", "opcua_password_env", "opcua_anonymous_calls",
            "opcua_certificate", "opcua_private_key")
    return {k: given.get(k) for k in keys}


def test_command_line_over_line_file():
    base = PlcSettings(modbus="127.0.0.1:5020", results_buffer=4, opcua="opc.tcp://127.0.0.1:4840")
    assert pop_plc_settings(options(), base) == base
    assert pop_plc_settings(options(modbus=":6000", plc_results_buffer=2), base) == \
        PlcSettings(":6000", 2, opcua="opc.tcp://127.0.0.1:4840")
    with pytest.raises(PlcError, match="--modbus"):
        pop_plc_settings(options(modbus="host:port"))
    assert pop_plc_settings(options(opcua="opc.tcp://127.0.0.1:1", opcua_user="u", opcua_password_env="V",
                                    opcua_anonymous_calls=True)).opcua_anonymous_calls


def test_line_file_opcua_fields(tmp_path, monkeypatch):
    path = line_file(tmp_path, '[plc]\nopcua = "opc.tcp://127.0.0.1:4841"\nopcua_user = "op"\n'
                               'opcua_password_env = "MRKD_TEST_OPCUA_PW"')
    settings = load_plc_settings(path)
    assert settings.wanted and settings.opcua_user == "op"
    monkeypatch.setenv("MRKD_TEST_OPCUA_PW", "pw")
    assert settings.opcua_password() == "pw"
    with pytest.raises(LineFileError, match="plc.opcua_certificate and plc.opcua_private_key go together"):
        load_line(line_file(tmp_path, '[plc]\nopcua = "opc.tcp://0.0.0.0:1"\nopcua_certificate = "c.der"'))
    (tmp_path / "certs").mkdir()
    for name in ("server.der", "server.pem"):
        (tmp_path / "certs" / name).write_bytes(b"x")
    secure = load_plc_settings(line_file(tmp_path, '[plc]\nopcua = "opc.tcp://0.0.0.0:1"\n'
                                                    'opcua_certificate = "certs/server.der"'
                                                    '\nopcua_private_key = "certs/server.pem"'))
    assert secure.opcua_certificate == str(tmp_path / "certs" / "server.der")   # from the line file's folder
    with pytest.raises(LineFileError, match="file not found"):
        load_line(line_file(tmp_path, '[plc]\nopcua = "opc.tcp://0.0.0.0:1"\nopcua_certificate = "none.der"'
                                      '\nopcua_private_key = "none.pem"'))
    with pytest.raises(LineFileError, match="plc.opcua must look like opc.tcp://HOST:PORT"):
        load_line(line_file(tmp_path, '[plc]\nopcua = "tcp://x"'))


def test_opcua_trust_folder_setting(tmp_path):
    (tmp_path / "certs" / "clients").mkdir(parents=True)
    for name in ("server.der", "server.pem"):
        (tmp_path / "certs" / name).write_bytes(b"x")
    secure = ('[plc]\nopcua = "opc.tcp://0.0.0.0:1"\nopcua_certificate = "certs/server.der"\n'
              'opcua_private_key = "certs/server.pem"')
    trusted = load_plc_settings(line_file(tmp_path, secure + '\nopcua_trust = "certs/clients"'))
    assert trusted.opcua_trust == str(tmp_path / "certs" / "clients")   # from the line file's folder
    with pytest.raises(LineFileError, match="plc.opcua_trust: not a folder"):
        load_line(line_file(tmp_path, secure + '\nopcua_trust = "certs/server.der"'))
    with pytest.raises(LineFileError, match="plc.opcua_trust needs plc.opcua_certificate"):
        load_line(line_file(tmp_path, '[plc]\nopcua = "opc.tcp://0.0.0.0:1"\nopcua_trust = "certs/clients"'))
    given = dict(options(opcua="opc.tcp://0.0.0.0:1", opcua_certificate=str(tmp_path / "certs" / "server.der"),
                         opcua_private_key=str(tmp_path / "certs" / "server.pem")),
                 opcua_trust=str(tmp_path / "certs" / "clients"))
    assert pop_plc_settings(given).opcua_trust == str(tmp_path / "certs" / "clients")
    assert "opcua_trust" not in given


def test_network_opcua_needs_callers_it_can_authenticate(tmp_path, monkeypatch):
    """Reachable from the network, OPC UA refuses anonymous method calls unless clients are admitted by
    certificate, and a password that would cross the network unencrypted; read-only or local is fine."""
    monkeypatch.setattr("mrkd.runtime.plc.opcua.known_host", lambda host: True)   # as the cell's DNS knows cell7-pc
    for name in ("server.der", "server.pem"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "clients").mkdir()
    cert = dict(opcua_certificate=str(tmp_path / "server.der"), opcua_private_key=str(tmp_path / "server.pem"))
    user = dict(opcua_user="op", opcua_password_env="MRKD_TEST_PW")
    for url in ("opc.tcp://0.0.0.0:4840", "opc.tcp://[::]:4840", "opc.tcp://cell7-pc:4840"):
        with pytest.raises(PlcError, match=r"--opcua-anonymous-calls with --opcua .*: anyone on the network"):
            PlcSettings(opcua=url, opcua_anonymous_calls=True).check("--")
        with pytest.raises(PlcError, match=r"--opcua-anonymous-calls"):
            PlcSettings(opcua=url, opcua_anonymous_calls=True, **cert).check("--")     # any client could connect
        with pytest.raises(PlcError, match=r"--opcua-user but no --opcua-certificate: the password would cross"):
            PlcSettings(opcua=url, **user).check("--")
        PlcSettings(opcua=url).check("--")                                                 # read-only
        PlcSettings(opcua=url, **user, **cert).check("--")                                 # encrypted
        PlcSettings(opcua=url, opcua_anonymous_calls=True, opcua_trust=str(tmp_path / "clients"), **cert).check("--")
    for url in ("opc.tcp://127.0.0.1:4840", "opc.tcp://localhost:4840", "opc.tcp://[::1]:4840"):
        PlcSettings(opcua=url, opcua_anonymous_calls=True, **user).check("--")          # this machine only
    with pytest.raises(LineFileError, match=r"line\.toml: plc\.opcua opc.tcp://0.0.0.0:4840 with plc\.opcua_user"):
        load_line(line_file(tmp_path, '[plc]\nopcua = "opc.tcp://0.0.0.0:4840"\nopcua_user = "op"\n'
                                      'opcua_password_env = "MRKD_TEST_PW"'))


def test_modbus_security_settings(tmp_path):
    """Modbus/TCP Security: certificate, key and trust folder go together and are read from the line
    file's folder; with them the server may listen beyond this machine without an address list."""
    (tmp_path / "certs" / "plcs").mkdir(parents=True)
    for name in ("modbus.crt", "modbus.key"):
        (tmp_path / "certs" / name).write_bytes(b"x")
    secure = ('[plc]\nmodbus = "0.0.0.0:802"\nmodbus_certificate = "certs/modbus.crt"\n'
              'modbus_private_key = "certs/modbus.key"\nmodbus_trust = "certs/plcs"')
    settings = load_plc_settings(line_file(tmp_path, secure))
    assert settings.modbus_trust == str(tmp_path / "certs" / "plcs")       # from the line file's folder
    assert settings.modbus_allow is None and settings.schema_version == 3
    for table, message in (
            ('modbus = "0.0.0.0:802"\nmodbus_certificate = "certs/modbus.crt"\nmodbus_private_key = "certs/modbus.key"',
             r"plc\.modbus_certificate, plc\.modbus_private_key and plc\.modbus_trust go together"),
            ('modbus = "127.0.0.1:802"\nmodbus_trust = "certs/plcs"', r"plc\.modbus_certificate, .* go together"),
            ('modbus_trust = "certs/plcs"', r"plc\.modbus_certificate/_private_key/_trust need plc\.modbus"),
            (secure.split("\n", 1)[1].replace('"certs/plcs"', '"certs/modbus.crt"'), r"plc\.modbus_trust: not a folder"),
            (secure.split("\n", 1)[1].replace('"certs/modbus.key"', '"certs/gone.key"'),
             r"plc\.modbus certificate/key: file not found: .*gone\.key"),
            ('modbus = "0.0.0.0:802"', r"plc\.modbus 0\.0\.0\.0:802 listens beyond this machine: name the PLC's "
                                       r"address with plc\.modbus_allow .*or authenticate it with "
                                       r"Modbus/TCP Security")):
        with pytest.raises(LineFileError, match=rf"line\.toml: {message}"):
            load_line(line_file(tmp_path, "[plc]\n" + table))
    roles = load_plc_settings(line_file(tmp_path, secure + '\nmodbus_write_roles = "operator, engineer"'))
    assert roles.modbus_write_roles == "operator, engineer"
    for table, message in ((secure + '\nmodbus_write_roles = "operator,"', r"plc\.modbus_write_roles: expected role names"),
                           (secure + "\nmodbus_write_roles = 3", r"plc\.modbus_write_roles: expected text"),
                           ('[plc]\nmodbus = "127.0.0.1:502"\nmodbus_write_roles = "operator"',
                            r"plc\.modbus_write_roles needs Modbus/TCP Security")):
        with pytest.raises(LineFileError, match=rf"line\.toml: {message}"):
            load_line(line_file(tmp_path, table))
    given = dict(options(modbus="0.0.0.0:802"), modbus_certificate=str(tmp_path / "certs" / "modbus.crt"),
                 modbus_private_key=str(tmp_path / "certs" / "modbus.key"),
                 modbus_trust=str(tmp_path / "certs" / "plcs"))
    assert pop_plc_settings(given).modbus_trust == str(tmp_path / "certs" / "plcs")
    assert "modbus_trust" not in given and "modbus_certificate" not in given
