"""The Modbus TCP adapter (runtime/plc/modbus.py) on the real part runner judging a folder of good and
defective parts with the tiny model, against independent peers: Debian's mbpoll (libmodbus) for
reads and writes of the map, and a PLC simulated with pymodbus' client (benchmarks/plc_peer.py) for
the full handshake; faults: a dropped connection, a trigger while busy, an overrun, illegal
addresses and garbage frames on a raw socket, two PLCs at once."""

from __future__ import annotations

import socket
import struct
import threading
import time

import cv2
import numpy as np
import pytest

from peers import require_program
from plc_fixtures import defect_pattern, part_images
from runtime_fixtures import SIZE, THRESHOLD, SlowFrames, build_tiny_model, reference_map

from mrkd.benchmarks.plc_peer import (CLEAR_ERROR, DI, PART_ID, RECIPE, RESULTS_ACK, TRIGGER, TRIGGER_ENABLE,
                                      ModbusError, SimulatedPlc, mbpoll)
from mrkd.runtime.line.loop import Camera, Line
from mrkd.runtime.line.parts import PartRunner, open_part_sources
from mrkd.runtime.line.trigger import PartSettings
from mrkd.runtime.plc.modbus import ModbusPlc, PlcError, parse_client_networks, parse_modbus_address
from mrkd.runtime.sources import ArraySource

pytest.importorskip("pymodbus", reason="SKIPPED, NOT TESTED: pymodbus missing (pip install 'mrkd[plc]')")


def reference_score(path) -> float:
    frame = cv2.imread(str(path))
    square = cv2.resize(frame, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    return float(reference_map(square[None]).max())


class Cell:
    """A triggered line (part runner) with a Modbus server on a free loopback port."""

    def __init__(self, model, source, queue=4, capacity=8, allow=None, security=None):
        camera_source = source if isinstance(source, str) else "memory"
        line = Line((Camera("cam", camera_source, model, trigger="software"),))
        settings = PartSettings(queue=queue, timeout=5.0)
        sources = open_part_sources(line, settings) if isinstance(source, str) else {"cam": source}
        self.runner = PartRunner(line, sources, settings, status=lambda text: None)
        self.plc = ModbusPlc(self.runner, port=0, capacity=capacity, allow=allow, security=security).start()
        self.runner.observers.append(self.plc)
        self.runner.start()
        self.port = self.plc.address[1]

    def close(self):
        return self.runner.stop()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("plc") / "tiny.onnx"))


@pytest.fixture
def cells():
    made = []

    def make(*args, **kwargs):
        made.append(Cell(*args, **kwargs))
        return made[-1]

    yield make
    for cell in made:
        cell.close()


@pytest.fixture
def plcs():
    made = []

    def make(port, **kwargs):
        made.append(SimulatedPlc(port, **kwargs))
        return made[-1]

    yield make
    for plc in made:
        plc.close()


def test_mbpoll_reads_and_writes_the_map(model, tmp_path, cells):
    require_program("mbpoll", ["mbpoll"])
    folder = tmp_path / "parts"
    part_images(folder, "gd")
    paths = sorted(folder.iterdir())
    cell = cells(model, str(folder))
    port = cell.port

    def read(table, ref, count=1, unit=1):
        rc, values, err = mbpoll(port, table, ref, count, unit)
        assert rc == 0, err
        return [int(v) for v in values] if ":float" not in table else values

    def write(table, ref, *values, unit=1):
        rc, _, err = mbpoll(port, table, ref, write=list(values), unit=unit)
        assert rc == 0, err

    assert read("1", 0, 10, unit=17) == [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]    # any unit id: online, not enabled
    write("0", TRIGGER_ENABLE, 1, unit=247)
    write("4", PART_ID, 321, unit=3)
    write("4", RECIPE, 0)
    assert read("4", 0, 2) == [0, 321]
    assert read("1", DI["trigger_ready"]) == [1]
    write("0", TRIGGER, 1)
    deadline = time.monotonic() + 10
    while read("1", DI["results_valid"]) != [1]:
        assert time.monotonic() < deadline, "no result"
    bits = read("1", 0, 10)
    assert bits[DI["trigger_ack"]] == 1 and bits[DI["trigger_ready"]] == 0           # Trigger still 1
    assert bits[DI["part_ok"]] == 1 and bits[DI["part_ng"]] == 0
    assert read("0", 0, 5) == [1, 1, 0, 0, 0]                                           # coils read back
    registers = read("3", 0, 19)
    good = reference_score(paths[0])
    assert registers[0:3] == [1, 1, 321]                                                # OK, inspection 1, part
    assert registers[3] == min(65535, round(1000 * good / THRESHOLD))
    assert read("3:float", 4)[0] == pytest.approx(good, rel=1e-6, abs=1e-7)             # libmodbus decodes the float
    assert 0 <= registers[6] < 5000 and registers[7] == 0
    assert registers[8:14] == [0, 1, 0, 0, 0, 0] and registers[14] == 0 and registers[17] == 1
    write("0", TRIGGER, 0)
    assert read("1", DI["trigger_ack"], 2) == [0, 0] or read("1", DI["trigger_ack"]) == [0]
    write("0", RESULTS_ACK, 1)
    write("0", RESULTS_ACK, 0)
    assert read("1", DI["results_valid"]) == [0] and read("3", 0, 3) == [0, 0, 0]
    write("4", PART_ID, 322)
    write("0", TRIGGER, 1)
    while read("1", DI["results_valid"]) != [1]:
        assert time.monotonic() < deadline + 10, "no second result"
    registers = read("3", 0, 19)
    defective = reference_score(paths[1])
    assert defective >= THRESHOLD > good
    assert registers[0:3] == [2, 2, 322] and registers[3] == min(65535, round(1000 * defective / THRESHOLD))
    assert read("1", DI["part_ok"], 2) == [0, 1]
    assert (registers[9], registers[11]) == (2, 1)                                      # judged 2, NG 1
    # what the map refuses: exception responses that libmodbus names, and the server keeps serving
    rc, _, err = mbpoll(port, "3", 40, 1)
    assert rc != 0 and "Illegal data address" in err
    rc, _, err = mbpoll(port, "1", 12, 1)
    assert rc != 0 and "Illegal data address" in err
    rc, _, err = mbpoll(port, "0", 7, write=[1])
    assert rc != 0 and "Illegal data address" in err
    rc, _, err = mbpoll(port, "4", RECIPE, write=[9])
    assert rc != 0 and "Illegal data value" in err
    rc, _, err = mbpoll(port, "3", 0, write=[1])                                        # input registers are read-only
    assert rc != 0
    assert read("4", 0, 2) == [0, 322]


def test_full_handshake_every_result_matches_its_part(model, tmp_path, cells, plcs):
    pattern = defect_pattern(60)
    expected = part_images(tmp_path / "parts", pattern)
    cell = cells(model, str(tmp_path / "parts"))
    plc = plcs(cell.port)
    plc.coil(TRIGGER_ENABLE, True)
    for i, defective in enumerate(expected):
        cycle = plc.inspect(1000 + i)
        r = cycle.reading
        assert (r.inspection_id, r.part_id) == (i + 1, 1000 + i), f"result of another part at part {i}"
        assert r.result_code == (2 if defective else 1) and cycle.bits["part_ng"] == defective
        assert cycle.bits["part_ok"] == (not defective) and r.results_waiting == 1
    final = plc.registers()
    assert (final.parts_judged, final.parts_ng, final.missed_triggers) == (len(pattern), pattern.count("d"), 0)
    assert final.result_code == 0 and not plc.bits()["results_valid"]


@pytest.mark.slow
def test_simulated_plc_runs_500_parts_in_order_none_late(model, tmp_path, cells, plcs):
    pattern = defect_pattern(500, seed=5)
    expected = part_images(tmp_path / "parts", pattern, seed=5)
    cell = cells(model, str(tmp_path / "parts"))
    plc = plcs(cell.port, poll_s=0.001)
    plc.coil(TRIGGER_ENABLE, True)
    started = time.monotonic()
    for i, defective in enumerate(expected):
        plc.wait(lambda b: b["trigger_ready"], 10, "Trigger Ready")
        assert not plc.bits()["results_valid"], f"a result before part {i} was triggered"
        cycle = plc.inspect(i)
        assert (cycle.reading.inspection_id, cycle.reading.part_id) == (i + 1, i)
        assert cycle.reading.result_code == (2 if defective else 1)
    assert time.monotonic() - started < 60
    summary = cell.close()
    assert summary["parts"] == 500 and summary["missed_triggers"] == 0
    assert summary["verdicts"]["NG"] == pattern.count("d")


def test_dropped_connection_mid_handshake_finds_a_consistent_state(model, tmp_path, cells, plcs):
    part_images(tmp_path / "parts", "gdg")
    cell = cells(model, str(tmp_path / "parts"))
    first = plcs(cell.port)
    first.coil(TRIGGER_ENABLE, True)
    first.register(PART_ID, 7)
    first.coil(TRIGGER, True)
    first.wait(lambda b: b["trigger_ack"], 5, "Trigger Ack")
    first.client.socket.shutdown(socket.SHUT_RDWR)       # the PLC's cable is pulled: Trigger still 1, no Ack
    first.close()
    time.sleep(0.3)
    second = plcs(cell.port)
    bits = second.wait(lambda b: b["results_valid"], 5, "Results Valid")
    assert bits["trigger_ack"] and not bits["trigger_ready"]                    # Trigger is still 1
    assert second.client.read_coils(0, count=5).bits[:5] == [True, True, False, False, False]
    reading = second.registers()
    assert (reading.inspection_id, reading.part_id, reading.result_code) == (1, 7, 1)
    second.coil(TRIGGER, True)                                                   # still 1: no edge, no part
    time.sleep(0.3)
    assert second.registers().parts_judged == 1
    second.coil(TRIGGER, False)
    assert not second.bits()["trigger_ack"]
    second.coil(RESULTS_ACK, True)
    second.coil(RESULTS_ACK, False)
    cycle = second.inspect(8)
    assert (cycle.reading.inspection_id, cycle.reading.part_id, cycle.reading.result_code) == (2, 8, 2)
    assert second.registers().missed_triggers == 0


def test_trigger_while_busy_is_refused_counted_and_flagged(model, cells, plcs):
    cell = cells(model, ArraySource(SlowFrames(0.4)), queue=0)
    plc = plcs(cell.port)
    plc.coil(TRIGGER_ENABLE, True)
    plc.register(PART_ID, 1)
    plc.coil(TRIGGER, True)
    plc.coil(TRIGGER, False)
    bits = plc.bits()
    assert bits["busy"] and not bits["trigger_ready"]
    plc.register(PART_ID, 2)
    plc.coil(TRIGGER, True)                                    # not Trigger Ready: refused, never queued
    bits = plc.bits()
    assert bits["missed_trigger"] and not bits["trigger_ack"]
    plc.coil(TRIGGER, False)
    plc.wait(lambda b: b["results_valid"], 5, "Results Valid")
    reading = plc.registers()
    assert (reading.part_id, reading.missed_triggers, reading.results_waiting) == (1, 1, 1)
    time.sleep(0.6)
    assert plc.registers().parts_judged == 1                   # the refused trigger made no part
    plc.coil(CLEAR_ERROR, True)
    plc.coil(CLEAR_ERROR, False)
    assert not plc.bits()["missed_trigger"] and plc.registers().missed_triggers == 1


def test_no_ack_until_the_buffer_overruns(model, tmp_path, cells, plcs):
    part_images(tmp_path / "parts", "g" * 11)
    cell = cells(model, str(tmp_path / "parts"), queue=20)
    plc = plcs(cell.port)
    plc.coil(TRIGGER_ENABLE, True)
    for i in range(8):
        plc.register(PART_ID, 100 + i)
        plc.coil(TRIGGER, True)
        plc.wait(lambda b: b["trigger_ack"], 5)
        plc.coil(TRIGGER, False)
    deadline = time.monotonic() + 10
    while plc.registers().parts_judged < 8:
        assert time.monotonic() < deadline
    presented = plc.registers()
    assert (presented.part_id, presented.results_waiting, plc.bits()["overrun"]) == (100, 8, False)
    for i in range(8, 11):
        plc.register(PART_ID, 100 + i)
        plc.coil(TRIGGER, True)
        plc.wait(lambda b: b["trigger_ack"], 5)
        plc.coil(TRIGGER, False)
    while plc.registers().parts_judged < 11:
        assert time.monotonic() < deadline
    after = plc.registers()
    assert after.part_id == 100 and after.inspection_id == 1 and after.results_waiting == 8
    assert after.results_dropped == 3 and plc.bits()["overrun"]
    seen = []
    while plc.bits()["results_valid"]:
        seen.append(plc.registers().part_id)
        plc.coil(RESULTS_ACK, True)
        plc.coil(RESULTS_ACK, False)
    assert seen == list(range(100, 108))
    assert plc.bits()["overrun"] and cell.plc.health().failed == 3
    plc.coil(CLEAR_ERROR, True)
    assert not plc.bits()["overrun"]


def _mbap(tid: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


def _answer(sock) -> bytes:
    header = sock.recv(7)
    assert len(header) == 7, header
    length = struct.unpack(">H", header[4:6])[0]
    body = b""
    while len(body) < length - 1:
        body += sock.recv(length - 1 - len(body))
    return header + body


def test_garbage_frames_and_illegal_requests_on_a_raw_socket(model, tmp_path, cells, plcs):
    part_images(tmp_path / "parts", "g")
    cell = cells(model, str(tmp_path / "parts"))
    rng = np.random.default_rng(9)
    with socket.create_connection(("127.0.0.1", cell.port), timeout=3) as sock:
        sock.sendall(_mbap(1, 1, bytes([0x41, 0, 0])))                      # a function code nobody defines
        answer = _answer(sock)
        assert answer[7] == 0x41 | 0x80 and answer[8] == 1                  # exception 01 illegal function
        for request in (struct.pack(">BHH", 8, 0, 0x1234),                  # diagnostics: echo
                        bytes([0x2B, 0x0E, 1, 0]),                          # read device identification
                        bytes([0x0B])):                                     # comm event counter
            sock.sendall(_mbap(1, 1, request))                              # pymodbus knows them; the map has none
            assert _answer(sock)[7:9] == bytes([request[0] | 0x80, 1]), request
        sock.sendall(_mbap(2, 9, struct.pack(">BHH", 4, 100, 2)))           # input registers 100..101
        answer = _answer(sock)
        assert answer[:2] == b"\x00\x02" and answer[7:9] == bytes([0x84, 2])
        sock.sendall(_mbap(3, 1, struct.pack(">BHH", 3, 0, 3)))             # holding 0..2: 2 is past the map
        assert _answer(sock)[7:9] == bytes([0x83, 2])
        sock.sendall(_mbap(4, 200, struct.pack(">BHH", 2, 0, 10)))          # a good read still answers
        answer = _answer(sock)
        assert answer[7:9] == bytes([2, 2]) and answer[9] & 1 == 1          # Online
        for value in (0x0001, 0x00FF, 0xFFFF):     # FC 05 takes 0xFF00 or 0x0000 only (Modbus spec 6.5)
            sock.sendall(_mbap(5, 1, struct.pack(">BHH", 5, TRIGGER_ENABLE, value)))
            assert _answer(sock)[7:9] == bytes([0x85, 3]), hex(value)      # exception 03 illegal data value
        sock.sendall(_mbap(6, 1, struct.pack(">BHH", 1, 0, 5)))             # ... and wrote nothing
        answer = _answer(sock)
        assert answer[7:9] == bytes([1, 1]) and answer[9] == 0
        sock.sendall(_mbap(7, 1, struct.pack(">BHH", 5, TRIGGER_ENABLE, 0xFF00)))   # a legal one is echoed
        assert _answer(sock)[7:] == struct.pack(">BHH", 5, TRIGGER_ENABLE, 0xFF00)
        sock.sendall(_mbap(8, 1, struct.pack(">BHH", 5, TRIGGER_ENABLE, 0x0000)))
        assert _answer(sock)[7:] == struct.pack(">BHH", 5, TRIGGER_ENABLE, 0x0000)
    for _ in range(5):                                                      # garbage, then the connection drops
        with socket.create_connection(("127.0.0.1", cell.port), timeout=3) as sock:
            sock.sendall(rng.integers(0, 256, int(rng.integers(1, 300)), dtype=np.uint8).tobytes())
            sock.sendall(b"\x00\x01\x00\x00\xff\xff\x01\x04")               # a length no frame has
            sock.settimeout(0.3)
            try:
                sock.recv(1024)
            except (socket.timeout, ConnectionResetError):
                pass
    plc = plcs(cell.port)                                                   # the server keeps serving
    plc.coil(TRIGGER_ENABLE, True)
    cycle = plc.inspect(5)
    assert (cycle.reading.inspection_id, cycle.reading.part_id) == (1, 5)


def test_two_plc_clients_at_once_never_see_a_torn_result(model, tmp_path, cells, plcs):
    pattern = defect_pattern(40, seed=3)
    expected = part_images(tmp_path / "parts", pattern, seed=3)
    cell = cells(model, str(tmp_path / "parts"))
    driver, watcher = plcs(cell.port), plcs(cell.port, unit=42)
    driver.coil(TRIGGER_ENABLE, True)
    stop, torn, watched = threading.Event(), [], []

    def watch():
        while not stop.is_set():
            r = watcher.registers()
            if r.result_code:
                watched.append(r.inspection_id)
                i = r.inspection_id - 1
                if r.part_id != 500 + i or r.result_code != (2 if expected[i] else 1):
                    torn.append(r)

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        for i in range(len(expected)):
            cycle = driver.inspect(500 + i)
            assert (cycle.reading.inspection_id, cycle.reading.part_id) == (i + 1, 500 + i)
    finally:
        stop.set()
        thread.join()
    assert torn == [] and len(set(watched)) > 5
    assert cell.plc.connections >= 2


def test_address_in_use_and_bad_addresses_are_one_line_errors(model, tmp_path, cells):
    part_images(tmp_path / "parts", "g")
    cell = cells(model, str(tmp_path / "parts"))
    with pytest.raises(PlcError, match=rf"127.0.0.1:{cell.port}: cannot listen"):
        ModbusPlc(cell.runner, port=cell.port).start()
    assert parse_modbus_address("127.0.0.1:5020") == ("127.0.0.1", 5020)
    assert parse_modbus_address(":5020") == ("127.0.0.1", 5020)
    assert parse_modbus_address("0.0.0.0") == ("0.0.0.0", 502)
    for text in ("127.0.0.1:http", "host:70000", "a:b:c"):
        with pytest.raises(PlcError, match="HOST:PORT"):
            parse_modbus_address(text)


def test_modbus_allow_serves_listed_clients_and_closes_others_unread(model, tmp_path, cells):
    """With an allow-list a client from another address is disconnected before a request of it is read
    (mbpoll fails, its write changes nothing; counted and shown in health); a listed address is served
    by the same server; a network entry admits its members."""
    require_program("mbpoll", ["mbpoll"])
    part_images(tmp_path / "parts", "g")
    cell = cells(model, str(tmp_path / "parts"), allow=parse_client_networks("127.0.0.2"))
    rc, _, err = mbpoll(cell.port, "0", TRIGGER_ENABLE, write=[1])     # mbpoll connects from 127.0.0.1
    assert rc != 0, err
    rc, values, err = mbpoll(cell.port, "1", 0, 2)
    assert rc != 0 and values == [], err
    assert cell.plc.clients_refused == 2 and cell.plc.clients == 0 and cell.plc.requests == 0
    assert cell.plc.handshake.levels["trigger_enable"] is False
    assert "2 refused" in cell.plc.health().detail
    read_inputs = _mbap(1, 1, bytes([0x02, 0, 0, 0, 2]))                  # discrete inputs 0-1
    with socket.socket() as listed:
        listed.settimeout(3)
        listed.bind(("127.0.0.2", 0))                                      # the listed address
        listed.connect(("127.0.0.1", cell.port))
        listed.sendall(read_inputs)
        answer = _answer(listed)
    assert answer[7] == 0x02 and answer[9] & 1 == 1                        # online: served
    with socket.socket() as stranger:
        stranger.settimeout(3)
        stranger.bind(("127.0.0.3", 0))
        stranger.connect(("127.0.0.1", cell.port))
        try:
            stranger.sendall(read_inputs)
            assert stranger.recv(64) == b""                                # closed, never answered
        except (ConnectionResetError, BrokenPipeError):
            pass
    assert cell.plc.clients_refused == 3
    network = cells(model, str(tmp_path / "parts"), allow=parse_client_networks("10.0.0.5, 127.0.0.0/8"))
    rc, values, err = mbpoll(network.port, "1", 0, 2)
    assert rc == 0 and [int(v) for v in values] == [1, 0], err
    assert network.plc.clients_refused == 0


def test_recipe_register_applies_from_the_next_trigger(model, tmp_path, plcs):
    """Holding register 0 picks the line file's recipe for the next trigger: the same defective image is
    NG under recipe 0 (threshold 0.1) and OK under recipe 1 (a model calibrated at 0.9)."""
    lenient = str(build_tiny_model(tmp_path / "lenient.onnx", threshold=0.9))
    part_images(tmp_path / "parts", "ddd")
    line = Line((Camera("cam", str(tmp_path / "parts"), model, trigger="software"),))
    settings = PartSettings(queue=4, timeout=5.0, recipes=((1, lenient),))
    runner = PartRunner(line, open_part_sources(line, settings), settings, status=lambda text: None)
    server = ModbusPlc(runner, port=0).start()
    runner.observers.append(server)
    runner.start()
    try:
        plc = plcs(server.address[1])
        plc.coil(TRIGGER_ENABLE, True)
        first = plc.inspect(1).reading
        assert not plc.register(RECIPE, 1).isError()
        assert plc.registers().active_recipe == 1 and plc.client.read_holding_registers(0, count=1).registers == [1]
        second = plc.inspect(2).reading
        assert plc.register(RECIPE, 2).isError()                       # not in the line file: exception 03
        third = plc.inspect(3).reading
    finally:
        runner.stop()
    assert (first.result_code, first.result_recipe) == (2, 0)
    assert (second.result_code, second.result_recipe, second.active_recipe) == (1, 1, 1)
    assert (third.result_code, third.result_recipe) == (1, 1)


def test_a_plc_leaving_mid_reply_is_not_logged_as_an_error_with_other_connections_frames(caplog):
    """pymodbus' own logger (its Log class, as its transport calls it): the 'not connected' error of a
    PLC that left is dropped, and another error keeps its line without the hex dump of recent frames."""
    import logging
    from pymodbus.logging import Log
    from mrkd.runtime.plc.modbus import _quiet_pymodbus
    _quiet_pymodbus()
    with caplog.at_level(logging.WARNING, logger="pymodbus"):
        Log.transport_dump(Log.SEND_DATA, b"\x00\x27\x00\x00\x00\x06\x01\x05\x00\x01\xff\x00", b"")
        Log.error("Cancel send, because not connected!")
        Log.transport_dump(Log.RECV_DATA, b"\x00\x01", b"")
        Log.error("some other failure")
    said = [r.getMessage() for r in caplog.records if r.name.startswith("pymodbus")]
    assert said == ["some other failure"], said
