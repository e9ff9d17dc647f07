"""mrkd.train.allocator: "keep" really stops glibc from mmapping large blocks; bad names are refused.

The check runs in a child process (the setting is process-wide) and reads glibc's own account of
its mmapped memory (mallinfo2().hblkhd) around one 64 MiB malloc: with the default allocator the
block is mmapped (which also shows the measurement can see it), after keep_freed_memory() it is not.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from mrkd.train.allocator import apply_allocator
from mrkd.train.trainer import TrainConfig

CHILD = textwrap.dedent("""
    import ctypes, sys
    from mrkd.train.allocator import keep_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        print("no-mallinfo2"); sys.exit(0)
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    def mmapped_growth():
        before = libc.mallinfo2().hblkhd
        block = libc.malloc(64 << 20)
        grown = libc.mallinfo2().hblkhd - before
        libc.free(block)
        return grown

    default = mmapped_growth()
    setting = keep_freed_memory()
    print(default, mmapped_growth(), int(setting.applied))
""")


def test_keep_stops_mmap_of_large_blocks():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only (mrkd.train.allocator leaves other C libraries alone)")
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "no-mallinfo2":
        pytest.skip("this glibc has no mallinfo2 (older than 2.33): nothing to measure the setting with")
    default, kept, applied = (int(v) for v in out.stdout.split())
    assert applied == 1
    assert default >= 64 << 20          # the default allocator mmaps a 64 MiB block
    assert kept == 0                    # after keep_freed_memory(), the heap serves it


def test_bad_allocator_names_are_refused():
    with pytest.raises(ValueError, match="allocator"):
        apply_allocator("jemalloc")
    with pytest.raises(ValueError, match="allocator"):
        TrainConfig(allocator="fast")
    assert apply_allocator("system").requested == "system"
