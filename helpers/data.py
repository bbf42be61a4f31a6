"""Read a category folder in MVTec AD or MVTec AD 2 layout into samples, load its images (always 8-bit RGB,
scaled from any bit depth) and masks (always binary), and check a category before a long run trips on it.

MVTec AD: ``<category>/train/good``, ``test/<good|defect>`` and, optionally, ``ground_truth/<defect>/<stem>_mask.png``.
MVTec AD 2: ``<object>/train/good``, ``validation/good`` (normal-only calibration), ``test_public/<good|bad>`` and
``test_public/ground_truth/bad/<stem>_mask.png``; ``test_private`` and ``test_private_mixed`` have no public
labels and are not read. A category without masks is image-level only: its samples carry ``mask_path=None``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = "_mask.png"
MVTEC_AD, MVTEC_AD2 = "mvtec_ad", "mvtec_ad2"
# The eight objects of MVTec AD 2; any folder name works as a category, these are listed for profiles and docs.
MVTEC_AD2_OBJECTS = ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts")

# Pillow's modes for 16-bit grey ("I" is what Pillow gives 16-bit PGM, and 16-bit PNG before Pillow 10.4-ish).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_READ_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError)


class DatasetError(ValueError):
    """A dataset folder or file is not usable; the message names the path."""


@dataclass(frozen=True)
class Layout:
    """Where one dataset layout keeps each part of a category, relative to the category folder."""

    name: str
    train: str  # normal training images
    calib: str | None  # normal-only calibration images shipped by the dataset (None: carved from train)
    test: str  # one subfolder per defect type plus "good"
    ground_truth: str  # one subfolder per defect type with <stem>_mask.png


LAYOUTS = {
    MVTEC_AD: Layout(MVTEC_AD, train="train/good", calib=None, test="test", ground_truth="ground_truth"),
    MVTEC_AD2: Layout(MVTEC_AD2, train="train/good", calib="validation/good", test="test_public",
                      ground_truth="test_public/ground_truth"),
}


@dataclass(frozen=True)
class Sample:
    category: str
    split: str  # "train" (fit), "calib" (MVTec AD 2's validation/good) or "test"
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" or the defect folder name ("bad" in MVTec AD 2)
    image_path: Path
    mask_path: Path | None  # None for normal images and for categories without ground truth

    @property
    def key(self) -> str:
        """Path relative to the dataset root: the identity of a sample across shifted copies."""
        folder, defect = self.image_path.parent.parent.name, self.image_path.parent.name
        return f"{self.category}/{folder}/{defect}/{self.image_path.name}"


def layout_of(root: str | Path, category: str) -> str:
    """``"mvtec_ad"`` or ``"mvtec_ad2"``, told from the category's folders (MVTec AD when neither is complete)."""
    return _layout(Path(root), category).name


def _layout(root: Path, category: str) -> Layout:
    category_dir = root / category
    has_ad, has_ad2 = (category_dir / "test").is_dir(), (category_dir / "test_public").is_dir()
    if has_ad and has_ad2:
        raise DatasetError(f"{category_dir} holds both test/ (MVTec AD) and test_public/ (MVTec AD 2), so its "
                           f"layout is ambiguous; keep one of them")
    if has_ad2 or (not has_ad and (category_dir / "validation").is_dir()):
        return LAYOUTS[MVTEC_AD2]
    return LAYOUTS[MVTEC_AD]


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _test_folders(category_dir: Path, layout: Layout) -> list[Path]:
    """The defect-type folders of the test split (MVTec AD 2 keeps its ground truth among them)."""
    test_dir = category_dir / layout.test
    if not test_dir.is_dir():
        return []
    ground_truth = category_dir / layout.ground_truth
    return sorted(p for p in test_dir.iterdir() if p.is_dir() and p != ground_truth and not p.name.startswith("."))


def mask_path_for(root: Path, category: str, defect_type: str, image_path: Path) -> Path:
    root = Path(root)
    folder = root / category / _layout(root, category).ground_truth / defect_type
    return folder / f"{Path(image_path).stem}{MASK_SUFFIX}"


def list_categories(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    return sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())


def has_ground_truth(root: str | Path, category: str) -> bool:
    root = Path(root)
    return (root / category / _layout(root, category).ground_truth).is_dir()


def list_samples(root: str | Path, category: str) -> list[Sample]:
    """Every train, calibration (MVTec AD 2 only) and test sample of one category, in a stable order."""
    root = Path(root)
    cat_dir = root / category
    if not cat_dir.is_dir():
        raise DatasetError(f"category folder {cat_dir} does not exist")
    layout = _layout(root, category)
    train_dir = cat_dir / layout.train
    if not train_dir.is_dir():
        raise DatasetError(f"missing folder {train_dir} (normal training images)")
    test_dir = cat_dir / layout.test
    if not test_dir.is_dir():
        raise DatasetError(f"missing folder {test_dir}")
    with_gt = has_ground_truth(root, category)
    samples = [Sample(category, "train", 0, "good", p, None) for p in _images_in(train_dir)]
    if not samples:
        raise DatasetError(f"{train_dir} holds no images: a detector needs normal training images")
    if layout.calib is not None:
        calib_dir = cat_dir / layout.calib
        if not calib_dir.is_dir():
            raise DatasetError(f"missing folder {calib_dir} (MVTec AD 2's normal validation images)")
        samples += [Sample(category, "calib", 0, "good", p, None) for p in _images_in(calib_dir)]
    for defect_dir in _test_folders(cat_dir, layout):
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


def require_both_classes(root: str | Path, category: str, samples: list[Sample]) -> None:
    """Raise when the test samples lack normals or anomalies: no image metric exists for one class."""
    problem = _test_classes_problem(Path(root), category, [s.label for s in samples if s.split == "test"])
    if problem is not None:
        raise DatasetError(str(problem))


def _test_classes_problem(root: Path, category: str, labels: list[int]) -> Problem | None:
    test_dir = root / category / _layout(root, category).test
    if not labels:
        return Problem(test_dir, f"category {category!r} has no test images; add normal images in good/ and "
                                 f"defect images in one folder per defect type")
    if 1 not in labels:
        return Problem(test_dir, f"test split of category {category!r} has no anomalous images (only good/): "
                                 f"image AUROC needs both classes; add defect images in {test_dir}/<defect type>/ "
                                 f"or leave this category out")
    if 0 not in labels:
        return Problem(test_dir / "good", f"test split of category {category!r} has no normal images: image "
                                          f"AUROC needs both classes; add defect-free test images in this folder "
                                          f"or leave this category out")
    return None


# --- images and masks -------------------------------------------------------------------------------------------

def _open(path: Path, kind: str) -> Image.Image:
    """The decoded image (every pixel read: opening alone reads only the header and misses truncated files)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()  # closing the file frees the decoded pixels of the original
    except FileNotFoundError:
        raise DatasetError(f"{kind} {path} does not exist") from None
    except _READ_ERRORS as exc:
        raise DatasetError(f"{kind} {path} cannot be decoded ({exc})") from None


def _to_uint8_rgb(im: Image.Image, path: Path) -> np.ndarray:
    """8-bit RGB by scaling each mode's full range onto 0..255, never by clipping.

    16-bit values keep their high byte (``v >> 8``), as Pillow itself does for 48-bit RGB, 64-bit RGBA and 16-bit
    grey+alpha PNGs, so every 16-bit source follows one rule. Float images must lie in [0, 1].
    """
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(im)
        if mode == "I":
            low, high = int(values.min()), int(values.max())
            if low < 0 or high > 65535:
                raise DatasetError(f"image {path} is a 32-bit integer image with values {low}..{high}: there is no "
                                   f"agreed scale to 8 bit; save it as an 8- or 16-bit image")
        grey = (values.astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        values = np.asarray(im)
        finite = values[np.isfinite(values)]
        if finite.size < values.size or values.min() < 0 or values.max() > 1:
            found = f"{finite.min():g}..{finite.max():g}" if finite.size else "none finite"
            nan = " and NaN or infinity" if finite.size < values.size else ""
            raise DatasetError(f"image {path} is a float image with values {found}{nan}: only [0, 1] has a known "
                               f"scale; save it as an 8- or 16-bit image")
        grey = np.rint(values * 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    try:
        # 1-bit, grey, palette, grey+alpha, RGBA (alpha dropped), CMYK and YCbCr: Pillow's 8-bit conversions.
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except ValueError as exc:
        raise DatasetError(f"image {path} has mode {mode!r}, which cannot be converted to RGB ({exc}); "
                           f"save it as grey or RGB") from None


def _mask_values(im: Image.Image) -> np.ndarray:
    """The mask's values at their own bit depth, one channel (the brightest colour channel for colour masks)."""
    if im.mode in _SIXTEEN_BIT_MODES or im.mode in ("I", "F", "L"):
        return np.asarray(im)
    if im.mode == "1":
        return np.asarray(im).astype(np.uint8)
    return np.asarray(im.convert("RGB")).max(axis=2)


def read_image(path: str | Path) -> tuple[str, np.ndarray]:
    """The file's Pillow mode and its pixels as uint8 RGB ``(H, W, 3)``; a ``DatasetError`` names the file."""
    path = Path(path)
    im = _open(path, "image")
    return im.mode, _to_uint8_rgb(im, path)


def load_image(path: str | Path, size: int | None = None) -> np.ndarray:
    """Image as uint8 RGB ``(H, W, 3)`` from any grey, colour, palette or alpha mode at 1, 8 or 16 bits (scaled,
    see :func:`_to_uint8_rgb`). ``size`` resizes to a square."""
    rgb = read_image(path)[1]
    if size is not None and rgb.shape[:2] != (size, size):
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
    return rgb


def load_mask(path: str | Path | None, shape: tuple[int, int] | None = None, size: int | None = None) -> np.ndarray:
    """Mask as bool ``(H, W)``: any non-zero value, at the file's own bit depth, is defect. ``None`` gives an
    all-normal mask of ``shape``. ``size`` resizes with nearest neighbour so the mask stays binary.
    """
    if path is None:
        if shape is None and size is None:
            raise ValueError("an absent mask needs a shape or a size")
        return np.zeros(shape if size is None else (size, size), dtype=bool)
    mask = _mask_values(_open(Path(path), "mask")) > 0
    if size is not None and mask.shape != (size, size):
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
        mask = np.asarray(resized) > 0
    return mask


# --- checks -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    path: Path
    message: str  # what is wrong, then what to do

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class CategoryCheck:
    """What checking one category found: its problems, and what it decoded."""

    problems: list[Problem] = field(default_factory=list)
    n_images: int = 0
    image_modes: Counter = field(default_factory=Counter)
    mask_modes: Counter = field(default_factory=Counter)


def check_category(root: str | Path, category: str) -> CategoryCheck:
    """Every problem of one category (either layout), decoding every image and mask with the readers above, so a
    category that passes loads without error and scores both classes; pixel metrics may trust its masks."""
    root = Path(root)
    result = CategoryCheck()
    category_dir = root / category
    if not category_dir.is_dir():
        result.problems.append(Problem(category_dir, "category folder does not exist"))
        return result
    try:
        layout = _layout(root, category)
    except DatasetError as exc:
        result.problems.append(Problem(category_dir, str(exc).removeprefix(f"{category_dir} ")))
        return result
    problems = result.problems
    train_dir, test_dir = category_dir / layout.train, category_dir / layout.test
    train_images = _images_in(train_dir)
    if not train_dir.is_dir():
        problems.append(Problem(train_dir, "missing folder (normal training images)"))
    elif not train_images:
        problems.append(Problem(train_dir, "holds no images: a detector needs normal training images"))
    calib_images = []
    if layout.calib is not None:
        calib_dir = category_dir / layout.calib
        calib_images = _images_in(calib_dir)
        if not calib_dir.is_dir():
            problems.append(Problem(calib_dir, "missing folder (MVTec AD 2's normal validation images, used for "
                                               "calibration)"))
    test_images = {d.name: _images_in(d) for d in _test_folders(category_dir, layout)}
    if not test_dir.is_dir():
        problems.append(Problem(test_dir, "missing folder"))
    elif not any(test_images.values()):
        problems.append(Problem(test_dir, "holds no images in its subfolders"))
    else:
        labels = [int(defect != "good") for defect, images in test_images.items() for _ in images]
        classes_problem = _test_classes_problem(root, category, labels)
        if classes_problem is not None:
            problems.append(classes_problem)
    sizes: dict[Path, tuple[int, int]] = {}
    for image in train_images + calib_images + [p for images in test_images.values() for p in images]:
        try:
            im = _open(image, "image")
            _to_uint8_rgb(im, image)
        except DatasetError as exc:
            problems.append(Problem(image, _without_path(exc, image)))
            continue
        sizes[image] = im.size
        result.image_modes[im.mode] += 1
    result.n_images = len(train_images) + len(calib_images) + sum(len(images) for images in test_images.values())
    if has_ground_truth(root, category):
        for defect, images in test_images.items():
            if defect != "good":
                for image in images:
                    problems += _check_mask(image, mask_path_for(root, category, defect, image), sizes.get(image),
                                            result.mask_modes)
        problems += _masks_without_image(category_dir, layout, test_images)
    return result


def _without_path(exc: DatasetError, path: Path) -> str:
    """A reader's message, reworded to follow ``<path>: ``."""
    text = str(exc)
    for kind in ("image", "mask"):
        text = text.replace(f"{kind} {path} ", f"{kind} ", 1)
    return text


def _check_mask(image: Path, mask: Path, image_size: tuple[int, int] | None, modes: Counter) -> list[Problem]:
    if not mask.is_file():
        return [Problem(image, f"defect image has no mask (expected {mask}); add the mask or remove the image")]
    try:
        im = _open(mask, "mask")
    except DatasetError as exc:
        return [Problem(mask, _without_path(exc, mask))]
    modes[im.mode] += 1
    problems = []
    if image_size is not None and im.size != image_size:
        problems.append(Problem(mask, f"mask is {im.size[0]}x{im.size[1]} px but its image {image} is "
                                      f"{image_size[0]}x{image_size[1]}; save the mask at the image's size"))
    values = np.unique(_mask_values(im))
    if values.max() == 0:
        problems.append(Problem(mask, "mask is empty (all zero) for a defect image; mark the defect in it or move "
                                      "the image to good/"))
    elif len(values[values > 0]) > 1:
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
        problems.append(Problem(mask, f"mask is not binary: {len(values)} distinct values ({shown}); save it with "
                                      f"0 for normal and one value (255) for defect"))
    return problems


def _masks_without_image(category_dir: Path, layout: Layout, test_images: dict[str, list[Path]]) -> list[Problem]:
    problems = []
    for defect_dir in sorted(p for p in (category_dir / layout.ground_truth).iterdir() if p.is_dir()):
        stems = {p.stem for p in test_images.get(defect_dir.name, [])}
        for mask in _images_in(defect_dir):
            if not mask.name.endswith(MASK_SUFFIX):
                problems.append(Problem(mask, f"mask name does not end in {MASK_SUFFIX}, so no image can match it"))
            elif mask.name.removesuffix(MASK_SUFFIX) not in stems:
                expected = category_dir / layout.test / defect_dir.name / mask.name.removesuffix(MASK_SUFFIX)
                problems.append(Problem(mask, f"mask has no image (expected {expected}.png or another image suffix)"))
    return problems


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
