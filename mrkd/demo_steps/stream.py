"""The demo's streaming step: a video of good-then-defective test images through the exported model.

Listed in mrkd/demo.py's DEMO_LAYER_STEPS after the export step, whose ONNX files it uses when
``context["exports"]`` holds them. Imports no PyTorch unless it has to export a model itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import click
FRAMES_PER_IMAGE = 3   # each test image is held for a few frames, as a part passing a camera


def write_clip(paths: List[Path], video_path: Path, fps: float = 10.0) -> None:
    """Images as an MJPG video, each held for FRAMES_PER_IMAGE frames: parts passing a camera."""
    import cv2

    from mrkd.runtime.images import read_image
    images = [read_image(p) for p in paths]
    h, w = images[0].shape[:2]
    writer = cv2.VideoWriter(str(video_path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for image in images:
        for _ in range(FRAMES_PER_IMAGE):
            writer.write(cv2.resize(image, (w, h)))
    writer.release()


def test_split_video(category_root: Path, video_path: Path, fps: float = 10.0) -> Dict[str, List[int]]:
    """Write test/good images then defective ones as an MJPG video; returns the frame ranges of each."""
    from mrkd.runtime.images import list_images
    from mrkd.runtime.labelled_images import GOOD, labelled_images
    test = category_root / "test"
    if not (test / GOOD).is_dir():
        list_images(test / GOOD)      # the clip starts with good parts: its ImageListError says what test/good is
    split = labelled_images(test)
    good, bad = list(split.good), list(split.defects)
    write_clip(good + bad, video_path, fps)
    n_good = len(good) * FRAMES_PER_IMAGE
    return {"good": list(range(n_good)), "defective": list(range(n_good, n_good + len(bad) * FRAMES_PER_IMAGE))}


def exported_model(context: Dict, category: str) -> Path:
    """The export step's ONNX model for ``category``, or one exported here from its checkpoint."""
    existing = (context.get("exports") or {}).get(category)
    if existing:
        return Path(existing)
    from mrkd.export.exporter import export_onnx, load_model
    from mrkd.export.onnx_graph import ExportOptions
    model, sha = load_model(context["checkpoints"][category])
    path = Path(context["out"]) / "stream" / f"{category}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, path, ExportOptions(), checkpoint_sha256=sha, simplify="never")
    return path


def stream_step(context: Dict) -> None:
    from mrkd.runtime.line.alarms import AlarmPolicy
    from mrkd.runtime.detector import Detector
    from mrkd.runtime.outputs import OutputSettings, build_outputs
    from mrkd.runtime.outputs.events import read_events
    from mrkd.runtime.sources import open_source
    from mrkd.runtime.line.stream import run_stream

    category = context["categories"][0]
    out = Path(context["out"]) / "stream"
    out.mkdir(parents=True, exist_ok=True)
    model = exported_model(context, category)
    segments = test_split_video(Path(context["data_root"]) / category, out / f"{category}.avi")
    holdout = (context.get("holdout") or {}).get(category)
    if holdout:
        # Calibrate on the line: the held-out good parts (never trained on) through the same MJPG codec
        # as the stream, because the codec shifts scores (runtime/calibrate.py says by how much).
        from mrkd.runtime.calibrate import calibrate_exported
        clip = out / f"{category}_good_parts.avi"
        write_clip([Path(p) for p in holdout], clip)
        calibration = calibrate_exported(model, str(clip), progress=False)
        click.echo(f"calibrated {model.name} on {calibration.n_good} frames of {len(holdout)} held-out good "
                   f"parts through the stream's codec: threshold {calibration.previous_threshold:.4f} -> "
                   f"{calibration.threshold:.4f}")
    detector = Detector(model)
    if detector.threshold is None:
        click.echo(f"{model}: no calibrated threshold in the metadata; skipping the stream")
        return
    events = out / "events.jsonl"
    if events.exists():
        events.unlink()
    # 2 of 3 frames (one held image) raise an alarm; a cooldown of 3 frames: one alarm per part.
    summary = run_stream(detector, open_source(str(out / f"{category}.avi")),
                         AlarmPolicy(detector.threshold, (2, 3), cooldown_frames=FRAMES_PER_IMAGE),
                         build_outputs(OutputSettings(events=str(events), snapshots=str(out / "snapshots"))),
                         status=lambda line: None)
    alarms = read_events(events) if events.exists() else []
    on_defects = sum(e["frame_index"] in segments["defective"] for e in alarms)
    click.echo(f"streamed {summary['frames']} frames ({len(segments['good'])} good, {len(segments['defective'])} "
               f"defective) of {category} through {model.name} at {summary['fps']:.0f} fps: "
               f"{len(alarms)} alarms, {on_defects} on defective parts, {len(alarms) - on_defects} on good ones")
    for event in alarms[:10]:
        click.echo(f"  frame {event['frame_index']:4d} score {event['score']:.4f} boxes {len(event['boxes'])} "
                   f"-> {event['snapshot']}")
    context["stream_summary"] = summary
