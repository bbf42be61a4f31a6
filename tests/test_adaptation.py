"""Threshold regimes: every regime at a (budget, draw) uses the same target images, no threshold, normalisation
or fit reads a test image, cross-fitting never scores an image with a model fitted on it, the summaries compute
what they say, and the detectors' ``adapted`` keeps the source model."""
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import adaptation, experiments, thresholds
from helpers.adaptation import Plan, Scored, SourceCalibration
from helpers.detector import Prediction
from helpers.thresholds import PixelCounter

CONDITION = experiments.Condition("domain", "brightness", 3)
ESTIMATORS = tuple(thresholds.estimators(["normal_percentile", "mean_3sigma", "conformal"], alphas=(0.01, 0.05)))
PLAN = Plan(ESTIMATORS, budgets=(4, 10, 25), draws=5, anomalies=(0, 1, 3), adapt_budgets=(6, 10, 25),
            refit_budgets=(6, 25), folds=2, seed=0)
THRESHOLD_COLUMNS = ["regime", "estimator", "budget", "anomalies", "draw", "target_set", "n_threshold_images",
                     "threshold", "pixel_threshold"]


# --- which images -----------------------------------------------------------------------------------------

def test_target_subsets_are_seeded_sized_and_shared_by_everything_but_the_draw():
    first = adaptation.target_subset(40, 10, 3, "alpha", CONDITION)
    assert np.array_equal(first, adaptation.target_subset(40, 10, 3, "alpha", CONDITION))
    assert len(first) == 10 == len(set(first)) and np.all(np.diff(first) > 0) and first.max() < 40
    others = [adaptation.target_subset(40, 10, d, "alpha", CONDITION) for d in range(10)]
    assert len({tuple(s) for s in others}) == 10, "draws are different subsets"
    assert not np.array_equal(first, adaptation.target_subset(40, 10, 3, "beta", CONDITION))
    assert not np.array_equal(first, adaptation.target_subset(40, 10, 3, "alpha",
                                                              experiments.Condition("domain", "blur", 3)))
    assert not np.array_equal(first, adaptation.target_subset(40, 10, 3, "alpha", CONDITION, seed=1))
    assert np.array_equal(adaptation.target_subset(40, 40, 7, "alpha", CONDITION), np.arange(40))
    assert list(adaptation.draws_for(40, 40, 10)) == [0] and list(adaptation.draws_for(10, 40, 10)) == list(range(10))
    with pytest.raises(ValueError, match="budget 41"):
        adaptation.target_subset(40, 41, 0, "alpha", CONDITION)
    assert adaptation.set_id(["b", "a"]) == adaptation.set_id(["a", "b"]) != adaptation.set_id(["a", "c"])


# --- synthetic score sets ---------------------------------------------------------------------------------

def _scored(seed: int, n_normal: int, n_anomalous: int, shift: float = 0.0, role: str = "calib", side: int = 8,
            prefix: str = "img") -> Scored:
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_normal, bool), np.ones(n_anomalous, bool)]
    masks = np.zeros((labels.size, side, side), bool)
    masks[labels, 2:5, 3:6] = True
    maps = rng.normal(shift + 2.0 * masks, 1.0).astype(np.float32)
    scores = maps.reshape(len(maps), -1).max(axis=1).astype(np.float64)
    keys = np.array([f"{prefix}/{i:03d}.png" for i in range(labels.size)])
    stride = adaptation.PIXEL_STRIDE
    out = Scored(keys, labels, scores, maps[:, ::stride, ::stride].reshape(len(maps), -1))
    if role == "test":
        out.counter = PixelCounter(masks, maps)
    elif role == "val":
        out.masks, out.maps = masks, maps
    return out


def test_seg_f1_is_the_same_from_the_counter_and_from_kept_masks_and_maps():
    counted, kept = _scored(5, 6, 9, role="test"), _scored(5, 6, 9, role="val")
    on_a_pixel = float(kept.maps[kept.masks][5])  # a pixel exactly at the threshold counts as flagged
    for pixel_threshold in (0.5, 1.5, 2.5, on_a_pixel, 9.0):
        by_counter = adaptation.evaluate(counted, 1.0, pixel_threshold)["seg_f1"]
        assert by_counter > 0 or pixel_threshold == 9.0
        assert adaptation.evaluate(kept, 1.0, pixel_threshold)["seg_f1"] == pytest.approx(by_counter)
    assert adaptation.evaluate(kept, 1.0, None)["seg_f1"] is None


def _source_case(test: Scored):
    clean_calib = _scored(0, 30, 0, prefix="clean")
    source = SourceCalibration.fit(PLAN, clean_calib)
    calib, val = _scored(1, 25, 0, shift=1.0, prefix="calib"), _scored(2, 10, 8, shift=1.0, role="val", prefix="val")
    labels = dict(method="m", seed=0, data_draw=0)
    rows = adaptation.source_rows(labels, "alpha", CONDITION, PLAN, source, calib, val, test)
    return pd.DataFrame(rows, columns=adaptation.ROW_COLUMNS), source, calib, val


def test_no_source_regime_reads_the_test_split():
    rows, *_ = _source_case(_scored(3, 20, 30, shift=1.0, role="test", prefix="test"))
    assert set(rows["regime"]) == {"none", "threshold_only", "normalised", "labelled", "oracle"}
    # A wildly different test split (other size, scale, prevalence, maps) moves every metric, never a threshold.
    wild = _scored(4, 7, 2, shift=-50.0, role="test", prefix="other")
    wild.scores = wild.scores * 1e3
    other, *_ = _source_case(wild)
    pd.testing.assert_frame_equal(rows[THRESHOLD_COLUMNS], other[THRESHOLD_COLUMNS])
    assert not rows["balanced_accuracy"].equals(other["balanced_accuracy"])
    assert not rows["n_test"].equals(other["n_test"])
    assert rows["oracle"].sum() == 1 and rows.loc[rows["oracle"], "regime"].item() == "oracle"


def test_source_regimes_compute_what_they_say_on_the_same_images():
    rows, source, calib, val = _source_case(_scored(3, 20, 30, shift=1.0, role="test", prefix="test"))
    for r in rows[rows["regime"] == "none"].itertuples():
        assert r.threshold == source.image[r.estimator] and r.pixel_threshold == source.pixel[r.estimator]
    by_name = {e.name: e for e in ESTIMATORS}
    anomalous = val.scores[val.labels]
    for (budget, draw), cell in rows[rows["budget"].isin(PLAN.budgets) & (rows["regime"] != "oracle")].groupby(
            ["budget", "draw"]):
        subset = adaptation.target_subset(25, budget, draw, "alpha", CONDITION)
        # Every regime at this (budget, draw) used exactly these N images.
        assert set(cell["target_set"]) == {adaptation.set_id(calib.keys[subset])}
        scores, pixels = calib.scores[subset], calib.pixels[subset].ravel()
        for r in cell.itertuples():
            if r.regime == "threshold_only":
                assert r.threshold == by_name[r.estimator].fit(scores)
                assert r.pixel_threshold == by_name[r.estimator].fit(pixels)
            elif r.regime == "normalised":
                z = (source.image[r.estimator] - source.image_mean) / source.image_sd
                expected = scores.mean() + scores.std(ddof=1) * z if np.isfinite(z) else z
                assert r.threshold == pytest.approx(expected)
            else:
                order = adaptation.anomaly_order(len(anomalous), draw, "alpha", CONDITION)
                assert r.threshold == thresholds.balanced_optimal_threshold(scores, anomalous[order[:r.anomalies]])
                assert r.n_threshold_images == budget + r.anomalies
    # The whole pool is one draw; smaller budgets have PLAN.draws.
    assert rows.groupby("budget")["draw"].nunique().to_dict() == {0: 1, 4: 5, 10: 5, 25: 1}
    # mean + k sigma: normalising and re-estimating are the same threshold by construction.
    both = rows[rows["estimator"] == "mean_3sigma"].pivot_table(index=["budget", "draw"], columns="regime",
                                                                  values="threshold")
    np.testing.assert_allclose(both["normalised"], both["threshold_only"])


# --- cross-fitted models ----------------------------------------------------------------------------------

class Memorising:
    """A stand-in detector over features ``{"id": (N, 1, 1, 1)}`` holding each image's id: it scores an image 0 if
    it was fitted on it (as a memory bank scores its own patches) and 1 + id/100 otherwise, and logs every call."""

    log: list = []

    def __init__(self, fitted=()):
        self.fitted = set(fitted)

    def fit_features(self, feats):
        fitted = Memorising(int(i) for i in feats["id"].flatten())
        Memorising.log.append(("fit", frozenset(fitted.fitted)))
        return fitted

    def predict_features(self, feats):
        ids = [int(i) for i in feats["id"].flatten()]
        Memorising.log.append(("predict", frozenset(self.fitted), frozenset(ids)))
        scores = np.array([0.0 if i in self.fitted else 1 + i / 100 for i in ids], np.float32)
        return Prediction(scores, np.repeat(scores[:, None, None], 8, 1).repeat(8, 2))


def _model_case(test_ids):
    Memorising.log = []
    pool = 25
    calib_feats = {"id": torch.arange(pool, dtype=torch.float32).view(-1, 1, 1, 1)}
    test_feats = {"id": torch.tensor(test_ids, dtype=torch.float32).view(-1, 1, 1, 1)}
    test_rows = pd.DataFrame({"image": [f"t{i}" for i in test_ids], "label": [i % 2 for i in range(len(test_ids))],
                              "mask": [""] * len(test_ids), "mask_path": [None] * len(test_ids)})
    source = Memorising()
    fits = {"adapted": lambda f: source.fit_features(f), "refit": lambda f: Memorising().fit_features(f)}
    keys = np.array([f"calib/{i:03d}.png" for i in range(pool)])
    rows = adaptation.model_rows(dict(method="m", seed=0, data_draw=0), "alpha", CONDITION, PLAN, fits, keys,
                                 calib_feats, test_rows, test_feats)
    return pd.DataFrame(rows, columns=adaptation.ROW_COLUMNS), keys, list(Memorising.log)


def test_cross_fitting_never_scores_an_image_with_a_model_fitted_on_it_and_never_fits_on_test():
    test_ids = list(range(100, 130))
    rows, keys, log = _model_case(test_ids)
    fitted_sets = [entry[1] for entry in log if entry[0] == "fit"]
    assert all(not (s & set(test_ids)) for s in fitted_sets), "a model was fitted on a test image"
    for _, model, scored_ids in (e for e in log if e[0] == "predict"):
        if scored_ids & set(test_ids):
            assert scored_ids == set(test_ids)  # the deployed model, fitted on the N images
        else:
            assert not (model & scored_ids), "an out-of-fold score came from a model fitted on that image"
    # Memorised scores are 0: a threshold from them would be 0 for percentile and mean + 3 sigma.
    assert (rows.loc[rows["estimator"].isin(["percentile_99", "mean_3sigma"]), "threshold"] > 1).all()
    for (budget, draw), cell in rows.groupby(["budget", "draw"]):
        subset = adaptation.target_subset(25, budget, draw, "alpha", CONDITION)
        assert set(cell["target_set"]) == {adaptation.set_id(keys[subset])}
        assert set(cell["regime"]) == ({"adapted"} if budget == 10 else {"adapted", "refit"})
        deployed = [e[1] for e in log if e[0] == "predict" and e[2] == set(test_ids)]
        assert frozenset(subset.tolist()) in deployed
    assert rows.groupby("budget")["draw"].nunique().to_dict() == {6: 5, 10: 5, 25: 1}


def test_model_regime_thresholds_do_not_depend_on_the_test_split():
    rows, _, _ = _model_case(list(range(100, 130)))
    other, _, _ = _model_case(list(range(500, 507)))
    pd.testing.assert_frame_equal(rows[THRESHOLD_COLUMNS], other[THRESHOLD_COLUMNS])
    assert not rows["n_test"].equals(other["n_test"])


# --- summaries --------------------------------------------------------------------------------------------

def _rows(values: dict, categories=("alpha", "beta"), seeds=(0, 1), draws=1) -> pd.DataFrame:
    """Rows with balanced accuracy ``values[(regime, budget)]`` (a number, or a function of category, seed, draw)."""
    out = []
    for (regime, budget), value in values.items():
        clean = regime == "clean"
        for category in categories:
            for seed in seeds:
                for draw in range(draws if budget and budget < 40 else 1):
                    v = value(category, seed, draw) if callable(value) else value
                    if v is None:
                        continue
                    out.append(dict(method="m", seed=seed, category=category, mode="none" if clean else "domain",
                                    transform="none" if clean else "blur", severity=0 if clean else 3,
                                    regime=regime, estimator="f1_optimal" if regime == "oracle" else "percentile_99",
                                    alpha=0.01, oracle=regime == "oracle", budget=budget, anomalies=0, draw=draw,
                                    balanced_accuracy=v, mcc=v, f1=v, fpr=1 - v, tpr=v, seg_f1=np.nan,
                                    f1_flag_all=0.75, fp=0, tn=1, threshold=1.0, n_threshold_images=budget))
    return pd.DataFrame(out)


def test_summary_averages_seeds_within_a_draw_and_resamples_draws():
    rows = _rows({("threshold_only", 10): lambda c, s, d: 0.6 + 0.1 * d + 0.01 * s,
                  ("none", 0): 0.5, ("oracle", 20): 0.9}, draws=3)
    summary = adaptation.summarise(rows, n_resamples=2000).set_index("regime")
    only = summary.loc["threshold_only"]
    assert only["balanced_accuracy"] == pytest.approx(0.705)  # draws 0.6, 0.7, 0.8 plus the seed mean 0.005
    assert only["balanced_accuracy_lo"] < 0.66 and only["balanced_accuracy_hi"] > 0.75
    assert 0.6 <= only["balanced_accuracy_lo"] <= 0.705 <= only["balanced_accuracy_hi"] <= 0.81
    assert (only["n_draws"], only["n_categories"], only["n_seeds"], only["n_rows"]) == (3, 2, 2, 12)
    none = summary.loc["none"]
    assert none["balanced_accuracy_lo"] == none["balanced_accuracy_hi"] == 0.5 and none["n_draws"] == 1
    assert bool(summary.loc["oracle", "oracle"]) and not bool(only["oracle"])
    assert math.isnan(only["seg_f1"])


def test_recovered_share_by_hand_and_over_the_seeds_a_regime_has():
    rows = _rows({("clean", 0): 0.9, ("none", 0): lambda c, s, d: 0.5 if s == 0 else 0.7,
                  ("threshold_only", 10): 0.8, ("refit", 40): lambda c, s, d: 0.6 if s == 0 else None})
    recovery = adaptation.recovery(rows, min_loss=0.02).set_index("regime")
    # threshold_only over seeds 0 and 1: none 0.6, loss 0.3, gain 0.2.
    assert recovery.loc["threshold_only", "share"] == pytest.approx(2 / 3)
    # refit ran for seed 0 only: its none level is seed 0's (0.5), loss 0.4, gain 0.1.
    assert recovery.loc["refit", "share"] == pytest.approx(0.25)
    assert recovery.loc["refit", "loss"] == pytest.approx(0.4) and recovery.loc["refit", "n_seeds"] == 1
    no_loss = adaptation.recovery(_rows({("clean", 0): 0.8, ("none", 0): 0.79, ("threshold_only", 10): 0.9}))
    assert math.isnan(no_loss["share"].item()) and "nothing to recover" in no_loss["note"].item()


def test_plateau_and_labels_needed_by_hand():
    levels = {5: 0.60, 10: 0.75, 20: 0.755, 40: 0.76}
    rows = _rows({("threshold_only", b): v for b, v in levels.items()})
    plateau = adaptation.plateau(adaptation.summarise(rows, n_resamples=10)).iloc[0]
    assert plateau["stops_gaining_at"] == 10 and plateau["largest_budget"] == 40 and not plateau["still_gaining"]
    rising = _rows({("threshold_only", 5): 0.6, ("threshold_only", 40): 0.8})
    assert adaptation.plateau(adaptation.summarise(rising, n_resamples=10)).iloc[0]["still_gaining"]

    summary = pd.DataFrame([dict(method="m", mode="domain", transform="blur", severity=3, regime="labelled",
                                 budget=10, anomalies=a, balanced_accuracy=v, balanced_accuracy_lo=v - 0.1,
                                 balanced_accuracy_hi=v + 0.1, n_draws=10)
                            for a, v in [(0, 0.6), (1, 0.7), (2, 0.89), (4, 0.95)]]
                           + [dict(method="m", mode="domain", transform="blur", severity=3, regime="oracle", budget=20,
                                   anomalies=30, balanced_accuracy=0.9, n_draws=1)])
    needed = adaptation.labels_needed(summary, tolerance=0.02).iloc[0]
    assert needed["anomalies_needed"] == 2 and needed["level_without_labels"] == 0.6 and needed["oracle_level"] == 0.9


def test_calibration_sums_false_positives_over_categories_with_an_exact_interval():
    from helpers.stats import clopper_pearson

    base = dict(method="m", seed=0, mode="domain", transform="blur", severity=3, estimator="conformal_0.05",
                alpha=0.05, anomalies=0, draw=0, threshold=1.0)
    cells = [("alpha", "threshold_only", 40, 1, 19, 0), ("beta", "threshold_only", 40, 3, 17, 0),
             ("alpha", "threshold_only", 10, 9, 11, 0), ("alpha", "none", 0, 12, 8, 0),
             # a largest budget drawn twice (smaller than the pool): the same test normals would count twice
             ("gamma", "threshold_only", 40, 5, 15, 0), ("gamma", "threshold_only", 40, 5, 15, 1)]
    rows = pd.DataFrame([{**base, "category": c, "regime": r, "budget": b, "fp": fp, "tn": tn, "draw": d,
                          "n_threshold_images": b or 40} for c, r, b, fp, tn, d in cells]
                        + [{**base, "category": "alpha", "regime": "threshold_only", "budget": 40, "fp": 0, "tn": 20,
                            "n_threshold_images": 40, "estimator": "percentile_99", "alpha": 0.01}])
    calib = adaptation.calibration(rows).set_index("regime")
    assert set(calib.index) == {"threshold_only", "none"}, "only conformal rows; only the whole pool's draw"
    pooled = calib.loc["threshold_only"]
    assert (pooled["false_positives"], pooled["test_normals"], pooled["budget"]) == (4, 40, 40)
    assert (pooled["fpr_lo"], pooled["fpr_hi"]) == pytest.approx(clopper_pearson(4, 40))
    assert pooled["within"] and pooled["expected_fpr"] == pytest.approx(2 / 41)
    assert not calib.loc["none", "within"]  # 12 of 20: far above 5 %


# --- the detectors' adapted() ----------------------------------------------------------------------------

def _random_feats(detector, n: int, seed: int) -> dict:
    from helpers import backbones

    spec = backbones.spec(detector.backbone)
    gen = torch.Generator().manual_seed(seed)
    channels = {"blocks.1": 24, "blocks.2": 40, "blocks.4": 112}
    return {s: torch.randn(n, channels[s], detector.image_size // spec.stages[s],
                           detector.image_size // spec.stages[s], generator=gen) for s in detector.stages}


def test_patchcore_adapted_keeps_its_bank_and_adds_a_coreset_of_the_new_images():
    from helpers.patchcore import PatchCore

    source = PatchCore(image_size=64, coreset_ratio=0.25, k=3, device="cpu")
    source.fit_features(_random_feats(source, 6, 0))
    bank = source.memory_bank.clone()
    new = {s: t + 3.0 for s, t in _random_feats(source, 4, 1).items()}  # another domain
    adapted = source.adapted(new)
    assert torch.equal(source.memory_bank, bank), "the source model is unchanged"
    n_new = int(4 * 8 * 8 * 0.25)  # 4 images x 8x8 patches x coreset ratio
    assert len(adapted.memory_bank) == len(bank) + n_new and torch.equal(adapted.memory_bank[:len(bank)], bank)
    assert (adapted.bank_sources[len(bank):] == -1).all()
    held_out = {s: t + 3.0 for s, t in _random_feats(source, 3, 2).items()}
    assert (adapted.predict_features(held_out).image_scores < source.predict_features(held_out).image_scores).all()


def test_padim_adapted_re_estimates_the_means_and_keeps_the_covariances():
    from helpers.padim import Padim

    source = Padim(image_size=64, n_features=20, device="cpu")
    source.fit_features(_random_feats(source, 8, 0))
    mean, inverse = source.model.gaussian.mean.clone(), source.model.gaussian.inv_covariance.clone()
    new = {s: t + 2.0 for s, t in _random_feats(source, 5, 1).items()}
    adapted = source.adapted(new)
    assert torch.equal(source.model.gaussian.mean, mean), "the source model is unchanged"
    assert torch.equal(source.model.gaussian.inv_covariance, inverse)
    assert source.model.gaussian is not adapted.model.gaussian
    assert torch.equal(adapted.model.gaussian.inv_covariance, inverse)
    embedding = source.model.generate_embedding(new)
    expected = embedding.reshape(5, embedding.shape[1], -1).mean(0)
    torch.testing.assert_close(adapted.model.gaussian.mean, expected)
    held_out = {s: t + 2.0 for s, t in _random_feats(source, 3, 2).items()}
    assert (adapted.predict_features(held_out).image_scores < source.predict_features(held_out).image_scores).all()


def test_a_detector_without_adaptation_says_so():
    from helpers.detector import Detector

    class Plain(Detector):
        method = "plain"
        from_settings = fit_features = predict_features = save = load = settings = None

    with pytest.raises(NotImplementedError, match="Plain.adapted .*'plain'"):
        Plain().adapted({})


# --- end to end on a tiny generated dataset, both methods -------------------------------------------------

@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    from data_prep import prepare
    from tests.conftest import write_tiny_mvtec
    from tests.helpers_run import tiny_run

    base = tmp_path_factory.mktemp("thresholds")
    root = write_tiny_mvtec(base / "tiny", n_train=30, n_good=40)
    with pytest.MonkeyPatch.context() as mp:
        run = tiny_run(root, base, mp, overrides={
            "data": {"calib_size": 20}, "model": {"seeds": [0]},
            "thresholds": {"transforms": ["brightness"], "severities": [3], "budgets": [4, 20], "draws": 3,
                           "adapt_budgets": [4], "refit_budgets": [4], "anomalies": [0, 2]}})
        # The shifted copy holds what shift_needs asks of a threshold condition: calib, val and test, no train.
        needs = {key: parts for key, parts in experiments.shift_needs(run).items() if key == (0, CONDITION)}
        assert needs == {(0, CONDITION): {"calib", "val", "test"}}
        [copy] = prepare.build_shifts(run, needs, progress=False)
        yield run, copy, adaptation.run(run, progress=False), mp


def test_every_regime_at_a_budget_and_draw_uses_the_same_target_images(tiny_study):
    run, _, result, _ = tiny_study
    rows, sets = result["rows"], result["target_sets"]
    drawn = rows[rows["target_set"].fillna("") != ""]
    assert set(drawn["regime"]) == {"threshold_only", "normalised", "labelled", "adapted", "refit"}
    for (category, budget, draw), cell in drawn.groupby(["category", "budget", "draw"]):
        assert cell["target_set"].nunique() == 1, f"{category} N={budget} draw {draw}: regimes saw different images"
        images = sets[(sets["category"] == category) & (sets["budget"] == budget) & (sets["draw"] == draw)]
        assert len(images) == budget and set(images["target_set"]) == set(cell["target_set"])
        calib = experiments.rows_of(run, 0, category, "calib", CONDITION)["image"]
        test = experiments.rows_of(run, 0, category, "test", CONDITION)["image"]
        assert set(images["image"]) <= set(calib) and not set(images["image"]) & set(test)
        if budget == 4:
            assert {"adapted", "refit"} <= set(cell["regime"]) and cell["method"].nunique() == 2


def test_no_threshold_of_any_regime_moves_when_the_test_images_change(tiny_study):
    run, copy, result, mp = tiny_study
    for category in run.config.data.categories:  # new content for every test image, clean and shifted
        for root in (run.data_root(0), copy):
            for path in experiments.rows_of(run, 0, category, "test", experiments.CLEAN, run.manifest(0))["image"]:
                target, donor = root / path, root / path.replace("test/good/", "train/good/").replace("test/", "train/")
                if not donor.is_file():
                    donor = next((root / category / "train" / "good").glob("*.png"))
                shutil.copyfile(donor, target)
    again = adaptation.run(run, progress=False, memo=False)["rows"]  # the job cache would return the old rows
    before = result["rows"]
    keys = ["method", "seed", "category", "transform", "regime", "estimator", "budget", "anomalies", "draw"]
    merged = before.merge(again, on=keys, suffixes=("", "_again"))
    assert len(merged) == len(before) == len(again)
    assert set(merged["regime"]) == set(adaptation.REGIMES)
    for column in ["threshold", "pixel_threshold", "target_set"]:
        pd.testing.assert_series_equal(merged[column], merged[f"{column}_again"], check_names=False)
    assert not np.allclose(merged["balanced_accuracy"], merged["balanced_accuracy_again"])


def test_the_conformal_threshold_keeps_its_rate_on_clean_test_normals_for_both_methods(tiny_study):
    _, _, result, _ = tiny_study
    calibration = adaptation.calibration(result["rows"])
    clean = calibration[(calibration["regime"] == "clean") & (calibration["alpha"] == 0.05)]
    assert set(clean["method"]) == {"patchcore", "padim"}
    # 20 calib normals: the 20th smallest, a finite threshold whose mean FPR is 1/21.
    assert not clean["infinite"].any() and (clean["n_calibration"] == 20).all()
    assert (clean["test_normals"] == 40).all() and clean["within"].all(), clean.to_string()
