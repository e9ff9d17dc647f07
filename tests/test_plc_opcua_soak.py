"""Opt-in soak of the OPC UA VisionSystem (MRKD_SOAK=1; MRKD_SOAK_MINUTES, default 30): a `mrkd run` cell
serving OPC UA to node-opcua clients that connect, subscribe, start jobs and are killed mid-job, over and
over, as MES connectors and HMIs do through a shift. A short soak (16 min, last session) saw the server's
RSS rise ~30 MB while its 1000-result history filled and then ~0.6 MB a minute: that would end a cell that
runs for weeks. This measures the growth per part once the history is full, and the process's file
descriptors and threads, and checks every triggered part was judged, logged and published.

Run: MRKD_SOAK=1 MRKD_SOAK_MINUTES=30 pytest tests/test_plc_opcua_soak.py -s (it prints the samples)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from peers import require_node_client
from plc_fixtures import OPCUA_CLIENT_DIR, part_images
from runtime_fixtures import build_tiny_model

from mrkd.benchmarks.mosquitto import free_port

HISTORY = 1000                    # the server's result history (runtime/plc/opcua.py's default)
# A leak a cell would die of: 1 KiB a part is 86 MB a day at one part a second. The bound is on the
# least-squares slope of RSS against parts judged, over the samples taken once the history is full.
LEAK_BYTES_PER_PART = 1024


def _proc(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_kb": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def _lines(path: Path) -> int:
    """Whole lines of the cell's parts log so far (one per judged part)."""
    return path.read_bytes().count(b"\n") if path.is_file() else 0


@pytest.mark.skipif(os.environ.get("MRKD_SOAK") != "1", reason="soak test: set MRKD_SOAK=1 (>= 10 minutes)")
def test_soak_opcua_clients_churning_against_a_cell(tmp_path: Path):
    minutes = float(os.environ.get("MRKD_SOAK_MINUTES", "30"))
    node = require_node_client(OPCUA_CLIENT_DIR, ("node-opcua-client",))
    model = build_tiny_model(tmp_path / "tiny.onnx")
    part_images(tmp_path / "parts", "gdgggdgg")
    port, parts_log, summary = free_port(), tmp_path / "parts.jsonl", tmp_path / "summary.json"
    url = f"opc.tcp://127.0.0.1:{port}"
    stderr = (tmp_path / "stderr.txt").open("w")
    cell = subprocess.Popen(
        [sys.executable, "-m", "mrkd.cli", "run", str(model), "--source", str(tmp_path / "parts"), "--loop",
         "--trigger", "software", "--opcua", url, "--opcua-user", "op", "--opcua-password-env", "MRKD_SOAK_PW",
         "--parts-log", str(parts_log), "--summary", str(summary), "--status-every", "0"],
        stdout=subprocess.DEVNULL, stderr=stderr,
        env=dict(os.environ, MRKD_SOAK_PW="pw", PYTHONWARNINGS="ignore"))
    rng = random.Random(0)
    samples, clients, killed, calls_good = [], 0, 0, 0
    started = time.monotonic()
    try:
        time.sleep(5)
        next_sample = 0.0
        while time.monotonic() - started < minutes * 60:
            assert cell.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
            jobs = str(rng.randint(10, 60))
            client = subprocess.Popen([node, "client.js", url + "/mrkd/", "op", "pw", jobs], cwd=OPCUA_CLIENT_DIR,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            clients += 1
            try:
                if rng.random() < 0.3:                     # a connector killed mid-job (no CloseSession)
                    time.sleep(rng.uniform(1.0, 5.0))
                    client.kill()
                    killed += 1
                out, _ = client.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                client.kill()
                out, _ = client.communicate()
            calls_good += sum(1 for line in out.splitlines()
                              if line.startswith("{") and json.loads(line).get("status") == "Good")
            now = time.monotonic() - started
            if now >= next_sample:
                sample = dict(_proc(cell.pid), minute=round(now / 60, 2), parts=_lines(parts_log))
                samples.append(sample)
                print(json.dumps(sample), flush=True)
                next_sample = now + 30
    finally:
        if cell.poll() is None:
            cell.send_signal(signal.SIGTERM)
        try:
            cell.wait(timeout=60)
        finally:
            if cell.poll() is None:
                cell.kill()
            stderr.close()
    assert cell.returncode == 0, (tmp_path / "stderr.txt").read_text()[-2000:]
    result = json.loads(summary.read_text())
    logged = _lines(parts_log)
    full = [s for s in samples if s["parts"] > HISTORY + 200]
    report = {"clients": clients, "killed": killed, "jobs_started": calls_good, "parts": result["parts"],
              "logged": logged, "first": samples[0], "last": samples[-1], "samples_after_full": len(full)}
    if len(full) >= 4:
        slope_kb = np.polyfit([s["parts"] for s in full], [s["rss_kb"] for s in full], 1)[0]
        report["rss_bytes_per_part_after_full"] = round(slope_kb * 1024, 1)
        report["rss_mb_per_minute_after_full"] = round(
            np.polyfit([s["minute"] for s in full], [s["rss_kb"] for s in full], 1)[0] / 1024, 3)
    print(json.dumps(report), flush=True)
    assert result["parts"] == logged and result["parts"] >= calls_good, report   # killed clients' jobs count too
    assert result["missed_triggers"] == 0 and result["verdicts"]["ERROR"] == 0, report
    assert samples[-1]["fds"] <= samples[0]["fds"] + 2 and samples[-1]["threads"] <= samples[0]["threads"] + 2, report
    assert len(full) >= 4, f"the soak was too short to fill the {HISTORY}-result history and watch after: {report}"
    assert report["rss_bytes_per_part_after_full"] < LEAK_BYTES_PER_PART, report
