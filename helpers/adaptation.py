"""Threshold regimes under a domain shift, on equal budgets of target-domain normals (notebook 04).

A detector fitted on clean normals meets a new domain (one ``domain``-mode MVTec-Shift condition: one rig, every
image shifted alike) together with N normal images of it. Every regime at a budget N and draw r gets exactly the
same N images, drawn from the condition's shifted ``calib`` split by :func:`target_subset` (whatever the method,
seed or regime), and is evaluated on the condition's shifted ``test`` split, which no threshold, normalisation or
fit ever reads:

- ``none``: the source model with its threshold from the clean calib normals;
- ``threshold_only``: the source model, threshold re-estimated on the N target normals;
- ``normalised``: the source model's scores standardised with the N target normals' mean and standard deviation
  (image scores; for the maps, pixels), thresholded at the source threshold in the clean calib normals' units;
- ``adapted``: ``Detector.adapted`` with the N images (PatchCore adds their patches to its bank, PaDiM
  re-estimates its means);
- ``refit``: a fresh detector fitted on the N images alone;
- ``labelled``: the source model with the threshold of best balanced accuracy on the N normals plus A labelled
  shifted anomalies from the shifted ``val`` split (the label-budget curve);
- ``oracle``: the F1-optimal threshold on the labelled shifted ``val`` split, a bound no deployment has;
- ``clean``: the source model and its clean threshold on the clean test split, the level the loss is measured from.

``adapted`` and ``refit`` cannot take a threshold from the scores of the images they were fitted on (a memory bank
scores its own patches near 0), so the N images are cross-fitted: K folds, each scored by a model fitted on the
other folds; the thresholds come from these out-of-fold scores and the deployed model is fitted on all N. The fold
models saw fewer images than the deployed one, so their scores tend to run high and the thresholds to err towards
fewer false alarms.

Source models are the baseline's (clean train normals of the first data draw, every model seed, the
``fit_cached`` entries notebook 02 wrote). Each image set is scored once per model; estimators, budgets and draws
only re-read those scores. Adapted and refit models are fitted for the first ``thresholds.refit_seeds`` seeds at
``thresholds.adapt_budgets`` and ``thresholds.refit_budgets``.
"""
from __future__ import annotations

import copy
import hashlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from helpers import experiments, thresholds
from helpers.metrics import pixel_at_threshold
from helpers.paths import Run
from helpers.registry import DetectorConfig
from helpers.thresholds import Estimator, PixelCounter

REGIMES = ("clean", "none", "threshold_only", "normalised", "adapted", "refit", "labelled", "oracle")
PIXEL_STRIDE = 4  # pixel thresholds read every 4th map pixel per direction: a sigma-4 blurred map varies slowly
ORACLE_PIXELS = 500_000  # pixels of the labelled val split the oracle's pixel threshold is chosen from
ROW_COLUMNS = ["method", "seed", "category", "data_draw", "mode", "transform", "severity", "regime", "estimator",
               "alpha", "oracle", "budget", "anomalies", "draw", "target_set", "n_threshold_images", "threshold",
               "pixel_threshold", "fpr", "tpr", "precision", "f1", "balanced_accuracy", "mcc", "seg_f1", "tp", "fp",
               "tn", "fn", "n_test", "n_test_anomalous", "f1_flag_all", "note"]


# --- which images ---------------------------------------------------------------------------------------

def _stable(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _condition_key(condition: experiments.Condition) -> str:
    return f"{condition.mode}/{condition.transform}/{condition.severity}"


def draws_for(budget: int, pool_size: int, draws: int) -> range:
    """Draw indices of a budget: one where N is the whole pool (every draw would be the same set)."""
    return range(1) if budget >= pool_size else range(draws)


def target_subset(pool_size: int, budget: int, draw: int, category: str, condition: experiments.Condition,
                  seed: int = 0) -> np.ndarray:
    """Sorted positions (into the shifted calib split, in manifest order) of the N target normals of one draw.

    A function of the category, condition, budget, draw and ``seed`` only, so every method, model seed and regime
    at a (budget, draw) gets the same images; draws are independent of each other and of the other budgets."""
    if not 1 <= budget <= pool_size:
        raise ValueError(f"budget {budget} does not fit a pool of {pool_size} target normals ({category}, {condition})")
    if budget == pool_size:
        return np.arange(pool_size)
    rng = np.random.default_rng([seed, _stable(category), _stable(_condition_key(condition)), budget, draw])
    return np.sort(rng.choice(pool_size, budget, replace=False))


def anomaly_order(n_anomalous: int, draw: int, category: str, condition: experiments.Condition,
                  seed: int = 0) -> np.ndarray:
    """Order in which a draw of the label-budget curve takes the labelled shifted anomalies: the first A of it, so
    the A anomalies of a draw are nested in A and shared by every budget N."""
    rng = np.random.default_rng([seed, _stable(category), _stable(_condition_key(condition)), draw, 1])
    return rng.permutation(n_anomalous)


def fold_of(budget: int, folds: int, draw: int, category: str, condition: experiments.Condition,
            seed: int = 0) -> np.ndarray:
    """Fold (0..folds-1) of each of the N target images of a draw for cross-fitting, as balanced as N allows."""
    rng = np.random.default_rng([seed, _stable(category), _stable(_condition_key(condition)), budget, draw, 2])
    return rng.permutation(np.arange(budget) % folds)


def set_id(keys: Sequence[str]) -> str:
    """Short hash of a set of image keys (order ignored): equal ids, equal image sets."""
    return hashlib.sha1("\n".join(sorted(map(str, keys))).encode()).hexdigest()[:12]


# --- scored splits --------------------------------------------------------------------------------------

@dataclass
class Scored:
    """One split under one model: image keys, labels and scores; ``pixels`` every PIXEL_STRIDE-th map pixel per
    image (for pixel thresholds), and for a test split the SegF1 counter (None without ground truth)."""

    keys: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    pixels: np.ndarray
    counter: PixelCounter | None = None
    masks: np.ndarray | None = None
    maps: np.ndarray | None = None

    @property
    def n_normal(self) -> int:
        return int((~self.labels).sum())


def scored(rows: pd.DataFrame, prediction, role: str) -> Scored:
    """``role``: ``calib`` (normals the thresholds read), ``val`` (kept whole for the oracle), ``test`` (SegF1
    counter) or ``test_direct`` (masks and maps kept for a few direct SegF1 evaluations)."""
    maps = prediction.anomaly_maps
    labels = rows["label"].to_numpy().astype(bool)
    pixels = maps[:, ::PIXEL_STRIDE, ::PIXEL_STRIDE].reshape(len(maps), -1)
    out = Scored(rows["image"].to_numpy(), labels, prediction.image_scores.astype(np.float64), pixels)
    if role in ("val", "test", "test_direct"):
        masks = experiments.masks_for(rows, maps.shape[-1])
        if masks is not None:
            masks = masks.astype(bool)
            if role == "test":
                out.counter = PixelCounter(masks, maps)
            else:
                out.masks, out.maps = masks, maps
    return out


def _seg_f1(test: Scored, pixel_threshold: float | None) -> float | None:
    if pixel_threshold is None:
        return None
    if test.counter is not None:
        return test.counter.seg_f1(pixel_threshold)
    if test.masks is not None and test.masks.any():
        return pixel_at_threshold(test.masks, test.maps, pixel_threshold)["f1"]
    return None


def evaluate(test: Scored, image_threshold: float, pixel_threshold: float | None) -> dict:
    """Image metrics and SegF1 of fixed thresholds on a test split; the flag-everything F1 beside them."""
    metrics = thresholds.image_metrics(test.labels, test.scores, image_threshold)
    prevalence = float(test.labels.mean())
    return dict(threshold=float(image_threshold),
                pixel_threshold=None if pixel_threshold is None else float(pixel_threshold),
                **metrics, seg_f1=_seg_f1(test, pixel_threshold), n_test=int(test.labels.size),
                n_test_anomalous=int(test.labels.sum()), f1_flag_all=thresholds.flag_everything_f1(prevalence))


# --- the rows of one source model -----------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What the jobs need of the threshold section: picklable, and part of each job's cache key."""

    estimators: tuple[Estimator, ...]
    budgets: tuple[int, ...]
    draws: int
    anomalies: tuple[int, ...]
    adapt_budgets: tuple[int, ...]
    refit_budgets: tuple[int, ...]
    folds: int
    seed: int

    @classmethod
    def of(cls, config) -> "Plan":
        th = config.thresholds
        return cls(tuple(thresholds.estimators(th.estimators, th.percentile, th.sigmas, th.alphas)),
                   tuple(th.budgets), int(th.draws), tuple(th.anomalies),
                   tuple(th.budgets if th.adapt_budgets is None else th.adapt_budgets),
                   tuple(th.budgets if th.refit_budgets is None else th.refit_budgets), int(th.folds), int(th.seed))

    def model_budgets(self, regime: str) -> tuple[int, ...]:
        return self.adapt_budgets if regime == "adapted" else self.refit_budgets


def _row(labels: dict, regime: str, estimator: str, alpha: float, budget: int, draw: int, target_set: str,
         n_threshold_images: int, evaluated: dict, anomalies: int = 0, oracle: bool = False, note: str = "") -> dict:
    return {**labels, "regime": regime, "estimator": estimator, "alpha": alpha, "oracle": oracle, "budget": budget,
            "anomalies": anomalies, "draw": draw, "target_set": target_set,
            "n_threshold_images": n_threshold_images, **evaluated, "note": note}


@dataclass(frozen=True)
class SourceCalibration:
    """What the source model takes from the clean calib normals: each estimator's image and pixel threshold,
    and the mean and standard deviation of the scores and pixels (the units ``normalised`` transfers)."""

    image: dict
    pixel: dict
    image_mean: float
    image_sd: float
    pixel_mean: float
    pixel_sd: float
    n_images: int

    @classmethod
    def fit(cls, plan: Plan, calib: Scored) -> "SourceCalibration":
        pixels = calib.pixels.ravel()
        return cls({e.name: e.fit(calib.scores) for e in plan.estimators},
                   {e.name: e.fit(pixels) for e in plan.estimators}, float(calib.scores.mean()),
                   float(calib.scores.std(ddof=1)), float(pixels.mean()), float(pixels.std(ddof=1)),
                   int(calib.scores.size))

    def transferred(self, name: str, image_mean: float, image_sd: float, pixel_mean: float,
                    pixel_sd: float) -> tuple[float, float]:
        """The source thresholds of estimator ``name`` moved to a domain with these statistics: the same number
        of standard deviations above the mean (an infinite threshold stays infinite)."""
        def move(value, mean, sd, new_mean, new_sd):
            return new_mean + new_sd * (value - mean) / sd if np.isfinite(value) else value

        return (move(self.image[name], self.image_mean, self.image_sd, image_mean, image_sd),
                move(self.pixel[name], self.pixel_mean, self.pixel_sd, pixel_mean, pixel_sd))


def source_rows(labels: dict, category: str, condition: experiments.Condition, plan: Plan,
                source: SourceCalibration, calib: Scored, val: Scored, test: Scored) -> list[dict]:
    """Rows of the source-model regimes (none, threshold_only, normalised, labelled, oracle) for one condition.

    ``source``: what the clean calib normals gave; ``calib``: the shifted calib split, the pool the N target
    normals are drawn from; ``val``: the labelled shifted val split (oracle, labelled anomalies); ``test``: the
    shifted test split, only ever evaluated on."""
    labels = {**labels, "category": category, **condition.labels()}
    rows = []
    for est in plan.estimators:
        rows.append(_row(labels, "none", est.name, est.alpha, 0, 0, "", source.n_images,
                         evaluate(test, source.image[est.name], source.pixel[est.name])))
    if val.labels.any() and (~val.labels).any():
        image_t = thresholds.fit_threshold("f1_optimal", val.labels, val.scores).value
        pixel_t = None
        if val.masks is not None and val.masks.any():
            pixel_t = thresholds.fit_pixel_threshold("f1_optimal", val.masks, val.maps, ORACLE_PIXELS).value
        rows.append(_row(labels, "oracle", "f1_optimal", math.nan, val.n_normal, 0, "", int(val.labels.size),
                         evaluate(test, image_t, pixel_t), anomalies=int(val.labels.sum()), oracle=True,
                         note="F1-optimal on the labelled shifted val split: a bound, not a deployable regime"))
    anomalous_scores = val.scores[val.labels]
    pool = len(calib.scores)
    for budget in plan.budgets:
        if budget > pool:
            warnings.warn(f"{category}, {condition}: budget {budget} exceeds the {pool} target normals; skipped",
                          UserWarning, stacklevel=2)
            continue
        for draw in draws_for(budget, pool, plan.draws):
            subset = target_subset(pool, budget, draw, category, condition, plan.seed)
            target = set_id(calib.keys[subset])
            scores, pixels = calib.scores[subset], calib.pixels[subset].ravel()
            stats = (float(scores.mean()), float(scores.std(ddof=1)), float(pixels.mean()), float(pixels.std(ddof=1)))
            for est in plan.estimators:
                rows.append(_row(labels, "threshold_only", est.name, est.alpha, budget, draw, target, budget,
                                 evaluate(test, est.fit(scores), est.fit(pixels))))
                if stats[1] > 0 and stats[3] > 0:  # N identical scores leave no unit to standardise with
                    rows.append(_row(labels, "normalised", est.name, est.alpha, budget, draw, target, budget,
                                     evaluate(test, *source.transferred(est.name, *stats))))
            order = anomaly_order(len(anomalous_scores), draw, category, condition, plan.seed)
            for n_anomalies in plan.anomalies:
                if n_anomalies > len(anomalous_scores):
                    continue
                image_t = thresholds.balanced_optimal_threshold(scores, anomalous_scores[order[:n_anomalies]])
                rows.append(_row(labels, "labelled", "balanced_optimal", math.nan, budget, draw, target,
                                 budget + n_anomalies, evaluate(test, image_t, None), anomalies=n_anomalies,
                                 note="image threshold only"))
    return rows


def _source_job(config: DetectorConfig, run: Run, draw: int, category: str,
                conditions: Sequence[experiments.Condition], plan: Plan) -> tuple[pd.DataFrame, dict]:
    """Every source-model row of one (method, seed, category): clean, then each condition."""
    start = time.perf_counter()
    model = experiments.fit_cached(config, experiments.train_paths(run, draw, category))
    manifest = run.manifest(draw)

    def split(name, condition, role):
        rows = experiments.rows_of(run, draw, category, name, condition, manifest)
        return scored(rows, experiments.score(model, rows), role)

    labels = dict(method=config.method, seed=int(config.seed), data_draw=int(draw))
    source = SourceCalibration.fit(plan, split("calib", experiments.CLEAN, "calib"))
    clean_test = split("test", experiments.CLEAN, "test")
    clean_labels = {**labels, "category": category, **experiments.CLEAN.labels()}
    out = [_row(clean_labels, "clean", e.name, e.alpha, 0, 0, "", source.n_images,
                evaluate(clean_test, source.image[e.name], source.pixel[e.name])) for e in plan.estimators]
    for condition in conditions:
        calib, val, test = (split("calib", condition, "calib"), split("val", condition, "val"),
                            split("test", condition, "test"))
        out += source_rows(labels, category, condition, plan, source, calib, val, test)
    timing = dict(method=config.method, seed=int(config.seed), category=category, job="source",
                  seconds=time.perf_counter() - start)
    return pd.DataFrame(out, columns=ROW_COLUMNS), timing


# --- adapted and re-fitted models -----------------------------------------------------------------------

def _take(feats: dict, index: np.ndarray) -> dict:
    import torch

    where = torch.as_tensor(np.asarray(index), dtype=torch.long)
    return {stage: tensor.index_select(0, where) for stage, tensor in feats.items()}


def cross_fitted(fit, calib_feats: dict, subset: np.ndarray, folds: np.ndarray):
    """Out-of-fold image scores ``(N,)`` and strided pixels ``(N, m)`` of the N images ``subset``: fold k is
    scored by ``fit`` of the other folds' images, so no image is scored by a model fitted on it."""
    scores, pixels = np.empty(len(subset)), None
    for fold in np.unique(folds):
        held, kept = subset[folds == fold], subset[folds != fold]
        prediction = fit(_take(calib_feats, kept)).predict_features(_take(calib_feats, held))
        sampled = prediction.anomaly_maps[:, ::PIXEL_STRIDE, ::PIXEL_STRIDE].reshape(len(held), -1)
        if pixels is None:
            pixels = np.empty((len(subset), sampled.shape[1]), dtype=sampled.dtype)
        scores[folds == fold], pixels[folds == fold] = prediction.image_scores, sampled
    return scores, pixels


def model_rows(labels: dict, category: str, condition: experiments.Condition, plan: Plan, fits: dict,
               calib_keys: np.ndarray, calib_feats: dict, test_rows: pd.DataFrame, test_feats: dict) -> list[dict]:
    """Rows of the regimes that fit a model on the N target images (``fits``: regime -> function from features
    to a fitted detector), at each regime's budgets (``Plan.model_budgets``) and every draw. ``test_feats`` are
    only ever predicted on."""
    labels = {**labels, "category": category, **condition.labels()}
    pool, rows = len(calib_keys), []
    for budget in sorted(set(plan.adapt_budgets) | set(plan.refit_budgets)):
        if budget > pool:
            continue
        here = {regime: fit for regime, fit in fits.items() if budget in plan.model_budgets(regime)}
        for draw in draws_for(budget, pool, plan.draws):
            subset = target_subset(pool, budget, draw, category, condition, plan.seed)
            target = set_id(calib_keys[subset])
            folds = fold_of(budget, plan.folds, draw, category, condition, plan.seed)
            for regime, fit in here.items():
                oof_scores, oof_pixels = cross_fitted(fit, calib_feats, subset, folds)
                prediction = fit(_take(calib_feats, subset)).predict_features(test_feats)
                test = scored(test_rows, prediction, "test_direct")
                pixels = oof_pixels.ravel()
                for est in plan.estimators:
                    rows.append(_row(labels, regime, est.name, est.alpha, budget, draw, target, budget,
                                     evaluate(test, est.fit(oof_scores), est.fit(pixels)),
                                     note=f"{plan.folds}-fold cross-fitted threshold; deployed model fitted on all N"))
    return rows


def _model_job(config: DetectorConfig, run: Run, draw: int, category: str, condition: experiments.Condition,
               plan: Plan) -> tuple[pd.DataFrame, dict]:
    """The adapted and refit rows of one (method, seed, category, condition)."""
    start = time.perf_counter()
    source = experiments.fit_cached(config, experiments.train_paths(run, draw, category))
    manifest = run.manifest(draw)
    calib_rows = experiments.rows_of(run, draw, category, "calib", condition, manifest)
    test_rows = experiments.rows_of(run, draw, category, "test", condition, manifest)
    calib_feats = source.features(list(calib_rows["image_path"]))
    test_feats = source.features(list(test_rows["image_path"]))
    blank = config.build()
    fits = {"adapted": source.adapted, "refit": lambda feats: copy.deepcopy(blank).fit_features(feats)}
    labels = dict(method=config.method, seed=int(config.seed), data_draw=int(draw))
    rows = model_rows(labels, category, condition, plan, fits, calib_rows["image"].to_numpy(), calib_feats,
                      test_rows, test_feats)
    timing = dict(method=config.method, seed=int(config.seed), category=category, job=f"models {condition}",
                  seconds=time.perf_counter() - start)
    return pd.DataFrame(rows, columns=ROW_COLUMNS), timing


# --- the experiment -------------------------------------------------------------------------------------

def conditions_of(config) -> list[experiments.Condition]:
    th = config.thresholds
    return [experiments.Condition("domain", t, int(s)) for t in th.transforms for s in th.severities]


def target_sets(study: Run) -> pd.DataFrame:
    """One row per target image of every (category, condition, budget, draw): what every regime there used."""
    cfg, plan = study.config, Plan.of(study.config)
    draw = cfg.data.draws[0]
    manifest = study.manifest(draw)
    rows = []
    for category in cfg.data.categories:
        for condition in conditions_of(cfg):
            keys = experiments.rows_of(study, draw, category, "calib", condition, manifest)["image"].to_numpy()
            for budget in [b for b in plan.budgets if b <= len(keys)]:
                for r in draws_for(budget, len(keys), plan.draws):
                    chosen = keys[target_subset(len(keys), budget, r, category, condition, plan.seed)]
                    rows += [dict(category=category, **condition.labels(), budget=budget, draw=r,
                                  target_set=set_id(chosen), image=k) for k in chosen]
    return pd.DataFrame(rows)


def run(study: Run, progress: bool = True, memo: bool = True) -> dict[str, pd.DataFrame]:
    """Every regime's rows (``rows``), the target image sets (``target_sets``) and per-job seconds (``timings``).

    Backbone features of every image read are cached first (one job per category and condition), then one job
    per (method, seed, category) scores the source model on the clean and shifted splits and derives every
    source-model regime, and one job per (method, refit seed, category, condition) fits the adapted and refit
    models (queued first: they are the longest). The rows are the same for any number of workers. With ``memo``
    finished jobs are kept in the job cache (``parallel.run_jobs``), so a killed run redoes only what it lost;
    source models come from notebook 02's model cache (a job that finds one missing fits it)."""
    from helpers import registry
    from helpers.parallel import run_jobs

    cfg = study.config
    plan = Plan.of(cfg)
    draw = cfg.data.draws[0]
    conditions = conditions_of(cfg)
    manifest = study.manifest(draw)
    image_sets = []
    for category in cfg.data.categories:
        for condition in [experiments.CLEAN, *conditions]:
            parts = ("calib", "test") if condition.is_clean else ("calib", "val", "test")
            image_sets.append([p for part in parts for p in
                               experiments.rows_of(study, draw, category, part, condition, manifest)["image_path"]])
    experiments.prefetch_features(study, image_sets, progress=progress)
    seeds = list(cfg.model.seeds)
    jobs = [("models", registry.configured(cfg, m, s), study, draw, c, [cond], plan)
            for m in cfg.methods for s in seeds[:cfg.thresholds.refit_seeds]
            for c in cfg.data.categories for cond in conditions if plan.adapt_budgets or plan.refit_budgets]
    jobs += [("source", registry.configured(cfg, m, s), study, draw, c, conditions, plan)
             for m in cfg.methods for s in seeds for c in cfg.data.categories]
    results = run_jobs(_regime_job, jobs, cfg.execution, desc="threshold regimes", progress=progress, memo=memo)
    rows = pd.concat([r for r, _ in results], ignore_index=True)
    return {"rows": rows, "target_sets": target_sets(study), "timings": pd.DataFrame([t for _, t in results])}


def _regime_job(kind: str, config: DetectorConfig, study: Run, draw: int, category: str,
                conditions: Sequence[experiments.Condition], plan: Plan) -> tuple[pd.DataFrame, dict]:
    """One job of :func:`run`: ``source`` rows of one (method, seed, category), or the adapted and refit
    ``models`` of one (method, seed, category, condition). Many small fits and predictions: one torch thread, as
    in the parallel workers; in this process (workers: 1) two OpenMP threads on a shared 2-core machine made
    PaDiM's batched Mahalanobis product 400x slower."""
    from helpers.threads import one_torch_thread

    with one_torch_thread():
        if kind == "source":
            return _source_job(config, study, draw, category, conditions, plan)
        return _model_job(config, study, draw, category, conditions[0], plan)


# --- summaries: what the rows say -----------------------------------------------------------------------

CONDITION = experiments.CONDITION_COLUMNS
METRICS = ("balanced_accuracy", "mcc", "f1", "fpr", "tpr", "seg_f1")
LEVEL_KEYS = ["regime", "estimator", "alpha", "oracle", "budget", "anomalies"]
POOLED = {"mode": "domain", "transform": "all", "severity": 0}  # condition columns of rows pooled over shifts


def _levels(rows: pd.DataFrame, metrics: Sequence[str], n_resamples: int,
            rng: np.random.Generator) -> dict[str, tuple[float, np.ndarray]]:
    """Per metric: the mean over units (condition x category), each the mean over its draws of the seed-averaged
    value, and ``n_resamples`` bootstrap replicates of it that resample the draws within every unit (a unit with
    one draw is constant); every metric shares the same resamples. The interval this gives says how much the
    result depends on which N target images were drawn; test images, categories and seeds are held fixed."""
    per_draw = rows.groupby([*CONDITION, "category", "draw"], sort=True)[list(metrics)].mean()
    unit_of = per_draw.index.droplevel("draw")
    points, replicates = {m: [] for m in metrics}, {m: [] for m in metrics}
    for unit in pd.unique(unit_of):
        values = per_draw[unit_of == unit]
        picks = rng.integers(0, len(values), (n_resamples, len(values)))
        for m in metrics:
            column = values[m].to_numpy(float)
            points[m].append(column.mean())
            replicates[m].append(column[picks].mean(axis=1))
    out = {}
    for m in metrics:
        # A unit where the metric is undefined (SegF1 of a category without ground truth) is left out of it.
        kept = [i for i, v in enumerate(points[m]) if np.isfinite(v)]
        if not kept:
            out[m] = (math.nan, np.full(n_resamples, math.nan))
        else:
            out[m] = (float(np.mean([points[m][i] for i in kept])),
                      np.mean([replicates[m][i] for i in kept], axis=0))
    return out


def _level(rows: pd.DataFrame, metric: str, n_resamples: int, rng: np.random.Generator) -> tuple[float, np.ndarray]:
    return _levels(rows, [metric], n_resamples, rng)[metric]


def _interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    if np.isnan(replicates).all():
        return math.nan, math.nan
    tail = (1 - level) / 2
    lo, hi = np.quantile(replicates, [tail, 1 - tail])
    return float(lo), float(hi)


def _counts(rows: pd.DataFrame) -> dict:
    draws = rows.groupby([*CONDITION, "category"])["draw"].nunique()
    return dict(n_draws=int(draws.max()), n_conditions=int(rows[CONDITION].drop_duplicates().shape[0]),
                n_categories=int(rows["category"].nunique()), n_seeds=int(rows["seed"].nunique()), n_rows=len(rows))


def summarise(rows: pd.DataFrame, pooled: bool = False, metrics: Sequence[str] = METRICS, n_resamples: int = 1000,
              level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per method, condition (or, ``pooled``, all shifted conditions together), regime, estimator,
    budget and number of labelled anomalies: the mean of each metric over categories, seeds and draws, its
    bootstrap interval over the draws of the N target images (``_lo``/``_hi``), the flag-everything F1 and how
    many draws, conditions, categories and seeds it is over. Oracle rows keep ``oracle = True``."""
    rng = np.random.default_rng(seed)
    # Pooled, every shifted condition counts as one more unit; the clean rows (clean test) keep their own level.
    data = rows.assign(**POOLED) if pooled else rows
    keys = ["method", *CONDITION, *LEVEL_KEYS]
    out = []
    for key, group in data.groupby(keys, sort=True, dropna=False):
        row = {**dict(zip(keys, key)), **_counts(group), "f1_flag_all": float(group["f1_flag_all"].mean())}
        for metric, (estimate, replicates) in _levels(group, metrics, n_resamples, rng).items():
            row[metric] = estimate
            row[f"{metric}_lo"], row[f"{metric}_hi"] = _interval(replicates, level)
        out.append(row)
    return pd.DataFrame(out)


def recovery(rows: pd.DataFrame, metric: str = "balanced_accuracy", min_loss: float = 0.05, pooled: bool = False,
             n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """The conclusion: per method, condition (or all shifts pooled), estimator, regime and budget, the share of
    the clean-to-shifted loss of ``metric`` the regime recovers, ``(regime - none) / (clean - none)`` (1: back to
    the clean level, 0: no better than not adapting, below 0: worse), with its bootstrap interval over draws.

    The clean and none levels are taken over the same categories and seeds as the regime's rows (refits run for
    fewer seeds). The share is NaN where the loss is at most ``min_loss``: with 20 test normals per category one
    false alarm moves balanced accuracy by 0.025, and a ratio over a loss of one or two images is noise. Pooled
    over shifts it is the ratio of the summed gains to the summed losses of the conditions with a loss. Oracle
    rows (one per estimator, against that estimator's levels) keep ``oracle``."""
    rng = np.random.default_rng(seed)
    compared = [r for r in REGIMES if r not in ("clean", "none", "labelled")]
    out = []
    for (method, estimator), est_rows in rows[rows["estimator"] != "balanced_optimal"].groupby(["method", "estimator"]):
        clean = rows[(rows["method"] == method) & (rows["regime"] == "clean") & (rows["estimator"] == estimator)]
        none = est_rows[est_rows["regime"] == "none"]
        if clean.empty or none.empty:
            continue
        alpha = float(none["alpha"].iloc[0])
        targets = pd.concat([est_rows[est_rows["regime"].isin(compared)],
                             rows[(rows["method"] == method) & (rows["regime"] == "oracle")]])
        for (regime, budget), group in targets.groupby(["regime", "budget"], sort=True):
            conditions = [tuple(c) for c in group[CONDITION].drop_duplicates().itertuples(index=False)]
            cells = [(c,) for c in conditions] if not pooled else [tuple(conditions)]
            for cell in cells:
                out.append(_share_row(method, estimator, alpha, regime, int(budget), cell, group, clean, none,
                                      metric, min_loss, pooled, n_resamples, level, rng))
    return pd.DataFrame(out)


def _share_row(method, estimator, alpha, regime, budget, conditions, group, clean, none, metric, min_loss, pooled,
               n_resamples, level, rng) -> dict:
    units = group[["category", "seed"]].drop_duplicates()
    clean_level = clean.merge(units)[metric].mean()
    gains, losses, used, replicate_gain = 0.0, 0.0, 0, np.zeros(n_resamples)
    for condition in conditions:
        part = group[(group[CONDITION] == pd.Series(condition, index=CONDITION)).all(axis=1)]
        none_part = none[(none[CONDITION] == pd.Series(condition, index=CONDITION)).all(axis=1)].merge(units)
        if none_part.empty:
            continue
        none_level = none_part[metric].mean()
        loss = clean_level - none_level
        if not loss > min_loss:
            continue
        estimate, replicates = _level(part, metric, n_resamples, rng)
        gains += estimate - none_level
        losses += loss
        replicate_gain += replicates - none_level
        used += 1
    labels = dict(zip(CONDITION, conditions[0])) if not pooled else dict(POOLED)
    row = dict(method=method, **labels, estimator=estimator, alpha=alpha, regime=regime,
               oracle=regime == "oracle", budget=budget, **_counts(group), metric=metric,
               conditions_with_loss=used, loss=losses / used if used else math.nan)
    if used:
        row["share"] = gains / losses
        row["share_lo"], row["share_hi"] = _interval(replicate_gain / losses, level)
        row["note"] = ""
    else:
        row.update(share=math.nan, share_lo=math.nan, share_hi=math.nan,
                   note=f"the shift cost at most {min_loss} {metric}: nothing to recover")
    return row


def plateau(summary: pd.DataFrame, regime: str = "threshold_only", metric: str = "balanced_accuracy",
            tolerance: float = 0.01) -> pd.DataFrame:
    """Where a regime stops gaining: per method, condition and estimator, the smallest budget N* after which no
    larger budget improves the mean ``metric`` by more than ``tolerance``, with the levels (and intervals) at
    N* and at the largest budget. ``still_gaining`` marks curves whose last step gained more than that."""
    part = summary[summary["regime"] == regime]
    out = []
    for key, group in part.groupby(["method", *CONDITION, "estimator"], sort=True):
        group = group.sort_values("budget")
        values = group[metric].to_numpy()
        best_later = np.maximum.accumulate(values[::-1])[::-1]  # best of this and every larger budget
        stop = next(i for i in range(len(values)) if best_later[i] - values[i] <= tolerance + 1e-12)
        at, last = group.iloc[stop], group.iloc[-1]
        still_gaining = len(values) > 1 and stop == len(values) - 1 and values[-1] - values[-2] > tolerance
        out.append(dict(zip(["method", *CONDITION, "estimator"], key), regime=regime, metric=metric,
                        tolerance=tolerance, stops_gaining_at=int(at["budget"]), level=at[metric],
                        level_lo=at[f"{metric}_lo"], level_hi=at[f"{metric}_hi"], largest_budget=int(last["budget"]),
                        level_largest=last[metric], level_largest_lo=last[f"{metric}_lo"],
                        level_largest_hi=last[f"{metric}_hi"], still_gaining=bool(still_gaining),
                        n_draws=int(group["n_draws"].min())))
    return pd.DataFrame(out)


def labels_needed(summary: pd.DataFrame, metric: str = "balanced_accuracy", tolerance: float = 0.02) -> pd.DataFrame:
    """How many labelled shifted anomalies recalibration needs: per method, condition and budget N of target
    normals, the fewest anomalies A whose mean ``metric`` reaches the oracle's minus ``tolerance`` (NaN when no
    A in the curve does), beside the level with none."""
    labelled, oracle = summary[summary["regime"] == "labelled"], summary[summary["regime"] == "oracle"]
    out = []
    for key, group in labelled.groupby(["method", *CONDITION, "budget"], sort=True):
        where = ["method", *CONDITION]
        match = oracle[(oracle[where] == pd.Series(key[:-1], index=where)).all(axis=1)]
        target = float(match[metric].iloc[0]) if len(match) else math.nan
        group = group.sort_values("anomalies")
        reached = group[group[metric] >= target - tolerance]
        first = reached.iloc[0] if len(reached) else None
        out.append(dict(zip(["method", *CONDITION, "budget"], key), metric=metric, oracle_level=target,
                        tolerance=tolerance, level_without_labels=float(group[metric].iloc[0]),
                        anomalies_needed=int(first["anomalies"]) if first is not None else math.nan,
                        level=float(first[metric]) if first is not None else math.nan,
                        level_lo=float(first[f"{metric}_lo"]) if first is not None else math.nan,
                        level_hi=float(first[f"{metric}_hi"]) if first is not None else math.nan,
                        n_draws=int(group["n_draws"].min())))
    return pd.DataFrame(out)


def calibration(rows: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Achieved false-positive rate of the conformal estimator on the test normals against its alpha: the clean
    threshold on clean test normals (``clean``), the same threshold on shifted ones (``none``), and the threshold
    from the whole pool of target normals on shifted ones (``threshold_only``, its one draw). Per method, seed,
    condition and alpha, false positives are summed over categories (each with its own threshold) and given a
    Clopper-Pearson interval; ``within`` says whether alpha lies in it, ``expected_fpr`` is the rule's mean FPR
    for the calibration sizes used (0 where the threshold is infinite)."""
    from helpers.stats import clopper_pearson

    conformal = rows[rows["estimator"].str.startswith("conformal")]
    # The whole pool is one draw; summing several draws would count the same test normals several times.
    cell = ["method", "seed", "category", *CONDITION, "regime", "estimator", "budget"]
    single = conformal.groupby(cell)["draw"].transform("nunique") == 1
    largest = conformal.groupby(["category", *CONDITION])["budget"].transform("max")
    chosen = conformal[conformal["regime"].isin(["clean", "none"])
                       | ((conformal["regime"] == "threshold_only") & (conformal["budget"] == largest) & single)]
    out = []
    keys = ["method", "seed", *CONDITION, "regime", "estimator", "alpha", "budget"]
    for key, group in chosen.groupby(keys, sort=True):
        alpha = float(key[keys.index("alpha")])
        k, n = int(group["fp"].sum()), int((group["fp"] + group["tn"]).sum())
        lo, hi = clopper_pearson(k, n, level)
        expected = np.mean([thresholds.conformal_expected_fpr(int(m), alpha) for m in group["n_threshold_images"]])
        out.append(dict(zip(keys, key), n_calibration=int(group["n_threshold_images"].min()),
                        infinite=bool(np.isinf(group["threshold"]).all()), false_positives=k, test_normals=n,
                        fpr=k / n, fpr_lo=lo, fpr_hi=hi, expected_fpr=float(expected), within=bool(lo <= alpha <= hi),
                        n_categories=int(group["category"].nunique())))
    return pd.DataFrame(out)


def tables(result: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Every table notebook 04 writes, from the rows of :func:`run`: per-row results, target image sets, the
    per-condition and pooled summaries, the recovered shares, the plateau, the label budget and the calibration."""
    rows = result["rows"]
    summary, pooled = summarise(rows), summarise(rows, pooled=True)
    return {"threshold_rows": rows, "threshold_target_sets": result["target_sets"],
            "threshold_timings": result["timings"], "threshold_summary": summary,
            "threshold_summary_pooled": pooled,
            "threshold_recovery": recovery(rows), "threshold_recovery_pooled": recovery(rows, pooled=True),
            "threshold_plateau": pd.concat([plateau(summary), plateau(pooled)], ignore_index=True),
            "threshold_labels_needed": labels_needed(summary),
            "threshold_calibration": calibration(rows)}


def save(study: Run, named: dict[str, pd.DataFrame]) -> list:
    """Write each table to ``study.table(name)`` (CSV, atomically); the paths written. A table the configuration
    leaves empty (no label budget, no shift with a loss) is not written, and a stale one of that name is removed,
    so the report never reads results of an earlier configuration of this run."""
    from helpers.paths import write_csv

    written = []
    for name, df in named.items():
        path = study.table(name)
        if len(df):
            written.append(write_csv(df, path))
        else:
            path.unlink(missing_ok=True)
    return written


# --- what the report says -------------------------------------------------------------------------------

REPORT_TABLES = ("threshold_recovery_pooled", "threshold_plateau", "threshold_labels_needed",
                 "threshold_calibration", "threshold_summary_pooled")


def headline_table(recovery_pooled: pd.DataFrame) -> pd.DataFrame:
    """The conclusion in one table: per method, estimator, regime and budget, the share of the clean-to-shifted
    balanced-accuracy loss recovered over all shifts with a loss, its interval over draws, and the draw count;
    oracle rows are marked."""
    columns = ["method", "estimator", "regime", "oracle", "budget", "n_draws", "n_seeds", "conditions_with_loss",
               "loss", "share", "share_lo", "share_hi"]
    table = recovery_pooled[columns].copy()
    table["regime"] = np.where(table["oracle"], "oracle (labelled val)", table["regime"])
    return table.sort_values(["method", "estimator", "oracle", "regime", "budget"], ignore_index=True)


def _at_largest_budget(table: pd.DataFrame) -> pd.DataFrame:
    """Rows at each regime's largest budget, and the oracle's: what the report shows of the headline table."""
    largest = table.groupby(["method", "regime"])["budget"].transform("max")
    return table[table["oracle"] | (table["budget"] == largest)].reset_index(drop=True)


def _pct(value: float) -> str:
    from helpers.report import pct

    return "n/a" if not np.isfinite(value) else pct(value)


def report_section(results: dict[str, pd.DataFrame], config) -> list[str]:
    """The threshold section of REPORT.md, every number read from the tables named in REPORT_TABLES."""
    from helpers.report import bullet, markdown

    recovery_pooled = results.get("threshold_recovery_pooled", pd.DataFrame())
    if recovery_pooled.empty:
        return []
    th, calib_size = config.thresholds, config.data.calib_size
    parts = ["## Threshold regimes",
             f"Thresholds come from normal images only. The source model keeps its threshold from the clean calib "
             f"normals ({calib_size} per category); every other regime gets the same N target-domain normals, drawn "
             f"from the shifted calib split of each `domain`-mode shift (N in {list(th.budgets)}, {th.draws} random "
             f"draws per N; one where N is the whole split). Adapted models are fitted at N in "
             f"{list(Plan.of(config).adapt_budgets)} and refit models at N in "
             f"{list(Plan.of(config).refit_budgets)}, for the first "
             f"{th.refit_seeds} model seed(s), with {th.folds}-fold cross-fitted thresholds. The oracle, F1-optimal "
             f"on the labelled shifted val split, is a bound no deployment has. Intervals are 95 % bootstrap "
             f"intervals over the draws of the N images.",
             "Share of the clean-to-shifted loss of balanced accuracy each regime recovers at its largest budget, "
             "all shifts with a loss pooled (1 = back to the clean level, 0 = no better than keeping the source "
             "threshold; every budget is in the `threshold_regimes` table). At the largest budget the N normals "
             "are the whole calib split, one draw, so lo and hi equal the estimate there: no interval:",
             markdown(_at_largest_budget(headline_table(recovery_pooled)).round(3)), "",
             "![regimes](threshold_regimes.png)"]
    lines = []
    largest = recovery_pooled[~recovery_pooled["oracle"]].groupby("method")["budget"].max()
    for method, budget in largest.items():
        at = recovery_pooled[(recovery_pooled["method"] == method) & (recovery_pooled["budget"] == budget)
                             & ~recovery_pooled["oracle"] & recovery_pooled["share"].notna()]
        if at.empty:
            continue
        best = at.sort_values("share", ascending=False).iloc[0]
        # One draw (N is the whole calib split): the bootstrap over draws has nothing to resample.
        spread = (f"[{_pct(best.share_lo)}, {_pct(best.share_hi)}]" if best.n_draws > 1 else
                  "(one draw, the whole calib split: no interval)")
        lines.append(f"{method}, N = {budget}: the most recovered is {_pct(best.share)} {spread} by "
                     f"`{best.regime}` with `{best.estimator}` (over {best.conditions_with_loss} shift(s) with a loss, "
                     f"{best.n_draws} draw(s)).")
    plateau_table = results.get("threshold_plateau", pd.DataFrame())
    pooled_plateau = plateau_table[plateau_table["transform"] == POOLED["transform"]] if len(plateau_table) else []
    for r in pooled_plateau.itertuples() if len(pooled_plateau) else ():
        gaining = ", and was still gaining at the largest budget" if r.still_gaining else ""
        lines.append(f"{r.method}, `{r.estimator}`, all shifts: threshold-only recalibration stops gaining (no larger "
                     f"N adds more than {r.tolerance:g} balanced accuracy) at N = {r.stops_gaining_at}, balanced "
                     f"accuracy {r.level:.3f} [{r.level_lo:.3f}, {r.level_hi:.3f}]{gaining} (`threshold_plateau`).")
    needed = results.get("threshold_labels_needed", pd.DataFrame())
    if len(needed):
        reached = needed.dropna(subset=["anomalies_needed"])
        lines.append(f"Labelled shifted anomalies on top of N normals reach the oracle's balanced accuracy (within "
                     f"{needed.tolerance.iloc[0]:g}) in {len(reached)} of {len(needed)} (method, shift, N) cases"
                     + (f", with a median of {reached.anomalies_needed.median():.0f} anomalies"
                        if len(reached) else "") + " (`threshold_labels_needed`).")
    calib = results.get("threshold_calibration", pd.DataFrame())
    if len(calib):
        clean = calib[calib["regime"] == "clean"]
        finite = clean[~clean["infinite"]]
        lines.append(f"Conformal estimator on clean test normals: alpha lies inside the Clopper-Pearson interval of "
                     f"the achieved FPR in {int(clean.within.sum())} of {len(clean)} (method, seed, alpha) cases; "
                     f"{len(clean) - len(finite)} of them have an infinite threshold (fewer calib normals than the "
                     f"rule needs for that alpha). Under shift, the clean threshold's FPR exceeds alpha's interval in "
                     f"{int((calib[calib.regime == 'none'].fpr_lo > calib[calib.regime == 'none'].alpha).sum())} of "
                     f"{int((calib.regime == 'none').sum())} cases (`threshold_calibration`).")
    summary = results.get("threshold_summary_pooled", pd.DataFrame())
    none = summary[summary["regime"] == "none"] if len(summary) else summary
    if len(none):
        worst = none.sort_values("fpr", ascending=False).iloc[0]
        lines.append(f"F1 rewards flagging everything: at this test prevalence that scores F1 {worst.f1_flag_all:.3f}. "
                     f"Without recalibration ({worst.method}, `{worst.estimator}`) the source threshold flags "
                     f"{_pct(worst.fpr)} of shifted normals at F1 {worst.f1:.3f} and balanced accuracy "
                     f"{worst.balanced_accuracy:.3f} (`threshold_summary_pooled`).")
    return parts + [bullet(lines)] if lines else parts
