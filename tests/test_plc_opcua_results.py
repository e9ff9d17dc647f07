"""ResultManagement's result retrieval (OPC 40100-1 7.10.2; runtime/plc/opcua_results.py): an MES whose
connection was down longer than its session timeout lost its session, its subscription and the
ResultReady events of that gap; it gets those results with GetResultListFiltered, as node-opcua
(tests/opcua_client/results.js) decodes them from the server's DataTypeDefinitions (ResultDataType).
Before, ResultManagement had LastResult only: nothing let a client fetch what it missed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from peers import require_node_client
from plc_fixtures import OPCUA_CLIENT_DIR, NodeOpcuaSteps, folder_cell

pytest.importorskip("asyncua", reason="SKIPPED, NOT TESTED: asyncua missing (pip install 'mrkd[plc]')")

from asyncua import Client, ua  # noqa: E402

from mrkd.runtime.plc.opcua import NAMESPACE, OpcUaPlc  # noqa: E402
from test_plc_opcua_reconnect import Relay, wait_for  # noqa: E402

USER, PASSWORD = "operator", "line-7-secret"
SERVER_HOST, RELAY_HOST = "127.0.86.69", "127.0.86.71"
# The nodeset's argument lists (ResultManagementType, ns=1;i=1007): names, the DataTypes' browse names
# (the nodeset's TrimmedString and Handle are namespace 0's since OPC UA 1.05) and value ranks
RESULT_METHODS = {
    "GetResultById": {"inputs": [["ResultId", "ResultIdDataType", -1], ["Timeout", "Int32", -1]],
                      "outputs": [["ResultHandle", "Handle", -1], ["Result", "ResultDataType", -1],
                                  ["Error", "Int32", -1]]},
    "GetResultListFiltered": {
        "inputs": [["ResultState", "ResultStateDataType", -1], ["MeasId", "MeasIdDataType", -1],
                   ["PartId", "PartIdDataType", -1], ["ExternalRecipeId", "RecipeIdExternalDataType", -1],
                   ["InternalRecipeId", "RecipeIdInternalDataType", -1],
                   ["ExternalConfigurationId", "ConfigurationIdDataType", -1],
                   ["InternalConfigurationId", "ConfigurationIdDataType", -1], ["ProductId", "ProductIdDataType", -1],
                   ["JobId", "JobIdDataType", -1], ["MaxResults", "UInt32", -1], ["StartIndex", "UInt32", -1],
                   ["Timeout", "Int32", -1]],
        "outputs": [["IsComplete", "Boolean", -1], ["ResultCount", "UInt32", -1], ["ResultHandle", "Handle", -1],
                    ["ResultList", "ResultDataType", 1], ["Error", "Int32", -1]]},
    "ReleaseResultHandle": {"inputs": [["ResultHandle", "Handle", -1]], "outputs": [["Error", "Int32", -1]]},
}


def judge(runner, parts, total: int) -> None:
    """Trigger ``parts`` one after the other (each judged before the next) until ``total`` are judged."""
    for part in parts:
        done = runner.inspections
        assert runner.trigger(part).accepted
        wait_for(lambda: runner.inspections > done, 10, f"part {part} judged")
    assert runner.inspections == total
    time.sleep(0.3)          # their results published on the server's loop


@pytest.mark.slow
def test_a_client_back_after_its_session_timed_out_fetches_the_results_it_missed(tmp_path: Path):
    """node-opcua subscribed to ResultReady; its connection is cut for longer than its session timeout
    (5 s) while three parts are judged: mrkd closes the session and its subscription, and node-opcua,
    back, has to create a new session. Those three events never reach it; GetResultListFiltered, paged
    two at a time from the newest, gives every result after the last one it had, with part ids and
    verdicts, in order, none missing and none twice."""
    node = require_node_client(OPCUA_CLIENT_DIR, ("node-opcua-client",))
    runner = folder_cell(tmp_path, "gdgdg", queue=4)
    server = OpcUaPlc(runner, f"opc.tcp://{SERVER_HOST}:0", user=USER, password=PASSWORD).start()
    runner.observers.append(server)
    runner.start()
    relay = Relay(int(server.url.rsplit(":", 1)[1].split("/")[0]), host=RELAY_HOST, target_host=SERVER_HOST)
    client = None
    try:
        client = NodeOpcuaSteps(node, "results.js", f"opc.tcp://{RELAY_HOST}:{relay.port}/mrkd/", USER, PASSWORD)
        first_session = client.ask("session")["sessionId"]
        judge(runner, ["before"], 1)
        assert [e["partId"] for e in client.ask("events 1")["events"]] == ["before"]
        relay.cut()
        judge(runner, ["gap-1", "gap-2", "gap-3"], 4)
        subscriptions = server._server.iserver.subscription_service.subscriptions
        wait_for(lambda: not subscriptions, 20, "mrkd closing the session and its subscription (5 s timeout)")
        relay.restore()
        second_session = client.ask("restored")["sessionId"]
        judge(runner, ["after"], 5)
        events = client.ask("events 2")["events"]
        missed = client.ask(f"missed {runner.run_id}-1 2")
    finally:
        if client is not None:
            client.close()
        relay.close()
        runner.stop()
    assert second_session != first_session
    # the gap's events are gone with the old session: what the methods are for
    rid = lambda n: f"{runner.run_id}-{n}"  # noqa: E731
    assert [(e["resultId"], e["partId"]) for e in events] == [(rid(1), "before"), (rid(5), "after")]
    assert [(r["resultId"], r["partId"], r["verdict"], r["resultState"], r["type"]) for r in missed["results"]] == [
        (rid(2), "gap-1", "NG", 1, "ResultDataType"), (rid(3), "gap-2", "OK", 1, "ResultDataType"),
        (rid(4), "gap-3", "NG", 1, "ResultDataType"), (rid(5), "after", "OK", 1, "ResultDataType")]
    # newest first, pages of two, until the page that reaches ResultId 1
    assert missed["pages"] == [[0, [rid(5), rid(4)]], [2, [rid(3), rid(2)]], [4, [rid(1)]]]
    times = [r["creationTime"] for r in missed["results"]]
    assert times == sorted(times) and len(set(times)) == 4


@pytest.mark.slow
def test_get_result_by_id_the_list_s_filters_and_the_history_bound(tmp_path: Path):
    """The nodeset's argument lists and types; GetResultById of a result the history no longer holds
    (pushed out past its bound, here 3) or never held answers BadNotFound; the list holds the last 3."""
    node = require_node_client(OPCUA_CLIENT_DIR, ("node-opcua-client",))
    runner = folder_cell(tmp_path, "gdgdg", queue=4)
    server = OpcUaPlc(runner, f"opc.tcp://{SERVER_HOST}:0", user=USER, password=PASSWORD, result_history=3).start()
    runner.observers.append(server)
    runner.start()
    client = None
    try:
        judge(runner, [f"P-{i}" for i in range(1, 6)], 5)
        client = NodeOpcuaSteps(node, "results.js", server.url, USER, PASSWORD)
        described = client.ask("describe")["methods"]
        latest = client.ask(f"byid {runner.run_id}-5")
        as_text = client.ask(f"byid-text {runner.run_id}-3")
        pushed_out = [client.ask(f"byid {runner.run_id}-{i}")["status"] for i in (1, 2)]
        never = client.ask(f"byid {runner.run_id}-6")["status"]
        bare_number = client.ask("byid 5")["status"]          # another run's id for all it knows
        everything = client.ask("page 0 0")
        first_two, rest = client.ask("page 2 0"), client.ask("page 2 2")
        past_the_end = client.ask("page 2 4")
        one_part, gone_part = client.ask("page 0 0 P-4"), client.ask("page 0 0 P-1")
        released = client.ask(f"release {latest['handle']}")
        unknown_handle = client.ask("release 4000000000")
    finally:
        if client is not None:
            client.close()
        runner.stop()
    rid = lambda n: f"{runner.run_id}-{n}"  # noqa: E731
    assert described == RESULT_METHODS
    assert latest["status"] == "Good" and latest["error"] == 0 and latest["handle"] > 0
    assert {k: latest["result"][k] for k in ("resultId", "partId", "verdict", "type")} == {
        "resultId": rid(5), "partId": "P-5", "verdict": "OK", "type": "ResultDataType"}
    assert (as_text["status"], as_text["result"]["partId"], as_text["result"]["verdict"]) == ("Good", "P-3", "OK")
    assert pushed_out == ["BadNotFound", "BadNotFound"] and never == bare_number == "BadNotFound"
    ids = lambda page: [r["resultId"] for r in page["results"]]  # noqa: E731
    assert (ids(everything), everything["isComplete"], everything["resultCount"]) == ([rid(5), rid(4), rid(3)], True, 3)
    assert (ids(first_two), first_two["isComplete"], ids(rest), rest["isComplete"]) == (
        [rid(5), rid(4)], False, [rid(3)], True)
    assert (ids(past_the_end), past_the_end["isComplete"], past_the_end["resultCount"]) == ([], True, 0)
    assert [(r["resultId"], r["verdict"]) for r in one_part["results"]] == [(rid(4), "NG")] and ids(gone_part) == []
    assert len({latest["handle"], everything["handle"], first_two["handle"], rest["handle"]}) == 4
    assert (released["status"], released["outputs"]) == ("Good", [0])
    assert unknown_handle["status"] == "BadInvalidArgument"


def test_anonymous_sessions_read_results_but_start_no_job(tmp_path: Path):
    """Reading results is not a command: an anonymous session (which may read LastResult and subscribe)
    may call the result methods, and still may not start a job (BadUserAccessDenied)."""
    runner = folder_cell(tmp_path, "g", queue=4)
    server = OpcUaPlc(runner, f"opc.tcp://{SERVER_HOST}:0", user=USER, password=PASSWORD).start()
    runner.observers.append(server)
    runner.start()

    async def anonymous():
        async with Client(server.url) as client:
            ns = await client.get_namespace_index(NAMESPACE)
            system = await client.nodes.objects.get_child(f"{ns}:VisionSystem")
            results = await system.get_child(f"{ns}:ResultManagement")
            listed = await results.call_method(
                f"{ns}:GetResultListFiltered", ua.Variant(0, ua.VariantType.Int32),
                *[ua.Variant(None, ua.VariantType.ExtensionObject)] * 8, ua.Variant(0, ua.VariantType.UInt32),
                ua.Variant(0, ua.VariantType.UInt32), ua.Variant(0, ua.VariantType.Int32))
            by_id = await results.call_method(f"{ns}:GetResultById",
                                              ua.Variant(f"{runner.run_id}-1", ua.VariantType.String),
                                              ua.Variant(0, ua.VariantType.Int32))
            machine = await system.get_child(f"{ns}:VisionStateMachine")
            try:
                await machine.call_method(f"{ns}:StartSingleJob", *[ua.Variant("", ua.VariantType.String)] * 4)
                start = "Good"
            except ua.UaStatusCodeError as error:
                start = type(error).__name__
            return listed, by_id, start

    try:
        judge(runner, ["A-1"], 1)
        listed, by_id, start = asyncio.run(anonymous())
    finally:
        runner.stop()
    assert listed[0] is True and listed[1] == 1 and [r.PartId.Id for r in listed[3]] == ["A-1"]
    assert by_id[1].ResultId.Id == f"{runner.run_id}-1" and by_id[1].PartId.Id == "A-1" and by_id[2] == 0
    assert start == "BadUserAccessDenied"


def _results_of_one_run(folder: Path, pattern: str) -> tuple:
    """A run (a part runner and its OPC UA server) that has judged ``pattern``'s parts: ([(ResultId, PartId)]
    as node-opcua lists them, newest first; that client, still connected; the runner, still running)."""
    node = require_node_client(OPCUA_CLIENT_DIR, ("node-opcua-client",))
    folder.mkdir()
    runner = folder_cell(folder, pattern, queue=4)
    server = OpcUaPlc(runner, f"opc.tcp://{SERVER_HOST}:0", user=USER, password=PASSWORD).start()
    runner.observers.append(server)
    runner.start()
    client = None
    try:
        judge(runner, [f"{folder.name}-{i}" for i in range(1, len(pattern) + 1)], len(pattern))
        client = NodeOpcuaSteps(node, "results.js", server.url, USER, PASSWORD)
        listed = client.ask("page 0 0")["results"]
        return [(r["resultId"], r["partId"]) for r in listed], client, runner
    except BaseException:
        if client is not None:
            client.close()
        runner.stop()
        raise


def test_a_result_id_of_an_earlier_run_is_not_found_after_a_restart(tmp_path: Path):
    """OPC 40100's ResultId is system-wide unique: inspection ids start at 1 every run, and the ResultId
    was that number, so after a restart an MES that asked GetResultById for the earlier run's result "1"
    was handed the new run's first part, another part, with Good. Now ids carry the run's id."""
    first, client, runner = _results_of_one_run(tmp_path / "one", "gd")
    client.close()
    runner.stop()
    second, client, runner = _results_of_one_run(tmp_path / "two", "g")
    try:
        earlier = [client.ask(f"byid {result_id}")["status"] for result_id, _ in first]
        own = client.ask(f"byid {second[0][0]}")
    finally:
        client.close()
        runner.stop()
    assert [part for _, part in first] == ["one-2", "one-1"] and [part for _, part in second] == ["two-1"]
    assert not {result_id for result_id, _ in first} & {result_id for result_id, _ in second}, (first, second)
    assert earlier == ["BadNotFound", "BadNotFound"]            # not the new run's part under an old id
    assert (own["status"], own["result"]["partId"]) == ("Good", "two-1")
