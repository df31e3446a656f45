"""Facts about the host this process runs on that every stage sizes its thread pools by."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs this process may run on (respects container CPU sets and taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
