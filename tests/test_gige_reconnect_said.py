"""Why a lost GigE camera does not come back is said in the log, once per reason: a camera swapped at
the same address (another serial) stays down by design, and the run must name it; the reason was kept
only in the source's stats, which no status, health page, metric or summary of a triggered run shows,
so the log said "lost ... reconnecting" and "DOWN" for as long as the swapped camera answered.
Against Aravis' own simulator (arv-fake-gv-camera-0.8) on 127.0.86.75."""

from __future__ import annotations

import logging
import time

from test_gige import simulator, wait_for  # noqa: F401  (the fixture)

from mrkd.runtime.sources import open_source

ADDRESS = "127.0.86.75"


def said(caplog, text):
    return [r.getMessage() for r in caplog.records if r.name == "mrkd.runtime.sources.gige" and text in r.getMessage()]


def test_a_swapped_camera_is_named_in_the_log_once_while_it_keeps_the_source_down(simulator, caplog):  # noqa: F811
    caplog.set_level(logging.WARNING, logger="mrkd.runtime.sources.gige")
    first = simulator(ADDRESS, "CELL-A")
    source = open_source(first.uri, trigger="software", backoff=(0.1, 0.3))
    try:
        assert source.grab(time.monotonic(), 2.0).error is None
        first.kill()
        wait_for(lambda: not source.up, 15, "the camera to show as down")
        simulator(ADDRESS, "CELL-B")
        refused = "another camera answers there now (serial CELL-B"
        wait_for(lambda: refused in (source.stats.last_error or ""), 20, "the swapped camera to be refused")
        time.sleep(2.0)         # several more tries at 0.1-0.3 s backoff, each refused the same way
        assert not source.up
        lines = said(caplog, refused)
        assert len(lines) == 1, lines
        assert "camera" in lines[0] and first.uri.split("//")[1] in lines[0]
    finally:
        source.close()


def test_a_camera_back_after_a_power_cycle_is_said_without_an_empty_feature_list(simulator, caplog):  # noqa: F811
    """The reconnect line said "features re-applied {}" for a camera run with none (the soak's log)."""
    caplog.set_level(logging.WARNING, logger="mrkd.runtime.sources.gige")
    camera = simulator("127.0.86.36", "CYCLED")
    source = open_source(camera.uri, trigger="software", backoff=(0.1, 0.3))
    try:
        assert source.grab(time.monotonic(), 2.0).error is None
        camera.kill()
        wait_for(lambda: not source.up, 15, "the camera to show as down")
        camera.start()
        wait_for(lambda: source.up, 20, "the camera to come back")
    finally:
        source.close()
    assert said(caplog, "reconnected") == [f"camera {camera.uri}: reconnected"], said(caplog, "reconnected")
