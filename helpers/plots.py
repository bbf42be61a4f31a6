"""One figure style for the whole study, saving to PNG and PDF with a caption index, and the few plot types
the notebooks share (image grids with mask outlines, anomaly maps, metric-vs-severity curves, heat maps).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from helpers.data import load_image, load_mask

# Markers and dashes carry the method/condition as well as colour, so figures survive greyscale print; each
# method's own marker, dash and colour come from its registry entry.
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p", "8"]
DASHES = ["", (4, 2), (1, 1), (4, 1, 1, 1), (6, 2, 2, 2), (2, 2)]
CAPTIONS = "captions.json"


def set_style() -> None:
    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 160, "savefig.bbox": "tight",
                         "axes.titleweight": "bold", "legend.frameon": False})


# No creation date or producer version in the files: re-running the study with unchanged results rewrites
# byte-identical figures, so git sees no churn.
_METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None, "Creator": None}}


def method_style(method: str) -> dict:
    """Colour, marker and dash of a method (from its registry entry), and its label."""
    from helpers import registry

    spec = registry.get(method)
    return {"color": spec.colour, "marker": spec.marker, "linestyle": spec.linestyle, "label": spec.label}


def save_figure(fig: plt.Figure, name: str, figures_dir: str | Path, caption: str, dpi: int | None = None) -> Path:
    """Write ``<name>.png`` and ``<name>.pdf``, record the caption in ``captions.json`` beside them and, in a
    notebook, show the saved PNG as the cell's output. ``dpi`` lowers the PNG's resolution for image-heavy
    figures (the PDF keeps vector parts sharp at any size)."""
    folder = Path(figures_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        tmp = folder / f".{name}.tmp.{ext}"
        fig.savefig(tmp, format=ext, metadata=_METADATA[ext], **({"dpi": dpi} if dpi else {}))
        tmp.replace(folder / f"{name}.{ext}")
    plt.close(fig)
    index_path = folder / CAPTIONS
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    index[name] = caption
    tmp = folder / f".{CAPTIONS}.tmp"
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
    tmp.replace(index_path)
    png = folder / f"{name}.png"
    _show_in_notebook(png, caption)
    return png


def _show_in_notebook(png: Path, caption: str) -> None:
    """Display the saved file's own bytes (the figure is closed, so nothing else shows it), with output metadata
    naming the file: the rendered pages (helpers.render_notebooks) link the file instead of embedding it."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None or getattr(shell, "kernel", None) is None:  # a script or a terminal: nothing to show in
        return
    from IPython.display import Image, display

    from helpers.render_notebooks import FIGURE_KEY

    display(Image(data=png.read_bytes(), format="png"), metadata={FIGURE_KEY: {"file": png.name, "caption": caption}})


def outline(ax: plt.Axes, mask: np.ndarray, color: str = "red") -> None:
    if mask is not None and mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors=color, linewidths=1.0)


def image_grid(rows: pd.DataFrame, image_size: int, title_col: str = "defect_type", ncols: int = 6,
               suptitle: str | None = None) -> plt.Figure:
    """Images of the given manifest rows with their ground-truth masks outlined."""
    n = len(rows)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.0 * ncols, 2.1 * nrows), squeeze=False)
    for ax, (_, r) in zip(axes.flat, rows.iterrows()):
        ax.imshow(load_image(r["image_path"], size=image_size))
        if r.get("mask_path") is not None:
            outline(ax, load_mask(r["mask_path"], size=image_size))
        ax.set_title(str(r[title_col]), fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def anomaly_map_grid(rows: pd.DataFrame, maps: np.ndarray, scores: np.ndarray, image_size: int,
                     threshold: float | None = None, suptitle: str | None = None) -> plt.Figure:
    """Each image beside its anomaly map overlay; masks outlined; title gives label and score."""
    n = len(rows)
    fig, axes = plt.subplots(2, n, figsize=(2.0 * n, 4.3), squeeze=False)
    vmax = float(np.percentile(maps, 99.5)) if maps.size else 1.0
    vmin = float(np.percentile(maps, 1))
    for i, (_, r) in enumerate(rows.iterrows()):
        img = load_image(r["image_path"], size=image_size)
        mask = load_mask(r["mask_path"], size=image_size) if r.get("mask_path") is not None else None
        axes[0, i].imshow(img)
        outline(axes[0, i], mask)
        verdict = ""
        if threshold is not None:
            flagged = scores[i] >= threshold
            verdict = {(1, True): "detected", (1, False): "missed", (0, True): "false alarm",
                       (0, False): "good"}[(int(r["label"]), bool(flagged))]
        axes[0, i].set_title(f"{r['defect_type']}\n{verdict}", fontsize=8)
        axes[1, i].imshow(img, alpha=1.0)
        axes[1, i].imshow(maps[i], cmap="inferno", alpha=0.6, vmin=vmin, vmax=vmax)
        outline(axes[1, i], mask, color="cyan")
        axes[1, i].set_title(f"score {scores[i]:.2f}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def metric_vs_severity(df: pd.DataFrame, metric: str, hue: str = "transform", col: str = "category",
                       style: str | None = None, title: str | None = None) -> sns.FacetGrid:
    """Line plot of a metric against shift severity (0 = clean), one panel per ``col``."""
    g = sns.relplot(data=df, x="severity", y=metric, hue=hue, style=style or hue, col=col, kind="line",
                    markers=True, dashes=True, errorbar="sd", height=2.8, aspect=1.0,
                    facet_kws={"sharey": True})
    g.set_axis_labels("shift severity (0 = clean)", metric.replace("_", " "))
    if title:
        g.figure.suptitle(title, y=1.03)
    return g


def heatmap(table: pd.DataFrame, title: str, fmt: str = ".2f", cmap: str = "viridis",
            xlabel: str = "", ylabel: str = "", vmin=None, vmax=None) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * table.shape[1], 0.8 + 0.5 * table.shape[0]))
    sns.heatmap(table, annot=True, fmt=fmt, cmap=cmap, ax=ax, vmin=vmin, vmax=vmax, cbar_kws={"shrink": 0.8})
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    return fig


def count_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images per category, split and defect type (a pivot for display)."""
    counts = manifest.groupby(["category", "defect_type", "split"]).size().unstack("split", fill_value=0)
    return counts.reindex(columns=[c for c in ("train", "calib", "val", "test") if c in counts.columns])


def pick_examples(rows: pd.DataFrame, per_type: int = 1, seed: int = 0) -> pd.DataFrame:
    """A few rows per defect type, deterministic."""
    picked = [g.sample(min(per_type, len(g)), random_state=seed) for _, g in rows.groupby("defect_type", sort=True)]
    return pd.concat(picked).reset_index(drop=True)


def shift_grid(panels: Sequence[Sequence[tuple[np.ndarray, np.ndarray | None]]], row_labels: Sequence[str],
               col_labels: Sequence[str], title: str = "") -> plt.Figure:
    """Images (rows x columns of ``(image, mask)``) with their masks outlined, e.g. one defective image under
    every transform (rows) and severity (columns)."""
    nrows, ncols = len(panels), max(len(r) for r in panels)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.5 * ncols, 1.5 * nrows), squeeze=False)
    for i, row in enumerate(panels):
        for j, (image, mask) in enumerate(row):
            ax = axes[i, j]
            ax.imshow(image)
            outline(ax, mask)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_labels[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def sweep_panels(df: pd.DataFrame, metric: str, title: str | None = None) -> plt.Figure:
    """One panel per swept hyperparameter: the metric per value, solid for clean, dashed for shifted."""
    params = list(dict.fromkeys(df["param"]))
    fig, axes = plt.subplots(1, len(params), figsize=(3.0 * len(params), 3.0), squeeze=False, sharey=True)
    conditions = list(dict.fromkeys(zip(df["transform"], df["severity"])))
    for ax, param in zip(axes.flat, params):
        sub = df[df["param"] == param]
        values = list(dict.fromkeys(sub["value"]))
        for ci, category in enumerate(sorted(sub["category"].unique())):
            for di, (transform, severity) in enumerate(conditions):
                part = sub[(sub["category"] == category) & (sub["transform"] == transform)
                           & (sub["severity"] == severity)]
                y = part.groupby("value")[metric].mean().reindex(values)
                label = f"{category}, {'clean' if transform == 'none' else f'{transform} {severity}'}"
                ax.plot(range(len(values)), y.to_numpy(), marker=MARKERS[ci % len(MARKERS)],
                        linestyle="-" if di == 0 else "--", color=f"C{ci}", label=label)
        ax.set_xticks(range(len(values)), values, rotation=30, fontsize=8)
        ax.set_xlabel(param)
    axes.flat[0].set_ylabel(metric.replace("_", " "))
    axes.flat[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def regime_bars(table: pd.DataFrame, policy: str, metric: str = "f1", title: str | None = None) -> plt.Figure:
    """Bars of a metric per shift and regime, one panel per method; hatching tells regimes apart in greyscale."""
    data = table[table["policy"] == policy].copy()
    data["shift"] = data["transform"] + " " + data["severity"].astype(str)
    methods = list(dict.fromkeys(data["method"]))
    regimes = [r for r in ("none", "threshold_only", "full") if r in set(data["regime"])]
    shifts = list(dict.fromkeys(data["shift"]))
    fig, axes = plt.subplots(1, len(methods), figsize=(1.2 + 1.1 * len(shifts) * len(methods), 3.2),
                             squeeze=False, sharey=True)
    hatches = ["", "//", ".."]
    width = 0.8 / len(regimes)
    for ax, method in zip(axes.flat, methods):
        sub = data[data["method"] == method]
        for ri, regime in enumerate(regimes):
            y = sub[sub["regime"] == regime].groupby("shift")[metric].mean().reindex(shifts)
            ax.bar(np.arange(len(shifts)) + (ri - (len(regimes) - 1) / 2) * width, y.to_numpy(), width,
                   label=regime.replace("_", " "), hatch=hatches[ri % 3], color=f"C{ri}", edgecolor="black")
        clean = sub[sub["regime"] == "clean"].groupby("shift")[metric].mean().reindex(shifts)
        if clean.notna().any():
            ax.hlines(clean.to_numpy(), np.arange(len(shifts)) - 0.45, np.arange(len(shifts)) + 0.45,
                      colors="black", linewidth=2, label="clean")
        ax.set_xticks(range(len(shifts)), shifts, rotation=30, fontsize=8)
        ax.set_title(method)
    axes.flat[0].set_ylabel(f"image {metric}")
    axes.flat[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def baseline_bars(clean: pd.DataFrame, metrics: Sequence[str]) -> plt.Figure:
    """Grouped bars per category and method for each metric, error bars = sd over seeds; hatched per method."""
    present = [m for m in metrics if m in clean and clean[m].notna().any()]
    fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present), 3.0), squeeze=False, sharey=True)
    methods = sorted(clean["method"].unique())
    cats = sorted(clean["category"].unique())
    width = 0.8 / len(methods)
    for ax, metric in zip(axes.flat, present):
        for mi, method in enumerate(methods):
            g = clean[clean["method"] == method].groupby("category")[metric]
            ax.bar(np.arange(len(cats)) + (mi - (len(methods) - 1) / 2) * width, g.mean().reindex(cats).to_numpy(),
                   width, yerr=g.std(ddof=1).reindex(cats).fillna(0).to_numpy(), capsize=3, label=method,
                   color=f"C{mi}", hatch=["", "//", ".."][mi % 3], edgecolor="black")
        ax.set_xticks(range(len(cats)), cats)
        ax.set_title(metric.replace("_", " "))
        ax.set_ylim(0.4, 1.02)
    axes.flat[0].set_ylabel("score")
    axes.flat[-1].legend(loc="lower right")
    fig.tight_layout()
    return fig


def score_distributions(dists: pd.DataFrame) -> plt.Figure:
    """Overlaid image-score densities: rows = method, columns = per-category vs unified model."""
    methods = sorted(dists["method"].unique())
    settings = ["per_category", "unified"]
    fig, axes = plt.subplots(len(methods), 2, figsize=(8, 2.6 * len(methods)), squeeze=False)
    cats = sorted(dists["category"].unique())
    for i, method in enumerate(methods):
        for j, setting in enumerate(settings):
            ax = axes[i, j]
            sub = dists[(dists["method"] == method) & (dists["setting"] == setting)]
            for ci, category in enumerate(cats):
                for label, dash in ((0, "-"), (1, "--")):
                    scores = sub[(sub["category"] == category) & (sub["label"] == label)]["score"]
                    if len(scores) > 1 and scores.std() > 0:
                        sns.kdeplot(scores, ax=ax, color=f"C{ci}", linestyle=dash,
                                    label=f"{category} {'anomalous' if label else 'normal'}")
            ax.set_title(f"{method}, {setting.replace('_', ' ')} model")
            ax.set_xlabel("image score")
    axes[0, -1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.tight_layout()
    return fig


# --- threshold regimes (notebook 04) ---------------------------------------------------------------------

# Regimes that use the N target normals: colour, marker and dash each tell them apart (greyscale-safe).
REGIME_STYLES = {
    "threshold_only": dict(color="C0", marker="o", linestyle="-", label="threshold only"),
    "normalised": dict(color="C1", marker="s", linestyle="--", label="normalised scores"),
    "adapted": dict(color="C2", marker="^", linestyle="-.", label="adapted model"),
    "refit": dict(color="C3", marker="D", linestyle=":", label="refit on the N images"),
}
# Levels that do not depend on N, drawn as horizontal lines.
LEVEL_STYLES = {
    "clean": dict(color="black", linestyle="-", linewidth=1.2, label="clean (source threshold, clean test)"),
    "none": dict(color="0.45", linestyle=":", linewidth=1.5, label="none (source threshold)"),
    "oracle": dict(color="black", linestyle="--", linewidth=1.0, label="oracle (F1-optimal on labelled val)"),
    "flag_all": dict(color="0.6", linestyle="-.", linewidth=1.0, label="flag everything (F1 = 2p/(1+p))"),
}


def _budget_axis(ax: plt.Axes, budgets: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(budgets), [str(b) for b in budgets])
    ax.minorticks_off()


def _errorbar(ax: plt.Axes, x, y, lo, hi, **style) -> None:
    y, lo, hi = (np.asarray(v, float) for v in (y, lo, hi))
    err = np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
    ax.errorbar(x, y, yerr=np.nan_to_num(err), capsize=2, markersize=4, **style)


def _panel_grid(methods: Sequence[str], columns: Sequence[str], height: float = 2.6, width: float = 2.9):
    fig, axes = plt.subplots(len(methods), len(columns), figsize=(width * len(columns) + 2.2, height * len(methods)),
                             squeeze=False, sharex=True, sharey=True)
    return fig, axes


def threshold_budget_curves(summary: pd.DataFrame, metric: str, ylabel: str, title: str | None = None) -> plt.Figure:
    """A metric on the shifted test split against the budget N of target-domain normals: one panel per method
    (rows) and estimator (columns), one line per regime with its interval over draws; the clean, none and oracle
    levels as horizontal lines, and on an F1 axis the F1 of flagging every test image."""
    estimators = [e for e in dict.fromkeys(summary.loc[summary["regime"] == "none", "estimator"])]
    methods = list(dict.fromkeys(summary["method"]))
    budgets = sorted(summary.loc[summary["regime"].isin(list(REGIME_STYLES)), "budget"].unique())
    fig, axes = _panel_grid(methods, estimators)
    for i, method in enumerate(methods):
        own = summary[summary["method"] == method]
        for j, estimator in enumerate(estimators):
            ax = axes[i, j]
            for regime, style in REGIME_STYLES.items():
                part = own[(own["regime"] == regime) & (own["estimator"] == estimator)].sort_values("budget")
                if len(part):
                    _errorbar(ax, part["budget"], part[metric], part[f"{metric}_lo"], part[f"{metric}_hi"], **style)
            for level in ("clean", "none", "oracle"):
                part = own[(own["regime"] == level) & (own["estimator"].isin([estimator, "f1_optimal"]))]
                if len(part) and part[metric].notna().any():
                    ax.axhline(float(part[metric].mean()), **LEVEL_STYLES[level])
            if metric == "f1":
                ax.axhline(float(own.loc[own["regime"] == "none", "f1_flag_all"].mean()), **LEVEL_STYLES["flag_all"])
            _budget_axis(ax, budgets)
            ax.set_title(f"{method_style(method)['label']}, {estimator.replace('_', ' ')}", fontsize=9)
            if i == len(methods) - 1:
                ax.set_xlabel("target-domain normals N")
            if j == 0:
                ax.set_ylabel(ylabel)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    for ax in axes.flat[1:]:  # a level missing from the first panel still gets its legend entry
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def recovery_curves(recovery: pd.DataFrame, title: str | None = None) -> plt.Figure:
    """Share of the clean-to-shifted loss each regime recovers against the budget N, one panel per method (rows)
    and estimator (columns), with intervals over draws; the oracle as a dashed line; 0 (no better than not
    adapting) and 1 (back to clean) as reference lines."""
    estimators = list(dict.fromkeys(recovery.loc[~recovery["oracle"], "estimator"]))
    methods = list(dict.fromkeys(recovery["method"]))
    budgets = sorted(recovery.loc[~recovery["oracle"], "budget"].unique())
    fig, axes = _panel_grid(methods, estimators)
    for i, method in enumerate(methods):
        for j, estimator in enumerate(estimators):
            ax = axes[i, j]
            own = recovery[(recovery["method"] == method) & (recovery["estimator"] == estimator)]
            ax.axhline(0.0, color="0.45", linestyle=":", linewidth=1.0, label="0: no better than the source threshold")
            ax.axhline(1.0, color="black", linestyle="-", linewidth=0.8, label="1: back to the clean level")
            for regime, style in REGIME_STYLES.items():
                part = own[own["regime"] == regime].sort_values("budget")
                if len(part) and part["share"].notna().any():
                    _errorbar(ax, part["budget"], part["share"], part["share_lo"], part["share_hi"], **style)
            oracle = own[own["oracle"]]
            if len(oracle) and oracle["share"].notna().any():
                ax.axhline(float(oracle["share"].mean()), **LEVEL_STYLES["oracle"])
            _budget_axis(ax, budgets)
            ax.set_title(f"{method_style(method)['label']}, {estimator.replace('_', ' ')}", fontsize=9)
            if i == len(methods) - 1:
                ax.set_xlabel("target-domain normals N")
            if j == 0:
                ax.set_ylabel("share of the loss recovered")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def label_budget_curves(summary: pd.DataFrame, metric: str, ylabel: str, title: str | None = None) -> plt.Figure:
    """The label-budget curve: a metric against the number of labelled shifted anomalies A, one line per budget N
    of target normals (intervals over draws), one panel per method; the oracle dashed; on an F1 axis the F1 of
    flagging every image."""
    methods = list(dict.fromkeys(summary["method"]))
    labelled = summary[summary["regime"] == "labelled"]
    budgets = sorted(labelled["budget"].unique())
    fig, axes = plt.subplots(1, len(methods), figsize=(3.4 * len(methods) + 1.8, 3.0), squeeze=False, sharey=True)
    for ax, method in zip(axes.flat, methods):
        own = labelled[labelled["method"] == method]
        for k, budget in enumerate(budgets):
            part = own[own["budget"] == budget].sort_values("anomalies")
            _errorbar(ax, part["anomalies"], part[metric], part[f"{metric}_lo"], part[f"{metric}_hi"],
                      color=f"C{k}", marker=MARKERS[k % len(MARKERS)], linestyle="-", label=f"N = {budget} normals")
        oracle = summary[(summary["method"] == method) & (summary["regime"] == "oracle")]
        if len(oracle):
            ax.axhline(float(oracle[metric].mean()), **LEVEL_STYLES["oracle"])
        if metric == "f1":
            flag_all = summary.loc[summary["method"] == method, "f1_flag_all"].mean()
            ax.axhline(float(flag_all), **LEVEL_STYLES["flag_all"])
        anomalies = sorted(own["anomalies"].unique())
        ax.set_xticks(anomalies, [str(a) for a in anomalies])
        ax.set_xlabel("labelled shifted anomalies A")
        ax.set_title(method_style(method)["label"])
    axes.flat[0].set_ylabel(ylabel)
    axes.flat[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


CALIBRATION_STYLES = {
    "clean": dict(color="black", marker="o", label="clean threshold, clean test normals"),
    "none": dict(color="C3", marker="x", label="clean threshold, shifted test normals"),
    "threshold_only": dict(color="C0", marker="s", label="threshold from all target normals, shifted"),
}


def calibration_plot(calibration: pd.DataFrame, title: str | None = None) -> plt.Figure:
    """Achieved false-positive rate on the test normals against the conformal estimator's alpha, with
    Clopper-Pearson intervals, one panel per method; each alpha's target as a short line, the rule's expected
    FPR for the calibration size as a grey tick (0 where the threshold is infinite, marked 'inf')."""
    methods = list(dict.fromkeys(calibration["method"]))
    alphas = sorted(calibration["alpha"].unique())
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods) + 2.4, 3.2), squeeze=False, sharey=True)
    offsets = dict(zip(CALIBRATION_STYLES, (-0.22, 0.0, 0.22)))
    for ax, method in zip(axes.flat, methods):
        own = calibration[calibration["method"] == method]
        for a, alpha in enumerate(alphas):
            ax.hlines(alpha, a - 0.4, a + 0.4, colors="black", linestyles="--", linewidth=1.0,
                      label="target alpha" if a == 0 else None)
            expected = own.loc[own["alpha"] == alpha, "expected_fpr"]
            if len(expected):
                ax.hlines(float(expected.mean()), a - 0.4, a + 0.4, colors="0.6", linewidth=3, alpha=0.6,
                          label="expected FPR of the rule" if a == 0 else None)
            for regime, style in CALIBRATION_STYLES.items():
                part = own[(own["alpha"] == alpha) & (own["regime"] == regime)]
                if part.empty:
                    continue
                x = a + offsets[regime] + np.linspace(-0.06, 0.06, len(part))
                _errorbar(ax, x, part["fpr"], part["fpr_lo"], part["fpr_hi"], linestyle="none",
                          label=style["label"] if a == 0 else None, color=style["color"], marker=style["marker"])
                if part["infinite"].all():
                    ax.annotate("inf", (a + offsets[regime], 0), textcoords="offset points", xytext=(0, 6),
                                ha="center", fontsize=7)
        ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_xlabel("conformal alpha (target FPR)")
        ax.set_title(method_style(method)["label"])
    axes.flat[0].set_ylabel("achieved FPR on test normals")
    axes.flat[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def interval_bars(table: pd.DataFrame, x: str, hue: str, estimate: str, lo: str, hi: str, ylabel: str,
                  title: str = "", ylim: tuple[float, float] | None = None, reference: float | None = None
                  ) -> plt.Figure:
    """Bars of an estimate per ``x`` and ``hue`` (e.g. category and method) with their interval as error bars;
    each hue keeps its hatch, so the figure reads in greyscale. ``reference`` draws a horizontal line."""
    xs, hues = list(dict.fromkeys(table[x])), list(dict.fromkeys(table[hue]))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(xs) * max(1, len(hues)) / 2, 3.0))
    width = 0.8 / len(hues)
    for i, h in enumerate(hues):
        sub = table[table[hue] == h].set_index(x).reindex(xs)
        pos = np.arange(len(xs)) + (i - (len(hues) - 1) / 2) * width
        err = np.vstack([sub[estimate] - sub[lo], sub[hi] - sub[estimate]]).clip(min=0)
        ax.bar(pos, sub[estimate], width, yerr=err, capsize=3, label=str(h), color=f"C{i}",
               hatch=["", "//", "..", "xx"][i % 4], edgecolor="black")
    if reference is not None:
        ax.axhline(reference, color="black", linewidth=0.8)
    ax.set_xticks(range(len(xs)), [str(v) for v in xs], rotation=20 if len(xs) > 4 else 0)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def marked_heatmap(table: pd.DataFrame, marks: pd.DataFrame | None, title: str, xlabel: str, ylabel: str,
                   fmt: str = ".2f", cmap: str = "rocket_r", center: float | None = None) -> plt.Figure:
    """A heat map whose cells where ``marks`` is True carry a dagger (e.g. a shift inside the variation the
    training images already have)."""
    fig, ax = plt.subplots(figsize=(1.4 + 0.9 * table.shape[1], 0.9 + 0.45 * table.shape[0]))
    labels = table.map(lambda v: "" if pd.isna(v) else format(v, fmt))
    if marks is not None:
        marks = marks.reindex_like(table).fillna(False).astype(bool)
        labels = labels.where(~marks, labels + "†")
    sns.heatmap(table, annot=labels.to_numpy(), fmt="", cmap=cmap, center=center, ax=ax, cbar_kws={"shrink": 0.8})
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    return fig


def forest(table: pd.DataFrame, label: str, estimate: str, lo: str, hi: str, xlabel: str, title: str = "",
           group: str | None = None) -> plt.Figure:
    """Estimates with horizontal interval lines, one row per ``label`` (a forest plot); a vertical line at 0.
    Rows of the same ``group`` share a marker."""
    rows = table.reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(6.0, 0.6 + 0.28 * len(rows)))
    groups = list(dict.fromkeys(rows[group])) if group else [None]
    for i, r in rows.iterrows():
        gi = groups.index(r[group]) if group else 0
        ax.errorbar(r[estimate], i, xerr=[[max(r[estimate] - r[lo], 0)], [max(r[hi] - r[estimate], 0)]],
                    fmt=MARKERS[gi % len(MARKERS)], color=f"C{gi}", capsize=2,
                    label=str(r[group]) if group and i == rows.index[rows[group] == r[group]][0] else None)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), rows[label])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    if group:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.tight_layout()
    return fig


# --- the unified study ----------------------------------------------------------------------------------------

def fpr_matrix_grid(fpr: pd.DataFrame, title: str = "") -> plt.Figure:
    """One method's cross-class FPR matrices (mean over seeds): rows = set and model (per-category control,
    pooled), columns = raw and per-category standardised scores; cell = FPR of the row category's normal test
    images at the column category's normal-only threshold."""
    sets = list(dict.fromkeys(fpr["set"]))
    models = [m for m in ("per_category", "pooled") if m in set(fpr["model"])]
    scales = [s for s in ("raw", "normalised") if s in set(fpr["scores"])]
    n = fpr["normal_of"].nunique()
    rows = [(s, m) for s in sets for m in models]
    fig, axes = plt.subplots(len(rows), len(scales), figsize=(1.4 + 0.85 * n * len(scales), 0.8 + 0.6 * n * len(rows)),
                             squeeze=False)
    for i, (set_name, model) in enumerate(rows):
        for j, scale in enumerate(scales):
            sub = fpr[(fpr["set"] == set_name) & (fpr["model"] == model) & (fpr["scores"] == scale)]
            order = list(dict.fromkeys(sub["normal_of"]))
            table = sub.pivot_table(index="normal_of", columns="threshold_of", values="fpr").reindex(index=order,
                                                                                                  columns=order)
            sns.heatmap(table, annot=True, fmt=".2f", cmap="rocket_r", vmin=0, vmax=1, cbar=False, ax=axes[i, j])
            axes[i, j].set_title(f"{set_name}, {model.replace('_', '-')} model, {scale} scores", fontsize=8)
            axes[i, j].set_xlabel("threshold of category")
            axes[i, j].set_ylabel("normal images of")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def control_panels(metrics: pd.DataFrame) -> plt.Figure:
    """Per method (columns): image AUROC of the per-category (hatched) and pooled (plain) model on the test split
    and every control (top), and the share of anomalous patches the pooled model explains away (bottom); bars
    per set, means over categories and seeds, error bars one standard deviation over seeds."""
    methods = list(dict.fromkeys(metrics["method"]))
    data = list(dict.fromkeys(metrics["data"]))
    sets = list(dict.fromkeys(metrics["set"]))
    sub = metrics[metrics["category"] != "all"]
    fig, axes = plt.subplots(2, len(methods), figsize=(1.5 + 1.2 * len(data) * len(methods), 5.6), squeeze=False,
                             sharey="row")
    bars = [(s, setting) for s in sets for setting in ("per_category", "model_unified")]
    width = 0.8 / len(bars)
    for j, method in enumerate(methods):
        for k, (set_name, setting) in enumerate(bars):
            part = sub[(sub["method"] == method) & (sub["set"] == set_name) & (sub["setting"] == setting)]
            by_seed = part.groupby(["data", "seed"])
            for i, metric in enumerate(("image_auroc", "explained_away")):
                if metric == "explained_away" and setting == "per_category":
                    continue
                values = by_seed[metric].mean().groupby("data")
                x = np.arange(len(data)) + (k - (len(bars) - 1) / 2) * width
                axes[i, j].bar(x, values.mean().reindex(data).to_numpy(), width,
                               yerr=values.std(ddof=1).reindex(data).fillna(0).to_numpy(), capsize=2,
                               color=f"C{sets.index(set_name)}", hatch="//" if setting == "per_category" else "",
                               edgecolor="black", label=f"{set_name}, {setting.replace('_', '-')}")
        axes[0, j].set_title(method)
        for i in range(2):
            axes[i, j].set_xticks(range(len(data)), [d.replace("_", " ") for d in data], rotation=20, fontsize=8)
    axes[0, 0].set_ylabel("image AUROC")
    axes[1, 0].set_ylabel("anomalous patches explained away")
    axes[0, -1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.tight_layout()
    return fig


def bank_shares(bank: pd.DataFrame) -> plt.Figure:
    """Each category's share of a pooled memory bank (bars, mean over seeds) against its share of the training
    patches (black ticks), one panel per set."""
    sets = list(dict.fromkeys(bank["set"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(1.5 + 2.2 * len(sets), 3.0), squeeze=False, sharey=True)
    for ax, set_name in zip(axes.flat, sets):
        sub = bank[bank["set"] == set_name]
        cats = list(dict.fromkeys(sub["category"]))
        grouped = sub.groupby("category")
        ax.bar(range(len(cats)), grouped["bank_share"].mean().reindex(cats).to_numpy(), 0.6,
               yerr=grouped["bank_share"].std(ddof=1).reindex(cats).fillna(0).to_numpy(), capsize=3,
               color="C0", edgecolor="black", label="share of the bank")
        ax.hlines(grouped["train_share"].mean().reindex(cats).to_numpy(), np.arange(len(cats)) - 0.35,
                  np.arange(len(cats)) + 0.35, colors="black", linewidth=2, label="share of training patches")
        ax.set_xticks(range(len(cats)), cats, rotation=20)
        ax.set_title(set_name)
    axes.flat[0].set_ylabel("share")
    axes.flat[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.tight_layout()
    return fig


def pooled_count_curve(curve: pd.DataFrame) -> plt.Figure:
    """Change of image AUROC from the per-category to the pooled model (top) and the share of anomalous patches
    the pooled model explains away (bottom) against the number of pooled categories, one line per method,
    one panel per data; means over the pooled categories, error bars one standard deviation over them."""
    data = list(dict.fromkeys(curve["data"]))
    fig, axes = plt.subplots(2, len(data), figsize=(1.5 + 2.6 * len(data), 5.6), squeeze=False, sharex=True,
                             sharey="row")
    for j, name in enumerate(data):
        for method, sub in curve[curve["data"] == name].groupby("method", sort=False):
            style = method_style(method)
            for i, metric in enumerate(("auroc_change", "explained_away")):
                grouped = sub.groupby("n_categories")[metric]
                axes[i, j].errorbar(grouped.mean().index, grouped.mean().to_numpy(),
                                    yerr=grouped.std(ddof=1).fillna(0).to_numpy(), capsize=3, **style)
        axes[0, j].set_title(name.replace("_", " "))
        axes[0, j].axhline(0, color="grey", linewidth=0.8)
        axes[1, j].set_xlabel("pooled categories")
    axes[0, 0].set_ylabel("AUROC, pooled - per-category")
    axes[1, 0].set_ylabel("patches explained away")
    axes[0, -1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.tight_layout()
    fig.align_ylabels(axes[:, 0])
    return fig
