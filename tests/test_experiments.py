import numpy as np
import pandas as pd
import pytest

from helpers import experiments, registry, report
from tests.helpers_run import tiny_run


def test_model_cache_never_returns_a_stale_model_and_reuses_inference_only_settings(tiny_mvtec, tmp_path, monkeypatch):
    run = tiny_run(tiny_mvtec, tmp_path, monkeypatch)
    config = registry.configured(run.config, "patchcore")
    paths = experiments.train_paths(run, 0, "alpha")
    first = experiments.fit_cached(config, paths)
    models = tmp_path / "cache" / "models"
    assert len(list(models.glob("*.safetensors"))) == 1
    other_k = experiments.fit_cached(config.replace(k=1), paths)
    assert len(list(models.glob("*.safetensors"))) == 1, "k must not trigger a re-fit"
    assert other_k.k == 1 and first.k == 3
    assert np.array_equal(other_k.memory_bank.numpy(), first.memory_bank.numpy())
    experiments.fit_cached(config.replace(coreset_ratio=0.25), paths)
    assert len(list(models.glob("*.safetensors"))) == 2
    experiments.fit_cached(config, paths[:-1])
    assert len(list(models.glob("*.safetensors"))) == 3, "other training images must give another model"


def test_an_unreadable_model_cache_entry_is_refitted(tiny_mvtec, tmp_path, monkeypatch):
    run = tiny_run(tiny_mvtec, tmp_path, monkeypatch)
    config = registry.configured(run.config, "patchcore")
    paths = experiments.train_paths(run, 0, "alpha")
    bank = experiments.fit_cached(config, paths).memory_bank
    path = experiments.model_path(config, paths)
    path.write_bytes(path.read_bytes()[:100])  # truncated, as a full disk or a copy cut short leaves it
    again = experiments.fit_cached(config, paths)
    assert np.array_equal(again.memory_bank.numpy(), bank.numpy()) and path.stat().st_size > 100


def test_conditions_table_is_tidy_and_shift_rows_read_the_shifted_copy(tiny_mvtec, tmp_path, monkeypatch):
    from data_prep import shift

    run = tiny_run(tiny_mvtec, tmp_path, monkeypatch)
    condition = experiments.Condition("domain", "brightness", 5)
    copy = run.shift_copy(0, condition.mode, condition.transform, condition.severity)
    shift.shift_dataset(tiny_mvtec, copy, "brightness", 5, seed=0, progress=False)
    rows = experiments.rows_of(run, 0, "alpha", "test", condition)
    assert all(str(p).startswith(str(copy)) for p in rows["image_path"])
    detector = experiments.fit_cached(registry.configured(run.config, "patchcore"),
                                      experiments.train_paths(run, 0, "alpha"))
    table, scores = experiments.evaluate_conditions(detector, run, 0, "alpha", [experiments.CLEAN, condition],
                                                    method="patchcore", seed=0)
    assert list(table["transform"]) == ["none", "brightness"] and list(table["mode"]) == ["none", "domain"]
    assert table[experiments.METRICS].notna().all().all()
    assert len(scores) == table["n_images"].sum() and set(scores["image"]) == set(rows["image"])
    curves = experiments.clean_per_transform(table)
    assert set(curves["severity"]) == {0, 5} and set(curves["transform"]) == {"brightness"}


def test_summary_and_report_tables(tmp_path):
    df = pd.DataFrame({"method": ["patchcore"] * 2 + ["padim"] * 2, "category": ["a"] * 4, "seed": [0, 1, 0, 1],
                       "draw": [0] * 4, "transform": ["none"] * 4, "severity": [0] * 4,
                       "image_auroc": [0.9, 0.8, 0.7, 0.6], "image_ap": [0.9] * 4, "image_f1max": [0.9] * 4,
                       "pixel_auroc": [0.9] * 4, "pixel_aupro": [np.nan] * 4})
    summary = experiments.summarise(df, ["method"])
    assert summary.set_index("method").loc["patchcore", "image_auroc"] == pytest.approx(0.85)
    assert summary.set_index("method").loc["patchcore", "image_auroc_sd"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert "pixel_aupro" not in summary, "an all-NaN metric is left out, not reported as NaN"
    report.write_table(summary, "baseline", tmp_path, "caption")
    for ext in ("csv", "md", "tex"):
        assert (tmp_path / f"baseline.{ext}").stat().st_size > 0
    assert "\\toprule" in (tmp_path / "baseline.tex").read_text()
    assert "0.850" in (tmp_path / "baseline.md").read_text() and "n/a" not in (tmp_path / "baseline.md").read_text()


def test_draws_sharing_one_dataset_share_one_shifted_copy_holding_every_draws_images(tiny_mvtec, tmp_path,
                                                                                      monkeypatch):
    """Real data: draws are split seeds of the same images, so one copy per condition must hold the test images
    of every draw (each draw's job writing only its own would leave the last one's)."""
    from data_prep import prepare

    run = tiny_run(tiny_mvtec, tmp_path, monkeypatch, draws=(0, 1))
    condition = experiments.Condition("domain", "brightness", 3)
    needs = {(0, condition): {"test"}, (1, condition): {"test"}}
    [copy] = prepare.build_shifts(run, needs, progress=False)
    for draw in (0, 1):
        rows = experiments.rows_of(run, draw, ["alpha", "beta"], "test", condition)
        assert all(p.is_file() for p in rows["image_path"]), f"draw {draw} misses shifted images"
    assert run.shift_copy(0, "domain", "brightness", 3) == run.shift_copy(1, "domain", "brightness", 3) == copy
