"""The PLC handshake's cost: trigger -> Results Valid as a PLC sees it over Modbus TCP, and
StartSingleJob -> ResultReady event as an OPC UA client sees it, next to each part's own trigger ->
verdict time in the same run.

A PLC simulated with pymodbus' client (benchmarks/plc_peer.py addresses) scans every 10 ms, as PLC
cycles do: each scan reads the status bits; it raises Trigger, drops it once Trigger Ack is seen,
and reads the result registers and acknowledges in the scan that sees Results Valid. The line is
the part runner over a folder of good and defective parts (a triggered folder takes its next image
per trigger) judged by a random-weight EfficientNet-Lite0 (speed only) on the CPU.

Per part (wall clock, one machine):
* ``plc_latency``: the PLC's Trigger write sent -> the response of the first read showing Results
  Valid. It includes waiting for the next scan (0..10 ms), which is the PLC's, not mrkd's.
* ``verdict``: the part runner's own trigger -> verdict (``PartResult.verdict_s``).
* ``handshake``: what the handshake adds beyond the verdict and the PLC's polling: the Trigger
  write reaching the line (write sent -> ``PartResult.trigger_time``) + the verdict reaching the
  presented registers (verdict -> the handshake's ``on_part`` done) + the one read that showed it
  (request sent -> answer). Goal: p99 < 5 ms.

OPC UA: an asyncua client (its own process) calls StartSingleJob and waits for the part's
ResultReady event on a subscription with a PUBLISH_MS publishing interval (the server sends
notifications at that pace: OPC UA's counterpart of the PLC's scan). ``event_latency``: call sent ->
event received. The event's ``Time`` field is set by the server when it emits the event, and the
notification leaves at the next publish, so the wait splits into ``verdict_to_event`` (verdict ->
event Time: mrkd's hand-off to the server's loop and its writes) and ``event_to_client`` (event Time ->
received: the publishing interval, OPC UA's polling, plus delivery). ``handshake``: the call reaching
the line (sent -> ``trigger_time``) + ``verdict_to_event``: what the handshake adds beyond the
subscription's publishing, as the Modbus figure excludes the PLC's scan. ``handshake_with_publish``
adds ``event_to_client``.

``load_before``/``load_after``: os.getloadavg() (1, 5, 15 min): on a shared machine the p99 follows it.

    python -m mrkd.benchmarks.bench_plc [--quick] [--switch-ms 5]      (mrkd bench --only plc)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from mrkd.runtime.outputs.base import LineObserver

POLL_S = 0.010
PUBLISH_MS = 5
GOAL_MS = 5.0


def _percentiles(values_s: List[float]) -> dict:
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    return {"p50": round(float(np.percentile(ms, 50)), 2), "p99": round(float(np.percentile(ms, 99)), 2),
            "max": round(float(ms.max()), 2)}


class _Presented(LineObserver):
    """After the PLC server among the observers: each part, and when its result was in the registers."""

    def __init__(self):
        self.at, self.parts = {}, {}

    def on_part(self, result):
        self.at[result.inspection_id] = time.time()
        self.parts[result.inspection_id] = result


def part_folder(folder: Path, count: int, seed: int = 0) -> List[bool]:
    """Gray textured parts, about a third with a bright scratch; returns which are defective."""
    import cv2
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    defective = list(rng.random(count) < 0.3)
    for i, bad in enumerate(defective):
        image = rng.integers(90, 131, size=(96, 128, 3), dtype=np.uint8)
        if bad:
            image[20:30, 10:90] = 255
        cv2.imwrite(str(folder / f"part{i:05d}.png"), image)
    return defective


def plc_scans(port: int, parts: int, pipe) -> None:
    """The PLC, in its own process (a PLC is another machine: no shared interpreter lock with the
    server): ``parts`` handshakes scanning every POLL_S; sends back one timing row per part."""
    from mrkd.benchmarks.plc_peer import DI, PART_ID, RESULTS_ACK, TRIGGER, TRIGGER_ENABLE, SimulatedPlc
    plc = SimulatedPlc(port)
    rows = []
    try:
        plc.coil(TRIGGER_ENABLE, True)
        for i in range(parts):
            plc.wait(lambda b: b["trigger_ready"], 10, "Trigger Ready")
            plc.register(PART_ID, i % 65536)
            next_scan = time.perf_counter()
            sent = time.time()
            plc.coil(TRIGGER, True)
            trigger_high = True
            while True:
                next_scan += POLL_S
                time.sleep(max(0.0, next_scan - time.perf_counter()))
                asked = time.time()
                bits = plc.client.read_discrete_inputs(0, count=len(DI)).bits
                answered = time.time()
                if trigger_high and bits[DI["trigger_ack"]]:
                    plc.coil(TRIGGER, False)
                    trigger_high = False
                if bits[DI["results_valid"]]:
                    break
                if answered - sent > 10:
                    raise RuntimeError(f"part {i}: no Results Valid within 10 s")
            reading = plc.registers()
            if trigger_high:
                plc.coil(TRIGGER, False)
            plc.coil(RESULTS_ACK, True)
            plc.coil(RESULTS_ACK, False)
            rows.append((i, sent, asked, answered, reading.inspection_id, reading.part_id))
        pipe.send(rows)
    except Exception as exc:   # reported by the parent
        pipe.send(f"{type(exc).__name__}: {exc}")
    finally:
        plc.close()


def opcua_jobs(url: str, parts: int, pipe) -> None:
    """The OPC UA client, in its own process: ``parts`` StartSingleJob calls, each waiting for its
    ResultReady event; sends back one timing row per job."""
    import asyncio

    async def jobs():
        from asyncua import Client
        from mrkd.runtime.plc.opcua import NAMESPACE
        arrived: asyncio.Queue = asyncio.Queue()

        class Handler:
            def event_notification(self, event):
                arrived.put_nowait((time.time(), event.JobId, event.ResultId, event.Time.timestamp()))

        client = Client(url)
        client.set_user("bench")
        client.set_password("bench")
        async with client:
            ns = await client.get_namespace_index(NAMESPACE)
            system = await client.nodes.objects.get_child(f"{ns}:VisionSystem")
            machine = await system.get_child(f"{ns}:VisionStateMachine")
            event_type = await client.nodes.root.get_child(["0:Types", "0:EventTypes", "0:BaseEventType",
                                                            f"{ns}:ResultReadyEventType"])
            start_job = await machine.get_child(f"{ns}:StartSingleJob")   # by NodeId, as a PLC calls it: no
            subscription = await client.create_subscription(PUBLISH_MS, Handler())   # browse in the timing
            await subscription.subscribe_events(system, event_type)
            rows = []
            for i in range(parts):
                sent = time.time()
                job = await machine.call_method(start_job, f"m{i}", str(i), "", "")
                while True:
                    received, job_id, result_id, emitted = await asyncio.wait_for(arrived.get(), 10)
                    if job_id == job:
                        break
                rows.append((i, sent, received, result_id, emitted))
            return rows

    try:
        pipe.send(asyncio.run(jobs()))
    except Exception as exc:   # reported by the parent
        pipe.send(f"{type(exc).__name__}: {exc}")


def _in_process(target, args, parts: int):
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=target, args=(*args, sender), daemon=True)
    process.start()
    rows = receiver.recv() if receiver.poll(parts * 2.0 + 60) else "no answer"
    process.join(10)
    if isinstance(rows, str):
        raise RuntimeError(f"{target.__name__}: {rows}")
    return rows


def opcua_run(url: str, parts: int, judged: dict) -> dict:
    rows = _in_process(opcua_jobs, (url, parts), parts)
    latencies, verdicts, handshake, to_line, to_event, to_client, with_publish = [], [], [], [], [], [], []
    by_result_id = {part.result_id: part for part in judged.values()}    # <run id>-<inspection id>
    for i, sent, received, result_id, emitted in rows:
        part = by_result_id[result_id]
        latencies.append(received - sent)
        verdicts.append(part.verdict_s)
        to_line.append(part.trigger_time - sent)
        to_event.append(emitted - (part.trigger_time + part.verdict_s))
        to_client.append(received - emitted)
        handshake.append(to_line[-1] + to_event[-1])
        with_publish.append(handshake[-1] + to_client[-1])
    return {"event_latency_ms": _percentiles(latencies), "verdict_ms": _percentiles(verdicts),
            "handshake_ms": _percentiles(handshake), "call_to_line_ms": _percentiles(to_line),
            "verdict_to_event_ms": _percentiles(to_event), "event_to_client_ms": _percentiles(to_client),
            "handshake_with_publish_ms": _percentiles(with_publish), "publishing_interval_ms": PUBLISH_MS,
            "goal_handshake_p99_ms": GOAL_MS, "goal_met": _percentiles(handshake)["p99"] < GOAL_MS}


def modbus_run(port: int, parts: int, judged: dict, presented: dict) -> dict:
    rows = _in_process(plc_scans, (port, parts), parts)
    latencies, verdicts, handshake, write_path, into_registers, read_trip, mismatched = [], [], [], [], [], [], 0
    for i, sent, asked, answered, inspection_id, part_id in rows:
        part = judged[inspection_id]
        mismatched += part_id != i % 65536 or part.part_id != str(i % 65536)
        verdict_at = part.trigger_time + part.verdict_s
        latencies.append(answered - sent)
        verdicts.append(part.verdict_s)
        write_path.append(part.trigger_time - sent)
        into_registers.append(presented[inspection_id] - verdict_at)
        read_trip.append(answered - max(asked, presented[inspection_id]))
        handshake.append(write_path[-1] + into_registers[-1] + read_trip[-1])
    return {"plc_latency_ms": _percentiles(latencies), "verdict_ms": _percentiles(verdicts),
            "excess_over_verdict_ms": _percentiles([a - b for a, b in zip(latencies, verdicts)]),
            "handshake_ms": _percentiles(handshake), "trigger_write_to_line_ms": _percentiles(write_path),
            "verdict_to_registers_ms": _percentiles(into_registers), "showing_read_ms": _percentiles(read_trip),
            "mismatched_results": mismatched, "goal_handshake_p99_ms": GOAL_MS,
            "goal_met": _percentiles(handshake)["p99"] < GOAL_MS}


def run(quick: bool = False, image_size: Optional[int] = None, threads: int = 2,
        switch_ms: Optional[float] = None) -> dict:
    """``switch_ms``: set the interpreter's switch interval after the servers start (they lower it to
    runtime/plc/aio.py SWITCH_INTERVAL_S); 5 is CPython's default, for comparison."""
    from mrkd.benchmarks.bench_parts import export_lite0
    from mrkd.runtime.line.loop import Camera, Line
    from mrkd.runtime.line.parts import PartRunner, open_part_sources
    from mrkd.runtime.line.trigger import PartSettings
    from mrkd.runtime.plc.modbus import ModbusPlc
    from mrkd.runtime.plc.opcua import OpcUaPlc

    import os
    load_before = [round(x, 2) for x in os.getloadavg()]
    image_size = image_size or (64 if quick else 128)
    parts = 30 if quick else 500
    with tempfile.TemporaryDirectory() as tmp:
        model = export_lite0(Path(tmp), image_size)
        defective = part_folder(Path(tmp) / "parts", 2 * parts)
        line = Line((Camera("cam", str(Path(tmp) / "parts"), str(model), threshold=1e9, trigger="software"),),
                    threads=threads)
        settings = PartSettings(queue=1, timeout=5.0)
        runner = PartRunner(line, open_part_sources(line, settings), settings, status=lambda text: None)
        server = ModbusPlc(runner, port=0).start()
        vision = OpcUaPlc(runner, "opc.tcp://127.0.0.1:0", user="bench", password="bench").start()
        if switch_ms is not None:
            sys.setswitchinterval(switch_ms / 1000.0)
        presented = _Presented()
        runner.observers += [server, presented, vision]   # presented after the Modbus server: registers set
        runner.start()
        try:
            modbus = modbus_run(server.address[1], parts, presented.parts, presented.at)
            opcua = opcua_run(vision.url, parts, presented.parts)
        finally:
            summary = runner.stop()
    return {"bench": "plc", "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
            "switch_interval_ms": round(sys.getswitchinterval() * 1000, 3),
            "backbone": "efficientnet_lite0 (random weights)", "image_size": image_size,
            "threads": threads, "parts": parts, "defective_images": int(sum(defective[:parts])),
            "plc_scan_ms": POLL_S * 1000, "modbus": modbus, "opcua": opcua, "missed_triggers": summary["missed_triggers"],
            "errors": summary["verdicts"]["ERROR"]}


if __name__ == "__main__":
    from mrkd.benchmarks.module_main import benchmark_main
    benchmark_main(__doc__, run, add_options=lambda parser: parser.add_argument(
        "--switch-ms", dest="switch_ms", type=float, default=None, metavar="MS",
        help="set Python's thread switch interval to MS after the servers start (default: as they set it)"))
