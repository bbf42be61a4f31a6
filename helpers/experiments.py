"""Experiment building blocks shared by the notebooks: conditions, the rows of a split in a condition's
folder, fitted-model caching, and scoring a detector on clean or shifted splits into tidy rows (metrics per
condition, and the score of every image, which the paired statistics resample).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from helpers import registry, splits
from helpers.data import load_mask, shift_labels
from helpers.detector import Detector, Prediction, load_detector
from helpers.features import file_digest
from helpers.paths import CACHE, Run, cache_key
from helpers.registry import DetectorConfig

METRICS = ["image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_aupro"]
CONDITION_COLUMNS = ["mode", "transform", "severity"]


@dataclass(frozen=True, order=True)
class Condition:
    """A data condition: the clean data, or one MVTec-Shift copy (mode, transform, severity)."""

    mode: str = "none"
    transform: str = "none"
    severity: int = 0

    @property
    def is_clean(self) -> bool:
        return self.transform == "none"

    def labels(self) -> dict:
        return {"mode": self.mode, "transform": self.transform, "severity": int(self.severity)}

    def __str__(self) -> str:
        return "clean" if self.is_clean else f"{self.transform} {self.severity} ({self.mode})"


CLEAN = Condition()


def shift_conditions(modes: Sequence[str], transforms: Sequence[str], severities: Sequence[int],
                     include_clean: bool = True) -> list[Condition]:
    shifted = [Condition(m, t, int(s)) for m in modes for t in transforms for s in severities]
    return ([CLEAN] if include_clean else []) + shifted


def drop_conditions(run: Run, draw: int) -> list[Condition]:
    """The conditions the drop study scores on one data draw: clean, and every configured shift in every mode
    (modes listed in ``shift.first_draw_only`` on the first draw only; per-image mode for
    ``shift.per_image_transforms``)."""
    shift = run.config.shift
    modes = [m for m in shift.modes if draw == run.config.data.draws[0] or m not in shift.first_draw_only]
    conditions = [CLEAN]
    for mode in modes:
        per_image = mode == "per_image" and shift.per_image_transforms
        transforms = shift.per_image_transforms if per_image else shift.transforms
        conditions += shift_conditions([mode], transforms, shift.severities, include_clean=False)
    return conditions


def root_for(run: Run, draw: int, condition: Condition = CLEAN) -> Path:
    """The dataset folder of a condition: one draw's clean data, or one of its MVTec-Shift copies."""
    if condition.is_clean:
        return run.data_root(draw)
    return run.shift_copy(draw, condition.mode, condition.transform, condition.severity)


def rows_of(run: Run, draw: int, category: str | Sequence[str], split: str,
            condition: Condition = CLEAN, manifest: pd.DataFrame | None = None) -> pd.DataFrame:
    """Manifest rows of a split, pointing into the condition's folder, with the labels the shift left (a
    defect moved out of the frame leaves a normal image)."""
    manifest = run.manifest(draw) if manifest is None else manifest
    root = root_for(run, draw, condition)
    overrides = None if condition.is_clean else shift_labels(root)
    rows = splits.select(manifest, root, category, split, label_overrides=overrides)
    n_train = run.config.data.n_train
    if split == "train" and n_train:
        rows = rows.groupby("category", sort=False, group_keys=False).head(int(n_train)).reset_index(drop=True)
    return rows


def train_paths(run: Run, draw: int, category: str | Sequence[str], condition: Condition = CLEAN) -> list[Path]:
    return list(rows_of(run, draw, category, "train", condition)["image_path"])


@lru_cache(maxsize=256)
def _fit_settings(config: DetectorConfig) -> tuple[str, tuple[str, ...], dict]:
    """(JSON of the settings a fit depends on, the inference-only setting names, every setting) of a configured
    detector; built once per process, since building a detector can cost a second (PaDiM builds anomalib's
    model)."""
    import json

    detector = config.build()
    inference_only = type(detector).INFERENCE_SETTINGS
    settings = detector.settings()
    fit = {k: v for k, v in settings.items() if k not in inference_only}
    return json.dumps(fit, sort_keys=True), inference_only, settings


def model_path(config: DetectorConfig, train: Sequence[Path], cache_dir: Path | None = None) -> Path:
    """Where the model of these settings and training images is cached. Settings the detector marks as
    inference-only (PatchCore's k) are left out of the key, so sweeping them never re-fits."""
    fit, _, _ = _fit_settings(config)
    key = cache_key(kind="model", method=config.method, settings=fit, files=[file_digest(p) for p in train])
    return Path(cache_dir or CACHE / "models") / f"{config.method}-{key}.safetensors"


def fit_cached(config: DetectorConfig, train: Sequence[Path], cache_dir: Path | None = None) -> Detector:
    """Fit a detector, or load it when the same method, fit settings and training images were fitted before."""
    path = model_path(config, train, cache_dir)
    _, inference_only, settings = _fit_settings(config)
    if path.is_file():
        try:
            detector = load_detector(path, device=config.device)
        except Exception as exc:  # noqa: BLE001 - an unreadable entry is refitted, never trusted
            import logging

            logging.getLogger(__name__).warning("model cache entry %s cannot be read (%s): refitting", path, exc)
            path.unlink(missing_ok=True)
            return fit_cached(config, train, cache_dir)
    else:
        detector = config.build().fit(list(train))
        detector.save(path)  # atomic (detector.write_model): parallel jobs and killed runs leave whole files
    for name in inference_only:
        setattr(detector, name, settings[name])
    return detector


def masks_for(rows: pd.DataFrame, image_size: int) -> np.ndarray | None:
    """Binary masks at the model resolution; None when the category has no ground truth at all."""
    if rows["mask"].eq("").all() and (rows["label"] == 1).any():
        return None
    return np.stack([load_mask(p, size=image_size) for p in rows["mask_path"]])


def score(detector: Detector, rows: pd.DataFrame) -> Prediction:
    return detector.predict(list(rows["image_path"]))


def metric_row(rows: pd.DataFrame, prediction: Prediction, image_size: int, pixel: bool = True) -> dict:
    """Every metric of one scored split; pixel metrics only with ``pixel`` (None otherwise, never invented).
    Intervals are not per row: helpers.stats resamples the saved per-image scores, pooled over draws and seeds."""
    from helpers import metrics

    labels = rows["label"].to_numpy()
    masks = masks_for(rows, image_size) if pixel else None
    return metrics.evaluate(labels, prediction.image_scores, masks,
                            prediction.anomaly_maps if masks is not None else None)


def score_rows(rows: pd.DataFrame, prediction: Prediction, **labels) -> pd.DataFrame:
    """One row per image: its key, label and score, under the given labels (method, seed, condition...)."""
    return pd.DataFrame({**labels, "category": rows["category"].to_numpy(), "image": rows["image"].to_numpy(),
                         "defect_type": rows["defect_type"].to_numpy(), "label": rows["label"].to_numpy(),
                         "score": prediction.image_scores.astype(float)})


def evaluate_conditions(detector: Detector, run: Run, draw: int, category: str, conditions: Iterable[Condition],
                        split: str = "test", pixel: bool | Iterable[Condition] = True,
                        **labels) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per condition one tidy metrics row (the given labels, the condition, every metric), and the per-image
    scores of every condition. ``pixel`` says where pixel metrics are computed: everywhere (True), nowhere
    (False) or for the listed conditions."""
    manifest = run.manifest(draw)
    out, scores = [], []
    for condition in conditions:
        with_pixels = pixel if isinstance(pixel, bool) else condition in set(pixel)
        rows = rows_of(run, draw, category, split, condition, manifest)
        start = time.perf_counter()
        prediction = score(detector, rows)
        row = {**labels, "draw": int(draw), "category": category, **condition.labels(), "split": split,
               "n_images": len(rows), "n_anomalous": int(rows["label"].sum())}
        row.update(metric_row(rows, prediction, prediction.anomaly_maps.shape[-1], with_pixels))
        row["predict_s"] = time.perf_counter() - start
        out.append(row)
        scores.append(score_rows(rows, prediction, **labels, draw=int(draw), **condition.labels(), split=split))
    return pd.DataFrame(out), pd.concat(scores, ignore_index=True)


def _features_job(paths: Sequence[Path], backbone: str, image_size: int, device: str) -> int:
    from helpers import backbones, features

    features.extract(list(paths), backbone, image_size, backbones.spec(backbone).patch_stages, device=device)
    return len(paths)


def prefetch_features(run: Run, image_sets: Iterable[Sequence[Path]], backbone: str | None = None,
                      image_size: int | None = None, progress: bool = True) -> None:
    """Fill the feature cache for every image of ``image_sets`` as parallel jobs, one per set, before the fits
    and evaluations that read them: no two jobs then compute the same image, and images whose cached file holds
    every patch stage get none (hashing each image here, in this process, to find its file)."""
    from helpers import backbones, features
    from helpers.parallel import run_jobs

    cfg = run.config
    backbone, image_size = backbone or cfg.model.backbone, image_size or cfg.model.image_size
    stages = backbones.spec(backbone).patch_stages
    seen: set[Path] = set()
    jobs = []
    for paths in image_sets:
        fresh = [p for p in dict.fromkeys(paths) if p not in seen]
        seen.update(fresh)
        fresh = [p for p in fresh if not features.cached(p, backbone, image_size, stages)]
        if fresh:
            jobs.append((fresh, backbone, image_size, cfg.model.device))
    run_jobs(_features_job, jobs, cfg.execution, desc="features", progress=progress)


def _fit_job(config: DetectorConfig, paths: Sequence[Path]) -> None:
    fit_cached(config, paths)


def _evaluate_job(config: DetectorConfig, run: Run, draw: int, category: str, conditions: Sequence[Condition],
                  split: str, labels: dict, pixel: bool | Sequence[Condition] = True
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    detector = fit_cached(config, train_paths(run, draw, category))
    return evaluate_conditions(detector, run, draw, category, conditions, split, pixel, **labels)


def run_method(run: Run, method: str, conditions: Sequence[Condition] | None = None,
               draws: Sequence[int] | None = None, seeds: Sequence[int] | None = None, split: str = "test",
               progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fit on clean train normals per (draw, seed, category) and evaluate every condition: the tidy shift-drop
    table and the per-image scores behind it.

    Features of every image set are computed first (parallel jobs), then the fits, then one evaluation job per
    (draw, seed, category) over all conditions. Image metrics come from every draw and model seed; pixel metrics
    from every run on clean data and from the first draw and seed under shift (they need the full anomaly maps).
    The tables are the same for any number of workers.
    """
    from helpers.parallel import run_jobs

    cfg = run.config
    draws = list(cfg.data.draws if draws is None else draws)
    seeds = list(cfg.model.seeds if seeds is None else seeds)
    triples = [(d, s, c) for d in draws for s in seeds for c in cfg.data.categories]
    pairs = [(d, c) for d in draws for c in cfg.data.categories]
    per_draw = {d: list(conditions) if conditions is not None else drop_conditions(run, d) for d in draws}
    prefetch_features(run, [train_paths(run, d, c) for d, c in pairs]
                      + [list(rows_of(run, d, c, split, cond)["image_path"]) for d, c in pairs for cond in per_draw[d]],
                      progress=progress)
    run_jobs(_fit_job, [(registry.configured(cfg, method, s), train_paths(run, d, c)) for d, s, c in triples],
             cfg.execution, desc=f"{method} fit", progress=progress)
    jobs = []
    for draw, seed, category in triples:
        config = registry.configured(cfg, method, seed)
        labels = dict(method=method, seed=int(seed), backbone=config.backbone, image_size=config.image_size)
        # pixel metrics need every map: on clean data for every run, under shift for the first draw and seed
        pixel = True if (seed, draw) == (seeds[0], draws[0]) else [c for c in per_draw[draw] if c.is_clean]
        jobs.append((config, run, draw, category, per_draw[draw], split, labels, pixel))
    results = run_jobs(_evaluate_job, jobs, cfg.execution, desc=f"{method} evaluate", progress=progress, memo=True)
    return (pd.concat([m for m, _ in results], ignore_index=True),
            pd.concat([s for _, s in results], ignore_index=True))


def sweep_grid(run: Run, method: str) -> list[dict]:
    """One override per swept value, the method's registered grid with the profile's ``sweep.grids`` on top;
    values equal to the configured setting are left out (the default row stands for them)."""
    from helpers import backbones

    cfg = run.config
    base = registry.configured(cfg, method)
    grid = base.spec.sweep_grid(base.settings, base.backbone, base.image_size)
    grid.update({k: list(v) for k, v in cfg.sweep.grids.get(method, {}).items()})
    detector = base.build()
    current = {**detector.settings(), "stages": list(detector.stages)}
    overrides = []
    for param, values in grid.items():
        for value in values:
            value = list(value) if isinstance(value, tuple) else value
            if current.get(param) != value and {param: value} not in overrides:
                overrides.append({param: value})
    second = cfg.sweep.second_backbone
    if second and second != cfg.model.backbone and backbones.is_available(second):
        overrides.append({"backbone": second, "stages": None})
    return overrides


def _sweep_job(config: DetectorConfig, run: Run, draw: int, category: str, conditions: Sequence[Condition],
               splits: Sequence[str], labels: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    detector = fit_cached(config, train_paths(run, draw, category))
    results = [evaluate_conditions(detector, run, draw, category, conditions, split, [CLEAN], **labels)
               for split in splits]
    return (pd.concat([m for m, _ in results], ignore_index=True),
            pd.concat([s for _, s in results], ignore_index=True))


def sweep_conditions(run: Run) -> list[Condition]:
    """Clean data and the sweep's shifts (domain mode): where each setting's robustness is measured."""
    return [CLEAN, *(Condition("domain", t, int(s)) for t, s in run.config.sweep.shifts)]


def sweep(run: Run, method: str, conditions: Sequence[Condition] | None = None, draw: int | None = None,
          seed: int | None = None, splits: Sequence[str] = ("val", "test"),
          progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate the configured detector and each one-parameter override on each category and condition, on the
    validation split (where a setting may be chosen) and the test split (where it is reported).

    Rows carry ``param`` and ``value`` (``default`` for the configured detector) so one table holds every
    swept hyperparameter; pixel metrics are computed on clean data only. First data draw and model seed."""
    from helpers.parallel import run_jobs

    cfg = run.config
    draw = cfg.data.draws[0] if draw is None else draw
    conditions = sweep_conditions(run) if conditions is None else list(conditions)
    base = registry.configured(cfg, method, seed)
    jobs, sizes = [], set()
    for override in [{}, *sweep_grid(run, method)]:
        param = "+".join(k for k in override if override[k] is not None) or "default"
        value = "/".join(_label(v) for v in override.values() if v is not None) or "default"
        labels = dict(method=method, seed=base.seed, param=param, value=value)
        config = base.replace(**override)
        sizes.add((config.backbone, config.image_size))
        jobs += [(config, run, draw, category, conditions, list(splits), labels) for category in cfg.data.categories]
    manifest = run.manifest(draw)
    sets = [list(rows_of(run, draw, c, "train", manifest=manifest)["image_path"]) for c in cfg.data.categories]
    sets += [list(rows_of(run, draw, c, split, cond, manifest)["image_path"]) for c in cfg.data.categories
             for split in splits for cond in conditions]
    for backbone, image_size in sorted(sizes):  # another backbone or input size: its own features, filled first
        prefetch_features(run, sets, backbone, image_size, progress=progress)
    results = run_jobs(_sweep_job, jobs, cfg.execution, desc=f"{method} sweep", progress=progress, memo=True)
    return (pd.concat([m for m, _ in results], ignore_index=True),
            pd.concat([s for _, s in results], ignore_index=True))


def matched_stages(run: Run) -> tuple[str, ...]:
    """The stages every method shares in the matched comparison: ``sweep.matched_stages``, or else the first
    method's default stages (PatchCore's stride-8 and stride-16 pair)."""
    cfg = run.config
    if cfg.sweep.matched_stages:
        return tuple(cfg.sweep.matched_stages)
    first = registry.configured(cfg, cfg.method_names[0])
    return tuple(first.build().stages)


def run_matched(run: Run, method: str, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """The method on the matched stages (same image size as every method), clean data, every draw and seed: one
    row of the baseline beside its own defaults. None when its configured stages already are the matched ones
    or it has no stages setting."""
    import dataclasses

    from helpers.parallel import run_jobs

    cfg = run.config
    base = registry.configured(cfg, method)
    stages = matched_stages(run)
    if "stages" not in {f.name for f in dataclasses.fields(base.settings)} or tuple(base.build().stages) == stages:
        return None
    triples = [(d, s, c) for d in cfg.data.draws for s in cfg.model.seeds for c in cfg.data.categories]
    jobs = []
    for draw, seed, category in triples:
        config = registry.configured(cfg, method, seed).replace(stages=list(stages))
        labels = dict(method=method, seed=int(seed), variant="matched", stages="+".join(stages))
        jobs.append((config, run, draw, category, [CLEAN], "test", labels, True))
    results = run_jobs(_evaluate_job, jobs, cfg.execution, desc=f"{method} matched", progress=progress, memo=True)
    return (pd.concat([m for m, _ in results], ignore_index=True),
            pd.concat([s for _, s in results], ignore_index=True))


def _label(value) -> str:
    return "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def clean_per_transform(df: pd.DataFrame) -> pd.DataFrame:
    """Repeat the clean rows as severity 0 of every (mode, transform), so each curve starts at the clean value."""
    clean = df[df["transform"] == "none"]
    shifted = df[df["transform"] != "none"]
    pairs = shifted[["mode", "transform"]].drop_duplicates().itertuples(index=False)
    copies = [clean.assign(mode=m, transform=t) for m, t in pairs]
    return pd.concat([shifted, *copies], ignore_index=True)


def summarise(df: pd.DataFrame, by: Sequence[str], metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Mean and standard deviation over the rows of each group, as ``metric`` and ``metric_sd`` columns, and the
    number of rows (``n``) they are over."""
    present = [m for m in metrics if m in df.columns and df[m].notna().any()]
    grouped = df.groupby(list(by))[present]
    out = grouped.mean().join(grouped.std(ddof=1).add_suffix("_sd")).reset_index()
    out["n"] = df.groupby(list(by)).size().to_numpy()
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


def map_examples(run: Run, method: str, category: str, per_kind: int = 2):
    """Test images worth looking at, for the first draw and seed: correctly passed normals, detected and missed
    anomalies, judged at the oracle threshold (F1-optimal on the labelled validation split).

    Returns ``(rows, prediction, threshold)`` of the picked images."""
    from helpers import thresholds

    draw = run.config.data.draws[0]
    model = fit_cached(registry.configured(run.config, method), train_paths(run, draw, category))
    val, test = rows_of(run, draw, category, "val"), rows_of(run, draw, category, "test")
    threshold = thresholds.fit_threshold("f1_optimal", val["label"].to_numpy(), score(model, val).image_scores)
    prediction = score(model, test)
    picked = example_cases(test, prediction, threshold.value, per_kind)
    chosen = Prediction(prediction.image_scores[picked], prediction.anomaly_maps[picked])
    return test.iloc[picked].reset_index(drop=True), chosen, threshold.value


def shift_needs(run: Run) -> dict[tuple[int, Condition], set[str]]:
    """Which shifted copies the study scores, and which manifest splits each must hold: the drop study's test
    split for every draw and condition; the sweep's test and validation splits (first draw); and for the
    threshold regimes (first draw, domain mode) the calib split (the pool of target-domain normals that
    recalibration, adaptation and refits draw from), the val split (the oracle and the labelled anomalies) and
    the test split. No regime reads shifted training images."""
    cfg = run.config
    first = cfg.data.draws[0]
    needs: dict[tuple[int, Condition], set[str]] = {}

    def need(draw, condition, parts):
        needs.setdefault((int(draw), condition), set()).update(parts)

    for draw in cfg.data.draws:
        for condition in drop_conditions(run, draw)[1:]:
            need(draw, condition, {"test"})
    for transform, severity in cfg.sweep.shifts:
        need(first, Condition("domain", transform, int(severity)), {"val", "test"})
    for transform in cfg.thresholds.transforms:
        for severity in cfg.thresholds.severities:
            need(first, Condition("domain", transform, int(severity)), {"calib", "val", "test"})
    return needs
