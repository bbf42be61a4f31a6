import dataclasses

import pandas as pd
import pytest

from data_prep import shift
from helpers import experiments
from helpers.config import ExecutionConfig
from helpers.parallel import resolve_workers, run_jobs
from tests.helpers_run import tiny_run


def test_results_come_back_in_job_order_and_a_failing_job_raises():
    jobs = [(n, 3) for n in range(10, 0, -1)]
    assert run_jobs(divmod, jobs, 2, progress=False) == [divmod(*job) for job in jobs]
    with pytest.raises(ZeroDivisionError):
        run_jobs(divmod, [(1, 1), (1, 0), (2, 1)], 2, progress=False)
    with pytest.raises(ValueError, match="workers"):
        run_jobs(divmod, jobs, -1)
    assert resolve_workers(0) >= 1 and resolve_workers(3) == 3


def test_parallel_run_fits_and_scores_exactly_as_one_process(tiny_mvtec, tmp_path, monkeypatch):
    """Two worker processes with an empty cache of their own produce the table one process does."""
    run = tiny_run(tiny_mvtec, tmp_path, monkeypatch)  # the serial run's caches: tmp_path/cache
    conditions = experiments.shift_conditions(["domain"], ["brightness"], [5])
    shift.shift_dataset(tiny_mvtec, run.shift_copy(0, "domain", "brightness", 5), "brightness", 5, seed=0,
                        progress=False)
    serial, serial_scores = experiments.run_method(run, "patchcore", conditions, seeds=[0, 1], progress=False)
    monkeypatch.setenv("STUDY_CACHE", str(tmp_path / "worker_cache"))  # spawned workers read it at import
    two = dataclasses.replace(run, config=dataclasses.replace(run.config, execution=ExecutionConfig(workers=2)))
    parallel, parallel_scores = experiments.run_method(two, "patchcore", conditions, seeds=[0, 1], progress=False)
    assert (tmp_path / "worker_cache" / "models").is_dir(), "the workers fitted their own models"
    assert len(serial) == 2 * 2 * 2
    timing = ["predict_s"]
    pd.testing.assert_frame_equal(serial.drop(columns=timing), parallel.drop(columns=timing))
    pd.testing.assert_frame_equal(serial_scores, parallel_scores)
