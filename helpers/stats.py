"""Statistics the study's claims stand on: bootstrap intervals of image AUROC and of paired AUROC differences,
pooled over data draws and model seeds, and exact binomial intervals for rates.

A *score table* has one row per scored image: the unit it belongs to (by default its data draw and category),
its replicate (the model seed), its ``image`` key, ``label`` and ``score``. Two arms compared *paired* (clean
against shifted, PatchCore against PaDiM, a setting against the default) score the same images of each unit;
one bootstrap resample draws images within each unit, separately per class of the first arm, and applies the
same draw to both arms and every replicate, so the interval reflects which images were tested and nothing
else. The statistic is the mean over units and replicates of each arm's AUROC, or of their difference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

UNITS = ("draw", "category")
REPLICATE = "seed"


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile-bootstrap interval, and what it is over."""

    estimate: float
    lo: float
    hi: float
    n_units: int  # independent image sets (draw x category)
    n_replicates: int  # model seeds per unit
    n_images: int  # test images over all units

    @property
    def excludes_zero(self) -> bool:
        return bool(self.lo > 0 or self.hi < 0)

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}estimate" if prefix else "estimate": self.estimate, f"{prefix}lo": self.lo,
                f"{prefix}hi": self.hi, "n_units": self.n_units, "n_replicates": self.n_replicates,
                "n_images": self.n_images}


def auroc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of each row of ``scores`` ``(B, n)`` against the matching row of binary ``labels`` ``(B, n)``
    (Mann-Whitney with average ranks, so ties count half); NaN for a row with one class only."""
    labels = np.asarray(labels, dtype=bool)
    ranks = scipy_stats.rankdata(scores, axis=1)
    n_pos = labels.sum(axis=1)
    n_neg = labels.shape[1] - n_pos
    rank_sum = np.where(labels, ranks, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _wide(table: pd.DataFrame, units: Sequence[str], replicate: str) -> dict:
    """{unit: (images, labels, {replicate: scores})} with images in a fixed order per unit."""
    out = {}
    for unit, g in table.groupby(list(units), sort=True):
        pivot = g.pivot_table(index="image", columns=replicate, values="score", aggfunc="first").sort_index()
        if pivot.isna().any().any():
            raise ValueError(f"unit {unit}: not every replicate scored the same images")
        labels = g.groupby("image")["label"].first().reindex(pivot.index).to_numpy().astype(bool)
        out[unit] = (pivot.index.to_numpy(), labels, {r: pivot[r].to_numpy(float) for r in pivot.columns})
    return out


def _draws(labels: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(B, n)`` image indices: each resample keeps the number of images of each class."""
    cols = []
    for cls in (True, False):
        idx = np.flatnonzero(labels == cls)
        if len(idx):
            cols.append(idx[rng.integers(0, len(idx), (n_resamples, len(idx)))])
    return np.concatenate(cols, axis=1)


def _arm_aurocs(arm: dict, unit, picks: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Mean over replicates of AUROC per resample ``(B,)`` for one arm in one unit; picks index ``images``."""
    own_images, labels, reps = arm[unit]
    if not np.array_equal(own_images, images):
        raise ValueError(f"unit {unit}: the two arms scored different images")
    return np.mean([auroc_rows(labels[picks], scores[picks]) for scores in reps.values()], axis=0)


def _point(arm: dict, unit) -> float:
    _, labels, reps = arm[unit]
    return float(np.mean([auroc_rows(labels[None], s[None])[0] for s in reps.values()]))


def bootstrap_auroc(a: pd.DataFrame, b: pd.DataFrame | None = None, units: Sequence[str] = UNITS,
                    replicate: str = REPLICATE, n_resamples: int = 1000, level: float = 0.95,
                    seed: int = 0) -> Interval:
    """Mean image AUROC of arm ``a`` over units and replicates with its bootstrap interval; with ``b``, the
    paired difference AUROC(a) - AUROC(b) on the same images."""
    if b is None:
        return bootstrap_contrast([a], [1.0], units, replicate, n_resamples, level, seed)
    return bootstrap_contrast([a, b], [1.0, -1.0], units, replicate, n_resamples, level, seed)


def resample_arms(arms: Sequence[pd.DataFrame], units: Sequence[str] = UNITS, replicate: str = REPLICATE,
                  n_resamples: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Each arm's mean AUROC over units and replicates, and the same mean in every paired bootstrap resample:
    ``(points (n_arms,), resampled (n_arms, n_resamples), (n_units, n_replicates, n_images))``. Every arm is
    resampled with the same images of each unit (drawn per class of the first arm), so any linear contrast of
    the arms (a drop, a difference of drops) has its paired interval from one set of resamples."""
    if not arms:
        raise ValueError("give at least one arm")
    wide = [_wide(arm, units, replicate) for arm in arms]
    for other in wide[1:]:
        if set(other) != set(wide[0]):
            raise ValueError(f"the arms cover different units: {sorted(set(wide[0]) ^ set(other))}")
    rng = np.random.default_rng(seed)
    per_unit = np.empty((len(arms), len(wide[0]), n_resamples))
    points = np.empty((len(arms), len(wide[0])))
    for j, unit in enumerate(sorted(wide[0])):
        images, labels, _ = wide[0][unit]
        picks = _draws(labels, n_resamples, rng)
        for i, arm in enumerate(wide):
            per_unit[i, j] = _arm_aurocs(arm, unit, picks, images)
            points[i, j] = _point(arm, unit)
    replicates = {len(reps) for _, _, reps in wide[0].values()}
    sizes = (len(wide[0]), min(replicates), int(sum(len(images) for images, _, _ in wide[0].values())))
    return points.mean(axis=1), np.nanmean(per_unit, axis=1), sizes


def contrast_interval(points: np.ndarray, resampled: np.ndarray, sizes: tuple[int, int, int],
                      weights: Sequence[float], level: float = 0.95) -> Interval:
    """The interval of a weighted sum of arms from :func:`resample_arms`' output."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    w = np.asarray(weights, dtype=float)
    if w.shape != (len(points),):
        raise ValueError("give one weight per arm")
    alpha = (1 - level) / 2
    lo, hi = np.nanquantile(w @ resampled, [alpha, 1 - alpha])
    return Interval(float(w @ points), float(lo), float(hi), *sizes)


def bootstrap_contrast(arms: Sequence[pd.DataFrame], weights: Sequence[float], units: Sequence[str] = UNITS,
                       replicate: str = REPLICATE, n_resamples: int = 1000, level: float = 0.95,
                       seed: int = 0) -> Interval:
    """A weighted sum of the arms' mean AUROCs, e.g. a drop (clean - shifted, weights 1, -1) or a difference of
    drops between two settings (1, -1, -1, 1), with one paired bootstrap: every arm is resampled with the same
    images of each unit (drawn per class of the first arm)."""
    if len(arms) != len(weights) or not arms:
        raise ValueError("give one weight per arm, and at least one arm")
    points, resampled, sizes = resample_arms(arms, units, replicate, n_resamples, seed)
    return contrast_interval(points, resampled, sizes, weights, level)


def paired_table(scores: pd.DataFrame, by: Sequence[str], arm: str, reference, units: Sequence[str] = UNITS,
                 replicate: str = REPLICATE, n_resamples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> pd.DataFrame:
    """For every group of ``by`` and every value of the column ``arm`` other than ``reference``: the paired
    difference AUROC(reference) - AUROC(value), e.g. the drop from clean to each shift, with its interval."""
    rows = []
    for key, group in scores.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        ref = group[group[arm] == reference]
        if ref.empty:
            continue
        for value, other in group[group[arm] != reference].groupby(arm, sort=True):
            interval = bootstrap_auroc(ref, other, units, replicate, n_resamples, level, seed)
            rows.append({**dict(zip(by, key)), arm: value, **interval.as_dict()})
    return pd.DataFrame(rows)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval of a rate k / n (e.g. a false-positive rate on n normal images)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    alpha = 1 - level
    lo = 0.0 if k == 0 else float(scipy_stats.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(scipy_stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi
