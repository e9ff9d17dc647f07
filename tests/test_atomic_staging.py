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


def test_a_stop_landing_as_the_staging_file_is_made_leaves_no_file(tmp_path, monkeypatch):
    """Ctrl-C right after the staging file came into being, before its name was handed back (mkstemp's
    window: the name was learnt only from its return): nothing is left, the target is untouched."""
    import pytest
    from mrkd.atomic import atomic_open
    target = tmp_path / "labels.jsonl"
    target.write_bytes(b"old")
    real_open = os.open

    def open_then_stop(name, flags, *args, **kwargs):
        fd = real_open(name, flags, *args, **kwargs)
        if str(name).endswith(".tmp"):
            os.close(fd)
            raise KeyboardInterrupt       # as a signal handler raises it, between the call and its result's use
        return fd
    monkeypatch.setattr(os, "open", open_then_stop)
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(target, "wb") as handle:
            handle.write(b"new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.jsonl"] and target.read_bytes() == b"old"
