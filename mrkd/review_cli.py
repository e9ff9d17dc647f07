"""``mrkd review EVENTS --labels LABELS``: an operator's review of alarms, from a terminal.

Without ``--mark`` it lists the alarm events of the log with the evidence image found for each and
the label given so far. ``--mark EVENT_ID --as good|defect [--note TEXT]`` appends one label
(runtime/review.py) with the sha256 of the evidence image the operator looked at. An NG part's event
(triggered mode) labels one camera's image: ``--camera``, else the one camera that flagged it (the
rule POST /review applies, runtime/control.py). Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import click

from mrkd.errors import MrkdError, error_boundary
from mrkd.runtime.review import LABEL_WORDS, LABELS, MAX_NOTE, LabelFile, ReviewError, latest_labels, make_label, \
    read_labels


def default_evidence_dir(events_path) -> Path:
    """Where `mrkd run --evidence` keeps images by default: ``evidence/`` beside the events log."""
    return Path(events_path).parent / "evidence"


def find_evidence(event: dict, evidence_dir: Optional[Path]) -> Optional[Path]:
    """The lossless image of ``event``: the path the event names (``evidence``), else
    ``<evidence_dir>/<camera>/<event_id>.png`` or ``<evidence_dir>/<event_id>.png``."""
    named = event.get("evidence")
    if isinstance(named, str) and Path(named).is_file():
        return Path(named)
    if evidence_dir is None:
        return None
    event_id = str(event.get("event_id", ""))
    if not event_id or "/" in event_id or "\\" in event_id or event_id.startswith("."):
        return None
    camera = event.get("camera")
    candidates = ([evidence_dir / str(camera) / f"{event_id}.png"] if isinstance(camera, str) and camera
                  and "/" not in camera and not camera.startswith(".") else []) + [evidence_dir / f"{event_id}.png"]
    return next((c for c in candidates if c.is_file()), None)


def one_camera_event(event: dict, camera: Optional[str] = None) -> Tuple[Optional[dict], str]:
    """A part event (``cameras``) as the event of the one camera whose image a label is about
    (``camera``, else the flagged one); a frame alarm as it is. (None, why) when that is not one camera."""
    if not isinstance(event.get("cameras"), list):
        if camera is not None and camera != event.get("camera"):
            return None, f"the alarm is camera {event.get('camera')!r}'s, not {camera!r}'s"
        return event, ""
    from mrkd.runtime.control import _part_camera
    chosen, why = _part_camera(event, camera)
    return (None, why) if chosen is None else (dict(event, camera=chosen), "")


def load_events(path) -> List[dict]:
    from mrkd.runtime.outputs.events import read_events
    try:
        events = read_events(path)
    except ValueError as exc:
        raise ReviewError(str(exc)) from exc
    return [e for e in events if isinstance(e, dict) and e.get("event_id")]


@click.command("review", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("events", type=click.Path(exists=True, dir_okay=False))
@click.option("--labels", "labels_path", required=True, type=click.Path(dir_okay=False),
              help="The label file (JSON lines, append-only; created when missing). `mrkd refit --reviewed` reads it.")
@click.option("--evidence", "evidence_dir", type=click.Path(file_okay=False), default=None,
              help="Folder of the lossless evidence images (default: evidence/ beside EVENTS).")
@click.option("--mark", "event_id", default=None, metavar="EVENT_ID",
              help="Label this event (give --as). Without --mark the alarms are listed.")
@click.option("--as", "label", type=click.Choice(list(LABELS)), default=None,
              help="good: a good part, a false alarm (refit adds it to the memory bank); "
                   "defect: a defect confirmed (refit checks that the new model still flags it).")
@click.option("--note", default="", help=f"Optional note kept with the label (at most {MAX_NOTE} characters).")
@click.option("--who", default=None, help="Who decides (default: the login name).")
@click.option("--camera", default=None, metavar="NAME",
              help="For a part of several cameras: the camera whose image is labelled (default: the flagged one).")
@click.option("--unlabelled", is_flag=True, help="List only events without a label yet.")
@error_boundary
def review_command(events, labels_path, evidence_dir, event_id, label, note, who, camera, unlabelled):
    """List the alarms of the events log EVENTS, or mark one as a good part (false alarm) or a
    confirmed defect. Labels are appended to --labels with the evidence image's sha256; the last
    label of an event counts."""
    evidence = Path(evidence_dir) if evidence_dir else default_evidence_dir(events)
    all_events = load_events(events)
    by_id: Dict[str, dict] = {str(e["event_id"]): e for e in all_events}
    existing = latest_labels(read_labels(labels_path), labels_path) if Path(labels_path).is_file() else {}
    if event_id is None:
        if label or note:
            raise click.UsageError("--as and --note need --mark EVENT_ID")
        shown = 0
        for event in all_events:
            current = existing.get(str(event["event_id"]))
            if unlabelled and current:
                continue
            one, why = one_camera_event(event)
            event = one or event
            image = find_evidence(one, evidence) if one is not None else None
            score = event.get("score")
            click.echo(f"{event['event_id']}  {event.get('camera') or '-':8}  "
                       f"score {score if score is None else format(score, '.4g')}  "
                       f"model {str(event.get('model_sha256') or '?')[:12]}  "
                       f"{'image ' + str(image) if image else why or 'NO EVIDENCE IMAGE'}  "
                       f"{'[' + LABEL_WORDS[current.label] + ' by ' + current.who + ']' if current else '[unlabelled]'}")
            shown += 1
        click.echo(f"{shown} of {len(all_events)} event(s); labels in {labels_path}")
        return
    if label is None:
        raise click.UsageError("--mark needs --as good or --as defect")
    event = by_id.get(event_id)
    if event is None:
        raise ReviewError(f"{events}: no event {event_id!r} (list them with `mrkd review {events} --labels ...`)")
    event, why = one_camera_event(event, camera)
    if event is None:
        raise ReviewError(f"event {event_id}: {why}" + (" (--camera NAME)" if camera is None else ""))
    image = find_evidence(event, evidence)
    if image is None:
        raise ReviewError(f"event {event_id}: no evidence image in {evidence} (was `mrkd run` started with "
                          f"--evidence?); a label must name the image it is about")
    record = make_label(event_id, image, label, who=who, note=note, camera=str(event.get("camera") or ""))
    with LabelFile(labels_path) as log:
        log.append(record)
    click.echo(f"{event_id}: {LABEL_WORDS[label]} (image sha256 {record.image_sha256[:12]}) -> {labels_path}")


__all__ = ["review_command", "find_evidence", "MrkdError"]
