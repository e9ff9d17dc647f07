"""Modbus/TCP Security (runtime/plc/modbus_security.py) against independent peers: Debian's mbpoll
(libmodbus, plain Modbus TCP) talking through socat, which carries it over TLS with a client
certificate, as a PLC with a TLS-capable Modbus stack would. The trust folder decides who gets in:
a client its authority issued runs the handshake; a stranger, a revoked client, a client without a
certificate and plain Modbus TCP are refused before a request is read; a certificate added to the
running server's folder is admitted without a restart."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from peers import require_program
from pki_fixtures import Issued, application, authority, revocation_list
from plc_fixtures import part_images
from test_plc_modbus import Cell, model  # noqa: F401  (the module's fixture)

from mrkd.benchmarks.mosquitto import free_port
from mrkd.benchmarks.plc_peer import DI, PART_ID, TRIGGER, TRIGGER_ENABLE, mbpoll
from mrkd.runtime.plc import PlcError
from mrkd.runtime.plc.modbus_security import ModbusSecurity

pytest.importorskip("pymodbus", reason="SKIPPED, NOT TESTED: pymodbus missing (pip install 'mrkd[plc]')")


def _server_certificate(issuer: Issued) -> Issued:
    """A TLS server certificate for 127.0.0.1, signed by ``issuer`` (cryptography, not our code)."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(issuer.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(issuer.key, hashes.SHA256()))
    return Issued(cert, key)


def _pem_pair(folder: Path, name: str, item: Issued):
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    cert.write_bytes(item.cert.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(item.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert, key


def _cell_pki(tmp_path: Path, ca_name: str):
    """A cell's certificate authority, trusted in tmp_path/trusted, and the server's certificate it
    issued: (authority, pki folder, trust folder, the authority's PEM, server certificate, server key)."""
    ca = authority(ca_name)
    folder, trust = tmp_path / "pki", tmp_path / "trusted"
    folder.mkdir()
    trust.mkdir()
    ca_pem = folder / "ca.crt"
    ca_pem.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    (trust / "ca.der").write_bytes(ca.der)
    return (ca, folder, trust, ca_pem) + _pem_pair(folder, "server", _server_certificate(ca))


class Tunnel:
    """socat: plain TCP on a loopback port in, TLS with a client certificate (or none) out."""

    def __init__(self, socat: str, server_port: int, ca: Path, cert=None, key=None):
        self.port = free_port()
        tls = f"OPENSSL:127.0.0.1:{server_port},cafile={ca},verify=1"
        if cert is not None:
            tls += f",cert={cert},key={key}"
        self.proc = subprocess.Popen([socat, f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork", tls],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("socat did not listen")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def secure_cell(model, tmp_path):  # noqa: F811
    socat = require_program("socat", ["socat"])
    require_program("mbpoll", ["mbpoll"])
    ca, folder, trust, ca_pem, server_cert, server_key = _cell_pki(tmp_path, "cell 4 CA")
    revoked = application(ca, "revoked-plc")
    (trust / "ca.crl").write_bytes(revocation_list(ca, [revoked]))
    clients = {"plc": _pem_pair(folder, "plc", application(ca, "plc")),
               "revoked": _pem_pair(folder, "revoked", revoked),
               "stranger": _pem_pair(folder, "stranger", application(None, "stranger")),
               "tomorrow": _pem_pair(folder, "tomorrow", application(ca, "tomorrow-plc", start_days=1))}
    part_images(tmp_path / "parts", "gd")
    cell = Cell(model, str(tmp_path / "parts"),
                security=ModbusSecurity(str(server_cert), str(server_key), str(trust)))
    tunnels = []

    def tunnel(client, server_ca=ca_pem):
        cert, key = clients[client] if client else (None, None)
        tunnels.append(Tunnel(socat, cell.port, server_ca, cert, key))
        return tunnels[-1].port

    cell.server_files = (server_cert, server_key)
    try:
        yield cell, tunnel, trust, clients
    finally:
        for t in tunnels:
            t.close()
        cell.close()


def test_a_trusted_plc_runs_the_handshake_over_tls_and_others_are_refused_unread(secure_cell, caplog):
    cell, tunnel, trust, clients = secure_cell
    port = tunnel("plc")

    def read(table, ref, count=1, through=port):
        rc, values, err = mbpoll(through, table, ref, count)
        assert rc == 0, err
        return [int(v) for v in values]

    def write(table, ref, value):
        rc, _, err = mbpoll(port, table, ref, write=[value])
        assert rc == 0, err

    assert read("1", 0, 10) == [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]             # online, not enabled
    write("0", TRIGGER_ENABLE, 1)
    write("4", PART_ID, 77)
    write("0", TRIGGER, 1)
    deadline = time.monotonic() + 10
    while read("1", DI["results_valid"]) != [1]:
        assert time.monotonic() < deadline, "no result"
    assert read("3", 0, 3) == [1, 1, 77]                                   # OK, inspection 1, part 77
    requests = cell.plc.requests
    refused_before = cell.plc.clients_refused
    for who in ("stranger", "revoked", None):                             # None: TLS without a certificate
        rc, _, _ = mbpoll(tunnel(who), "3", 0, 3)
        assert rc != 0, who
    rc, _, _ = mbpoll(cell.port, "3", 0, 3)                               # plain Modbus TCP to the TLS port
    assert rc != 0
    assert cell.plc.requests == requests                                   # not one of their requests was read
    # OpenSSL refuses the stranger, the certificate-less client and plain Modbus TCP in the handshake
    # (asyncio drops them without a word: each is said here, once per address and reason); the revoked
    # client passes OpenSSL (it chains to the CA) and is refused by the trust folder's CRL (libmodbus may
    # connect more than once before it gives up)
    assert cell.plc.clients_refused >= refused_before + 4
    refusals = [r.getMessage() for r in caplog.records if "refused a connection" in r.getMessage()]
    said = "modbus: refused a connection from 127.0.0.1 ("
    assert sorted(refusals) == sorted([
        said + "TLS handshake: its certificate does not chain to a certificate of the trust folder (OpenSSL: "
               "self-signed certificate))",          # the stranger signed its own
        said + "client certificate refused: BadCertificateRevoked)",
        said + "TLS handshake: it presented no client certificate (OpenSSL: PEER_DID_NOT_RETURN_A_CERTIFICATE))",
        said + "TLS handshake: it does not speak TLS (a plain Modbus TCP client on the TLS port?) (OpenSSL: "
               "WRONG_VERSION_NUMBER))"]), refusals
    assert cell.runner.stop()["triggers"] == 1


def test_a_client_certificate_not_yet_valid_is_refused_saying_the_clock(secure_cell, caplog):
    """A device booted at 1970 (no real-time clock, NTP not there yet) finds every client certificate not
    yet valid. OpenSSL refused such a client inside the TLS handshake, where nothing was logged or counted:
    the PLC could not connect and the log said nothing (old code: no "refused a connection" line, the
    refusal count unchanged; only the trust folder's warning at load hinted at the clock). OpenSSL leaves
    the dates to the trust folder now, which checks them on the whole chain it trusts and says the
    certificate's dates and this machine's clock. (A certificate valid from tomorrow is the same check.)"""
    cell, tunnel, trust, clients = secure_cell
    refused_before = cell.plc.clients_refused
    rc, _, _ = mbpoll(tunnel("tomorrow"), "3", 0, 3)
    assert rc != 0
    assert cell.plc.requests == 0 and cell.plc.clients_refused > refused_before
    refusals = [r.getMessage() for r in caplog.records if "refused a connection" in r.getMessage()]
    assert refusals and all("client certificate refused: BadCertificateTimeInvalid (it is valid from" in m
                            and "before that: is the clock wrong?" in m for m in refusals), refusals


def test_a_certificate_added_to_the_running_servers_folder_is_admitted(secure_cell):
    cell, tunnel, trust, clients = secure_cell
    stranger = tunnel("stranger")
    assert mbpoll(stranger, "1", 0, 1)[0] != 0
    stranger_cert = x509.load_pem_x509_certificate(clients["stranger"][0].read_bytes())
    (trust / "stranger.der").write_bytes(stranger_cert.public_bytes(serialization.Encoding.DER))
    deadline = time.monotonic() + 10
    while True:
        rc, values, err = mbpoll(stranger, "1", 0, 1)
        if rc == 0:
            break
        assert time.monotonic() < deadline, err
        time.sleep(0.3)
    assert values == [1]                                                   # online


def test_security_mistakes_are_one_line_errors(model, tmp_path):  # noqa: F811
    ca = authority("cell CA")
    folder = tmp_path / "pki"
    folder.mkdir()
    cert, key = _pem_pair(folder, "server", _server_certificate(ca))
    _, other_key = _pem_pair(folder, "other", _server_certificate(ca))
    trust = tmp_path / "trusted"
    trust.mkdir()
    (trust / "ca.der").write_bytes(ca.der)
    part_images(tmp_path / "parts", "g")
    with pytest.raises(PlcError, match=r"--modbus-certificate .*server\.crt / --modbus-private-key .*other\.key: "
                                       r"cannot load them"):
        Cell(model, str(tmp_path / "parts"), security=ModbusSecurity(str(cert), str(other_key), str(trust)))
    # the Modbus server's folder is named as its own, not as the OPC UA one (the message said "OPC UA")
    with pytest.raises(PlcError, match=r"^Modbus/TCP Security trust folder \(--modbus-trust\) .*empty: "
                                       r"no certificates"):
        (tmp_path / "empty").mkdir()
        Cell(model, str(tmp_path / "parts"), security=ModbusSecurity(str(cert), str(key), str(tmp_path / "empty")))


def test_mrkd_run_with_modbus_tcp_security_on_the_cell_network_address(tmp_path, model):  # noqa: F811
    """`mrkd run --modbus 0.0.0.0:PORT` with Modbus/TCP Security and no --modbus-allow starts (the
    client is authenticated by its certificate), serves a trusted PLC through socat and mbpoll, serves
    a renewed server certificate after SIGHUP, and stops cleanly on SIGTERM."""
    import json
    import os
    import signal
    import sys
    socat = require_program("socat", ["socat"])
    require_program("mbpoll", ["mbpoll"])
    ca, folder, trust, ca_pem, cert, key = _cell_pki(tmp_path, "cell 9 CA")
    plc_cert, plc_key = _pem_pair(folder, "plc", application(ca, "plc"))
    part_images(tmp_path / "parts", "g")
    port = free_port()
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "mrkd.cli", "run", model, "--source",
                                    str(tmp_path / "parts"), "--trigger", "software", "--status-every", "0",
                                    "--modbus", f"0.0.0.0:{port}", "--modbus-certificate", str(cert),
                                    "--modbus-private-key", str(key), "--modbus-trust", str(trust),
                                    "--modbus-write-roles", "operator, engineer"],
                                   stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"))
    tunnel = renewed = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None, stderr_path.read_text()[-2000:]
                assert time.monotonic() < deadline, "mrkd run never listened"
                time.sleep(0.2)
        tunnel = Tunnel(socat, port, ca_pem, plc_cert, plc_key)
        rc, values, err = mbpoll(tunnel.port, "1", 0, 1)
        assert rc == 0 and values == [1], err                              # online, read over TLS
        renewed_ca = authority("renewed CA")
        renewed_ca_pem = folder / "renewed-ca.crt"
        renewed_ca_pem.write_bytes(renewed_ca.cert.public_bytes(serialization.Encoding.PEM))
        (folder / "staged").mkdir()
        new_cert, new_key = _pem_pair(folder / "staged", "server", _server_certificate(renewed_ca))
        os.replace(new_key, key)
        os.replace(new_cert, cert)
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "modbus: certificate reloaded (SIGHUP)" not in stderr_path.read_text():
            assert time.monotonic() < deadline, stderr_path.read_text()[-2000:]
            time.sleep(0.1)
        renewed = Tunnel(socat, port, renewed_ca_pem, plc_cert, plc_key)
        rc, values, err = mbpoll(renewed.port, "1", 0, 1)
        assert rc == 0 and values == [1], err
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
    finally:
        for t in (tunnel, renewed):
            if t is not None:
                t.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    err = stderr_path.read_text()
    assert process.returncode == 0, err[-2000:]
    assert "Modbus/TCP Security, client certificates trusted from" in err
    assert "writes by roles engineer, operator only" in err
    summary = json.loads(out[out.index("{"):])
    assert "Modbus/TCP Security" in summary["outputs"]["modbus"]["detail"]


def test_a_renewed_server_certificate_is_served_after_a_reload_and_a_broken_pair_is_refused(secure_cell, tmp_path):
    """reload_certificate (SIGHUP in `mrkd run`): a PLC that trusts only the renewed certificate's
    authority connects after the reload, one that trusts only the old no longer does; a certificate
    moved in with a key that is not its own is refused and the renewed pair keeps being served."""
    cell, tunnel, trust, clients = secure_cell
    cert_path, key_path = cell.server_files
    renewed_ca = authority("renewed server CA")
    renewed_ca_pem = tmp_path / "renewed-ca.crt"
    renewed_ca_pem.write_bytes(renewed_ca.cert.public_bytes(serialization.Encoding.PEM))
    old_trusting = tunnel("plc")
    assert mbpoll(old_trusting, "1", 0, 1)[0] == 0
    staged = tmp_path / "staged"
    staged.mkdir()
    new_cert, new_key = _pem_pair(staged, "server", _server_certificate(renewed_ca))
    for source, target in ((new_key, key_path), (new_cert, cert_path)):
        Path(str(target) + ".new").write_bytes(source.read_bytes())
        Path(str(target) + ".new").replace(target)
    assert mbpoll(tunnel("plc", renewed_ca_pem), "1", 0, 1)[0] != 0           # nothing changes before the reload
    assert cell.plc.reload_certificate("test") is True
    rc, values, err = mbpoll(tunnel("plc", renewed_ca_pem), "1", 0, 1)
    assert rc == 0 and values == [1], err
    assert mbpoll(tunnel("plc"), "1", 0, 1)[0] != 0                           # the old certificate is gone
    _, other_key = _pem_pair(staged, "other", _server_certificate(renewed_ca))
    Path(key_path).write_bytes(other_key.read_bytes())                       # a renewal gone wrong
    assert cell.plc.reload_certificate("test") is False
    rc, values, err = mbpoll(tunnel("plc", renewed_ca_pem), "1", 0, 1)
    assert rc == 0 and values == [1], err                                      # the last good pair stays


def _role_der(role: str) -> bytes:
    """An ASN.1 UTF8String (tag 0x0C, short or long length form), written here by hand."""
    data = role.encode("utf-8")
    length = bytes([len(data)]) if len(data) < 0x80 else bytes([0x81, len(data)])
    return b"\x0c" + length + data


def _with_role(issuer: Issued, name: str, role_der) -> Issued:
    """An application certificate of ``issuer`` whose Modbus role extension holds ``role_der`` (None: none)."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer.cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if role_der is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(
            x509.ObjectIdentifier("1.3.6.1.4.1.50316.802.1"), role_der), critical=False)
    return Issued(builder.sign(issuer.key, hashes.SHA256()), key)


def test_certificate_role_reads_the_modbus_role_extension():
    from mrkd.runtime.plc.modbus_security import certificate_role, parse_roles
    ca = authority("role CA")
    long_role = "line-7-" + "x" * 150                                        # long length form
    cases = {"operator": _role_der("operator"), long_role: _role_der(long_role), "Prüfer": _role_der("Prüfer")}
    for role, der in cases.items():
        assert certificate_role(_with_role(ca, "c", der).der) == role
    for broken in (None, b"\x13\x08operator", b"\x0c\x09operator", b"\x0c", b"\x0c\x02\xff\xfe"):
        assert certificate_role(_with_role(ca, "c", broken).der) is None, broken   # absent, wrong type, ...
    assert certificate_role(b"junk") is None
    assert parse_roles(" operator, engineer ") == frozenset({"operator", "engineer"})
    with pytest.raises(PlcError, match="expected role names"):
        parse_roles("operator,,engineer")


def test_only_a_write_role_may_trigger_others_read_and_get_illegal_function(model, tmp_path):  # noqa: F811
    """--modbus-write-roles operator: the operator's certificate runs the handshake through mbpoll; a
    monitor's and a certificate without a role read the map, and each of their writes is answered with
    exception 01 (libmodbus: "Illegal function") and changes nothing."""
    socat = require_program("socat", ["socat"])
    require_program("mbpoll", ["mbpoll"])
    ca, folder, trust, ca_pem, cert, key = _cell_pki(tmp_path, "cell 5 CA")
    pairs = {name: _pem_pair(folder, name, _with_role(ca, name, role))
             for name, role in (("operator", _role_der("operator")), ("monitor", _role_der("monitor")),
                                ("nobody", None))}
    part_images(tmp_path / "parts", "g")
    cell = Cell(model, str(tmp_path / "parts"),
                security=ModbusSecurity(str(cert), str(key), str(trust), frozenset({"operator"})))
    tunnels = {name: Tunnel(socat, cell.port, ca_pem, *pair) for name, pair in pairs.items()}
    try:
        for name in ("monitor", "nobody"):
            port = tunnels[name].port
            rc, values, err = mbpoll(port, "1", 0, 2)
            assert rc == 0 and values == [1, 0], (name, err)                  # reads: online, not enabled
            rc, _, err = mbpoll(port, "0", TRIGGER_ENABLE, write=[1])
            assert rc != 0 and "Illegal function" in err, (name, rc, err)
            assert mbpoll(port, "1", DI["trigger_ready"], 1)[1] == [0]          # the write changed nothing
        assert cell.plc.writes_refused == 2
        port = tunnels["operator"].port
        for table, ref, value in (("0", TRIGGER_ENABLE, 1), ("4", PART_ID, 12), ("0", TRIGGER, 1)):
            rc, _, err = mbpoll(port, table, ref, write=[value])
            assert rc == 0, err
        deadline = time.monotonic() + 10
        while mbpoll(port, "1", DI["results_valid"], 1)[1] != [1]:
            assert time.monotonic() < deadline, "no result"
        assert mbpoll(tunnels["monitor"].port, "3", 0, 3)[1] == [1, 1, 12]      # the monitor reads the result
        assert "write(s) refused by role" in cell.plc.health().detail
    finally:
        for tunnel in tunnels.values():
            tunnel.close()
        cell.close()
