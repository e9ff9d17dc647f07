"""Authenticated commands to a running line over the operator page's HTTP server.

The page stays read-only for everyone; the two commands below change something and need
``Authorization: Bearer TOKEN``, TOKEN read from an environment variable when the line starts and
compared in constant time (``hmac.compare_digest``). Without a configured token they are refused
(403), with a wrong or missing one: 401.

* ``POST /review`` with JSON ``{"event_id", "label": "good"|"defect", "note"?, "who"?, "camera"?}``:
  one label appended to the label file (runtime/review.py), the image being the event's lossless
  evidence, whose sha256 must still be the one the event recorded. A part's event (triggered mode)
  has one image per camera: ``camera`` names which; without it the part's one flagged camera (or its
  only camera) is meant. ``event_id`` may be a list: those events get the same label together (how
  an image labelled both good and defect is settled). A label that would leave one image both good
  and defect, evidence changed since the run or missing is refused (409), nothing written; ``who``
  is one printable line (400 otherwise). Each camera's image of a part has its own label: a label
  that changes an image's standing one (good -> defect or back) is refused (409, ``existing``: the
  standing labels, who and when) unless the body says ``"replace": true`` (the page sends it after
  the operator confirms); labelling another camera's image of the part changes nothing.
* ``POST /reload``: the model slots load the model files again (runtime/line/swap.py); the answer
  is the outcome of that load for each model path (swapped/refused/unchanged, or staged: checked and
  waiting for the loop, which swaps between the next frames or the next parts): 200, or 409 when a
  model was refused (the running one goes on).
"""

from __future__ import annotations

import hmac
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from mrkd.errors import MrkdError
from mrkd.runtime.review import LABEL_WORDS, LABELS, MAX_MARKS, AlreadyLabelled, ReviewError, UnlabellableError, \
    append_checked, check_label_file, events_to_label, label_logged_events, label_summary

MAX_BODY = 16 * 1024


class ControlError(MrkdError, ValueError):
    """The control settings cannot be used (a token variable that is not set)."""


def token_from_env(variable: str) -> str:
    value = os.environ.get(variable, "")
    if len(value) < 16:
        raise ControlError(f"environment variable {variable}: the control token must be set and at least 16 "
                           f"characters long")
    # a token no client can send would start a line whose every command is refused (401): the header's
    # value is read as Latin-1 and stripped, so spaces around it or a non-ASCII character never match
    if value != value.strip() or not (value.isascii() and value.isprintable()):
        raise ControlError(f"environment variable {variable}: the control token must be printable ASCII without "
                           f"spaces at either end (no client could send it in an Authorization header)")
    return value


class LineControl:
    """What ``POST`` on the operator page may do; ``handle_post`` answers (status, JSON body)."""

    def __init__(self, token: Optional[str], labels_path=None, events_path=None, evidence_dir=None, slots=None):
        self._token = token.encode("utf-8") if token else None
        self.labels_path = Path(labels_path) if labels_path else None
        self.events_path = Path(events_path) if events_path else None
        self.evidence_dir = Path(evidence_dir) if evidence_dir else None
        self.slots = slots

    def authorized(self, headers: Mapping[str, str]) -> Tuple[bool, int, str]:
        if self._token is None:
            return False, 403, "commands are off: start the line with a control token"
        given = headers.get("Authorization") or ""
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode("utf-8"), self._token):
            return False, 401, "Authorization: Bearer TOKEN required"
        return True, 200, ""

    def handle_post(self, path: str, headers: Mapping[str, str], body: bytes) -> Tuple[int, dict]:
        ok, code, why = self.authorized(headers)
        if not ok:
            return code, {"error": why}
        path = path.split("?", 1)[0]
        try:
            if path == "/review":
                return self._review(body)
            if path == "/reload":
                return self._reload()
        except (MrkdError, OSError) as exc:
            return 400, {"error": str(exc)}
        return 404, {"error": f"no command {path}"}

    def _find_events(self, event_ids: List[str]) -> Dict[str, dict]:
        """The events of the log named ``event_ids`` (lines that are not JSON are passed over: the
        line's own log, read while it is written)."""
        found: Dict[str, dict] = {}
        if self.events_path is None or not self.events_path.is_file():
            return found
        wanted = set(event_ids)
        # A line can hold a wanted id only if it holds its JSON text: most lines are passed over without
        # parsing (a day's log of 200,000 events took ~1 s of parsing per click). Ids are text; one with
        # characters JSON may spell two ways is looked for in every line.
        needles = [json.dumps(i).encode() for i in wanted if isinstance(i, str) and i.isascii() and i.isprintable()
                   and "\\" not in i and '"' not in i and "/" not in i]
        exact = len(needles) == len(wanted)
        with open(self.events_path, "rb") as handle:
            for line in handle:
                if exact and not any(needle in line for needle in needles):
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and event.get("event_id") in wanted:
                    found[event["event_id"]] = event
        return found

    def _review(self, body: bytes) -> Tuple[int, dict]:
        if self.labels_path is None:
            return 403, {"error": "review is off: start the line with a label file"}
        try:
            request = _parse_json(body)
        except ValueError as exc:
            return 400, {"error": f'body must be JSON: {{"event_id": ..., "label": "good"|"defect"}} ({exc})'}
        event_ids = _event_ids(request)
        if event_ids is None or request.get("label") not in LABELS:
            return 400, {"error": f"give event_id (one, or a list of at most {MAX_MARKS}) and label "
                                  f"({' or '.join(LABELS)})"}
        camera, note, who = request.get("camera"), request.get("note") or "", request.get("who") or "operator (page)"
        if camera is not None and not isinstance(camera, str):
            return 400, {"error": "camera must be text"}
        if not isinstance(note, str) or not isinstance(who, str):
            return 400, {"error": "note and who must be text"}
        replace = request.get("replace", False)
        if not isinstance(replace, bool):
            return 400, {"error": "replace must be true or false"}
        events = events_to_label(event_ids, self._find_events(event_ids), self.events_path, self.evidence_dir,
                                 self.labels_path)
        missing = [event_id for event_id in event_ids if event_id not in events]
        if missing:
            return 404, {"error": f"no event {missing[0]!r} in {self.events_path}"}
        try:
            labels = label_logged_events([events[event_id] for event_id in event_ids], request["label"], who=who,
                                         note=note, camera=camera)
            append_checked(self.labels_path, labels, _together, replace=replace,
                           replace_hint='send it again with "replace": true')
        except AlreadyLabelled as exc:       # "existing": what stands, for the page's "are you sure" step
            return 409, {"error": str(exc), "existing": [label_summary(label) for label in exc.existing]}
        except UnlabellableError as exc:     # "together": the events one call may label to settle it
            return 409, {"error": str(exc), **({"together": exc.together} if exc.together else {})}
        saved = [asdict(label) for label in labels]
        return 200, {"saved": saved[0] if isinstance(request["event_id"], str) else saved,
                     "meaning": LABEL_WORDS[request["label"]]}

    def _reload(self) -> Tuple[int, dict]:
        if self.slots is None:
            return 403, {"error": "model reload is not available on this line"}
        load_round = self.slots.request_reload_round("http")
        self.slots.wait_idle(60)
        # this request's own round only (a SIGHUP's load finishing meanwhile is not its answer); a version
        # that passed its check waits for the loop's next frame or part: it is answered as "staged", after
        # what the loop already did, so outcomes[0] is never silent about this request
        outcomes = self.slots.outcomes_of(load_round)
        # a script that moved a new model in must see a refusal in the status code, not only in the body
        refused = any(o["outcome"] == "refused" for o in outcomes)
        return (409 if refused else 200), {"outcomes": outcomes, "staged": self.slots.staged()}


def _unique_keys(pairs) -> dict:
    found: dict = {}
    for key, value in pairs:
        if key in found:     # json.loads would keep the last value silently; another reader may take the first
            raise ValueError(f"key {key!r} given twice")
        found[key] = value
    return found


def _parse_json(body: bytes):
    """A command's body as JSON; ValueError (one line) for bytes that are not UTF-8 or not JSON, a key given
    twice in one object, or nesting too deep for the parser (RecursionError, which is no ValueError)."""
    try:
        return json.loads(body.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValueError(exc.msg) from None


def _event_ids(request) -> Optional[List[str]]:
    """The request's ``event_id``: one id or a list of 1..MAX_MARKS ids (duplicates dropped); None
    when it is neither."""
    if not isinstance(request, dict):
        return None
    given = request.get("event_id")
    ids = [given] if isinstance(given, str) else given
    if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_MARKS \
            or not all(isinstance(i, str) and i for i in ids):
        return None
    return list(dict.fromkeys(ids))


def _together(event_ids, label: str) -> str:
    return f'POST /review {{"event_id": {json.dumps(list(event_ids))}, "label": "{label}"}}'


__all__ = ["LineControl", "ControlError", "ReviewError", "MAX_BODY", "token_from_env"]


def pop_control_options(options: dict, http: Optional[str] = None, tls: bool = False, events=None,
                        evidence: bool = True) -> dict:
    """``--control-token-env`` / ``--review-labels`` of `mrkd run`, taken out of its options and checked
    (the token is read from its variable now, so a missing one fails before the line starts). ``tls``:
    the page speaks HTTPS; a token sent from the network needs it. ``events``: the run's --events log,
    which the label file must not be. ``evidence``: whether the run writes --evidence (a label names its
    alarm's evidence image)."""
    variable, labels = options.pop("control_token_env", None), options.pop("review_labels", None)
    if labels and not variable:
        raise ControlError("--review-labels needs --control-token-env VAR: reviews over HTTP need a token")
    if labels and not events:      # POST /review looks the alarm up in that log: without one it finds none
        raise ControlError("--review-labels needs --events LOG: a label names an alarm of the events log")
    if labels and events and Path(labels).resolve() == Path(events).resolve():
        raise ControlError(f"--review-labels {labels} is the --events log: labels go to a file of their own "
                           "(a label line in the events log breaks it for the next run)")
    if labels and not evidence:    # without the image every POST /review was refused, after the line had started
        raise ControlError("--review-labels needs --evidence DIR: a label names the lossless image its alarm was "
                           "judged on, which --evidence writes")
    if variable and not http:
        raise ControlError("--control-token-env: the commands are served by the operator page; add --http HOST:PORT")
    if variable and not tls:
        from mrkd.runtime.addresses import is_loopback_host
        from mrkd.runtime.outputs.web import parse_address
        host, _ = parse_address(http)
        if not is_loopback_host(host):
            raise ControlError(f"--control-token-env with --http {http}: the token would cross the network "
                               f"unencrypted; add --http-cert and --http-key (HTTPS) or listen on 127.0.0.1")
    return {"token": token_from_env(variable) if variable else None, "labels": labels}


def attach_control(outputs, control: dict, output_settings, slots=None) -> Optional[LineControl]:
    """Give the operator page (among ``outputs``) its POST commands; None when no token was asked for."""
    if not control.get("token"):
        return None
    from mrkd.runtime.outputs.web import OperatorServer
    server = next((o for o in outputs if isinstance(o, OperatorServer)), None)
    if server is None:
        raise ControlError("--control-token-env: the commands are served by the operator page; add --http HOST:PORT")
    evidence = getattr(output_settings, "evidence", None)
    evidence = getattr(evidence, "folder", evidence)
    events = getattr(output_settings, "events", None)
    labels = control.get("labels")
    if labels is not None and Path(labels).is_file():
        check_label_file(Path(labels))       # a file that is no label file is refused at the start
    server.control = LineControl(control["token"], control.get("labels"), events,
                                 evidence or (Path(events).parent / "evidence" if events else None), slots)
    return server.control
