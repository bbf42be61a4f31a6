"""Summary tables of the drop study, the sweeps and the method comparison, computed from the saved per-image
score tables with the paired bootstrap of :mod:`helpers.stats`: every estimate comes with its interval and
says what it is over (units: data draw x category; replicates: model seeds)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from helpers import metrics, stats

CONDITION = ["mode", "transform", "severity"]


def _interval_columns(interval: stats.Interval, name: str) -> dict:
    return {name: interval.estimate, f"{name}_lo": interval.lo, f"{name}_hi": interval.hi,
            "n_units": interval.n_units, "n_seeds": interval.n_replicates, "n_images": interval.n_images}


def _is_clean(df: pd.DataFrame) -> pd.Series:
    return df["transform"] == "none"


def drop_summary(scores: pd.DataFrame, by: Sequence[str] = ("method",), n_resamples: int = 1000) -> pd.DataFrame:
    """Per group of ``by`` and shifted condition: mean image AUROC clean and shifted, and the drop (clean minus
    shifted, on the same test images) with its paired bootstrap interval, pooled over data draws, categories (unless
    ``by`` holds ``category``) and model seeds."""
    by = list(by)
    rows = []
    for key, group in scores.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        clean = group[_is_clean(group)]
        for cond, shifted in group[~_is_clean(group)].groupby(CONDITION, sort=True):
            if clean.empty:
                continue
            # the same images: the shift's test keys, on the data draws it was scored on (per_image: the first)
            ref = clean[clean["image"].isin(set(shifted["image"])) & clean["draw"].isin(set(shifted["draw"]))]
            points, resampled, sizes = stats.resample_arms([ref, shifted], n_resamples=n_resamples)
            base = stats.contrast_interval(points, resampled, sizes, [1, 0])
            after = stats.contrast_interval(points, resampled, sizes, [0, 1])
            drop = stats.contrast_interval(points, resampled, sizes, [1, -1])
            rows.append({**dict(zip(by, key)), **dict(zip(CONDITION, cond)), "auroc_clean": base.estimate,
                         "auroc_shifted": after.estimate, "auroc_shifted_lo": after.lo, "auroc_shifted_hi": after.hi,
                         **_interval_columns(drop, "drop")})
    return pd.DataFrame(rows)


def pixel_summary(results: pd.DataFrame, by: Sequence[str] = ("method",)) -> pd.DataFrame:
    """Mean pixel AUROC and AUPRO per group and condition, over the runs that computed them (every run on clean
    data, the first draw and seed under shift), and how many runs that is (0 for a dataset without masks)."""
    grouped = results.groupby([*by, *CONDITION])
    out = grouped[["pixel_auroc", "pixel_aupro"]].mean()  # NaN where no run had masks: not available
    out["n_runs"] = grouped["pixel_aupro"].count()
    return out.reset_index()


def per_defect_type(scores: pd.DataFrame) -> pd.DataFrame:
    """Image AUROC of each defect type against the normal images, clean and under each shift: mean over data
    draws and model seeds, per method and category, so a reader sees which defects a shift hides."""
    rows = []
    keys = ["method", "category", *CONDITION, "draw", "seed"]
    for key, group in scores.groupby(keys, sort=True):
        normal = group[group["label"] == 0]["score"].to_numpy()
        for defect, anomalous in group[group["label"] == 1].groupby("defect_type"):
            if len(normal) == 0:
                continue
            labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
            auroc = metrics.image_auroc(labels, np.r_[normal, anomalous["score"].to_numpy()])
            rows.append({**dict(zip(keys, key)), "defect_type": defect, "image_auroc": auroc,
                         "n_anomalous": len(anomalous)})
    table = pd.DataFrame(rows)
    grouped = table.groupby(["method", "category", "defect_type", *CONDITION])
    out = grouped["image_auroc"].agg(["mean", "std", "size"]).reset_index()
    return out.rename(columns={"mean": "image_auroc", "std": "image_auroc_sd", "size": "n_runs"})


def control_summary(drops: pd.DataFrame) -> pd.DataFrame:
    """The geometric control, per method, mode and severity: the drop of the old rotation (``rotation_fill``:
    pose and mean-colour frame), of the frame alone (``border_fill``) and of the pose alone on the canvas
    (``rotation``), and the share of the old drop the frame alone reproduces (NaN where the old drop is below
    0.01, a ratio of noise)."""
    wide = drops[drops["transform"].isin(["rotation", "rotation_fill", "border_fill"])]
    rows = []
    for (method, mode, severity), g in wide.groupby(["method", "mode", "severity"]):
        get = {t: r for t, r in zip(g["transform"], g.itertuples())}
        if not {"rotation_fill", "border_fill"} <= set(get):
            continue
        old, frame = get["rotation_fill"], get["border_fill"]
        row = {"method": method, "mode": mode, "severity": severity}
        for name, r in (("old_rotation", old), ("frame_only", frame), ("pose_only", get.get("rotation"))):
            if r is not None:
                row.update({f"{name}_drop": r.drop, f"{name}_drop_lo": r.drop_lo, f"{name}_drop_hi": r.drop_hi})
        row["frame_share_of_old_drop"] = frame.drop / old.drop if old.drop > 0.01 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def paired_difference(scores: pd.DataFrame, arm: str, first, second, by: Sequence[str] = (),
                      n_resamples: int = 1000) -> pd.DataFrame:
    """AUROC(first) - AUROC(second) of the column ``arm`` (e.g. method patchcore vs padim) on the same images,
    per group of ``by`` (all pooled when empty), with the paired interval and whether it excludes 0."""
    rows = []
    groups = scores.groupby(list(by), sort=True) if by else [((), scores)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        a, b = group[group[arm] == first], group[group[arm] == second]
        if a.empty or b.empty:
            continue
        interval = stats.bootstrap_auroc(a, b, n_resamples=n_resamples)
        rows.append({**dict(zip(by, key)), "first": first, "second": second,
                     **_interval_columns(interval, "difference"), "excludes_zero": interval.excludes_zero})
    return pd.DataFrame(rows)


def sweep_summary(sweep_scores: pd.DataFrame, n_resamples: int = 1000) -> pd.DataFrame:
    """Per method, swept setting and condition: the setting's AUROC on the test split, its paired difference from
    the default (clean), and under each shift the difference of drops (setting's drop minus default's drop: below
    0 means the setting is more robust), pooled over categories; plus its clean AUROC on the validation split,
    where a setting may be chosen (``chosen_on_val``: the best value of each parameter on validation)."""
    rows = []
    test = sweep_scores[sweep_scores["split"] == "test"]
    val = sweep_scores[sweep_scores["split"] == "val"]
    for method, group in test.groupby("method"):
        default = group[group["param"] == "default"]
        d_clean = default[_is_clean(default)]
        for (param, value), setting in group[group["param"] != "default"].groupby(["param", "value"], sort=True):
            s_clean = setting[_is_clean(setting)]
            clean = stats.bootstrap_auroc(s_clean, d_clean, n_resamples=n_resamples)
            v = val[(val["method"] == method) & (val["param"] == param) & (val["value"] == value) & _is_clean(val)]
            row = {"method": method, "param": param, "value": value, "auroc_clean": stats.bootstrap_auroc(
                       s_clean, n_resamples=n_resamples).estimate,
                   **_interval_columns(clean, "clean_difference"),
                   "val_auroc_clean": stats.bootstrap_auroc(v, n_resamples=n_resamples).estimate if len(v) else np.nan}
            for cond, s_shift in setting[~_is_clean(setting)].groupby(CONDITION):
                d_shift = default[(default[CONDITION] == pd.Series(cond, index=CONDITION)).all(axis=1)]
                contrast = stats.bootstrap_contrast([s_clean, s_shift, d_clean, d_shift], [1, -1, -1, 1],
                                                    n_resamples=n_resamples)
                tag = f"{cond[1]}{cond[2]}"
                row.update({f"drop_difference_{tag}": contrast.estimate, f"drop_difference_{tag}_lo": contrast.lo,
                            f"drop_difference_{tag}_hi": contrast.hi})
            rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        default_clean = val[(val["param"] == "default") & _is_clean(val)]
        default_val = {m: stats.bootstrap_auroc(default_clean[default_clean["method"] == m],
                                                n_resamples=n_resamples).estimate
                       for m in out["method"].unique()}
        out["default_val_auroc_clean"] = out["method"].map(default_val)
        best = out.loc[out.groupby(["method", "param"])["val_auroc_clean"].idxmax()]
        chosen = set(zip(best["method"], best["param"], best["value"]))
        out["chosen_on_val"] = [(m, p, v) in chosen and va > default_val[m] for m, p, v, va in
                                zip(out["method"], out["param"], out["value"], out["val_auroc_clean"])]
    return out
