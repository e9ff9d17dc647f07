"""Authenticated commands to a running line over the operator page's HTTP server.

The page stays read-only for everyone; the two commands below change something and need
``Authorization: Bearer TOKEN``, TOKEN read from an environment variable when the line starts and
compared in constant time (``hmac.compare_digest``). Without a configured token they are refused
(403), with a wrong or missing one: 401.

* ``POST /review`` with JSON ``{"event_id", "label": "good"|"defect", "note"?, "who"?, "camera"?}``:
  one label appended to the label file (runtime/review.py), the image being the event's lossless
  evidence. A part's event (triggered mode) has one image per camera: ``camera`` names which; without
  it the part's one flagged camera (or its only camera) is meant.
* ``POST /reload``: the model slots load the model files again (runtime/line/swap.py); the answer
  is the outcome of that load (swapped/refused/unchanged; a swap happens between the next frames,
  or the next parts).
"""

from __future__ import annotations

import hmac
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Optional, Tuple

from mrkd.errors import MrkdError
from mrkd.runtime.review import LABEL_WORDS, LABELS, LabelFile, ReviewError, make_label

MAX_BODY = 16 * 1024


class ControlError(MrkdError, ValueError):
    """The control settings cannot be used (a token variable that is not set)."""


def token_from_env(variable: str) -> str:
    value = os.environ.get(variable, "")
    if len(value) < 16:
        raise ControlError(f"environment variable {variable}: the control token must be set and at least 16 "
                           f"characters long")
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

    def _find_event(self, event_id: str) -> Optional[dict]:
        if self.events_path is None or not self.events_path.is_file():
            return None
        with open(self.events_path, "rb") as handle:
            for line in handle:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and event.get("event_id") == event_id:
                    return event
        return None

    def _review(self, body: bytes) -> Tuple[int, dict]:
        if self.labels_path is None:
            return 403, {"error": "review is off: start the line with a label file"}
        try:
            request = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return 400, {"error": "body must be JSON: {\"event_id\": ..., \"label\": \"good\"|\"defect\"}"}
        if not isinstance(request, dict) or not isinstance(request.get("event_id"), str) \
                or request.get("label") not in LABELS:
            return 400, {"error": f"give event_id and label ({' or '.join(LABELS)})"}
        event = self._find_event(request["event_id"])
        if event is None:
            return 404, {"error": f"no event {request['event_id']!r} in {self.events_path}"}
        camera = request.get("camera")
        if camera is not None and not isinstance(camera, str):
            return 400, {"error": "camera must be text"}
        if isinstance(event.get("cameras"), list):       # a part: which camera's image
            camera, why = _part_camera(event, camera)
            if camera is None:
                return 400, {"error": f"event {request['event_id']}: {why}"}
            event = dict(event, camera=camera)
        from mrkd.review_cli import find_evidence
        image = find_evidence(event, self.evidence_dir)
        if image is None:
            return 409, {"error": f"event {request['event_id']} has no evidence image"}
        note, who = request.get("note") or "", request.get("who") or "operator (page)"
        if not isinstance(note, str) or not isinstance(who, str):
            return 400, {"error": "note and who must be text"}
        label = make_label(request["event_id"], image, request["label"], who=who, note=note,
                           camera=str(event.get("camera") or ""))
        with LabelFile(self.labels_path) as log:
            log.append(label)
        return 200, {"saved": asdict(label), "meaning": LABEL_WORDS[label.label]}

    def _reload(self) -> Tuple[int, dict]:
        if self.slots is None:
            return 403, {"error": "model reload is not available on this line"}
        count = len(self.slots.records)
        self.slots.request_reload("http")
        self.slots.wait_idle(60)
        return 200, {"outcomes": self.slots.report()[count:], "staged": self.slots.staged()}


def _part_camera(event: dict, asked: Optional[str]) -> Tuple[Optional[str], str]:
    """The camera of a part event whose image a review labels: ``asked``, else the one flagged camera
    (or the part's only one); (None, why) when that is not one camera."""
    cameras = [c for c in event["cameras"] if isinstance(c, dict) and isinstance(c.get("camera"), str)]
    names = [c["camera"] for c in cameras]
    if asked is not None:
        return (asked, "") if asked in names else (None, f"the part has no camera {asked!r} (it has {names})")
    flagged = [c["camera"] for c in cameras if c.get("anomalous")] or names
    if len(flagged) != 1:
        return None, f"the part has the cameras {flagged}: give \"camera\""
    return flagged[0], ""


__all__ = ["LineControl", "ControlError", "ReviewError", "MAX_BODY", "token_from_env"]


def pop_control_options(options: dict, http: Optional[str] = None, tls: bool = False) -> dict:
    """``--control-token-env`` / ``--review-labels`` of `mrkd run`, taken out of its options and checked
    (the token is read from its variable now, so a missing one fails before the line starts). ``tls``:
    the page speaks HTTPS; a token sent from the network needs it."""
    variable, labels = options.pop("control_token_env", None), options.pop("review_labels", None)
    if labels and not variable:
        raise ControlError("--review-labels needs --control-token-env VAR: reviews over HTTP need a token")
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
    server.control = LineControl(control["token"], control.get("labels"), events,
                                 evidence or (Path(events).parent / "evidence" if events else None), slots)
    return server.control
