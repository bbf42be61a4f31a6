import pandas as pd
import pytest

from data_prep import shift
from helpers import experiments
from helpers.parallel import resolve_workers, run_jobs
from tests.helpers_ctx import tiny_context

PATCHCORE = dict(backbone="efficientnet_lite0", image_size=64, coreset_ratio=0.5, k=3, device="cpu")


def test_results_come_back_in_job_order_and_a_failing_job_raises():
    jobs = [(n, 3) for n in range(10, 0, -1)]
    assert run_jobs(divmod, jobs, workers=2, progress=False) == [divmod(*job) for job in jobs]
    with pytest.raises(ZeroDivisionError):
        run_jobs(divmod, [(1, 1), (1, 0), (2, 1)], workers=2, progress=False)
    with pytest.raises(ValueError, match="workers"):
        run_jobs(divmod, jobs, workers=-1)
    assert resolve_workers(0) >= 1 and resolve_workers(3) == 3


def test_parallel_run_fits_and_scores_exactly_as_one_process(tiny_mvtec, tmp_path, monkeypatch):
    """Two worker processes with an empty cache of their own produce the table one process does."""
    ctx = tiny_context(tiny_mvtec, tmp_path, monkeypatch)  # the serial run's caches: tmp_path/cache
    manifest = ctx.manifest()
    shift.build_conditions(tiny_mvtec, ctx.shift_root, {("brightness", 5): {"test"}}, seed=0, workers=1)
    conditions = experiments.shift_conditions(["brightness"], [5])
    serial = experiments.run_method("patchcore", PATCHCORE, ctx, manifest, conditions, seeds=[0, 1],
                                    progress=False, workers=1)
    monkeypatch.setenv("STUDY_CACHE", str(tmp_path / "worker_cache"))  # spawned workers read it at import
    parallel = experiments.run_method("patchcore", PATCHCORE, ctx, manifest, conditions, seeds=[0, 1],
                                      progress=False, workers=2)
    assert (tmp_path / "worker_cache" / "models").is_dir(), "the workers fitted their own models"
    assert len(serial) == 2 * 2 * 2
    timing = ["predict_s"]
    pd.testing.assert_frame_equal(serial.drop(columns=timing), parallel.drop(columns=timing))
