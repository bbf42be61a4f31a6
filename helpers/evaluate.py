"""Check a category, fit one detector on its ``train`` split and score its ``test`` split: metrics as one JSON line,
and appended as one row to a CSV table.

``python -m helpers.evaluate --root data/synthetic --category hazelnut --method patchcore --out results.csv``

The category is checked first with the notebooks' validation (:func:`helpers.data.check_category`): a mask of
another size than its image, a non-binary mask or a test set without both classes is refused before anything is
fitted, one line per problem on stderr and exit code 2, so pixel metrics only ever come from masks that passed.
Both MVTec AD and MVTec AD 2 folders work (the layout is told from the folders). The JSON keeps the timings in a
nested ``timing`` object, so everything else compares exactly between two identical runs; the CSV keeps them as
flat ``fit_s``/``predict_s`` columns (a tidy table, and the columns of tables written before stay the same).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from helpers import metrics, registry, splits
from helpers.backbones import REGISTRY, BackboneUnavailable
from helpers.config import ModelConfig
from helpers.data import DatasetError, Problem, check_category, has_ground_truth, list_categories, load_mask
from helpers.detector import Detector, Prediction

SCORES = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_aupro")
TIMINGS = ("fit_s", "predict_s")
METRICS = SCORES + TIMINGS  # the CSV's metric columns, in this order


def method_flags() -> dict[str, tuple[type, list[str]]]:
    """Every field of every registered method's settings, with its type and the methods that have it: the
    command line offers one flag per field (``--coreset-ratio``), so a new method brings its own flags."""
    import dataclasses
    import typing

    flags: dict[str, tuple[type, list[str]]] = {}
    for name in registry.names():
        settings = registry.get(name).settings
        hints = typing.get_type_hints(settings)
        for f in dataclasses.fields(settings):
            flags.setdefault(f.name, (hints[f.name], []))[1].append(name)
    return flags


def _flag_type(tp) -> tuple[type, str | None]:
    """(argparse type, nargs) for a settings annotation: scalars as they are, tuples as several values."""
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    inner = args[0]
    if typing.get_origin(inner) is tuple:
        return typing.get_args(inner)[0], "+"
    return inner, None


def evaluate_split(detector: Detector, manifest: pd.DataFrame, root: str | Path, category: str,
                   image_size: int) -> tuple[dict, Prediction, pd.DataFrame]:
    """Fit on the category's ``train`` rows, predict its ``test`` rows, and compute every metric.

    Returns the metrics (plus ``fit_s``/``predict_s``, which include the backbone only when the feature cache is
    cold), the prediction and the scored test rows. Pixel metrics are None when the category has no
    ``ground_truth`` folder; normal images count as all-normal masks.
    """
    train = splits.select(manifest, root, category, "train")
    test = splits.select(manifest, root, category, "test")
    start = time.perf_counter()
    detector.fit(list(train["image_path"]))
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    prediction = detector.predict(list(test["image_path"]))
    predict_s = time.perf_counter() - start
    masks = None
    if has_ground_truth(root, category):
        masks = np.stack([load_mask(p, size=image_size) for p in test["mask_path"]])
    result = metrics.evaluate(test["label"].to_numpy(), prediction.image_scores, masks,
                              prediction.anomaly_maps if masks is not None else None)
    result.update(fit_s=fit_s, predict_s=predict_s)
    return result, prediction, test


class TableMismatch(ValueError):
    """The CSV table exists with other columns."""


def check_header(path: str | Path, header: list[str]) -> str:
    """The table's current text ('' when absent); a ValueError when its columns are not ``header``."""
    path = Path(path)
    existing = path.read_text() if path.is_file() else ""
    if existing:
        found = next(csv.reader([existing.splitlines()[0]]))
        if found != header:
            raise TableMismatch(f"{path} has columns {found}, this row has {header}: write to another file")
    return existing if not existing or existing.endswith("\n") else existing + "\n"


def append_row(row: dict, path: str | Path) -> Path:
    """Append ``row`` to a CSV table (header written once), through a temporary file and a rename."""
    path = Path(path)
    existing = check_header(path, list(row))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if not existing:
        writer.writerow(list(row))
    writer.writerow(["" if v is None else v for v in row.values()])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(existing + buffer.getvalue())
    tmp.replace(path)
    return path


class CategoryRefused(DatasetError):
    """The category failed validation; ``problems`` holds one line each."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def check_dataset(root: Path, category: str) -> None:
    """Refuse a missing root or category, and any problem the notebooks' validation finds in the category."""
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    known = list_categories(root)
    if category not in known:
        raise DatasetError(f"category {category!r} is not in {root} (found: {', '.join(known) or 'none'})")
    problems = check_category(root, category).problems
    if problems:
        raise CategoryRefused(problems)


def detector_config(method: str, args: argparse.Namespace) -> registry.DetectorConfig:
    """The detector the flags ask for: the method's settings with the given flags that it takes, the rest
    at their defaults; flags of other methods are noted and ignored."""
    import dataclasses

    spec = registry.get(method)
    own = {}
    for name, (_, methods) in method_flags().items():
        value = getattr(args, name)
        if value is None:
            continue
        if method in methods:
            own[name] = tuple(value) if isinstance(value, list) else value
        else:
            print(f"note: --{name.replace('_', '-')} does not apply to {method}; ignored", file=sys.stderr)
    model = ModelConfig()
    return registry.DetectorConfig(method, dataclasses.replace(spec.settings(), **own),
                                   args.backbone or model.backbone, args.image_size or model.image_size,
                                   args.seed, "auto")


class BadArgument(ValueError):
    """A command-line value that cannot work (the detector refuses it, or --out is a folder)."""


def run(args: argparse.Namespace) -> tuple[dict, dict]:
    """The CSV row (identity, metrics with flat timings, settings) and the JSON record (timings nested)."""
    root = Path(args.root)
    check_dataset(root, args.category)
    try:
        detector = detector_config(args.method, args).build()
    except ValueError as exc:  # a flag value the detector refuses
        raise BadArgument(str(exc)) from None
    settings = {k: "+".join(v) if isinstance(v, list) else v for k, v in detector.settings().items()}
    if args.out and Path(args.out).is_dir():
        raise BadArgument(f"--out {args.out} is a folder; give the path of a CSV file")
    if args.out:  # fail before a long fit, not after it
        check_header(args.out, ["method", "category", *METRICS, *settings])
    manifest = splits.make_splits(root, [args.category], args.seed)
    result, _, _ = evaluate_split(detector, manifest, root, args.category, detector.image_size)
    identity = {"method": args.method, "category": args.category}
    row = {**identity, **{k: result[k] for k in METRICS}, **settings}
    record = {**identity, **{k: result[k] for k in SCORES}, **settings, "timing": {k: result[k] for k in TIMINGS}}
    return row, record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="dataset folder in MVTec AD or MVTec AD 2 layout")
    parser.add_argument("--category", required=True)
    parser.add_argument("--method", required=True, choices=registry.names())
    parser.add_argument("--backbone", choices=list(REGISTRY), help=f"default {ModelConfig().backbone}")
    parser.add_argument("--image-size", type=int, help=f"default {ModelConfig().image_size}")
    for name, (tp, methods) in method_flags().items():
        kind, nargs = _flag_type(tp)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, nargs=nargs,
                            help=f"{', '.join(methods)} only" if len(methods) < len(registry.names()) else None)
    parser.add_argument("--seed", type=int, default=0, help="split manifest and detector seed")
    parser.add_argument("--out", help="CSV file to append the row to")
    args = parser.parse_args(argv)
    try:
        row, record = run(args)
    except CategoryRefused as exc:
        parser.exit(2, "".join(f"error: {problem}\n" for problem in exc.problems))
    except (DatasetError, BackboneUnavailable, BadArgument, TableMismatch) as exc:
        parser.exit(2, f"error: {exc}\n")
    if args.out:
        try:
            append_row(row, args.out)
        except OSError as exc:  # a folder in the way, no permission, disk full: the metrics still get printed
            print(f"error: cannot append to {args.out} ({exc}); the row is printed below", file=sys.stderr)
            print(json.dumps(record))
            return 2
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
