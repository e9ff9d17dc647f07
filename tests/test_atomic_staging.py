"""atomic_open's staging files: one left by a crash or power cut (``.NAME.XXXXXXXX.tmp`` beside the
file) was kept for ever (a partial checkpoint on a small disk); the next write of that file removes it,
while a staging file still being written (fresh), another file's, or one not of mkstemp's form stays."""

import os
import time

from mrkd.atomic import STALE_STAGING_S, atomic_write_bytes


def test_the_next_write_removes_a_stale_staging_file_of_the_same_file_only(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    old = time.time() - STALE_STAGING_S - 60
    stale = tmp_path / ".model.onnx.k2j9_x0a.tmp"            # a power cut mid-write, two hours ago
    ahead = tmp_path / ".model.onnx.zz99aa11.tmp"            # dated ahead: the clock was wrong then
    fresh = tmp_path / ".model.onnx.abcdefgh.tmp"            # another writer at work right now
    other = tmp_path / ".model.onnx.json.a1b2c3d4.tmp"       # the sidecar's own staging file
    odd = tmp_path / ".model.onnx.mine.tmp"                  # not mkstemp's: someone's file
    for path in (stale, ahead, fresh, other, odd):
        path.write_bytes(b"partial")
    for path in (stale, other, odd):
        os.utime(path, (old, old))
    future = time.time() + STALE_STAGING_S + 60
    os.utime(ahead, (future, future))
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert not stale.exists() and not ahead.exists()
    assert fresh.exists() and other.exists() and odd.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".model.onnx.") and
                  p.name.count(".") == 4) == [fresh.name, odd.name]   # and nothing of the write itself left
