"""Read any folder in MVTec AD layout into samples, and load its images (always RGB) and masks (always binary).

Layout: ``<root>/<category>/train/good/*.png``, ``test/<good|defect>/*.png`` and, optionally,
``ground_truth/<defect>/<stem>_mask.png``. A category without ``ground_truth`` is image-level only:
its samples carry ``mask_path=None`` and pixel metrics are skipped downstream.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset folder or file is not usable; the message names the path."""


@dataclass(frozen=True)
class Sample:
    category: str
    split: str  # folder split in the MVTec layout: "train" or "test"
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" or the defect folder name
    image_path: Path
    mask_path: Path | None  # None for normal images and for categories without ground truth

    @property
    def key(self) -> str:
        """Path relative to the dataset root: the identity of a sample across shifted copies."""
        return f"{self.category}/{self.split}/{self.defect_type}/{self.image_path.name}"


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def mask_path_for(root: Path, category: str, defect_type: str, image_path: Path) -> Path:
    return Path(root) / category / "ground_truth" / defect_type / f"{image_path.stem}_mask.png"


def list_categories(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    return sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())


def has_ground_truth(root: str | Path, category: str) -> bool:
    return (Path(root) / category / "ground_truth").is_dir()


def list_samples(root: str | Path, category: str) -> list[Sample]:
    """Every train and test sample of one category, in a stable order (split, defect type, file name)."""
    root = Path(root)
    cat_dir = root / category
    if not cat_dir.is_dir():
        raise DatasetError(f"category folder {cat_dir} does not exist")
    train_dir = cat_dir / "train" / "good"
    if not train_dir.is_dir():
        raise DatasetError(f"missing folder {train_dir} (normal training images)")
    test_dir = cat_dir / "test"
    if not test_dir.is_dir():
        raise DatasetError(f"missing folder {test_dir}")
    with_gt = has_ground_truth(root, category)
    samples = [Sample(category, "train", 0, "good", p, None) for p in _images_in(train_dir)]
    if not samples:
        raise DatasetError(f"{train_dir} holds no images: a detector needs normal training images")
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for img in _images_in(defect_dir):
            if defect == "good":
                samples.append(Sample(category, "test", 0, "good", img, None))
                continue
            mask = mask_path_for(root, category, defect, img) if with_gt else None
            if mask is not None and not mask.is_file():
                raise DatasetError(f"defect image {img} has no mask (expected {mask})")
            samples.append(Sample(category, "test", 1, defect, img, mask))
    return samples


def load_image(path: str | Path, size: int | None = None) -> np.ndarray:
    """Image as uint8 RGB ``(H, W, 3)``; grey, palette and RGBA files are converted. ``size`` resizes to a square."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as exc:
        raise DatasetError(f"image {path} cannot be read ({exc})") from None
    if size is not None and rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def load_mask(path: str | Path | None, shape: tuple[int, int] | None = None, size: int | None = None) -> np.ndarray:
    """Mask as bool ``(H, W)`` (any non-zero pixel is defect). ``None`` gives an all-normal mask of ``shape``.

    ``size`` resizes with nearest neighbour so the mask stays binary.
    """
    if path is None:
        if shape is None and size is None:
            raise ValueError("an absent mask needs a shape or a size")
        return np.zeros(shape if size is None else (size, size), dtype=bool)
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            grey = im.convert("L")
    except FileNotFoundError:
        raise DatasetError(f"mask {path} does not exist") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as exc:
        raise DatasetError(f"mask {path} cannot be read ({exc})") from None
    if size is not None and grey.size != (size, size):
        grey = grey.resize((size, size), Image.NEAREST)
    return np.asarray(grey) > 0


SHIFT_MANIFEST = "shift_manifest.csv"  # written by data_prep.shift into every shifted copy


def shift_labels(root: str | Path) -> dict[str, int]:
    """Sample key -> label after the shift, from a shifted copy's manifest; empty for a root without one.

    A shift can move a defect out of the frame; the copy's manifest records the label its mask leaves."""
    import pandas as pd

    path = Path(root) / SHIFT_MANIFEST
    if not path.is_file():
        return {}
    df = pd.read_csv(path, dtype={"image": str}, keep_default_na=False, usecols=["image", "label_after"])
    return dict(zip(df["image"], df["label_after"].astype(int)))
