"""Decision thresholds and what they achieve: estimators fitted on normal scores only (percentile, mean + k sigma,
the conformal order statistic with its false-positive guarantee), the labelled F1-optimal oracle, and the
metrics of a fixed threshold on a test split (FPR, TPR, balanced accuracy, MCC, F1, pixel SegF1).

Nothing here reads a test split to fit: fitting functions take calibration scores, evaluation functions take the
fitted value and the test scores.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from helpers.metrics import at_threshold, f1_max, pixel_at_threshold

POLICIES = ("f1_optimal", "normal_percentile", "mean_3sigma")
NORMAL_ONLY = ("normal_percentile", "mean_3sigma")


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




# --- normal-only estimators -----------------------------------------------------------------------------

ESTIMATOR_KINDS = ("normal_percentile", "mean_3sigma", "conformal")


def conformal_rank(n: int, alpha: float) -> int:
    """``ceil((n + 1)(1 - alpha))``: the rank (1 = smallest) of the normal score the conformal threshold sits on.
    A hair is taken off before rounding up so that float rounding of an exact integer (20 x 0.95) never adds one."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    return math.ceil((n + 1) * (1 - alpha) - 1e-9)


def min_normals_for(alpha: float) -> int:
    """Fewest normal scores for which the conformal threshold is finite: n >= (1 - alpha) / alpha (19 for 5 %,
    99 for 1 %). Below it no order statistic guarantees FPR <= alpha and the threshold is infinite."""
    n = 1
    while conformal_rank(n, alpha) > n:
        n += 1
    return n


def conformal_threshold(normal_scores, alpha: float) -> float:
    """The split-conformal threshold: flag a score strictly above the ``conformal_rank(n, alpha)``-th smallest of
    the ``n`` normal scores; ``inf`` (flag nothing) when that rank exceeds ``n``.

    If a test normal's score and the ``n`` calibration scores are exchangeable, it exceeds that order statistic
    with probability ``(n + 1 - rank) / (n + 1) <= alpha`` (ties only lower it), averaged over calibration draws:
    a guarantee about the mean FPR over calibration sets, not about every single set. The value returned is the
    next float above the order statistic, so the study's rule ``score >= threshold`` flags exactly the scores
    strictly above it.
    """
    scores = np.sort(_checked("normal_scores", normal_scores, float).ravel())
    if scores.size == 0:
        raise ValueError("conformal_threshold needs at least one normal score")
    rank = conformal_rank(scores.size, alpha)
    if rank > scores.size:
        return math.inf
    return float(np.nextafter(scores[rank - 1], np.inf))


def conformal_expected_fpr(n: int, alpha: float) -> float:
    """Mean FPR of the conformal threshold over calibration sets of ``n`` exchangeable continuous normals."""
    rank = conformal_rank(n, alpha)
    return 0.0 if rank > n else (n + 1 - rank) / (n + 1)


@dataclass(frozen=True)
class Estimator:
    """A threshold rule fitted on normal scores only. ``param``: q in percent (normal_percentile), k sigmas
    (mean_3sigma) or the target false-positive rate alpha (conformal)."""

    kind: str
    param: float

    def __post_init__(self) -> None:
        if self.kind not in ESTIMATOR_KINDS:
            raise ValueError(f"unknown estimator {self.kind!r}; known: {', '.join(ESTIMATOR_KINDS)}")

    @property
    def name(self) -> str:
        if self.kind == "normal_percentile":
            return f"percentile_{self.param:g}"
        if self.kind == "mean_3sigma":
            return f"mean_{self.param:g}sigma"
        return f"conformal_{self.param:g}"

    @property
    def alpha(self) -> float:
        """The false-positive rate the rule aims at: alpha for conformal, 1 - q/100 for a percentile (a target,
        not a guarantee), NaN for mean + k sigma (which states none without a distribution)."""
        if self.kind == "conformal":
            return float(self.param)
        if self.kind == "normal_percentile":
            return round(1 - self.param / 100, 12)
        return math.nan

    @property
    def min_normals(self) -> int:
        """Normal scores the rule needs to give a number (the conformal rule gives ``inf`` below its minimum)."""
        return 2 if self.kind == "mean_3sigma" else 1

    def fit(self, normal_scores) -> float:
        scores = _checked("normal_scores", normal_scores, float).ravel()
        if scores.size < self.min_normals:
            raise ValueError(f"{self.name} needs at least {self.min_normals} normal scores, got {scores.size}")
        if self.kind == "normal_percentile":
            return float(np.percentile(scores, self.param))
        if self.kind == "mean_3sigma":
            # Sample std (ddof=1): calibration sets are small and the population std would understate spread.
            return float(scores.mean() + self.param * scores.std(ddof=1))
        return conformal_threshold(scores, self.param)


def estimators(kinds: Sequence[str], percentile: float = 99.0, sigmas: float = 3.0,
               alphas: Sequence[float] = (0.01, 0.05)) -> list[Estimator]:
    """The estimators a configuration asks for: one per kind, the conformal one once per alpha."""
    out = []
    for kind in kinds:
        if kind == "conformal":
            out += [Estimator(kind, float(a)) for a in alphas]
        else:
            out.append(Estimator(kind, float(percentile if kind == "normal_percentile" else sigmas)))
    return out


def balanced_optimal_threshold(normal_scores, anomalous_scores) -> float:
    """The threshold of highest balanced accuracy on a small labelled set (the label-budget curve).

    Candidates are the midpoints between consecutive distinct scores of the pooled set, one below all and one
    just above all; ties go to the highest candidate (fewest false alarms). Without an anomalous score the
    rule is just above the highest normal score, the limit of the same rule as anomalies run out.
    """
    normal = _checked("normal_scores", normal_scores, float).ravel()
    anomalous = _checked("anomalous_scores", anomalous_scores, float).ravel()
    if normal.size == 0:
        raise ValueError("balanced_optimal_threshold needs at least one normal score")
    if anomalous.size == 0:
        return float(np.nextafter(normal.max(), np.inf))
    values = np.unique(np.concatenate([normal, anomalous]))
    candidates = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2,
                                 [np.nextafter(values[-1], np.inf)]])
    tpr = (anomalous[None, :] >= candidates[:, None]).mean(axis=1)
    tnr = (normal[None, :] < candidates[:, None]).mean(axis=1)
    balanced = (tpr + tnr) / 2
    best = np.flatnonzero(balanced == balanced.max())[-1]
    return float(candidates[best])


# --- what a fixed threshold achieves --------------------------------------------------------------------

def flag_everything_f1(prevalence: float) -> float:
    """F1 of flagging every image at anomaly prevalence p: 2p / (1 + p) (0.75 at 60 %)."""
    return 2 * prevalence / (1 + prevalence)


def image_metrics(labels, scores, threshold: float) -> dict:
    """FPR, TPR, precision, F1, balanced accuracy and MCC of ``score >= threshold``, with the confusion counts.

    Balanced accuracy is (TPR + TNR) / 2: 0.5 for flagging everything or nothing, whatever the prevalence. MCC
    is 0 when the rule predicts one class only (its denominator is 0 there; no correlation is the usual reading).
    """
    counts = at_threshold(labels, scores, threshold)
    tp, fp, tn, fn = (counts[k] for k in ("tp", "fp", "tn", "fn"))
    tpr = tp / (tp + fn) if tp + fn else math.nan
    tnr = tn / (tn + fp) if tn + fp else math.nan
    denominator = math.sqrt(float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return dict(fpr=counts["fpr"], tpr=tpr, precision=counts["precision"], f1=counts["f1"],
                balanced_accuracy=(tpr + tnr) / 2, mcc=(tp * tn - fp * fn) / denominator if denominator else 0.0,
                tp=tp, fp=fp, tn=tn, fn=fn)


class PixelCounter:
    """SegF1 (pixel F1 over all pixels pooled) of one test split at any number of pixel thresholds, from one
    sort of its anomalous and its normal pixels; equal to ``metrics.pixel_at_threshold(...)["f1"]``."""

    def __init__(self, masks, maps) -> None:
        masks, maps = _checked("masks", masks, bool), np.asarray(maps)
        if masks.shape != maps.shape or masks.ndim != 3:
            raise ValueError(f"masks {masks.shape} and maps {maps.shape} must be equal (N, H, W)")
        self.anomalous = np.sort(maps[masks], kind="stable")
        self.normal = np.sort(maps[~masks], kind="stable")

    def seg_f1(self, threshold: float) -> float | None:
        """None when the split has no anomalous pixel (undefined, as in ``metrics.evaluate``)."""
        n_pos = self.anomalous.size
        if n_pos == 0:
            return None
        tp = n_pos - int(np.searchsorted(self.anomalous, threshold, side="left"))
        fp = self.normal.size - int(np.searchsorted(self.normal, threshold, side="left"))
        denominator = 2 * tp + fp + (n_pos - tp)
        return 2 * tp / denominator if denominator else 0.0
