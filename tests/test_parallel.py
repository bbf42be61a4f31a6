import dataclasses
import logging
import os
import uuid

import pandas as pd
import pytest

from data_prep import shift
from helpers import experiments, parallel
from helpers.config import ExecutionConfig
from helpers.parallel import JobFailed, job_key, resolve_workers, run_jobs
from tests.helpers_run import tiny_run


def test_results_come_back_in_job_order_and_a_failing_job_names_itself():
    jobs = [(n, 3) for n in range(10, 0, -1)]
    assert run_jobs(divmod, jobs, 2, progress=False) == [divmod(*job) for job in jobs]
    for workers in (1, 2):
        with pytest.raises(JobFailed, match=r"job 2 of 3 \(divmod: 1 \| 0\) failed: ZeroDivisionError") as info:
            run_jobs(divmod, [(1, 1), (1, 0), (2, 1)], workers, progress=False)
        assert isinstance(info.value.__cause__, ZeroDivisionError) and info.value.index == 1
    with pytest.raises(ValueError, match="workers"):
        run_jobs(divmod, jobs, -1)
    with pytest.raises(ValueError, match="execution.engine"):
        run_jobs(divmod, jobs, dataclasses.replace(ExecutionConfig(), engine="spark"))
    assert resolve_workers(0) >= 1 and resolve_workers(3) == 3


def test_a_job_is_described_by_its_arguments_short_enough_to_read():
    text = parallel.describe_job(run_jobs, (experiments.Condition("domain", "blur", 3), "hazelnut", list(range(9)),
                                            {"method": "patchcore", "seed": 1}))
    assert text == "run_jobs: blur 3 (domain) | hazelnut | [0, 1, 2, +6] | method=patchcore seed=1"
    assert len(parallel.describe_job(divmod, ("x" * 500,))) == 200


def square_counted(n: int, calls) -> int:
    """n², leaving one file per call so a test can count the calls, across processes too."""
    (calls / f"{n}-{uuid.uuid4().hex}").touch()
    return n * n


def square_unless_flagged(n: int, calls, fail_at: int) -> int:
    if n == fail_at and (calls / "fail").is_file():
        raise RuntimeError(f"job {n} was told to fail")
    return square_counted(n, calls)


def called(calls) -> list[int]:
    return sorted(int(p.name.split("-")[0]) for p in calls.iterdir() if p.name != "fail")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_rerun_after_a_failed_job_computes_only_the_jobs_without_a_result(tmp_path, workers):
    calls, cache = tmp_path / "calls", tmp_path / "jobs"
    calls.mkdir()
    (calls / "fail").touch()
    jobs = [(n, calls, 5) for n in range(8)]
    with pytest.raises(JobFailed, match="job 6 of 8"):
        run_jobs(square_unless_flagged, jobs, workers, progress=False, memo=True, cache_dir=cache)
    first = called(calls)
    kept = len(list(cache.rglob("*.pkl")))
    assert 5 not in first and kept == len(first) >= (5 if workers == 1 else 1)
    (calls / "fail").unlink()
    for p in calls.iterdir():
        p.unlink()
    assert run_jobs(square_unless_flagged, jobs, workers, progress=False, memo=True, cache_dir=cache) == [
        n * n for n in range(8)]
    assert called(calls) == sorted(set(range(8)) - set(first)), "only the jobs the first run did not finish"
    if workers == 1:
        assert called(calls) == [5, 6, 7]


def test_the_job_cache_key_ignores_how_jobs_run_but_not_what_they_compute(tiny_mvtec, tmp_path, monkeypatch):
    run = tiny_run(tiny_mvtec, tmp_path, monkeypatch)
    dask_run = dataclasses.replace(run, config=dataclasses.replace(
        run.config, execution=ExecutionConfig(workers=4, engine="dask", scheduler="tcp://elsewhere:8786")))
    job = (run, 0, "alpha", [experiments.CLEAN])
    assert job_key(divmod, job, "code") == job_key(divmod, (dask_run, *job[1:]), "code")
    assert job_key(divmod, job, "code") != job_key(divmod, job, "other code")
    assert job_key(divmod, job, "code") != job_key(divmod, (run, 0, "beta", [experiments.CLEAN]), "code")
    assert job_key(divmod, job, "code") != job_key(pow, job, "code")
    other_k = dataclasses.replace(run, config=dataclasses.replace(run.config, methods={
        **run.config.methods, "patchcore": dataclasses.replace(run.config.methods["patchcore"], k=4)}))
    assert job_key(divmod, job, "code") != job_key(divmod, (other_k, *job[1:]), "code")
    with pytest.raises(TypeError, match="cannot key an argument of type object"):
        job_key(divmod, (object(),), "code")


def test_a_changed_code_digest_recomputes(tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    calls.mkdir()
    jobs = [(n, calls) for n in range(3)]
    run_jobs(square_counted, jobs, 1, progress=False, memo=True, cache_dir=tmp_path / "jobs")
    run_jobs(square_counted, jobs, 1, progress=False, memo=True, cache_dir=tmp_path / "jobs")
    assert called(calls) == [0, 1, 2]
    monkeypatch.setattr(parallel, "_code_digest", lambda: "edited helpers")
    run_jobs(square_counted, jobs, 1, progress=False, memo=True, cache_dir=tmp_path / "jobs")
    assert called(calls) == [0, 0, 1, 1, 2, 2]


def test_an_unreadable_cache_entry_is_logged_deleted_and_recomputed(tmp_path, caplog):
    calls = tmp_path / "calls"
    calls.mkdir()
    jobs = [(n, calls) for n in range(3)]
    run_jobs(square_counted, jobs, 1, progress=False, memo=True, cache_dir=tmp_path / "jobs")
    broken = parallel.job_cache_path(square_counted, job_key(square_counted, jobs[1]), tmp_path / "jobs")
    broken.write_bytes(broken.read_bytes()[:20])  # a truncated file
    with caplog.at_level(logging.WARNING, logger="helpers.parallel"):
        assert run_jobs(square_counted, jobs, 1, progress=False, memo=True, cache_dir=tmp_path / "jobs") == [0, 1, 4]
    assert str(broken) in caplog.text and "recomputing" in caplog.text
    assert called(calls) == [0, 1, 1, 2]
    assert broken.is_file() and not list(broken.parent.glob(".*.tmp"))


def test_without_memo_nothing_is_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "CACHE", tmp_path / "cache")
    calls = tmp_path / "calls"
    calls.mkdir()
    run_jobs(square_counted, [(2, calls)], 1, progress=False)
    run_jobs(square_counted, [(2, calls)], 1, progress=False, memo=True)
    assert called(calls) == [2, 2] and len(list((tmp_path / "cache" / "jobs").rglob("*.pkl"))) == 1
    assert os.listdir(tmp_path / "cache") == ["jobs"]


def test_parallel_run_fits_and_scores_exactly_as_one_process(tiny_mvtec, tmp_path, monkeypatch):
    """Two worker processes with an empty cache of their own produce the table one process does."""
    run = tiny_run(tiny_mvtec, tmp_path, monkeypatch)  # the serial run's caches: tmp_path/cache
    conditions = experiments.shift_conditions(["domain"], ["brightness"], [5])
    shift.shift_dataset(tiny_mvtec, run.shift_copy(0, "domain", "brightness", 5), "brightness", 5, seed=0,
                        progress=False)
    serial, serial_scores = experiments.run_method(run, "patchcore", conditions, seeds=[0, 1], progress=False)
    monkeypatch.setenv("STUDY_CACHE", str(tmp_path / "worker_cache"))  # spawned workers read it at import
    two = dataclasses.replace(run, config=dataclasses.replace(run.config, execution=ExecutionConfig(workers=2)))
    parallel_table, parallel_scores = experiments.run_method(two, "patchcore", conditions, seeds=[0, 1],
                                                             progress=False)
    assert (tmp_path / "worker_cache" / "models").is_dir(), "the workers fitted their own models"
    assert len(serial) == 2 * 2 * 2
    timing = ["predict_s"]
    pd.testing.assert_frame_equal(serial.drop(columns=timing), parallel_table.drop(columns=timing))
    pd.testing.assert_frame_equal(serial_scores, parallel_scores)
