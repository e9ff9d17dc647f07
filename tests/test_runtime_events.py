"""Event records across runs: ids unique and time-ordered, snapshots never overwritten, the JSON-lines
log valid after a SIGKILL mid-run and a restart; the bounded drop-oldest queue every sender uses."""

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runtime_fixtures import build_tiny_model, normal_then_defective, write_video

from mrkd.runtime import AlarmPolicy, Detector, OutputSettings, build_outputs, open_source, read_events, run_stream
from mrkd.runtime.outputs.events import DropOldestQueue, new_event_id
from mrkd.runtime.outputs.snapshots import write_new_file

TESTS = Path(__file__).parent
MRKD = [sys.executable, "-c", "from mrkd.cli import main; main()"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(TESTS) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_event_ids_sort_by_time_and_do_not_repeat():
    times = [dt.datetime(2026, 12, 1, 6, 5, 12, 345000, tzinfo=dt.timezone.utc) + dt.timedelta(milliseconds=i)
             for i in range(0, 3000, 7)]
    ids = [new_event_id(t) for t in times]
    assert ids[0].startswith("20261201T060512.345Z-") and len(ids[0]) == len("20261201T060512.345Z-") + 8
    assert sorted(ids) == ids
    same_ms = {new_event_id(times[0]) for _ in range(2000)}
    assert len(same_ms) == 2000


def test_write_new_file_never_replaces(tmp_path):
    path = tmp_path / "a.jpg"
    write_new_file(path, b"first")
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_new_file(path, b"second")
    assert path.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg"]     # no temporary file left


def test_a_second_run_keeps_the_first_runs_snapshots(tmp_path):
    """Both runs alarm on the same frame numbers; before, the second run's names restarted at 0 and
    replaced the first run's images, so old log lines pointed at new pictures."""
    model = build_tiny_model(tmp_path / "m.onnx")
    frames = normal_then_defective(2, 3)
    digests = {}
    for run in range(2):
        sinks = build_outputs(OutputSettings(events=str(tmp_path / "events.jsonl"), snapshots=str(tmp_path / "snaps")))
        run_stream(Detector(model), open_source(frames), AlarmPolicy(0.1), sinks, status=lambda line: None)
        for event in read_events(tmp_path / "events.jsonl"):
            digests.setdefault(event["snapshot"], Path(event["snapshot"]).read_bytes())
    events = read_events(tmp_path / "events.jsonl")
    assert [e["frame_index"] for e in events] == [2, 3, 4] * 2
    assert len({e["event_id"] for e in events}) == 6
    assert len({e["snapshot"] for e in events}) == 6 == len(list((tmp_path / "snaps" / "cam0").iterdir()))
    for event in events:       # each line still points at the image written with it, unchanged
        assert event["event_id"] in Path(event["snapshot"]).name
        assert Path(event["snapshot"]).read_bytes() == digests[event["snapshot"]]


def test_an_alarm_event_carries_its_id_camera_and_time(tmp_path):
    from mrkd.runtime import Camera, Line, run_line
    from mrkd.runtime.outputs.base import LineObserver

    class Events(LineObserver):
        def __init__(self):
            self.seen = []

        def on_event(self, camera, event):
            self.seen.append(event)

    recorder = Events()
    outputs = build_outputs(OutputSettings(events=str(tmp_path / "e.jsonl"), snapshots=str(tmp_path / "s")))
    line = Line((Camera("cam1", normal_then_defective(0, 1), str(build_tiny_model(tmp_path / "m.onnx")),
                        threshold=0.1),))
    run_line(line, [*outputs, recorder], status=lambda text: None)
    [event] = recorder.seen
    assert read_events(tmp_path / "e.jsonl") == [event]
    assert event["camera"] == "cam1" and Path(event["snapshot"]).parent == tmp_path / "s" / "cam1"
    stamp = dt.datetime.strptime(event["event_id"][:19], "%Y%m%dT%H%M%S.%f")
    logged = dt.datetime.fromisoformat(event["time"]).replace(tzinfo=None)
    assert abs((logged - stamp).total_seconds()) < 0.001


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_leaves_a_valid_log_and_every_snapshot(tmp_path):
    frames = [f for seed in range(60) for f in normal_then_defective(5, 5, seed=seed)]   # 600 frames
    video = write_video(tmp_path / "long.avi", frames)
    model = build_tiny_model(tmp_path / "m.onnx")
    events, snaps = tmp_path / "events.jsonl", tmp_path / "snaps"
    args = MRKD + ["run", str(model), "--source", str(video), "--events", str(events), "--snapshots", str(snaps),
                   "--cooldown", "0", "--status-every", "0"]
    proc = subprocess.Popen(args + ["--fps", "200"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not events.exists() or len(events.read_bytes().splitlines()) < 15):
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()     # still running when killed
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = len(read_events(events))
    assert killed_at >= 15
    with open(events, "ab") as handle:    # what a power cut mid-write leaves: half a line
        handle.write(b'{"event_id": "torn", "sco')
    done = subprocess.run(args + ["--max-frames", "40"], capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    logged = read_events(events)                      # every line is whole JSON again
    assert len(logged) == killed_at + 20              # 40 frames: 20 defective, cooldown 0
    assert len({e["event_id"] for e in logged}) == len(logged)
    snapshots = [Path(e["snapshot"]) for e in logged]
    assert all(p.exists() for p in snapshots) and len(set(snapshots)) == len(logged)
    leftovers = [p.name for p in snaps.iterdir() if p not in set(snapshots)]
    # At most the one snapshot written just before the kill, whose log line never made it.
    assert len([n for n in leftovers if not n.startswith(".")]) <= 1


def test_drop_oldest_queue_keeps_the_newest_and_counts_the_rest():
    q = DropOldestQueue(3)
    for i in range(7):
        q.put(i)
    assert len(q) == 3 and q.dropped == 4
    got = [q.get(timeout=0.1) for _ in range(3)]
    for _ in got:
        q.done()
    assert got == [4, 5, 6]
    q.put("a")
    q.put("b")
    assert q.drain() == 2 and q.dropped == 6 and len(q) == 0
    assert q.wait_empty(time.monotonic() + 0.1)
