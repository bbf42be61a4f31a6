"""Deterministic split manifest: train normals for fitting, a normal-only calibration set (held out of the train
normals, or MVTec AD 2's ``validation/good``), and the dataset's test set divided into ``val`` (thresholds) and
``test`` (reporting), stratified by defect type.

No threshold is ever fit on ``test``; every later notebook reads the manifest instead of listing folders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from helpers.data import MVTEC_AD2, Sample, layout_of, list_samples, require_both_classes

SPLITS = ("train", "calib", "val", "test")
COLUMNS = ["category", "split", "label", "defect_type", "image", "mask"]


def make_splits(root: str | Path, categories: Sequence[str], seed: int = 0, val_fraction: float = 0.5,
                calib_fraction: float = 0.1, calib_size: int | None = None) -> pd.DataFrame:
    """One row per image; ``image``/``mask`` are relative to ``root`` so a shifted copy reuses the manifest.

    ``calib`` holds ``calib_size`` normals per category when given, else ``calib_fraction`` of them: carved from
    the training normals (MVTec AD), or drawn from MVTec AD 2's own ``validation/good`` (all of it by default; a
    ``calib_size`` draws that many and leaves the rest of that folder out of the manifest, never in ``train``).
    A category whose test set lacks normals or anomalies raises a ``DatasetError`` naming it and its folder.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not 0 <= calib_fraction < 1:
        raise ValueError(f"calib_fraction must be in [0, 1), got {calib_fraction}")
    if calib_size is not None and (isinstance(calib_size, bool) or int(calib_size) != calib_size or calib_size < 0):
        raise ValueError(f"calib_size must be a non-negative integer or None, got {calib_size!r}")
    root = Path(root)
    rows = []
    for category in categories:
        samples = list_samples(root, category)
        require_both_classes(root, category, samples)
        # One generator per category, so adding a category never reshuffles another.
        rng = np.random.default_rng([seed, _stable_int(category)])
        train = [s for s in samples if s.split == "train"]
        shipped_calib = [s for s in samples if s.split == "calib"]
        if layout_of(root, category) == MVTEC_AD2:
            rows += [_row(root, s, "train") for s in train]
            n_calib = len(shipped_calib) if calib_size is None else int(calib_size)
            if n_calib > len(shipped_calib):
                raise ValueError(f"{category}: calib_size {calib_size} exceeds the {len(shipped_calib)} images of "
                                 f"its MVTec AD 2 validation/good folder")
            chosen = set(rng.permutation(len(shipped_calib))[:n_calib].tolist())
            rows += [_row(root, s, "calib") for i, s in enumerate(shipped_calib) if i in chosen]
        else:
            n_calib = int(round(calib_fraction * len(train))) if calib_size is None else int(calib_size)
            if n_calib >= len(train):
                given = f"calib_size {calib_size}" if calib_size is not None else f"calib_fraction {calib_fraction}"
                raise ValueError(f"{category}: {given} leaves no training image (it has {len(train)} normals)")
            calib_idx = set(rng.permutation(len(train))[:n_calib].tolist())
            for i, s in enumerate(train):
                rows.append(_row(root, s, "calib" if i in calib_idx else "train"))
        test = [s for s in samples if s.split == "test"]
        for defect in sorted({s.defect_type for s in test}):
            group = [s for s in test if s.defect_type == defect]
            order = rng.permutation(len(group))
            n_val = int(round(val_fraction * len(group)))
            if len(group) >= 2:
                n_val = min(max(n_val, 1), len(group) - 1)  # both sides see every defect type
            val_idx = set(order[:n_val].tolist())
            for i, s in enumerate(group):
                rows.append(_row(root, s, "val" if i in val_idx else "test"))
    return pd.DataFrame(rows, columns=COLUMNS)


def _stable_int(text: str) -> int:
    return int.from_bytes(text.encode()[:8].ljust(8, b"\0"), "little")


def _row(root: Path, s: Sample, split: str) -> dict:
    return {"category": s.category, "split": split, "label": s.label, "defect_type": s.defect_type,
            "image": s.image_path.relative_to(root).as_posix(),
            "mask": s.mask_path.relative_to(root).as_posix() if s.mask_path is not None else ""}


def save(manifest: pd.DataFrame, path: str | Path) -> Path:
    from helpers.paths import write_csv

    return write_csv(manifest, Path(path))


def load(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split manifest {path} does not exist: run notebooks/00_data.ipynb first")
    df = pd.read_csv(path, keep_default_na=False, dtype={"mask": str})
    missing = set(COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(f"split manifest {path} lacks columns {sorted(missing)}")
    return df


def select(manifest: pd.DataFrame, root: str | Path, category: str | Sequence[str], split: str,
           label_overrides: dict[str, int] | None = None) -> pd.DataFrame:
    """Rows of one split (one category or several) with absolute ``image_path``/``mask_path`` under ``root``.

    ``root`` may be a shifted copy: the same relative paths are read from it, and ``label_overrides``
    (sample key -> label) applies where a shift pushed a defect out of the frame.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cats = [category] if isinstance(category, str) else list(category)
    rows = manifest[(manifest["category"].isin(cats)) & (manifest["split"] == split)].copy()
    if rows.empty:
        raise ValueError(f"manifest has no {split!r} rows for {cats}")
    root = Path(root)
    rows["image_path"] = [root / p for p in rows["image"]]
    rows["mask_path"] = [root / p if p else None for p in rows["mask"]]
    if label_overrides:
        keys = rows["image"].tolist()
        rows["label"] = [label_overrides.get(k, lab) for k, lab in zip(keys, rows["label"])]
        rows.loc[rows["label"] == 0, "mask_path"] = None
    return rows.reset_index(drop=True)
