"""The OPC UA VisionSystem as a client generated from the OPC 40100-1 nodeset (OPCFoundation/UA-Nodeset,
MachineVision 1.0.0) finds it: node-opcua (tests/opcua_client/spec_steps.js) calls StartSingleJob,
StartContinuous, Stop and Abort on VisionStateMachine/AutomaticModeStateMachine with the nodeset's
argument lists, reads AutomaticModeStateMachine/0:CurrentState, and gets ResultReady events with the
nodeset's mandatory CreationTime, InternalConfigurationId and InternalRecipeId (and ExternalRecipeId).
The paths mrkd served before (tests/test_plc_opcua.py) stay as they were."""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import datetime

import pytest

pytest.importorskip("asyncua", reason="SKIPPED, NOT TESTED: asyncua missing (pip install 'mrkd[plc]')")

from asyncua import ua  # noqa: E402

from plc_fixtures import NodeOpcuaSteps  # noqa: E402
from test_plc_opcua import PASSWORD, USER, Session, node_client_ready  # noqa: E402
from test_plc_opcua_recipes import HeldRecipeCell  # noqa: E402

STRING, INT32, BASE_DATA_TYPE = "ns=0;i=12", "ns=0;i=6", "ns=0;i=24"
# The nodeset's argument lists (VisionAutomaticModeStateMachineType, ns=1;i=1021): names, order and value
# ranks as there; its id types (MeasIdDataType, PartIdDataType, RecipeIdExternalDataType,
# ProductIdDataType, JobIdDataType) are Strings in mrkd, as everywhere in its VisionSystem.
JOB = {"inputs": [["MeasId", STRING, -1], ["PartId", STRING, -1], ["RecipeId", STRING, -1],
                  ["ProductId", STRING, -1], ["Parameters", BASE_DATA_TYPE, 1]],
       "outputs": [["JobId", STRING, -1], ["Error", INT32, -1]]}
CAUSE = {"inputs": [["Cause", INT32, -1], ["CauseDescription", STRING, -1]], "outputs": [["Error", INT32, -1]]}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_nodeset_client_runs_jobs_on_the_automatic_mode_state_machine(tmp_path):
    """Before: AutomaticModeStateMachine was not there (translateBrowsePath BadNoMatch), the methods were
    on VisionStateMachine without Parameters, Cause, CauseDescription and Error, and ResultReady had no
    CreationTime, InternalConfigurationId, ExternalRecipeId or InternalRecipeId."""
    node = node_client_ready()
    cell = HeldRecipeCell(tmp_path)      # recipe 1: lenient.onnx; each image only on release
    steps = NodeOpcuaSteps(node, "spec_steps.js", cell.server.url, USER, PASSWORD)
    try:
        started = time.time()
        methods = steps.ask("describe")["methods"]
        assert methods == {"StartSingleJob": JOB, "StartContinuous": JOB, "Stop": CAUSE, "Abort": CAUSE}
        states = [steps.ask("state")]
        first = steps.ask("single A 1")
        states.append(steps.ask("state"))            # its image is held: the job runs
        aborted = steps.ask("abort 3")
        states.append(steps.ask("state"))
        cell.gate.release()                          # the aborted job's part is still judged and reported
        assert len(steps.ask("events 1")["events"]) == 1
        second = steps.ask("single B -")
        states.append(steps.ask("state"))
        released = time.time()
        cell.gate.release()
        events = steps.ask("events 2")["events"]
        states.append(steps.ask("state"))
        stop_idle = steps.ask("stop 0")
        wrong_cause = steps.ask("stop-text")
        continuous = steps.ask("continuous C 1")
        states.append(steps.ask("state"))
        stopped = steps.ask("stop 7")
        states.append(steps.ask("state"))
        finished = time.time()
    finally:
        steps.close()
        cell.close()

    assert [(s["automatic"], s["top"]) for s in states] == [
        ("Ready", "Operational"), ("SingleExecution", "Operational"), ("Ready", "Operational"),
        ("SingleExecution", "Operational"), ("Ready", "Operational"), ("ContinuousExecution", "Operational"),
        ("Ready", "Operational")]
    for call in (first, second, continuous):
        assert call["status"] == "Good" and call["outputs"][0][0] == "String" and call["outputs"][1] == ["Int32", 0]
    assert first["outputs"][0][1] != second["outputs"][0][1]
    for call in (aborted, stopped):
        assert (call["status"], call["outputs"]) == ("Good", [["Int32", 0]])
    # refusals answer the call's status code, as on the old paths (no outputs with a Bad status)
    assert (stop_idle["status"], stop_idle["outputs"]) == ("BadInvalidState", [])
    assert wrong_cause["status"] == "BadInvalidArgument" and wrong_cause["inputs"] == ["BadTypeMismatch", "Good"]

    a, b = events
    assert (a["PartId"], a["JobId"], a["MeasId"]) == (["String", "A"], first["outputs"][0], ["String", "meas-A"])
    assert (b["PartId"], b["JobId"], b["MeasId"]) == (["String", "B"], second["outputs"][0], ["String", "meas-B"])
    # A asked for recipe 1 (lenient.onnx); B named none: the prepared recipe, 0 (tiny.onnx)
    for event, recipe, model in ((a, "1", "lenient.onnx"), (b, "0", "tiny.onnx")):
        assert event["ExternalRecipeId"] == event["InternalRecipeId"] == event["RecipeId"] == ["String", recipe]
        assert event["InternalConfigurationId"] == ["String", sha256(tmp_path / model)]
        assert event["IsPartial"] == ["Boolean", False] and event["ResultState"] == ["Int32", 1]
        assert event["CreationTime"][0] == "DateTime"
    created = [datetime.fromisoformat(e["CreationTime"][1].replace("Z", "+00:00")).timestamp() for e in events]
    # when the result was made: B's after its image came (not its trigger's time), both within the run
    assert started - 0.5 <= created[0] <= created[1] and released <= created[1] <= finished + 0.5, (created, released)


def test_spec_path_methods_in_asyncua_need_the_user_and_take_parameters_empty_or_null(tmp_path):
    """asyncua as the second client: Parameters as an empty array or a null Variant, Cause of the wrong
    type, and an anonymous session refused as on the old paths."""
    cell = HeldRecipeCell(tmp_path)

    async def scenario():
        async with Session(cell.server.url, user=None) as s:
            automatic = await s.machine.get_child(f"{s.ns}:AutomaticModeStateMachine")
            anonymous = (await s.status_of("StartSingleJob", "m", "p", "", "", ua.Variant([], ua.VariantType.Variant,
                                                                                         is_array=True), on=automatic),
                         await s.status_of("Abort", ua.Variant(0, ua.VariantType.Int32), "", on=automatic))
        async with Session(cell.server.url) as s:
            automatic = await s.machine.get_child(f"{s.ns}:AutomaticModeStateMachine")
            cause = ua.Variant(2, ua.VariantType.Int32)
            calls = []
            for parameters in (ua.Variant([], ua.VariantType.Variant, is_array=True), ua.Variant()):
                calls.append(await s.call("StartSingleJob", "m", "p", "", "", parameters, on=automatic))
                calls.append((await (await automatic.get_child("0:CurrentState")).read_value()).Text)
                calls.append(await s.call("Abort", cause, "operator", on=automatic))
            wrong = await s.status_of("Abort", ua.Variant(2.0, ua.VariantType.Double), "x", on=automatic)
            scalar = await s.status_of("StartSingleJob", "m", "p", "", "", "not an array", on=automatic)
        return anonymous, calls, wrong, scalar

    try:
        anonymous, calls, wrong, scalar = asyncio.run(scenario())
    finally:
        cell.close()
    assert anonymous == ("BadUserAccessDenied", "BadUserAccessDenied")
    assert [c[1] if isinstance(c, list) else c for c in calls] == [0, "SingleExecution", 0] * 2
    assert calls[0][0] == f"{cell.runner.run_id}-1" and calls[3][0] == f"{cell.runner.run_id}-2"   # the JobIds
    assert (wrong, scalar) == ("BadInvalidArgument", "BadInvalidArgument")
    assert cell.runner.triggers == 2          # the anonymous and the refused calls made no part
