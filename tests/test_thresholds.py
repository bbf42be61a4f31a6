"""Thresholds: fitted on validation data only, hand-checked regimes, fallbacks, numpy references, recovery."""
import warnings

import numpy as np
import pandas as pd
import pytest

from helpers import metrics
from helpers.thresholds import (POLICIES, ScoreSet, Threshold, evaluate_at, fit_pixel_threshold,
                                fit_threshold, images_needed, recovered_fraction, recovery_curve,
                                regime_rows)


def scored_split(seed: int, n_normal: int, n_anomalous: int, shift: float = 0.0, gap: float = 1.5):
    """Normal scores ~ N(shift, 1), anomalous ~ N(shift + gap, 1), with 8x8 masks and maps to match."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_normal, bool), np.ones(n_anomalous, bool)]
    scores = rng.normal(shift + gap * labels, 1.0)
    masks = np.zeros((labels.size, 8, 8), bool)
    masks[labels, 2:5, 3:6] = True
    maps = rng.normal(shift + gap * masks, 1.0)
    return ScoreSet(labels, scores, masks, maps)


# --- (1) thresholds never see the test split ------------------------------------------------------------

def test_regime_thresholds_come_from_validation_only():
    val, test = scored_split(0, 30, 10), scored_split(1, 30, 10, shift=2.0)
    assert fit_threshold("f1_optimal", val.labels, val.scores).value != metrics.f1_max(test.labels, test.scores)[1]
    rows = regime_rows({"threshold_only": (val, test)}, policies=POLICIES).set_index("policy")
    for policy in POLICIES:
        assert rows.loc[policy, "threshold"] == fit_threshold(policy, val.labels, val.scores).value
        assert rows.loc[policy, "pixel_threshold"] == fit_pixel_threshold(policy, val.masks, val.maps).value
    assert rows.loc["f1_optimal", "threshold"] != metrics.f1_max(test.labels, test.scores)[1]

    # Wildly different test arrays (other size, scale, order) move the metrics but never a threshold.
    rng = np.random.default_rng(2)
    wild = scored_split(3, 5, 50, shift=1e6, gap=-1e5)
    wild = wild._replace(scores=wild.scores * rng.choice([-1e3, 1e3], wild.scores.size))
    other = regime_rows({"threshold_only": (val, wild)}, policies=POLICIES).set_index("policy")
    fitted = ["threshold", "pixel_threshold", "n_val", "n_val_anomalous", "policy_used", "note"]
    pd.testing.assert_frame_equal(rows[fitted], other[fitted])
    assert not rows["f1"].equals(other["f1"])


# --- (2) each regime computes what it says, by hand -----------------------------------------------------

def test_regimes_on_hand_built_scores():
    test_labels = np.array([0, 0, 0, 1, 1, 1])
    regimes = {
        # clean model: clean val [1 2 3 | 5 6] for the threshold, shifted test for the evaluation
        "none": (ScoreSet([0, 0, 0, 1, 1], [1, 2, 3, 5, 6]), ScoreSet(test_labels, [4, 5, 7, 6, 8, 10])),
        # clean model, threshold from the shifted val (+3)
        "threshold_only": (ScoreSet([0, 0, 0, 1, 1], [4, 5, 6, 8, 9]), ScoreSet(test_labels, [4, 5, 7, 6, 8, 10])),
        # refitted model: its own shifted val and test scores
        "full": (ScoreSet([0, 0, 0, 1, 1], [1, 2, 3, 6, 7]), ScoreSet(test_labels, [1, 2, 3, 6, 7, 8])),
    }
    rows = regime_rows(regimes, policies=["f1_optimal", "mean_3sigma"], k=1.0).set_index(["regime", "policy"])
    expected = {  # threshold, precision, recall, f1, fpr
        ("none", "f1_optimal"): (5, 3 / 5, 1, 3 / 4, 2 / 3),  # flags 5 7 6 8 10
        ("threshold_only", "f1_optimal"): (8, 1, 2 / 3, 4 / 5, 0),  # flags 8 10
        ("full", "f1_optimal"): (6, 1, 1, 1, 0),
        # mean + 1 sample std of normals: [1 2 3] -> 2 + 1 = 3, [4 5 6] -> 5 + 1 = 6
        ("none", "mean_3sigma"): (3, 1 / 2, 1, 2 / 3, 1),
        ("threshold_only", "mean_3sigma"): (6, 3 / 4, 1, 6 / 7, 1 / 3),  # flags 7 6 8 10
        ("full", "mean_3sigma"): (3, 3 / 4, 1, 6 / 7, 1 / 3),  # flags 3 6 7 8
    }
    for key, values in expected.items():
        got = rows.loc[key, ["threshold", "precision", "recall", "f1", "fpr"]].to_numpy(float)
        np.testing.assert_allclose(got, values, err_msg=str(key))
    assert rows["seg_f1"].isna().all() and rows["pixel_threshold"].isna().all()
    assert (rows["n_val"] == 5).all() and (rows["n_val_anomalous"] == 2).all() and (rows["note"] == "").all()


def test_evaluate_at_pixel_seg_f1_by_hand():
    masks = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], bool)
    maps = np.array([[[0.9, 0.4], [0.6, 0.1]], [[0.7, 0.2], [0.3, 0.0]]])
    # map >= 0.5 flags 0.9 (defect), 0.6 and 0.7 (normal): TP 1, FP 2, FN 1 -> SegF1 2/5
    result = evaluate_at(Threshold(0.5, "f1_optimal", "f1_optimal", "", 2, 1), 0.5, [1, 0], [0.6, 0.4], masks, maps)
    assert result["seg_f1"] == pytest.approx(2 / 5)
    assert (result["threshold"], result["pixel_threshold"], result["f1"], result["fpr"]) == (0.5, 0.5, 1.0, 0.0)
    assert evaluate_at(0.5, None, [1, 0], [0.6, 0.4], masks, maps)["seg_f1"] is None
    assert evaluate_at(0.5, 0.5, [1, 0], [0.6, 0.4], np.zeros_like(masks), maps)["seg_f1"] is None


def test_f1_optimal_matches_hand_answer():
    threshold = fit_threshold("f1_optimal", [0, 0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4, 0.6, 0.8])
    assert (threshold.value, threshold.used, threshold.note, threshold.n_val, threshold.n_anomalous) == \
        (0.6, "f1_optimal", "", 6, 2)


# --- (3) no anomalous validation image ------------------------------------------------------------------

def test_f1_optimal_without_anomalies_falls_back_loudly():
    scores = np.random.default_rng(0).normal(size=50)
    with pytest.warns(UserWarning, match="no anomalous image"):
        threshold = fit_threshold("f1_optimal", np.zeros(50, bool), scores)
    assert (threshold.policy, threshold.used, threshold.n_anomalous) == ("f1_optimal", "normal_percentile", 0)
    assert "normal_percentile" in threshold.note and "q=99" in threshold.note
    assert threshold.value == pytest.approx(np.percentile(scores, 99))
    assert threshold.value > scores.min() and (scores >= threshold.value).sum() <= 1
    with pytest.warns(UserWarning, match="mean_3sigma"):
        other = fit_threshold("f1_optimal", np.zeros(50, bool), scores, fallback="mean_3sigma")
    assert other.used == "mean_3sigma" and other.value > scores.max() - 1


def test_fallback_reaches_regime_rows_and_pixels():
    val = scored_split(0, 20, 0)
    with pytest.warns(UserWarning):
        row = regime_rows({"none": (val, scored_split(1, 20, 5))}, policies=["f1_optimal"]).iloc[0]
    assert row["policy_used"] == "normal_percentile"
    assert "no anomalous image" in row["note"] and "pixel: no anomalous pixel" in row["note"]


def test_bad_inputs_raise_clearly():
    with pytest.raises(ValueError, match="normal_percentile"):
        fit_threshold("normal_percentile", [1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="mean_3sigma"):
        fit_threshold("mean_3sigma", [0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="f1_optimal"):
        fit_threshold("f1_optimal", [1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="known: f1_optimal, normal_percentile, mean_3sigma"):
        fit_threshold("youden", [0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        fit_threshold("f1_optimal", [0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="binary"):
        fit_threshold("f1_optimal", [0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="normal_percentile"):
        fit_pixel_threshold("normal_percentile", np.ones((2, 2, 2), bool), np.zeros((2, 2, 2)))


# --- (4) normal-only policies against numpy -------------------------------------------------------------

@pytest.mark.parametrize("q", [50.0, 90.0, 99.0, 100.0])
def test_normal_percentile_matches_numpy(q):
    rng = np.random.default_rng(int(q))
    labels, scores = rng.random(80) < 0.3, rng.normal(size=80)
    threshold = fit_threshold("normal_percentile", labels, scores, q=q)
    assert threshold.value == pytest.approx(np.percentile(scores[~labels], q))
    assert (threshold.used, threshold.note) == ("normal_percentile", "")


@pytest.mark.parametrize("k", [1.0, 3.0])
def test_mean_3sigma_matches_numpy(k):
    rng = np.random.default_rng(7)
    labels, scores = rng.random(80) < 0.3, rng.gamma(2.0, size=80)
    normal = scores[~labels]
    assert fit_threshold("mean_3sigma", labels, scores, k=k).value == \
        pytest.approx(normal.mean() + k * normal.std(ddof=1))


def test_pixel_policies_match_numpy():
    val = scored_split(4, 6, 4)
    normal_pixels = val.maps[~val.labels].ravel()  # pixels of normal images only, by design
    assert fit_pixel_threshold("normal_percentile", val.masks, val.maps, q=95).value == \
        pytest.approx(np.percentile(normal_pixels, 95))
    assert fit_pixel_threshold("mean_3sigma", val.masks, val.maps).value == \
        pytest.approx(normal_pixels.mean() + 3 * normal_pixels.std(ddof=1))
    pixel = fit_pixel_threshold("f1_optimal", val.masks, val.maps)
    assert pixel.value == metrics.f1_max(val.masks.ravel(), val.maps.ravel())[1]
    assert (pixel.n_val, pixel.n_anomalous) == (10, 4)


def test_recovered_fraction():
    assert recovered_fraction(0.9, 0.5, 0.8) == pytest.approx(0.75)
    assert recovered_fraction(0.9, 0.5, 0.4) == pytest.approx(-0.25)
    assert np.isnan(recovered_fraction(0.8, 0.8, 0.9))
    assert np.isnan(recovered_fraction(0.7, 0.8, 0.9))


# --- (5) recovery curve ---------------------------------------------------------------------------------

def test_recovery_curve_is_deterministic_and_improves_with_more_images():
    val, test = scored_split(5, 200, 50, gap=4.0), scored_split(6, 200, 50, gap=4.0)
    args = (val.labels, val.scores, test.labels, test.scores, [3, 10, 40, 200], [0])
    curve = recovery_curve(*args, "normal_percentile", repeats=30, seed=1)
    pd.testing.assert_frame_equal(curve, recovery_curve(*args, "normal_percentile", repeats=30, seed=1))
    assert not curve["threshold"].equals(recovery_curve(*args, "normal_percentile", repeats=30, seed=2)["threshold"])
    assert len(curve) == 4 * 30 and list(curve.columns[:3]) == ["n", "n_anomalous", "repeat"]
    # The 99th percentile of 3 normals sits low and flags many test normals; with more normals it settles
    # near the true one, which separates these well-apart classes: mean F1 rises and the spread shrinks.
    by_n = curve.groupby("n")["f1"]
    assert by_n.mean().is_monotonic_increasing and by_n.mean().iloc[-1] > by_n.mean().iloc[0] + 0.05
    assert by_n.std().iloc[-1] < by_n.std().iloc[0]


def test_recovery_curve_skips_impossible_pairs_and_records_fallbacks():
    val = scored_split(7, 10, 3)
    with pytest.warns(UserWarning, match=r"\(5, 5\)"):
        curve = recovery_curve(val.labels, val.scores, val.labels, val.scores, [5, 20], [0, 2, 5],
                               "f1_optimal", repeats=3)
    assert set(zip(curve["n"], curve["n_anomalous"])) == {(5, 0), (5, 2)}
    assert set(curve.loc[curve["n_anomalous"] == 0, "policy_used"]) == {"normal_percentile"}
    assert set(curve.loc[curve["n_anomalous"] == 2, "policy_used"]) == {"f1_optimal"}


def test_images_needed_on_a_constructed_curve():
    medians = {(5, 1): 0.60, (5, 3): 0.70, (10, 1): 0.78, (10, 3): 0.79, (20, 1): 0.90, (20, 3): 0.90}
    curve = pd.DataFrame([dict(n=n, n_anomalous=a, repeat=r, f1=f1 + offset)
                          for (n, a), f1 in medians.items() for r, offset in enumerate([-0.1, 0.0, 0.1])])
    assert images_needed(curve, 0.80) == (10, 1)  # 0.78 is within 0.02
    assert images_needed(curve, 0.80, tolerance=0.0) == (20, 1)
    assert images_needed(curve, 0.80, quantile=0.0) == (20, 1)  # worst draw 0.80
    assert images_needed(curve, 0.95) is None
    assert images_needed(curve, 0.5) == (5, 1)


# --- (6) pixel subsampling ------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
def test_pixel_subsampling_is_deterministic(policy):
    val = scored_split(8, 30, 20, gap=3.0)  # 50 x 64 = 3200 pixels, 1920 of them in normal images
    full = fit_pixel_threshold(policy, val.masks, val.maps)
    first = fit_pixel_threshold(policy, val.masks, val.maps, max_pixels=1000, seed=3)
    assert first == fit_pixel_threshold(policy, val.masks, val.maps, max_pixels=1000, seed=3)
    assert first.value != fit_pixel_threshold(policy, val.masks, val.maps, max_pixels=1000, seed=4).value
    assert first.value != full.value
    # Close to the full-data answer: F1-optimal pixel thresholds sit on a flat F1 curve, so compare F1 there.
    if policy == "f1_optimal":
        best_f1 = metrics.f1_max(val.masks.ravel(), val.maps.ravel())[0]
        assert metrics.pixel_at_threshold(val.masks, val.maps, first.value)["f1"] > best_f1 - 0.05
    else:
        assert abs(first.value - full.value) < 0.3
    # A cap at or above the pool size changes nothing.
    assert fit_pixel_threshold(policy, val.masks, val.maps, max_pixels=3200, seed=9) == full


def test_recovery_curve_does_not_warn_per_fit():
    val = scored_split(9, 10, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recovery_curve(val.labels, val.scores, val.labels, val.scores, [5], [0], "f1_optimal", repeats=5)
