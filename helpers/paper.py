"""The paper's tables, built from one run's saved results (notebook 06 exports them to ``tables/``), and the
findings REPORT.md states from them: each statement takes its numbers from a row of an exported table, and a
comparison is called a difference only when its paired interval excludes 0."""
from __future__ import annotations

import numpy as np
import pandas as pd

from helpers import stats, summaries
from helpers.report import Table

CONDITION = ["mode", "transform", "severity"]
PHOTOMETRIC = ("brightness", "contrast", "gamma", "color_temperature", "blur", "noise", "gradient", "spotlight")
GEOMETRIC = ("rotation", "translation", "scale", "perspective")
CONTROLS = ("border_fill", "rotation_fill")


def kind_of(transform: str) -> str:
    if transform in PHOTOMETRIC:
        return "photometric"
    if transform in GEOMETRIC:
        return "geometric"
    return "control" if transform in CONTROLS else transform


def _clean(scores: pd.DataFrame) -> pd.DataFrame:
    return scores[scores["transform"] == "none"]


# --- RQ1: clean baseline --------------------------------------------------------------------------------------


def baseline(scores: pd.DataFrame, results: pd.DataFrame, matched_scores: pd.DataFrame, matched: pd.DataFrame,
             n_resamples: int = 1000) -> Table:
    """Per method (and matched-stages variant) and category, plus all categories pooled: image AUROC with its
    bootstrap interval over test images, pooled over data draws and model seeds; AP, F1-max, pixel AUROC and
    AUPRO as means over the same runs."""
    arms = [(m, "own stages", _clean(scores[scores["method"] == m]), _clean(results[results["method"] == m]))
            for m in sorted(scores["method"].unique())]
    if len(matched_scores):
        for m in sorted(matched_scores["method"].unique()):
            arms.append((m, "matched stages", matched_scores[matched_scores["method"] == m],
                         matched[matched["method"] == m]))
    rows = []
    for method, variant, sc, res in arms:
        for category in [*sorted(sc["category"].unique()), "all"]:
            part = sc if category == "all" else sc[sc["category"] == category]
            runs = res if category == "all" else res[res["category"] == category]
            ci = stats.bootstrap_auroc(part, n_resamples=n_resamples)
            rows.append({"method": method, "stages": variant, "category": category, "image_auroc": ci.estimate,
                         "image_auroc_lo": ci.lo, "image_auroc_hi": ci.hi, "n_units": ci.n_units,
                         "n_seeds": ci.n_replicates, "image_ap": runs["image_ap"].mean(),
                         "image_f1max": runs["image_f1max"].mean(), "pixel_auroc": runs["pixel_auroc"].mean(),
                         "pixel_aupro": runs["pixel_aupro"].mean(), "n_runs": len(runs)})
    return Table("baseline", pd.DataFrame(rows),
                 "Clean test split. Image AUROC with a 95 % bootstrap interval over test images, pooled over data "
                 "draws (n_units: draw x category) and model seeds; AP, F1-max, pixel AUROC and AUPRO are means over "
                 "the same n_runs runs.")


def method_difference(scores: pd.DataFrame, matched_scores: pd.DataFrame, first: str, second: str,
                      n_resamples: int = 1000) -> Table:
    """first - second on the same clean test images, per category and pooled: each method on its own stages, and
    (where a matched run exists) both on the matched stages."""
    clean = _clean(scores)
    parts = []
    for label, table in (("own stages", clean),
                         ("matched stages", pd.concat([clean[clean["method"] == first], matched_scores])
                          if len(matched_scores) else pd.DataFrame())):
        if table.empty or second not in set(table["method"]):
            continue
        per = summaries.paired_difference(table, "method", first, second, by=["category"], n_resamples=n_resamples)
        pooled = summaries.paired_difference(table, "method", first, second, n_resamples=n_resamples)
        pooled.insert(0, "category", "all")
        parts.append(pd.concat([per, pooled], ignore_index=True).assign(stages=label))
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return Table("method_difference", frame,
                 f"Clean image AUROC of {first} minus {second} on the same test images, paired bootstrap 95 % interval "
                 "pooled over data draws and model seeds; a difference only where the interval excludes 0.")


# --- RQ2: drop under shift ------------------------------------------------------------------------------------


def shift_drop(drops: pd.DataFrame, severity_table: pd.DataFrame) -> Table:
    """The drop per method and condition, with the severity table's note of which categories' training images
    already vary that much."""
    inside = severity_table.filter(like="inside_").columns
    flags = severity_table[["transform", "severity", *inside]].copy()
    frame = drops.merge(flags, on=["transform", "severity"], how="left")
    frame.insert(3, "kind", frame["transform"].map(kind_of))
    return Table("shift_drop", frame,
                 "Image AUROC clean and shifted and the drop (clean minus shifted on the same test images), 95 % paired "
                 "bootstrap interval pooled over data draws, categories (n_units) and model seeds (n_seeds); "
                 "inside_<category>: the severity lies within the variation that category's training images have.")


def method_drop_difference(scores: pd.DataFrame, first: str, second: str, n_resamples: int = 1000) -> Table:
    """Per condition: first's drop minus second's drop, one paired bootstrap over four arms (below 0: first
    loses less)."""
    rows = []
    for cond, shifted in scores[scores["transform"] != "none"].groupby(CONDITION, sort=True):
        keys = set(shifted["image"])
        draws = set(shifted["draw"])
        clean = _clean(scores)
        clean = clean[clean["image"].isin(keys) & clean["draw"].isin(draws)]
        arms = [clean[clean["method"] == first], shifted[shifted["method"] == first],
                clean[clean["method"] == second], shifted[shifted["method"] == second]]
        if any(a.empty for a in arms):
            continue
        ci = stats.bootstrap_contrast(arms, [1, -1, -1, 1], n_resamples=n_resamples)
        rows.append({**dict(zip(CONDITION, cond)), "first": first, "second": second, "drop_difference": ci.estimate,
                     "drop_difference_lo": ci.lo, "drop_difference_hi": ci.hi, "excludes_zero": ci.excludes_zero,
                     "n_units": ci.n_units, "n_seeds": ci.n_replicates})
    return Table("method_drop_difference", pd.DataFrame(rows),
                 f"Drop of {first} minus drop of {second} under each shift, on the same images (below 0: {first} loses "
                 "less), 95 % paired bootstrap interval.")


def mode_difference(scores: pd.DataFrame, n_resamples: int = 1000) -> Table:
    """Per method, transform and severity, on the draws scored in both modes: AUROC under the domain shift minus
    AUROC under the per-image shift of the same parameters, on the same images."""
    rows = []
    shifted = scores[scores["transform"] != "none"]
    both = set(shifted[shifted["mode"] == "per_image"]["draw"])
    for (method, transform, severity), g in shifted[shifted["draw"].isin(both)].groupby(
            ["method", "transform", "severity"], sort=True):
        dom, per = g[g["mode"] == "domain"], g[g["mode"] == "per_image"]
        if dom.empty or per.empty:
            continue
        ci = stats.bootstrap_auroc(dom, per, n_resamples=n_resamples)
        rows.append({"method": method, "transform": transform, "severity": severity, "difference": ci.estimate,
                     "difference_lo": ci.lo, "difference_hi": ci.hi, "excludes_zero": ci.excludes_zero,
                     "n_units": ci.n_units, "n_seeds": ci.n_replicates})
    return Table("mode_difference", pd.DataFrame(rows),
                 "Image AUROC under a domain shift (one rig for every image) minus under the per-image shift of the same "
                 "transform and severity, on the same images of the draws scored in both modes; 95 % paired interval.")


def geometric_control(drops: pd.DataFrame) -> Table:
    frame = summaries.control_summary(drops)
    return Table("geometric_control", frame,
                 "The old rotation (pose change and mean-colour frame, rotation_fill) against the frame alone "
                 "(border_fill) and the pose alone on the generator's canvas (rotation): drops with 95 % paired "
                 "intervals, and the share of the old drop the frame alone reproduces.")


def hazelnut_rotation(drops_by_category: pd.DataFrame, category: str = "hazelnut") -> Table:
    """Per method, mode and severity on one category: the rotation drop beside each photometric drop of the same
    severity (the synthetic hazelnut lies at a random angle, so rotating it is in-distribution)."""
    sub = drops_by_category[drops_by_category["category"] == category]
    rows = []
    for (method, mode, severity), g in sub.groupby(["method", "mode", "severity"]):
        by = dict(zip(g["transform"], g.itertuples()))
        if "rotation" not in by:
            continue
        photometric = {t: r for t, r in by.items() if t in PHOTOMETRIC}
        row = {"method": method, "category": category, "mode": mode, "severity": severity,
               "rotation_drop": by["rotation"].drop, "rotation_drop_lo": by["rotation"].drop_lo,
               "rotation_drop_hi": by["rotation"].drop_hi}
        for t, r in sorted(photometric.items()):
            row[f"{t}_drop"] = r.drop
        if photometric:
            row["smallest_photometric_drop"] = min(r.drop for r in photometric.values())
            row["rotation_at_most_a_photometric_shift"] = by["rotation"].drop <= max(r.drop for r in photometric.values())
        rows.append(row)
    return Table(f"{category}_rotation", pd.DataFrame(rows),
                 f"{category}: image AUROC drop under rotation (on the generator's canvas) beside each photometric shift "
                 "of the same severity, per method and mode.")


def per_defect(per_defect_type: pd.DataFrame) -> Table:
    clean = per_defect_type[per_defect_type["transform"] == "none"][["method", "category", "defect_type",
                                                                     "image_auroc"]]
    frame = per_defect_type.merge(clean.rename(columns={"image_auroc": "clean_auroc"}),
                                  on=["method", "category", "defect_type"], how="left")
    frame["drop"] = frame["clean_auroc"] - frame["image_auroc"]
    return Table("per_defect_type", frame,
                 "Image AUROC of each defect type against the normal test images, clean and under each shift, mean over "
                 "data draws and model seeds (n_runs), and its drop from clean.")


def sweep(sweep_summary: pd.DataFrame) -> Table:
    return Table("sweep", sweep_summary,
                 "One hyperparameter changed at a time (first data draw and model seed, test split): clean AUROC, its "
                 "paired difference from the default, and under each shift the difference of drops from the default "
                 "(below 0: more robust), 95 % paired intervals pooled over categories; val_auroc_clean is the "
                 "validation split's clean AUROC, on which a setting may be chosen (chosen_on_val).")


# --- findings (the sentences the report states) ---------------------------------------------------------------


def kind_summary(drops: pd.DataFrame) -> pd.DataFrame:
    """Mean drop per method, mode and kind of shift over its transforms and severities (the report's headline;
    the per-condition intervals are in shift_drop)."""
    frame = drops.assign(kind=drops["transform"].map(kind_of))
    out = frame.groupby(["method", "mode", "kind"]).agg(mean_drop=("drop", "mean"), max_drop=("drop", "max"),
                                                        conditions=("drop", "size"),
                                                        conditions_with_drop=("drop_lo", lambda v: int((v > 0).sum())))
    return out.reset_index()


def robustness_findings(sweep_summary: pd.DataFrame) -> pd.DataFrame:
    """The sweep settings whose difference of drops from the default has an interval excluding 0, one row per
    (setting, shift)."""
    rows = []
    for r in sweep_summary.itertuples(index=False):
        r = r._asdict()
        for col in [c for c in r if c.startswith("drop_difference_") and not c.endswith(("_lo", "_hi"))]:
            lo, hi = r[f"{col}_lo"], r[f"{col}_hi"]
            if lo > 0 or hi < 0:
                rows.append({"method": r["method"], "param": r["param"], "value": r["value"],
                             "shift": col.removeprefix("drop_difference_"), "drop_difference": r[col],
                             "drop_difference_lo": lo, "drop_difference_hi": hi})
    return pd.DataFrame(rows, columns=["method", "param", "value", "shift", "drop_difference", "drop_difference_lo",
                                       "drop_difference_hi"])


def largest(frame: pd.DataFrame, column: str, n: int = 3) -> pd.DataFrame:
    return frame.sort_values(column, ascending=False).head(n)


def share_mean(control: pd.DataFrame, method: str, mode: str = "domain") -> float:
    sub = control[(control["method"] == method) & (control["mode"] == mode)]["frame_share_of_old_drop"].dropna()
    return float(sub.mean()) if len(sub) else np.nan


# --- REPORT.md ------------------------------------------------------------------------------------------------


def _row(frame: pd.DataFrame, **where) -> pd.Series | None:
    sub = frame
    for key, value in where.items():
        sub = sub[sub[key] == value]
    return None if sub.empty else sub.iloc[0]


def _ci(r, name: str) -> str:
    from helpers.report import interval

    return interval(r[name], r[f"{name}_lo"], r[f"{name}_hi"])


def _diff_words(r, name: str, positive: str, negative: str) -> str:
    """'positive'/'negative' when the interval excludes 0, otherwise 'no difference'."""
    if r[f"{name}_lo"] > 0:
        return positive
    if r[f"{name}_hi"] < 0:
        return negative
    return "no difference"


def baseline_findings(tables: dict[str, pd.DataFrame], methods: list[str], labels: dict[str, str]) -> list[str]:
    from helpers.report import num

    base, diff = tables["baseline"], tables.get("method_difference", pd.DataFrame())
    lines = []
    for m in methods:
        r = _row(base, method=m, stages="own stages", category="all")
        if r is not None:
            lines.append(f"{labels[m]}, all categories: image AUROC {_ci(r, 'image_auroc')}, pixel AUPRO "
                         f"{num(r.pixel_aupro)} (mean of {int(r.n_runs)} runs: {int(r.n_units)} draw x category units "
                         f"x {int(r.n_seeds)} model seeds).")
    for r in diff.itertuples(index=False) if len(diff) else []:
        r = r._asdict()
        verdict = _diff_words(r, "difference", f"{labels[r['first']]} higher", f"{labels[r['second']]} higher")
        where = "all categories pooled" if r["category"] == "all" else r["category"]
        lines.append(f"{labels[r['first']]} minus {labels[r['second']]} ({r['stages']}, {where}): "
                     f"{_ci(r, 'difference')}: {verdict}.")
    return lines


def drop_findings(tables: dict[str, pd.DataFrame], methods: list[str], labels: dict[str, str]) -> list[str]:
    from helpers.report import num, pct

    lines = []
    kinds = tables["drop_by_kind"]
    for m in methods:
        sub = kinds[(kinds["method"] == m) & (kinds["mode"] == "domain")]
        parts = [f"{r.kind} {num(r.mean_drop)} (largest {num(r.max_drop)}; the interval excludes 0 in "
                 f"{int(r.conditions_with_drop)} of {int(r.conditions)} conditions)" for r in sub.itertuples()]
        if parts:
            lines.append(f"{labels[m]}, domain shifts, mean image-AUROC drop by kind: " + "; ".join(parts) + ".")
    drops = tables["shift_drop"]
    for r in largest(drops[drops["mode"] == "domain"], "drop").itertuples():
        lines.append(f"Largest domain-shift drop: {labels[r.method]}, {r.transform} severity {r.severity}: AUROC "
                     f"{num(r.auroc_clean)} -> {num(r.auroc_shifted)}, drop {interval_text(r, 'drop')}.")
    control = tables.get("geometric_control", pd.DataFrame())
    for m in methods:
        share = share_mean(control, m) if len(control) else np.nan
        if np.isfinite(share):
            lines.append(f"{labels[m]}: the mean-colour frame alone (border_fill) reproduces {pct(share)} of the old "
                         "rotation's drop (rotation_fill), mean over severities, domain mode (per severity in "
                         "geometric_control).")
    return lines


def interval_text(r, name: str) -> str:
    from helpers.report import interval

    return interval(getattr(r, name), getattr(r, f"{name}_lo"), getattr(r, f"{name}_hi"))
