"""Hot swap: a running line takes a new model between frames (runtime/line/swap.py).

The models are real ONNX graphs written by the exporter's own writer (runtime_fixtures), scored by
the runtime's Detector (ONNX Runtime). The live test runs `mrkd run` as a subprocess over a folder
with --loop, swaps the model file under it and sends SIGHUP: events before and after name the right
model hash (split exactly at the frame the swap happened before), no frame is missing from the
count, and a half-written model is refused while the run goes on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

import runtime_fixtures
from runtime_fixtures import defective_frame, export_tiny_model, normal_frame, write_frames
from mrkd.runtime.detector import Detector
from mrkd.runtime.line.alarms import AlarmPolicy
from mrkd.runtime.line.loop import Camera
from mrkd.runtime.line.swap import ModelSlots
from mrkd.runtime.metadata import file_sha256, sidecar_path
from mrkd.runtime.outputs.base import CameraInfo, FrameResult, LineObserver


def install(src: Path, dst: Path) -> None:
    """Move a model version into place as a deployment does: sidecar, then model, each one rename."""
    tmp_side, tmp_model = dst.parent / ".side.tmp", dst.parent / ".model.tmp"
    tmp_side.write_bytes(sidecar_path(src).read_bytes())
    tmp_model.write_bytes(src.read_bytes())
    os.replace(tmp_side, sidecar_path(dst))
    os.replace(tmp_model, dst)


def frames(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [defective_frame(rng) if i % 2 else normal_frame(rng) for i in range(n)]


def frame_folder(tmp_path: Path, n: int, seed: int) -> Path:
    """tmp_path/frames with ``frames(n, seed)`` as f00.png, f01.png, ... (odd frames are defective)."""
    return write_frames(tmp_path / "frames", frames(n, seed=seed), "f{:02d}.png")


def state_for(path: Path, detector) -> SimpleNamespace:
    camera = Camera(name="cam0", source=[], model=str(path))
    return SimpleNamespace(camera=camera, detector=detector, policy=AlarmPolicy(detector.threshold),
                           info=CameraInfo("cam0", "test", str(path), file_sha256(path), "onnxruntime", "fp32",
                                           detector.threshold, "sidecar"))


@pytest.fixture
def running(tmp_path):
    live = tmp_path / "live" / "model.onnx"
    live.parent.mkdir()
    export_tiny_model(live, threshold=0.1)
    key = str(live.resolve())
    detectors = {key: Detector(live)}
    messages = []
    slots = ModelSlots(detectors, Detector, status=messages.append)
    state = state_for(live, detectors[key])
    slots.apply([state])
    for i, frame in enumerate(frames()):     # the running model judges a few frames
        result = detectors[key](frame)
        slots.on_frame(FrameResult("cam0", i, float(i), frame, result.maps[0], float(result.scores[0]), 0.1,
                                   bool(result.scores[0] >= 0.1)))
    yield SimpleNamespace(live=live, key=key, detectors=detectors, slots=slots, state=state, messages=messages,
                          tmp=tmp_path)
    for detector in detectors.values():
        detector.close()


def test_a_swap_starts_the_debounce_window_again(running):
    """With --debounce K/N the window's votes were carried across a swap: the new model's first anomalous
    frame completed an alarm whose other votes the replaced model cast, and its event named only the new
    model. After a swap the window starts again (the cooldown stays)."""
    policy = running.state.policy = AlarmPolicy(running.state.policy.threshold, debounce=(2, 3))
    assert policy.update(0, 0.0, 1.0) is None                 # one anomalous frame judged by the old model
    export_tiny_model(running.tmp / "v2.onnx", threshold=0.25)
    install(running.tmp / "v2.onnx", running.live)
    assert running.slots.request_reload("test") and running.slots.wait_idle(30)
    assert [r.outcome for r in running.slots.apply([running.state])] == ["swapped"]
    assert running.state.policy is policy
    assert policy.update(1, 1.0, 1.0) is None                 # the new model's first vote alone: no alarm
    alarm = policy.update(2, 2.0, 1.0)                        # its second: 2 of 3, both its own
    assert alarm is not None and alarm.frame_index == 2


def test_new_model_is_staged_beside_the_old_and_swapped_only_between_rounds(running):
    old = running.state.detector
    old_sha = file_sha256(running.live)
    export_tiny_model(running.tmp / "v2.onnx", threshold=0.25)
    install(running.tmp / "v2.onnx", running.live)
    assert running.slots.request_reload("test")
    assert running.slots.wait_idle(30)
    assert running.state.detector is old                 # staged, not in use until the loop says so
    done = running.slots.apply([running.state])
    assert [r.outcome for r in done] == ["swapped"]
    new_sha = file_sha256(running.live)
    assert new_sha != old_sha
    assert running.state.detector is not old and running.detectors[running.key] is running.state.detector
    assert running.state.info.model_sha256 == new_sha and running.slots.sha256_of(running.key) == new_sha
    assert running.state.policy.threshold == pytest.approx(0.25) == running.state.info.threshold
    assert "checked on 3 recent frame(s)" in done[0].detail and done[0].frames_before == 4
    # the new model scores like the graph it is (the tiny model's numpy reference)
    frame = frames(2)[1]
    square = cv2.resize(frame, (runtime_fixtures.SIZE, runtime_fixtures.SIZE), interpolation=cv2.INTER_AREA)
    expected = runtime_fixtures.reference_map(square[None])[0].max()
    assert running.state.detector(frame).scores[0] == pytest.approx(expected, rel=1e-3, abs=1e-5)
    # the same file again: nothing to do
    running.slots.request_reload("again")
    running.slots.wait_idle(30)
    assert running.slots.apply([running.state]) == [] and running.slots.records[-1].outcome == "unchanged"


def test_a_new_calibration_of_the_same_model_file_is_taken(running, tmp_path):
    """`mrkd calibrate model.onnx SOURCE` rewrites only the sidecar: a reload takes its threshold (the
    model's hash stays), where before the swap said "unchanged" and the old threshold kept judging."""
    from mrkd.runtime.calibrate import calibrate_exported
    good = tmp_path / "good"
    good.mkdir()
    rng = np.random.default_rng(4)
    for i in range(8):
        cv2.imwrite(str(good / f"{i}.png"), normal_frame(rng))
    sha = file_sha256(running.live)
    result = calibrate_exported(running.live, str(good), progress=False, accept_shift=True)
    assert result.threshold != pytest.approx(0.1) and file_sha256(running.live) == sha
    running.slots.request_reload("calibrated")
    assert running.slots.wait_idle(30)
    done = running.slots.apply([running.state])
    assert [r.outcome for r in done] == ["swapped"], running.slots.records[-1]
    assert running.state.policy.threshold == pytest.approx(result.threshold) == running.state.info.threshold
    assert running.state.info.model_sha256 == sha
    running.slots.request_reload("again")                      # nothing new now
    running.slots.wait_idle(30)
    assert running.slots.apply([running.state]) == [] and running.slots.records[-1].outcome == "unchanged"


def test_detector_names_the_file_it_runs_and_refuses_one_replaced_while_it_loads(tmp_path, monkeypatch):
    """The hash events carry is the one of the file the Detector read: a version moved in while the
    backend loads it is refused (the line's start and the swap alike), never run under either name."""
    import mrkd.runtime.detector as detector_module
    from mrkd.runtime.metadata import MetadataError
    live, v2 = tmp_path / "model.onnx", tmp_path / "v2.onnx"
    export_tiny_model(live, threshold=0.1)
    export_tiny_model(v2, threshold=0.2)
    old_sha, new_sha = file_sha256(live), file_sha256(v2)
    assert old_sha != new_sha
    real = detector_module.open_backend

    def open_then_replace(path, *args, **kwargs):
        backend = real(path, *args, **kwargs)
        install(v2, live)                                   # the deployment lands mid-load
        return backend
    monkeypatch.setattr(detector_module, "open_backend", open_then_replace)
    with pytest.raises(MetadataError, match="changed while it was loaded"):
        Detector(live)
    monkeypatch.undo()
    detector = Detector(live)
    try:
        assert detector.model_sha256 == new_sha == file_sha256(live)
    finally:
        detector.close()


def _refused(running, reason_pattern):
    before = (running.state.detector, running.state.info, running.state.policy.threshold)
    running.slots.request_reload("test")
    assert running.slots.wait_idle(30)
    assert running.slots.apply([running.state]) == []
    assert (running.state.detector, running.state.info, running.state.policy.threshold) == before
    record = running.slots.records[-1]
    assert record.outcome == "refused", record
    assert reason_pattern in record.detail, record.detail
    assert any(m.startswith("model reload (test) REFUSED") for m in running.messages)
    # the old model still scores
    assert np.isfinite(running.state.detector(frames(1)[0]).scores).all()


def test_half_written_model_is_refused_and_the_old_one_keeps_running(running):
    data = running.live.read_bytes()
    export_tiny_model(running.tmp / "v2.onnx", threshold=0.25)
    install(running.tmp / "v2.onnx", running.live)
    whole = running.live.read_bytes()
    running.live.write_bytes(whole[:len(whole) // 2])          # a copy cut short
    _refused(running, "cannot be loaded")
    assert data != whole


def test_model_of_another_backbone_or_image_size_is_refused(running, monkeypatch):
    runtime_fixtures.build_tiny_model(running.tmp / "other.onnx", metadata_overrides={"backbone": "resnet18"})
    install(running.tmp / "other.onnx", running.live)
    _refused(running, "backbone 'resnet18' differs")
    monkeypatch.setattr(runtime_fixtures, "SIZE", 64)
    runtime_fixtures.build_tiny_model(running.tmp / "big.onnx")
    install(running.tmp / "big.onnx", running.live)
    _refused(running, "image_size 64 differs")


def test_a_model_without_its_sidecar_is_refused_where_the_running_one_had_one(running, caplog, monkeypatch):
    """The sidecar holds the threshold set on the line (`mrkd calibrate`) and the hash the swap checks the
    file against. A reload that found no sidecar (moved away for a backup, a deployment that copies the
    model first) took the file with the metadata embedded at export: the line's calibration was dropped
    (here 0.07 -> 0.1), for the same file too, under the outcome "swapped"."""
    from mrkd.runtime.calibration import Calibration
    from mrkd.runtime.metadata import ModelMetadata
    side = sidecar_path(running.live)
    meta = ModelMetadata.load(side)              # as `mrkd calibrate model.onnx` does: the sidecar alone
    meta.calibration = Calibration(threshold=0.07, method="quantile", quantile=0.99, n_good=12)
    meta.save(side)
    running.slots.request_reload("calibrated")
    assert running.slots.wait_idle(30)
    assert [r.outcome for r in running.slots.apply([running.state])] == ["swapped"]
    assert running.state.policy.threshold == pytest.approx(0.07)
    side.rename(running.tmp / "backup.json")           # the same file, its sidecar moved away
    _refused(running, "no sidecar")
    assert running.state.policy.threshold == pytest.approx(0.07)
    export_tiny_model(running.tmp / "v2.onnx", threshold=0.3)
    (running.tmp / "v2.onnx.json").unlink()
    os.replace(running.tmp / "v2.onnx", running.live)          # a new version, its sidecar not moved in
    caplog.clear()
    _refused(running, "no sidecar")
    assert running.state.policy.threshold == pytest.approx(0.07)
    assert "embedded" not in caplog.text          # one line: the refusal, not first "using the embedded metadata"
    # the sidecar there when the reload looks, gone by the time the file is read: refused too
    export_tiny_model(running.tmp / "v3.onnx", threshold=0.3)
    install(running.tmp / "v3.onnx", running.live)

    def sidecar_goes_first(path):
        sidecar_path(Path(path)).unlink()
        return Detector(path)
    monkeypatch.setattr(running.slots, "_opener", sidecar_goes_first)
    _refused(running, "no sidecar")
    assert running.state.policy.threshold == pytest.approx(0.07)


def test_a_line_started_without_a_sidecar_takes_a_new_version_without_one(running):
    """Where the running model was read from its embedded metadata, a new version without a sidecar is
    what the line ran all along: taken."""
    embedded = running.tmp / "embedded" / "model.onnx"
    embedded.parent.mkdir()
    export_tiny_model(embedded, threshold=0.1)
    sidecar_path(embedded).unlink()
    key = str(embedded.resolve())
    detectors = {key: Detector(embedded)}
    slots = ModelSlots(detectors, Detector, status=[].append)
    state = state_for(embedded, detectors[key])
    slots.apply([state])
    slots.note(key, frames(1)[0], 0.0)
    export_tiny_model(running.tmp / "v3.onnx", threshold=0.3)
    (running.tmp / "v3.onnx.json").unlink()
    os.replace(running.tmp / "v3.onnx", embedded)
    slots.request_reload("embedded")
    assert slots.wait_idle(30)
    try:
        assert [r.outcome for r in slots.apply([state])] == ["swapped"], slots.records
        assert state.policy.threshold == pytest.approx(0.3)
    finally:
        for detector in detectors.values():
            detector.close()


def test_a_swap_says_what_the_new_version_runs_on(running):
    """A new version may run at another precision than the running one (an INT8 graph; under --backend auto
    bf16 comes and goes with the version's bf16 check and its threshold): the swap's record (the status line,
    POST /reload's answer, the summary's model_swaps) says what it runs on, and what the running one ran
    on where that differs."""
    ran = running.state.detector.backend.name             # the fixture's Detector: auto
    export_tiny_model(running.tmp / "v2.onnx", threshold=0.25)
    install(running.tmp / "v2.onnx", running.live)
    running.slots.request_reload("v2")
    assert running.slots.wait_idle(30)
    done = running.slots.apply([running.state])
    assert [r.outcome for r in done] == ["swapped"] and done[0].detail.endswith(f"; runs {ran} fp32"), done
    assert any(f"runs {ran} fp32" in m for m in running.messages if "swapped" in m)
    other = "onnxruntime" if ran == "openvino" else "openvino"
    if other == "openvino":
        pytest.importorskip("openvino")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(running.slots, "_opener", lambda path: Detector(path, backend=other))
    try:
        export_tiny_model(running.tmp / "v3.onnx", threshold=0.3)
        install(running.tmp / "v3.onnx", running.live)
        running.slots.request_reload("v3")
        assert running.slots.wait_idle(30)
        done = running.slots.apply([running.state])
    finally:
        monkeypatch.undo()
    assert [r.outcome for r in done] == ["swapped"], done
    assert done[0].detail.endswith(f"; runs {other} fp32 (the running model: {ran} fp32)"), done[0].detail


def test_model_without_threshold_is_refused(running):
    runtime_fixtures.build_tiny_model(running.tmp / "raw.onnx", threshold=None)
    install(running.tmp / "raw.onnx", running.live)
    _refused(running, "no calibrated threshold")


# ---------------------------------------------------------------- the live run

def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _reap(proc) -> None:
    """A run a failed test left behind: killed, never left running."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _stop(proc, stderr_path: Path) -> dict:
    """SIGTERM the run, wait for it: it must end with exit 0; its summary."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr_path.read_text()
    return json.loads(out[out.index("{"):])


def _events(path: Path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _deployment(tmp_path: Path, seed: int, new_threshold: float):
    """A folder of 6 frames, the live model (threshold 0.1) at deploy/model.onnx and its next version at
    v2.onnx (``new_threshold``): (folder, live path, sha256 of live, sha256 of v2)."""
    folder = frame_folder(tmp_path, 6, seed=seed)
    live = tmp_path / "deploy" / "model.onnx"
    live.parent.mkdir()
    export_tiny_model(live, threshold=0.1)
    export_tiny_model(tmp_path / "v2.onnx", threshold=new_threshold)
    return folder, live, file_sha256(live), file_sha256(tmp_path / "v2.onnx")


@pytest.mark.slow
def test_live_run_is_hot_swapped_by_sighup_and_refuses_a_half_written_model(tmp_path):
    folder, live, sha_a, sha_b = _deployment(tmp_path, seed=1, new_threshold=0.2)
    events = tmp_path / "events.jsonl"
    stderr_path = tmp_path / "stderr.txt"
    code = "import sys\nfrom mrkd.cli import main\nsys.argv[0] = 'mrkd'\nmain(sys.argv[1:])"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", code, "run", str(live), "--source", str(folder), "--loop",
                                 "--fps", "40", "--cooldown", "0", "--events", str(events)],
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        _wait_for(lambda: len(_events(events)) >= 4, 60, "alarms from the first model")
        install(tmp_path / "v2.onnx", live)
        proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "swapped" in stderr_path.read_text(), 60, "the swap")
        _wait_for(lambda: any(e["model_sha256"] == sha_b for e in _events(events)), 60, "alarms of the new model")
        whole = (tmp_path / "v2.onnx").read_bytes()
        (live.parent / ".cut.tmp").write_bytes(whole[: len(whole) // 3])
        os.replace(live.parent / ".cut.tmp", live)                     # a half-written file in place
        proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "REFUSED" in stderr_path.read_text(), 60, "the refusal")
        after_refusal = len(_events(events))
        _wait_for(lambda: len(_events(events)) >= after_refusal + 3, 60, "alarms after the refusal")
        summary = _stop(proc, stderr_path)
    finally:
        _reap(proc)
    swaps = summary["model_swaps"]
    assert [s["outcome"] for s in swaps] == ["swapped", "refused"], swaps
    assert swaps[0]["old_sha256"] == sha_a and swaps[0]["new_sha256"] == sha_b
    assert "cannot be loaded" in swaps[1]["detail"]
    boundary = swaps[0]["frames_before"]
    logged = _events(events)
    assert len(logged) == summary["events"] >= after_refusal + 3
    for event in logged:        # each event names the model that judged its frame
        assert event["model_sha256"] == (sha_a if event["frame_index"] < boundary else sha_b), (event, boundary)
    assert {e["model_sha256"] for e in logged} == {sha_a, sha_b}
    # no frame lost: every frame read was judged, frame indices run without a gap
    camera = summary["cameras"]["cam0"]
    assert camera["frames"] == summary["frames"]
    assert camera["source"]["dropped"] == 0
    indices = sorted(e["frame_index"] for e in logged)
    assert indices[-1] < camera["frames"]
    # defective frames are the odd ones of each 6-frame pass: every one raised an alarm (cooldown 0)
    assert len(logged) == sum(1 for i in range(camera["frames"]) if (i % 6) % 2 == 1)


@pytest.mark.slow
def test_sigterm_right_after_sighup_waits_for_the_reload_and_exits_cleanly(tmp_path):
    """A stop that comes while a SIGHUP's reload is still loading the model: the run waits for it (a
    model compiling on a daemon thread as the interpreter exits aborted the process: rc -6, "terminate
    called without an active exception", about one run in eight here) and reports it."""
    folder, live, sha_a, _ = _deployment(tmp_path, seed=4, new_threshold=0.2)
    code = "import sys\nfrom mrkd.cli import main\nsys.argv[0] = 'mrkd'\nmain(sys.argv[1:])"
    for attempt in range(3):
        stderr_path = tmp_path / f"stderr{attempt}.txt"
        with open(stderr_path, "w") as stderr:
            proc = subprocess.Popen([sys.executable, "-c", code, "run", str(live), "--source", str(folder), "--loop",
                                     "--fps", "20"], stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            _wait_for(lambda: "tiny" in stderr_path.read_text() or proc.poll() is not None, 60, "the run")
            time.sleep(1.0)
            proc.send_signal(signal.SIGHUP)
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=120)
        finally:
            _reap(proc)
        assert proc.returncode == 0, stderr_path.read_text()[-2000:]
        swaps = json.loads(out[out.index("{"):])["model_swaps"]
        assert [(s["reason"], s["outcome"], s["new_sha256"]) for s in swaps] == [("SIGHUP", "unchanged", sha_a)], swaps


@pytest.mark.slow
def test_sighup_while_the_line_starts_is_answered_once_it_runs(tmp_path):
    """A deployment that moves a new model in and signals while `mrkd run` is still opening its models:
    the signal's default action ended the run (rc 129, "Hangup"); now it is kept and answered once the line
    runs, and the new model takes over. The run is held just after its models are open (a prelude wraps
    open_detectors) so that the signal lands in start-up every time."""
    folder, live, sha_a, sha_b = _deployment(tmp_path, seed=5, new_threshold=0.2)
    events, stderr_path = tmp_path / "events.jsonl", tmp_path / "stderr.txt"
    code = ("import sys, time\nimport mrkd.runtime.line.loop as loop\nreal = loop.open_detectors\n"
            "def held(*args, **kwargs):\n    opened = real(*args, **kwargs)\n"
            "    print('models opened', file=sys.stderr, flush=True)\n    time.sleep(3)\n    return opened\n"
            "loop.open_detectors = held\nfrom mrkd.cli import main\nsys.argv[0] = 'mrkd'\nmain(sys.argv[1:])")
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", code, "run", str(live), "--source", str(folder), "--loop",
                                 "--fps", "40", "--cooldown", "0", "--events", str(events)],
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        _wait_for(lambda: "models opened" in stderr_path.read_text() or proc.poll() is not None, 60, "start-up")
        install(tmp_path / "v2.onnx", live)
        proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: any(e["model_sha256"] == sha_b for e in _events(events)) or proc.poll() is not None,
                  60, "alarms of the new model")
        assert proc.poll() is None, stderr_path.read_text()
        swaps = _stop(proc, stderr_path)["model_swaps"]
    finally:
        _reap(proc)
    assert [(s["reason"], s["outcome"], s["old_sha256"], s["new_sha256"]) for s in swaps] == [
        ("SIGHUP during start-up", "swapped", sha_a, sha_b)], swaps


@pytest.mark.slow
def test_sighup_also_reloads_the_page_certificate_and_refuses_a_broken_pair(tmp_path):
    """`mrkd run --http-cert/--http-key`: after a renewal moved into place and SIGHUP, curl trusting only
    the new certificate gets the page and one trusting only the old is refused; a broken pair and SIGHUP
    are refused in one line, the run goes on serving the last good certificate and ends with rc 0."""
    import re
    from peers import require_program
    from test_review import _install_pair, _self_signed
    curl = require_program("curl", ["curl"])
    folder, live, _, _ = _deployment(tmp_path, seed=3, new_threshold=0.2)
    served, old, new = (tmp_path / name for name in ("served", "old", "new"))
    for place in (served, old, new):
        place.mkdir()
    _self_signed(old), _self_signed(new)
    cert, key = str(served / "cert.pem"), str(served / "key.pem")
    _install_pair(old, cert, key)
    stderr_path = tmp_path / "stderr.txt"
    code = "import sys\nfrom mrkd.cli import main\nsys.argv[0] = 'mrkd'\nmain(sys.argv[1:])"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", code, "run", str(live), "--source", str(folder), "--loop",
                                 "--fps", "20", "--http", "127.0.0.1:0", "--http-cert", cert, "--http-key", key],
                                stdout=subprocess.PIPE, stderr=stderr, text=True)

    def page_url():
        found = re.search(r"operator page (https://127\.0\.0\.1:\d+)/", stderr_path.read_text())
        return found.group(1) if found else None

    def fetch(trusted):
        done = subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                               "--cacert", str(trusted), page_url() + "/"],
                              capture_output=True, text=True, timeout=30)
        return done.returncode, done.stdout

    try:
        _wait_for(page_url, 60, "the operator page")
        assert fetch(old / "cert.pem") == (0, "200")
        _install_pair(new, cert, key)
        proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "page certificate reloaded (SIGHUP)" in stderr_path.read_text(), 60, "the reload")
        assert fetch(new / "cert.pem") == (0, "200")
        assert fetch(old / "cert.pem")[0] == 60
        (served / "key.pem").write_bytes((old / "key.pem").read_bytes())     # a key that is not the cert's
        proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "certificate reload (SIGHUP) REFUSED" in stderr_path.read_text(), 60, "the refusal")
        refusal = [line for line in stderr_path.read_text().splitlines()
                   if "certificate reload (SIGHUP) REFUSED" in line]
        assert len(refusal) == 1 and cert in refusal[0], refusal
        assert fetch(new / "cert.pem") == (0, "200")                        # the last good pair still served
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        _reap(proc)
    assert proc.returncode == 0, stderr_path.read_text()
    assert "Traceback" not in stderr_path.read_text()


def test_reload_over_http_needs_the_token_and_stages_the_new_model(running):
    from mrkd.runtime.control import LineControl
    from mrkd.runtime.outputs.web import OperatorServer
    from test_review import _post
    token = "another-long-control-token"
    server = OperatorServer("127.0.0.1", 0)
    server.control = LineControl(token, slots=running.slots)
    try:
        export_tiny_model(running.tmp / "v2.onnx", threshold=0.3)
        install(running.tmp / "v2.onnx", running.live)
        assert _post(server.url, "/reload", b"", "not-the-token")[0] == 401
        assert running.slots.staged() == []
        code, answer = _post(server.url, "/reload", b"", token)
        assert code == 200 and answer["staged"] == [str(running.live)], answer
        # the checked version is the answer's outcome, named by its hash, though the loop has not taken it
        staged = answer["outcomes"]
        assert [(o["model"], o["outcome"], o["reason"]) for o in staged] == [(str(running.live), "staged", "http")]
        assert staged[0]["new_sha256"] == file_sha256(running.live) != staged[0]["old_sha256"]
        assert staged[0]["detail"].startswith("checked on "), staged
        assert [r.outcome for r in running.slots.apply([running.state])] == ["swapped"]
        assert running.state.policy.threshold == pytest.approx(0.3)
        running.live.write_bytes(b"not an onnx file")
        code, answer = _post(server.url, "/reload", b"", token)
        assert code == 409 and answer["outcomes"][0]["outcome"] == "refused" and answer["staged"] == []
    finally:
        server.close()


@pytest.mark.slow
def test_live_run_takes_a_new_model_on_an_authenticated_http_request(tmp_path):
    from test_review import _post
    from test_review_page import reload_took

    from mrkd.benchmarks.mosquitto import free_port
    folder, live, sha_a, sha_b = _deployment(tmp_path, seed=2, new_threshold=0.15)
    port = free_port()
    url, token, events = f"http://127.0.0.1:{port}", "live-line-control-token", tmp_path / "events.jsonl"
    code = "import sys\nfrom mrkd.cli import main\nsys.argv[0] = 'mrkd'\nmain(sys.argv[1:])"
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", code, "run", str(live), "--source", str(folder), "--loop",
                                 "--fps", "40", "--cooldown", "0", "--events", str(events), "--http",
                                 f"127.0.0.1:{port}", "--control-token-env", "MRKD_TEST_TOKEN"],
                                stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env={**os.environ, "MRKD_TEST_TOKEN": token})
    try:
        _wait_for(lambda: len(_events(events)) >= 2, 60, "alarms from the first model")
        install(tmp_path / "v2.onnx", live)
        assert _post(url, "/reload", b"", "wrong-token-wrong-token")[0] == 401
        assert _post(url, "/reload", b"")[0] == 401
        code_, answer = _post(url, "/reload", b"", token)
        assert code_ == 200 and reload_took(answer, live, sha_b), answer
        _wait_for(lambda: any(e["model_sha256"] == sha_b for e in _events(events)), 60, "alarms of the new model")
        swaps = _stop(proc, stderr_path)["model_swaps"]
    finally:
        _reap(proc)
    assert [(s["reason"], s["outcome"], s["new_sha256"]) for s in swaps] == [("http", "swapped", sha_b)]
    boundary = swaps[0]["frames_before"]
    for event in _events(events):
        assert event["model_sha256"] == (sha_a if event["frame_index"] < boundary else sha_b)


def test_shadow_candidate_scores_the_same_frames_without_alarms(tmp_path):
    from mrkd.runtime.line.loop import Line, run_line
    from mrkd.runtime.line.shadow import ShadowScorer
    folder = frame_folder(tmp_path, 8, seed=3)
    live = export_tiny_model(tmp_path / "live.onnx", threshold=0.1)
    candidate = export_tiny_model(tmp_path / "candidate.onnx", threshold=0.5)   # same graph, a higher threshold
    seen = []

    class Record(ShadowScorer.__mro__[1]):        # a LineObserver that keeps the live results
        def on_frame(self, result):
            seen.append((result.score, result.anomalous, result.image))
    shadow = ShadowScorer(Detector(candidate))
    summary = run_line(Line((Camera("cam0", str(folder), str(live), cooldown=0.0),)), [Record(), shadow],
                       status=lambda text: None)
    shadow.drain()
    comparison = shadow.comparison()
    assert summary["events"] == sum(1 for _, anomalous, _ in seen if anomalous) > 0   # the live model's alarms only
    reference = Detector(candidate)
    candidate_scores = np.array([reference(image).scores[0] for _, _, image in seen], dtype=np.float64)
    reference.close()
    live_scores = np.array([score for score, _, _ in seen])
    expected_disagree = int(((candidate_scores >= 0.5) != np.array([a for _, a, _ in seen])).sum())
    assert comparison.frames == len(seen) == 8 and comparison.dropped == 0
    assert comparison.disagreements == comparison.live_only == expected_disagree > 0
    assert comparison.score_correlation == pytest.approx(np.corrcoef(live_scores, candidate_scores)[0, 1], abs=1e-6)
    assert "decisions differ on" in shadow.health().detail



@pytest.fixture
def shadowed_line(tmp_path):
    """A looping line of 6 frames (seed 5, odd frames defective) judged by live/model.onnx (threshold 0.1),
    its model slots, and a candidate of the same graph with a higher threshold (0.5). ``run(deploy)`` runs
    18 frames with ``deploy`` (a LineObserver that swaps models), the slots, the candidate in shadow and the
    metrics, and returns (shadow, metrics) once the shadow is drained."""
    from mrkd.runtime.line.loop import Line, run_line
    from mrkd.runtime.line.shadow import ShadowScorer
    from mrkd.runtime.line.swap import line_slots
    from mrkd.runtime.outputs.metrics import MetricsObserver
    folder = frame_folder(tmp_path, 6, seed=5)
    (tmp_path / "live").mkdir()
    live = export_tiny_model(tmp_path / "live" / "model.onnx", threshold=0.1)
    candidate = export_tiny_model(tmp_path / "candidate.onnx", threshold=0.5)   # same graph, a higher threshold
    line = Line((Camera("cam0", str(folder), str(live), loop=True, cooldown=0.0),))
    detectors = {str(live.resolve()): Detector(live)}
    slots = line_slots(line, detectors, status=lambda text: None)

    def run(deploy: LineObserver):
        shadow = ShadowScorer(Detector(candidate), slots=slots)
        metrics = MetricsObserver()
        run_line(line, [deploy, slots, shadow, metrics], detectors=detectors, slots=slots,
                 max_frames=18, status=lambda text: None)
        shadow.drain()
        return shadow, metrics
    yield SimpleNamespace(live=live, candidate=candidate, sha_live=file_sha256(live),
                          sha_candidate=file_sha256(candidate), slots=slots, run=run)
    for detector in detectors.values():
        detector.close()


def test_shadow_keeps_one_comparison_per_live_model_across_a_promotion(shadowed_line):
    """After the candidate is promoted (moved to the live path, reload), the frames it judges live are
    compared with itself: pooled with the old live model's they hid the old disagreements."""
    live, candidate, slots = shadowed_line.live, shadowed_line.candidate, shadowed_line.slots
    sha_live, sha_candidate = shadowed_line.sha_live, shadowed_line.sha_candidate
    seen = []

    class Promote(LineObserver):        # promotes the candidate after the first pass's 6 frames
        def on_frame(self, result):
            seen.append((result.model_sha256, result.anomalous))
            if len(seen) == 6:
                install(candidate, live)
                slots.request_reload("test")
                assert slots.wait_idle(60)
    shadow, metrics = shadowed_line.run(Promote())
    by_live = {c.live_sha256: c for c in shadow.history()}
    frames_of = {sha: sum(1 for s, _ in seen if s == sha) for sha in (sha_live, sha_candidate)}
    assert set(by_live) == {sha_live, sha_candidate} and frames_of[sha_live] >= 6 and frames_of[sha_candidate] >= 6
    old, new = by_live[sha_live], by_live[sha_candidate]
    assert old.frames == frames_of[sha_live] and new.frames == frames_of[sha_candidate]
    live_alarms = sum(1 for s, a in seen if s == sha_live and a)
    assert old.disagreements == old.live_only == live_alarms > 0     # the 0.5 candidate flags none of these
    assert new.disagreements == 0 and new.score_correlation == pytest.approx(1.0)   # itself, nothing else
    assert shadow.comparison() == new and "promoted" in shadow.health().detail
    summary = shadow.summary()
    assert [c["live_sha256"] for c in summary["by_live_model"]] == [sha_live, sha_candidate]
    exposed = metrics.exposition()[0].decode()         # the current pair only: the replaced model's series goes
    assert (f'mrkd_shadow_disagreements_total{{candidate_sha256="{sha_candidate}",live_sha256="{sha_candidate}"}} '
            f'{float(new.disagreements)}') in exposed and f'live_sha256="{sha_live}"' not in exposed


def test_shadow_starts_a_new_comparison_at_a_promotion_and_again_at_a_roll_back(shadowed_line, tmp_path):
    """Live model A, the candidate promoted (A -> C), then rolled back (C -> A): the comparison after the roll
    back counted on from A's first 6 frames (pooled across the promotion), and /metrics kept the replaced
    pair's series. Each swap now starts a new pair; the page (comparison()) and /metrics show the current
    one only, the summary every pair."""
    live, candidate, slots = shadowed_line.live, shadowed_line.candidate, shadowed_line.slots
    sha_live, sha_candidate = shadowed_line.sha_live, shadowed_line.sha_candidate
    (tmp_path / "v1").mkdir()
    install(live, tmp_path / "v1" / "model.onnx")                               # kept to roll back to
    seen = []

    class Deploy(LineObserver):           # promotes the candidate after 6 frames, rolls back after 12
        def on_frame(self, result):
            seen.append((result.model_sha256, result.anomalous))
            if len(seen) in (6, 12):
                install(candidate if len(seen) == 6 else tmp_path / "v1" / "model.onnx", live)
                slots.request_reload("test")
                assert slots.wait_idle(60)
    shadow, metrics = shadowed_line.run(Deploy())
    eras, previous = [], None                 # the frames of each model in turn: A, C, A
    for sha, anomalous in seen:
        if sha != previous:
            eras.append([])
            previous = sha
        eras[-1].append((sha, anomalous))
    assert [era[0][0] for era in eras] == [sha_live, sha_candidate, sha_live], [len(e) for e in eras]
    history = shadow.history()
    assert [(c.live_sha256, c.frames, c.pair) for c in history] == \
        [(era[0][0], len(era), n) for n, era in enumerate(eras, 1)]
    after = shadow.comparison()                         # the page's panel: A since the roll back only
    rolled_back = eras[2]
    assert (after.live_sha256, after.frames, after.pair) == (sha_live, len(rolled_back), 3) and after.frames >= 5
    assert after.disagreements == after.live_only == sum(a for _, a in rolled_back) > 0   # the 0.5 candidate: none
    assert shadow.comparisons() == [after] and shadow.summary()["by_live_model"][2]["frames"] == after.frames
    exposed = [line for line in metrics.exposition()[0].decode().splitlines()
               if line.startswith("mrkd_shadow_frames_total{")]
    assert exposed == [f'mrkd_shadow_frames_total{{candidate_sha256="{sha_candidate}",live_sha256="{sha_live}"}} '
                       f'{float(after.frames)}']
    # the shadow output's own counters stay counters across the swaps (they went back to the current pair's
    # frames at each, 18 -> 6: a counter reset to Prometheus, rate() then counts those frames again): every
    # frame the line judged is compared, dropped or failed, read with prometheus_client's parser
    from prometheus_client.parser import text_string_to_metric_families
    shadow_counts = {family.name: sample.value
                     for family in text_string_to_metric_families(metrics.exposition()[0].decode())
                     for sample in family.samples
                     if family.name in ("mrkd_output_sent", "mrkd_output_failures", "mrkd_output_dropped")
                     and sample.name.endswith("_total") and sample.labels.get("output") == "shadow"}
    assert len(shadow_counts) == 3 and sum(shadow_counts.values()) == len(seen) == 18, shadow_counts


def test_every_event_names_the_backend_and_precision_that_judged_it_across_a_swap(tmp_path):
    """An event named only the model's hash; a swap may change the backend (here) or the precision (an INT8
    graph, bf16 with a new calibration of the same file) under it. Each line of the events log, read with
    json.loads, names the hash, backend and precision of the Detector that judged its frame."""
    from mrkd.runtime.backends import resolve_backend_name
    from mrkd.runtime.line.loop import Line, run_line
    from mrkd.runtime.line.swap import line_slots
    from mrkd.runtime.outputs.events import EventLogOutput
    folder = frame_folder(tmp_path, 6, seed=7)         # odd frames are defective: an alarm each
    (tmp_path / "live").mkdir()
    live = export_tiny_model(tmp_path / "live" / "model.onnx", threshold=0.1)
    export_tiny_model(tmp_path / "v2.onnx", threshold=0.12)
    sha_a, sha_b = file_sha256(live), file_sha256(tmp_path / "v2.onnx")
    ran = resolve_backend_name(live, "auto")
    other = "onnxruntime" if ran == "openvino" else "openvino"
    if other == "openvino":
        pytest.importorskip("openvino")
    line = Line((Camera("cam0", str(folder), str(live), loop=True, cooldown=0.0),))
    detectors = {str(live.resolve()): Detector(live)}
    slots = line_slots(line, detectors, status=lambda text: None)
    slots._opener = lambda path: Detector(path, backend=other)       # the new version runs on the other backend
    judged = {}                        # frame index -> (hash, backend, precision) of the Detector that judged it

    class Swap(LineObserver):
        def on_frame(self, result):
            detector = detectors[str(live.resolve())]
            judged[result.frame_index] = (result.model_sha256, detector.backend.name, detector.precision)
            if len(judged) == 6:
                install(tmp_path / "v2.onnx", live)
                slots.request_reload("test")
                assert slots.wait_idle(60)
    log = tmp_path / "events.jsonl"
    run_line(line, [Swap(), slots, EventLogOutput(log)], detectors=detectors, slots=slots, max_frames=12,
             status=lambda text: None)
    events = [json.loads(text) for text in log.read_text().splitlines()]
    named = [(e["model_sha256"], e["backend"], e["precision"]) for e in events]
    assert named == [judged[e["frame_index"]] for e in events]
    assert set(named) == {(sha_a, ran, "fp32"), (sha_b, other, "fp32")}
    for detector in detectors.values():
        detector.close()


def test_cli_shadow_reports_the_comparison(tmp_path):
    folder = frame_folder(tmp_path, 6, seed=4)
    live = export_tiny_model(tmp_path / "live.onnx", threshold=0.1)
    candidate = export_tiny_model(tmp_path / "candidate.onnx", threshold=0.5)
    code = "import sys\nfrom mrkd.cli import main\nsys.argv[0] = 'mrkd'\nmain(sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", code, "run", str(live), "--source", str(folder), "--shadow",
                           str(candidate), "--cooldown", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    shadow = summary["shadow"]
    assert shadow["frames"] == 6 and shadow["candidate_sha256"] == file_sha256(candidate)
    assert shadow["live_only"] == shadow["disagreements"] == summary["events"] == 3    # odd frames are defective
    assert shadow["candidate_only"] == 0 and shadow["score_correlation"] == pytest.approx(1.0)
    # what the candidate runs on is said, as for the live model: a candidate may run another precision
    # (an INT8 graph; bf16 under --backend auto only where its own check passed)
    from mrkd.runtime.backends import resolve_backend_name
    backend = resolve_backend_name(candidate, "auto")     # openvino on x86 where installed (no bf16 check: fp32)
    assert (shadow["candidate_backend"], shadow["candidate_precision"]) == (backend, "fp32")
    assert any(line.startswith(f"shadow candidate candidate.onnx: {backend}") and "fp32" in line
               for line in done.stderr.splitlines()), done.stderr


def test_a_rollback_before_the_staged_version_is_applied_keeps_the_running_model(running):
    """v2 staged (the loop has not reached a round boundary yet: a triggered line waits for its next
    part), then the running version moved back and reloaded: that reload said "unchanged", and the
    next round swapped v2 in anyway, a model no longer at the path."""
    old_sha = file_sha256(running.live)
    running.tmp.joinpath("v1").mkdir()
    install(running.live, running.tmp / "v1" / "model.onnx")
    export_tiny_model(running.tmp / "v2.onnx", threshold=0.25)
    install(running.tmp / "v2.onnx", running.live)
    running.slots.request_reload("deploy v2")
    assert running.slots.wait_idle(30) and running.slots.staged() == [str(running.live)]
    install(running.tmp / "v1" / "model.onnx", running.live)          # rolled back before any round
    running.slots.request_reload("roll back")
    assert running.slots.wait_idle(30)
    assert running.slots.records[-1].outcome == "unchanged"
    assert "staged" in running.slots.records[-1].detail              # says what became of v2
    assert running.slots.staged() == []
    assert running.slots.apply([running.state]) == []
    assert running.state.info.model_sha256 == old_sha == running.slots.sha256_of(running.key)
    assert running.state.policy.threshold == pytest.approx(0.1)


def test_a_refused_file_after_a_staged_version_leaves_the_running_model(running):
    """v2 staged, then a half-written file at the path: the refusal says the running model goes on,
    so the staged v2 (no longer the file at the path) must not be swapped in at the next round."""
    old_sha = file_sha256(running.live)
    export_tiny_model(running.tmp / "v2.onnx", threshold=0.25)
    install(running.tmp / "v2.onnx", running.live)
    running.slots.request_reload("deploy v2")
    assert running.slots.wait_idle(30) and running.slots.staged()
    whole = running.live.read_bytes()
    running.live.write_bytes(whole[:len(whole) // 2])
    running.slots.request_reload("half written")
    assert running.slots.wait_idle(30)
    assert running.slots.records[-1].outcome == "refused"
    assert running.slots.apply([running.state]) == [] and running.slots.staged() == []
    assert running.state.info.model_sha256 == old_sha


def nan_model(path: Path) -> Path:
    """The tiny model with a level of -inf: it loads and passes every file check, and scores inf."""
    import onnx
    from onnx import numpy_helper
    from mrkd.export.model_metadata import write_model
    from mrkd.runtime.metadata import ModelMetadata
    export_tiny_model(path, threshold=0.3)
    model = onnx.load(str(path))
    level = next(i for i in model.graph.initializer if i.name == "level")
    level.CopyFrom(numpy_helper.from_array(np.array(-np.inf, dtype=np.float32), "level"))
    write_model(model, path, ModelMetadata.load(sidecar_path(path)))
    return path


def test_a_second_swap_right_after_a_swap_is_still_checked_on_recent_frames(running):
    """Two swaps in quick succession: the frames the first new version was checked on stay to check
    the next one (with the new version's scores), where the swap emptied them and the next version,
    one that scores inf here, went in unchecked ("no frame seen yet")."""
    export_tiny_model(running.tmp / "v2.onnx", threshold=0.25)
    install(running.tmp / "v2.onnx", running.live)
    running.slots.request_reload("v2")
    assert running.slots.wait_idle(30)
    assert [r.outcome for r in running.slots.apply([running.state])] == ["swapped"]
    v2 = running.state.detector
    install(nan_model(running.tmp / "nan.onnx"), running.live)
    broken = Detector(running.live)
    assert not np.isfinite(broken(frames(1)[0]).scores).all()      # what it would judge with
    broken.close()
    _refused(running, "not finite")
    assert running.state.detector is v2
    # a good v3 is checked on those frames against v2's scores (same graph: correlation 1)
    export_tiny_model(running.tmp / "v3.onnx", threshold=0.2)
    install(running.tmp / "v3.onnx", running.live)
    running.slots.request_reload("v3")
    assert running.slots.wait_idle(30)
    done = running.slots.apply([running.state])
    assert [r.outcome for r in done] == ["swapped"] and "checked on 3 recent frame(s)" in done[0].detail
    assert "correlation 1.000" in done[0].detail


def _fixed_threshold_line(tmp_path, running_threshold):
    """A running model judged by camera cam0's own threshold 0.3 (line file or --threshold), 4 frames seen."""
    live = tmp_path / "live" / "model.onnx"
    live.parent.mkdir()
    if running_threshold is None:
        runtime_fixtures.build_tiny_model(live, threshold=None)
    else:
        export_tiny_model(live, threshold=running_threshold)
    key = str(live.resolve())
    detectors = {key: Detector(live)}
    slots = ModelSlots(detectors, Detector, status=lambda _: None, fixed_thresholds={key: [("cam0", 0.3)]})
    state = SimpleNamespace(camera=Camera(name="cam0", source=[], model=str(live), threshold=0.3),
                            detector=detectors[key], policy=AlarmPolicy(0.3),
                            info=CameraInfo("cam0", "test", str(live), file_sha256(live), "onnxruntime", "fp32",
                                            0.3, "camera setting"))
    slots.apply([state])
    for i, frame in enumerate(frames()):
        slots.note(key, frame, float(detectors[key](frame).scores[0]))
    return SimpleNamespace(live=live, key=key, detectors=detectors, slots=slots, state=state, tmp=tmp_path)


def _reload(line, version: Path):
    install(version, line.live)
    line.slots.request_reload("test")
    assert line.slots.wait_idle(30)
    return line.slots.apply([line.state]), line.slots.records[-1]


def test_a_fixed_camera_threshold_refuses_a_model_that_scores_on_another_scale(tmp_path):
    """A camera with its own threshold keeps that number through a swap. A model whose scores are on
    another scale (a --score mrkd model's thresholds are ~0.5, a --score both one's ~45 on the same
    data) went in silently, and the old number then judged the new scores: all alarms could go quiet."""
    line = _fixed_threshold_line(tmp_path, running_threshold=0.1)
    old = line.state.detector
    done, record = _reload(line, export_tiny_model(tmp_path / "far.onnx", threshold=0.25))   # 2.5x: another scale
    assert done == [] and record.outcome == "refused" and line.state.detector is old
    assert "cam0 (0.3) judge by their own threshold" in record.detail and "0.25 against the running model's 0.1" \
        in record.detail
    done, record = _reload(line, export_tiny_model(tmp_path / "near.onnx", threshold=0.15))  # 1.5x: same scale
    assert [r.outcome for r in done] == ["swapped"] and line.state.policy.threshold == 0.3
    assert "cam0 (0.3) keep their own threshold" in record.detail
    assert record.frames_before == 4
    # the version just swapped in has judged 2 frames when the next replaces it (not the running total 6)
    for frame in frames(2, seed=5):
        line.slots.note(line.key, frame, float(line.state.detector(frame).scores[0]))
    done, record = _reload(line, export_tiny_model(tmp_path / "next.onnx", threshold=0.12))
    assert [r.outcome for r in done] == ["swapped"] and record.frames_before == 2
    for detector in line.detectors.values():
        detector.close()


def test_a_fixed_camera_threshold_over_an_uncalibrated_model_compares_scores_on_the_same_frames(tmp_path):
    line = _fixed_threshold_line(tmp_path, running_threshold=None)
    done, record = _reload(line, export_tiny_model(tmp_path / "v2.onnx", threshold=0.2))      # same graph
    assert [r.outcome for r in done] == ["swapped"]
    assert "keep their own threshold (the new model's median score" in record.detail
    for detector in line.detectors.values():
        detector.close()


def test_the_lines_slots_know_which_cameras_judge_by_their_own_threshold(tmp_path):
    """line_slots (what `mrkd run` builds) hands the cameras' own thresholds to the swap, by the same
    resolved path the detectors are kept under: the --threshold camera refuses the far model, the
    camera on the other model (its model's threshold) takes its own far version."""
    from mrkd.runtime.line.loop import Line
    from mrkd.runtime.line.swap import line_slots
    fixed, free = tmp_path / "a" / "model.onnx", tmp_path / "b" / "model.onnx"
    for path in (fixed, free):
        path.parent.mkdir()
        export_tiny_model(path, threshold=0.1)
    line = Line((Camera("fixed", [], str(tmp_path / "a" / ".." / "a" / "model.onnx"), threshold=0.3),
                 Camera("free", [], str(free))))
    detectors = {str(p.resolve()): Detector(p) for p in (fixed, free)}
    slots = line_slots(line, detectors, status=lambda _: None)
    for key, detector in detectors.items():
        slots.note(key, frames(1)[0], float(detector(frames(1)[0]).scores[0]))
    for path in (fixed, free):
        install(export_tiny_model(tmp_path / "far.onnx", threshold=0.5), path)
    slots.request_reload("test")
    assert slots.wait_idle(30)
    outcomes = {Path(r.model).parent.name: (r.outcome, r.detail) for r in slots.records}
    assert outcomes["a"][0] == "refused" and "fixed (0.3) judge by their own threshold" in outcomes["a"][1]
    assert [Path(p).resolve() for p in slots.staged()] == [free.resolve()]
    assert [(Path(r.model).parent.name, r.outcome) for r in slots.apply()] == [("b", "swapped")]
    for detector in detectors.values():
        detector.close()


def test_the_http_reload_answers_with_its_own_round_not_a_sighup_load_running_meanwhile(tmp_path):
    """POST /reload answered with every record written after it came: a SIGHUP load already running
    (which read the file before the new version moved in: here it finds it half-written) finished
    meanwhile, and its refusal became the HTTP answer's outcome (409 for a good new version). Now the
    request's answer is the load round that started after it."""
    import threading

    from mrkd.runtime.control import LineControl
    from mrkd.runtime.outputs.web import OperatorServer
    from test_review import _post
    live = tmp_path / "live" / "model.onnx"
    live.parent.mkdir()
    export_tiny_model(live, threshold=0.1)
    key = str(live.resolve())
    detectors = {key: Detector(live)}
    release, opened = threading.Event(), []

    def opener(path):
        opened.append(path)
        if len(opened) == 1:              # the SIGHUP round: it read the file half-written, slowly
            release.wait(30)
            raise ValueError("truncated protobuf")
        return Detector(path)
    slots = ModelSlots(detectors, opener, status=lambda text: None)
    state = state_for(live, detectors[key])
    slots.apply([state])
    token = "another-long-control-token"
    server = OperatorServer("127.0.0.1", 0)
    server.control = LineControl(token, slots=slots)
    try:
        assert slots.request_reload("SIGHUP")
        export_tiny_model(tmp_path / "v2.onnx", threshold=0.3)
        install(tmp_path / "v2.onnx", live)

        def release_once_the_request_waits():
            deadline = time.monotonic() + 30
            while slots._again is None and time.monotonic() < deadline:
                time.sleep(0.01)
            release.set()
        threading.Thread(target=release_once_the_request_waits, daemon=True).start()
        code, answer = _post(server.url, "/reload", b"", token)
        assert code == 200, answer
        assert [(o["outcome"], o["reason"]) for o in answer["outcomes"]] == [("staged", "http")], answer
        assert [r["outcome"] for r in slots.report()] == ["refused"]     # the SIGHUP round's, kept in the report
    finally:
        release.set()
        server.close()
        for detector in detectors.values():
            detector.close()


def reload_server(tmp_path, opener_for):
    """A line's slots over a tiny live model, behind an OperatorServer's authenticated POST /reload."""
    from mrkd.runtime.control import LineControl
    from mrkd.runtime.outputs.web import OperatorServer
    live = tmp_path / "live" / "model.onnx"
    live.parent.mkdir()
    export_tiny_model(live, threshold=0.1)
    key = str(live.resolve())
    detectors = {key: Detector(live)}
    slots = ModelSlots(detectors, opener_for, status=lambda text: None)
    slots.apply([state_for(live, detectors[key])])
    server = OperatorServer("127.0.0.1", 0)
    server.control = LineControl("another-long-control-token", slots=slots)
    return live, detectors, slots, server


def test_the_http_reload_answers_with_its_staged_version_when_a_later_sighup_round_drops_it(tmp_path):
    """A SIGHUP coming while the request's round loads is served by a round after it, in the same loader;
    the request waits for both. That round found the file half-written (a refusal), which drops the version
    the request's round staged: the answer had no outcome at all (200, []). Now it is the request's own
    round's outcome, "staged", saying a later reload dropped it."""
    import threading

    from test_review import _post
    release, opened = threading.Event(), []

    def opener(path):
        opened.append(path)
        if len(opened) == 1:              # the request's round: a good new version, read slowly
            release.wait(30)
            return Detector(path)
        raise ValueError("truncated protobuf")      # the SIGHUP's round: the next version half-written
    live, detectors, slots, server = reload_server(tmp_path, opener)
    try:
        export_tiny_model(tmp_path / "v2.onnx", threshold=0.3)
        install(tmp_path / "v2.onnx", live)

        def sighup_while_the_request_loads():
            deadline = time.monotonic() + 30
            while not opened and time.monotonic() < deadline:
                time.sleep(0.01)
            slots.request_reload("SIGHUP")
            release.set()
        threading.Thread(target=sighup_while_the_request_loads, daemon=True).start()
        code, answer = _post(server.url, "/reload", b"", "another-long-control-token")
        assert len(opened) == 2 and [r["outcome"] for r in slots.report()] == ["refused"]
        assert code == 200, answer
        [outcome] = answer["outcomes"]
        assert (outcome["outcome"], outcome["reason"]) == ("staged", "http"), answer
        assert "later reload (SIGHUP)" in outcome["detail"] and answer["staged"] == [], answer
    finally:
        release.set()
        server.close()
        for detector in detectors.values():
            detector.close()


def test_a_reload_requested_as_the_loader_finishes_is_not_lost(tmp_path):
    """The loader decided to end (nothing asked for again) and lived on a moment: a request in that moment
    was left for it, so nothing loaded it and its answer was empty. Here the moment is held open."""
    import threading

    opened = []

    def opener(path):
        opened.append(path)
        return Detector(path)
    live, detectors, slots, server = reload_server(tmp_path, opener)
    server.close()
    ending, go_on = threading.Event(), threading.Event()
    load_all = slots._load_all

    def load_all_then_linger(*args):
        load_all(*args)
        ending.set()
        go_on.wait(30)                    # the thread is still alive after its decision to end
    slots._load_all = load_all_then_linger
    try:
        first = slots.request_reload_round("SIGHUP")
        assert ending.wait(30)
        second = slots.request_reload_round("http")
        go_on.set()
        assert slots.wait_idle(30) and second == first + 1
        assert len(opened) == 2, opened
        assert [o["outcome"] for o in slots.outcomes_of(second)] == ["unchanged"]
    finally:
        go_on.set()
        for detector in detectors.values():
            detector.close()


def test_a_swap_says_how_the_models_threshold_moved(running):
    """A refit's new version comes with a threshold of its own (52.49 -> 49.44 on the ELPV line): the swap's
    line named the new hash and its check, not that the camera's alarms were now judged by another number.
    It says so where the threshold moved, and says nothing of it where it did not."""
    export_tiny_model(running.tmp / "v2.onnx", threshold=0.25)
    install(running.tmp / "v2.onnx", running.live)
    running.slots.request_reload("v2")
    assert running.slots.wait_idle(30)
    done = running.slots.apply([running.state])
    assert [r.outcome for r in done] == ["swapped"] and "; threshold 0.1 -> 0.25;" in done[0].detail, done
    assert any("threshold 0.1 -> 0.25" in m for m in running.messages if "swapped" in m), running.messages
    runtime_fixtures.build_tiny_model(running.tmp / "v3.onnx", per_scale=True, threshold=0.25)   # another graph
    install(running.tmp / "v3.onnx", running.live)
    running.slots.request_reload("v3")
    assert running.slots.wait_idle(30)
    done = running.slots.apply([running.state])
    assert [r.outcome for r in done] == ["swapped"] and "threshold" not in done[0].detail, done
