"""The OPC UA VisionSystem as an MES or SCADA finds it through the Server object (an outside probe as an
integrator: node-opcua, tests/opcua_client/server_events.js). OPC 10000-3 4.7.1: the events a server
generates are available via the Server object; OPC 10000-9 6.2: the Server object is the root of the
HasNotifier hierarchy. Many MES and SCADA connectors subscribe to events there only. And the BuildInfo an
asset inventory records names mrkd, not the OPC UA library under it."""

from __future__ import annotations

import json
import subprocess

import pytest

pytest.importorskip("asyncua", reason="SKIPPED, NOT TESTED: asyncua missing (pip install 'mrkd[plc]')")

from plc_fixtures import OPCUA_CLIENT_DIR, folder_cell  # noqa: E402
from test_plc_opcua import PASSWORD, USER, node_client_ready  # noqa: E402

import mrkd  # noqa: E402
from mrkd.runtime.plc.opcua import OpcUaPlc  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    runner = folder_cell(tmp_path_factory.mktemp("server-object"), "gdgd")
    server = OpcUaPlc(runner, "opc.tcp://127.0.0.1:0", user=USER, password=PASSWORD).start()
    runner.observers.append(server)
    runner.start()
    yield runner, server
    runner.stop()


def run_client(server, count: int) -> dict:
    node = node_client_ready()
    done = subprocess.run([node, "server_events.js", server.url, USER, PASSWORD, str(count)], cwd=OPCUA_CLIENT_DIR,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {line["kind"]: line for line in lines}


def test_result_ready_events_reach_a_subscriber_of_the_server_object(served):
    runner, server = served
    first = runner.inspections
    seen = run_client(server, 3)
    assert seen["call"]["status"] == "Good"
    expected = [[f"{runner.run_id}-{first + i + 1}", f"S-{i}"] for i in range(3)]
    assert seen["events"]["atVisionSystem"] == expected
    # each part once at the Server object too, its source still the VisionSystem
    assert seen["events"]["atServer"] == [[*pair, "VisionSystem"] for pair in expected]
    assert "VisionSystem" in seen["notifiers"]["browseNames"]


def test_build_info_names_mrkd_and_its_version(served):
    _, server = served
    build = run_client(server, 0)["build"]
    assert build["productName"].startswith("mrkd") and build["manufacturerName"] != "FreeOpcUa"
    assert build["softwareVersion"] == mrkd.__version__ and "freeopcua" not in build["productUri"]
    # the server's own namespace (index 1) is its application URI (OPC 10000-5 6.3.1)
    assert build["applicationUri"].startswith("urn:mrkd:"), build
