"""The unified study: the shortcut its positive control must show, the four settings' normal-only thresholds, the
cross-class FPR matrices with their per-category control, and tables for every method, set, setting and seed."""
import numpy as np
import pandas as pd
import pytest
import yaml

from data_prep import prepare
from helpers import config, unified
from helpers.config import ProfileError
from helpers.paths import Run
from helpers.unified import SplitScores
from tests.conftest import write_tiny_mvtec
from tests.helpers_run import tiny_run

# --- the positive control: a case where the shortcut must appear ---------------------------------------------------


def test_pooled_patchcore_explains_away_anomalies_made_of_another_categorys_normal_images(tiny_mvtec, tmp_path,
                                                                                          monkeypatch):
    # Side 1: each anomaly of alpha is a normal image of beta (and the other way round), all of it ground truth.
    run = tiny_run(tiny_mvtec, tmp_path, monkeypatch, {
        "methods": {"padim": None}, "model": {"seeds": [0]},
        "unified": {"control_patches": [1.0], "control_per_pair": 4, "curve": []}})
    metrics = unified.run_study(run, progress=False)["metrics"]
    rows = metrics[metrics["category"] != "all"].set_index(["data", "setting", "category"]).sort_index()
    per, pooled = rows.loc[("control_1", "per_category")], rows.loc[("control_1", "model_unified")]
    # The pooled bank holds the other category's normal appearance: every anomalous patch finds it there, and
    # most of them score below their category's normal threshold.
    assert (pooled["cross_neighbour_share"] >= 0.95).all()
    assert (pooled["explained_away"] >= 0.8).all()
    # The per-category model has nothing to explain them with: it flags far more of the same patches, and
    # tells every anomalous image from the normal ones.
    assert (per["patch_flagged"] >= pooled["patch_flagged"] + 0.3).all()
    assert (per["image_auroc"] == 1).all()
    assert per["image_auroc"].mean() > pooled["image_auroc"].mean()
    # The same measure on the labelled test split (white and black squares, nobody's normal appearance) finds
    # nothing to explain away: the effect belongs to the control, not to the measure.
    assert (rows.loc[("test", "model_unified"), "explained_away"] <= 0.1).all()


# --- thresholds and explained-away shares from known scores ------------------------------------------------------


def _split(scores, labels=None, patches=None, anomalous=None, cross=None):
    scores = np.asarray(scores, float)
    n = len(scores)
    labels = np.zeros(n, int) if labels is None else np.asarray(labels)
    patches = np.repeat(scores[:, None, None], 4, axis=1).reshape(n, 2, 2) if patches is None else patches
    anomalous = np.zeros((n, 2, 2), bool) if anomalous is None else anomalous
    return SplitScores(np.array([f"{i:03d}.png" for i in range(n)]), labels, np.where(labels == 1, "bad", "good"),
                       scores, patches, anomalous, cross)


def _category(offset, scale=1.0):
    calib = offset + scale * np.arange(100.0)
    return {"calib": _split(calib), "val": _split([offset, offset + 200 * scale], labels=[0, 1]),
            "test": _split(offset + scale * (np.arange(100.0) + 0.5))}


def test_per_category_and_global_thresholds_and_per_category_standardisation():
    model = {"low": _category(0.0), "high": _category(1000.0, scale=2.0)}
    own = unified.views(model, normalise=False, global_threshold=False, policy="normal_percentile", q=99)
    assert own["low"].threshold == pytest.approx(np.percentile(np.arange(100.0), 99))
    assert own["high"].threshold == pytest.approx(1000 + 2 * np.percentile(np.arange(100.0), 99))
    one = unified.views(model, normalise=False, global_threshold=True, policy="normal_percentile", q=99)
    pooled_calib = np.concatenate([np.arange(100.0), 1000 + 2 * np.arange(100.0)])
    assert one["low"].threshold == one["high"].threshold == pytest.approx(np.percentile(pooled_calib, 99))
    normalised = unified.views(model, normalise=True, global_threshold=True, policy="normal_percentile", q=99)
    for view in normalised.values():
        assert view.scores["calib"].mean() == pytest.approx(0) and view.scores["calib"].std(ddof=1) == pytest.approx(1)
    # Standardised, the two categories' calibration scores are the same numbers: one threshold fits both.
    assert normalised["low"].threshold == pytest.approx(np.percentile(normalised["low"].scores["calib"], 99))
    # The oracle is F1-optimal on the labelled validation split, kept apart from the normal-only threshold.
    assert own["low"].oracle == pytest.approx(200.0)


def test_explained_away_follows_each_methods_operational_definition():
    labels = np.array([1, 1, 0, 0])
    anomalous = np.zeros((4, 2, 2), bool)
    anomalous[:2] = True  # 8 anomalous patches in the two anomalous images
    per_patches = np.full((4, 2, 2), 10.0)
    pooled_patches = np.full((4, 2, 2), 10.0)
    pooled_patches[0] = 0.0  # image 0: every patch below the pooled threshold
    pooled_patches[1, 0] = 0.0  # image 1: two patches below it
    cross = np.zeros((4, 2, 2), bool)
    cross[0, 0] = cross[1, 0] = True  # the neighbour of 4 anomalous patches comes from another category
    per = _split([10, 10, 0, 0], labels, per_patches, anomalous)
    bank = _split([0, 10, 0, 0], labels, pooled_patches, anomalous, cross)
    gaussian = _split([0, 10, 0, 0], labels, pooled_patches, anomalous)
    view = unified.View({"test": bank.scores}, {"test": bank.patches}, 5.0, 5.0, np.nan)
    per_view = unified.View({"test": per.scores}, {"test": per.patches}, 5.0, 5.0, np.nan)
    memory = unified.judge(bank, view, "test", per, per_view)
    # Memory bank: cross-category neighbour AND below threshold: (image 0, row 0) and (image 1, row 0) = 4 of 8.
    assert memory["explained_away"] == pytest.approx(4 / 8)
    assert memory["cross_neighbour_share"] == pytest.approx(4 / 8)
    assert memory["cross_neighbour_share_normal"] == 0
    # Gaussian: flagged per category AND missed pooled: image 0 (4 patches) and row 0 of image 1 (2) = 6 of 8.
    assert unified.judge(gaussian, view, "test", per, per_view)["explained_away"] == pytest.approx(6 / 8)
    # Image level, both: image 0 is flagged per category and missed pooled, image 1 is caught by both.
    assert memory["explained_away_image"] == pytest.approx(1 / 2)
    assert memory["patch_flagged"] == pytest.approx(2 / 8)


def test_fpr_matrix_tells_scales_apart_from_what_pooling_lost():
    per = {"low": _category(0.0), "high": _category(1000.0)}
    pooled = {"low": _category(0.0), "high": _category(1000.0)}
    pooled["high"]["test"] = _split(1000.0 + np.arange(100.0) + 50)  # pooling pushed high's normals up by 50
    fpr = unified.fpr_matrices(per, pooled, "normal_percentile", 99).set_index(
        ["model", "scores", "normal_of", "threshold_of"])["fpr"].sort_index()
    # Control: with per-category models the raw matrix is already off-diagonal; that is a matter of scale.
    assert fpr[("per_category", "raw", "low", "high")] == 0 and fpr[("per_category", "raw", "high", "low")] == 1
    assert fpr[("per_category", "raw", "low", "low")] == pytest.approx(0.02)
    # Standardised per category, the control's matrix is flat: nothing was lost.
    control = fpr.loc[("per_category", "normalised")]
    assert np.allclose(control, 0.02)
    # What remains in the pooled model's standardised matrix is what pooling changed.
    assert fpr[("pooled", "normalised", "high", "high")] == pytest.approx(0.51)
    assert fpr[("pooled", "normalised", "low", "low")] == pytest.approx(0.02)


# --- the whole study on tiny data ---------------------------------------------------------------------------------


@pytest.fixture
def three_category_run(tmp_path, monkeypatch):
    root = write_tiny_mvtec(tmp_path / "tiny3", categories=("alpha", "beta", "gamma"))
    return tiny_run(root, tmp_path, monkeypatch, {
        "data": {"categories": ["alpha", "beta", "gamma"]},
        "unified": {"sets": {"pair": ["alpha", "beta"], "all": ["alpha", "beta", "gamma"]},
                    "curve": ["gamma", "alpha", "beta"], "control_patches": [0.5, 1.0], "control_per_pair": 2,
                    "n_train": 6, "n_resamples": 200}})


def test_one_job_per_distinct_model_and_first_seed_extras(three_category_run):
    jobs = unified.model_jobs(three_category_run)
    keys = [(j[0].method, j[0].seed, j[3]) for j in jobs]
    assert len(keys) == len(set(keys))
    per_method = [k for k in keys if k[0] == "patchcore"]
    # Seeds 0 and 1: two named pools and three single categories each; the curve adds (alpha, gamma), seed 0 only.
    assert len(per_method) == 2 * (2 + 3) + 1
    by_key = {(j[0].method, j[0].seed, j[3]): j for j in jobs}
    curve_only = by_key["patchcore", 0, ("alpha", "gamma")]
    assert curve_only[6] is False and curve_only[5] == {}  # partial scoring, no pixel AUPRO
    first, second = by_key["padim", 0, ("alpha",)], by_key["padim", 1, ("alpha",)]
    # alpha's own model judges the controls of every pool alpha is in: from beta (pair), beta+gamma (all, curve).
    assert first[4]["alpha"] == ("beta", "gamma")
    assert sorted(first[5]["alpha"]) == [("beta",), ("beta", "gamma")] and second[5] == {}
    assert first[7] is True and second[7] is False  # covariance summary: first seed


def test_tables_cover_every_method_setting_seed_and_data(three_category_run):
    run = three_category_run
    tables = unified.run_study(run, progress=False)
    m = tables["metrics"]
    data = ["test", "control_0.5", "control_1"]
    for (method, set_name, _seed, setting), group in m.groupby(["method", "set", "seed", "setting"]):
        categories = run.config.unified_sets[set_name]
        expected = set(categories) | ({"all"} if setting in unified.ABSOLUTE else set())
        for name in data:
            assert set(group.loc[group["data"] == name, "category"]) == expected, (method, set_name, setting, name)
    assert set(m["setting"]) == set(unified.SETTINGS) and set(m["seed"]) == {0, 1}
    cats = m[m["category"] != "all"]
    assert cats.loc[cats["data"] == "test", "pixel_aupro"].notna().all()
    assert cats.loc[(cats["data"] != "test") & (cats["seed"] == 0), "pixel_aupro"].notna().all()
    assert cats.loc[(cats["data"] != "test") & (cats["seed"] == 1), "pixel_aupro"].isna().all()
    # The pooled model's AUROC per category does not depend on how its scores are thresholded or standardised.
    keys = ["method", "set", "seed", "data", "category"]
    aurocs = cats[cats["setting"] != "per_category"].pivot_table(index=keys, columns="setting", values="image_auroc")
    assert np.allclose(aurocs.to_numpy(), aurocs[["model_unified"]].to_numpy())
    # One global threshold in the absolute settings.
    absolute = m[m["setting"].isin(unified.ABSOLUTE)]
    assert (absolute.groupby(["method", "set", "seed", "data", "setting"])["threshold"].nunique() == 1).all()
    # Explained-away shares exist for the pooled settings only; neighbour provenance for the memory bank only.
    assert m.loc[m["setting"] == "per_category", "explained_away"].isna().all()
    assert m.loc[m["setting"] != "per_category", "explained_away"].notna().any()
    assert m.loc[(m["method"] == "padim"), "cross_neighbour_share"].isna().all()

    fpr = tables["fpr"]
    assert len(fpr) == 2 * 2 * 2 * 2 * (2 * 2 + 3 * 3)  # methods x seeds x models x scales x (pair + all)
    # Its diagonal is each setting's own false-positive rate on the test split.
    diagonal = fpr[(fpr["normal_of"] == fpr["threshold_of"]) & (fpr["scores"] == "raw")]
    for r in diagonal.itertuples():
        setting = "per_category" if r.model == "per_category" else "model_unified"
        own = m[(m["method"] == r.method) & (m["set"] == r.set) & (m["seed"] == r.seed) & (m["data"] == "test")
                & (m["setting"] == setting) & (m["category"] == r.normal_of)]
        assert own["fpr"].iloc[0] == pytest.approx(r.fpr)

    bank = tables["bank"]
    assert set(bank["method"]) == {"patchcore"}
    shares = bank.groupby(["set", "seed"])[["bank_share", "train_share"]].sum()
    assert np.allclose(shares.to_numpy(), 1)
    per_image = (run.config.model.image_size // 8) ** 2
    for _, g in bank.groupby(["set", "seed"]):
        n_train = len(g) * run.config.unified.n_train * per_image
        assert g["n_train_patches"].sum() == n_train
        assert g["n_bank"].sum() == int(n_train * run.config.methods["patchcore"].coreset_ratio)

    covariance = tables["covariance"]
    assert set(covariance["method"]) == {"padim"} and set(covariance["seed"]) == {0}
    assert (covariance["trace_ratio"] > 1).all()  # pooling widens every category's Gaussian

    curve = tables["curve"]
    assert set(curve["n_categories"]) == {2, 3} and set(curve["seed"]) == {0}
    two = curve[curve["n_categories"] == 2]
    assert set(two["pool"]) == {"gamma+alpha"} and set(two["data"]) == {"test", "control_1"}
    assert set(curve.loc[curve["n_categories"] == 3, "data"]) == {"test", "control_1"}  # what every step scored

    intervals = tables["intervals"]
    mean = intervals[intervals["category"] == "mean"]
    assert len(mean) == 2 * 2 * 3 and (mean["n_replicates"] == 2).all()
    assert (mean["lo"] <= mean["estimate"]).all() and (mean["estimate"] <= mean["hi"]).all()

    written = unified.write_tables(run, tables)
    assert {p.parent.name for p in written} == set(unified.TABLES.values())
    assert len(pd.read_csv(run.table("unified_metrics"))) == len(m)


# --- configuration, data and paths -------------------------------------------------------------------------------


def _load(tmp_path, raw):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return config.load(path)


def test_default_sets_add_the_generated_look_alikes_on_synthetic_data(tmp_path):
    cfg = _load(tmp_path, {"data": {"dataset": "synthetic", "root": "d", "categories": ["carpet", "hazelnut",
                                                                                       "zipper"]}})
    assert cfg.unified_sets == {"far": ("carpet", "hazelnut", "zipper"),
                                "close": ("carpet", "rug", "hazelnut", "walnut")}
    assert cfg.unified_curve == ("carpet", "rug", "hazelnut", "walnut", "zipper")
    assert cfg.unified_extra_categories == ("rug", "walnut")
    folder = _load(tmp_path, {"data": {"dataset": "folder", "root": "d", "categories": ["a", "b"]}})
    assert folder.unified_sets == {"far": ("a", "b")} and folder.unified_extra_categories == ()
    single = _load(tmp_path, {"data": {"dataset": "synthetic", "root": "d", "categories": ["carpet"]}})
    assert single.unified_sets == {"close": ("carpet", "rug")}


@pytest.mark.parametrize("unified_section, message", [
    ({"sets": {"x": ["carpet"]}}, r"'unified.sets.x' must pool at least two categories"),
    ({"sets": {"x": ["carpet", "carpet"]}}, r"'unified.sets.x' lists a category twice"),
    ({"sets": {"x": ["carpet", "screw"]}}, r"'unified.sets' names categories the generator cannot make: \['screw'\]"),
    ({"sets": {"curve_2": ["carpet", "hazelnut"]}}, r"not start with 'curve_'"),
    ({"curve": ["carpet"]}, r"'unified.curve' must list two or more distinct categories"),
    ({"control_patches": [0.3, 1.2]}, r"'unified.control_patches' must list shares in \(0, 1\]"),
    ({"n_train": 1}, r"'unified.n_train' must be at least 2"),
    ({"normal_quantile": 100}, r"'unified.normal_quantile' must lie in \(0, 100\)"),
    ({"threshold": "f1_optimal"}, r"'unified.threshold' must be one of"),
])
def test_bad_unified_settings_are_named(tmp_path, unified_section, message):
    raw = {"data": {"dataset": "synthetic", "root": "d", "categories": ["carpet", "hazelnut"]},
           "unified": unified_section}
    with pytest.raises(ProfileError, match=message):
        _load(tmp_path, raw)


def test_calibration_normals_are_required(tmp_path):
    with pytest.raises(ProfileError, match=r"'data.calib_size' must be at least 2"):
        _load(tmp_path, {"data": {"dataset": "synthetic", "root": "d", "categories": ["carpet"], "calib_size": 1}})


def test_the_extra_categories_belong_to_the_first_draw_and_the_control_lies_beside_the_data(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"data": {"dataset": "synthetic", "root": str(tmp_path / "data" / "synthetic"),
                                             "categories": ["carpet", "zipper"], "draws": [3, 4]},
                                    "output": {"runs_dir": str(tmp_path / "runs")}}))
    run = Run.open(path)
    assert prepare.draw_categories(run, 3) == ("carpet", "zipper", "rug")
    assert prepare.draw_categories(run, 4) == ("carpet", "zipper")
    assert run.control_root(3, 0.5) == tmp_path / "data" / "cross_category" / "synthetic" / "seed=3" / \
        "patch=0.5" / "per_pair=4"


def test_a_manifest_without_the_extra_categories_is_named(tiny_mvtec, tmp_path, monkeypatch):
    run = tiny_run(tiny_mvtec, tmp_path, monkeypatch, {"unified": {"sets": {"x": ["alpha", "beta", "gamma"]}},
                                                        "data": {"categories": ["alpha", "beta"]}})
    with pytest.raises(ValueError, match=r"lacks the unified study's categories \['gamma'\]: run notebooks/00"):
        unified.ensure_control(run)
