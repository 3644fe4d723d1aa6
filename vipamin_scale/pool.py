"""Independent runs shared by worker processes: the demo's and the accuracy benchmark's.

    run_in_processes(fn, [args, ...], workers, on_done=None) -> [fn(*args), ...]   (in order)

Workers are spawned (no fork of a process holding torch threads or CUDA) with one torch thread
each (OMP_NUM_THREADS=1 in their environment; on a 2-core machine 2 such processes beat one with 2
threads). They exit on their own at the end, so their libraries clean up (no leaked semaphores); an
error in a job stops the pool (the other workers terminated) and is raised here, and a worker that dies
(SIGKILL, the kernel's out-of-memory killer) raises concurrent.futures' BrokenProcessPool here. `workers <= 1` runs the jobs in this process.
`on_done(i, result)` is called in this process as each job ends (in the order they end): a caller's
progress line, so no minutes pass in silence.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Iterator, Optional, Sequence

log = logging.getLogger(__name__)

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """These environment variables set for the block; each restored (or removed) after it."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _safely(report: Callable[[int, Any], None], i: int, result: Any) -> None:
    """`report(i, result)`; a failing report is a warning, never the pool's end."""
    try:
        report(i, result)
    except Exception as exc:
        log.warning("progress report failed: %s: %s", type(exc).__name__, exc)


def run_in_processes(fn: Callable[..., Any], jobs: Sequence[tuple], workers: int,
                     initializer: Optional[Callable[..., None]] = None, initargs: tuple = (),
                     on_done: Optional[Callable[[int, Any], None]] = None) -> list[Any]:
    """`fn(*args)` for every `args` in `jobs`, over `workers` processes; the results in job order.
    `initializer(*initargs)` runs once in each worker (in this process when it runs the jobs itself)."""
    report = on_done or (lambda i, result: None)
    if workers <= 1 or len(jobs) <= 1:
        if initializer is not None:
            initializer(*initargs)
        results = []
        for i, args in enumerate(jobs):
            results.append(fn(*args))
            report(i, results[-1])
        return results
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    results: list[Any] = [None] * len(jobs)
    with environ(**{k: "1" for k in THREAD_VARS}):
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=initializer,
                                   initargs=initargs)
        try:
            pending = {pool.submit(fn, *args): i for i, args in enumerate(jobs)}
            for done in as_completed(pending):
                i = pending[done]
                results[i] = done.result()  # a worker that died (SIGKILL, out of memory): BrokenProcessPool
                _safely(report, i, results[i])
        except BaseException:
            for proc in list((pool._processes or {}).values()):  # no public terminate before Python 3.14
                proc.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    return results


def worker_counter():
    """A counter the spawned workers of `run_in_processes` share (an initializer numbers them with it)."""
    import multiprocessing as mp

    return mp.get_context("spawn").Value("i", 0)
