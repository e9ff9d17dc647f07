"""An OPC UA client whose connection drops and comes back (a switch rebooted, a cable pulled for a
moment): node-opcua re-establishes its session on a new secure channel, asks Republish for the
notifications it may have lost, and must get every part's ResultReady once, with no storm of requests.
The connection runs through a relay the test cuts (tests/opcua_client/reconnect.js)."""

from __future__ import annotations

import queue
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
    """A TCP relay HOST:port -> target_host:target_port: ``cut()`` closes every relayed connection and
    refuses new ones (the cable pulled) until ``restore()``, which can make the link slow towards the
    server: each client byte then reaches it ``upstream_lag_s`` late, in order."""

    def __init__(self, target_port: int, host: str = "127.0.0.1", target_host: str = "127.0.0.1"):
        self.target_port, self.target_host = target_port, target_host
        self.listener = socket.create_server((host, 0))
        self.port = self.listener.getsockname()[1]
        self.pairs = []
        self.refusing = False
        self.upstream_lag_s = 0.0
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
            far = socket.create_connection((self.target_host, self.target_port))
            with self.lock:
                self.pairs.append((near, far))
            for args in ((near, far, self.upstream_lag_s), (far, near, 0.0)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    @staticmethod
    def _shut_down(*sockets: socket.socket) -> None:
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, lag_s: float) -> None:
        """Copy source to sink until either ends, then shut both down; each chunk is sent lag_s after it
        was read (a reader thread stamps them; 0: as soon as read)."""
        chunks: queue.Queue = queue.Queue()

        def read() -> None:
            try:
                while data := source.recv(65536):
                    chunks.put((time.monotonic() + lag_s, data))
            except OSError:
                pass
            chunks.put((time.monotonic() + lag_s, b""))

        threading.Thread(target=read, daemon=True).start()
        try:
            while True:
                due, data = chunks.get()
                time.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            Relay._shut_down(source, sink)

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

    def restore(self, upstream_lag_s: float = 0.0) -> None:
        self.upstream_lag_s = upstream_lag_s
        self.refusing = False

    def close(self) -> None:
        self.cut()
        self.listener.close()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


# The link comes back slow towards the server (a congested switch after its reboot), so node-opcua's
# Republish, built at reactivation, reaches mrkd after the part judged just then has been published.
UPSTREAM_LAG_S = 0.5
PARTS = ["before", "during-1", "during-2", "after"]       # ResultIds <run id>-1 .. -4


@pytest.mark.slow
def test_node_opcua_rides_out_a_dropped_connection_without_a_republish_storm(tmp_path: Path):
    """Parts judged while the connection is down reach the client after it reconnects, each ResultReady
    in exactly one NotificationMessage. Before, asyncua answered a Republish of a message it no longer
    held with Good and an empty message (OPC 10000-4 5.13.6: Bad_MessageNotAvailable), so node-opcua,
    which republishes until it is told there is nothing more, sent about 800 Republish requests a second
    for as long as the session lived (measured: 8235 in 10 s).

    What reaches the application may still hold one message twice: node-opcua reactivating a session
    does not hold back its Publish requests until its Republish loop ends (6.7 says it shall), so a
    Republish asked before a message arrived by Publish, and answered before the client's acknowledgement
    of it reached mrkd, returns that message again, as 5.13.6 says it must (unacknowledged, it is still in
    the retransmission queue), and node-opcua hands it to the application again under the same sequence
    number. On a loaded 2-core machine, the Republish delayed by the load, that happened in 3 of 37 runs;
    the slow link here makes it happen every time. So the test checks what the spec promises: each
    part's event in one sequence number, a sequence number always the same message, and a message twice
    only where a Republish answered it."""
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
        relay.restore(upstream_lag_s=UPSTREAM_LAG_S)
        client.ask("reconnected")
        assert client.ask("arrived 3")["count"] >= 3     # by the new channel's first Publish
        assert runner.trigger("after").accepted          # while the Republish is on its way
        answer = client.ask("events 4")
    finally:
        if client is not None:
            client.close()
        relay.close()
        runner.stop()
    seen = [(e["resultId"], e["partId"]) for e in answer["events"]]
    messages = [(m["sequenceNumber"], [(e["resultId"], e["partId"]) for e in m["events"]])
                for m in answer["messages"]]
    republishes = [(r["retransmitSequenceNumber"], r["status"]) for r in answer["republishes"]]
    report = f"events {seen}, messages (sequence number, events) {messages}, republishes {republishes}"
    assert [event for _, events in messages for event in events] == seen, report
    by_number = {}
    for number, events in messages:                     # a sequence number names one message (5.13.1.1)
        assert by_number.setdefault(number, events) == events, report
    assert [event for number in sorted(by_number) for event in by_number[number]] == [
        (f"{runner.run_id}-{n}", part) for n, part in enumerate(PARTS, 1)], report
    numbers = [number for number, _ in messages]
    twice = {number for number in numbers if numbers.count(number) > 1}
    assert twice <= {number for number, status in republishes if status == "Good"}, report
    # the Republish loop ended, told there was no more, after a few requests: no storm
    assert republishes and republishes[-1][1] == "BadMessageNotAvailable" and len(republishes) <= 3, report


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
