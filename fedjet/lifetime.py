"""This process's own figures for the report: how long it has lived (the denominator of every
idle figure) and its peak resident set.

The lifetime is read from the kernel (``/proc/self/stat``'s start time against
``/proc/uptime``) so that it covers the whole process, imports and start-up included, however it
was started; elsewhere, from the first import of this module.
"""

from __future__ import annotations

import os
import resource
import time

_IMPORTED = time.monotonic()


def process_lifetime_s() -> float:
    """Seconds since this process started."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            fields = stat.read().rsplit(")", 1)[1].split()
            started_ticks = int(fields[19])  # field 22 of stat(5), counted after the command name
            now_s = float(uptime.read().split()[0])
        return max(0.0, now_s - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


def peak_rss_mb() -> float:
    """This process's resident high-water mark in MiB. ``VmHWM`` starts afresh at exec, unlike
    ``ru_maxrss``, which a child inherits from the parent that started it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
