"""The latest events of an events log (`mrkd run --events`), read from its end: the operator page
rebuilds its alarm rows from them when a run starts, so a restart does not empty the review view.

The log grows for a whole run (hundreds of thousands of lines a day), so it is read backwards in
blocks until ``count`` events are found, and never more than ``max_bytes`` of it: a page start costs
the same on a day-old log as on a new one. A torn last line (a crash mid-write), a line cut by the
block edge and lines that are not events are passed over.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List

from mrkd.runtime.outputs.events import EVENT_KEYS

BLOCK_BYTES = 64 * 1024
MAX_BYTES = 8 * 1024 * 1024      # at most this much of the log's end is read (events are ~1 KB each)


def latest_events(path, count: int, max_bytes: int = MAX_BYTES) -> List[dict]:
    """Up to ``count`` events of the log ``path``, newest first, read from at most the last
    ``max_bytes`` bytes. [] when the file is missing or cannot be read (the page then starts empty)."""
    found: List[dict] = []
    try:
        with open(Path(path), "rb") as handle:
            end = os.fstat(handle.fileno()).st_size
            start, tail = end, b""
            while len(found) < count and start > 0 and end - start < max_bytes:
                step = min(BLOCK_BYTES, start, max_bytes - (end - start))
                start -= step
                handle.seek(start)
                data = handle.read(step) + tail
                lines = data.split(b"\n")
                # the first piece may be the end of a line that begins in the block before: kept for it
                tail = lines.pop(0) if start > 0 else b""
                for line in reversed(lines):
                    event = _event(line)
                    if event is not None:
                        found.append(event)
                        if len(found) == count:
                            break
    except OSError:
        return []
    return found


def _event(line: bytes):
    if not line.strip():
        return None
    try:      # zeros a power cut left after the last record (the log's next start puts its newline back)
        record = json.loads(line.rstrip(b"\0"))
    except (ValueError, UnicodeDecodeError):      # a torn last line, or not JSON
        return None
    if isinstance(record, dict) and all(key in record for key in EVENT_KEYS) and isinstance(record["event_id"], str) \
            and record.get("log") != "parts":
        return record
    return None
