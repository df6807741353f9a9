"""Run independent jobs side by side in worker processes (run.workers), each on its own share of the CPU threads.

A run's modules are independent of each other, as are local mode's experts: in a federation each site trains its
own on its own machine. On one machine, two processes of one torch thread each train small networks faster than
one process of two threads (the layers are too small to keep two threads busy), so the in-process rehearsal of a
federation runs them side by side. Results do not depend on the number of workers or on which worker ran a job;
they do depend on the threads each job ran with (CPU kernels split reductions by thread), and that is fixed by the
config: job_threads.
"""

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import TypeVar

import torch

from fedfactory.config import ConfigError
from fedfactory.device import select_device

J = TypeVar("J")
R = TypeVar("R")


def job_threads(workers: int) -> int:
    """Torch threads each job runs with: this process's threads (select_device) split evenly among the workers."""
    return max(1, torch.get_num_threads() // workers)


def run_jobs(fn: Callable[[J], R], jobs: Iterable[J], workers: int, device: torch.device,
             cost: Callable[[J], float] | None = None, in_order: bool = True) -> Iterator[R]:
    """fn(job) for each job, yielded in the order of `jobs`, or as they finish where in_order is False (a caller
    that writes each result at once keeps every finished one if the run is stopped).

    workers=1 runs them here, one after another. workers > 1 runs them in that many spawned processes of
    job_threads(workers) torch threads each (fn must be a module-level function; jobs and results are pickled),
    starting the costliest first (`cost`) so that no worker is left with a long job at the end. Spawned, not forked:
    a fork copies torch's thread pools in whatever state they are.
    """
    jobs = list(jobs)
    if workers < 1:
        raise ConfigError(f"run.workers={workers}: must be an integer >= 1")
    if workers > 1 and device.type != "cpu":
        raise ConfigError(f"run.workers={workers} runs jobs in CPU processes, but the device is {device.type}: "
                          "set run.workers=1 (one process drives the accelerator)")
    if workers == 1:
        yield from map(fn, jobs)
        return
    if len(jobs) < 2:
        # A lone job runs here, with a worker's threads: the same bits as beside other jobs.
        with torch_threads(job_threads(workers)):
            yield from map(fn, jobs)
        return
    order = sorted(range(len(jobs)), key=lambda i: -cost(jobs[i])) if cost else range(len(jobs))
    context = multiprocessing.get_context("spawn")
    # Each worker starts as select_device starts the main process: fixed threads, deterministic kernels.
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=select_device,
                             initargs=("cpu", job_threads(workers))) as pool:
        futures = {i: pool.submit(fn, jobs[i]) for i in order}
        try:
            for future in [futures[i] for i in range(len(jobs))] if in_order else as_completed(futures.values()):
                yield future.result()
        except BrokenProcessPool as e:
            raise RuntimeError(f"a worker process died before its job finished (killed, or out of memory): run "
                               f"with fewer run.workers than {workers}, or run.workers=1") from e
        finally:
            # A job that failed (or a caller that stopped) leaves the jobs not yet started unstarted; the running
            # ones finish before the pool closes.
            for future in futures.values():
                future.cancel()


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Torch runs with `threads` threads inside the block, and with what it had before after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
