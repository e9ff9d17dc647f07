"""The C library's allocator setting for CPU training: keep freed memory for reuse.

PyTorch's CPU tensors come straight from ``malloc``. glibc serves every block above its mmap
threshold (dynamic, at most 32 MiB on 64-bit) with a fresh ``mmap`` and unmaps it on ``free``; a
training step at 256 px allocates and frees dozens of such activation and gradient blocks, so the
kernel zero-fills their pages again on every step. Measured on the 2-core CI machine (Lite0, 256 px,
batch 16): 8.5 s of the process's 27 s CPU time was system time, and the fast training step went
from 32 to 38.7 images/s with mmap off and no trimming (benchmarks/RESULTS.md, "Training speed").
The price is peak memory held by the process (+18 % there): freed blocks stay in the heap.

``mallopt`` is process-wide, so ``mrkd.train.trainer.train`` applies it when its config asks
(``allocator="keep"``, the default) and ``mrkd.benchmarks.bench_train`` runs each variant in a
process of its own. Other C libraries (musl, macOS) are left alone: :func:`keep_freed_memory`
returns why.
"""

from __future__ import annotations

from mrkd.errors import SettingError

import ctypes
import ctypes.util
import sys
from dataclasses import dataclass

ALLOCATORS = ("keep", "system")

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_TRIM_THRESHOLD = 2 ** 31 - 1   # an int: mallopt's largest value; heap tops below it are kept


@dataclass(frozen=True)
class AllocatorSetting:
    """What :func:`apply_allocator` did, for the run's summary."""

    requested: str          # "keep" | "system"
    applied: bool           # the setting is in force in this process
    reason: str


_APPLIED = False


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()     # glibc only: musl has no such symbol
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> AllocatorSetting:
    """glibc: no mmap for large blocks and no heap trimming, from now on in this process."""
    global _APPLIED
    if _APPLIED:
        return AllocatorSetting("keep", True, "already set in this process")
    libc = _glibc()
    if libc is None:
        return AllocatorSetting("keep", False, "not glibc: the C library's allocator is left as it is")
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD) == 1
    _APPLIED = ok
    return AllocatorSetting("keep", ok, "glibc mallopt: M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1" if ok
                            else "glibc refused mallopt; the allocator is left as it is")


def apply_allocator(name: str) -> AllocatorSetting:
    """``"keep"``: :func:`keep_freed_memory`; ``"system"``: change nothing."""
    if name not in ALLOCATORS:
        raise SettingError(f"allocator must be one of {ALLOCATORS}, got {name!r}")
    if name == "system":
        return AllocatorSetting("system", not _APPLIED,
                                "the C library's default" if not _APPLIED
                                else "'keep' was set earlier in this process and stays (mallopt is process-wide)")
    return keep_freed_memory()
