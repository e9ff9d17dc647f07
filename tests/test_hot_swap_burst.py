"""Issue 23's hostile case "a swap during a burst of alarms": every frame of a looped folder is
defective, so every frame the cooldown lets through raises an alarm, and a new model version is
moved in and reloaded in the middle of it. The real line (run_line, the tiny exported ONNX models,
the real events-log output, the hot swap's ModelSlots) runs it; the expectations are written here
from the frame indices alone.
"""

from __future__ import annotations

import json

import cv2
import numpy as np

from runtime_fixtures import defective_frame, export_tiny_model
from test_hot_swap import install
from mrkd.runtime.detector import Detector
from mrkd.runtime.line.loop import Camera, Line, run_line
from mrkd.runtime.line.swap import line_slots
from mrkd.runtime.metadata import file_sha256
from mrkd.runtime.outputs.base import LineObserver
from mrkd.runtime.outputs.events import EventLogOutput

FRAMES = 30
COOLDOWN_FRAMES = 3
SWAP_AFTER = 10          # the reload is asked for once this frame index is judged


def test_a_swap_in_a_burst_of_alarms_keeps_every_frame_the_cooldown_and_names_each_alarms_model(tmp_path):
    """Every frame judged once, in order; alarms exactly every COOLDOWN_FRAMES frames through the swap
    (the cooldown the old model's last alarm started still holds for the new model: an alarm-policy
    restart would alarm on the first frame after the swap); each alarm in the events log names the
    model that judged it, split at the swap's own frame count."""
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(7)
    for i in range(5):
        cv2.imwrite(str(folder / f"f{i:02d}.png"), defective_frame(rng))
    (tmp_path / "deploy").mkdir()
    live = export_tiny_model(tmp_path / "deploy" / "model.onnx", threshold=0.1)
    v2 = export_tiny_model(tmp_path / "v2.onnx", threshold=0.2)
    sha_a, sha_b = file_sha256(live), file_sha256(v2)
    assert sha_a != sha_b
    line = Line((Camera("cam0", str(folder), str(live), loop=True, cooldown=0.0,
                        cooldown_frames=COOLDOWN_FRAMES),))
    detectors = {str(live.resolve()): Detector(live)}
    slots = line_slots(line, detectors, status=lambda text: None)
    judged = []

    class SwapMidBurst(LineObserver):
        def on_frame(self, result):
            judged.append((result.frame_index, result.model_sha256, result.anomalous))
            if result.frame_index == SWAP_AFTER:
                install(v2, live)
                assert slots.request_reload("test")
                assert slots.wait_idle(60)
    log = tmp_path / "events.jsonl"
    try:
        summary = run_line(line, [SwapMidBurst(), slots, EventLogOutput(log)], detectors=detectors, slots=slots,
                           max_frames=FRAMES, status=lambda text: None)
    finally:
        for detector in detectors.values():
            detector.close()
    swaps = slots.report()
    assert [s["outcome"] for s in swaps] == ["swapped"], swaps
    boundary = swaps[0]["frames_before"]
    assert SWAP_AFTER < boundary < FRAMES and boundary % COOLDOWN_FRAMES, boundary   # mid-cooldown: it tells
    # no frame missing, none judged twice, every one anomalous under both versions
    assert [i for i, _, _ in judged] == list(range(FRAMES)) and summary["frames"] == FRAMES
    assert all(anomalous for _, _, anomalous in judged)
    assert [sha for _, sha, _ in judged] == [sha_a] * boundary + [sha_b] * (FRAMES - boundary)
    # the cooldown runs on through the swap: alarms every COOLDOWN_FRAMES frames, no extra one after it
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["frame_index"] for e in events] == list(range(0, FRAMES, COOLDOWN_FRAMES))
    assert summary["events"] == len(events)
    assert summary["cameras"]["cam0"]["alarms_suppressed_by_cooldown"] == FRAMES - len(events)
    for event in events:
        assert event["model_sha256"] == (sha_a if event["frame_index"] < boundary else sha_b), event
        assert event["threshold"] == (0.1 if event["frame_index"] < boundary else 0.2), event
