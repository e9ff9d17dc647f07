"""One line, two PLC interfaces, one "offline": `mrkd run` serving Modbus TCP and the OPC UA VisionSystem
at once, driven by two independent peers (Debian's mbpoll, node-opcua step by step). The line is offline
while any interface holds it (Modbus Set Offline = 1, the OPC UA state machine out of Operational); each
interface reports it (Online bit, CurrentState) and releasing one never brings the line online while the
other still holds it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

import pytest

from peers import require_program
from test_plc_cli import start_line_with_modbus_and_opcua

from mrkd.benchmarks.plc_peer import DI, SET_OFFLINE, TRIGGER_ENABLE, mbpoll

pytest.importorskip("asyncua", reason="SKIPPED, NOT TESTED: asyncua missing (pip install 'mrkd[plc]')")
pytest.importorskip("pymodbus", reason="SKIPPED, NOT TESTED: pymodbus missing (pip install 'mrkd[plc]')")

from plc_fixtures import NodeOpcuaSteps  # noqa: E402
from test_plc_opcua import node_client_ready  # noqa: E402

OPERATIONAL, PREOPERATIONAL, HALTED = ("Operational", "Ready"), ("Preoperational", ""), ("Halted", "")


class Steps(NodeOpcuaSteps):
    """node-opcua's steps.js."""

    def __init__(self, node: str, url: str):
        super().__init__(node, "steps.js", url, "op", "pw")

    def call(self, name: str) -> str:
        return self.ask(f"call {name}")["status"]

    def state(self) -> tuple:
        answer = self.ask("state")
        return answer["currentState"], answer["automaticModeState"]


def wait_listening(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert process.poll() is None, process.communicate()[1][-2000:]
            assert time.monotonic() < deadline, f"mrkd run never listened on {port}"
            time.sleep(0.2)


@pytest.mark.slow
def test_modbus_set_offline_and_opcua_halt_are_one_offline_with_a_holder_each(tmp_path):
    require_program("mbpoll", ["mbpoll"])
    node = node_client_ready()
    process, modbus_port, opcua_port = start_line_with_modbus_and_opcua(tmp_path, "ggg")

    def read(table: str, ref: int, count: int = 1) -> list:
        rc, values, err = mbpoll(modbus_port, table, ref, count)
        assert rc == 0, err
        return [int(v) for v in values]

    def coil(ref: int, value: int) -> None:
        rc, _, err = mbpoll(modbus_port, "0", ref, write=[value])
        assert rc == 0, err

    def online() -> int:
        return read("1", DI["online"])[0]

    def missed() -> int:
        high, low = read("3", 12, 2)          # input registers 12-13: Missed Triggers, high word first
        return high << 16 | low

    def settled(expected: tuple) -> tuple:
        """CurrentState follows a Modbus write on the OPC UA server's own loop: give it a moment."""
        state = steps.state()
        for _ in range(50):
            if state == expected:
                break
            time.sleep(0.05)
            state = steps.state()
        return state

    seen, steps = {}, None
    try:
        wait_listening(modbus_port, process)
        wait_listening(opcua_port, process)
        steps = Steps(node, f"opc.tcp://127.0.0.1:{opcua_port}/mrkd/")
        coil(TRIGGER_ENABLE, 1)
        seen["start"] = (online(), steps.state())

        # Modbus holds: OPC UA leaves Operational (to Preoperational, an automatic transition) and refuses jobs
        coil(SET_OFFLINE, 1)
        seen["modbus holds"] = (online(), settled(PREOPERATIONAL))
        seen["job while modbus holds"] = steps.ask("job 11")["status"]
        seen["missed triggers"] = missed()          # refused by the server: never a trigger the line refused
        seen["automatic while modbus holds"] = steps.call("SelectModeAutomatic")

        # both hold; Modbus releases: still offline, still Halted
        seen["halt"] = steps.call("Halt")
        seen["both hold"] = (online(), steps.state())
        coil(SET_OFFLINE, 0)
        seen["modbus released, halted"] = (online(), settled(HALTED))
        seen["job while halted"] = steps.ask("job 12")["status"]
        steps.call("Reset")
        seen["reset"] = (online(), steps.state())
        seen["automatic"] = steps.call("SelectModeAutomatic")
        seen["online again"] = (online(), steps.state())

        # the other order: OPC UA halts, Modbus holds, OPC UA resets: the line stays offline until both release
        steps.call("Halt")
        coil(SET_OFFLINE, 1)
        steps.call("Reset")
        seen["reset while modbus holds"] = (online(), settled(PREOPERATIONAL))
        seen["automatic refused while modbus holds"] = steps.call("SelectModeAutomatic")
        seen["still offline"] = (online(), steps.state())
        seen["job while modbus holds again"] = steps.ask("job 14")["status"]
        coil(SET_OFFLINE, 0)
        seen["modbus released, preoperational"] = (online(), settled(PREOPERATIONAL))
        seen["automatic at last"] = steps.call("SelectModeAutomatic")
        seen["operational"] = (online(), settled(OPERATIONAL))
        seen["job"] = steps.ask("job 13")["status"]
        for _ in range(100):
            if read("1", DI["results_valid"])[0]:
                break
            time.sleep(0.1)
        seen["result part id"] = read("3", 2)[0]        # input register 2: the judged part's id
        steps.close()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if steps is not None and steps.process.poll() is None:
            steps.process.kill()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err[-2000:]
    assert seen == {
        "start": (1, OPERATIONAL),
        "modbus holds": (0, PREOPERATIONAL), "job while modbus holds": "BadInvalidState", "missed triggers": 0,
        "automatic while modbus holds": "BadInvalidState",
        "halt": "Good", "both hold": (0, HALTED),
        "modbus released, halted": (0, HALTED), "job while halted": "BadInvalidState",
        "reset": (0, PREOPERATIONAL), "automatic": "Good", "online again": (1, OPERATIONAL),
        "reset while modbus holds": (0, PREOPERATIONAL), "automatic refused while modbus holds": "BadInvalidState",
        "still offline": (0, PREOPERATIONAL), "job while modbus holds again": "BadInvalidState",
        "modbus released, preoperational": (0, PREOPERATIONAL), "automatic at last": "Good",
        "operational": (1, OPERATIONAL), "job": "Good", "result part id": 13}
    summary = json.loads(out[out.index("{"):])
    assert summary["parts"] == 1, summary
