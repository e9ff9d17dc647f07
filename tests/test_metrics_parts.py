"""/healthz and /metrics of a triggered cell, scraped from a real `mrkd run --trigger software
--trigger-stdin --http`: a triggered camera makes an image only when a part asks for one, so its
health cannot be "scored a frame in the last 10 s" (that answered 503 for a cell judging 20 parts a
second, and for every idle pause of the line): it is healthy while its camera is up."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import cv2
import numpy as np

from line_fixtures import http_get, wait_for
from runtime_fixtures import build_tiny_model, defective_frame, normal_frame

MRKD = [sys.executable, "-c", "from mrkd.cli import main; main()"]


def test_a_triggered_cell_is_healthy_between_parts_and_while_judging_them(tmp_path):
    model = build_tiny_model(tmp_path / "m.onnx")
    parts = tmp_path / "parts"
    parts.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        cv2.imwrite(str(parts / f"p{i}.png"), defective_frame(rng) if i % 2 else normal_frame(rng))
    parts_log = tmp_path / "parts.jsonl"
    proc = subprocess.Popen(MRKD + ["run", str(model), "--source", str(parts), "--loop", "--trigger", "software",
                                    "--trigger-stdin", "--parts-log", str(parts_log), "--http", "127.0.0.1:0",
                                    "--status-every", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines: list = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        assert wait_for(lambda: any("operator page" in line for line in lines), 60), lines
        url = re.search(r"operator page (http://\S+)/", "".join(lines)).group(1)
        assert wait_for(lambda: json.loads(http_get(url + "/healthz")[1])["status"] != "starting", 30)
        code, body = http_get(url + "/healthz")            # up, no part yet: an idle line is a healthy one
        assert code == 200, body
        assert json.loads(body)["cameras"]["cam0"]["ok"] is True
        for i in range(4):
            proc.stdin.write(f"P-{i}\n")
        proc.stdin.flush()
        assert wait_for(lambda: parts_log.exists() and len(parts_log.read_text().splitlines()) == 4, 30)
        code, body = http_get(url + "/healthz")
        assert code == 200, body
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    reader.join(10)
    assert proc.returncode == 0, "".join(lines)
    verdicts = [json.loads(line)["verdict"] for line in parts_log.read_text().splitlines()]
    assert verdicts == ["OK", "NG", "OK", "NG"]
