"""The CPU cores this process may run on: what every thread and worker pool is sized by."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on, which in a container pinned to a cpuset are fewer than the machine has
    (``os.cpu_count()`` counts the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
