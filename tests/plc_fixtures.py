"""Helpers for the PLC tests: a small TriggerTarget written here (for the state machine's own tests),
part records, an image folder of good and defective parts for the tiny model, and a real `mrkd run`
serving Modbus TCP with a client that waits for it, and node-opcua scripts driven a command at a time."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from runtime_fixtures import build_tiny_model, defective_frame, normal_frame

from mrkd.runtime.outputs.base import CameraJudgement, PartResult, TriggerReceipt, Verdict
from mrkd.runtime.outputs.events import new_event_id


class QueueTarget:
    """A TriggerTarget by hand: accepts up to ``queue`` waiting triggers; ``judge(verdict)`` finishes
    the oldest and tells the observers, as the part runner does."""

    def __init__(self, queue: int = 1, recipes=(0, 2)):
        self.queue, self._recipes = queue, tuple(recipes)
        self.pending: List[tuple] = []
        self.calls: List[tuple] = []
        self.observers: list = []
        self._online, self.sequence, self.inspections = True, 0, 0
        self.run_id = new_event_id()
        self.lock = threading.Lock()

    def trigger(self, part_id: Optional[str] = None, recipe: Optional[int] = None) -> TriggerReceipt:
        with self.lock:
            self.sequence += 1
            self.calls.append((part_id, recipe))
            reason = "offline" if not self._online else ("queue full" if len(self.pending) >= self.queue else None)
            if reason is None:
                self.pending.append((self.sequence, part_id, recipe))
        receipt = TriggerReceipt(reason is None, self.sequence, str(part_id), reason, time.time())
        for observer in self.observers:
            observer.on_trigger(receipt)
        return receipt

    @property
    def ready(self) -> bool:
        return self._online and len(self.pending) < self.queue

    @property
    def busy(self) -> bool:
        return bool(self.pending)

    @property
    def online(self) -> bool:
        return self._online

    def set_online(self, online: bool) -> None:
        self._online = bool(online)

    @property
    def recipes(self):
        return self._recipes

    @property
    def active_recipe(self) -> int:
        return 0

    def judge(self, verdict: str = Verdict.OK, score: float = 0.05, error_code: int = 0) -> PartResult:
        with self.lock:
            _, part_id, recipe = self.pending.pop(0)
            self.inspections += 1
            number = self.inspections
        part = make_part(number, part_id, verdict, score, recipe=recipe or 0, error_code=error_code, run_id=self.run_id)
        for observer in self.observers:
            observer.on_part(part)
        return part


def make_part(inspection_id: int, part_id: str, verdict: str = Verdict.OK, score: float = 0.05,
              threshold: float = 0.1, recipe: int = 0, error_code: int = 0, verdict_s: float = 0.0123,
              run_id: str = "") -> PartResult:
    if verdict == Verdict.ERROR:
        score = math.nan
    camera = CameraJudgement("cam", score, threshold, verdict == Verdict.NG, 0 if verdict == Verdict.ERROR else 1,
                             "timeout" if verdict == Verdict.ERROR else None)
    return PartResult(inspection_id=inspection_id, part_id=str(part_id), verdict=verdict, score=score,
                      threshold=threshold, cameras=(camera,), model_sha256="0" * 64, recipe=recipe,
                      trigger_time=time.time(), acquired_s=0.001, verdict_s=verdict_s, error_code=error_code,
                      error="cam: timeout" if verdict == Verdict.ERROR else None, run_id=run_id)


def part_images(folder: Path, pattern: str, seed: int = 0) -> List[bool]:
    """Write one image per letter of ``pattern`` ('g' good, 'd' defective), named so they sort in
    order; returns the expected NG flags."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index, kind in enumerate(pattern):
        frame = defective_frame(rng) if kind == "d" else normal_frame(rng)
        cv2.imwrite(str(folder / f"part{index:05d}.png"), frame)
    return [kind == "d" for kind in pattern]


def defect_pattern(count: int, seed: int = 1) -> str:
    rng = np.random.default_rng(seed)
    return "".join("d" if x < 0.3 else "g" for x in rng.random(count))


def folder_cell(folder: Path, pattern: str, observers: Sequence = (), queue: int = 4):
    """A one-camera, software-triggered part runner (not started) judging ``folder/parts`` (``pattern``:
    g good, d defective, in trigger order, see part_images) with the tiny model built in ``folder``."""
    from mrkd.runtime.line.loop import Camera, Line
    from mrkd.runtime.line.parts import PartRunner, open_part_sources
    from mrkd.runtime.line.trigger import PartSettings
    model = str(build_tiny_model(folder / "tiny.onnx"))
    part_images(folder / "parts", pattern)
    line = Line((Camera("cam", str(folder / "parts"), model, trigger="software"),))
    settings = PartSettings(queue=queue, timeout=5.0)
    return PartRunner(line, open_part_sources(line, settings), settings, observers=list(observers),
                      status=lambda text: None)


def modbus_line_run(tmp_path: Path, pattern: str, plc_settings: str = "",
                    stderr=subprocess.PIPE) -> Tuple[subprocess.Popen, int]:
    """`mrkd run --line` of the tiny model, one software-triggered camera over a folder of parts (``pattern``:
    part_images'), serving Modbus TCP on a free local port (``plc_settings``: more lines of the line file's
    [plc] table), stdout piped, stderr to ``stderr`` (piped by default): (process, port)."""
    from mrkd.benchmarks.mosquitto import free_port
    model = build_tiny_model(tmp_path / "tiny.onnx")
    part_images(tmp_path / "parts", pattern)
    port = free_port()
    line = tmp_path / "line.toml"
    line.write_text(f'[[camera]]\nname = "cam"\nsource = "{tmp_path / "parts"}"\nmodel = "{model}"\n'
                    f'trigger = "software"\n[plc]\nmodbus = "127.0.0.1:{port}"\n{plc_settings}', encoding="utf-8")
    process = subprocess.Popen([sys.executable, "-m", "mrkd.cli", "run", "--line", str(line), "--status-every", "0"],
                               stdout=subprocess.PIPE, stderr=stderr, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return process, port


def connect_plc(port: int, process: subprocess.Popen, timeout: float = 30.0, client_timeout: float = 3.0):
    """A SimulatedPlc (its requests time out after ``client_timeout`` s) on ``process``'s Modbus server,
    once it listens (within ``timeout`` s; the process's stderr in the failure when it has ended)."""
    from mrkd.benchmarks.plc_peer import ModbusError, SimulatedPlc
    deadline = time.monotonic() + timeout
    while True:
        try:
            return SimulatedPlc(port, timeout=client_timeout)
        except ModbusError:
            assert process.poll() is None, process.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "mrkd run never listened"
            time.sleep(0.2)


OPCUA_CLIENT_DIR = Path(__file__).resolve().parent / "opcua_client"


class NodeOpcuaSteps:
    """A node-opcua script of tests/opcua_client (steps.js, recipe_steps.js) run as ``node SCRIPT URL USER
    PASSWORD``: one command line in, one JSON line out; the first answer says it is ready."""

    def __init__(self, node: str, script: str, url: str, user: str, password: str):
        self.process = subprocess.Popen([node, script, url, user, password], cwd=OPCUA_CLIENT_DIR,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        assert self._answer()["kind"] == "ready"

    def _answer(self) -> dict:
        line = ""
        while not line.startswith("{"):           # node-opcua prints its own warnings there too
            line = self.process.stdout.readline()
            assert line, self.process.stderr.read()[-2000:]
        answer = json.loads(line)
        assert answer["kind"] != "error", answer
        return answer

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
