"""The heap's freed pages go back to the system when a worker trims between rounds."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")


def test_trim_returns_pages_freed_below_a_live_chunk() -> None:
    # run apart: the freed chunks must be this process's only heap churn
    script = textwrap.dedent(
        """
        from fedjet.malloc import return_freed_heap

        def rss_mb():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096 / 2**20

        chunks = [bytearray(64 * 1024) for _ in range(3000)]  # ~190 MB from the heap, below mmap's threshold
        last = chunks[-1]  # pins the heap's top: free() alone cannot shrink it
        del chunks
        before = rss_mb()
        trimmed = return_freed_heap()
        print(trimmed, before, rss_mb(), len(last))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    trimmed, before, after = out[0], float(out[1]), float(out[2])
    assert trimmed == "True"
    assert before - after > 100, f"RSS {before:.0f} MB before the trim, {after:.0f} MB after"
