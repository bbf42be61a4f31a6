"""Assemble the study's tables and findings from saved result tables only (the report never recomputes a model)."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from helpers.paths import Run, write_csv


def load_results(run: Run, table: str) -> pd.DataFrame:
    """Every ``results.csv`` under the run's ``results/<table>/``, concatenated; empty frame if none. Only this
    run's folder is read, so another configuration's results can never enter its tables."""
    folder = run.dir / "results" / table
    frames = [pd.read_csv(p, keep_default_na=True) for p in sorted(folder.rglob("results.csv"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_table(df: pd.DataFrame, name: str, tables_dir: str | Path, caption: str, float_format: str = "%.3f") -> Path:
    """The same table as CSV, Markdown and LaTeX (booktabs), with the caption kept beside it."""
    folder = Path(tables_dir)
    write_csv(df, folder / f"{name}.csv")
    (folder / f"{name}.md").write_text(f"{caption}\n\n{df.to_markdown(index=False, floatfmt=float_format[1:])}\n")
    latex = df.to_latex(index=False, float_format=lambda x: float_format % x, caption=caption, label=f"tab:{name}",
                        escape=True)
    (folder / f"{name}.tex").write_text(latex)
    return folder / f"{name}.csv"


def markdown(df: pd.DataFrame) -> str:
    """A Markdown table with missing values shown as 'n/a' (tabulate would print 'nan')."""
    return df.astype(object).where(df.notna(), "n/a").to_markdown(index=False)


def mean_sd(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "n/a"
    if len(values) == 1:
        return f"{values.iloc[0]:.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def baseline_table(shift_drop: pd.DataFrame) -> pd.DataFrame:
    """Clean test split: method by category, mean ± sd over seeds, and the bootstrap interval of seed 0."""
    clean = shift_drop[shift_drop["transform"] == "none"]
    rows = []
    for (method, category), g in clean.groupby(["method", "category"]):
        rows.append({"method": method, "category": category, "seeds": len(g),
                     "image AUROC": mean_sd(g["image_auroc"]),
                     "image AP": mean_sd(g["image_ap"]), "image F1-max": mean_sd(g["image_f1max"]),
                     "pixel AUROC": mean_sd(g["pixel_auroc"]), "pixel AUPRO": mean_sd(g["pixel_aupro"])})
    return pd.DataFrame(rows)


def drop_table(shift_drop: pd.DataFrame, metric: str = "image_auroc") -> pd.DataFrame:
    """Mean over categories and seeds of the metric per method, transform and severity, and its drop from clean."""
    clean = shift_drop[shift_drop["transform"] == "none"].groupby(["method", "draw", "category", "seed"])[metric].mean()
    shifted = shift_drop[shift_drop["transform"] != "none"].copy()
    shifted["drop"] = [clean.get((r.method, r.draw, r.category, r.seed), np.nan) - getattr(r, metric)
                       for r in shifted.itertuples()]
    out = shifted.groupby(["method", "mode", "transform", "severity"]).agg(
        **{metric: (metric, "mean"), "drop": ("drop", "mean"), "drop_sd": ("drop", "std")}).reset_index()
    return out


def data_sizes(counts: pd.DataFrame) -> list[str]:
    """'Images per category: ...' from notebook 00's split counts (category, defect_type, one column per split)."""
    if counts.empty:
        return []
    splits = [s for s in ("train", "calib", "val", "test") if s in counts.columns]
    normal = counts[counts["defect_type"] == "good"].groupby("category")[splits].sum()
    total = counts.groupby("category")[splits].sum()
    per_category = "; ".join(
        f"{c}: " + ", ".join(f"{s} {total.loc[c, s]}" + (f" ({total.loc[c, s] - normal.loc[c, s]} anomalous)"
                                                       if total.loc[c, s] > normal.loc[c, s] else "") for s in splits)
        for c in total.index)
    return [f"Images per category and split: {per_category}."]


def hardware() -> str:
    import os

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {device}, torch {torch.__version__}"


def sentence_compare(df: pd.DataFrame, metric: str, a: str, b: str, by: str = "category") -> str:
    """'a' beats 'b' on k of n groups, from the mean over seeds; says so in plain numbers."""
    means = df.groupby(["method", by])[metric].mean().unstack("method")
    if a not in means or b not in means:
        return f"({metric}: one of {a}, {b} has no results)"
    diff = (means[a] - means[b]).dropna()
    wins = int((diff > 0).sum())
    return (f"{a} has the higher mean {metric.replace('_', ' ')} on {wins} of {len(diff)} {by} values "
            f"(mean difference {diff.mean():+.3f}, range {diff.min():+.3f} to {diff.max():+.3f}).")


def largest_drops(drop: pd.DataFrame, n: int = 3) -> list[str]:
    worst = drop.sort_values("drop", ascending=False).head(n)
    return [f"{r.method}, {r.transform} severity {r.severity}: image AUROC {r.image_auroc:.3f} "
            f"(drop {r.drop:+.3f})" for r in worst.itertuples()]


def bullet(lines: Sequence[str]) -> str:
    return "\n".join(f"- {line}" for line in lines)


def render(run: Run, results: dict[str, pd.DataFrame], baseline: pd.DataFrame, drop: pd.DataFrame) -> str:
    """REPORT.md: setup, then each result with its numbers and only the findings those numbers support."""
    cfg = run.config
    dataset, data_root, categories = cfg.data.dataset, cfg.data.root, cfg.data.categories
    backbone, image_size, seeds = cfg.model.backbone, cfg.model.image_size, cfg.model.seeds
    figures_dir = run.figures
    shift_drop = results["shift_drop"]
    clean = shift_drop[shift_drop["transform"] == "none"]
    parts = [
        f"# Anomaly detection under shift: PatchCore vs PaDiM ({dataset})",
        "## Setup",
        bullet([f"Run `{run.name}` (profile `{run.profile}`; its configuration is `config.yaml` in the run folder); "
                f"dataset `{dataset}` at `{data_root}`; categories {', '.join(categories)}; data draws "
                f"{list(cfg.data.draws)}.",
                *data_sizes(results.get("data_counts", pd.DataFrame())),
                f"Backbone `{backbone}`, input {image_size} px; model seeds {list(seeds)}.",
                f"Hardware: {hardware()}.",
                "Run times per notebook and the measured fit and inference times are in `run_times.md` (the one file "
                "that changes between identical runs)."]),
        "## Clean baseline",
        markdown(baseline),
        "",
        sentence_compare(clean, "image_auroc", "patchcore", "padim"),
        sentence_compare(clean, "pixel_auroc", "patchcore", "padim"),
        "![baseline](baseline.png)",
        "## Drop under shift",
        "Largest drops of image AUROC (mean over categories and seeds):",
        bullet(largest_drops(drop)),
        _drop_by_kind(drop),
    ]
    for method, mode in sorted(set(zip(drop["method"], drop["mode"]))):
        parts.append(f"![{method} drop, {mode}](drop_heatmap_{method}_{mode}.png)")
    sweep = results.get("sweep", pd.DataFrame())
    if len(sweep):
        parts += ["## Hyperparameters, clean and under shift",
                  "Image AUROC, mean over categories (seed 0), for each value of one hyperparameter with the others "
                  "at their defaults; the second number is under the sweep's shift:",
                  bullet(sweep_findings(sweep)), "![patchcore sweep](sweep_patchcore.png)", "![padim sweep](sweep_padim.png)"]
    from helpers.adaptation import report_section

    parts += report_section(results, cfg)
    unified = results.get("unified_metrics", pd.DataFrame())
    if len(unified):
        parts += ["## Unified model", markdown(unified.round(3)), ""]
        parts += _unified_findings(results)
    eff = results.get("efficiency", pd.DataFrame())
    if len(eff):
        sizes = eff.groupby("method")["model_bytes"].mean() / 2 ** 20
        parts += ["## Efficiency",
                  "Stored model size per method (MiB): " + ", ".join(f"{m} {v:.1f}" for m, v in sizes.items())
                  + ". Fit time, inference time per image and peak memory, measured from scratch in the same run, "
                  "are in `run_times.md`."]
    captions_path = Path(figures_dir) / "captions.json"
    if captions_path.is_file():
        import json

        captions = json.loads(captions_path.read_text())
        parts += ["## Figures", bullet([f"`{name}.png` / `.pdf`: {text}" for name, text in sorted(captions.items())])]
    return "\n\n".join(parts) + "\n"


GEOMETRIC = {"rotation", "translation", "scale", "perspective"}


def sweep_findings(sweep: pd.DataFrame, metric: str = "image_auroc") -> list[str]:
    """One line per swept hyperparameter: the metric clean / shifted at each value, and the value whose
    drop under the shift is smallest (only when the values differ in drop by more than 0.005)."""
    lines = []
    condition = np.where(sweep["transform"] == "none", "clean", "shifted")
    means = sweep.assign(condition=condition).groupby(["method", "param", "value", "condition"])[metric].mean()
    table = means.unstack("condition")
    for (method, param), g in table.groupby(level=["method", "param"]):
        if len(g) < 2 or "shifted" not in g:
            continue
        values = g.droplevel(["method", "param"])
        drop = values["clean"] - values["shifted"]
        text = f"{method} `{param}`: " + "; ".join(f"{v} {r.clean:.3f} / {r.shifted:.3f}" for v, r in values.iterrows())
        if drop.max() - drop.min() > 0.005:
            text += f" (smallest drop at {drop.idxmin()}: {drop.min():+.3f}, largest at {drop.idxmax()}: {drop.max():+.3f})"
        else:
            text += " (the drop is the same for every value, within 0.005)"
        lines.append(text + ".")
    return lines


def _drop_by_kind(drop: pd.DataFrame) -> str:
    if drop.empty:
        return ""
    kind = np.where(drop["transform"].isin(GEOMETRIC), "geometric",
                    np.where(drop["transform"] == "mixed", "mixed", "photometric"))
    by = drop.assign(kind=kind).groupby(["method", "kind"])["drop"].mean().unstack("kind")
    return "Mean drop by kind of shift: " + "; ".join(
        f"{m}: " + ", ".join(f"{k} {v:+.3f}" for k, v in row.dropna().items()) for m, row in by.iterrows()) + "."


def _unified_findings(results: dict[str, pd.DataFrame]) -> list[str]:
    lines = []
    prov = results.get("unified_provenance", pd.DataFrame())
    if len(prov):
        for r in prov.itertuples():
            lines.append(f"PatchCore unified, {r.category}: {100 * r.cross_share_normal:.1f} % of normal patches and "
                         f"{100 * r.cross_share_anomalous:.1f} % of anomalous patches have their nearest neighbour in "
                         f"another category; {100 * r.explained_away:.1f} % of anomalous patches are explained away "
                         f"(cross-category neighbour and a score below the category's normal 99th percentile).")
    fpr = results.get("unified_fpr_matrix", pd.DataFrame())
    if len(fpr):
        off = fpr[fpr["normal_of"] != fpr["threshold_of"]]
        worst = off.sort_values("fpr", ascending=False).iloc[0]
        lines.append(f"Judged with another category's threshold, normal images are flagged at up to "
                     f"{100 * worst.fpr:.0f} % ({worst.method}: {worst.normal_of} normals against the "
                     f"{worst.threshold_of} threshold).")
    cov = results.get("unified_covariance", pd.DataFrame())
    if len(cov):
        lines.append("PaDiM's pooled covariance against the per-category one (trace ratio, mean over positions): "
                     + ", ".join(f"{r.category} {r.trace_ratio:.2f}x" for r in cov.itertuples()) + ".")
    return [bullet(lines)] if lines else []


def efficiency_times(eff: pd.DataFrame) -> str:
    """The measured costs (seconds, milliseconds, MiB of peak memory) as a Markdown section for ``run_times.md``:
    they change from run to run, so they stay out of the report and its tables."""
    if eff.empty:
        return ""
    cols = ["fit_s", "infer_ms_per_image", "fit_peak_mb", "infer_peak_mb"]
    means = eff.groupby("method")[cols].mean().round(1).reset_index()
    measured = ", ".join(sorted(eff["category"].unique()))
    return ("## Cost of each method\n\nFitted from scratch with an empty feature cache on " + measured
            + " and timed on its test split (backbone included); peak memory is the resident set above its level "
            "at the start of each phase.\n\n" + markdown(means) + "\n")
