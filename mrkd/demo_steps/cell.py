"""The demo's inspection cell: a PLC triggers each part over Modbus TCP, `mrkd run` judges one image per
part and answers OK or NG through the handshake of docs/PLC.md (listed in mrkd/demo.py's
DEMO_LAYER_STEPS after the stream step, whose line-calibrated model it uses).

The line is the real command, `mrkd run MODEL --source PARTS --trigger software --modbus ...`, in a
process of its own; the PLC is mrkd.benchmarks.plc_peer's SimulatedPlc, pymodbus' client running the
handshake a PLC program runs (written from the map, not from our server). The parts are the
category's test images, good and defective interleaved, in a folder the line reads one image per
trigger: a cell commissioned without a camera.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import click

from mrkd.deps import require
from mrkd.errors import MrkdError

require("pymodbus", "the demo's inspection cell (a PLC over Modbus TCP) needs pymodbus")

SERVER_LINE = "Modbus TCP PLC server on "    # what `mrkd run --modbus` prints once it listens
START_TIMEOUT_S = 60.0                       # the line loads its model before it listens
PLC_TIMEOUT_S = 10.0                         # the PLC's wait for each step of the handshake
RESULT_CODES = {1: "OK", 2: "NG", 3: "ERROR"}  # input register 0, Result Code (docs/PLC.md)


class CellError(MrkdError, RuntimeError):
    """The cell did not run through; the message says what the line or the PLC said."""


@dataclass(frozen=True)
class CellPart:
    """One part of the demo cell: its id (the PLC's Part Id), what it truly is, the image file."""

    part_id: int
    kind: str          # "good" or the defect's folder name
    image: Path

    @property
    def defective(self) -> bool:
        return self.kind != "good"


def part_folder(category_root: Path, folder: Path, seed: int = 0) -> List[CellPart]:
    """Copy the test images, good and defective shuffled together (``seed``), into ``folder`` under
    names that sort in part order (the folder source takes the next image per trigger)."""
    from mrkd.runtime.labelled_images import labelled_images
    test = category_root / "test"
    images = [(sub.name, p) for sub in labelled_images(test).sub_folders for p in sub.images]
    random.Random(seed).shuffle(images)
    if folder.exists():
        shutil.rmtree(folder)      # the demo's own folder from an earlier run
    folder.mkdir(parents=True)
    parts = []
    for index, (kind, path) in enumerate(images, start=1):
        target = folder / f"{index:04d}_{kind}{path.suffix.lower()}"
        shutil.copyfile(path, target)
        parts.append(CellPart(index, kind, target))
    return parts


class _LineProcess:
    """`mrkd run` in its own process; its stderr is read on a thread (the Modbus address, the last lines)."""

    def __init__(self, command: List[str]):
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: List[str] = []
        self.address: Optional[Tuple[str, int]] = None
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, name="line-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            line = line.rstrip("\n")
            self.lines.append(line)
            if self.address is None and line.startswith(SERVER_LINE):
                host, port = line[len(SERVER_LINE):].split()[0].rsplit(":", 1)
                self.address = (host, int(port))
                self._listening.set()
        self._listening.set()       # the process ended: whoever waits stops waiting

    @property
    def last_words(self) -> str:
        return self.lines[-1] if self.lines else "nothing"

    def failure(self, what: str) -> str:
        """``what`` went wrong on the PLC's side; with the line's last word, and the line stopped."""
        self.stop()
        self._reader.join(timeout=5)
        return f"{what}; the line (exit {self.process.returncode}) said last: {self.last_words}"

    def wait_listening(self, timeout: float) -> Tuple[str, int]:
        self._listening.wait(timeout)
        if self.address is None:
            self.stop()
            raise CellError(f"the line did not start its Modbus server within {timeout:.0f} s; it said: "
                            f"{self.last_words}")
        return self.address

    def finish(self, timeout: float) -> str:
        """End the run as a line's supervisor does (SIGTERM: it finishes what it holds and writes its
        events); its stdout, the run's JSON summary."""
        self.process.send_signal(signal.SIGTERM)
        try:
            stdout, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise CellError(f"the line did not end within {timeout:.0f} s of SIGTERM")
        self._reader.join(timeout=5)
        if self.process.returncode != 0:
            raise CellError(f"the line exited with {self.process.returncode}: {self.last_words}")
        return stdout

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class CellRun:
    """What the PLC read for each part, and what the line's own summary says."""

    parts: List[CellPart]
    verdicts: Dict[int, str] = field(default_factory=dict)   # part id -> OK / NG / ERROR, as the PLC read it
    answered_for_another: int = 0      # results whose Part Id was not the part just triggered
    line_parts: int = -1               # parts the line's summary counts (-1: it did not end cleanly)

    def count(self, verdict: str, defective: bool) -> int:
        return sum(self.verdicts.get(p.part_id) == verdict for p in self.parts if p.defective == defective)


def run_cell(model: Path, parts: List[CellPart], folder: Path, echo=click.echo) -> CellRun:
    """Start the line on ``parts`` (already in ``folder``/parts), drive each part through the Modbus
    handshake as a PLC, print one line per part, stop the line."""
    from mrkd.benchmarks.plc_peer import SimulatedPlc, TRIGGER_ENABLE
    events, evidence = folder / "events.jsonl", folder / "evidence"
    for old in (events, evidence):     # the demo's own outputs of an earlier run
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    command = [sys.executable, "-m", "mrkd.cli", "run", str(model), "--source", str(folder / "parts"),
               "--trigger", "software", "--modbus", "127.0.0.1:0", "--events", str(events), "--evidence", str(evidence)]
    # No --max-parts: the run would end (and its server close) while the PLC still drops Results Ack.
    echo("line: mrkd run MODEL --source PARTS --trigger software --modbus 127.0.0.1:0 --events EVENTS "
         "--evidence EVIDENCE")
    line = _LineProcess(command)
    run = CellRun(parts)
    try:
        host, port = line.wait_listening(START_TIMEOUT_S)
        echo(f"PLC (pymodbus client) on {host}:{port}; per part: Trigger Ready? -> Part Id, Trigger -> "
             "Trigger Ack -> Results Valid -> read the result, Results Ack")
        try:
            plc = SimulatedPlc(port, host=host, poll_s=0.005, timeout=PLC_TIMEOUT_S)
        except Exception as exc:     # pymodbus' own errors: said in one line with what the line said
            raise CellError(line.failure(f"the PLC could not connect ({exc})")) from None
        try:
            plc.coil(TRIGGER_ENABLE, True)
            for part in parts:
                try:
                    cycle = plc.inspect(part.part_id, timeout=PLC_TIMEOUT_S)
                except Exception as exc:
                    raise CellError(line.failure(f"part {part.part_id}: the handshake broke off ({exc})")) from None
                reading = cycle.reading
                verdict = RESULT_CODES.get(reading.result_code, "ERROR")
                run.verdicts[part.part_id] = verdict
                run.answered_for_another += reading.part_id != part.part_id
                right = verdict == ("NG" if part.defective else "OK")
                error = f" (error code {reading.error_code})" if verdict == "ERROR" else ""
                echo(f"  part {part.part_id:3d} {part.kind:13s} -> {verdict}{error}, score/threshold "
                     f"{reading.per_mille / 1000:5.2f}, inspection {reading.inspection_id}, Part Id read back "
                     f"{reading.part_id}, trigger -> Results Valid {cycle.latency_s * 1000:.1f} ms"
                     f"{'' if right else '   <- wrong'}")
        finally:
            plc.close()
        run.line_parts = json.loads(line.finish(timeout=60.0))["parts"]
    finally:
        line.stop()
    return run


def cell_step(context: Dict) -> None:
    from mrkd.demo_steps.stream import exported_model
    category = context["categories"][0]
    folder = Path(context["out"]) / "cell"
    model = exported_model(context, category)
    parts = part_folder(Path(context["data_root"]) / category, folder / "parts")
    run = run_cell(model, parts, folder)
    defective = sum(p.defective for p in parts)
    click.echo(f"{len(parts)} parts of {category} through the PLC handshake: {run.count('NG', True)} of {defective} "
               f"defective NG, {run.count('OK', False)} of {len(parts) - defective} good OK, "
               f"{sum(v == 'ERROR' for v in run.verdicts.values())} ERROR, {run.answered_for_another} answered for "
               f"another part; the line's own summary: {run.line_parts} parts")
    click.echo(f"NG parts' images as the camera gave them: {folder / 'evidence'}; review them with "
               f"`mrkd review {folder / 'events.jsonl'} --labels labels.jsonl`")
    context["cell"] = run
