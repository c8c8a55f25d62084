"""Freed big buffers go back to the operating system.

The coordinator (:func:`keep_big_buffers_mapped`): glibc serves a request of at least its mmap
threshold with a fresh mapping and unmaps it when it is freed, but it raises that threshold to
the size of each mapped chunk freed (up to 32 MiB); from then on, buffers of that size come
from the heap arenas, which seldom shrink. A coordinator frees a fragment's worth of update and
version buffers every round, and its resident set crept up round after round. Fixing the threshold keeps them mapped.

A worker (:func:`return_freed_heap`) must not fix it: every training step allocates and frees
activations of megabytes, and with a fixed threshold each is a fresh mapping whose pages fault
in again at every step (a 2-rank worker of the tiny model trained 7-20 % slower). It trims the
heap once a round instead, when a version's and an update's buffers have been freed.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD_BYTES = 1 << 20


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def keep_big_buffers_mapped(threshold: int = THRESHOLD_BYTES) -> bool:
    """Whether the C allocator now maps every buffer of at least ``threshold`` bytes on its
    own (False off glibc: another allocator keeps its own policy)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))


def return_freed_heap() -> bool:
    """Give the heap's free pages back to the operating system (glibc ``malloc_trim``); whether
    any were (False off glibc)."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
