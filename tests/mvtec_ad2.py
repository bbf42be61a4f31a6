"""A tiny dataset in MVTec AD 2 layout, written by the test itself."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_tiny_mvtec_ad2(root: Path, objects=("can", "walnuts"), size: int = 64, n_train: int = 10, n_val: int = 6,
                         n_good: int = 4, n_bad: int = 6, seed: int = 0) -> Path:
    """``<object>/train/good``, ``validation/good``, ``test_public/{good,bad}`` with masks in
    ``test_public/ground_truth/bad/<stem>_mask.png``, and unlabelled ``test_private``/``test_private_mixed``."""
    rng = np.random.default_rng(seed)
    for index, name in enumerate(objects):
        level = 90 + 50 * index

        def normal(level: int = level) -> np.ndarray:
            return np.clip(level + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)

        def save_normals(folder: Path, count: int) -> None:
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(normal()).save(folder / f"{i:03d}_regular.png")

        obj = root / name
        save_normals(obj / "train" / "good", n_train)
        save_normals(obj / "validation" / "good", n_val)
        save_normals(obj / "test_public" / "good", n_good)
        bad, masks = obj / "test_public" / "bad", obj / "test_public" / "ground_truth" / "bad"
        bad.mkdir(parents=True)
        masks.mkdir(parents=True)
        for i in range(n_bad):
            image, mask = normal(), np.zeros((size, size), np.uint8)
            side = size // 5
            y, x = rng.integers(0, size - side, 2)
            image[y:y + side, x:x + side] = 250
            mask[y:y + side, x:x + side] = 255
            Image.fromarray(image).save(bad / f"{i:03d}_overexposed.png")
            Image.fromarray(mask).save(masks / f"{i:03d}_overexposed_mask.png")
        for hidden in ("test_private", "test_private_mixed"):
            save_normals(obj / hidden, 2)  # flat folders of unlabelled images: never read
    return root
