"""A run over the tiny two-category dataset, with its run folder and caches inside the test's folder."""
from pathlib import Path

import yaml

from helpers import experiments, features, parallel, splits
from helpers.config import deep_merge
from helpers.paths import Run


def tiny_run(root: Path, tmp_path: Path, monkeypatch, overrides: dict | None = None, image_size: int = 64,
             draws=(0,)) -> Run:
    """A run of a profile over ``root`` (a folder in MVTec layout, e.g. ``write_tiny_mvtec``): CPU, 64 px, one
    worker, its manifests written for every draw."""
    monkeypatch.setattr(features, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(experiments, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(parallel, "CACHE", tmp_path / "cache")
    raw = {"data": {"dataset": "folder", "root": str(root), "categories": ["alpha", "beta"], "draws": list(draws),
                    "calib_size": 2},
           "model": {"image_size": image_size, "seeds": [0, 1], "device": "cpu"},
           "methods": {"patchcore": {"coreset_ratio": 0.5, "k": 3}, "padim": {"n_features": 40}},
           "shift": {"root": str(tmp_path / "shift")},
           "sweep": {"second_backbone": None},
           "thresholds": {"budgets": [2], "adapt_budgets": [], "refit_budgets": []},  # 2 calib normals
           "execution": {"workers": 1},
           "output": {"runs_dir": str(tmp_path / "runs")}}
    profile = tmp_path / "tiny.yaml"
    profile.write_text(yaml.safe_dump(deep_merge(raw, overrides or {})))
    run = Run.open(profile)
    for draw in run.config.data.draws:
        manifest = splits.make_splits(run.data_root(draw), run.config.data.categories, seed=draw,
                                      calib_size=run.config.data.calib_size)
        splits.save(manifest, run.manifest_path(draw))
    return run
