"""``mrkd review EVENTS --labels LABELS``: an operator's review of alarms, from a terminal.

Without ``--mark`` it lists the alarm events of the log with the evidence image found for each, the
label given so far, evidence changed since the run and images labelled both good and defect. ``--mark
EVENT_ID --as good|defect [--note TEXT]`` appends one label (runtime/review.py) with the sha256 of the
evidence image the operator looked at; ``--mark`` given several times labels those events together
(how an image labelled both ways is settled). A mark that would leave one image both good and defect
is refused, nothing written; so is one that changes an image's standing label (good -> defect) unless
``--replace`` is given (the page asks the same before it sends ``replace``). The listing shows each
image's standing label, who gave it and when, and the label a correction replaced. An NG part's event
(triggered mode) has one image per camera, one row each in the listing, each labelled on its own: a
mark labels ``--camera``'s image, else the one camera that flagged it (the rule POST /review applies,
runtime/control.py). A part's rows follow the order its event lists its cameras, as the page's. Each
image listed is hashed and compared with the hash its event recorded (a file named by many rows once);
only the last DEFAULT_LAST rows are listed unless ``--last N`` says otherwise (0: all), and only their
images are read: a long run's log would print (and read) thousands of rows, the summary scrolled away.
Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import click

from mrkd.errors import MrkdError, error_boundary
from mrkd.options import IntegerRange
from mrkd.runtime.review import LABEL_WORDS, LABELS, MAX_MARKS, MAX_NOTE, MAX_WHO, RELATIVE_EVIDENCE, Conflict, \
    FileHashes, LabelState, ReviewError, ReviewLabel, append_checked, describe_label, evidence_changed, \
    events_to_label, find_conflicts, find_evidence, label_logged_events, label_states, mark_command, \
    names_relative_evidence, one_camera_event, printable, read_labels, read_review_events, review_rows, standing_label


def default_evidence_dir(events_path) -> Path:
    """Where `mrkd run --evidence` keeps images by default: ``evidence/`` beside the events log."""
    return Path(events_path).parent / "evidence"


def _label_text(state: Optional[LabelState], conflict: Optional[Conflict], same_image: Optional[ReviewLabel] = None) -> str:
    """``same_image``: for an unlabelled row, a label another event gave the same image (sha256)."""
    if state is None:
        if same_image is not None:
            return (f"[unlabelled; the same image is labelled {LABEL_WORDS[same_image.label]} under event "
                    f"{same_image.event_id}]")
        return "[unlabelled]"
    current = state.current
    text = f"[{LABEL_WORDS[current.label]} by {printable(current.who)}"
    if conflict is not None:
        others = [e for e in conflict.events if e != current.event_id]
        text += f"; CONFLICT: same image, other label under {', '.join(others)}"
    text += f"] at {current.when.replace('T', ' ')[:19]}"
    return text + (f" (corrected; was {describe_label(state.replaced)})" if state.replaced is not None else "")


ASK_CAMERA = "give --camera NAME"      # a part of several flagged cameras: how this command names one
ASK_EVIDENCE = "give --evidence DIR, that run's evidence folder"     # an older log's image not found
DEFAULT_LAST = 50                      # rows the listing shows without --last: a screenful, the newest


def _image_text(event: dict, image: Optional[Path], why: str, hashes: FileHashes) -> str:
    if image is None:
        named = event.get("evidence")
        if why:
            return why
        if names_relative_evidence(event):
            return f"EVIDENCE IMAGE NOT FOUND ({named}, {RELATIVE_EVIDENCE}: {ASK_EVIDENCE})"
        return f"EVIDENCE IMAGE GONE ({named}; cannot be labelled)" if named else "NO EVIDENCE IMAGE"
    changed = "  CHANGED SINCE THE RUN (sha256 differs; cannot be labelled)" if \
        evidence_changed(event, image, hashes) else ""
    return f"image {image}{changed}"


def list_events(events, labels_path, evidence: Path, unlabelled: bool, last: Optional[int] = None) -> None:
    """One row per image, oldest first; ``last``: only the last rows (after ``unlabelled``; None: the
    last DEFAULT_LAST, 0: all). Only the rows listed have their image found and hashed, each file once."""
    given = last is not None
    last = last if given else DEFAULT_LAST
    all_events = read_review_events(events)
    states = label_states(read_labels(labels_path)) if Path(labels_path).is_file() else {}
    latest = {key: state.current for key, state in states.items()}
    conflicts = find_conflicts(latest)
    conflict_of = {(event_id, c.image_sha256): c for c in conflicts for event_id in c.events}
    # a log that repeats an image (a looped folder, a part judged twice): its other events say so
    # (file order, not the labels' times: a clock set back would reorder those)
    by_image = {label.image_sha256: label for label in latest.values()}
    rows = []
    for event in all_events:
        # one row per image: a part's cameras each (a part without any image: one row saying why)
        for camera, one in review_rows(event) or [(None, None)]:
            current = standing_label(states, event, camera) if one is not None else None
            rows.append((event, one, current))
    listed = [row for row in rows if not (unlabelled and row[2])]
    left_out = max(0, len(listed) - last) if last else 0
    hashes = FileHashes()        # each evidence file hashed once, however many rows name it
    for event, one, current in listed[left_out:]:
        why = ""
        if one is None:
            one, why = one_camera_event(event, ask_camera=ASK_CAMERA)
        image = find_evidence(one, evidence, events, hashes) if one is not None else None
        one = one or event
        score = one.get("score")
        conflict = conflict_of.get((str(event["event_id"]), current.current.image_sha256)) if current else None
        same_image = None
        if current is None and image is not None and not evidence_changed(one, image, hashes):
            same_image = by_image.get(str(one.get("evidence_sha256") or hashes.sha256(image)))
        click.echo(f"{event['event_id']}  {one.get('camera') or '-':8}  "
                   f"score {score if not isinstance(score, (int, float)) else format(score, '.4g')}  "
                   f"model {str(one.get('model_sha256') or '?')[:12]}  {_image_text(one, image, why, hashes)}  "
                   f"{_label_text(current, conflict, same_image)}")
    shown = len(listed) - left_out
    elsewhere = len({key.event_id for key in latest} - {str(e["event_id"]) for e in all_events})
    # labels of another run's events share the file: counted, so a mistyped log is not read as "unlabelled"
    more = f" ({elsewhere} of its labelled event(s) are not in this log)" if elsewhere else ""
    counted = f"{shown} of {len(all_events)} event(s)" if len(rows) == len(all_events) else \
        f"{shown} of {len(rows)} image(s) of {len(all_events)} event(s)"      # a part of several cameras: a row each
    if left_out:
        which = f"--last {last}" if given else f"the last {last} by default"
        counted += f" ({which}: {left_out} earlier row(s) not listed; --last 0 lists all)"
    click.echo(f"{counted}; labels in {labels_path}{more}")
    for conflict in conflicts:
        click.echo(f"conflict: {conflict.describe()} (refit refuses the label file until it is settled): "
                   f"{mark_command(conflict.events, events_path=events, labels_path=labels_path)}")


def mark_events(events, labels_path, evidence: Path, event_ids: Sequence[str], label: str, note: str,
                who: Optional[str], camera: Optional[str], replace: bool = False) -> None:
    """Label ``event_ids`` together: every label is made (evidence found, hash checked) before any
    is written, and the lot is refused when it would leave one image both good and defect, or change
    a standing label without ``replace``."""
    by_id = events_to_label(event_ids, {str(e["event_id"]): e for e in read_review_events(events)}, events, evidence,
                            labels_path)
    for event_id in event_ids:
        if event_id not in by_id:
            raise ReviewError(f"{events}: no event {event_id!r} (list them with `mrkd review {events} --labels ...`)")
    records = label_logged_events([by_id[event_id] for event_id in dict.fromkeys(event_ids)], label, who=who,
                                  note=note, camera=camera, ask_camera=ASK_CAMERA, ask_evidence=ASK_EVIDENCE)
    append_checked(labels_path, records,
                   lambda ids, as_: mark_command(ids, as_, events_path=events, labels_path=labels_path),
                   replace=replace, replace_hint="give --replace")
    for record in records:
        click.echo(f"{record.event_id}: {LABEL_WORDS[label]} (image sha256 {record.image_sha256[:12]}) -> "
                   f"{labels_path}")


@click.command("review", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("events", type=click.Path(exists=True, dir_okay=False))
@click.option("--labels", "labels_path", required=True, type=click.Path(dir_okay=False),
              help="The label file (JSON lines, append-only; created when missing). `mrkd refit --reviewed` reads it.")
@click.option("--evidence", "evidence_dir", type=click.Path(file_okay=False), default=None,
              help="Folder of the lossless evidence images (default: evidence/ beside EVENTS).")
@click.option("--mark", "event_ids", multiple=True, metavar="EVENT_ID",
              help="Label this event (give --as). Several --mark label those events together, all with the "
                   "same --as (how an image labelled both good and defect is settled). Without --mark the "
                   "alarms are listed.")
@click.option("--as", "label", type=click.Choice(list(LABELS)), default=None,
              help="good: a good part, a false alarm (refit adds it to the memory bank); "
                   "defect: a defect confirmed (refit checks that the new model still flags it).")
@click.option("--note", default="", help=f"Optional note kept with the label (at most {MAX_NOTE} characters).")
@click.option("--who", default=None,
              help=f"Who decides: one printable line of at most {MAX_WHO} characters (default: the login name).")
@click.option("--camera", default=None, metavar="NAME",
              help="For a part of several cameras: the camera whose image is labelled (default: the one that "
                   "flagged it). Each camera's image has its own label.")
@click.option("--replace", is_flag=True,
              help="Let --mark change an image's standing label (good -> defect or back); without it such a "
                   "mark is refused, naming the label that stands.")
@click.option("--unlabelled", is_flag=True, help="List only events without a label yet.")
@click.option("--last", type=IntegerRange(min=0), default=None, metavar="N",
              help=f"List only the last N images (rows; after --unlabelled); 0: all of them. Default: the "
                   f"last {DEFAULT_LAST}, with a line saying how many earlier rows were not listed.")
@error_boundary
def review_command(events, labels_path, evidence_dir, event_ids, label, note, who, camera, replace, unlabelled,
                   last):
    """List the alarms of the events log EVENTS, or mark one (or several together) as a good part
    (false alarm) or a confirmed defect. Labels are appended to --labels with the evidence image's
    sha256; the last label of an image (an event, a part's camera) counts.

    What is checked: every image listed is hashed (sha256) and compared with the hash its event
    recorded (CHANGED SINCE THE RUN; EVIDENCE IMAGE GONE when the file is missing); a file named by
    several rows is read once. Rows not listed (--last, --unlabelled) are not read. Only the last
    rows are listed unless --last 0 is given. --mark hashes the image again when it writes the label
    and refuses one that changed."""
    evidence = Path(evidence_dir) if evidence_dir else default_evidence_dir(events)
    if not event_ids:
        if label or note or replace:
            raise click.UsageError("--as, --note and --replace need --mark EVENT_ID")
        list_events(events, labels_path, evidence, unlabelled, last)
        return
    if last is not None:
        raise click.UsageError("--last is for the listing, not with --mark")
    if label is None:
        raise click.UsageError("--mark needs --as good or --as defect")
    if len(event_ids) > MAX_MARKS:
        raise click.UsageError(f"at most {MAX_MARKS} --mark in one call")
    mark_events(events, labels_path, evidence, event_ids, label, note, who, camera, replace)


__all__ = ["review_command", "find_evidence", "one_camera_event", "MrkdError"]
