"""An OPC UA client whose connection drops and comes back (a switch rebooted, a cable pulled for a
moment): node-opcua re-establishes its session on a new secure channel, asks Republish for the
notifications it may have lost, and must get every part's ResultReady once, with no storm of requests.
The connection runs through a relay the test cuts (tests/opcua_client/reconnect.js)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from peers import require_node_client
from plc_fixtures import OPCUA_CLIENT_DIR, NodeOpcuaSteps, folder_cell

pytest.importorskip("asyncua", reason="SKIPPED, NOT TESTED: asyncua missing (pip install 'mrkd[plc]')")

from mrkd.runtime.plc.opcua import OpcUaPlc  # noqa: E402

USER, PASSWORD = "operator", "line-7-secret"


class Relay:
    """A TCP relay 127.0.0.1:port -> target: ``cut()`` closes every relayed connection and refuses new
    ones (the cable pulled) until ``restore()``."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs = []
        self.refusing = False
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:
                near.close()
                continue
            far = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.pairs.append((near, far))
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.refusing = True
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for near, far in pairs:
            for s in (near, far):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def restore(self) -> None:
        self.refusing = False

    def close(self) -> None:
        self.cut()
        self.listener.close()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.slow
def test_node_opcua_rides_out_a_dropped_connection_without_a_republish_storm(tmp_path: Path):
    """Parts judged while the connection is down reach the client after it reconnects, each ResultReady
    once. Before, asyncua answered a Republish of a message it no longer held with Good and an empty
    message (OPC 10000-4 5.13.6: Bad_MessageNotAvailable), so node-opcua, which republishes until it is
    told there is nothing more, sent about 800 Republish requests a second for as long as the session
    lived (measured: 8235 in 10 s), and each one that met a message just sent delivered it twice."""
    node = require_node_client(OPCUA_CLIENT_DIR, ("node-opcua-client",))
    runner = folder_cell(tmp_path, "gdgdg", queue=4)
    server = OpcUaPlc(runner, "opc.tcp://127.0.0.1:0", user=USER, password=PASSWORD).start()
    runner.observers.append(server)
    runner.start()
    relay = Relay(int(server.url.rsplit(":", 1)[1].split("/")[0]))
    client = None
    try:
        client = NodeOpcuaSteps(node, "reconnect.js", f"opc.tcp://127.0.0.1:{relay.port}/mrkd/", USER, PASSWORD)
        assert runner.trigger("before").accepted
        assert [e["partId"] for e in client.ask("events 1")["events"]] == ["before"]
        relay.cut()
        for part in ("during-1", "during-2"):            # judged while the client is away
            assert runner.trigger(part).accepted
        wait_for(lambda: runner.inspections == 3, 10, "the parts judged while cut off")
        time.sleep(0.5)                                  # their events published while the client is away
        relay.restore()
        client.ask("reconnected")
        assert runner.trigger("after").accepted
        answer = client.ask("events 4")
    finally:
        if client is not None:
            client.close()
        relay.close()
        runner.stop()
    seen = [(e["resultId"], e["partId"]) for e in answer["events"]]
    assert seen == [("1", "before"), ("2", "during-1"), ("3", "during-2"), ("4", "after")], seen
    assert answer["republish"] <= 3, answer["republish"]


def test_republish_of_a_message_not_held_answers_bad_message_not_available(tmp_path: Path):
    """OPC 10000-4 5.13.6, asked by node-opcua: Republish of a sequence number the server does not hold
    answers Bad_MessageNotAvailable, of a subscription that does not exist Bad_SubscriptionIdInvalid.
    Before, both answered Good with an empty message, which a client cannot tell from a message."""
    node = require_node_client(OPCUA_CLIENT_DIR, ("node-opcua-client",))
    runner = folder_cell(tmp_path, "g", queue=4)
    server = OpcUaPlc(runner, "opc.tcp://127.0.0.1:0", user=USER, password=PASSWORD).start()
    runner.observers.append(server)
    runner.start()
    client = None
    try:
        client = NodeOpcuaSteps(node, "reconnect.js", server.url, USER, PASSWORD)
        not_sent = client.ask("republish own 1000")
        unknown = client.ask("republish 987654 1")
    finally:
        if client is not None:
            client.close()
        runner.stop()
    assert (not_sent["status"], unknown["status"]) == ("BadMessageNotAvailable", "BadSubscriptionIdInvalid")
