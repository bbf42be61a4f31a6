"""Shared fixtures: a tiny MVTec-layout dataset written by the test itself (no downloads, no repo data)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_tiny_mvtec(root: Path, categories=("alpha", "beta"), size: int = 64, n_train: int = 12,
                     n_good: int = 4, defects=("scratch", "hole"), n_defect: int = 3, seed: int = 0,
                     with_ground_truth: bool = True) -> Path:
    """Write a small dataset in MVTec layout: noisy textures per category, square defects with exact masks."""
    rng = np.random.default_rng(seed)
    for ci, cat in enumerate(categories):
        base_level = 80 + 60 * ci

        def normal_image(base_level=base_level):
            img = base_level + rng.normal(0, 12, (size, size, 3))
            return np.clip(img, 0, 255).astype(np.uint8)

        train = root / cat / "train" / "good"
        train.mkdir(parents=True)
        for i in range(n_train):
            Image.fromarray(normal_image()).save(train / f"{i:03d}.png")
        good = root / cat / "test" / "good"
        good.mkdir(parents=True)
        for i in range(n_good):
            Image.fromarray(normal_image()).save(good / f"{i:03d}.png")
        for di, defect in enumerate(defects):
            ddir = root / cat / "test" / defect
            ddir.mkdir(parents=True)
            gdir = root / cat / "ground_truth" / defect
            if with_ground_truth:
                gdir.mkdir(parents=True)
            for i in range(n_defect):
                img = normal_image()
                mask = np.zeros((size, size), np.uint8)
                s = size // 6 + di * 2
                y, x = rng.integers(0, size - s, 2)
                img[y:y + s, x:x + s] = 255 if di % 2 == 0 else 0
                mask[y:y + s, x:x + s] = 255
                Image.fromarray(img).save(ddir / f"{i:03d}.png")
                if with_ground_truth:
                    Image.fromarray(mask).save(gdir / f"{i:03d}_mask.png")
    return root


@pytest.fixture
def tiny_mvtec(tmp_path: Path) -> Path:
    """Two categories (alpha, beta), 64 px, 12 train, 4 good + 2x3 defective test images with masks."""
    return write_tiny_mvtec(tmp_path / "tiny")
