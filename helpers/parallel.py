"""Independent jobs (one category, one condition, one sweep value) on several CPU cores.

Most of a CPU run is single-threaded: PatchCore's search and coreset and PaDiM's Gaussian fit run on one
thread by design (see ``threads``), and the metrics sort with numpy. On the 2-core machines the default
profile targets, a run used 1.35 cores on average; two worker processes of one thread each keep both busy.
The backbone loses nothing: two one-thread convolutions do the work of one two-thread one.

Jobs are spawned processes (never forked: torch's thread pools do not survive a fork), so a job is a
module-level function and its arguments must pickle. Results come back in the order of the jobs, whatever
order they finish in, so a table never depends on the number of workers. ``workers=1`` runs everything in
this process, which is what tests and debuggers want. Workers live on between calls (until the process
exits), so a notebook pays their start-up once; jobs must therefore not rely on state left by earlier jobs.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed, wait
from typing import Callable, Sequence


def resolve_workers(workers: int | None) -> int:
    """``workers`` as a count: 0 or None means one per CPU core this process may use."""
    if workers is None or int(workers) == 0:
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if int(workers) < 0:
        raise ValueError(f"workers must be 0 (one per core) or a positive count, got {workers}")
    return int(workers)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


_pool: tuple[tuple, ProcessPoolExecutor] | None = None


def _executor(n: int, threads: int) -> ProcessPoolExecutor:
    """One pool per process, kept between calls: starting workers (torch, anomalib imports) costs seconds.
    A pool is replaced when the worker count, thread count or environment (e.g. STUDY_CACHE) changes."""
    global _pool
    key = (n, threads, hash(frozenset(os.environ.items())))
    if _pool is not None and (_pool[0] != key or getattr(_pool[1], "_broken", False)):
        _pool[1].shutdown(wait=True, cancel_futures=True)
        _pool = None
    if _pool is None:
        context = multiprocessing.get_context("spawn")
        _pool = key, ProcessPoolExecutor(n, mp_context=context, initializer=_init_worker, initargs=(threads,))
    return _pool[1]


def run_jobs(fn: Callable, jobs: Sequence[tuple], execution=1, desc: str | None = None,
             progress: bool = True) -> list:
    """``[fn(*job) for job in jobs]``, spread over worker processes. ``execution`` is the configuration's
    execution section (or a plain worker count): ``workers`` processes, 0 for one per core."""
    from tqdm.auto import tqdm

    workers = getattr(execution, "workers", execution)
    n = min(resolve_workers(workers), len(jobs))
    if n <= 1:
        return [fn(*job) for job in tqdm(jobs, desc=desc, disable=not progress)]
    # Cores shared out between the workers; a GPU run should use workers=1 (one CUDA context).
    pool = _executor(n, max(1, resolve_workers(0) // n))
    results: list = [None] * len(jobs)
    futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
    try:
        for future in tqdm(as_completed(futures), total=len(jobs), desc=desc, disable=not progress):
            results[futures[future]] = future.result()  # re-raises a job's exception here
    except BaseException:
        for future in futures:  # a failed job stops the queue, not only the loop
            future.cancel()
        wait(list(futures))
        raise
    return results
