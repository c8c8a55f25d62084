"""Freed big buffers go back to the operating system.

glibc serves a request of at least its mmap threshold with a fresh mapping and unmaps it when
it is freed, but it raises that threshold to the size of each mapped chunk freed (up to
32 MiB); from then on, buffers of that size come from the heap arenas, which seldom shrink.
A coordinator frees a fragment's worth of update and version buffers every round, and its
resident set crept up round after round. Fixing the threshold keeps them mapped.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD_BYTES = 1 << 20


def keep_big_buffers_mapped(threshold: int = THRESHOLD_BYTES) -> bool:
    """Whether the C allocator now maps every buffer of at least ``threshold`` bytes on its
    own (False off glibc: another allocator keeps its own policy)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
