"""Image- and pixel-level anomaly metrics (AUROC, AP, F1, AUPRO), exact from one sort of the scores with ties
grouped: numpy in, Python floats out, 1 = anomalous, predicted anomalous when ``score >= threshold``."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

# 8-connectivity inside each image and none across images, as in the MVTec AD evaluation code.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


# --- input checks ---------------------------------------------------------------------------------------

def _binary(name: str, values) -> np.ndarray:
    """``values`` as a bool array, or a ValueError naming ``name`` when it is not 0/1."""
    array = np.asarray(values)
    if array.dtype == bool:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must be binary (bool or 0/1), got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and np.isnan(array).any():
        raise ValueError(f"{name} contains NaN")
    if not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must be binary (bool or 0/1), got values {np.unique(array)[:5]}...")
    return array.astype(bool)


def _scores(name: str, values) -> np.ndarray:
    """``values`` as a float array (float32 kept, it sorts faster), or a ValueError when it holds NaN."""
    array = np.asarray(values)
    numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if array.dtype == bool or not numeric:
        raise ValueError(f"{name} must be numeric scores, got dtype {array.dtype}")
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float64)
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN")
    return array


def _image_inputs(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = _binary("labels", labels), _scores("scores", scores)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (one per image), got shape {labels.shape}")
    if scores.shape != labels.shape:
        raise ValueError(f"scores shape {scores.shape} does not match labels shape {labels.shape}")
    if labels.size == 0:
        raise ValueError("labels is empty")
    return labels, scores


def _pixel_inputs(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    masks, maps = _binary("masks", masks), _scores("maps", maps)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    if maps.shape != masks.shape:
        raise ValueError(f"maps shape {maps.shape} does not match masks shape {masks.shape}")
    if masks.size == 0:
        raise ValueError("masks is empty")
    return masks, maps


def _require_both_classes(name: str, positives: np.ndarray) -> None:
    n_positive = int(positives.sum())
    if n_positive == 0 or n_positive == positives.size:
        present = "anomalous" if n_positive else "normal"
        raise ValueError(f"{name} contains only one class ({present}); the metric needs normal and anomalous")


# --- curves from one sort -------------------------------------------------------------------------------

def _rank(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order of ``scores`` from highest to lowest, the index (in that order) ending each group of equal
    scores, and the score of each group; a group is one threshold, so ties never split a curve step."""
    order = np.argsort(scores, kind="quicksort")[::-1]
    sorted_scores = scores[order]
    group_ends = np.append(np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), sorted_scores.size - 1)
    return order, group_ends, sorted_scores[group_ends]


def _counts_per_threshold(positives: np.ndarray, scores: np.ndarray, ranked=None):
    """True and false positive counts when predicting ``score >= t``, for every distinct score ``t``
    (highest first), together with those thresholds. ``ranked`` is ``_rank(scores)`` when already known."""
    order, group_ends, thresholds = ranked or _rank(scores)
    tp = np.cumsum(positives[order], dtype=np.int64)[group_ends]
    fp = group_ends + 1 - tp
    return tp, fp, thresholds


def _auroc(positives: np.ndarray, scores: np.ndarray, ranked=None) -> float:
    tp, fp, _ = _counts_per_threshold(positives, scores, ranked)
    tpr = np.concatenate(([0.0], tp / tp[-1]))
    fpr = np.concatenate(([0.0], fp / fp[-1]))
    return float(np.trapezoid(tpr, fpr))


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the non-decreasing curve (x, y) from x[0] to ``x_max``, with y linearly
    interpolated at ``x_max`` so the result does not depend on where the curve happens to have points."""
    inside = int(np.searchsorted(x, x_max, side="right"))
    x_in, y_in = x[:inside], y[:inside]
    if x_in[-1] < x_max and inside < x.size:
        # x[inside] > x_max strictly, so the interpolation never divides by zero.
        weight = (x_max - x[inside - 1]) / (x[inside] - x[inside - 1])
        y_at_max = y[inside - 1] + weight * (y[inside] - y[inside - 1])
        x_in, y_in = np.append(x_in, x_max), np.append(y_in, y_at_max)
    return float(np.trapezoid(y_in, x_in))


# --- image level ----------------------------------------------------------------------------------------

def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores (ties count half, as in scikit-learn)."""
    labels, scores = _image_inputs(labels, scores)
    _require_both_classes("labels", labels)
    return _auroc(labels, scores)


def image_ap(labels, scores) -> float:
    """Average precision, sum over thresholds of (recall step) x precision, as scikit-learn defines it."""
    labels, scores = _image_inputs(labels, scores)
    _require_both_classes("labels", labels)
    tp, fp, _ = _counts_per_threshold(labels, scores)
    precision = tp / (tp + fp)
    recall_steps = np.diff(tp, prepend=0) / tp[-1]
    return float(np.sum(recall_steps * precision))


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold reaching it (predict anomalous when score >= it);
    when several thresholds tie for the best F1, the highest one is returned."""
    labels, scores = _image_inputs(labels, scores)
    _require_both_classes("labels", labels)
    tp, fp, thresholds = _counts_per_threshold(labels, scores)
    f1 = 2 * tp / (tp + fp + tp[-1])  # 2TP / (2TP + FP + FN), with FN = positives - TP
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


# --- pixel level ----------------------------------------------------------------------------------------

def pixel_auroc(masks, maps) -> float:
    """Area under the ROC curve of all pixels of all images pooled together."""
    masks, maps = _pixel_inputs(masks, maps)
    _require_both_classes("masks", masks)
    return _auroc(masks.ravel(), maps.ravel())


def _region_weights(masks: np.ndarray) -> np.ndarray:
    """Per-pixel weight 1 / (number of regions x size of the pixel's region), 0 on normal pixels, so that
    the sum of the weights of the pixels above a threshold is the mean per-region overlap (PRO)."""
    regions, n_regions = ndimage.label(masks, structure=_REGION_STRUCTURE)
    region_sizes = np.bincount(regions.ravel())
    weight_of_region = np.zeros(n_regions + 1)
    weight_of_region[1:] = 1.0 / (n_regions * region_sizes[1:])
    return weight_of_region[regions.ravel()]


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """False positive rate over all normal pixels and mean per-region overlap (PRO), at every distinct map
    value from highest to lowest, preceded by the point (0, 0) of a threshold above every value."""
    masks, maps = _pixel_inputs(masks, maps)
    _require_both_classes("masks", masks)
    return _pro_curve(masks, _rank(maps.ravel()))


def _pro_curve(masks: np.ndarray, ranked) -> tuple[np.ndarray, np.ndarray]:
    order, group_ends, _ = ranked
    pro = np.cumsum(_region_weights(masks)[order])[group_ends]
    normal = ~masks.ravel()
    fpr = np.cumsum(normal[order], dtype=np.int64)[group_ends] / normal.sum()
    # Rounding in the cumulative sum can leave the last PRO a hair off 1; every region is covered there.
    pro[-1] = 1.0
    return np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro))


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve for FPR in [0, fpr_limit], divided by fpr_limit (Bergmann et al., MVTec AD):
    1.0 for a perfect map, about fpr_limit / 2 for a map that ranks pixels at random."""
    _check_fpr_limit(fpr_limit)
    fpr, pro = pro_curve(masks, maps)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def pixel_auroc_aupro(masks, maps, fpr_limit: float = 0.3) -> tuple[float, float]:
    """``pixel_auroc`` and ``aupro`` from one sort of the pixels (the sort is most of their cost)."""
    _check_fpr_limit(fpr_limit)
    masks, maps = _pixel_inputs(masks, maps)
    _require_both_classes("masks", masks)
    ranked = _rank(maps.ravel())
    fpr, pro = _pro_curve(masks, ranked)
    return _auroc(masks.ravel(), maps.ravel(), ranked), _area_up_to(fpr, pro, fpr_limit) / fpr_limit


# --- at a fixed threshold -------------------------------------------------------------------------------

def _ratio(numerator: int, denominator: int) -> float:
    """numerator / denominator, defined as 0.0 when the denominator is 0 (scikit-learn's zero_division=0)."""
    return numerator / denominator if denominator else 0.0


def _rates(tp: int, fp: int, tn: int, fn: int) -> dict:
    return dict(
        precision=_ratio(tp, tp + fp),  # 0 when nothing is predicted anomalous
        recall=_ratio(tp, tp + fn),  # 0 when there is nothing anomalous
        f1=_ratio(2 * tp, 2 * tp + fp + fn),  # 0 when nothing is anomalous or predicted anomalous
        fpr=_ratio(fp, fp + tn),  # 0 when there is nothing normal
    )


def _confusion(positives: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    predicted = scores >= threshold
    tp = int(np.count_nonzero(predicted & positives))
    fp = int(np.count_nonzero(predicted)) - tp
    fn = int(np.count_nonzero(positives)) - tp
    tn = positives.size - tp - fp - fn
    return tp, fp, tn, fn


def at_threshold(labels, scores, threshold: float) -> dict:
    """Image-level precision, recall, F1 and FPR when predicting anomalous at score >= threshold, with the
    confusion counts; any 0/0 ratio is 0.0."""
    labels, scores = _image_inputs(labels, scores)
    tp, fp, tn, fn = _confusion(labels, scores, threshold)
    return {**_rates(tp, fp, tn, fn), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def pixel_at_threshold(masks, maps, threshold: float) -> dict:
    """Pixel-level precision, recall, F1 (the SegF1 of the literature) and FPR over all pixels pooled,
    predicting anomalous at map >= threshold; any 0/0 ratio is 0.0."""
    masks, maps = _pixel_inputs(masks, maps)
    return _rates(*_confusion(masks, maps, threshold))


# --- all at once ----------------------------------------------------------------------------------------

def evaluate(labels, scores, masks=None, maps=None) -> dict:
    """Threshold-free metrics of one run. Pixel metrics are None when there are no masks (a category
    without ground truth) or no anomalous pixel: skipped, never filled in."""
    result = dict(
        image_auroc=image_auroc(labels, scores),
        image_ap=image_ap(labels, scores),
        image_f1max=f1_max(labels, scores)[0],
        pixel_auroc=None,
        pixel_aupro=None,
    )
    if masks is None:
        return result
    if maps is None:
        raise ValueError("maps is required when masks is given")
    masks, maps = _pixel_inputs(masks, maps)
    if masks.shape[0] != np.asarray(labels).shape[0]:
        raise ValueError(f"masks has {masks.shape[0]} images but labels has {np.asarray(labels).shape[0]}")
    if masks.any():
        result["pixel_auroc"], result["pixel_aupro"] = pixel_auroc_aupro(masks, maps)
    return result


def bootstrap_auroc(labels, scores, n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of image AUROC, resampling images within each class (stratified)."""
    labels, scores = _image_inputs(labels, scores)
    _require_both_classes("labels", labels.astype(bool))
    rng = np.random.default_rng(seed)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pos_draws = pos[rng.integers(0, len(pos), (n_resamples, len(pos)))]
    neg_draws = neg[rng.integers(0, len(neg), (n_resamples, len(neg)))]
    # Mann-Whitney form: P(pos > neg) + 0.5 P(pos == neg), over all pairs of each resample.
    greater = (pos_draws[:, :, None] > neg_draws[:, None, :]).mean(axis=(1, 2))
    ties = (pos_draws[:, :, None] == neg_draws[:, None, :]).mean(axis=(1, 2))
    aucs = greater + 0.5 * ties
    alpha = (1 - level) / 2
    return float(np.quantile(aucs, alpha)), float(np.quantile(aucs, 1 - alpha))
