"""A run context over the tiny two-category dataset, with caches kept inside the test's folder."""
from pathlib import Path

from helpers import experiments, features, splits


def tiny_context(root: Path, tmp_path: Path, monkeypatch, image_size: int = 64) -> experiments.Context:
    monkeypatch.setattr(features, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(experiments, "CACHE", tmp_path / "cache")
    ctx = experiments.Context(dataset="synthetic", data_root=root, categories=["alpha", "beta"],
                              backbone="efficientnet_lite0", image_size=image_size, out_dir=tmp_path / "run",
                              figures_dir=tmp_path / "run" / "figures", shift_root=tmp_path / "shift", device="cpu")
    splits.save(splits.make_splits(root, ctx.categories, seed=0, calib_fraction=0.1), ctx.manifest_path)
    return ctx
