"""The review commands given the wrong JSON-lines file: an events log where the label file belongs (refit's
--reviewed), and a file of another tool's JSON lines as the events log. Each is one line saying which file
it is, not a field error about the first line or a quiet "0 of 0 events"."""

import json

import pytest
from click.testing import CliRunner

from mrkd.runtime.review import ReviewError, read_labels, read_review_events

EVENT = {"event_id": "20261206T120000.000Z-1a2b3c4d", "time": "2026-12-06T12:00:00.000+00:00", "kind": "alarm",
         "camera": "cam0", "score": 1.2, "threshold": 1.0}


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_an_events_log_given_as_the_label_file_is_named_as_one(tmp_path):
    events = write_lines(tmp_path / "events.jsonl", [EVENT])
    with pytest.raises(ReviewError) as refused:      # before: "events.jsonl:1: field image_sha256 is missing"
        read_labels(events)
    assert "is an events log" in str(refused.value) and "image_sha256" not in str(refused.value)


def test_json_lines_without_events_are_no_events_log(tmp_path):
    other = write_lines(tmp_path / "other.jsonl", [{"id": 1, "value": 2}, {"id": 2}])
    with pytest.raises(ReviewError, match="none of its 2 JSON line"):
        read_review_events(other)
    empty = tmp_path / "quiet.jsonl"
    empty.write_text("")
    assert read_review_events(empty) == []           # a run without alarms: an empty log is one


def test_mrkd_review_of_another_tools_json_lines_is_one_line(tmp_path):
    from mrkd.cli import main
    other = write_lines(tmp_path / "other.jsonl", [{"id": 1}])
    result = CliRunner().invoke(main, ["review", str(other), "--labels", str(tmp_path / "labels.jsonl")])
    assert result.exit_code != 0 and "none of its 1 JSON line" in result.output, result.output
    assert "Traceback" not in result.output and "0 of 0" not in result.output
