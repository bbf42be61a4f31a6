"""The Dask engine: the same tables as the local one, a lost worker costs nothing, and a rerun after a failure
computes only what is missing. One LocalCluster of two workers serves the whole module."""
import contextlib
import dataclasses
import io
import os
import signal
import threading
import time
import uuid

import pandas as pd
import pytest

pytest.importorskip("distributed")

from data_prep import shift  # noqa: E402
from helpers import config, experiments, parallel, study  # noqa: E402
from helpers.config import ExecutionConfig  # noqa: E402
from helpers.parallel import JobFailed, run_jobs  # noqa: E402
from helpers.paths import Run  # noqa: E402
from tests.helpers_run import tiny_run  # noqa: E402

DASK = ExecutionConfig(workers=2, engine="dask")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Starts the module's LocalCluster, whose workers keep their feature and model caches in a folder of their
    own; gives what starting it printed. Tests reach its client through ``parallel.dask_client(DASK)``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDY_CACHE", str(tmp_path_factory.mktemp("worker_cache")))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            parallel.dask_client(DASK)
        yield printed.getvalue()
        parallel.close_dask()


def wait_for(condition, what: str, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.05)


def square_after_go(n: int, folder) -> int:
    """n², once the test has created ``folder/go``; leaves a start and an end mark named by job and process."""
    (folder / f"start-{n}-{os.getpid()}").touch()
    wait_for(lambda: (folder / "go").is_file(), "the go file")
    (folder / f"end-{n}-{os.getpid()}").touch()
    return n * n


def square_or_fail_last(n: int, folder, last: int, cache) -> int:
    """n²; with ``folder/fail`` present, job ``last`` fails once another job's result is in the cache. Each call
    leaves a mark named by the test's phase."""
    phase = (folder / "phase").read_text()
    if n == last and (folder / "fail").is_file():
        wait_for(lambda: any(cache.rglob("*.pkl")), "another job's result")
        raise RuntimeError("worker lost its disk")
    (folder / f"call-{phase}-{n}-{uuid.uuid4().hex}").touch()
    return n * n


def holds_no_task(dask_worker) -> bool:
    return not dask_worker.state.tasks


def calls(folder, phase: str) -> list[int]:
    return sorted(int(p.name.split("-")[2]) for p in folder.glob(f"call-{phase}-*"))


def test_dask_gives_the_local_tables_row_for_row(cluster, tiny_mvtec, tmp_path, monkeypatch):
    run = tiny_run(tiny_mvtec, tmp_path, monkeypatch)  # one process, caches in tmp_path/cache
    conditions = experiments.shift_conditions(["domain"], ["brightness"], [5])
    shift.shift_dataset(tiny_mvtec, run.shift_copy(0, "domain", "brightness", 5), "brightness", 5, seed=0,
                        progress=False)
    local, local_scores = experiments.run_method(run, "patchcore", conditions, seeds=[0, 1], progress=False)
    on_dask = dataclasses.replace(run, config=dataclasses.replace(run.config, execution=DASK))
    table, scores = experiments.run_method(on_dask, "patchcore", conditions, seeds=[0, 1], progress=False)
    assert len(table) == 2 * 2 * 2 and len(scores) > len(table)
    timing = ["predict_s"]
    pd.testing.assert_frame_equal(local.drop(columns=timing), table.drop(columns=timing))
    pd.testing.assert_frame_equal(local_scores, scores)
    workers = parallel.dask_client(DASK).run(os.getpid).values()
    assert len(set(workers) - {os.getpid()}) == 2, "the cluster runs two processes besides this one"


def test_dask_keeps_job_order_names_a_failed_job_and_says_where_the_dashboard_is(cluster):
    jobs = [(n, 3) for n in range(12, 0, -1)]
    assert run_jobs(divmod, jobs, DASK, progress=False) == [divmod(*job) for job in jobs]
    with pytest.raises(JobFailed, match=r"job 2 of 3 \(divmod: 1 \| 0\) failed: ZeroDivisionError") as info:
        run_jobs(divmod, [(1, 1), (1, 0), (2, 1)], DASK, progress=False)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    link = parallel.dashboard(parallel.dask_client(DASK))
    assert link is None or link.startswith("http://127.0.0.1:")
    assert f"dashboard: {link or 'unavailable (bokeh is not installed on the scheduler)'}" in cluster


def test_a_killed_worker_loses_nothing(cluster, tmp_path):
    folder = tmp_path / "marks"
    folder.mkdir()
    workers = set(parallel.dask_client(DASK).run(os.getpid).values())
    killed = []

    def kill_a_busy_worker():
        wait_for(lambda: any(folder.glob("start-*")), "a job to start")
        mark = next(folder.glob("start-*"))
        pid = int(mark.name.split("-")[2])
        os.kill(pid, signal.SIGKILL)
        killed.append((int(mark.name.split("-")[1]), pid))
        (folder / "go").touch()

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    try:
        jobs = [(n, folder) for n in range(6)]
        results = run_jobs(square_after_go, jobs, DASK, progress=False, memo=True, cache_dir=tmp_path / "jobs")
    finally:
        (folder / "go").touch()
        killer.join()
    assert results == [n * n for n in range(6)]
    (job, pid), = killed
    assert pid in workers, "the killed process was one of the cluster's workers"
    starts = {int(p.name.split("-")[2]) for p in folder.glob(f"start-{job}-*")}
    ends = {int(p.name.split("-")[2]) for p in folder.glob(f"end-{job}-*")}
    assert pid in starts and pid not in ends and len(ends) == 1, "the lost job was run again by another worker"
    assert len(list((tmp_path / "jobs").rglob("*.pkl"))) == 6


def test_a_rerun_after_a_failure_on_dask_computes_only_the_missing_jobs(cluster, tmp_path):
    folder, cache = tmp_path / "marks", tmp_path / "jobs"
    folder.mkdir()
    (folder / "fail").touch()
    (folder / "phase").write_text("first")
    jobs = [(n, folder, 7, cache) for n in range(8)]
    with pytest.raises(JobFailed, match=r"job 8 of 8 \(square_or_fail_last: 7 \| marks \| 7 \| jobs\) failed: "
                                        r"RuntimeError: worker lost its disk"):
        run_jobs(square_or_fail_last, jobs, DASK, progress=False, memo=True, cache_dir=cache)
    kept = [n for n, job in enumerate(jobs) if parallel.job_cache_path(
        square_or_fail_last, parallel.job_key(square_or_fail_last, job), cache).is_file()]
    # Jobs cancelled by the failure may still be running; they end on their own (their results are not kept).
    client = parallel.dask_client(DASK)
    wait_for(lambda: all(client.run(holds_no_task).values()), "the cancelled jobs to leave the workers")
    assert kept and set(kept) <= set(calls(folder, "first")) and 7 not in kept
    (folder / "fail").unlink()
    (folder / "phase").write_text("rerun")
    assert run_jobs(square_or_fail_last, jobs, DASK, progress=False, memo=True, cache_dir=cache) == [
        n * n for n in range(8)]
    assert calls(folder, "rerun") == sorted(set(range(8)) - set(kept)), "the rerun computed only what was missing"
    # The local engine finds the same entries: the engine is not part of a job's key.
    (folder / "phase").write_text("local")
    assert run_jobs(square_or_fail_last, jobs, 1, progress=False, memo=True, cache_dir=cache) == [
        n * n for n in range(8)]
    assert calls(folder, "local") == []


def test_the_command_line_picks_the_engine_without_changing_the_run(tiny_mvtec, tmp_path, monkeypatch, capsys):
    run = tiny_run(tiny_mvtec, tmp_path, monkeypatch)
    profile = tmp_path / "tiny.yaml"
    overrides = study.execution_overrides(workers=2, scheduler="tcp://cluster:8786")
    assert overrides == {"execution.workers": 2, "execution.engine": "dask", "execution.scheduler": "tcp://cluster:8786"}
    on_dask = Run.open(profile, overrides)
    assert on_dask.config.execution == ExecutionConfig(workers=2, engine="dask", scheduler="tcp://cluster:8786")
    assert on_dask.dir == run.dir and not on_dask.overridden, "the same run folder, and still the profile's run"
    assert study.execution_overrides(engine="dask") == {"execution.engine": "dask"}
    with pytest.raises(config.ProfileError, match="'execution.engine' must be one of 'local', 'dask', got 'spark'"):
        config.load(profile, {"execution.engine": "spark"})
    assert study.main(["--profile", str(profile), "--engine", "local", "--scheduler", "tcp://cluster:8786"]) == 2
    assert "--scheduler names a Dask scheduler; it needs --engine dask" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--engine", "spark"])


def test_a_scheduler_address_is_used_and_workers_running_other_code_are_refused(cluster, monkeypatch, capsys):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as other:
        remote = ExecutionConfig(engine="dask", scheduler=other.scheduler_address)
        assert run_jobs(divmod, [(7, 2), (9, 4)], remote, progress=False) == [(3, 1), (2, 1)]
        assert f"[dask] {other.scheduler_address}; dashboard: " in capsys.readouterr().out
        parallel.close_dask()
        monkeypatch.setattr(parallel, "_code_digest", lambda: "this process edited helpers")
        with pytest.raises(RuntimeError, match="1 of the 1 workers of .* run other helpers/data_prep code"):
            run_jobs(divmod, [(7, 2)], remote, progress=False)
