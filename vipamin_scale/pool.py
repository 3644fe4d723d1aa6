"""Independent runs shared by worker processes: the demo's and the accuracy benchmark's.

    run_in_processes(fn, [args, ...], workers) -> [fn(*args), ...]   (in order)

Workers are spawned (no fork of a process holding torch threads or CUDA) with one torch thread
each (OMP_NUM_THREADS=1 in their environment; on a 2-core machine 2 such processes beat one with 2
threads). They exit on their own at the end, so their libraries clean up (no leaked semaphores); an
error in a job stops the pool and is raised here. `workers <= 1` runs the jobs in this process.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional, Sequence

log = logging.getLogger(__name__)

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def run_in_processes(fn: Callable[..., Any], jobs: Sequence[tuple], workers: int,
                     initializer: Optional[Callable[[], None]] = None, progress: bool = False) -> list[Any]:
    """`fn(*args)` for every `args` in `jobs`, over `workers` processes; the results in job order."""
    if workers <= 1 or len(jobs) <= 1:
        if initializer is not None:
            initializer()
        return [fn(*args) for args in jobs]
    import multiprocessing as mp

    old = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update({k: "1" for k in THREAD_VARS})
    try:
        pool = mp.get_context("spawn").Pool(workers, initializer=initializer)
        try:
            pending = [pool.apply_async(fn, args) for args in jobs]
            results = []
            for i, p in enumerate(pending):
                results.append(p.get())
                if progress and (i + 1) % max(1, len(pending) // 10) == 0:
                    log.info("  %d / %d jobs done", i + 1, len(pending))
        except BaseException:
            pool.terminate()
            raise
        pool.close()
        pool.join()
        return results
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
