"""``--parts-log FILE``: the traceability record of a triggered cell, one JSON line per judged part
(OK, NG and ERROR alike), in the order the parts were judged, and one per refused trigger.

The events log (events.py) keeps only NG/ERROR parts and MQTT is not a record on disk; a quality
department wants every part: its id, time, verdict, each camera's score, the model that judged it,
the recipe, and the event id and evidence of an NG part. A line is the part record every output
shares (``events.part_event``, the body MQTT publishes on PREFIX/part) plus ``"log": "parts"``,
which tells a parts log's lines from an events log's (each log refuses the other's file).

The file is the events log's (``EventLog``) with its own kind of line: append-only, one fsynced
whole line per part (a kill never leaves half a line; a torn tail from a crash is cut at the next
start), an existing file is taken only when every line is a part or missed-trigger record, and a full disk or a file
that cannot be written is counted as failed (summary, /metrics, /healthz) while the line goes on.
Parts exist only in triggered runs: in a free run this output receives none (the CLI refuses
``--parts-log`` without ``--trigger software|hardware``).

A refused trigger (queue full, line offline, unknown recipe) is a line too, ``"kind": "missed"``,
in the order of events (the part runner hands every output's calls to one Notifier in that order:
before the lines of earlier parts not yet judged when it was refused): its sequence, part id and
reason, and no verdict (it was never judged). So the log holds one line per
trigger, and a part that was missed is told from one that never came; parts and missed triggers
share the trigger's ``sequence``. An accepted trigger is written once, as its part when judged.
Missed lines follow the sequence. Only while the outputs are far behind (a stalled disk under a
trigger storm, runtime/line/handover.py) is a run of refused triggers one line with its ``count``
(the triggers ``sequence`` .. ``sequence + count - 1``): parts + the missed lines' counts = triggers.
"""

from __future__ import annotations

import json

from mrkd.runtime.outputs.base import PART_SCHEMA_VERSION, PartResult, TriggerReceipt
from mrkd.runtime.outputs.events import EventLog, EventLogError, EventLogOutput, part_event, record_time

PARTS_LOG_KEYS = ("time", "kind", "inspection_id", "part_id", "verdict")   # every part record has them
MISSED_KEYS = ("time", "kind", "sequence", "part_id", "reason")           # every missed trigger's record has them


class PartsLogError(EventLogError):
    """--parts-log names a file that is not an mrkd parts log (it is refused, never changed)."""


def part_record(result: PartResult) -> dict:
    """The parts log's line for one judged part."""
    return {**part_event(result), "log": "parts"}


def missed_record(receipt: TriggerReceipt) -> dict:
    """The parts log's line for one refused trigger: no verdict, no inspection id (nothing was judged).
    A report folded while the outputs were far behind (``receipt.count`` > 1) is one line with its
    ``count``: the triggers ``sequence`` .. ``sequence + count - 1``, the first one's part id and time."""
    record = {"time": record_time(receipt.time), "log": "parts", "kind": "missed", "sequence": receipt.sequence,
              "part_id": receipt.part_id, "reason": receipt.reason, "trigger_time": receipt.time,
              "schema_version": PART_SCHEMA_VERSION}
    if receipt.count > 1:
        record["count"] = receipt.count
    return record


def _is_part_record(line: bytes) -> bool:
    """A part's line or a missed trigger's (one with a verdict is neither)."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return False
    if not (isinstance(record, dict) and record.get("log") == "parts"):
        return False
    if record.get("kind") == "part":
        return all(key in record for key in PARTS_LOG_KEYS)
    return (record.get("kind") == "missed" and all(key in record for key in MISSED_KEYS)
            and "verdict" not in record)


class PartsLog(EventLog):
    option = "--parts-log"
    records = "mrkd part record"
    log_name = "mrkd parts log"
    error = PartsLogError
    first_keys = ("acquired_s", "count", "kind")     # a part's line; a folded run of missed triggers; one missed

    @staticmethod
    def is_record(line: bytes) -> bool:
        return _is_part_record(line)


class PartsLogOutput(EventLogOutput):
    """One line per judged part and per refused trigger; alarms of a free run are not parts and are
    not written here."""

    health_name = "parts_log"
    log_class = PartsLog

    def on_event(self, camera: str, event: dict) -> None:
        pass

    def on_part(self, result: PartResult) -> None:
        self._write(part_record(result))

    def on_trigger(self, receipt: TriggerReceipt) -> None:
        if not receipt.accepted:        # an accepted one is written as its part, once judged
            self._write(missed_record(receipt))


def outputs_from(settings) -> list:
    """``--parts-log FILE`` (OutputSettings.parts_log)."""
    return [PartsLogOutput(settings.parts_log)] if settings.parts_log else []
