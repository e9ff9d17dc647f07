"""The OPC UA VisionSystem of a real part runner as a careless or hostile client calls it, with
node-opcua (npm) as the independent client (tests/opcua_client/hostile.js): arguments of the wrong
count, kind (an array for a String) and size, recipe numbers Python reads as digits but cannot convert,
and a method called on an object it does not belong to. Each call ends in the status OPC UA Part 4
gives for it, no part is made, nothing is logged as a traceback, and a good call still works after."""

from __future__ import annotations

import json
import logging
import os
import subprocess

import pytest

from test_plc_opcua import CLIENT_DIR, PASSWORD, USER, node_client_ready, start_cell

pytest.importorskip("asyncua", reason="SKIPPED, NOT TESTED: asyncua missing (pip install 'mrkd[plc]')")


def test_wrong_arguments_are_refused_with_their_status_and_no_traceback(tmp_path, caplog):
    node = node_client_ready()
    caplog.set_level(logging.WARNING)
    runner, server = start_cell(tmp_path, "gg")
    try:
        done = subprocess.run([node, "hostile.js", server.url, USER, PASSWORD], cwd=CLIENT_DIR,
                              capture_output=True, text=True, timeout=120)
    finally:
        summary = runner.stop()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    seen = {line["name"]: line for line in map(json.loads, filter(lambda text: text.startswith("{"), done.stdout.splitlines()))}
    assert seen["Stop with an argument"]["status"] == "BadTooManyArguments"        # was BadUnexpectedError
    assert seen["Halt with two arguments"]["status"] == "BadTooManyArguments"
    assert seen["Halt on RecipeManagement"]["status"] == "BadMethodInvalid"        # was Good: it halted
    for name in ("PrepareRecipe of 100000 digits", "PrepareRecipe superscript two",
                 "StartSingleJob RecipeId superscript two"):
        assert seen[name]["status"] == "BadInvalidArgument", seen[name]               # were BadUnexpectedError
    assert seen["StartSingleJob MeasId an array"] == {
        "name": "StartSingleJob MeasId an array", "status": "BadInvalidArgument",
        "inputs": ["BadTypeMismatch", "Good", "Good", "Good"]}                       # was Good: a job started
    assert seen["StartSingleJob PartId of 1 MB"]["status"] == "BadInvalidArgument"
    assert seen["StartSingleJob PartId of 1 MB"]["inputs"][1] == "BadOutOfRange"
    assert seen["StartSingleJob"]["status"] == "Good"                                 # the state machine still works
    assert summary["parts"] == 1                                                       # the good call's part only
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info], caplog.text


def test_idle_connections_are_capped_and_closed_and_a_plc_gets_in_after(tmp_path, caplog, monkeypatch):
    """40 sockets that never say Hello: past MAX_CONNECTIONS each is closed at once, the rest when the
    activation deadline passes (asyncua's own: 1000 and 30 s), each warning said once per address, and
    node-opcua then runs a job. The old server held all 40."""
    import socket
    import time
    from urllib.parse import urlparse

    from mrkd.runtime.plc import opcua

    node = node_client_ready()
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(opcua, "ACTIVATION_DEADLINE_S", 6.0)
    runner, server = start_cell(tmp_path, "g")
    address = urlparse(server.url)
    sockets = []
    try:
        for _ in range(40):
            sockets.append(socket.create_connection((address.hostname, address.port), timeout=5))
        time.sleep(0.5)

        def closed(sock, wait):
            sock.settimeout(wait)
            try:
                return sock.recv(1) == b""
            except socket.timeout:
                return False
            except OSError:
                return True

        at_once = [closed(sock, 0.05) for sock in sockets]
        assert sum(at_once) == 40 - opcua.MAX_CONNECTIONS, at_once
        assert all(at_once[opcua.MAX_CONNECTIONS:])          # the newest ones, refused as they came
        assert all(closed(sock, 10.0) for sock in sockets)     # the rest at the activation deadline
        done = subprocess.run([node, "client.js", server.url, USER, PASSWORD, "1"], cwd=CLIENT_DIR,
                              capture_output=True, text=True, timeout=120)
    finally:
        for sock in sockets:
            sock.close()
        summary = runner.stop()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    calls = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"kind":"call"')]
    assert [c["status"] for c in calls] == ["Good"] and summary["parts"] == 1
    said = [r.getMessage() for r in caplog.records if r.name == "asyncua.server.binary_server_asyncio"]
    assert sum(m.startswith("Refusing connection from") for m in said) == 1, said
    assert sum(m.startswith("Closing idle connection from") for m in said) == 1, said


def test_a_node_that_cannot_load_the_opcua_client_skips_loudly(tmp_path, monkeypatch):
    node_client_ready()                       # the real node and node_modules first (npm ci when missing)
    # Debian 12's node 18 on the same node_modules prints this (seen with its nodejs 18.20.4 package).
    fake = tmp_path / "bin" / "node"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo v18.20.4; exit 0; fi\n'
                    'echo "Error [ERR_REQUIRE_ESM]: require() of ES Module hexy.js not supported." >&2\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(pytest.skip.Exception) as skipped:
        node_client_ready()
    reason = str(skipped.value)
    assert reason.startswith("SKIPPED, NOT TESTED:") and str(fake) in reason
    assert "v18.20.4" in reason and "ERR_REQUIRE_ESM" in reason and "20.19" in reason
