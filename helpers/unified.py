"""The unified setting: one model fitted on the pooled normals of every category, judged against per-category
models, with per-category thresholds (model-unified) or one global threshold (absolute-unified), and the
measurements behind the "identical shortcut" question (cross-category thresholds, nearest-neighbour
provenance for PatchCore, covariance widening for PaDiM).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from helpers import experiments, metrics, thresholds
from helpers.adaptation import score_set
from helpers.detector import Detector
from helpers.paths import Run
from helpers.registry import DetectorConfig
from helpers.thresholds import ScoreSet


def _fit_job(config: DetectorConfig, paths) -> None:
    experiments.fit_cached(config, paths)


def fit_models(config: DetectorConfig, run: Run, draw: int = 0) -> tuple[Detector, dict[str, Detector]]:
    """The pooled model and one model per category, all through the model cache (fitted as parallel jobs)."""
    from helpers.parallel import run_jobs

    categories = list(run.config.unified_categories)
    sets = [experiments.train_paths(run, draw, categories)] + [experiments.train_paths(run, draw, c) for c in categories]
    run_jobs(_fit_job, [(config, paths) for paths in sets], run.config.execution, desc=f"{config.method} unified fits")
    unified = experiments.fit_cached(config, sets[0])
    per_category = {c: experiments.fit_cached(config, paths) for c, paths in zip(categories, sets[1:])}
    return unified, per_category


def score_by_category(model_for, run: Run, split: str, draw: int = 0) -> dict[str, ScoreSet]:
    """``model_for(category)`` gives the model that scores that category's images."""
    return {c: score_set(model_for(c), experiments.rows_of(run, draw, c, split)) for c in run.config.unified_categories}


def _pool(sets: Sequence[ScoreSet]) -> ScoreSet:
    masks = None if any(s.masks is None for s in sets) else np.concatenate([s.masks for s in sets])
    maps = None if masks is None else np.concatenate([s.maps for s in sets])
    return ScoreSet(np.concatenate([s.labels for s in sets]), np.concatenate([s.scores for s in sets]), masks, maps)


def comparison_table(per_cat_val, per_cat_test, uni_val, uni_test, policy: str = "f1_optimal") -> pd.DataFrame:
    """Per category: threshold-free metrics and metrics at the threshold for the three settings."""
    global_threshold = thresholds.fit_threshold(policy, *_pool(list(uni_val.values()))[:2])
    rows = []
    for category in per_cat_test:
        settings = {
            "per_category": (per_cat_val[category], per_cat_test[category], None),
            "model_unified": (uni_val[category], uni_test[category], None),
            "absolute_unified": (uni_val[category], uni_test[category], global_threshold),
        }
        for setting, (val, test, fixed) in settings.items():
            threshold = fixed or thresholds.fit_threshold(policy, val.labels, val.scores)
            row = {"category": category, "setting": setting, "policy": policy, "threshold": threshold.value}
            row.update(metrics.evaluate(test.labels, test.scores, test.masks, test.maps))
            row.update({k: v for k, v in metrics.at_threshold(test.labels, test.scores, threshold.value).items()
                        if k in ("precision", "recall", "f1", "fpr")})
            rows.append(row)
    return pd.DataFrame(rows)


def fpr_matrix(uni_val: dict[str, ScoreSet], uni_test: dict[str, ScoreSet], policy: str = "f1_optimal") -> pd.DataFrame:
    """False-positive rate of category A's normal test images judged with category B's threshold (unified model)."""
    cat_thresholds = {c: thresholds.fit_threshold(policy, s.labels, s.scores).value for c, s in uni_val.items()}
    rows = []
    for normal_of, test in uni_test.items():
        normal_scores = test.scores[test.labels == 0]
        for threshold_of, value in cat_thresholds.items():
            rows.append({"normal_of": normal_of, "threshold_of": threshold_of, "threshold": value,
                         "fpr": float(np.mean(normal_scores >= value)), "n_normal": len(normal_scores)})
    return pd.DataFrame(rows)


def score_distributions(per_cat_test: dict[str, ScoreSet], uni_test: dict[str, ScoreSet]) -> pd.DataFrame:
    """Long table of image scores (category, setting, label, score) for overlaid distributions."""
    rows = []
    for setting, sets in (("per_category", per_cat_test), ("unified", uni_test)):
        for category, s in sets.items():
            rows += [{"category": category, "setting": setting, "label": int(lab), "score": float(sc)}
                     for lab, sc in zip(s.labels, s.scores)]
    return pd.DataFrame(rows)


@torch.no_grad()
def covariance_widening(unified, per_category: dict) -> pd.DataFrame:
    """PaDiM: how much wider the pooled per-position Gaussian is than each category's own.

    trace_ratio is the mean over positions of tr(Σ_pooled) / tr(Σ_category); logdet_diff the mean difference
    of log-determinants (nats). Both are computed from anomalib's stored inverse covariances.
    """
    def covariances(model):
        return model.gaussian()[1]

    pooled = covariances(unified)
    pooled_trace = torch.diagonal(pooled, dim1=-2, dim2=-1).sum(-1)
    pooled_logdet = torch.linalg.slogdet(pooled).logabsdet
    rows = []
    for category, model in per_category.items():
        own = covariances(model)
        own_trace = torch.diagonal(own, dim1=-2, dim2=-1).sum(-1)
        rows.append({"category": category, "trace_ratio": float((pooled_trace / own_trace).mean()),
                     "logdet_diff": float((pooled_logdet - torch.linalg.slogdet(own).logabsdet).mean())})
    return pd.DataFrame(rows)


def patchcore_provenance(pooled: Detector, run: Run, draw: int = 0, area: float = 0.5,
                         normal_quantile: float = 0.99) -> pd.DataFrame:
    """Where the nearest memory-bank patch of each test patch comes from, per category, for a pooled
    memory-bank model (any detector whose ``patch_neighbours`` answers).

    A test patch is anomalous when at least ``area`` of its feature-grid cell is ground truth; normal patches
    come from normal images. An anomalous patch is "explained away" when its neighbour is another category's
    patch and its score stays below the ``normal_quantile`` of the category's normal validation patch scores.
    """
    import torch.nn.functional as F

    categories = list(run.config.unified_categories)
    train = experiments.rows_of(run, draw, categories, "train")
    source_category = np.asarray(train["category"])

    def patches(rows):
        found = pooled.patch_neighbours(pooled.features(list(rows["image_path"])))
        if found is None:
            raise ValueError(f"{pooled.method} has no memory bank: patch provenance does not apply")
        return found

    out = []
    for category in categories:
        val = experiments.rows_of(run, draw, category, "val")
        val_scores, _ = patches(val[val.label == 0])
        normal_level = float(np.quantile(val_scores, normal_quantile))
        test = experiments.rows_of(run, draw, category, "test")
        scores, sources = patches(test)
        n, h, w = scores.shape
        scores, sources = scores.reshape(n, h * w), sources.reshape(n, h * w)
        neighbour_cat = source_category[sources // (h * w)]
        cross = neighbour_cat != category
        masks = experiments.masks_for(test, run.config.model.image_size)
        labels = test["label"].to_numpy()
        if masks is None:
            anomalous = np.zeros_like(cross)
        else:
            cover = F.adaptive_avg_pool2d(torch.from_numpy(masks).float()[:, None], (h, w)).view(len(test), -1).numpy()
            anomalous = cover >= area
        normal = (labels == 0)[:, None] & np.ones_like(cross)
        explained = anomalous & cross & (scores < normal_level)
        out.append({"category": category, "n_normal_patches": int(normal.sum()),
                    "n_anomalous_patches": int(anomalous.sum()),
                    "cross_share_normal": float(cross[normal].mean()) if normal.any() else np.nan,
                    "cross_share_anomalous": float(cross[anomalous].mean()) if anomalous.any() else np.nan,
                    "explained_away": float(explained.sum() / anomalous.sum()) if anomalous.any() else np.nan,
                    "normal_patch_q99": normal_level})
    return pd.DataFrame(out)
