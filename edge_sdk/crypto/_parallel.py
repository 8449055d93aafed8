"""Worker processes for big-integer work (gmpy2 keeps the GIL, so threads do not help)."""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

__all__ = ["default_workers", "mulmod_loop", "process_executor"]


def default_workers() -> int:
    """Number of usable cores (CPU affinity aware)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - non-Linux
        return max(os.cpu_count() or 1, 1)


def process_executor(workers: int, *, prestart: bool = False) -> ProcessPoolExecutor:
    """A process pool safe to start from a multi-threaded service.

    ``forkserver`` (where available) avoids forking a process that holds
    other threads' locks (paho's network thread, logging).

    Args:
        workers: pool size.
        prestart: start every worker now. ProcessPoolExecutor otherwise
            starts a worker only when no idle one exists, so a pool warmed
            with small jobs may still fork its second worker in the middle
            of the first large sum.
    """
    methods = multiprocessing.get_all_start_methods()
    method = "forkserver" if "forkserver" in methods else "spawn"
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))
    if prestart:
        # Each task holds its worker briefly, so every worker must be started.
        list(pool.map(time.sleep, [0.05] * workers))
    return pool


def mulmod_loop(args: tuple[int, int, int]) -> float:
    """Worker job for calibration: ``count`` bare mulmods; returns seconds taken.

    Benchmarks run it in 1 and 2 processes to measure how pure big-integer
    compute scales on the machine (no data transfer, no parsing).
    """
    import gmpy2

    value, modulus, count = args
    a = x = gmpy2.mpz(value)
    m = gmpy2.mpz(modulus)
    started = time.perf_counter()
    for _ in range(count):
        a = a * x % m
    return time.perf_counter() - started
