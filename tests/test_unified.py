import numpy as np

from helpers import experiments, registry, unified
from tests.helpers_run import tiny_run


def test_unified_patchcore_provenance_fpr_matrix_and_comparison(tiny_mvtec, tmp_path, monkeypatch):
    run = tiny_run(tiny_mvtec, tmp_path, monkeypatch)
    pooled, per_category = unified.fit_models(registry.configured(run.config, "patchcore"), run)
    # The pooled bank draws from both categories' training patches.
    train = experiments.rows_of(run, 0, ["alpha", "beta"], "train")
    patches_per_image = (64 // 8) ** 2  # stride-8 grid of a 64 px image
    assert len(pooled.bank_sources) == pooled.memory_bank.shape[0] > 0
    source_cats = set(np.asarray(train["category"])[pooled.bank_sources.numpy() // patches_per_image])
    assert source_cats == {"alpha", "beta"}

    provenance = unified.patchcore_provenance(pooled, run)
    assert set(provenance["category"]) == {"alpha", "beta"}
    # The two categories differ in grey level, so normal patches find their neighbours at home.
    assert (provenance["cross_share_normal"] < 0.2).all()
    assert ((provenance["explained_away"] >= 0)
            & (provenance["explained_away"] <= provenance["cross_share_anomalous"])).all()

    uni_val = unified.score_by_category(lambda c: pooled, run, "val")
    uni_test = unified.score_by_category(lambda c: pooled, run, "test")
    per_val = unified.score_by_category(lambda c: per_category[c], run, "val")
    per_test = unified.score_by_category(lambda c: per_category[c], run, "test")
    matrix = unified.fpr_matrix(uni_val, uni_test)
    assert len(matrix) == 4
    row = matrix[(matrix.normal_of == "alpha") & (matrix.threshold_of == "beta")].iloc[0]
    alpha_normals = uni_test["alpha"].scores[uni_test["alpha"].labels == 0]
    assert row.fpr == np.mean(alpha_normals >= row.threshold)

    table = unified.comparison_table(per_val, per_test, uni_val, uni_test)
    assert set(table["setting"]) == {"per_category", "model_unified", "absolute_unified"}
    absolute = table[table.setting == "absolute_unified"]
    assert absolute["threshold"].nunique() == 1, "absolute-unified uses one global threshold"
    model_uni = table[table.setting == "model_unified"].set_index("category")
    assert np.allclose(model_uni["image_auroc"], absolute.set_index("category")["image_auroc"])


def test_padim_pooled_covariance_is_wider_than_each_category(tiny_mvtec, tmp_path, monkeypatch):
    run = tiny_run(tiny_mvtec, tmp_path, monkeypatch)
    pooled, per_category = unified.fit_models(registry.configured(run.config, "padim"), run)
    widening = unified.covariance_widening(pooled, per_category)
    assert set(widening["category"]) == {"alpha", "beta"}
    assert (widening["trace_ratio"] > 1).all()
