"""Decision thresholds fitted on validation scores only, evaluated on test scores, compared across the
no-adaptation / threshold-only / full-refit regimes, and the number of validation images recalibration needs.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd

from helpers.metrics import at_threshold, f1_max, pixel_at_threshold

POLICIES = ("f1_optimal", "normal_percentile", "mean_3sigma")
NORMAL_ONLY = ("normal_percentile", "mean_3sigma")
# (a) clean model + clean-val threshold, (b) clean model + shifted-val threshold, (c) refit + shifted val.
REGIMES = ("none", "threshold_only", "full")
ROW_COLUMNS = ["regime", "policy", "policy_used", "note", "threshold", "pixel_threshold", "precision",
               "recall", "f1", "fpr", "seg_f1", "n_val", "n_val_anomalous"]


@dataclass(frozen=True)
class Threshold:
    """A fitted threshold (predict anomalous when score >= value); ``policy`` is what was asked, ``used``
    what was applied, ``note`` why they differ ('' when they do not); counts are validation images."""
    value: float
    policy: str
    used: str
    note: str
    n_val: int
    n_anomalous: int


class ScoreSet(NamedTuple):
    """Scores of one split under one model: image labels and scores, optionally masks and anomaly maps."""
    labels: np.ndarray
    scores: np.ndarray
    masks: np.ndarray | None = None
    maps: np.ndarray | None = None


# --- fitting --------------------------------------------------------------------------------------------

def _checked(name: str, values, dtype) -> np.ndarray:
    array = np.asarray(values)
    # A cast alone would read a label 2 or NaN as True; refuse them instead.
    if dtype is bool and not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must be binary (bool or 0/1)")
    if dtype is float and np.isnan(array.astype(float)).any():
        raise ValueError(f"{name} contains NaN")
    return array.astype(dtype)


def _fit(policy: str, positives: np.ndarray, scores: np.ndarray, normal_scores: np.ndarray, n_val: int,
         n_anomalous: int, what: str, q: float, k: float, fallback: str) -> Threshold:
    """Shared by image and pixel level: ``positives``/``scores`` feed f1_optimal, ``normal_scores`` the
    normal-only policies; ``what`` names the unit in messages."""
    if policy not in POLICIES:
        raise ValueError(f"unknown threshold policy {policy!r}; known: {', '.join(POLICIES)}")
    used, note = policy, ""
    if policy == "f1_optimal":
        if not positives.any():
            # Every threshold up to the lowest score has F1 = 0 here, so "optimal" would be arbitrary and
            # could flag every test image; a normal-only policy is the honest choice, made loudly.
            if fallback not in NORMAL_ONLY:
                raise ValueError(f"fallback must be one of {NORMAL_ONLY}, got {fallback!r}")
            used = fallback
            note = (f"no anomalous {what} in the validation data; f1_optimal fell back to {fallback}"
                    + (f" (q={q:g})" if fallback == "normal_percentile" else f" (k={k:g})"))
            warnings.warn(note, UserWarning, stacklevel=3)
        elif positives.all():
            raise ValueError(f"f1_optimal needs normal {what}s in the validation data, got only anomalous ones")
        else:
            return Threshold(f1_max(positives, scores)[1], policy, used, note, n_val, n_anomalous)
    if used == "normal_percentile":
        if normal_scores.size == 0:
            raise ValueError(f"{used} needs normal {what}s in the validation data, got none")
        value = np.percentile(normal_scores, q)
    else:
        # Sample std (ddof=1): validation sets are small and the population std would understate spread.
        if normal_scores.size < 2:
            raise ValueError(f"{used} needs at least 2 normal {what}s in the validation data, "
                             f"got {normal_scores.size}")
        value = normal_scores.mean() + k * normal_scores.std(ddof=1)
    return Threshold(float(value), policy, used, note, n_val, n_anomalous)


def fit_threshold(policy: str, labels, scores, q: float = 99.0, k: float = 3.0,
                  fallback: str = "normal_percentile") -> Threshold:
    """Image threshold from labelled validation scores: ``f1_optimal`` (highest threshold of best F1),
    ``normal_percentile`` (q-th percentile of normal scores, numpy's linear interpolation) or
    ``mean_3sigma`` (mean + k * sample std of normal scores, the MVTec AD 2 recipe). Without an anomalous
    image, f1_optimal warns and applies ``fallback`` (recorded in ``used`` and ``note``)."""
    labels, scores = _checked("labels", labels, bool), _checked("scores", scores, float)
    if labels.ndim != 1 or labels.shape != scores.shape or labels.size == 0:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be equal, non-empty 1-D")
    return _fit(policy, labels, scores, scores[~labels], labels.size, int(labels.sum()), "image", q, k, fallback)


def _subsample(values: np.ndarray, max_pixels: int, rng: np.random.Generator) -> np.ndarray:
    if values.size <= max_pixels:
        return values
    return values[np.sort(rng.choice(values.size, max_pixels, replace=False))]


def fit_pixel_threshold(policy: str, masks, maps, max_pixels: int = 2_000_000, seed: int = 0, q: float = 99.0,
                        k: float = 3.0, fallback: str = "normal_percentile") -> Threshold:
    """Pixel threshold (for SegF1) from validation masks and maps, same policies as ``fit_threshold``.

    f1_optimal uses every pixel labelled by its mask. Normal-only policies use the pixels of normal images
    (empty mask) only: that is what a deployment calibrating on good parts has, and it keeps out the
    defect-adjacent pixels that a blurred map lifts. Above ``max_pixels`` the pool is subsampled uniformly
    without replacement with ``seed``. ``n_val``/``n_anomalous`` count images, not pixels.
    """
    masks, maps = _checked("masks", masks, bool), _checked("maps", maps, float)
    if masks.ndim != 3 or masks.shape != maps.shape or masks.size == 0:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must be equal, non-empty (N, H, W)")
    anomalous_images = masks.reshape(len(masks), -1).any(axis=1)
    rng = np.random.default_rng(seed)
    if policy == "f1_optimal":
        pool = _subsample(np.arange(masks.size), max_pixels, rng)
        positives, scores = masks.ravel()[pool], maps.ravel()[pool]
        # Only read on fallback, i.e. when no pixel is anomalous, so these are the pixels of normal images.
        normal_scores = scores[~positives]
    else:
        positives = scores = np.zeros(0)
        normal_scores = _subsample(maps[~anomalous_images].ravel(), max_pixels, rng)
    return _fit(policy, positives, scores, normal_scores, len(masks), int(anomalous_images.sum()), "pixel",
                q, k, fallback)


# --- evaluation -----------------------------------------------------------------------------------------

def _value(threshold: Threshold | float | None) -> float | None:
    return threshold.value if isinstance(threshold, Threshold) else threshold


def evaluate_at(threshold_img: Threshold | float, threshold_px: Threshold | float | None, test_labels,
                test_scores, test_masks=None, test_maps=None) -> dict:
    """Image precision, recall, F1, FPR and pixel ``seg_f1`` on the test split at fixed thresholds.
    ``seg_f1`` is None without masks, maps or pixel threshold, or when no test pixel is anomalous
    (undefined, as in ``metrics.evaluate``)."""
    value_img, value_px = _value(threshold_img), _value(threshold_px)
    image = at_threshold(test_labels, test_scores, value_img)
    seg_f1 = None
    if test_masks is not None and test_maps is not None and value_px is not None and np.any(test_masks):
        seg_f1 = pixel_at_threshold(test_masks, test_maps, value_px)["f1"]
    return dict(threshold=value_img, pixel_threshold=value_px, precision=image["precision"],
                recall=image["recall"], f1=image["f1"], fpr=image["fpr"], seg_f1=seg_f1)


def regime_rows(regimes: Mapping[str, tuple[ScoreSet, ScoreSet]], policies: Sequence[str] = POLICIES,
                max_pixels: int = 2_000_000, seed: int = 0, **policy_kw) -> pd.DataFrame:
    """One row per (regime, policy): thresholds fitted on each regime's validation ScoreSet, metrics on its
    test ScoreSet. ``regimes`` maps a name (see REGIMES) to (val, test); the test set is only ever passed to
    ``evaluate_at``. A pixel threshold is fitted when the validation set has masks and maps."""
    rows = []
    for regime, (val, test) in regimes.items():
        val, test = ScoreSet(*val), ScoreSet(*test)
        for policy in policies:
            image = fit_threshold(policy, val.labels, val.scores, **policy_kw)
            pixel, notes = None, [image.note]
            if val.masks is not None and val.maps is not None:
                pixel = fit_pixel_threshold(policy, val.masks, val.maps, max_pixels, seed, **policy_kw)
                notes.append(f"pixel: {pixel.note}" if pixel.note else "")
            rows.append(dict(regime=regime, policy=policy, policy_used=image.used,
                             note="; ".join(n for n in notes if n),
                             **evaluate_at(image, pixel, test.labels, test.scores, test.masks, test.maps),
                             n_val=image.n_val, n_val_anomalous=image.n_anomalous))
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def recovered_fraction(clean_f1: float, none_f1: float, adapted_f1: float, min_drop: float = 1e-6) -> float:
    """(adapted - none) / (clean - none): the share of the F1 lost to the shift that adaptation wins back
    (1 = all, 0 = none, <0 = adaptation hurt, >1 = beat the clean result). NaN when the shift cost at most
    ``min_drop`` F1 (or clean - none is NaN): with no drop there is nothing to recover, and a ratio over a
    near-zero drop is noise. Callers may raise ``min_drop`` to the F1 resolution of their test split."""
    drop = clean_f1 - none_f1
    if not drop > min_drop:
        return float("nan")
    return float((adapted_f1 - none_f1) / drop)


# --- how many validation images recalibration needs -----------------------------------------------------

def recovery_curve(val_labels, val_scores, test_labels, test_scores, n_values: Sequence[int],
                   n_anomalous_values: Sequence[int], policy: str, repeats: int = 20, seed: int = 0,
                   **policy_kw) -> pd.DataFrame:
    """Test F1 of thresholds fitted on random validation subsets of n images, n_anomalous of them anomalous,
    for every (n, n_anomalous) in the grid of both lists, ``repeats`` draws each.

    Draw r uses ``default_rng([seed, r])`` to permute normal and anomalous images once and takes the first
    ones, so subsets are nested in n within a draw (a smoother curve) and no row depends on the rest of the
    grid. Pairs the split cannot supply (too few images of a class, or no normal image) are skipped with one
    warning. Fallbacks of f1_optimal show in ``policy_used`` instead of one warning per fit.
    """
    val_labels, val_scores = _checked("val_labels", val_labels, bool), _checked("val_scores", val_scores, float)
    normal_idx, anomalous_idx = np.flatnonzero(~val_labels), np.flatnonzero(val_labels)
    pairs = [(int(n), int(a)) for n, a in itertools.product(n_values, n_anomalous_values)]
    feasible = [(n, a) for n, a in pairs if 0 <= a <= len(anomalous_idx) and 1 <= n - a <= len(normal_idx)]
    if not feasible:
        raise ValueError(f"no (n, n_anomalous) pair fits a split of {len(normal_idx)} normal and "
                         f"{len(anomalous_idx)} anomalous images")
    if len(feasible) < len(pairs):
        warnings.warn(f"skipped (n, n_anomalous) pairs the validation split cannot supply: "
                      f"{sorted(set(pairs) - set(feasible))}", UserWarning, stacklevel=2)
    rows = []
    for repeat in range(repeats):
        rng = np.random.default_rng([seed, repeat])
        normal_order, anomalous_order = rng.permutation(normal_idx), rng.permutation(anomalous_idx)
        for n, n_anomalous in feasible:
            subset = np.concatenate([anomalous_order[:n_anomalous], normal_order[:n - n_anomalous]])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                threshold = fit_threshold(policy, val_labels[subset], val_scores[subset], **policy_kw)
            rows.append(dict(n=n, n_anomalous=n_anomalous, repeat=repeat, policy_used=threshold.used,
                             threshold=threshold.value,
                             f1=at_threshold(test_labels, test_scores, threshold.value)["f1"]))
    return pd.DataFrame(rows).sort_values(["n", "n_anomalous", "repeat"], ignore_index=True)


def images_needed(curve: pd.DataFrame, target_f1: float, tolerance: float = 0.02,
                  quantile: float = 0.5) -> tuple[int, int] | None:
    """Smallest (n, n_anomalous) of a recovery curve whose ``quantile`` of test F1 over repeats (median by
    default; lower quantiles ask that most draws succeed) reaches target_f1 - tolerance; among equal n the
    one needing fewest anomalous images, as those are the costly ones. None if no pair does."""
    reached = curve.groupby(["n", "n_anomalous"])["f1"].quantile(quantile) >= target_f1 - tolerance
    if not reached.any():
        return None
    n, n_anomalous = min(reached[reached].index)
    return int(n), int(n_anomalous)
