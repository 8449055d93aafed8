"""Worker processes for big-integer work (gmpy2 keeps the GIL, so threads do not help)."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

__all__ = ["default_workers", "process_executor"]


def default_workers() -> int:
    """Number of usable cores (CPU affinity aware)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - non-Linux
        return max(os.cpu_count() or 1, 1)


def process_executor(workers: int) -> ProcessPoolExecutor:
    """A process pool safe to start from a multi-threaded service.

    ``forkserver`` (where available) avoids forking a process that holds
    other threads' locks (paho's network thread, logging).
    """
    methods = multiprocessing.get_all_start_methods()
    method = "forkserver" if "forkserver" in methods else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))
