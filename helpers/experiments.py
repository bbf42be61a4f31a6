"""Experiment building blocks shared by the notebooks: the run context from the parameters cell, dataset
preparation, fitted-model caching, and scoring a detector on clean or shifted splits into tidy rows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from helpers import splits
from helpers.data import load_mask
from helpers.detector import Detector, Prediction, detector_class, load_detector, make_detector
from helpers.features import file_digest
from helpers.paths import CACHE, cache_key, resolve, result_path

CLEAN = ("none", 0)  # (transform, severity) of the unshifted data


@dataclass
class Context:
    """What every notebook needs from its parameters cell, with paths resolved."""

    dataset: str
    data_root: Path
    categories: list[str]
    backbone: str
    image_size: int
    out_dir: Path
    figures_dir: Path
    split_seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0])
    shift_root: Path | None = None
    shift_seed: int = 0
    device: str = "auto"
    n_train: int | None = None

    @classmethod
    def from_params(cls, **p) -> "Context":
        return cls(dataset=p["dataset"], data_root=resolve(p["data_root"]), categories=list(p["categories"]),
                   backbone=p["backbone"], image_size=int(p["image_size"]), out_dir=resolve(p["out_dir"]),
                   figures_dir=resolve(p["figures_dir"]), split_seed=int(p.get("split_seed", 0)),
                   seeds=list(p.get("seeds", [0])),
                   shift_root=resolve(p["shift_root"]) if p.get("shift_root") else None,
                   shift_seed=int(p.get("shift_seed", 0)), device=p.get("device", "auto"),
                   n_train=p.get("n_train"))

    def table(self, name: str, filename: str = "results.csv", **params) -> Path:
        return result_path(self.out_dir, name, filename, **params)

    @property
    def manifest_path(self) -> Path:
        return self.table("splits", "manifest.csv", dataset=self.dataset, seed=self.split_seed)

    def manifest(self) -> pd.DataFrame:
        return splits.load(self.manifest_path)

    def root_for(self, transform: str = "none", severity: int = 0) -> Path:
        """The dataset folder of a condition: the clean data, or one MVTec-Shift copy."""
        if (transform, severity) == CLEAN or severity == 0:
            return self.data_root
        if self.shift_root is None:
            raise ValueError("shift_root is not set in the parameters")
        from data_prep.shift import family_path

        return family_path(self.shift_root, transform, severity, self.shift_seed)


def prepare_dataset(ctx: Context, synthetic_seed: int = 0, **synthetic_kw) -> Path:
    """Make sure the profile's dataset exists: generate the synthetic one, or fetch MVTec AD."""
    if ctx.dataset == "synthetic":
        from data_prep import synthetic

        missing = [c for c in ctx.categories if not (ctx.data_root / c / "train" / "good").is_dir()]
        if missing:
            synthetic.generate(ctx.data_root, seed=synthetic_seed, categories=tuple(missing), **synthetic_kw)
    elif ctx.dataset == "mvtec":
        from data_prep import mvtec

        mvtec.prepare(ctx.data_root, categories=tuple(ctx.categories))
    else:
        raise ValueError(f"dataset must be 'synthetic' or 'mvtec', got {ctx.dataset!r}")
    return ctx.data_root


def rows_of(manifest: pd.DataFrame, ctx: Context, category: str | Sequence[str], split: str,
            transform: str = "none", severity: int = 0) -> pd.DataFrame:
    """Manifest rows of a split, pointing into the condition's folder, with label overrides of the shift."""
    root = ctx.root_for(transform, severity)
    overrides = None
    if root != ctx.data_root:
        from data_prep.shift import label_overrides

        overrides = label_overrides(root)
    rows = splits.select(manifest, root, category, split, label_overrides=overrides)
    if split == "train" and ctx.n_train:
        rows = rows.iloc[: int(ctx.n_train)]
    return rows


def fit_cached(method: str, settings: dict, train_paths: Sequence[Path], cache_dir: Path | None = None) -> Detector:
    """Fit a detector, or load it when the same method, fit settings and training images were fitted before.

    Settings the detector marks as inference-only (PatchCore's k) are left out of the key and applied after
    loading, so sweeping them never re-fits.
    """
    inference_only = detector_class(method).INFERENCE_SETTINGS
    fit_settings = {k: v for k, v in settings.items() if k not in inference_only}
    key = cache_key(kind="model", method=method, settings=fit_settings, files=[file_digest(p) for p in train_paths])
    path = Path(cache_dir or CACHE / "models") / f"{method}-{key}.safetensors"
    if path.is_file():
        detector = load_detector(path)
    else:
        detector = make_detector(method, **settings)
        detector.fit(list(train_paths))
        detector.save(path)  # atomic (detector.write_model): parallel jobs and killed runs leave whole files
    for name in inference_only:
        if name in settings:
            setattr(detector, name, settings[name])
    return detector


def masks_for(rows: pd.DataFrame, image_size: int) -> np.ndarray | None:
    """Binary masks at the model resolution; None when the category has no ground truth at all."""
    if rows["mask"].eq("").all() and (rows["label"] == 1).any():
        return None
    return np.stack([load_mask(p, size=image_size) for p in rows["mask_path"]])


def score(detector: Detector, rows: pd.DataFrame) -> Prediction:
    return detector.predict(list(rows["image_path"]))


def metric_row(rows: pd.DataFrame, prediction: Prediction, image_size: int) -> dict:
    from helpers import metrics

    labels = rows["label"].to_numpy()
    masks = masks_for(rows, image_size)
    row = metrics.evaluate(labels, prediction.image_scores, masks,
                           prediction.anomaly_maps if masks is not None else None)
    # Interval over the test sample itself: the part of the spread that seeds cannot show.
    row["image_auroc_lo"], row["image_auroc_hi"] = metrics.bootstrap_auroc(labels, prediction.image_scores)
    return row


def evaluate_conditions(detector: Detector, manifest: pd.DataFrame, ctx: Context, category: str,
                        conditions: Iterable[tuple[str, int]], split: str = "test", **labels) -> pd.DataFrame:
    """One tidy row per condition: the given labels (method, seed, ...), the condition and every metric."""
    out = []
    for transform, severity in conditions:
        rows = rows_of(manifest, ctx, category, split, transform, severity)
        start = time.perf_counter()
        prediction = score(detector, rows)
        row = {**labels, "category": category, "transform": transform, "severity": severity, "split": split,
               "n_images": len(rows), "n_anomalous": int(rows["label"].sum())}
        row.update(metric_row(rows, prediction, prediction.anomaly_maps.shape[-1]))
        row["predict_s"] = time.perf_counter() - start
        out.append(row)
    return pd.DataFrame(out)


def shift_conditions(transforms: Sequence[str], severities: Sequence[int], include_clean: bool = True):
    conds = [CLEAN] if include_clean else []
    return conds + [(t, int(s)) for t in transforms for s in severities]


METRICS = ["image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_aupro"]


def train_paths(manifest: pd.DataFrame, ctx: Context, category: str | Sequence[str],
                transform: str = "none", severity: int = 0) -> list[Path]:
    return list(rows_of(manifest, ctx, category, "train", transform, severity)["image_path"])


def _fit_job(method: str, settings: dict, paths: Sequence[Path]) -> None:
    fit_cached(method, settings, paths)


def _evaluate_job(method: str, settings: dict, ctx: Context, manifest: pd.DataFrame, category: str,
                  conditions: Sequence[tuple[str, int]], split: str, labels: dict) -> pd.DataFrame:
    detector = fit_cached(method, settings, train_paths(manifest, ctx, category))
    return evaluate_conditions(detector, manifest, ctx, category, conditions, split, **labels)


def run_method(method: str, settings: dict, ctx: Context, manifest: pd.DataFrame,
               conditions: Sequence[tuple[str, int]], seeds: Sequence[int] | None = None,
               split: str = "test", shift_all_seeds: bool = True, progress: bool = True,
               workers: int | None = 1) -> pd.DataFrame:
    """Fit on clean train normals per (seed, category), evaluate every condition: the tidy shift-drop table.

    With ``shift_all_seeds=False`` only the first seed is scored on the shifted conditions and the others on
    clean data alone (the spread over seeds is reported for the clean baseline), which keeps CPU runs short.
    Fits, then (seed, category, condition) evaluations, run as ``workers`` parallel jobs; the table is the
    same for any number of workers.
    """
    from helpers.parallel import run_jobs

    seeds = list(seeds or ctx.seeds)
    pairs = [(seed, cat) for seed in seeds for cat in ctx.categories]
    run_jobs(_fit_job, [(method, {**settings, "seed": int(seed)}, train_paths(manifest, ctx, cat)) for seed, cat in pairs],
             workers, desc=f"{method} fit", progress=progress)
    jobs = []
    for seed, category in pairs:
        full = {**settings, "seed": int(seed)}
        labels = dict(method=method, seed=int(seed), backbone=full.get("backbone"), image_size=full.get("image_size"))
        wanted = conditions if shift_all_seeds or seed == seeds[0] else [c for c in conditions if c == CLEAN]
        jobs += [(method, full, ctx, manifest, category, [condition], split, labels) for condition in wanted]
    tables = run_jobs(_evaluate_job, jobs, workers, desc=f"{method} evaluate", progress=progress)
    return pd.concat(tables, ignore_index=True)


def sweep(method: str, base: dict, grid: Sequence[dict], ctx: Context, manifest: pd.DataFrame,
          conditions: Sequence[tuple[str, int]], seed: int = 0, progress: bool = True,
          workers: int | None = 1) -> pd.DataFrame:
    """Evaluate each override of ``base`` (e.g. ``{"k": 3}``) on each category and condition.

    Rows carry ``param`` and ``value`` so one table holds every swept hyperparameter.
    """
    from helpers.parallel import run_jobs

    jobs = []
    for override in grid:
        labels = dict(method=method, seed=int(seed), param="+".join(override),
                      value="/".join(_label(v) for v in override.values()))
        jobs += [(method, {**base, **override, "seed": int(seed)}, ctx, manifest, category, list(conditions), "test",
                  labels) for category in ctx.categories]
    tables = run_jobs(_evaluate_job, jobs, workers, desc=f"{method} sweep", progress=progress)
    return pd.concat(tables, ignore_index=True)


def _label(value) -> str:
    return "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def clean_per_transform(df: pd.DataFrame) -> pd.DataFrame:
    """Repeat the clean rows as severity 0 of every transform, so each curve starts at the clean value."""
    clean = df[df["transform"] == "none"]
    shifted = df[df["transform"] != "none"]
    copies = [clean.assign(transform=t) for t in sorted(shifted["transform"].unique())]
    return pd.concat([shifted, *copies], ignore_index=True)


def summarise(df: pd.DataFrame, by: Sequence[str], metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Mean and standard deviation over seeds, as ``metric`` and ``metric_sd`` columns."""
    present = [m for m in metrics if m in df.columns and df[m].notna().any()]
    grouped = df.groupby(list(by))[present]
    out = grouped.mean().join(grouped.std(ddof=1).add_suffix("_sd")).reset_index()
    out["n_seeds"] = df.groupby(list(by)).size().to_numpy()
    return out


def example_cases(rows: pd.DataFrame, prediction: Prediction, threshold: float, per_kind: int = 2) -> list[int]:
    """Indices of correctly passed normals, detected and missed anomalies (false alarms if nothing is missed)."""
    scores = prediction.image_scores
    flagged = scores >= threshold
    labels = rows["label"].to_numpy()
    kinds = [(labels == 0) & ~flagged, (labels == 1) & flagged, (labels == 1) & ~flagged]
    if not kinds[2].any():
        kinds[2] = (labels == 0) & flagged
    picked = []
    for kind in kinds:
        idx = np.flatnonzero(kind)
        # The most telling cases: highest-scoring detections, closest misses.
        order = idx[np.argsort(-scores[idx])]
        picked.extend(order[:per_kind].tolist())
    return picked


def stage_options(backbone: str, method: str) -> list[tuple[str, ...]]:
    """The method's default stages first, then alternatives drawn from the stages the feature cache holds."""
    from helpers.backbones import DEFAULT_STAGES

    default = DEFAULT_STAGES[backbone][method]
    cached = sorted({s for st in DEFAULT_STAGES[backbone].values() for s in st},
                    key=lambda s: list(DEFAULT_STAGES[backbone]["padim"]).index(s))
    if method == "patchcore":  # single stages and the shallower pair
        options = [(cached[1],), (cached[2],), (cached[0], cached[1])]
    else:  # without the shallowest stage (dropping the deepest leaves too few channels for n_features)
        options = [tuple(cached[1:])]
    return [default] + [o for o in options if o != default]
