"""A snapshot (--snapshots) is written to a hidden staged file, fsynced, then linked to its name
(snapshots.write_new_file), as evidence is. A run killed mid-write left the staged file in the camera's
folder for good: the evidence store removed its own at the start (test_evidence_staged_leftovers), the
snapshot folder nothing. Now SnapshotWriter removes, when it starts, the staged files of its own names
whose writer is gone (staged_files.remove_abandoned_in); every other file is kept."""

from __future__ import annotations

import logging
import os
import signal
import time

from mrkd.runtime.outputs.snapshots import SnapshotWriter
from test_evidence_staged_leftovers import age, caught_mid_write

# A line writing big alarm snapshots as fast as it can (PNGs of noise: the write and fsync take a while).
WRITER = """
import sys
import numpy as np
from mrkd.runtime.outputs.base import FrameResult
from mrkd.runtime.outputs.events import new_event_id
from mrkd.runtime.outputs.snapshots import SnapshotWriter
writer = SnapshotWriter(sys.argv[1], ".png")
image = np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
print("ready", flush=True)
while True:
    writer.event_fields(FrameResult("cam0", 7, 0.0, image, np.zeros((8, 8), np.float32), 1.0, 0.5, True,
                                    event={"event_id": new_event_id()}))
"""


def test_a_snapshot_killed_mid_write_leaves_a_staged_file_the_next_start_removes(tmp_path, caplog):
    folder = tmp_path / "snapshots"
    _, leftovers = caught_mid_write(folder, signal.SIGKILL, writer=WRITER)
    camera = folder / "cam0"
    assert [p.parent for p in leftovers] == [camera] and leftovers[0].name.startswith(".alarm_"), leftovers
    kept = {p: p.read_bytes() for p in camera.glob("*.png")}     # whole snapshots of the killed run
    stranger = tmp_path / "stranger.txt"
    stranger.write_text("someone's")
    name = "alarm_20261207T031408.200Z-89f5ca92_frame00000007.png"
    foreign = {        # hidden files that are not (provably) this writer's staged files
        camera / ".notes.txt": b"n",
        camera / ".img_1.png.abcdefgh.tmp": b"not a snapshot's name",
        camera / f".{name}.tmp": b"no random part",
        camera / ".alarm_20261207T031408.200Z-89f5ca92_frame00000007.bmp.abcdefgh.tmp": b"not our format",
        folder / f".{name}.hrx3ywld.tmp": b"not in a camera's folder",
        camera / "deeper" / f".{name}.hrx3ywld.tmp": b"below a camera's folder",
    }
    for path, data in foreign.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    link = camera / ".part_20261207T031408.201Z-89f5ca93_00000041.png.abcdefgh.tmp"
    link.symlink_to(stranger)                          # our name, but a link to a file elsewhere
    second_of = camera / "part_20261207T031408.202Z-89f5ca94_00000042.jpg"    # killed between link and unlink
    second_of.write_bytes(b"jpg")
    second = camera / f".{second_of.name}.k2_9zq0a.tmp"
    os.link(second_of, second)
    age(*leftovers, *foreign, link, second)
    size = sum(p.stat().st_size for p in leftovers)
    caplog.set_level(logging.INFO)
    writer = SnapshotWriter(folder, ".png")
    assert not any(p.exists() for p in leftovers) and not second.exists()
    assert second_of.read_bytes() == b"jpg" and second_of.stat().st_nlink == 1
    assert {p: p.read_bytes() for p in foreign} == foreign
    assert link.is_symlink() and stranger.read_text() == "someone's"
    assert {p: p.read_bytes() for p in camera.glob("*.png")} == kept
    said = [r.getMessage() for r in caplog.records if "unfinished" in r.getMessage()]
    removed = len(leftovers) + 1
    assert len(said) == 1 and f"removed {removed} unfinished snapshot file" in said[0], said
    assert f"({size} bytes)" in said[0] and str(folder) in said[0], said       # the second name frees nothing
    assert writer.health().ok
    caplog.clear()
    SnapshotWriter(folder, ".png")                     # nothing left: nothing said
    assert not [r for r in caplog.records if "unfinished" in r.getMessage()]


def test_a_staged_snapshot_its_writer_still_holds_is_kept_and_written(tmp_path):
    """Another run on the same folder, stopped mid-write: its staged file is old but held, so it is kept,
    and the snapshot is written when that run goes on."""
    folder = tmp_path / "snapshots"
    run, held = caught_mid_write(folder, signal.SIGSTOP, locked=True, writer=WRITER)
    try:
        age(*held)
        SnapshotWriter(folder, ".png")
        assert all(p.exists() for p in held)
        run.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(p.exists() for p in held):
            time.sleep(0.01)
        assert not any(p.exists() for p in held)
        assert all((p.parent / p.name[1:].rsplit(".", 2)[0]).exists() for p in held), held
    finally:
        run.kill()
        run.wait(10)
