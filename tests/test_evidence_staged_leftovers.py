"""An evidence file is written to a hidden staged file, fsynced, then linked to its name (snapshots.
write_new_file). A run killed mid-write left the staged file behind for good: never counted, never
removed (and one killed between the link and the unlink left the evidence with a second name, which the
page refuses to serve). The store removes, when it starts, the staged files it can prove are an earlier
run's own: its own staged name in its own places, no writer holding it; every other file is kept."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mrkd.runtime.outputs.evidence import EvidenceSettings, EvidenceWriter

# A line writing big alarm evidence as fast as it can (a PNG of noise: ~9 MB, the write and fsync take a while).
WRITER = """
import sys
import numpy as np
from mrkd.runtime.outputs.base import FrameResult
from mrkd.runtime.outputs.events import new_event_id
from mrkd.runtime.outputs.evidence import EvidenceSettings, EvidenceWriter
writer = EvidenceWriter(EvidenceSettings(sys.argv[1], max_bytes=1 << 40))
image = np.random.default_rng(0).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
print("ready", flush=True)
while True:
    writer.event_fields(FrameResult("cam0", 0, 0.0, image, np.zeros((8, 8), np.float32), 1.0, 0.5, True,
                                    event={"event_id": new_event_id()}))
"""

LONG_AGO = 120.0          # seconds: the staged files are aged as a start two minutes later finds them


def staged(folder: Path):
    return sorted(p for p in folder.rglob(".*.tmp") if p.is_file())


def caught_mid_write(folder: Path, sig: int, locked: bool = False, writer: str = WRITER):
    """Start ``writer`` (a script that prints "ready", then writes into the folder it is given) and send
    it ``sig`` while a staged file exists (``locked``: and its writer holds it); the process and the
    staged files then on disk. Tried a few times: the file may be gone by the time the signal lands."""
    for _ in range(6):
        run = subprocess.Popen([sys.executable, "-c", writer, str(folder)], stdout=subprocess.PIPE, text=True)
        assert run.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not staged(folder):
            time.sleep(0.0005)
        run.send_signal(sig)
        if sig == signal.SIGKILL:
            run.wait(10)
        else:
            time.sleep(0.2)
        found = staged(folder)
        if found and (not locked or all(held_by_another(p) for p in found)):
            return run, found
        if sig != signal.SIGKILL:
            run.kill()
            run.wait(10)
        for path in found:
            path.unlink()
    pytest.fail("never caught the writer mid-write")


def held_by_another(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def age(*paths: Path) -> None:
    then = time.time() - LONG_AGO
    for path in paths:
        os.utime(path, (then, then), follow_symlinks=False)


def test_a_write_killed_mid_way_leaves_a_staged_file_the_next_start_removes(tmp_path, caplog):
    folder = tmp_path / "evidence"
    _, leftovers = caught_mid_write(folder, signal.SIGKILL)
    camera = folder / "cam0"
    assert [p.parent for p in leftovers] == [camera] and leftovers[0].name.endswith(".tmp"), leftovers
    kept = {p: p.read_bytes() for p in camera.glob("*.png")}     # whole evidence of the killed run
    stranger = tmp_path / "stranger.txt"
    stranger.write_text("someone's")
    foreign = {        # hidden files that are not (provably) this store's staged files
        camera / ".notes.txt": b"n", camera / ".DS_Store": b"d",
        camera / ".e1.png.abcdefgh.tmp": b"not an event id of ours",
        camera / ".20261207T031408.200Z-89f5ca92.png.tmp": b"no random part",
        folder / ".20261207T031408.200Z-89f5ca92.png.hrx3ywld.tmp": b"not in a camera's folder",
        camera / "deeper" / ".20261207T031408.200Z-89f5ca92.png.hrx3ywld.tmp": b"below a camera's folder",
        camera / "ok" / ".img_1.png.hrx3ywld.tmp": b"not an ok sample's name",
    }
    for path, data in foreign.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    link = camera / ".20261207T031408.201Z-89f5ca93.png.abcdefgh.tmp"
    link.symlink_to(stranger)                          # our name, but a link to a file elsewhere
    age(*leftovers, *foreign, link)
    size = sum(p.stat().st_size for p in leftovers)
    caplog.set_level(logging.INFO)
    writer = EvidenceWriter(EvidenceSettings(str(folder)))
    assert not any(p.exists() for p in leftovers)
    assert {p: p.read_bytes() for p in foreign} == foreign
    assert link.is_symlink() and stranger.read_text() == "someone's"
    assert {p: p.read_bytes() for p in camera.glob("*.png")} == kept
    said = [r.getMessage() for r in caplog.records if "unfinished" in r.getMessage()]
    assert len(said) == 1 and f"removed {len(leftovers)} unfinished evidence file" in said[0], said
    assert f"({size} bytes)" in said[0] and str(folder) in said[0], said
    assert writer.health().ok
    caplog.clear()
    EvidenceWriter(EvidenceSettings(str(folder)))          # nothing left: nothing said
    assert not [r for r in caplog.records if "unfinished" in r.getMessage()]


def test_a_kill_between_link_and_unlink_leaves_a_second_name_that_goes(tmp_path):
    """The evidence was linked to its name, the staged name not yet removed: the file has two names (the
    page refuses a file with two) until the next start removes the staged one; the evidence stays."""
    camera = tmp_path / "cam0"
    camera.mkdir()
    evidence = camera / "20261207T031408.200Z-89f5ca92.png"
    evidence.write_bytes(b"png")
    second = camera / f".{evidence.name}.k2_9zq0a.tmp"
    os.link(evidence, second)
    ok_sample = camera / "ok" / "part0000000007_41_3.raw.png"
    ok_sample.parent.mkdir()
    ok_sample.write_bytes(b"raw")
    ok_second = ok_sample.with_name(f".{ok_sample.name}.abcdefgh.tmp")
    os.link(ok_sample, ok_second)
    age(second, ok_second)
    EvidenceWriter(EvidenceSettings(str(tmp_path)))
    assert not second.exists() and not ok_second.exists()
    assert evidence.read_bytes() == b"png" and evidence.stat().st_nlink == 1
    assert ok_sample.read_bytes() == b"raw" and ok_sample.stat().st_nlink == 1


def test_a_staged_file_its_writer_still_holds_is_kept_and_written(tmp_path):
    """Another run on the same folder, stopped mid-write (a stalled disk): its staged file is old but
    held, so it is kept, and the write completes when that run goes on. A fresh staged file no one
    holds is kept too (its writer may have just created it)."""
    folder = tmp_path / "evidence"
    run, held = caught_mid_write(folder, signal.SIGSTOP, locked=True)
    try:
        age(*held)
        fresh = folder / "cam0" / ".20261207T031408.200Z-89f5ca92.png.abcdefgh.tmp"
        fresh.write_bytes(b"just created")
        EvidenceWriter(EvidenceSettings(str(folder)))
        assert all(p.exists() for p in held) and fresh.exists()
        written = set(folder.rglob("*.png"))
        run.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(p.exists() for p in held):
            time.sleep(0.01)
        assert not any(p.exists() for p in held)                         # linked into place and unlinked
        new = set(folder.rglob("*.png")) - written
        assert any(p.name == h.name[1:].rsplit(".", 2)[0] for h in held for p in new), (held, new)
    finally:
        run.kill()
        run.wait(10)

