"""An output that fails and delivers by turns (evidence whose OK samples cannot be written while alarm
evidence can, a web hook answering every other POST, a broker that drops and comes back) must not
log a 'failing' / 'delivering again' pair for every item: the warnings stay rate-limited, and the
counts they give add up to what failed."""

from __future__ import annotations

import contextlib
import logging
import re
import time

import numpy as np

from mrkd.runtime.outputs.base import FrameResult
from mrkd.runtime.outputs.delivery import Delivery
from mrkd.runtime.outputs.evidence import EvidenceSettings, EvidenceWriter

LOGGER = "mrkd.runtime.outputs"


def _frame(i: int, event=None) -> FrameResult:
    image = np.full((16, 16, 3), i % 256, np.uint8)
    return FrameResult("cam0", i, float(i), image, np.zeros((4, 4), np.float32), 0.0, 1.0, event is not None,
                       event=event)


@contextlib.contextmanager
def said_by_outputs():
    """The messages the outputs' logger gives inside the block (whatever the root logger's level)."""
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    try:
        yield said
    finally:
        logger.removeHandler(handler)


def test_evidence_failing_and_delivering_by_turns_is_said_once_not_per_frame(tmp_path, caplog):
    (tmp_path / "cam0").mkdir()
    (tmp_path / "cam0" / "ok").write_text("a file where the OK samples would go")
    writer = EvidenceWriter(EvidenceSettings(str(tmp_path), ok_every=1))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for i in range(20):
            writer.on_frame(_frame(2 * i))                                     # OK sample: fails
            assert writer.event_fields(_frame(2 * i + 1, {"event_id": f"e{i}"}))["evidence"] is not None
    said = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(said) <= 2, said
    health = writer.health()
    assert health.failed == 20 and health.sent == 20, health


def test_folded_failures_are_counted_in_the_next_warning():
    delivery = Delivery("webhook", "http://mes.local/alarm", warn_every_s=0.3)
    with said_by_outputs() as said:
        for _ in range(5):                 # 5 failures, each after a success, within 0.3 s
            delivery.failed_one("503")
            delivery.delivered()
        time.sleep(0.35)
        delivery.failed_one("503")          # the period is over: said, with what was folded into it
    failing = [m for m in said if "failing" in m]
    assert len(failing) == 2, said
    assert failing[0].endswith("1 failed so far")
    assert re.search(r"\(4 more failed since the last warning\); 6 failed so far$", failing[1]), failing[1]
    assert delivery.failed == 6 and delivery.sent == 5


def test_folded_failures_are_said_by_the_first_success_after_the_period():
    """Alarm evidence that fails now and then after a 'delivering again': the failures folded into the
    period must not wait for a failure after it to be said (one may never come): the last line of the log
    read 'delivering again' while images were being lost, and only the summary counted them."""
    delivery = Delivery("evidence", "ev/", warn_every_s=0.3)
    with said_by_outputs() as said:
        delivery.failed_one("disk full")      # said
        delivery.delivered()                  # 'delivering again'
        for _ in range(3):                    # folded: within the period
            delivery.failed_one("disk full")
            delivery.delivered()
        time.sleep(0.35)
        delivery.delivered()                  # the period is over, and nothing failed since
        delivery.delivered()
    assert len(said) == 3, said
    assert re.search(r"evidence \(ev/\): 3 more failed since the last warning \(disk full\); 4 failed so far; "
                     r"delivering again$", said[2]), said
