"""Threshold adaptation under shift: score the validation and test splits of every regime and tabulate them.

Regimes, all evaluated on the shifted test split: ``none`` (clean model, clean-val threshold),
``threshold_only`` (clean model, shifted-val threshold), ``full`` (model re-fitted on shifted normals,
shifted-val threshold); ``clean`` (clean model on clean data) is the reference the drop is measured from.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from helpers import experiments, thresholds
from helpers.detector import Detector
from helpers.paths import Run
from helpers.registry import DetectorConfig
from helpers.thresholds import ScoreSet


def score_set(detector: Detector, rows: pd.DataFrame) -> ScoreSet:
    prediction = experiments.score(detector, rows)
    masks = experiments.masks_for(rows, prediction.anomaly_maps.shape[-1])
    return ScoreSet(rows["label"].to_numpy(), prediction.image_scores, masks,
                    prediction.anomaly_maps if masks is not None else None)


def regimes_for(config: DetectorConfig, run: Run, draw: int, category: str,
                condition: experiments.Condition) -> dict[str, tuple[ScoreSet, ScoreSet]]:
    """(validation, test) score sets of each regime for one category and shifted condition."""
    clean_model = experiments.fit_cached(config, experiments.train_paths(run, draw, category))
    shifted_model = experiments.fit_cached(config, experiments.train_paths(run, draw, category, condition))

    def scored(model, split, cond=experiments.CLEAN):
        return score_set(model, experiments.rows_of(run, draw, category, split, cond))

    clean_val, clean_test = scored(clean_model, "val"), scored(clean_model, "test")
    shifted_val, shifted_test = scored(clean_model, "val", condition), scored(clean_model, "test", condition)
    refit_val, refit_test = scored(shifted_model, "val", condition), scored(shifted_model, "test", condition)
    return {"clean": (clean_val, clean_test), "none": (clean_val, shifted_test),
            "threshold_only": (shifted_val, shifted_test), "full": (refit_val, refit_test)}


def _regime_job(config: DetectorConfig, run: Run, draw: int, category: str, condition: experiments.Condition,
                policies: Sequence[str], recovery_n: Sequence[int], recovery_n_anomalous: Sequence[int],
                recovery_repeats: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    import warnings

    seed = config.seed
    labels = dict(method=config.method, category=category, transform=condition.transform,
                  severity=condition.severity, seed=seed)
    regimes = regimes_for(config, run, draw, category, condition)
    curves = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fallbacks are recorded in each row's note
        table = thresholds.regime_rows(regimes, policies)
        for policy in ("f1_optimal", "normal_percentile"):
            val, test = regimes["threshold_only"]
            curve = thresholds.recovery_curve(val.labels, val.scores, test.labels, test.scores,
                                              [n for n in recovery_n if n <= len(val.labels)],
                                              recovery_n_anomalous, policy, repeats=recovery_repeats, seed=seed)
            curves.append(curve.assign(policy=policy, **labels))
    return table.assign(**labels), pd.concat(curves, ignore_index=True)


def run(study: Run, conditions: Sequence[experiments.Condition], draw: int = 0,
        recovery_n: Sequence[int] = (2, 4, 8, 16), recovery_n_anomalous: Sequence[int] = (0, 1, 2, 4),
        recovery_repeats: int = 20) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The regime table (one row per method, category, condition, regime, policy) and the recovery curves;
    each (method, category, condition) is one parallel job."""
    from helpers import registry
    from helpers.parallel import run_jobs

    cfg = study.config
    jobs = [(registry.configured(cfg, m), study, draw, c, cond, list(cfg.thresholds.policies), list(recovery_n),
             list(recovery_n_anomalous), recovery_repeats)
            for m in cfg.methods for c in cfg.data.categories for cond in conditions]
    results = run_jobs(_regime_job, jobs, cfg.execution, desc="threshold regimes")
    return (pd.concat([table for table, _ in results], ignore_index=True),
            pd.concat([curves for _, curves in results], ignore_index=True))


REGIMES = ("clean", "none", "threshold_only", "full")


def recovery_summary(table: pd.DataFrame, min_drop: float = 0.05) -> pd.DataFrame:
    """Per method, condition and policy: F1 of each regime, its false-positive rate (``fpr_<regime>``), the F1
    drop under shift, and the share of the drop that threshold-only recalibration and a full re-fit recover.

    The shares are NaN where the shift cost at most ``min_drop`` F1. The default, 0.05, is about three
    images of a 50-image test split with 30 anomalies (one missed anomaly moves F1 by ~0.017): below it the
    ratio divides by noise (a 0.02 drop turned a 0.18 loss into "-900 % recovered"). F1 alone can flatter
    the unadapted model: flagging every image scores 2p / (1 + p) at anomaly prevalence p, whatever the
    normals' fate, hence the FPR columns.
    """
    keys = ["method", "category", "transform", "severity", "policy"]
    wide = table.pivot_table(index=keys, columns="regime", values="f1").reset_index()
    fpr = table.pivot_table(index=keys, columns="regime", values="fpr")
    wide = wide.merge(fpr.add_prefix("fpr_").reset_index(), on=keys)
    wide["drop"] = wide["clean"] - wide["none"]
    wide["recovered_threshold_only"] = [
        thresholds.recovered_fraction(r.clean, r.none, r.threshold_only, min_drop) for r in wide.itertuples()]
    wide["recovered_full"] = [thresholds.recovered_fraction(r.clean, r.none, r.full, min_drop)
                              for r in wide.itertuples()]
    return wide


def recovery_medians(summary: pd.DataFrame, by: Sequence[str] = ("method", "policy")) -> pd.DataFrame:
    """Median F1 and FPR of each regime over the conditions of each group, the median recovered shares over
    the conditions where the shift cost F1 (the shares are NaN elsewhere), and how many conditions each counts."""
    columns = [c for r in REGIMES for c in (r, f"fpr_{r}") if c in summary.columns]
    grouped = summary.groupby(list(by))
    out = grouped[columns + ["recovered_threshold_only", "recovered_full"]].median()
    out["conditions"] = grouped.size()
    out["conditions_with_drop"] = grouped["recovered_full"].count()
    return out.reset_index()


def images_needed_table(curves: pd.DataFrame, table: pd.DataFrame, tolerance: float = 0.02) -> pd.DataFrame:
    """Smallest validation set (n, of which anomalous) whose median test F1 reaches the full-validation F1."""
    rows = []
    keys = ["method", "category", "transform", "severity", "policy"]
    for key, curve in curves.groupby(keys):
        match = table[(table[keys] == pd.Series(key, index=keys)).all(axis=1) & (table.regime == "threshold_only")]
        target = float(match.f1.iloc[0]) if len(match) else np.nan
        needed = thresholds.images_needed(curve, target, tolerance=tolerance)
        rows.append({**dict(zip(keys, key)), "target_f1": target,
                     "n_needed": needed[0] if needed else None, "n_anomalous_needed": needed[1] if needed else None})
    return pd.DataFrame(rows)
