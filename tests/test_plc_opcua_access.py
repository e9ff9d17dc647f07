"""What a generic OPC UA client (a HMI, UaExpert) is told it may do on the VisionSystem: OPC 10000-3 gives
each method UserExecutable, whether it is executable taking the current user into account, and each
variable UserAccessLevel likewise. node-opcua (tests/opcua_client/access.js) reads them as an anonymous
session and as the user, and subscribes to UserExecutable (subscribe_access.js), as some HMIs do. Before,
an anonymous session read UserExecutable true on the methods it is refused (BadUserAccessDenied), so a
HMI offered them and the operator learnt only from the refusal; then a Read was answered per session,
but a subscription to it was still sent true."""

from __future__ import annotations

import json
import subprocess

import pytest

pytest.importorskip("asyncua", reason="SKIPPED, NOT TESTED: asyncua missing (pip install 'mrkd[plc]')")

from plc_fixtures import OPCUA_CLIENT_DIR, folder_cell  # noqa: E402
from test_plc_opcua import PASSWORD, USER, node_client_ready  # noqa: E402

from mrkd.runtime.plc.opcua import OpcUaPlc  # noqa: E402

RESULT_METHODS = {f"ResultManagement/{name}" for name in
                  ("GetResultById", "GetResultListFiltered", "ReleaseResultHandle")}
WRITE_BITS = 0x02 | 0x08 | 0x20 | 0x40        # CurrentWrite, HistoryWrite, StatusWrite, TimestampWrite


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> dict:
    """The default VisionSystem and one with anonymous calls allowed (both over the same cell, both with
    the user), as {url: "default" | "anonymous calls"}."""
    runner = folder_cell(tmp_path_factory.mktemp("access"), "g")
    default = OpcUaPlc(runner, "opc.tcp://127.0.0.1:0", user=USER, password=PASSWORD).start()
    open_calls = OpcUaPlc(runner, "opc.tcp://127.0.0.1:0", user=USER, password=PASSWORD, anonymous_calls=True).start()
    runner.start()
    try:
        yield {default.url: "default", open_calls.url: "anonymous calls"}
    finally:
        runner.stop()
        default.close()
        open_calls.close()


def client_answers(servers: dict, script: str, kind: str) -> dict:
    """What a node-opcua script of tests/opcua_client (``node SCRIPT USER PASSWORD URL...``) printed as
    its ``kind`` lines, one per server and session: {(server, session): answer}."""
    done = subprocess.run([node_client_ready(), script, USER, PASSWORD, *servers], cwd=OPCUA_CLIENT_DIR,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith(f'{{"kind":"{kind}"')]
    return {(servers[line["url"]], line["session"]): line for line in lines}


@pytest.fixture(scope="module")
def answers(servers) -> dict:
    """access.js's answers as an anonymous session and as the user, on both servers."""
    return client_answers(servers, "access.js", "access")


def user_executable(answer: dict) -> dict:
    return {path: method["userExecutable"] for path, method in answer["methods"].items()}


def test_user_executable_says_which_methods_this_session_may_call(answers):
    anonymous, operator = answers["default", "anonymous"], answers["default", "user"]
    anonymous_allowed = answers["anonymous calls", "anonymous"]
    assert len(answers) == 4
    methods = set(anonymous["methods"])
    # the VisionStateMachine's 7, AutomaticModeStateMachine's 4, RecipeManagement's 3 and the result methods
    assert len(methods) == 18 and RESULT_METHODS < methods and "Server/GetMonitoredItems" in methods
    for answer in answers.values():
        assert all(method["executable"] is True for method in answer["methods"].values())
    assert user_executable(anonymous) == {path: path in RESULT_METHODS for path in methods}
    assert anonymous["call"] == "BadUserAccessDenied"          # the refusal its UserExecutable announced
    assert user_executable(operator) == dict.fromkeys(methods, True)
    assert operator["call"] == "BadInvalidArgument"            # admitted, then its wrong argument refused
    assert user_executable(anonymous_allowed) == dict.fromkeys(methods, True)
    assert anonymous_allowed["call"] == "BadInvalidArgument"
    assert user_executable(answers["anonymous calls", "user"]) == dict.fromkeys(methods, True)
    # Browse's ReferenceDescription carries no UserExecutable: a client learns it by reading it
    assert not any("executable" in field.lower() for field in anonymous["browseFields"])


def test_nobody_is_told_a_variable_is_writable(answers):
    """Nobody may write (mrkd refuses every Write): no variable's UserAccessLevel says it may be written,
    not even ServerDiagnostics/EnabledFlag, whose AccessLevel (the nodeset's) says it is writable."""
    for answer in answers.values():
        variables = answer["variables"]
        assert "ResultManagement/LastResult/Verdict" in variables and len(variables) > 15
        assert variables["Server/ServerDiagnostics/EnabledFlag"]["accessLevel"] & 0x02
        assert not [path for path, v in variables.items() if v["userAccessLevel"] & WRITE_BITS]
        assert all(v["userAccessLevel"] & 0x01 for v in variables.values())      # and all may be read


def test_a_subscription_to_user_executable_is_told_what_a_read_is(servers):
    """A HMI that subscribes to UserExecutable (a MonitoredItem on that attribute) rather than reading it
    is sent the same per-session value as a Read, in the item's first notification and again when a
    Disabled item is set to Reporting. Before, asyncua sent every session the node's stored true: an
    anonymous session was told it may call StartSingleJob, whose call is refused (BadUserAccessDenied)."""
    subscribed = client_answers(servers, "subscribe_access.js", "subscribed")
    assert len(subscribed) == 4
    anonymous = subscribed["default", "anonymous"]
    assert anonymous["read"] == {"StartSingleJob": False, "GetResultById": True, "GetMonitoredItems": False}
    assert anonymous["notified"] == {"StartSingleJob": False, "GetResultById": True, "GetMonitoredItems": False,
                                     "StartSingleJob (re-enabled)": False}
    for who in (("default", "user"), ("anonymous calls", "anonymous"), ("anonymous calls", "user")):
        assert subscribed[who]["read"] == dict.fromkeys(("StartSingleJob", "GetResultById", "GetMonitoredItems"),
                                                        True), who
        assert subscribed[who]["notified"] == dict.fromkeys(
            ("StartSingleJob", "GetResultById", "GetMonitoredItems", "StartSingleJob (re-enabled)"), True), who
    # The session's user changes (ActivateSession with the other identity): the item is told the new user's
    # value where it differs (asyncua sent nothing: the operator who logged in on the HMI's anonymous session
    # went on being told he may not call StartSingleJob), and nothing where it is the same.
    assert subscribed["default", "anonymous"]["changed"] is True
    assert subscribed["default", "user"]["changed"] is False
    assert subscribed["anonymous calls", "anonymous"]["changed"] == "none"
    assert subscribed["anonymous calls", "user"]["changed"] == "none"
