"""Check a dataset folder (MVTec AD or MVTec AD 2 layout) and list every problem with its path, before a long
run trips on one; the checks themselves live in :func:`helpers.data.check_category`, which the command-line
evaluation runs too.

Usage: ``python -m data_prep.validate --root DIR [--category C]``; exits 1 when the dataset has problems (the
report itself is the output), 2 when the check cannot run.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from helpers.data import Problem, check_category

__all__ = ["DatasetCheck", "Problem", "check", "format_modes", "main", "validate"]


@dataclass
class DatasetCheck:
    problems: list[Problem] = field(default_factory=list)
    n_categories: int = 0
    n_images: int = 0
    image_modes: Counter = field(default_factory=Counter)
    mask_modes: Counter = field(default_factory=Counter)


def validate(root: str | Path, categories: list[str] | None = None) -> list[Problem]:
    """Every problem in ``categories`` (default: every folder in ``root``), in a stable order."""
    return check(root, categories).problems


def check(root: str | Path, categories: list[str] | None = None) -> DatasetCheck:
    """Problems, counts and the Pillow modes of every decoded image and mask."""
    root = Path(root)
    result = DatasetCheck()
    if not root.is_dir():
        result.problems.append(Problem(root, "dataset root does not exist or is not a folder"))
        return result
    if categories is None:
        # Every folder, not just those with train/good, so that a category missing that folder is reported.
        categories = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not categories:
            result.problems.append(Problem(root, "holds no category folders"))
            return result
    for category in categories:
        found = check_category(root, category)
        result.problems += found.problems
        result.n_images += found.n_images
        result.image_modes += found.image_modes
        result.mask_modes += found.mask_modes
    result.n_categories = len(categories)
    return result


def format_modes(modes: Counter) -> str:
    """``RGB 300, I;16 4``: most frequent first, then by name."""
    return ", ".join(f"{mode} {n}" for mode, n in sorted(modes.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=Path, help="dataset folder in MVTec AD or MVTec AD 2 layout")
    parser.add_argument("--category", action="append", help="check only this category (repeatable; default: all)")
    args = parser.parse_args(argv)
    try:
        result = check(args.root, args.category)
    except OSError as exc:  # a folder that cannot be listed (permissions, a vanished mount)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in result.problems:
        print(problem)
    if result.image_modes:
        print(f"image modes: {format_modes(result.image_modes)}")
    if result.mask_modes:
        print(f"mask modes: {format_modes(result.mask_modes)}")
    if result.problems:
        print(f"{len(result.problems)} problem(s) in {result.n_categories} categories, {result.n_images} images")
        return 1
    print(f"ok: {result.n_categories} categories, {result.n_images} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
