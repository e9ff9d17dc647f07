"""Two writers of one label file (the line's page and `mrkd review`, each through append_checked, which
holds the file's flock while it writes): opening the file must not cut what the other is writing.

A label file's opening cuts a torn last line (a crash mid-write). A write of several labels at once
(up to 100 events relabelled together) spans pages, and another process can see it half done: the cut
then removed the first part and the rest landed behind it, a label lost and the file garbled. Here the
other writer is played by this test: it holds the flock and writes one label in two steps.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading

import pytest

from mrkd.runtime.review import GOOD, LabelFile, ReviewLabel, now_iso, read_labels

pytestmark = pytest.mark.skipif(not hasattr(fcntl, "flock"), reason="no flock")


def label_line(event_id: str) -> bytes:
    import dataclasses
    import json
    label = ReviewLabel(event_id=event_id, image_sha256=hashlib.sha256(event_id.encode()).hexdigest(), label=GOOD,
                        who="tester", when=now_iso())
    return (json.dumps(dataclasses.asdict(label), sort_keys=True) + "\n").encode()


def test_opening_the_file_waits_for_a_writer_that_holds_it_and_cuts_nothing_of_its_label(tmp_path):
    path = tmp_path / "labels.jsonl"
    first = label_line("ev-1")
    path.write_bytes(first)
    second = label_line("ev-2")
    writer = os.open(path, os.O_WRONLY | os.O_APPEND)
    fcntl.flock(writer, fcntl.LOCK_EX)
    os.write(writer, second[:40])          # the other writer's label, half on disk
    opened = threading.Event()

    def open_and_label():
        with LabelFile(path) as log, log.locked():
            log.extend([])
        opened.set()
    thread = threading.Thread(target=open_and_label, daemon=True)
    thread.start()
    opened.wait(1.0)                      # the old code cut the half label here, at once
    os.write(writer, second[40:])
    fcntl.flock(writer, fcntl.LOCK_UN)
    os.close(writer)
    thread.join(10)
    assert not thread.is_alive()
    assert path.read_bytes() == first + second
    assert [label.event_id for label in read_labels(path)] == ["ev-1", "ev-2"]
