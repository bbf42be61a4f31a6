import numpy as np
import pandas as pd
import pytest

from helpers import experiments, report
from tests.helpers_ctx import tiny_context

PATCHCORE = dict(backbone="efficientnet_lite0", image_size=64, coreset_ratio=0.5, k=3, device="cpu", seed=0)


def test_model_cache_never_returns_a_stale_model_and_reuses_inference_only_settings(tiny_mvtec, tmp_path, monkeypatch):
    ctx = tiny_context(tiny_mvtec, tmp_path, monkeypatch)
    paths = experiments.train_paths(ctx.manifest(), ctx, "alpha")
    first = experiments.fit_cached("patchcore", PATCHCORE, paths)
    models = tmp_path / "cache" / "models"
    assert len(list(models.glob("*.safetensors"))) == 1
    other_k = experiments.fit_cached("patchcore", {**PATCHCORE, "k": 1}, paths)
    assert len(list(models.glob("*.safetensors"))) == 1, "k must not trigger a re-fit"
    assert other_k.k == 1 and first.k == 3
    assert np.array_equal(other_k.memory_bank.numpy(), first.memory_bank.numpy())
    experiments.fit_cached("patchcore", {**PATCHCORE, "coreset_ratio": 0.25}, paths)
    assert len(list(models.glob("*.safetensors"))) == 2
    experiments.fit_cached("patchcore", PATCHCORE, paths[:-1])
    assert len(list(models.glob("*.safetensors"))) == 3, "other training images must give another model"


def test_conditions_table_is_tidy_and_shift_rows_read_the_shifted_copy(tiny_mvtec, tmp_path, monkeypatch):
    from data_prep import shift

    ctx = tiny_context(tiny_mvtec, tmp_path, monkeypatch)
    manifest = ctx.manifest()
    shift.build_conditions(tiny_mvtec, ctx.shift_root, {("brightness", 5): {"test"}}, seed=0, workers=1)
    rows = experiments.rows_of(manifest, ctx, "alpha", "test", "brightness", 5)
    assert all(str(p).startswith(str(ctx.shift_root)) for p in rows["image_path"])
    detector = experiments.fit_cached("patchcore", PATCHCORE, experiments.train_paths(manifest, ctx, "alpha"))
    table = experiments.evaluate_conditions(detector, manifest, ctx, "alpha",
                                            experiments.shift_conditions(["brightness"], [5]), method="patchcore", seed=0)
    assert list(table["transform"]) == ["none", "brightness"]
    assert table[experiments.METRICS].notna().all().all()
    assert (table["image_auroc_lo"] <= table["image_auroc"]).all() and (table["image_auroc"] <= table["image_auroc_hi"]).all()
    curves = experiments.clean_per_transform(table)
    assert set(curves["severity"]) == {0, 5} and set(curves["transform"]) == {"brightness"}


def test_summary_and_report_tables(tmp_path):
    df = pd.DataFrame({"method": ["patchcore"] * 2 + ["padim"] * 2, "category": ["a"] * 4, "seed": [0, 1, 0, 1],
                       "transform": ["none"] * 4, "severity": [0] * 4, "image_auroc": [0.9, 0.8, 0.7, 0.6],
                       "image_ap": [0.9] * 4, "image_f1max": [0.9] * 4, "pixel_auroc": [0.9] * 4,
                       "pixel_aupro": [np.nan] * 4, "image_auroc_lo": [0.5] * 4, "image_auroc_hi": [1.0] * 4})
    summary = experiments.summarise(df, ["method"])
    assert summary.set_index("method").loc["patchcore", "image_auroc"] == pytest.approx(0.85)
    assert summary.set_index("method").loc["patchcore", "image_auroc_sd"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert "pixel_aupro" not in summary, "an all-NaN metric is left out, not reported as NaN"
    table = report.baseline_table(df)
    assert table.set_index("method").loc["patchcore", "image AUROC"] == "0.850 ± 0.071"
    paths = report.write_table(table, "baseline", tmp_path, "caption")
    for ext in ("csv", "md", "tex"):
        assert (tmp_path / f"baseline.{ext}").stat().st_size > 0
    assert "\\toprule" in (tmp_path / "baseline.tex").read_text()
    assert "patchcore has the higher mean image auroc on 1 of 1" in report.sentence_compare(df, "image_auroc", "patchcore", "padim")
