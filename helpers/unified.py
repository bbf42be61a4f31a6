"""The unified setting: for each named set of categories, one model fitted on their pooled normals against one
model per category (the control), on the first data draw and every model seed, with the same capped number of
training normals per category for both. It measures whether pooling opens UniAD's "identical shortcut" for
embedding methods, with the positive control that must show it if it can arise.

Operational definitions. A *patch* is a cell of the stride-8 feature grid (``image_size / 8`` cells a side); it
is *anomalous* when at least ``unified.patch_area`` of it is ground truth. Every threshold is fitted on normal
*calibration* images only (``unified.threshold`` at ``unified.normal_quantile``; the labelled validation split
only feeds the F1-optimal thresholds reported as the ``oracle_*`` extra), at image level on image scores and at
patch level on the calibration images' patch scores.

* PatchCore (a memory bank; any detector whose ``patch_neighbours`` answers): an anomalous patch is *explained
  away* when its nearest neighbour in the pooled bank comes from another category and its score falls below
  that category's normal threshold.
* PaDiM (a Gaussian; any detector without a bank): pooling widens the per-position covariance, so the
  Mahalanobis distance of an anomaly can fall below threshold. An anomalous patch is *explained away* when the
  per-category Gaussian flags it (at or above its own normal threshold) and the pooled Gaussian does not.
  Patch scores are its anomaly map averaged over the grid cells.
* Image level, both methods: an anomalous image is explained away when the per-category model flags it and the
  pooled model does not.

Settings, each with normal-only thresholds: ``per_category`` (per-category model and threshold),
``model_unified`` (pooled model, per-category thresholds), ``absolute_unified_raw`` (pooled model, one global
threshold on raw scores) and ``absolute_unified_normalised`` (pooled model, each category's scores standardised
with its own calibration mean and standard deviation, then one global threshold). Data: the labelled ``test``
split, and the controls ``control_<side>``: the cross-category anomalies of :mod:`data_prep.cross_category`
(squares of another category's normal image, ``<side>`` a share of the image side) with the category's normal
test images.

Every model seed is fitted and judged; pixel AUPRO on the controls, the oracle thresholds and PaDiM's covariance
summary come from the first seed only, and so does the curve over the number of pooled categories
(``unified.curve``), which judges the test split and the whole-image control. The paired bootstrap of
:mod:`helpers.stats` gives the intervals of per-category against pooled AUROC on the same images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from helpers import experiments, metrics, registry, splits, stats, thresholds
from helpers.paths import Run
from helpers.registry import DetectorConfig

SETTINGS = ("per_category", "model_unified", "absolute_unified_raw", "absolute_unified_normalised")
ABSOLUTE = ("absolute_unified_raw", "absolute_unified_normalised")
SPLITS = ("calib", "val", "test")
ALL = "all"  # the category of rows over every category of a set (absolute settings: one ranking, one threshold)
PATCH_STRIDE = 8  # the patch grid: PatchCore's first stage; PaDiM's maps are averaged onto the same grid


# --- what is fitted -------------------------------------------------------------------------------------------


def first_draw(run: Run) -> int:
    return int(run.config.data.draws[0])


def train_rows(run: Run, categories: Sequence[str], draw: int | None = None,
               manifest: pd.DataFrame | None = None) -> pd.DataFrame:
    """Training normals of ``categories`` in manifest order, at most ``unified.n_train`` per category (the first
    ones), for pooled and per-category models alike."""
    draw = first_draw(run) if draw is None else draw
    rows = experiments.rows_of(run, draw, list(categories), "train", manifest=manifest)
    cap = run.config.unified.n_train
    if cap:
        rows = rows.groupby("category", sort=False, group_keys=False).head(int(cap)).reset_index(drop=True)
    return rows


@dataclass(frozen=True)
class Pool:
    """Categories pooled into one model: a named set (every seed) or a step of the curve (first seed only)."""

    name: str
    categories: tuple[str, ...]
    seeds: tuple[int, ...]
    curve: bool = False  # a step of the curve over the number of pooled categories: image and patch level only


def pools(run: Run) -> list[Pool]:
    cfg = run.config
    seeds = tuple(int(s) for s in cfg.model.seeds)
    out = [Pool(name, tuple(categories), seeds) for name, categories in cfg.unified_sets.items()]
    curve = cfg.unified_curve
    out += [Pool(f"curve_{n}", tuple(curve[:n]), seeds[:1], curve=True) for n in range(2, len(curve) + 1)]
    return out


def _key(method: str, seed: int, categories: Sequence[str]) -> tuple:
    return method, int(seed), tuple(sorted(categories))


# --- the positive control ---------------------------------------------------------------------------------------


def control_name(patch: float) -> str:
    """The data label of the control with squares of side ``patch``: ``control_0.3``, ``control_1``."""
    return f"control_{float(patch):g}"


def controls(run: Run) -> dict[str, float]:
    """Data label -> square side of every configured control."""
    return {control_name(p): float(p) for p in run.config.unified.control_patches}


def ensure_control(run: Run, draw: int | None = None) -> dict[str, Path]:
    """The cross-category anomalies of every ordered pair of the unified study's categories, for every square
    size, built where missing or stale: bases are each category's normal test images, squares are cut from the
    other's calibration normals (never a training image, so no square is literally in a bank)."""
    from data_prep import cross_category

    draw = first_draw(run) if draw is None else draw
    manifest, root = run.manifest(draw), run.data_root(draw)
    missing = sorted(set(run.config.unified_categories) - set(manifest["category"]))
    if missing:
        raise ValueError(f"the split manifest {run.manifest_path(draw)} lacks the unified study's categories "
                         f"{missing}: run notebooks/00_data.ipynb for this configuration first")
    goods, donors = {}, {}
    for category in run.config.unified_categories:
        test = splits.select(manifest, root, category, "test")
        goods[category] = list(test.loc[test["label"] == 0, "image_path"])
        donors[category] = list(splits.select(manifest, root, category, "calib")["image_path"])
    per_pair = run.config.unified.control_per_pair
    return {name: cross_category.build(run.control_root(draw, patch), goods, donors, per_pair, patch, seed=draw)
            for name, patch in controls(run).items()}


def control_rows(run: Run, category: str, sources: Sequence[str], patch: float, draw: int | None = None,
                 manifest: pd.DataFrame | None = None) -> pd.DataFrame:
    """The control (squares of side ``patch``) of one category: its normal test images and the anomalies made
    with a square of each of ``sources``, in the control manifest's order (helpers.splits.select columns);
    ``manifest`` is that control's, when already read."""
    from data_prep import cross_category

    root = run.control_root(first_draw(run) if draw is None else draw, patch)
    manifest = cross_category.load_manifest(root) if manifest is None else manifest
    rows = splits.select(manifest, root, category, "test")
    keep = {"good", *(cross_category.defect_name(s) for s in sources)}
    return rows[rows["defect_type"].isin(keep)].reset_index(drop=True)


def control_examples(run: Run, category: str) -> pd.DataFrame:
    """One normal image of a category and, for each control size, its first anomaly made from each other
    category, titled by size and source (rows for plots.image_grid)."""
    others = [c for c in run.config.unified_categories if c != category]
    picked = []
    for name, patch in controls(run).items():
        rows = control_rows(run, category, others, patch)
        if not picked:
            picked.append(rows[rows["label"] == 0].head(1).assign(title="good"))
        firsts = rows[rows["label"] == 1].groupby("defect_type", sort=False).head(1)
        picked.append(firsts.assign(title=[f"{name.replace('control_', 'side ')}, {d.replace('_', ' ')}"
                                           for d in firsts["defect_type"]]))
    return pd.concat(picked, ignore_index=True)


# --- scoring one model ------------------------------------------------------------------------------------------


@dataclass
class SplitScores:
    """One model's scores of one category's split: per image, and per patch of the stride-8 grid."""

    images: np.ndarray  # keys (manifest ``image``)
    labels: np.ndarray
    defect_types: np.ndarray
    scores: np.ndarray
    patches: np.ndarray | None = None  # (N, h, w)
    anomalous: np.ndarray | None = None  # (N, h, w) bool: the patch is at least patch_area ground truth
    cross: np.ndarray | None = None  # (N, h, w) bool: nearest bank patch from another category (pooled bank)
    aupro: dict = field(default_factory=dict)  # sources tuple (control) or () (test) -> pixel AUPRO

    def subset(self, keep: np.ndarray) -> "SplitScores":
        pick = (lambda a: None if a is None else a[keep])
        return SplitScores(self.images[keep], self.labels[keep], self.defect_types[keep], self.scores[keep],
                           pick(self.patches), pick(self.anomalous), pick(self.cross), dict(self.aupro))


@dataclass
class ModelScores:
    """What one fitted model (pooled or per-category) gives the study: its scores of every split it judges,
    the categories of its memory bank (PatchCore) or its per-position covariance summary (PaDiM)."""

    method: str
    seed: int
    categories: tuple[str, ...]
    splits: dict  # (category, split) -> SplitScores; split in calib, val, test, control
    bank_patches: dict | None = None  # category -> bank entries sampled from its training patches
    train_patches: dict | None = None  # category -> training patches
    covariance: tuple[np.ndarray, np.ndarray] | None = None  # per position: trace and log-determinant


def _patch_grid(detector, feats, prediction, train_categories: np.ndarray | None, category: str,
                grid: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Patch scores ``(N, grid, grid)`` and, for a memory bank pooled over categories, whether each patch's
    nearest bank entry comes from another category."""
    found = detector.patch_neighbours(feats)
    if found is None:
        maps = torch.from_numpy(prediction.anomaly_maps)[:, None]
        return F.adaptive_avg_pool2d(maps, grid)[:, 0].numpy(), None
    scores, sources = found
    if train_categories is None:
        return scores, None
    per_image = scores.shape[1] * scores.shape[2]
    return scores, train_categories[sources // per_image] != category


def _anomalous_cells(masks: np.ndarray | None, n: int, grid: int, area: float) -> np.ndarray:
    if masks is None:
        return np.zeros((n, grid, grid), bool)
    cover = F.adaptive_avg_pool2d(torch.from_numpy(masks).float()[:, None], grid)[:, 0].numpy()
    return cover >= area


def _score_rows(detector, rows: pd.DataFrame, train_categories, category: str, grid: int, area: float,
                with_patches: bool = True) -> tuple[SplitScores, np.ndarray | None, np.ndarray | None]:
    """Scores of ``rows``; with their masks and maps for pixel metrics."""
    feats = detector.features(list(rows["image_path"]))
    prediction = detector.predict_features(feats)
    labels = rows["label"].to_numpy()
    masks = experiments.masks_for(rows, prediction.anomaly_maps.shape[-1]) if labels.any() else None
    patches = cross = anomalous = None
    if with_patches:
        patches, cross = _patch_grid(detector, feats, prediction, train_categories, category, grid)
        anomalous = _anomalous_cells(masks, len(rows), patches.shape[-1], area)
    scored = SplitScores(rows["image"].to_numpy(), labels, rows["defect_type"].to_numpy(),
                         prediction.image_scores.astype(np.float64), patches, anomalous, cross)
    return scored, masks, prediction.anomaly_maps


def _aupro(masks: np.ndarray | None, maps: np.ndarray, keep: np.ndarray | None = None) -> float | None:
    if masks is None:
        return None
    if keep is not None:
        masks, maps = masks[keep], maps[keep]
    return float(metrics.aupro(masks, maps)) if masks.any() else None


@torch.no_grad()
def _covariance_summary(detector) -> tuple[np.ndarray, np.ndarray] | None:
    found = detector.gaussian()
    if found is None:
        return None
    covariance = found[1]
    trace = torch.diagonal(covariance, dim1=-2, dim2=-1).sum(-1)
    return trace.cpu().numpy(), torch.linalg.slogdet(covariance).logabsdet.cpu().numpy()


def _join_scores(parts: Sequence[tuple[SplitScores, np.ndarray | None, np.ndarray]]
                 ) -> tuple[SplitScores, np.ndarray | None, np.ndarray]:
    """Scores, masks and maps of several row sets as one (masks of normal-only parts are empty)."""
    scored = _concat([p[0] for p in parts])
    maps = np.concatenate([p[2] for p in parts])
    if all(p[1] is None for p in parts):
        return scored, None, maps
    masks = np.concatenate([np.zeros(p[2].shape, bool) if p[1] is None else p[1] for p in parts])
    return scored, masks, maps


def _model_job(config: DetectorConfig, run: Run, draw: int, categories: tuple[str, ...],
               control_sources: dict[str, tuple[str, ...]], control_aupro: dict[str, list[tuple[str, ...]]],
               full: bool, first_seed: bool) -> ModelScores:
    """Fit (or load) the model of ``categories`` and score, for each of them, its calibration, validation, test
    and control images (the controls' anomalies made with ``control_sources[category]``); pixel AUPRO on the
    test split and, per control, on each source subset of ``control_aupro``. A model only the curve needs
    (``full`` False) skips every control but the whole-image one (the largest square) and pixel AUPRO; only a
    model of the first seed (``first_seed``) scores the validation split (oracle thresholds) and gives a
    Gaussian's covariance summary."""
    from data_prep import cross_category

    u = run.config.unified
    oracle, covariance = first_seed, first_seed and full
    manifest = run.manifest(draw)
    train = train_rows(run, categories, draw, manifest)
    detector = experiments.fit_cached(config, list(train["image_path"]))
    pooled = len(categories) > 1
    train_categories = train["category"].to_numpy() if pooled else None
    grid = config.image_size // PATCH_STRIDE
    wanted = controls(run) if full else dict([max(controls(run).items(), key=lambda item: item[1])])
    control_manifests = {name: cross_category.load_manifest(run.control_root(draw, patch))
                         for name, patch in wanted.items()}
    out: dict = {}
    for category in categories:
        for split in SPLITS if full and oracle else ("calib", "test"):
            rows = experiments.rows_of(run, draw, category, split, manifest=manifest)
            scored, masks, maps = _score_rows(detector, rows, train_categories, category, grid, u.patch_area,
                                              with_patches=split != "val")
            if split == "test" and full:
                scored.aupro[()] = _aupro(masks, maps)
            out[category, split] = scored
        goods = None  # the same normal images (byte-identical copies) in every control: scored once
        for name, patch in wanted.items():
            rows = control_rows(run, category, control_sources[category], patch, draw, control_manifests[name])
            normal = rows["label"].to_numpy() == 0
            if goods is None:
                goods = _score_rows(detector, rows[normal], train_categories, category, grid, u.patch_area)
            anomalies = _score_rows(detector, rows[~normal], train_categories, category, grid, u.patch_area)
            scored, masks, maps = _join_scores([goods, anomalies])
            for subset in control_aupro.get(category, []) if full else []:
                sources = {cross_category.source_of(d) for d in scored.defect_types} - {None}
                keep = None if sources <= set(subset) else np.isin(
                    scored.defect_types, ["good", *(cross_category.defect_name(s) for s in subset)])
                scored.aupro[tuple(sorted(subset))] = _aupro(masks, maps, keep)
            out[category, name] = scored
    result = ModelScores(config.method, config.seed, tuple(categories), out)
    sources = getattr(detector, "bank_sources", None)  # the memory bank's training-patch rows (PatchCore)
    if pooled and sources is not None:
        per_image = int(np.prod(out[categories[0], "calib"].patches.shape[1:]))  # the bank's grid
        bank = train["category"].to_numpy()[np.asarray(sources) // per_image]
        result.bank_patches = {c: int((bank == c).sum()) for c in categories}
        result.train_patches = {c: int((train["category"] == c).sum()) * per_image for c in categories}
    if covariance:
        result.covariance = _covariance_summary(detector)
    return result


def model_jobs(run: Run, draw: int | None = None) -> list[tuple]:
    """One job per distinct model (method, seed, training categories), pooled ones first (the longest). Pixel
    AUPRO on the controls, the oracle thresholds (the validation split) and a Gaussian's covariance summary come
    from the first model seed only (test-split AUPRO and every normal-only measure from every seed): the pixel
    sort costs as much as scoring the images, the float64 inversion of 1,600 covariances about a second per
    model, and the oracle is an extra."""
    cfg = run.config
    draw = first_draw(run) if draw is None else draw
    first_seed = int(cfg.model.seeds[0])
    wanted: dict[tuple, dict] = {}

    def need(method, seed, categories, pool: Pool):
        entry = wanted.setdefault(_key(method, seed, categories), {"sources": {}, "aupro": {}, "full": False})
        for category in categories:
            others = set(pool.categories) - {category}
            entry["sources"][category] = tuple(sorted(set(entry["sources"].get(category, ())) | others))
            if not pool.curve and int(seed) == first_seed:
                subsets = entry["aupro"].setdefault(category, [])
                if tuple(sorted(others)) not in subsets:
                    subsets.append(tuple(sorted(others)))
        entry["full"] |= not pool.curve

    for method in cfg.methods:
        for pool in pools(run):
            for seed in pool.seeds:
                need(method, seed, pool.categories, pool)
                for category in pool.categories:
                    need(method, seed, (category,), pool)
    jobs = []
    for (method, seed, categories), entry in wanted.items():
        config = registry.configured(cfg, method, seed)
        jobs.append((config, run, draw, categories, entry["sources"], entry["aupro"], entry["full"],
                     seed == first_seed))
    return sorted(jobs, key=lambda job: -len(job[3]))


def score_models(run: Run, progress: bool = True) -> dict[tuple, ModelScores]:
    """Build the control, fill the feature cache, then fit and score every model as parallel jobs; keyed by
    (method, seed, sorted training categories)."""
    from helpers.parallel import run_jobs

    draw = first_draw(run)
    ensure_control(run, draw)
    jobs = model_jobs(run, draw)
    image_sets = [list(train_rows(run, [c], draw)["image_path"]) for c in run.config.unified_categories]
    for category in run.config.unified_categories:
        image_sets += [list(experiments.rows_of(run, draw, category, split)["image_path"]) for split in SPLITS]
    for category in run.config.unified_categories:
        image_sets += [list(control_rows(run, category, run.config.unified_categories, patch, draw)["image_path"])
                       for patch in controls(run).values()]
    experiments.prefetch_features(run, image_sets, progress=progress)
    results = run_jobs(_model_job, jobs, run.config.execution, desc="unified models", progress=progress, memo=True)
    return {_key(r.method, r.seed, r.categories): r for r in results}


# --- judging scores: the four settings ------------------------------------------------------------------------


@dataclass
class View:
    """One category's scores as a setting judges them: image and patch scores after the setting's transform
    (identity, or standardisation with the category's calibration statistics) and its normal-only thresholds."""

    scores: dict  # split -> image scores
    patches: dict  # split -> patch scores
    threshold: float
    patch_threshold: float
    oracle: float  # F1-optimal on the labelled validation split: an oracle, reported as such


def _fit(policy: str, normal_scores: np.ndarray, q: float) -> float:
    values = np.asarray(normal_scores, dtype=np.float64).ravel()
    return thresholds.fit_threshold(policy, np.zeros(values.size, bool), values, q=q).value


def _oracle(labels: np.ndarray, scores: np.ndarray) -> float:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a validation split without anomalies falls back loudly
        return thresholds.fit_threshold("f1_optimal", labels, scores).value


def views(model: dict, normalise: bool, global_threshold: bool, policy: str, q: float) -> dict[str, View]:
    """``model``: category -> split -> SplitScores. Per category the judged scores and thresholds; one threshold
    over the pooled calibration scores of every category when ``global_threshold``."""
    out = {}
    for category, split_scores in model.items():
        calib = split_scores["calib"]
        shift, scale, patch_shift, patch_scale = 0.0, 1.0, 0.0, 1.0
        if normalise:
            shift, scale = calib.scores.mean(), max(calib.scores.std(ddof=1), 1e-12)
            patch_shift, patch_scale = calib.patches.mean(), max(calib.patches.std(ddof=1), 1e-12)
        scores = {s: (v.scores - shift) / scale for s, v in split_scores.items()}
        patches = {s: (v.patches - patch_shift) / patch_scale for s, v in split_scores.items() if v.patches is not None}
        oracle = _oracle(split_scores["val"].labels, scores["val"]) if "val" in split_scores else np.nan
        out[category] = View(scores, patches, _fit(policy, scores["calib"], q), _fit(policy, patches["calib"], q),
                             oracle)
    if global_threshold:
        threshold = _fit(policy, np.concatenate([v.scores["calib"] for v in out.values()]), q)
        patch_threshold = _fit(policy, np.concatenate([v.patches["calib"].ravel() for v in out.values()]), q)
        with_val = all("val" in m for m in model.values())
        oracle = _oracle(np.concatenate([m["val"].labels for m in model.values()]),
                         np.concatenate([v.scores["val"] for v in out.values()])) if with_val else np.nan
        for view in out.values():
            view.threshold, view.patch_threshold, view.oracle = threshold, patch_threshold, oracle
    return out


def setting_views(per: dict, pooled: dict, policy: str, q: float) -> dict[str, dict[str, View]]:
    return {"per_category": views(per, False, False, policy, q),
            "model_unified": views(pooled, False, False, policy, q),
            "absolute_unified_raw": views(pooled, False, True, policy, q),
            "absolute_unified_normalised": views(pooled, True, True, policy, q)}


def _share(flags: np.ndarray, among: np.ndarray) -> float:
    return float(flags[among].mean()) if among.any() else np.nan


def _rates(labels: np.ndarray, scores: np.ndarray, threshold: float, prefix: str = "") -> dict:
    if np.isnan(threshold):  # no threshold of this kind was fitted (the curve's models have no oracle)
        return {f"{prefix}{k}": np.nan for k in ("precision", "recall", "f1", "fpr")}
    rates = metrics.at_threshold(labels, scores, threshold)
    return {f"{prefix}{k}": rates[k] for k in ("precision", "recall", "f1", "fpr")}


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    return metrics.image_auroc(labels, scores) if 0 < labels.sum() < len(labels) else np.nan


def judge(split: SplitScores, view: View, data: str, per: SplitScores | None = None,
          per_view: View | None = None) -> dict:
    """Every measure of one category (or, concatenated, of several) under one setting; the explained-away
    shares need the per-category model's scores of the same images (``per``, ``per_view``)."""
    scores, patches = view.scores[data], view.patches[data]
    anomalous_images = split.labels == 1
    row = {"image_auroc": _auroc(split.labels, scores), "threshold": view.threshold,
           **_rates(split.labels, scores, view.threshold), "oracle_threshold": view.oracle,
           **_rates(split.labels, scores, view.oracle, "oracle_"), "patch_threshold": view.patch_threshold,
           "patch_flagged": _share(patches >= view.patch_threshold, split.anomalous),
           "explained_away": np.nan, "explained_away_image": np.nan, "cross_neighbour_share": np.nan,
           "cross_neighbour_share_normal": np.nan, "n_images": len(split.labels),
           "n_anomalous": int(anomalous_images.sum()), "n_anomalous_patches": int(split.anomalous.sum())}
    if per is None:
        return row
    if not np.array_equal(per.images, split.images):
        raise ValueError("the per-category and pooled models scored different images")
    missed = patches < view.patch_threshold
    per_flags = per_view.patches[data] >= per_view.patch_threshold
    if split.cross is not None:
        row["explained_away"] = _share(split.cross & missed, split.anomalous)
        row["cross_neighbour_share"] = _share(split.cross, split.anomalous)
        normal_patches = np.broadcast_to((split.labels == 0)[:, None, None], split.cross.shape)
        row["cross_neighbour_share_normal"] = _share(split.cross, normal_patches)
    else:
        row["explained_away"] = _share(per_flags & missed, split.anomalous)
    per_flagged = per_view.scores[data] >= per_view.threshold
    row["explained_away_image"] = _share(per_flagged & (scores < view.threshold), anomalous_images)
    return row


def _concat(splits_: Sequence[SplitScores]) -> SplitScores:
    cat = (lambda name: None if getattr(splits_[0], name) is None else
           np.concatenate([getattr(s, name) for s in splits_]))
    return SplitScores(cat("images"), cat("labels"), cat("defect_types"), cat("scores"), cat("patches"),
                       cat("anomalous"), cat("cross"))


def _concat_view(views_: Sequence[View], data: str) -> View:
    first = views_[0]
    return View({data: np.concatenate([v.scores[data] for v in views_])},
                {data: np.concatenate([v.patches[data] for v in views_])},
                first.threshold, first.patch_threshold, first.oracle)


def _pool_scores(results: dict, method: str, seed: int, pool: Pool) -> tuple[dict, dict]:
    """(per-category, pooled): category -> split -> SplitScores, with each category's control limited to the
    anomalies made from the pool's other categories."""
    from data_prep import cross_category

    pooled_model = results[_key(method, seed, pool.categories)]
    per, pooled = {}, {}
    for category in pool.categories:
        own = results[_key(method, seed, (category,))]
        allowed = ["good", *(cross_category.defect_name(c) for c in pool.categories if c != category)]
        per[category], pooled[category] = {}, {}
        for (owner, split), b in pooled_model.splits.items():
            if owner != category:
                continue
            a = own.splits[owner, split]
            if split not in SPLITS:  # a control
                a, b = a.subset(np.isin(a.defect_types, allowed)), b.subset(np.isin(b.defect_types, allowed))
            per[category][split], pooled[category][split] = a, b
    return per, pooled


def pool_tables(results: dict, method: str, seed: int, pool: Pool, policy: str, q: float
                ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """For one method, seed and pool: the metrics rows (setting x category x data), the FPR matrices
    (per-category and pooled model, raw and normalised scores) and the per-image scores."""
    from data_prep import cross_category

    per, pooled = _pool_scores(results, method, seed, pool)
    judged = setting_views(per, pooled, policy, q)
    labels = dict(method=method, set=pool.name, seed=int(seed))
    judged_on = [d for d in next(iter(pooled.values())) if d not in ("calib", "val")]  # test and the controls
    rows, score_rows = [], []
    for setting, by_category in judged.items():
        source = per if setting == "per_category" else pooled
        for data in judged_on:
            for category, view in by_category.items():
                split = source[category][data]
                other = None if setting == "per_category" else per[category][data]
                row = judge(split, view, data, other, None if other is None else judged["per_category"][category])
                subset = () if data == "test" else tuple(sorted(set(pool.categories) - {category}))
                row["pixel_aupro"] = split.aupro.get(subset)
                rows.append({**labels, "setting": setting, "data": data, "category": category, **row})
                score_rows.append(pd.DataFrame({
                    **labels, "setting": setting, "data": data, "category": category, "image": split.images,
                    "defect_type": split.defect_types, "label": split.labels, "score": view.scores[data]}))
            if setting in ABSOLUTE:
                cats = list(by_category)
                split = _concat([source[c][data] for c in cats])
                view = _concat_view([by_category[c] for c in cats], data)
                per_split = _concat([per[c][data] for c in cats])
                per_view = View({data: np.concatenate([judged["per_category"][c].scores[data] for c in cats])},
                                {data: np.concatenate([judged["per_category"][c].patches[data] for c in cats])},
                                np.nan, np.nan, np.nan)
                # Per-category thresholds differ by category: compare each image with its own one.
                per_view.threshold = np.concatenate([np.full(len(per[c][data].labels),
                                                             judged["per_category"][c].threshold) for c in cats])
                per_view.patch_threshold = np.concatenate(
                    [np.full(per[c][data].patches.shape, judged["per_category"][c].patch_threshold) for c in cats])
                row = judge(split, view, data, per_split, per_view)
                rows.append({**labels, "setting": setting, "data": data, "category": ALL, **row, "pixel_aupro": None})
    fpr = fpr_matrices(per, pooled, policy, q, data="test").assign(**labels)
    scores = pd.concat(score_rows, ignore_index=True)
    scores["source"] = [cross_category.source_of(d) or "" for d in scores["defect_type"]]
    return pd.DataFrame(rows), fpr, scores


def fpr_matrices(per: dict, pooled: dict, policy: str, q: float, data: str = "test") -> pd.DataFrame:
    """False-positive rate of category A's normal images judged with category B's normal-only threshold, for the
    per-category models (the control: A's normals scored by A's model against B's model's threshold) and for
    the pooled model, on raw and on per-category standardised scores; with exact binomial intervals."""
    rows = []
    for model_name, model in (("per_category", per), ("pooled", pooled)):
        for scale, normalise in (("raw", False), ("normalised", True)):
            judged = views(model, normalise, False, policy, q)
            for normal_of, view in judged.items():
                normal = view.scores[data][model[normal_of][data].labels == 0]
                for threshold_of, other in judged.items():
                    k = int((normal >= other.threshold).sum())
                    lo, hi = stats.clopper_pearson(k, len(normal)) if len(normal) else (np.nan, np.nan)
                    rows.append({"model": model_name, "scores": scale, "normal_of": normal_of,
                                 "threshold_of": threshold_of, "threshold": other.threshold,
                                 "fpr": k / len(normal) if len(normal) else np.nan, "fpr_lo": lo, "fpr_hi": hi,
                                 "n_normal": len(normal)})
    return pd.DataFrame(rows)


# --- the study's tables -------------------------------------------------------------------------------------------


def bank_composition(results: dict, method: str, pool: Pool, seed: int) -> pd.DataFrame:
    """A memory-bank method: each category's share of the pooled bank against its share of the training patches
    (empty for a method without a bank)."""
    model = results[_key(method, seed, pool.categories)]
    if model.bank_patches is None:
        return pd.DataFrame()
    n_bank, n_train = sum(model.bank_patches.values()), sum(model.train_patches.values())
    return pd.DataFrame([{"method": model.method, "set": pool.name, "seed": int(seed), "category": c,
                          "n_bank": model.bank_patches[c], "bank_share": model.bank_patches[c] / n_bank,
                          "n_train_patches": model.train_patches[c], "train_share": model.train_patches[c] / n_train}
                         for c in pool.categories])


def covariance_widening(results: dict, method: str, pool: Pool, seed: int) -> pd.DataFrame:
    """A Gaussian method: how much wider the pooled per-position Gaussian is than each category's own. trace_ratio
    is the mean over positions of tr(Σ_pooled) / tr(Σ_category), logdet_diff the mean difference of
    log-determinants (nats). Empty where the models carry no covariance summary (other methods, later seeds)."""
    pooled = results[_key(method, seed, pool.categories)].covariance
    if pooled is None:
        return pd.DataFrame()
    rows = []
    for category in pool.categories:
        trace, logdet = results[_key(method, seed, (category,))].covariance
        rows.append({"method": method, "set": pool.name, "seed": int(seed), "category": category,
                     "trace_ratio": float(np.mean(pooled[0] / trace)),
                     "logdet_diff": float(np.mean(pooled[1] - logdet))})
    return pd.DataFrame(rows)


def _group_intervals(group: pd.DataFrame, labels: dict, n_resamples: int, seed: int) -> list[dict]:
    per = group[group["setting"] == "per_category"]
    pooled = group[group["setting"] == "model_unified"]
    pairs = [("mean", per, pooled)] + [(c, per[per.category == c], pooled[pooled.category == c])
                                       for c in sorted(per["category"].unique())]
    rows = []
    for category, a, b in pairs:
        interval = stats.bootstrap_auroc(a, b, units=("category",), n_resamples=n_resamples, seed=seed)
        rows.append({**labels, "comparison": "per_category - model_unified", "category": category,
                     **interval.as_dict()})
    normalised = group[group["setting"] == "absolute_unified_normalised"]
    raw = group[group["setting"] == "absolute_unified_raw"]
    if len(normalised):
        # One unit: every category's images ranked together, as one global threshold sees them.
        def one_unit(df):
            return df.assign(unit=ALL, image=df["category"] + "/" + df["image"])

        interval = stats.bootstrap_auroc(one_unit(normalised), one_unit(raw), units=("unit",),
                                         n_resamples=n_resamples, seed=seed)
        rows.append({**labels, "comparison": "absolute_unified_normalised - absolute_unified_raw",
                     "category": ALL, **interval.as_dict()})
    return rows


def intervals(scores: pd.DataFrame, n_resamples: int = 1000, seed: int = 0, execution=None) -> pd.DataFrame:
    """Paired bootstrap intervals (over the images, the same draw for every model seed) of AUROC(per-category) -
    AUROC(pooled, model-unified) per method, set, data and category, and of their mean over the categories
    (``category`` = mean); and of AUROC(normalised) - AUROC(raw) of the absolute setting's one ranking of every
    category's images (``category`` = all). One parallel job per method, set and data with ``execution``."""
    from helpers.config import ExecutionConfig
    from helpers.parallel import run_jobs

    jobs = [(group, dict(method=method, set=set_name, data=data), n_resamples, seed)
            for (method, set_name, data), group in scores.groupby(["method", "set", "data"], sort=True)]
    results = run_jobs(_group_intervals, jobs, execution or ExecutionConfig(workers=1), desc="intervals",
                       progress=False)
    return pd.DataFrame([row for rows in results for row in rows])


def curve_table(metrics_table: pd.DataFrame, run: Run) -> pd.DataFrame:
    """The curve over the number of pooled categories (first model seed): per step and category, image AUROC of
    the per-category and the pooled model, and the pooled model's explained-away and cross-neighbour shares, on
    the test split and the whole-image control."""
    steps = {p.name: p for p in pools(run) if p.curve}
    sub = metrics_table[metrics_table["set"].isin(steps) & metrics_table["setting"].isin(["per_category",
                                                                                          "model_unified"])]
    if sub.empty:
        return pd.DataFrame()
    keys = ["method", "set", "seed", "data", "category"]
    per = sub[sub.setting == "per_category"].set_index(keys)
    pooled = sub[sub.setting == "model_unified"].set_index(keys)
    out = pd.DataFrame({"image_auroc_per_category": per["image_auroc"], "image_auroc_pooled": pooled["image_auroc"],
                        "explained_away": pooled["explained_away"],
                        "explained_away_image": pooled["explained_away_image"],
                        "cross_neighbour_share": pooled["cross_neighbour_share"]}).reset_index()
    out["auroc_change"] = out["image_auroc_pooled"] - out["image_auroc_per_category"]
    out["n_categories"] = [len(steps[s].categories) for s in out["set"]]
    out["pool"] = ["+".join(steps[s].categories) for s in out["set"]]
    # Only what every step scored: the test split and the whole-image control (model_jobs' partial scoring).
    every_step = out.groupby("data")["set"].nunique() == len(steps)
    out = out[out["data"].isin(every_step[every_step].index)]
    return out.drop(columns="set").reset_index(drop=True)


def score_distributions(scores: pd.DataFrame) -> pd.DataFrame:
    """Test image scores of the first set and model seed, per-category and pooled (``setting`` per_category and
    unified), in the long form plots.score_distributions draws."""
    first = scores[(scores["set"] == scores["set"].iloc[0]) & (scores["seed"] == scores["seed"].min())
                   & (scores["data"] == "test") & scores["setting"].isin(["per_category", "model_unified"])]
    return first.assign(setting=first["setting"].replace({"model_unified": "unified"}))[
        ["method", "category", "setting", "label", "score"]]


SUMMARY_METRICS = ("image_auroc", "pixel_aupro", "f1", "fpr", "oracle_f1", "patch_flagged", "explained_away",
                   "explained_away_image", "cross_neighbour_share", "cross_neighbour_share_normal")


def summary(metrics_table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over model seeds per method, set, setting, data and category."""
    named = metrics_table[~metrics_table["set"].str.startswith("curve_")]
    present = [m for m in SUMMARY_METRICS if named[m].notna().any()]
    keys = ["method", "set", "setting", "data", "category"]
    grouped = named.groupby(keys, sort=False)[present]
    out = grouped.mean().join(grouped.std(ddof=1).add_suffix("_sd")).reset_index()
    out["seeds"] = named.groupby(keys, sort=False).size().to_numpy()
    return out


def provenance(metrics_table: pd.DataFrame) -> pd.DataFrame:
    """PatchCore's pooled bank, model-unified setting, mean over seeds: where the nearest neighbours of normal
    and anomalous patches come from and how many anomalous patches and images are explained away."""
    sub = metrics_table[(metrics_table["setting"] == "model_unified") & metrics_table["cross_neighbour_share"].notna()
                        & ~metrics_table["set"].str.startswith("curve_")]
    if sub.empty:
        return pd.DataFrame()
    out = sub.groupby(["method", "set", "data", "category"], sort=False).agg(
        cross_share_normal=("cross_neighbour_share_normal", "mean"),
        cross_share_anomalous=("cross_neighbour_share", "mean"), explained_away=("explained_away", "mean"),
        explained_away_image=("explained_away_image", "mean"), n_anomalous_patches=("n_anomalous_patches", "mean"),
        seeds=("seed", "nunique")).reset_index()
    return out.dropna(subset=["cross_share_normal", "cross_share_anomalous", "explained_away"])


def run_study(run: Run, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Every table of the unified study: ``metrics`` (per method, set, setting, seed, data, category), ``fpr``,
    ``scores`` (per image), ``intervals``, ``bank``, ``covariance``, ``curve``, ``summary`` and ``provenance``."""
    cfg = run.config
    u = cfg.unified
    if not cfg.unified_sets:
        raise ValueError(f"the unified study has no set of two or more categories to pool (data.categories "
                         f"{list(cfg.data.categories)}): name one in unified.sets")
    results = score_models(run, progress=progress)
    rows, fprs, scores, banks, covariances = [], [], [], [], []
    for method in cfg.methods:
        for pool in pools(run):
            for seed in pool.seeds:
                table, fpr, image_scores = pool_tables(results, method, seed, pool, u.threshold, u.normal_quantile)
                rows.append(table)
                if not pool.curve:
                    fprs.append(fpr)
                    scores.append(image_scores)
                    covariances.append(covariance_widening(results, method, pool, seed))
                banks.append(bank_composition(results, method, pool, seed))
    metrics_table = pd.concat(rows, ignore_index=True)
    metrics_table["pixel_aupro"] = pd.to_numeric(metrics_table["pixel_aupro"])
    banks = [b for b in banks if len(b)]
    covariances = [c for c in covariances if len(c)]
    scores_table = pd.concat(scores, ignore_index=True)
    out = {"metrics": metrics_table[~metrics_table["set"].str.startswith("curve_")].reset_index(drop=True),
           "fpr": pd.concat(fprs, ignore_index=True), "scores": scores_table,
           "intervals": intervals(scores_table, u.n_resamples, execution=cfg.execution),
           "bank": pd.concat(banks, ignore_index=True) if banks else pd.DataFrame(),
           "covariance": pd.concat(covariances, ignore_index=True) if covariances else pd.DataFrame(),
           "curve": curve_table(metrics_table, run), "summary": summary(metrics_table),
           "provenance": provenance(metrics_table)}
    return out


# Table name under the run's results/ for each of run_study's tables.
TABLES = {"metrics": "unified_metrics", "fpr": "unified_fpr_matrix", "scores": "unified_scores",
          "intervals": "unified_intervals", "bank": "unified_bank", "covariance": "unified_covariance",
          "curve": "unified_curve", "summary": "unified_summary", "provenance": "unified_provenance"}


def write_tables(run: Run, tables: dict[str, pd.DataFrame]) -> list[Path]:
    """Each non-empty table to ``run.table(<name>)``."""
    from helpers.paths import write_csv

    return [write_csv(df, run.table(TABLES[name])) for name, df in tables.items() if len(df)]
