"""The OPC UA VisionSystem (runtime/plc/opcua.py) on the real part runner judging a folder of good
and defective parts, against two independent clients: node-opcua (npm, installed by the test into
tests/opcua_client) and asyncua's client. Jobs, ResultReady events and result variables, the state
machine's refusals, wrong argument types, anonymous and wrong-password sessions, continuous mode
running into an ERROR part (ResultState 4)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Tuple
from urllib.parse import urlparse

import cv2
import numpy as np
import pytest

from peers import require_node_client
from plc_fixtures import OPCUA_CLIENT_DIR, folder_cell
from runtime_fixtures import SIZE, THRESHOLD, build_tiny_model, normal_frame, reference_map

from mrkd.runtime.line.loop import Camera, Line
from mrkd.runtime.line.parts import ERROR_CODES, PartRunner
from mrkd.runtime.line.trigger import PartSettings
from mrkd.runtime.sources import ArraySource

pytest.importorskip("asyncua", reason="SKIPPED, NOT TESTED: asyncua missing (pip install 'mrkd[plc]')")

from asyncua import Client, ua  # noqa: E402

from mrkd.runtime.plc.opcua import NAMESPACE, OpcUaPlc  # noqa: E402

USER, PASSWORD = "operator", "line-7-secret"
PATTERN = "gdgdggdgdgd"          # the folder, in trigger order
CLIENT_DIR = OPCUA_CLIENT_DIR
# What tests/opcua_client/*.js require() (both in its package.json).
NODE_MODULES = ("node-opcua-client", "node-opcua-certificate-manager")


def reference_score(path) -> float:
    square = cv2.resize(cv2.imread(str(path)), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    return float(reference_map(square[None]).max())


def start_cell(folder: Path, pattern: str, **opcua) -> Tuple[PartRunner, OpcUaPlc]:
    """A one-camera cell judging folder/parts (``pattern``: g good, d defective, in trigger order) with
    the tiny model, behind a started VisionSystem for USER/PASSWORD (``opcua``: certificate, trust...)."""
    runner = folder_cell(folder, pattern, queue=2)
    server = OpcUaPlc(runner, "opc.tcp://127.0.0.1:0", user=USER, password=PASSWORD, **opcua).start()
    runner.observers.append(server)
    runner.start()
    return runner, server


def make_certificates(folder: Path, *clients: str) -> None:
    """Self-signed certificates (folder/<name>.pem key, folder/<name>.der certificate, application URI
    urn:mrkd:test-<name>) for "server" and each client name."""
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID

    async def make():
        for name, use in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                          *((client, ExtendedKeyUsageOID.CLIENT_AUTH) for client in clients)):
            await setup_self_signed_certificate(folder / f"{name}.pem", folder / f"{name}.der",
                                                f"urn:mrkd:test-{name}", "localhost", [use], {"commonName": name})
    asyncio.run(make())


def server_certificate(folder: Path) -> dict:
    """make_certificates' server certificate and key as OpcUaPlc options."""
    return {"certificate": str(folder / "server.der"), "private_key": str(folder / "server.pem")}


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    folder = tmp_path_factory.mktemp("opcua")
    runner, server = start_cell(folder, PATTERN)
    scores = [reference_score(p) for p in sorted((folder / "parts").iterdir())]
    yield runner, server, scores
    runner.stop()


class Events:
    def __init__(self):
        self.received = []

    def event_notification(self, event):
        self.received.append(event)


class Session:
    """An asyncua client session on the VisionSystem with its ResultReady events subscribed."""

    def __init__(self, url, user=USER, password=PASSWORD):
        self.client = Client(url)
        if user:
            self.client.set_user(user)
            self.client.set_password(password)
        self.events = Events()

    async def __aenter__(self):
        await self.client.connect()
        c = self.client
        self.ns = await c.get_namespace_index(NAMESPACE)
        self.system = await c.nodes.objects.get_child(f"{self.ns}:VisionSystem")
        self.machine = await self.system.get_child(f"{self.ns}:VisionStateMachine")
        self.recipes = await self.system.get_child(f"{self.ns}:RecipeManagement")
        self.last = await self.system.get_child([f"{self.ns}:ResultManagement", f"{self.ns}:LastResult"])
        event_type = await c.nodes.root.get_child(["0:Types", "0:EventTypes", "0:BaseEventType",
                                                   f"{self.ns}:ResultReadyEventType"])
        self.subscription = await c.create_subscription(5, self.events)
        await self.subscription.subscribe_events(self.system, event_type)
        return self

    async def __aexit__(self, *exc):
        await self.client.disconnect()

    async def call(self, name, *args, on=None):
        return await (on or self.machine).call_method(f"{self.ns}:{name}", *args)

    async def status_of(self, name, *args, on=None):
        try:
            await self.call(name, *args, on=on)
        except ua.UaStatusCodeError as error:
            return type(error).__name__
        return "Good"

    async def value(self, name, on=None):
        value = await (await (on or self.machine).get_child(f"{self.ns}:{name}")).read_value()
        return value.Text if isinstance(value, ua.LocalizedText) else value

    async def wait_events(self, count, timeout=10.0):
        for _ in range(int(timeout / 0.02)):
            if len(self.events.received) >= count:
                return self.events.received
            await asyncio.sleep(0.02)
        raise AssertionError(f"{len(self.events.received)} of {count} ResultReady events")


def test_asyncua_single_jobs_events_and_variables(cell):
    runner, server, scores = cell

    async def scenario():
        async with Session(server.url) as s:
            assert (await s.value("CurrentState"), await s.value("AutomaticModeState")) == ("Operational", "Ready")
            jobs = []
            for i in range(2):
                jobs.append(await s.call("StartSingleJob", f"meas-{i}", f"A-{i}", "", ""))
                await s.wait_events(i + 1)
                assert await s.value("AutomaticModeState") == "Ready"
            last = {n: await s.value(n, on=s.last) for n in ("ResultId", "JobId", "PartId", "Verdict", "Score",
                                                            "ResultState", "CameraScores")}
            return jobs, s.events.received, last

    jobs, events, last = asyncio.run(scenario())
    for i, (job, event) in enumerate(zip(jobs, events)):
        content = json.loads(event.ResultContent)
        assert (event.JobId, event.ResultId, event.PartId, event.ResultState) == (
            job, f"{runner.run_id}-{i + 1}", f"A-{i}", 1)
        assert job == f"{runner.run_id}-{i + 1}" and content["run_id"] == runner.run_id   # one job, one part each
        assert event.IsPartial is False and event.MeasId == f"meas-{i}"
        assert content["verdict"] == ("NG" if PATTERN[i] == "d" else "OK") and content["ok"] == (PATTERN[i] == "g")
        assert content["score"] == pytest.approx(scores[i], abs=1e-5) and content["threshold"] == THRESHOLD
        assert content["cameras"][0]["score"] == pytest.approx(scores[i], abs=1e-5)
    assert last["ResultId"] == f"{runner.run_id}-2" and last["JobId"] == jobs[1] and last["PartId"] == "A-1"
    assert last["Verdict"] == "NG" and last["ResultState"] == 1
    assert last["Score"] == pytest.approx(scores[1], abs=1e-5) and last["CameraScores"] == [pytest.approx(last["Score"])]



def node_client_ready() -> str:
    """node (apt's nodejs) and the modules the clients require() (npm ci into tests/opcua_client), each
    loaded once by that node; node's path."""
    return require_node_client(CLIENT_DIR, NODE_MODULES)

@pytest.mark.slow
def test_node_opcua_client_starts_jobs_and_receives_result_ready(cell):
    runner, server, scores = cell
    node = node_client_ready()
    first = runner.inspections
    done = subprocess.run([node, "client.js", server.url, USER, PASSWORD, "3"], cwd=CLIENT_DIR,
                          capture_output=True, text=True, timeout=120)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    calls = [line for line in lines if line["kind"] == "call"]
    events = [line for line in lines if line["kind"] == "event"]
    assert [c["status"] for c in calls] == ["Good"] * 3 and len(events) == 3
    for i, (call, event) in enumerate(zip(calls, events)):
        index = first + i
        assert event["jobId"] == call["jobId"] and event["resultId"] == f"{runner.run_id}-{index + 1}"
        assert event["partId"] == f"N-{i}" and event["resultState"] == 1 and event["isPartial"] is False
        assert event["resultContent"]["verdict"] == ("NG" if PATTERN[index] == "d" else "OK")
        assert event["resultContent"]["score"] == pytest.approx(scores[index], abs=1e-5)
    wrong = next(line for line in lines if line["kind"] == "wrong-types")
    assert wrong["status"] == "BadInvalidArgument" and wrong["inputs"][0] == "BadTypeMismatch"
    assert runner.inspections == first + 3          # the wrong call made no part


def test_state_machine_refusals_and_wrong_arguments(cell):
    runner, server, _ = cell
    before = runner.inspections

    async def scenario():
        async with Session(server.url) as s:
            results = {"int argument": await s.status_of("StartSingleJob", 5, "x", "", ""),
                       "missing argument": await s.status_of("StartSingleJob", "x"),
                       "unknown recipe": await s.status_of("StartSingleJob", "m", "p", "9", ""),
                       "stop when not continuous": await s.status_of("Stop"),
                       "abort when idle": await s.status_of("Abort"),
                       "prepare unknown recipe": await s.status_of("PrepareRecipe", "9", on=s.recipes),
                       "add recipe": await s.status_of("AddRecipe", "3", on=s.recipes),
                       "reset when operational": await s.status_of("Reset")}
            # Reset "shall always be executable" (OPC 40100-1 8.2.2.2): Operational -> Preoperational, offline
            results["after reset from operational"] = (await s.value("CurrentState"), runner.online)
            results["reset when preoperational"] = await s.status_of("Reset")
            results["job when preoperational"] = await s.status_of("StartSingleJob", "m", "p", "", "")
            await s.call("SelectModeAutomatic")
            await s.call("Halt")
            results["halted"] = (await s.value("CurrentState"), runner.online)
            results["job when halted"] = await s.status_of("StartSingleJob", "m", "p", "", "")
            results["automatic from halted"] = await s.status_of("SelectModeAutomatic")
            await s.call("Reset")
            results["after reset"] = await s.value("CurrentState")
            await s.call("SelectModeAutomatic")
            results["automatic"] = (await s.value("CurrentState"), await s.value("AutomaticModeState"), runner.online)
            results["prepare 0"] = await s.call("PrepareRecipe", "0", on=s.recipes)
            return results

    results = asyncio.run(scenario())
    assert results == {"int argument": "BadInvalidArgument", "missing argument": "BadArgumentsMissing",
                       "unknown recipe": "BadInvalidArgument", "stop when not continuous": "BadInvalidState",
                       "abort when idle": "BadInvalidState", "prepare unknown recipe": "BadInvalidArgument",
                       "add recipe": "BadNotSupported", "reset when operational": "Good",
                       "after reset from operational": ("Preoperational", False), "reset when preoperational": "Good",
                       "job when preoperational": "BadInvalidState",
                       "halted": ("Halted", False), "job when halted": "BadInvalidState",
                       "automatic from halted": "BadInvalidState", "after reset": "Preoperational",
                       "automatic": ("Operational", "Ready", True), "prepare 0": True}
    assert runner.inspections == before


def test_anonymous_reads_but_cannot_call_and_a_wrong_password_is_refused(cell):
    runner, server, _ = cell

    async def scenario():
        async with Session(server.url, user=None) as s:
            state = await s.value("CurrentState")
            refused = await s.status_of("StartSingleJob", "m", "p", "", "")
        try:
            async with Session(server.url, password="guess"):
                wrong = "connected"
        except ua.UaStatusCodeError as error:
            wrong = type(error).__name__
        return state, refused, wrong

    state, refused, wrong = asyncio.run(scenario())
    assert state == "Operational" and refused == "BadUserAccessDenied"
    assert wrong in ("BadUserAccessDenied", "BadIdentityTokenRejected", "BadIdentityTokenInvalid")


def test_a_wrong_user_name_still_has_its_password_compared(cell, monkeypatch):
    """The user name and the password are both compared whatever the first gives: with the second
    comparison skipped when the name was wrong, the answer's time told whether a name was right."""
    import hmac
    import mrkd.runtime.plc.opcua as opcua_module
    runner, server, _ = cell
    compared = []

    def counting_compare(given, expected):
        compared.append(given)
        return hmac.compare_digest(given, expected)
    monkeypatch.setattr(opcua_module, "hmac", type("CountingHmac", (), {"compare_digest": staticmethod(counting_compare)}))

    async def log_in(user, password):
        try:
            async with Session(server.url, user=user, password=password):
                return "connected"
        except ua.UaStatusCodeError as error:
            return type(error).__name__

    for user, password in (("intruder", PASSWORD), ("intruder", "guess"), (USER, "guess"), (USER, PASSWORD)):
        compared.clear()
        answer = asyncio.run(log_in(user, password))
        assert (answer == "connected") == ((user, password) == (USER, PASSWORD)), (user, password, answer)
        assert compared == [user.encode(), password.encode()], (user, password, compared)


def test_continuous_runs_into_the_folders_end_as_failed_results(cell):
    runner, server, _ = cell
    start = runner.inspections

    async def scenario():
        async with Session(server.url) as s:
            job = await s.call("StartContinuous", "meas-c", "", "", "")
            assert await s.value("AutomaticModeState") == "ContinuousExecution"
            for _ in range(500):
                if any(e.ResultState == 4 for e in s.events.received):
                    break
                await asyncio.sleep(0.02)
            await s.call("Stop")
            mode = await s.value("AutomaticModeState")
            return job, list(s.events.received), mode

    job, events, mode = asyncio.run(scenario())
    assert mode == "Ready" and job.startswith(f"{runner.run_id}-continuous-")
    ours = [e for e in events if e.JobId == job]
    remaining = len(PATTERN) - start
    assert [json.loads(e.ResultContent)["verdict"] for e in ours[:remaining]] == \
        [("NG" if k == "d" else "OK") for k in PATTERN[start:]]
    assert all(e.ResultState == 1 for e in ours[:remaining])
    failed = [e for e in ours if e.ResultState == 4]
    assert failed, "no failed result after the folder's end"
    content = json.loads(failed[0].ResultContent)
    assert content["verdict"] == "ERROR" and content["error_code"] == ERROR_CODES["source ended"]
    assert content["score"] is None


async def encrypted_session(url: str, folder: Path, name: str) -> Session:
    """A Session as client ``name`` (make_certificates' files) over Basic256Sha256 Sign&Encrypt."""
    session = Session(url)
    session.client.application_uri = f"urn:mrkd:test-{name}"
    await session.client.set_security_string(
        f"Basic256Sha256,SignAndEncrypt,{folder / (name + '.der')},{folder / (name + '.pem')}")
    return session


@pytest.mark.slow
def test_basic256sha256_sign_and_encrypt_only(tmp_path):
    """With a certificate the only endpoint is Basic256Sha256 Sign&Encrypt: an encrypted client with
    the user calls StartSingleJob and gets its event; a client without encryption finds no endpoint."""
    make_certificates(tmp_path, "client")
    runner, server = start_cell(tmp_path, "d", **server_certificate(tmp_path))

    async def scenario():
        async with await encrypted_session(server.url, tmp_path, "client") as s:
            job = await s.call("StartSingleJob", "m", "secure-1", "", "")
            events = await s.wait_events(1)
        try:
            async with Client(server.url):
                plain = "connected"
        except Exception as error:      # asyncua: no endpoint with the None policy
            plain = str(error)
        return job, events, plain

    try:
        job, events, plain = asyncio.run(scenario())
    finally:
        runner.stop()
    assert events[0].JobId == job and json.loads(events[0].ResultContent)["verdict"] == "NG"
    assert "No matching endpoints" in plain


@pytest.mark.slow
def test_trust_folder_admits_its_clients_and_refuses_others(tmp_path):
    """--opcua-trust: a client whose certificate is in the folder (PEM there, DER sent) connects and
    calls StartSingleJob; a client with another valid certificate is refused at its session."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    make_certificates(tmp_path, "client", "stranger")
    trust = tmp_path / "trusted"
    trust.mkdir()
    client_cert = x509.load_der_x509_certificate((tmp_path / "client.der").read_bytes())
    (trust / "client.pem").write_bytes(client_cert.public_bytes(Encoding.PEM))     # PEM in the folder
    (trust / "README.txt").write_text("not a certificate: ignored")
    runner, server = start_cell(tmp_path, "d", **server_certificate(tmp_path), trust=str(trust))

    async def scenario():
        async with await encrypted_session(server.url, tmp_path, "client") as s:
            job = await s.call("StartSingleJob", "m", "trusted-1", "", "")
            events = await s.wait_events(1)
        try:
            async with await encrypted_session(server.url, tmp_path, "stranger") as s:
                await s.call("StartSingleJob", "m", "stranger-1", "", "")
                refused = None
        except Exception as error:
            refused = error
        return job, events, refused

    try:
        job, events, refused = asyncio.run(scenario())
    finally:
        summary = runner.stop()
    assert events[0].JobId == job and events[0].PartId == "trusted-1"
    assert refused is not None and "BadCertificateUntrusted" in repr(refused), repr(refused)
    assert summary["triggers"] == 1     # the stranger's job never reached the line


async def raw_session_call(url: str, folder: Path, channel, presented, user=True) -> str:
    """CreateSession/ActivateSession/StartSingleJob by hand, past asyncua's client checks: the secure
    channel as ``channel`` (make_certificates' name; None: the None channel kept for discovery),
    CreateSession presenting ``presented``'s certificate. The status of the first refusal, or "Good"."""
    c = Client(url)
    if user:
        c.set_user(USER)
        c.set_password(PASSWORD)
    if channel:
        c.application_uri = f"urn:mrkd:test-{channel}"
        await c.set_security_string(
            f"Basic256Sha256,SignAndEncrypt,{folder / (channel + '.der')},{folder / (channel + '.pem')}")
    await c.connect_socket()
    try:
        await c.send_hello()
        await c.open_secure_channel()
        endpoints = await c.get_endpoints()
        params = ua.CreateSessionParameters(
            ClientNonce=b"\1" * 32, EndpointUrl=url, SessionName="raw", RequestedSessionTimeout=60000,
            ClientCertificate=(folder / f"{presented}.der").read_bytes() if presented else None,
            ClientDescription=ua.ApplicationDescription(ApplicationUri=f"urn:mrkd:test-{presented}",
                                                        ApplicationType=ua.ApplicationType.Client))
        c._server_nonce = (await c.uaclient.create_session(params)).ServerNonce
        c._policy_ids = endpoints[0].UserIdentityTokens
        await c.activate_session(username=USER if user else None, password=PASSWORD if user else None)
        ns = await c.get_namespace_index(NAMESPACE)
        machine = await c.nodes.objects.get_child([f"{ns}:VisionSystem", f"{ns}:VisionStateMachine"])
        await machine.call_method(f"{ns}:StartSingleJob", "m", "raw", "", "")
        return "Good"
    except ua.UaStatusCodeError as error:
        return type(error).__name__
    finally:
        c.disconnect_socket()


@pytest.mark.slow
def test_sessions_need_an_encrypted_channel_with_a_trusted_certificate(tmp_path):
    """Past the client's own checks: asyncua keeps a None channel open for discovery, and its
    CreateSession check sees only the certificate the request presents. A session over the None
    channel (with the user, or presenting the trusted certificate) or over the stranger's channel
    presenting the trusted client's (public) certificate is refused and starts no job."""
    make_certificates(tmp_path, "client", "stranger")
    trust = tmp_path / "trusted"
    trust.mkdir()
    shutil.copy(tmp_path / "client.der", trust / "client.der")
    runner, server = start_cell(tmp_path, "dg", **server_certificate(tmp_path), trust=str(trust))

    async def scenario():
        cases = {"none channel, user": (None, None), "none channel, anonymous": (None, None, False),
                 "none channel, trusted certificate": (None, "client"),
                 "stranger's channel, trusted certificate": ("stranger", "client"),
                 "trusted client": ("client", "client")}
        return {name: await raw_session_call(server.url, tmp_path, *case) for name, case in cases.items()}

    try:
        results = asyncio.run(scenario())
    finally:
        summary = runner.stop()
    assert results == {"none channel, user": "BadSecurityModeRejected",
                       "none channel, anonymous": "BadSecurityModeRejected",
                       "none channel, trusted certificate": "BadSecurityModeRejected",
                       "stranger's channel, trusted certificate": "BadCertificateUntrusted",
                       "trusted client": "Good"}
    assert summary["triggers"] == 1     # the trusted client's job only


def test_a_server_that_anyone_beyond_this_machine_may_read_says_so(tmp_path):
    """Anonymous sessions browse, read and subscribe: beyond loopback without a trust folder, whoever
    reaches the server reads every part's result (unencrypted without a certificate). mrkd run said
    nothing; the operator page says so in the same case. An anonymous asyncua session shows it is so."""
    from plc_fixtures import QueueTarget
    from mrkd.runtime.plc.servers import PlcSettings, start_plc_servers
    make_certificates(tmp_path, "client")
    (tmp_path / "trusted").mkdir()
    shutil.copy(tmp_path / "client.der", tmp_path / "trusted" / "client.der")
    secure = dict(opcua_certificate=str(tmp_path / "server.der"), opcua_private_key=str(tmp_path / "server.pem"))
    for settings, warned, unencrypted in (
            (PlcSettings(opcua="opc.tcp://127.0.0.1:0"), False, False),
            (PlcSettings(opcua="opc.tcp://0.0.0.0:0"), True, True),
            (PlcSettings(opcua="opc.tcp://0.0.0.0:0", **secure), True, False),
            (PlcSettings(opcua="opc.tcp://0.0.0.0:0", opcua_trust=str(tmp_path / "trusted"), **secure), False, False)):
        said = []
        servers = start_plc_servers(QueueTarget(), settings.check(), echo=said.append)
        try:
            warnings = [line for line in said if line.startswith("warning: ")]
            assert len(warnings) == warned and all("\n" not in line for line in said), (settings, said)
            if warned:
                assert "listens beyond this machine: whoever reaches it reads every part's result" in warnings[0]
                assert ("unencrypted" in warnings[0]) == unencrypted, warnings
                assert "--opcua-trust" in warnings[0], warnings
            if warned and unencrypted:        # what it says: an anonymous session reads the results
                port = urlparse(servers[0].url).port

                async def anonymous_read():
                    async with Session(f"opc.tcp://127.0.0.1:{port}/mrkd/", user=None) as session:
                        return await session.value("CurrentState"), await session.last.get_children()
                state, result_nodes = asyncio.run(anonymous_read())
                assert state == "Operational" and result_nodes, (state, result_nodes)
        finally:
            for server in servers:
                server.close()


def test_trust_folder_mistakes_are_one_line_errors(tmp_path):
    from mrkd.runtime.plc import PlcError
    from mrkd.runtime.plc.trust import load_trust_folder
    with pytest.raises(PlcError, match="not a folder"):
        load_trust_folder(str(tmp_path / "missing"))
    with pytest.raises(PlcError, match="no certificates"):
        load_trust_folder(str(tmp_path))
    (tmp_path / "bad.pem").write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(PlcError, match="bad.pem is not a certificate"):
        load_trust_folder(str(tmp_path))
    with pytest.raises(PlcError, match="needs the server's certificate"):
        OpcUaPlc(object.__new__(PartRunner), "opc.tcp://127.0.0.1:0", trust=str(tmp_path))


@pytest.mark.slow
def node_client(node: str, server, folder: Path, name: str, mode: str = "SignAndEncrypt", trusted_server=None,
                pki=None):
    """secure_client.js as client ``name`` (folder/name.der, name.pem, URI urn:mrkd:test-NAME), its PKI
    under ``folder`` (or ``pki``), trusting the server certificate folder/server.der (or ``trusted_server``):
    (the process, {kind: the last JSON line of that kind})."""
    done = subprocess.run([node, "secure_client.js", server.url, USER, PASSWORD, str(folder / f"{name}.der"),
                           str(folder / f"{name}.pem"), f"urn:mrkd:test-{name}", str(pki or folder / f"pki-{name}"),
                           str(trusted_server or folder / "server.der"), mode],
                          cwd=CLIENT_DIR, capture_output=True, text=True, timeout=120)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done, {line["kind"]: line for line in lines}


def test_node_opcua_client_certificates_and_the_trust_folder(tmp_path):
    """--opcua-trust against node-opcua: a client whose certificate is in the trust folder connects over
    Basic256Sha256 Sign&Encrypt and calls StartSingleJob; a client with another valid certificate is
    refused at its session and makes no part; a client without security finds no endpoint."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    node = node_client_ready()
    make_certificates(tmp_path, "client", "stranger")
    trust = tmp_path / "trusted"
    trust.mkdir()
    client_cert = x509.load_der_x509_certificate((tmp_path / "client.der").read_bytes())
    (trust / "client.pem").write_bytes(client_cert.public_bytes(Encoding.PEM))
    runner, server = start_cell(tmp_path, "dg", **server_certificate(tmp_path), trust=str(trust))
    try:
        trusted, seen = node_client(node, server, tmp_path, "client")
        assert trusted.returncode == 0, trusted.stdout[-2000:] + trusted.stderr[-2000:]
        after_trusted = runner.inspections
        stranger, refused = node_client(node, server, tmp_path, "stranger")
        plain, unsecured = node_client(node, server, tmp_path, "client", mode="None")
        after_others = runner.inspections
    finally:
        summary = runner.stop()
    assert seen["call"]["status"] == "Good" and after_trusted == 1
    event = seen["event"]
    assert event["jobId"] == seen["call"]["jobId"] and event["resultId"] == f"{runner.run_id}-1"
    assert event["partId"] == "node-secure-1"
    assert event["resultState"] == 1 and event["isPartial"] is False and event["resultContent"]["verdict"] == "NG"
    assert stranger.returncode == 1 and "session" not in refused and "call" not in refused, stranger.stdout[-2000:]
    assert refused["error"]["stage"] == "session", refused
    assert refused["error"]["status"] == "BadCertificateUntrusted", refused
    # node-opcua opens the None channel (discovery) but finds no None endpoint: no session asked for
    assert plain.returncode == 1 and unsecured["error"]["stage"] == "session", unsecured
    assert "End point must exist" in unsecured["error"]["message"], unsecured
    assert after_others == after_trusted and summary["triggers"] == 1     # only the trusted client's job


def test_node_opcua_clients_issued_by_a_trusted_authority_and_a_revoked_one(tmp_path):
    """A trust folder holding a certificate authority and its CRL (no client listed): node-opcua with a
    certificate that authority issued runs a job; one it revoked, and one signed by another key that
    claims the same issuer, are refused at their session (BadCertificateRevoked / BadCertificateUntrusted)."""
    from pki_fixtures import application, authority, revocation_list

    node = node_client_ready()
    make_certificates(tmp_path)                                   # the server's own (self-signed)
    ca = authority("line 7 CA")
    application(ca, "station").save(tmp_path, "station")
    revoked = application(ca, "revoked").save(tmp_path, "revoked")
    application(authority("elsewhere"), "forger", issuer_name=ca.cert.subject).save(tmp_path, "forger")
    trust = tmp_path / "trusted"
    trust.mkdir()
    (trust / "line7-ca.der").write_bytes(ca.der)
    (trust / "line7-ca.crl").write_bytes(revocation_list(ca, [revoked]))
    runner, server = start_cell(tmp_path, "dg", **server_certificate(tmp_path), trust=str(trust))
    try:
        admitted, seen = node_client(node, server, tmp_path, "station")
        assert admitted.returncode == 0, admitted.stdout[-2000:] + admitted.stderr[-2000:]
        refused = {name: node_client(node, server, tmp_path, name) for name in ("revoked", "forger")}
    finally:
        summary = runner.stop()
    assert seen["call"]["status"] == "Good" and seen["event"]["partId"] == "node-secure-1"
    for name, status in (("revoked", "BadCertificateRevoked"), ("forger", "BadCertificateUntrusted")):
        done, lines = refused[name]
        assert done.returncode == 1 and "call" not in lines, (name, done.stdout[-2000:])
        assert lines["error"]["stage"] == "session" and lines["error"]["status"] == status, (name, lines)
    assert summary["triggers"] == 1                              # the admitted station's job only


def test_node_opcua_client_through_an_intermediate_and_a_crl_renewed_while_running(tmp_path):
    """A trust folder holding a root authority, its intermediate in ``issuers`` and their CRLs, the
    root's overdue: node-opcua with a certificate the intermediate issued is refused at its session
    (BadCertificateIssuerRevocationUnknown); the root's renewed CRL moved into the folder of the running
    server (no restart), the same client runs a job."""
    import time
    from pki_fixtures import application, authority, revocation_list

    node = node_client_ready()
    make_certificates(tmp_path)                                   # the server's own (self-signed)
    root = authority("plant root CA")
    line_ca = authority("line 7 CA", issuer=root)
    application(line_ca, "station").save(tmp_path, "station")
    trust = tmp_path / "trusted"
    (trust / "issuers").mkdir(parents=True)
    (trust / "root.der").write_bytes(root.der)
    (trust / "root.crl").write_bytes(revocation_list(root, [], next_update_days=-1))
    (trust / "issuers" / "line7.der").write_bytes(line_ca.der)
    (trust / "issuers" / "line7.crl").write_bytes(revocation_list(line_ca, []))
    runner, server = start_cell(tmp_path, "dg", **server_certificate(tmp_path), trust=str(trust))
    try:
        overdue, refused = node_client(node, server, tmp_path, "station")
        (trust / "root.crl.new").write_bytes(revocation_list(root, []))
        os.replace(trust / "root.crl.new", trust / "root.crl")
        time.sleep(1.2)                                           # the folder is looked at once a second at most
        admitted, seen = node_client(node, server, tmp_path, "station")
    finally:
        summary = runner.stop()
    assert overdue.returncode == 1 and "call" not in refused, overdue.stdout[-2000:]
    assert refused["error"]["stage"] == "session", refused
    assert refused["error"]["status"] == "BadCertificateIssuerRevocationUnknown", refused
    assert admitted.returncode == 0, admitted.stdout[-2000:] + admitted.stderr[-2000:]
    assert seen["call"]["status"] == "Good" and seen["event"]["partId"] == "node-secure-1"
    assert summary["triggers"] == 1                              # the job after the renewal only


def test_node_opcua_sees_a_renewed_server_certificate_after_a_reload(tmp_path):
    """reload_certificate (SIGHUP in `mrkd run`): node-opcua trusting only the renewed server certificate
    runs a job after the reload, one trusting only the old is refused as it connects; a key that is not
    the certificate's, and a certificate naming another application URI, are refused and the renewed
    certificate keeps being served."""
    node = node_client_ready()
    make_certificates(tmp_path, "client")
    shutil.copy(tmp_path / "server.der", tmp_path / "old-server.der")
    staged, other = tmp_path / "staged", tmp_path / "other"
    staged.mkdir()
    other.mkdir()
    make_certificates(staged)                                     # the renewal: same URI, a new key
    make_certificates(other, "intruder")                          # URI urn:mrkd:test-intruder
    shutil.copy(staged / "server.der", tmp_path / "renewed-server.der")
    runner, server = start_cell(tmp_path, "ddd", **server_certificate(tmp_path))
    try:
        before, _ = node_client(node, server, tmp_path, "client", pki=tmp_path / "pki-1")
        for name in ("server.pem", "server.der"):
            os.replace(staged / name, tmp_path / name)
        assert server.reload_certificate("test") is True
        renewed, seen = node_client(node, server, tmp_path, "client", pki=tmp_path / "pki-2")
        stale, refused = node_client(node, server, tmp_path, "client", trusted_server=tmp_path / "old-server.der",
                                     pki=tmp_path / "pki-3")
        shutil.copy(other / "intruder.pem", tmp_path / "server.pem")     # not the certificate's key
        assert server.reload_certificate("test") is False
        shutil.copy(other / "intruder.der", tmp_path / "server.der")     # a matching pair, another URI
        assert server.reload_certificate("test") is False
        kept, _ = node_client(node, server, tmp_path, "client", trusted_server=tmp_path / "renewed-server.der",
                              pki=tmp_path / "pki-4")
    finally:
        summary = runner.stop()
    for done in (before, renewed, kept):
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert seen["call"]["status"] == "Good" and seen["event"]["partId"] == "node-secure-1"
    assert stale.returncode == 1 and "session" not in refused, stale.stdout[-2000:]
    assert refused["error"]["stage"] == "connect" and "certificate" in refused["error"]["message"].lower(), refused
    assert summary["triggers"] == 3                              # before, after the reload, after the refusals


class HeldCell:
    """A cell whose camera gives each part's image only when the test says so (``release()``): a part
    stays in flight while the client aborts, starts jobs, or another trigger source triggers."""

    def __init__(self, folder: Path):
        self.gate = threading.Semaphore(0)
        model = str(build_tiny_model(folder / "tiny.onnx"))
        rng = np.random.default_rng(3)
        frames = [normal_frame(rng) for _ in range(4)]

        def held_frames():
            for index in range(10_000):
                self.gate.acquire()
                yield frames[index % len(frames)]

        line = Line((Camera("cam", "held-camera", model, trigger="software"),))
        settings = PartSettings(queue=4, timeout=30.0)
        self.runner = PartRunner(line, {"cam": ArraySource(held_frames(), uri="held-camera")}, settings,
                                 status=lambda text: None)
        self.server = OpcUaPlc(self.runner, "opc.tcp://127.0.0.1:0", user=USER, password=PASSWORD).start()
        self.runner.observers.append(self.server)
        self.runner.start()

    def release(self) -> None:
        self.gate.release()

    def close(self) -> None:
        for _ in range(16):        # nothing may wait for an image at the end
            self.gate.release()
        self.runner.stop()


@pytest.fixture
def held_cell(tmp_path):
    cell = HeldCell(tmp_path)
    yield cell
    cell.close()


def test_a_part_another_source_triggered_with_the_jobs_part_id_never_answers_the_job(held_cell):
    """stdin (or a Modbus PLC) and an MES over OPC UA number parts alike: the job's ResultReady is its
    own part's. Before, results were matched to jobs by part id only: the other source's part "7",
    triggered first, came out with the job's JobId (and ended SingleExecution), the job's own with none."""
    cell = held_cell

    async def scenario():
        async with Session(cell.server.url) as s:
            other = cell.runner.trigger("7")             # as --trigger-stdin does
            assert other.accepted
            job = await s.call("StartSingleJob", "meas-7", "7", "", "")
            cell.release()                               # the other source's part is judged
            await s.wait_events(1)
            mode_after_other = await s.value("AutomaticModeState")
            cell.release()                               # the job's part
            await s.wait_events(2)
            return job, mode_after_other, await s.value("AutomaticModeState"), s.events.received

    job, mode_after_other, mode_after_job, events = asyncio.run(scenario())
    run = cell.runner.run_id
    assert [(e.ResultId, e.PartId, e.JobId) for e in events] == [(f"{run}-1", "7", ""), (f"{run}-2", "7", job)]
    assert events[1].MeasId == "meas-7" and events[0].MeasId == ""
    assert (mode_after_other, mode_after_job) == ("SingleExecution", "Ready")


def test_an_aborted_jobs_late_result_does_not_end_the_next_job(held_cell):
    """Abort goes back to Ready while the aborted job's part is still judged; the job started next
    stays SingleExecution until its own result. Before, the aborted job's result set Ready with the
    next job still in flight, so a client waiting for Ready read the earlier part as its own."""
    cell = held_cell

    async def scenario():
        async with Session(cell.server.url) as s:
            first = await s.call("StartSingleJob", "m-a", "A", "", "")
            await s.call("Abort")
            assert await s.value("AutomaticModeState") == "Ready"
            second = await s.call("StartSingleJob", "m-b", "B", "", "")
            cell.release()                               # the aborted job's part
            await s.wait_events(1)
            mode_after_first = await s.value("AutomaticModeState")
            refused = await s.status_of("StartSingleJob", "m-c", "C", "", "")
            cell.release()                               # the running job's part
            await s.wait_events(2)
            return first, second, mode_after_first, refused, await s.value("AutomaticModeState"), s.events.received

    first, second, mode_after_first, refused, mode_after_second, events = asyncio.run(scenario())
    assert [(e.PartId, e.JobId) for e in events] == [("A", first), ("B", second)]
    assert (mode_after_first, refused, mode_after_second) == ("SingleExecution", "BadInvalidState", "Ready")
    assert cell.runner.triggers == 2          # the refused StartSingleJob made no part


def test_a_job_accepted_before_the_run_ends_gets_its_result_ready_in_node_opcua(tmp_path):
    """The server stopped as the run ended: the part of a job accepted just before was judged, but its
    ResultReady was still queued in the client's subscription when the server went, so node-opcua
    never saw it. Now the server stays up until the event has left for the client (at most
    OpcUaPlc.RESULTS_LINGER_S)."""
    import time
    node = node_client_ready()
    cell = HeldCell(tmp_path)
    client = subprocess.Popen([node, "client.js", cell.server.url, USER, PASSWORD, "1"], cwd=CLIENT_DIR,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while cell.runner.triggers == 0 and time.monotonic() < deadline and client.poll() is None:
            time.sleep(0.02)
        assert cell.runner.triggers == 1, client.communicate(timeout=5)
        cell.release()                     # its image comes as the run ends
        summary = cell.runner.stop()       # the part is judged in the stop's drain
        assert summary["parts"] == 1
        try:       # with the server gone, node-opcua may go on trying to reconnect: what it printed counts
            out, err = client.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            client.kill()
            out, err = client.communicate()
    finally:
        cell.close()
        if client.poll() is None:
            client.kill()
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    calls = [line for line in lines if line["kind"] == "call"]
    events = [line for line in lines if line["kind"] == "event"]
    assert [c["status"] for c in calls] == ["Good"], out + err[-2000:]
    assert len(events) == 1 and events[0]["jobId"] == calls[0]["jobId"] and events[0]["partId"] == "N-0", out
