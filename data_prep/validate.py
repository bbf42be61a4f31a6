"""Check a dataset folder in MVTec layout and list every problem with its path, before a long run trips on one.

Usage: ``python -m data_prep.validate --root DIR [--category C]``; exits 1 when anything is wrong.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from helpers.data import IMAGE_SUFFIXES, has_ground_truth, mask_path_for

MASK_SUFFIX = "_mask.png"


@dataclass(frozen=True)
class Problem:
    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def validate(root: str | Path, categories: list[str] | None = None) -> list[Problem]:
    """Every problem in ``categories`` (default: every folder in ``root``), in a stable order."""
    return _check_dataset(Path(root), categories)[0]


def _check_dataset(root: Path, categories: list[str] | None) -> tuple[list[Problem], int, int]:
    """Problems, number of categories checked and number of images decoded."""
    if not root.is_dir():
        return [Problem(root, "dataset root does not exist or is not a folder")], 0, 0
    if categories is None:
        # Every folder, not just those with train/good, so that a category missing that folder is reported.
        categories = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not categories:
            return [Problem(root, "holds no category folders")], 0, 0
    problems, n_images = [], 0
    for category in categories:
        category_problems, category_images = _check_category(root, category)
        problems += category_problems
        n_images += category_images
    return problems, len(categories), n_images


def _check_category(root: Path, category: str) -> tuple[list[Problem], int]:
    category_dir = root / category
    if not category_dir.is_dir():
        return [Problem(category_dir, "category folder does not exist")], 0
    problems: list[Problem] = []
    train_dir, test_dir = category_dir / "train" / "good", category_dir / "test"
    train_images = _images_in(train_dir)
    if not train_dir.is_dir():
        problems.append(Problem(train_dir, "missing folder (normal training images)"))
    elif not train_images:
        problems.append(Problem(train_dir, "holds no images: a detector needs normal training images"))
    test_images = {d.name: _images_in(d) for d in sorted(test_dir.iterdir()) if d.is_dir()} if test_dir.is_dir() else {}
    if not test_dir.is_dir():
        problems.append(Problem(test_dir, "missing folder"))
    elif not any(test_images.values()):
        problems.append(Problem(test_dir, "holds no images in its subfolders"))
    for image in train_images + [p for images in test_images.values() for p in images]:
        problems += _check_decodes(image, "image")
    if has_ground_truth(root, category):
        for defect, images in test_images.items():
            if defect != "good":
                for image in images:
                    problems += _check_mask(image, mask_path_for(root, category, defect, image))
        problems += _masks_without_image(category_dir, test_images)
    return problems, len(train_images) + sum(len(images) for images in test_images.values())


def _check_mask(image: Path, mask: Path) -> list[Problem]:
    if not mask.is_file():
        return [Problem(image, f"defect image has no mask (expected {mask})")]
    decode_problems = _check_decodes(mask, "mask")
    if decode_problems:
        return decode_problems
    with Image.open(mask) as im:
        mask_size, values = im.size, np.unique(np.asarray(im.convert("L")))
    problems = []
    try:
        with Image.open(image) as im:
            if im.size != mask_size:
                problems.append(Problem(mask, f"mask is {mask_size[0]}x{mask_size[1]} px but its image {image} is "
                                              f"{im.size[0]}x{im.size[1]}"))
    except (UnidentifiedImageError, OSError, SyntaxError):
        pass  # the image itself is already reported as unreadable
    if values.max() == 0:
        problems.append(Problem(mask, "mask is empty (all zero) for a defect image"))
    elif len(values[values > 0]) > 1:
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        problems.append(Problem(mask, f"mask is not binary: {len(values)} distinct values ({shown})"))
    return problems


def _masks_without_image(category_dir: Path, test_images: dict[str, list[Path]]) -> list[Problem]:
    problems = []
    for defect_dir in sorted(p for p in (category_dir / "ground_truth").iterdir() if p.is_dir()):
        stems = {p.stem for p in test_images.get(defect_dir.name, [])}
        for mask in _images_in(defect_dir):
            if not mask.name.endswith(MASK_SUFFIX):
                problems.append(Problem(mask, f"mask name does not end in {MASK_SUFFIX}, so no image can match it"))
            elif mask.name.removesuffix(MASK_SUFFIX) not in stems:
                expected = category_dir / "test" / defect_dir.name / mask.name.removesuffix(MASK_SUFFIX)
                problems.append(Problem(mask, f"mask has no image (expected {expected}.png or another image suffix)"))
    return problems


def _check_decodes(path: Path, kind: str) -> list[Problem]:
    """Decode every pixel: opening alone reads only the header and misses truncated files."""
    try:
        with Image.open(path) as im:
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return [Problem(path, f"{kind} cannot be decoded ({exc})")]
    return []


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=Path, help="dataset folder in MVTec layout")
    parser.add_argument("--category", action="append", help="check only this category (repeatable; default: all)")
    args = parser.parse_args(argv)
    problems, n_categories, n_images = _check_dataset(args.root, args.category)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {n_categories} categories, {n_images} images")
        return 1
    print(f"ok: {n_categories} categories, {n_images} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
