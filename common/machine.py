"""The machine this process runs on: its CPU cores, and this process's share of them."""

from __future__ import annotations

import os


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cores_per_process() -> int:
    """This process's share of the cores: a launcher's processes on this machine (LOCAL_WORLD_SIZE,
    e.g. one per GPU) split them; at least one."""
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, cores() // local)
