"""What the kernel can say about and do for the page cache, for `materialize`: how many pages of a
file range are missing (cachestat(2)) and pre-faulting fresh host tensors (madvise). Neither is in
the standard library, so both go through ctypes; both are hints, and where the kernel lacks them
the reads work as they always did. `evict` drops a file's pages, for cold runs of bench and tests.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
from typing import Iterable, Optional

import torch

_MADV_POPULATE_WRITE = 23  # Linux 5.14+ (include/uapi/asm-generic/mman-common.h)
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
if _libc is not None:
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

_SYS_CACHESTAT = 451  # Linux 6.5+, one number on every architecture (include/uapi/asm-generic/unistd.h)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted",
                                                "nr_recently_evicted")]


def pages_missing(fd: int, offset: int, length: int) -> Optional[int]:
    """How many pages of bytes `offset .. offset + length` of `fd` are not in the page cache, by
    cachestat(2) (one range walk in the kernel, no mapping); None where the kernel cannot say: before
    6.5, or EPERM (newer kernels answer only a file's owner or a writer, like mincore)."""
    if _libc is None:
        return None
    page = mmap.PAGESIZE
    stat = _Cachestat()
    rng = _CachestatRange(offset, length)
    if _libc.syscall(ctypes.c_long(_SYS_CACHESTAT), ctypes.c_uint(fd), ctypes.byref(rng), ctypes.byref(stat),
                     ctypes.c_uint(0)):
        return None
    return max(0, (offset + length - 1) // page - offset // page + 1 - stat.nr_cache)


def prefault(tensors: Iterable[torch.Tensor]) -> int:
    """Fault in the pages of fresh host tensors with one madvise(MADV_POPULATE_WRITE) each, instead
    of one page fault per 4 KiB while the reads fill them: about a fifth of the CPU a page-cache
    read costs. Only a hint: where the kernel lacks it (before 5.14, not Linux), the reads fault
    the pages in as they always did. Returns the bytes populated."""
    if _libc is None:
        return 0
    page, done = mmap.PAGESIZE, 0
    for t in tensors:
        if t.device.type != "cpu":
            continue
        start = t.data_ptr()
        lo, hi = -(-start // page) * page, (start + t.numel() * t.element_size()) // page * page
        if hi - lo >= 16 * page and _libc.madvise(lo, hi - lo, _MADV_POPULATE_WRITE) == 0:
            done += hi - lo
    return done


def evict(path: str) -> None:
    """Write back and drop `path`'s pages from the page cache (POSIX_FADV_DONTNEED; dirty pages are
    not dropped, hence the fsync): a cold read without root, for bench and tests."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
