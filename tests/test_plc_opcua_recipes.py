"""Recipes of the OPC UA VisionSystem against node-opcua (tests/opcua_client/recipe_steps.js) as an MES
drives them: a continuous run keeps the recipe it started with, and UnprepareRecipe follows the rules of
PrepareRecipe (not while a job runs) and names the prepared recipe. The camera gives each image only when
the test releases it, so the run's parts are still being triggered while the MES calls."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from runtime_fixtures import build_tiny_model, defective_frame

from mrkd.runtime.line.loop import Camera, Line
from mrkd.runtime.line.parts import PartRunner
from mrkd.runtime.line.trigger import PartSettings
from mrkd.runtime.sources import ArraySource

pytest.importorskip("asyncua", reason="SKIPPED, NOT TESTED: asyncua missing (pip install 'mrkd[plc]')")

from plc_fixtures import NodeOpcuaSteps  # noqa: E402
from test_plc_opcua import PASSWORD, USER, node_client_ready  # noqa: E402

from mrkd.runtime.plc.opcua import OpcUaPlc  # noqa: E402


class HeldRecipeCell:
    """One camera whose images come only on ``release()``, recipe 1 a model calibrated at 0.9 (the
    defective frames it sees are NG under recipe 0, OK under recipe 1), behind a VisionSystem."""

    def __init__(self, folder: Path):
        self.gate = threading.Semaphore(0)
        model = str(build_tiny_model(folder / "tiny.onnx"))
        lenient = str(build_tiny_model(folder / "lenient.onnx", threshold=0.9))
        frame = defective_frame(np.random.default_rng(5))

        def held_frames():
            for _ in range(10_000):
                self.gate.acquire()
                yield frame

        line = Line((Camera("cam", "held-camera", model, trigger="software"),))
        settings = PartSettings(queue=4, timeout=30.0, recipes=((1, lenient),))
        self.runner = PartRunner(line, {"cam": ArraySource(held_frames(), uri="held-camera")}, settings,
                                 status=lambda text: None)
        self.server = OpcUaPlc(self.runner, "opc.tcp://127.0.0.1:0", user=USER, password=PASSWORD).start()
        self.runner.observers.append(self.server)
        self.runner.start()

    def close(self) -> None:
        for _ in range(64):        # nothing may wait for an image at the end
            self.gate.release()
        self.runner.stop()


class RecipeSteps(NodeOpcuaSteps):
    """recipe_steps.js."""

    def __init__(self, node: str, url: str):
        super().__init__(node, "recipe_steps.js", url, USER, PASSWORD)

    def status(self, command: str) -> str:
        return self.ask(command)["status"]


@pytest.mark.slow
def test_a_continuous_run_keeps_its_recipe_and_unprepare_follows_prepares_rules(tmp_path):
    """Before: UnprepareRecipe answered Good in ContinuousExecution (where PrepareRecipe answers
    BadInvalidState) and the running job's later parts were judged with recipe 0, their verdicts
    flipped mid-run; and UnprepareRecipe of a recipe that was not the prepared one (or not one at all)
    answered Good and went back to recipe 0."""
    node = node_client_ready()
    cell = HeldRecipeCell(tmp_path)
    steps = RecipeSteps(node, cell.server.url)
    try:
        assert steps.status("prepare 1") == "Good"
        assert steps.status("continuous C") == "Good"
        during_run = steps.status("unprepare 1")
        for _ in range(8):
            cell.gate.release()
        events = steps.ask("events 8")["events"]
        assert steps.status("stop") == "Good"
        not_prepared = [steps.status("unprepare 7"), steps.status("unprepare 0")]
        prepared_after_refusals = steps.ask("prepared")["value"]
        unprepared = steps.status("unprepare 1")
        prepared_at_end = steps.ask("prepared")["value"]
    finally:
        steps.close()
        cell.close()
    assert during_run == "BadInvalidState"
    assert len(events) == 8 and {e["recipe"] for e in events} == {1}, events
    assert [e["partId"] for e in events] == [f"C-{i}" for i in range(1, 9)]
    assert not_prepared == ["BadInvalidArgument", "BadInvalidArgument"]
    assert (prepared_after_refusals, unprepared, prepared_at_end) == ("1", "Good", "0")
