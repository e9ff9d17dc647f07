"""Evidence is written off the frame loop: a probe with 1000x800 noise frames and --evidence-ok-every 1
measured 19.6 -> 9.5 frames/s and p50 latency 20 -> 202 ms, because the lossless PNG encode and its fsync
(the OK sample in on_frame, an alarm's evidence in event_fields) ran on the loop's own thread.

Here the encoder is a stand-in that stalls until the test lets it go: the loop must score every frame
while no evidence has been encoded yet (an ordering, not a time), and still no event may name a file
that is not there or a hash that does not match it."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from runtime_fixtures import build_tiny_model, normal_then_defective


def _wait_for(condition, seconds: float) -> bool:
    done = threading.Event()
    for _ in range(int(seconds / 0.05)):
        if condition():
            return True
        done.wait(0.05)
    return condition()


def _events_name_only_written_files(path: Path) -> list:
    events = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    for event in events:
        if event.get("evidence") is not None:
            written = Path(event["evidence"])
            assert written.is_file(), f"event {event['event_id']} names {written}, which is not there"
            assert hashlib.sha256(written.read_bytes()).hexdigest() == event["evidence_sha256"]
        else:
            assert event.get("evidence_sha256") is None
    return events


@pytest.mark.parametrize("stalled", ["encode_png", "write_new_file"])   # a slow encoder; a disk that hangs
def test_the_frame_loop_scores_every_frame_while_the_evidence_encoder_stalls(tmp_path, monkeypatch, stalled):
    from mrkd.runtime.line.loop import Camera, Line, run_line
    from mrkd.runtime.outputs import OutputSettings, build_outputs
    from mrkd.runtime.outputs import evidence as evidence_module
    from mrkd.runtime.outputs.base import LineObserver
    from mrkd.runtime.outputs.evidence import EvidenceSettings, EvidenceWriter

    gate, encoding = threading.Event(), threading.Event()
    real = getattr(evidence_module, stalled)

    def stalled_stand_in(*args):        # an encoder or a disk far slower than the line
        encoding.set()
        gate.wait(60)
        return real(*args)
    monkeypatch.setattr(evidence_module, stalled, stalled_stand_in)

    class Frames(LineObserver):
        def __init__(self):
            self.count = self.ok = 0

        def on_frame(self, result):
            self.count += 1
            self.ok += result.event is None and not result.anomalous     # an OK sample is due for each

    frames = normal_then_defective(24, 3)         # 24 OK frames (each due a sample), then 3 alarms
    events_path = tmp_path / "events.jsonl"
    outputs = build_outputs(OutputSettings(events=str(events_path),
                                           evidence=EvidenceSettings(str(tmp_path / "evidence"), ok_every=1)))
    writer = next(o for o in outputs if isinstance(o, EvidenceWriter))
    counted = Frames()
    line = Line((Camera("cam0", frames, str(build_tiny_model(tmp_path / "m.onnx")), threshold=0.1, cooldown=0.0),))
    out: dict = {}
    runner = threading.Thread(target=lambda: out.update(summary=run_line(line, [*outputs, counted],
                                                                        status=lambda text: None)), daemon=True)
    runner.start()
    try:
        scored_all = _wait_for(lambda: counted.count == len(frames), 20.0)
        stalled_then, scored_then = encoding.is_set() and not gate.is_set(), counted.count
        # while the encoder stalls, no event has gone out naming evidence that is not written yet
        assert not _events_name_only_written_files(events_path)
    finally:
        gate.set()
        runner.join(60)
    assert stalled_then, "the encoder was never asked for an image"
    assert scored_all, f"the loop scored {scored_then} of {len(frames)} frames while the encoder stalled"
    summary = out["summary"]
    assert summary["frames"] == len(frames) and summary["alarms"] >= 1
    events = _events_name_only_written_files(events_path)
    assert len(events) == summary["alarms"]
    assert all(event["evidence"] is not None for event in events)        # every alarm's evidence written
    health = writer.health()
    ok_files = list((tmp_path / "evidence" / "cam0" / "ok").glob("*.png"))
    # every OK sample due is written or dropped (the queue is bounded), never lost without a count
    assert writer.ok_written == len(ok_files) >= 1 and health.dropped >= 1
    assert health.dropped + len(ok_files) == counted.ok, (health, len(ok_files), counted.ok)
    assert health.failed == 0 and health.sent == len(ok_files) + len(events)


@pytest.mark.parametrize("background", [False, True])
def test_an_alarm_waits_for_its_evidence_and_names_the_file_and_hash(tmp_path, background):
    """event_fields (called off the loop in a free run) returns the path and hash of a file on disk, with
    or without the OK samples' worker."""
    import numpy as np
    from mrkd.runtime.outputs.base import FrameResult
    from mrkd.runtime.outputs.evidence import EvidenceSettings, EvidenceWriter
    writer = EvidenceWriter(EvidenceSettings(str(tmp_path), ok_every=1), background=background)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for i in range(3):
        writer.on_frame(FrameResult("cam0", i, float(i), image, np.zeros((4, 4), np.float32), 0.0, 1.0, False))
    fields = writer.event_fields(FrameResult("cam0", 9, 9.0, image, np.zeros((4, 4), np.float32), 2.0, 1.0, True,
                                             event={"event_id": "e1"}))
    assert hashlib.sha256(Path(fields["evidence"]).read_bytes()).hexdigest() == fields["evidence_sha256"]
    writer.on_stop()
    assert writer.ok_written == 3 and writer.health().dropped == 0
