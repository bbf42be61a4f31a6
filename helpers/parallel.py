"""Independent jobs (one category, one condition, one sweep value) on several CPU cores, or on a Dask cluster,
with an optional on-disk cache of finished jobs so that a killed run loses nothing it had finished.

Most of a CPU run is single-threaded: PatchCore's search and coreset and PaDiM's Gaussian fit run on one
thread by design (see ``threads``), and the metrics sort with numpy; one worker process of one thread per
core keeps every core busy. The backbone loses nothing: two one-thread convolutions do the work of one
two-thread one.

Two engines (``execution.engine``): ``local`` runs spawned processes (never forked: torch's thread pools do not
survive a fork); ``dask`` hands the same jobs to ``distributed`` (a scheduler at ``execution.scheduler``, or a
``LocalCluster`` of this machine). Either way a job is a module-level function whose arguments pickle, results
come back in the order of the jobs, whatever order they finish in, so a table never depends on the engine or
the number of workers, and a failed job raises :class:`JobFailed`, naming the job. ``workers=1`` on the local
engine runs everything in this process, which is what tests and debuggers want. Workers (and the Dask cluster)
live on between calls until the process exits, so a notebook pays their start-up once; jobs must therefore not
rely on state left by earlier jobs.

Each call can leave one JSON line of timings (:func:`record_batch`): the runner sets ``STUDY_JOB_TIMES`` to a file of
the step it runs, and ``helpers.plan`` reads those lines to estimate what another profile will take.

``memo=True`` keeps each finished job's result under ``CACHE/jobs``, keyed by the function, its arguments (the
run's execution settings left out) and the code of ``helpers``/``data_prep``; a re-run computes only the jobs
that have no entry. Only jobs that return their product belong there: a job whose product is a file (a fitted
model, a generated dataset) would be skipped even after that file was deleted.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed, wait
from pathlib import Path, PurePath
from typing import Any, Callable, Sequence

from helpers.paths import CACHE, atomic_write

log = logging.getLogger(__name__)

# Libraries whose version can change a number in a table: part of every job-cache key.
NUMERIC_LIBRARIES = ("numpy", "pandas", "scipy", "scikit-learn", "scikit-image", "torch", "torchvision", "timm",
                     "anomalib", "faiss-cpu", "pillow")


class JobFailed(RuntimeError):
    """A job raised; the message names the job, and the job's own exception is chained as ``__cause__``."""

    def __init__(self, message: str, index: int, job: tuple):
        super().__init__(message)
        self.index = index
        self.job = job


def resolve_workers(workers: int | None) -> int:
    """``workers`` as a count: 0 or None means one per CPU core this process may use."""
    if workers is None or int(workers) == 0:
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if int(workers) < 0:
        raise ValueError(f"workers must be 0 (one per core) or a positive count, got {workers}")
    return int(workers)


def _init_worker(threads: int) -> None:
    import signal

    import torch

    torch.set_num_threads(threads)
    # Ctrl-C (or a notebook kernel shutting down) reaches the whole process group; the parent stops the pool,
    # so a worker ignores it instead of printing a KeyboardInterrupt traceback from its queue wait.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()


def _exit_with_parent(interval_s: float = 2.0) -> None:
    """End this worker when the process that started it is gone (killed, say), instead of computing on as an
    orphan: a killed run must not leave workers busy on the machine's cores."""
    import os
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


# --- timings of each call -----------------------------------------------------------------------------------

JOB_TIMES_ENV = "STUDY_JOB_TIMES"  # file run_jobs appends one JSON line per call to (the runner sets it per step)
STEP_ENV = "STUDY_STEP"  # the runner's step name, written into each line
job_times_file: Path | None = None  # a module setting that takes the place of the variable (tests, scripts)


def _timed(fn: Callable, *job) -> tuple[float, Any]:
    """``(seconds, fn(*job))``: a job timed where it runs, so queueing and transfer are not counted."""
    start = time.perf_counter()
    value = fn(*job)
    return time.perf_counter() - start, value


def record_batch(fn: Callable, desc: str | None, jobs: int, ran: int, workers: int, engine: str, wall_s: float,
                 job_seconds: Sequence[float]) -> Path | None:
    """Append one line to the timings file (``job_times_file``, else ``$STUDY_JOB_TIMES``, else nowhere): the function,
    its ``desc``, how many jobs it had and ran (the others came from the job cache), on how many workers, the wall
    seconds of the call and the sum and maximum of the seconds each job ran. A call made inside a worker (a job that
    runs jobs itself) is not recorded: its seconds are already its job's."""
    target = job_times_file or os.environ.get(JOB_TIMES_ENV)
    if not target or multiprocessing.parent_process() is not None:
        return None
    line = {"step": os.environ.get(STEP_ENV), "function": f"{fn.__module__}.{fn.__qualname__}", "desc": desc,
            "jobs": int(jobs), "ran": int(ran), "workers": int(workers), "engine": engine,
            "wall_s": round(float(wall_s), 4), "job_s": round(float(sum(job_seconds)), 4),
            "job_max_s": round(float(max(job_seconds, default=0.0)), 4)}
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # one short line per write: appends from one process at a time never interleave
        f.write(json.dumps(line) + "\n")
    return path


# --- naming a job --------------------------------------------------------------------------------------------


def _brief(value: Any, depth: int = 0) -> str:
    """A few words for one argument: scalars as they are, a dataclass by its scalar fields, long lists cut."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return str(value)
    if isinstance(value, PurePath):
        return value.name or str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if type(value).__str__ is not object.__str__:  # the class says how it reads (e.g. a Condition)
            return str(value)
        if isinstance(getattr(value, "name", None), str):  # it names itself (e.g. a Run: smoke-1a2b3c4d)
            return value.name
        fields = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
        return " ".join(f"{k}={v}" for k, v in fields if isinstance(v, (str, int, float, bool)))
    if isinstance(value, dict):
        return " ".join(f"{k}={_brief(v, depth + 1)}" for k, v in value.items())
    if isinstance(value, (list, tuple)) and depth == 0:
        shown = [_brief(v, depth + 1) for v in value[:3]]
        return "[" + ", ".join(shown) + (f", +{len(value) - 3}" if len(value) > 3 else "") + "]"
    if isinstance(value, (list, tuple)):
        return f"[{len(value)} items]"
    return type(value).__name__


def describe_job(fn: Callable, job: Sequence, limit: int = 200) -> str:
    """``_evaluate_job: method=patchcore seed=1 ... | hazelnut | [clean]``: enough to find the job again."""
    text = f"{getattr(fn, '__name__', fn)}: " + " | ".join(_brief(arg) for arg in job)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _failure(fn: Callable, jobs: Sequence, index: int, exc: BaseException) -> JobFailed:
    message = f"job {index + 1} of {len(jobs)} ({describe_job(fn, jobs[index])}) failed: {type(exc).__name__}: {exc}"
    return JobFailed(message, index, tuple(jobs[index]))


# --- the job cache -------------------------------------------------------------------------------------------


def _canonical(value: Any) -> Any:
    """A JSON-able, order-stable form of a job argument for the cache key. Types it cannot read faithfully are
    refused, never approximated: a lossy key could return another job's result."""
    from helpers.config import UNHASHED, ExecutionConfig, StudyConfig

    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return {"float": repr(value)}  # repr round-trips; JSON would turn nan/inf into non-standard tokens
    if isinstance(value, PurePath):
        return {"path": str(value)}
    if isinstance(value, enum.Enum):
        return {"enum": f"{type(value).__qualname__}.{value.name}"}
    if isinstance(value, ExecutionConfig):
        return None  # how a job runs never changes what it computes (as for the run's hash)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        skip = UNHASHED if isinstance(value, StudyConfig) else ()
        return {"type": f"{type(value).__module__}.{type(value).__qualname__}",
                "fields": {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)
                           if f.name not in skip}}
    if isinstance(value, dict):
        items = [[_canonical(k), _canonical(v)] for k, v in value.items()]
        return {"dict": sorted(items, key=lambda kv: json.dumps(kv[0], sort_keys=True))}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_canonical(v) for v in value]}
    if isinstance(value, (set, frozenset)):
        return {"set": sorted((_canonical(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))}
    if type(value).__module__ == "numpy":
        import numpy as np

        array = np.asarray(value)
        return {"array": [str(array.dtype), list(array.shape), hashlib.sha256(array.tobytes()).hexdigest()]}
    raise TypeError(f"the job cache cannot key an argument of type {type(value).__qualname__}; "
                    f"run these jobs with memo=False")


@functools.lru_cache(maxsize=1)
def _library_versions() -> dict[str, str | None]:
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"python": ".".join(map(str, sys.version_info[:3])), **{n: version(n) for n in NUMERIC_LIBRARIES}}


def _code_digest() -> str:
    from helpers.study import code_digest

    return code_digest()


def job_key(fn: Callable, job: Sequence, code: str | None = None) -> str:
    """The cache key of one job: its function, its arguments, the package code and the numeric libraries."""
    body = {"function": f"{fn.__module__}.{fn.__qualname__}", "arguments": _canonical(list(job)),
            "code": code if code is not None else _code_digest(), "libraries": _library_versions()}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def job_cache_path(fn: Callable, key: str, cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or CACHE / "jobs") / f"{fn.__module__}.{fn.__qualname__}" / f"{key}.pkl"


# Pickle: results are pandas tables or tuples of them, which pickle restores exactly (dtypes, NaN, column order)
# where CSV would not. The files are written by this program into its own cache folder; whoever can write there
# can as well edit helpers/, so unpickling them trusts no one new. A file that does not load (truncated, written
# by another pandas) is deleted and its job recomputed.


def _load(path: Path, key: str) -> tuple[bool, Any]:
    if not path.is_file():
        return False, None
    try:
        with open(path, "rb") as f:
            stored_key, result = pickle.load(f)
        if stored_key != key:
            raise ValueError(f"holds the result of another key ({stored_key[:12]})")
        return True, result
    except Exception as exc:  # noqa: BLE001 - an unreadable entry is recomputed, never trusted
        log.warning("job cache entry %s cannot be read (%s: %s): recomputing it", path, type(exc).__name__, exc)
        path.unlink(missing_ok=True)
        return False, None


def _save(path: Path, key: str, result: Any) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            pickle.dump((key, result), f, protocol=pickle.HIGHEST_PROTOCOL)

    atomic_write(path, write)


# --- engines -------------------------------------------------------------------------------------------------

_pool: tuple[tuple, ProcessPoolExecutor] | None = None

# What distributed's nanny writes into this process's environment when it starts a LocalCluster's worker
# (one-thread BLAS, a fixed hash seed, its own pid): not a change of ours, so it restarts no pool or cluster.
_SET_BY_DASK = {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_",
                "PYTHONHASHSEED", "__DASK_PARENT_PID"}
# Read by this process only (where its timings go), never by a worker: no reason to restart one.
_NOT_FOR_WORKERS = {JOB_TIMES_ENV, STEP_ENV}


def _environment_key() -> int:
    """The environment spawned workers inherit (STUDY_CACHE and the like), as part of what a pool is made for."""
    return hash(frozenset((k, v) for k, v in os.environ.items() if k not in _SET_BY_DASK | _NOT_FOR_WORKERS))


def _executor(n: int, threads: int) -> ProcessPoolExecutor:
    """One pool per process, kept between calls: starting workers (torch, anomalib imports) costs seconds.
    A pool is replaced when the worker count, thread count or environment (e.g. STUDY_CACHE) changes."""
    global _pool
    key = (n, threads, _environment_key())
    if _pool is not None and (_pool[0] != key or getattr(_pool[1], "_broken", False)):
        _pool[1].shutdown(wait=True, cancel_futures=True)
        _pool = None
    if _pool is None:
        context = multiprocessing.get_context("spawn")
        _pool = key, ProcessPoolExecutor(n, mp_context=context, initializer=_init_worker, initargs=(threads,))
    return _pool[1]


_dask: tuple[tuple, Any, Any] | None = None  # (what it was made for, client, its LocalCluster or None)


def dashboard(client) -> str | None:
    """The Dask dashboard's address, or None when the scheduler serves none (bokeh not installed there)."""
    try:
        versions = client.get_versions(packages=["bokeh"])["scheduler"]["packages"]
        if "dashboard" not in client.scheduler_info().get("services", {}) or not versions.get("bokeh"):
            return None
        return client.dashboard_link
    except Exception:  # noqa: BLE001 - a scheduler that cannot say is treated as having none
        return None


def _software() -> tuple[str, dict]:
    return _code_digest(), _library_versions()


def _check_workers(client, scheduler: str) -> None:
    """Refuse a cluster whose workers run other code or other numeric libraries than this process: they would
    compute other numbers, and the job cache would file them under this process's code."""
    try:
        theirs = client.run(_software)
    except Exception as exc:
        raise RuntimeError(f"the workers of {scheduler} cannot run the study's code ({type(exc).__name__}: {exc}); "
                           f"start them from the repository root, with it on PYTHONPATH") from exc
    mine = _software()
    other = sorted(address for address, software in theirs.items() if tuple(software) != mine)
    if other:
        raise RuntimeError(f"{len(other)} of the {len(theirs)} workers of {scheduler} ({', '.join(other[:3])}) run "
                           f"other helpers/data_prep code or other library versions than this process; start "
                           f"every worker from the same repository and environment")


def dask_client(execution) -> Any:
    """The ``distributed.Client`` of this process for an execution setting, kept between calls: connected to
    ``execution.scheduler``, or to a ``LocalCluster`` of ``workers`` processes (one per core for 0) of one
    thread each, started on first use. Prints once where the dashboard is."""
    global _dask
    scheduler = getattr(execution, "scheduler", None)
    workers = resolve_workers(getattr(execution, "workers", 0))
    # The environment is part of it: spawned workers read STUDY_CACHE and the like when they start.
    key = (scheduler, None if scheduler else workers, None if scheduler else _environment_key())
    if _dask is not None and (_dask[0] != key or _dask[1].status not in ("running", "connecting")):
        close_dask()
    if _dask is None:
        try:
            from distributed import Client, LocalCluster
        except ImportError as exc:
            raise ImportError("execution.engine 'dask' needs the 'distributed' package: "
                              "pip install -r requirements.txt") from exc

        if scheduler:
            try:
                client = Client(scheduler, set_as_default=False, timeout="20s")
            except OSError as exc:
                raise ConnectionError(f"execution.scheduler: no Dask scheduler answers at {scheduler} ({exc})") from exc
            try:
                _check_workers(client, scheduler)
            except BaseException:
                client.close()
                raise
            cluster = None
        else:
            # Jobs differ too much in size for an even share of memory per worker: the machine is the limit, as
            # with the local engine. Only this machine may connect (127.0.0.1); the dashboard takes a free port.
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                   dashboard_address=":0", memory_limit=0)
            client = Client(cluster, set_as_default=False)
        _dask = key, client, cluster
        link = dashboard(client)
        where = scheduler or f"a LocalCluster of {workers} worker processes"
        print(f"[dask] {where}; dashboard: {link or 'unavailable (bokeh is not installed on the scheduler)'}")
    return _dask[1]


def close_dask() -> None:
    """Disconnect from the Dask scheduler and stop the LocalCluster this process started, if any."""
    global _dask
    if _dask is not None:
        _, client, cluster = _dask
        _dask = None
        client.close()
        if cluster is not None:
            cluster.close()


def _call_with_threads(fn: Callable, job: tuple, threads: int) -> Any:
    """A job on a Dask worker, with torch held to ``threads`` threads as the local engine's workers are."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return fn(*job)


# --- the runner ----------------------------------------------------------------------------------------------


def run_jobs(fn: Callable, jobs: Sequence[tuple], execution=1, desc: str | None = None, progress: bool = True,
             memo: bool = False, cache_dir: Path | None = None) -> list:
    """``[fn(*job) for job in jobs]``, spread over workers. ``execution`` is the configuration's execution
    section (or a plain worker count): ``workers`` processes (0: one per core) on the ``engine`` it names.

    With ``memo``, a job whose result is in the job cache (``cache_dir``, default ``CACHE/jobs``) is not run, and
    every job that finishes is saved there at once, before the others finish, so a failed job, a lost worker
    or a killed run keeps what was done. Raises :class:`JobFailed` for the first job that fails."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    jobs = [tuple(job) for job in jobs]
    engine = getattr(execution, "engine", "local")
    if engine not in ("local", "dask"):
        raise ValueError(f"execution.engine must be 'local' or 'dask', got {engine!r}")
    workers = resolve_workers(getattr(execution, "workers", execution))
    results: list = [None] * len(jobs)
    pending = list(range(len(jobs)))
    keys: list[str] = []
    if memo:
        code = _code_digest()
        keys = [job_key(fn, job, code) for job in jobs]
        pending = []
        for i, key in enumerate(keys):
            found, value = _load(job_cache_path(fn, key, cache_dir), key)
            if found:
                results[i] = value
            else:
                pending.append(i)
    saved: set[int] = set()
    seconds: dict[int, float] = {}

    def finished(i: int, value: Any, job_s: float | None = None) -> None:
        results[i] = value
        if job_s is not None:
            seconds[i] = job_s
        if memo and i not in saved:
            _save(job_cache_path(fn, keys[i], cache_dir), keys[i], value)
            saved.add(i)

    bar = tqdm(total=len(jobs), initial=len(jobs) - len(pending), desc=desc, disable=not progress)
    try:
        if pending and engine == "dask":
            _run_dask(fn, jobs, pending, execution, finished, bar)
        elif pending and min(workers, len(pending)) <= 1:
            for i in pending:
                try:
                    job_s, value = _timed(fn, *jobs[i])
                except Exception as exc:
                    raise _failure(fn, jobs, i, exc) from exc
                finished(i, value, job_s)
                bar.update()
        elif pending:
            n = min(workers, len(pending))
            # Cores shared out between the workers; a GPU run should use workers=1 (one CUDA context).
            _run_pool(fn, jobs, pending, _executor(n, max(1, resolve_workers(0) // n)), finished, bar)
    finally:
        bar.close()
    used = workers if engine == "dask" else max(1, min(workers, len(pending)))
    record_batch(fn, desc, len(jobs), len(pending), used, engine, time.perf_counter() - started,
                 list(seconds.values()))
    return results


def _run_pool(fn, jobs, pending, pool, finished, bar) -> None:
    futures = {pool.submit(_timed, fn, *jobs[i]): i for i in pending}
    try:
        for future in as_completed(futures):
            i = futures[future]
            try:
                job_s, value = future.result()
            except Exception as exc:
                raise _failure(fn, jobs, i, exc) from exc
            finished(i, value, job_s)
            bar.update()
    except BaseException:
        for future in futures:  # a failed job stops the queue, not only the loop
            future.cancel()
        wait(list(futures))
        for future, i in futures.items():  # jobs that were running still finished: keep them
            if not future.cancelled() and future.exception() is None:
                job_s, value = future.result()
                finished(i, value, job_s)
        raise


def _run_dask(fn, jobs, pending, execution, finished, bar) -> None:
    from distributed import as_completed as dask_completed

    client = dask_client(execution)
    scheduler = getattr(execution, "scheduler", None)
    # One torch thread per worker, as the local engine gives each of its workers its share of the cores.
    threads = 1 if scheduler else max(1, resolve_workers(0) // resolve_workers(getattr(execution, "workers", 0)))
    name = getattr(fn, "__name__", "job")
    # No `retries`: they re-run a job that raised, and a job that raises once raises again. A job whose worker
    # is lost is re-run by the scheduler itself (up to distributed.scheduler.allowed-failures times).
    futures = {client.submit(_call_with_threads, _timed, (fn, *jobs[i]), threads, pure=False,
                             key=f"{name}-{i}-{os.urandom(4).hex()}"): i for i in pending}
    try:
        for future in dask_completed(list(futures), loop=client.loop):
            i = futures[future]
            try:
                job_s, value = future.result()
            except Exception as exc:
                raise _failure(fn, jobs, i, exc) from exc
            finished(i, value, job_s)
            bar.update()
    except BaseException:
        for future, i in futures.items():  # finished beside the failure: keep them
            if future.status == "finished":
                try:
                    job_s, value = future.result(timeout=60)
                    finished(i, value, job_s)
                except Exception:  # noqa: BLE001 - its worker went away meanwhile; it is simply not kept
                    pass
        client.cancel(list(futures))
        raise


def shutdown() -> None:
    """Stop this process's worker pool and Dask client (tests; a notebook that wants its cores back)."""
    global _pool
    if _pool is not None:
        _pool[1].shutdown(wait=True, cancel_futures=True)
        _pool = None
    close_dask()
