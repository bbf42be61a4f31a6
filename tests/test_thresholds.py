"""Thresholds: the conformal estimator's guarantee, normal-only estimators against numpy, metrics at a fixed
threshold by hand, the labelled F1-optimal oracle and its fallbacks, pixel thresholds and SegF1."""
import math

import numpy as np
import pytest

from helpers import metrics
from helpers.thresholds import (
    POLICIES,
    Estimator,
    PixelCounter,
    ScoreSet,
    Threshold,
    balanced_optimal_threshold,
    conformal_expected_fpr,
    conformal_rank,
    conformal_threshold,
    estimators,
    evaluate_at,
    fit_pixel_threshold,
    fit_threshold,
    flag_everything_f1,
    image_metrics,
    min_normals_for,
)


def scored_split(seed: int, n_normal: int, n_anomalous: int, shift: float = 0.0, gap: float = 1.5):
    """Normal scores ~ N(shift, 1), anomalous ~ N(shift + gap, 1), with 8x8 masks and maps to match."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_normal, bool), np.ones(n_anomalous, bool)]
    scores = rng.normal(shift + gap * labels, 1.0)
    masks = np.zeros((labels.size, 8, 8), bool)
    masks[labels, 2:5, 3:6] = True
    maps = rng.normal(shift + gap * masks, 1.0)
    return ScoreSet(labels, scores, masks, maps)


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


# --- (1) no anomalous validation image ------------------------------------------------------------------

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


# --- (2) normal-only policies against numpy -------------------------------------------------------------

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


# --- (3) pixel subsampling ------------------------------------------------------------------------------

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


# --- (4) the conformal estimator and its guarantee ------------------------------------------------------

def test_conformal_rank_and_the_smallest_calibration_sets():
    # ceil((n + 1)(1 - alpha)): 20 x 0.95 is 19 exactly, float rounding must not make it 20.
    assert conformal_rank(19, 0.05) == 19 and conformal_rank(18, 0.05) == 19 and conformal_rank(40, 0.05) == 39
    assert (min_normals_for(0.05), min_normals_for(0.01), min_normals_for(0.1)) == (19, 99, 9)
    scores = np.random.default_rng(0).normal(size=99)
    # Below the minimum no order statistic keeps FPR <= alpha: the threshold is infinite and flags nothing.
    assert conformal_threshold(scores[:18], 0.05) == math.inf and conformal_threshold(scores[:98], 0.01) == math.inf
    # At the minimum it sits on the largest score; the study's 'score >= threshold' flags only scores above it.
    assert conformal_threshold(scores[:19], 0.05) == np.nextafter(scores[:19].max(), np.inf)
    assert conformal_threshold(scores, 0.01) == np.nextafter(scores.max(), np.inf)
    assert conformal_threshold(scores[:40], 0.05) == np.nextafter(np.sort(scores[:40])[38], np.inf)
    assert conformal_expected_fpr(40, 0.05) == pytest.approx(2 / 41) and conformal_expected_fpr(18, 0.05) == 0.0
    with pytest.raises(ValueError, match="alpha"):
        conformal_threshold(scores, 1.5)
    with pytest.raises(ValueError, match="at least one"):
        conformal_threshold([], 0.05)


def _achieved_fpr(fit, n: int, draws: int = 4000, n_test: int = 100, seed: int = 0, discrete: bool = False):
    """Mean over calibration draws of the FPR on fresh normals drawn from the same (heavy-tailed) distribution."""
    rng = np.random.default_rng(seed)
    calib = rng.lognormal(0.0, 1.0, (draws, n))
    test = rng.lognormal(0.0, 1.0, (draws, n_test))
    if discrete:  # many ties: scores on a coarse grid
        calib, test = np.round(calib), np.round(test)
    values = np.array([fit(row) for row in calib])
    return float((test >= values[:, None]).mean())


@pytest.mark.parametrize("n, alpha", [(19, 0.05), (40, 0.05), (100, 0.05), (99, 0.01), (200, 0.01), (30, 0.1)])
def test_conformal_threshold_keeps_the_mean_fpr_at_most_alpha(n, alpha):
    achieved = _achieved_fpr(lambda s: conformal_threshold(s, alpha), n)
    # 4000 x 100 test normals: the Monte Carlo error of the mean is about 0.001 here.
    assert achieved <= alpha + 0.004
    assert achieved == pytest.approx(conformal_expected_fpr(n, alpha), abs=0.004), "the guarantee is tight"


def test_conformal_threshold_keeps_its_promise_with_ties_and_flags_nothing_below_its_minimum():
    assert _achieved_fpr(lambda s: conformal_threshold(s, 0.05), 40, discrete=True) <= 0.05 + 0.004
    assert _achieved_fpr(lambda s: conformal_threshold(s, 0.05), 18) == 0.0
    # The 99th percentile of 20 normals sits at about their maximum: it flags ~5 % of new normals, not 1 %.
    percentile = Estimator("normal_percentile", 99.0)
    assert _achieved_fpr(percentile.fit, 20) > 0.03


# --- (5) the other estimators, by name and against numpy ------------------------------------------------

def test_estimators_fit_what_they_say():
    rng = np.random.default_rng(3)
    scores = rng.gamma(2.0, size=50)
    chosen = estimators(["normal_percentile", "mean_3sigma", "conformal"], percentile=95.0, sigmas=2.0,
                        alphas=(0.01, 0.05))
    assert [e.name for e in chosen] == ["percentile_95", "mean_2sigma", "conformal_0.01", "conformal_0.05"]
    assert chosen[0].fit(scores) == pytest.approx(np.percentile(scores, 95))
    assert chosen[1].fit(scores) == pytest.approx(scores.mean() + 2 * scores.std(ddof=1))
    assert chosen[2].fit(scores) == math.inf and chosen[3].fit(scores) == conformal_threshold(scores, 0.05)
    assert [e.alpha for e in chosen[::2]] == [pytest.approx(0.05), 0.01] and math.isnan(chosen[1].alpha)
    with pytest.raises(ValueError, match="youden"):
        Estimator("youden", 1.0)
    with pytest.raises(ValueError, match="mean_3sigma needs at least 2"):
        Estimator("mean_3sigma", 3.0).fit([1.0])


def test_balanced_optimal_threshold_by_hand():
    normal = [1.0, 2.0, 3.0]
    # No anomaly: just above the highest normal, so none of them is flagged.
    assert balanced_optimal_threshold(normal, []) == np.nextafter(3.0, np.inf)
    # Candidates 0, 1.5, 2.25, 2.75, 4, >5 give balanced accuracy .5, .67, .83, .75, .75, .5.
    assert balanced_optimal_threshold(normal, [2.5, 5.0]) == 2.25
    assert balanced_optimal_threshold(normal, [4.0, 5.0]) == 3.5  # separable: the gap's midpoint
    with pytest.raises(ValueError, match="at least one normal"):
        balanced_optimal_threshold([], [1.0])


# --- (6) metrics at a fixed threshold -------------------------------------------------------------------

def test_image_metrics_by_hand():
    labels, scores = [0, 0, 0, 1, 1], [0.1, 0.5, 0.9, 0.6, 0.2]
    got = image_metrics(labels, scores, 0.5)  # flags 0.5, 0.9 (normal) and 0.6 (anomalous)
    assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (1, 2, 1, 1)
    assert got["tpr"] == 0.5 and got["fpr"] == pytest.approx(2 / 3) and got["f1"] == pytest.approx(0.4)
    assert got["balanced_accuracy"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert got["mcc"] == pytest.approx((1 * 1 - 2 * 1) / math.sqrt(3 * 2 * 3 * 2))
    nothing, everything = image_metrics(labels, scores, math.inf), image_metrics(labels, scores, -math.inf)
    assert nothing["balanced_accuracy"] == everything["balanced_accuracy"] == 0.5
    assert nothing["mcc"] == everything["mcc"] == 0.0 and nothing["f1"] == 0.0
    # Flagging everything earns F1 2p/(1+p) at prevalence p, however bad the rule.
    assert everything["f1"] == pytest.approx(flag_everything_f1(0.4)) and flag_everything_f1(0.6) == pytest.approx(0.75)


def test_pixel_counter_equals_seg_f1_at_every_threshold():
    rng = np.random.default_rng(5)
    masks = np.zeros((6, 12, 12), bool)
    masks[1:4, 3:7, 2:8] = True
    maps = np.round(rng.normal(masks * 1.5, 1.0), 1)  # rounded: ties at the thresholds tried
    counter = PixelCounter(masks, maps)
    for threshold in [-math.inf, *np.unique(maps)[::7], 0.35, math.inf]:
        assert counter.seg_f1(threshold) == pytest.approx(metrics.pixel_at_threshold(masks, maps, threshold)["f1"])
    assert PixelCounter(np.zeros_like(masks), maps).seg_f1(0.0) is None
