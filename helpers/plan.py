"""What a profile implies before anything runs: the batches of jobs each notebook hands to ``helpers.parallel``
(how many jobs, images and fits), and how long they should take here and on N workers, from the per-batch
timings an earlier run recorded (``parallel.record_batch``). ``python -m helpers.study --profile NAME --plan``.

The counts follow the code that builds the jobs (``experiments``, ``adaptation``, ``data_prep.prepare``) for a
fresh run, one with no data, shifted copies or caches yet. Times come from a recorded run of the same profile,
else of ``default``, scaled batch by batch by a cost in units of work (:data:`SCALING` says which); of the time a
notebook spends outside its batches, what every notebook spends (kernel start, imports) is kept and the rest scales
as its batches do. Jobs of a much smaller run are mostly fixed costs, which this proportional model scales too: the
report says when the plan is far larger than the run it scales.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

from helpers.paths import Run, resolve
from helpers.study import JOB_TIMES, step_summaries

GB = 1e9
PIXEL_OPS = 1_000  # assumed work per anomaly-map pixel (upsampling, smoothing, the metrics' sorts), in multiply-adds
REFERENCE_SIZE = 224  # backbones are timed at this input size; other sizes scale with the number of pixels

SCALING = {
    "generate": "images x image side^2 (rendering and PNG writing grow with the pixels)",
    "shift": "images x image side^2",
    "features": "images not yet in the feature cache x the backbone's seconds per image at the input size "
                "(timed here, one thread, at 224 px, scaled by pixels)",
    "fit": "PatchCore: N·P·D + coreset centres·N·P·projection; PaDiM: N·P·d^2 + P·d^3 (N images, P patches, "
           "D channels, d kept features)",
    "evaluate": "images scored x (PatchCore: P·bank·D, PaDiM: P·d^2) + 1,000 per map pixel",
    "matched": "fits and scored images, as fit and evaluate",
    "sweep": "fits not already made and scored images, as fit and evaluate",
    "thresholds": "source scores, and the adapted and refit models' cross-fitted fits and scores",
    "unified": "pooled and per-category fits and their scored images (calibration, validation, test, controls)",
    "intervals": "resamples x scored images",
}


# --- how many images -----------------------------------------------------------------------------------------

def split_counts(n_train_folder: int, test_per_type: dict[str, int], calib_size: int | None, val_fraction: float,
                 n_train_cap: int | None = None, calib_fraction: float = 0.1) -> dict[str, int]:
    """Images per manifest split of one category, by the arithmetic of ``splits.make_splits`` (MVTec AD layout)."""
    calib = int(round(calib_fraction * n_train_folder)) if calib_size is None else int(calib_size)
    train = n_train_folder - calib
    if n_train_cap:
        train = min(train, int(n_train_cap))
    val = val_good = 0
    for name, count in test_per_type.items():
        n_val = int(round(val_fraction * count))
        if count >= 2:
            n_val = min(max(n_val, 1), count - 1)
        val += n_val
        val_good += n_val if name == "good" else 0
    total = sum(test_per_type.values())
    return {"train": train, "calib": calib, "val": val, "test": total - val,
            "test_good": test_per_type.get("good", 0) - val_good, "generated": n_train_folder + total}


def _synthetic_shape(config, category: str) -> tuple[int, dict[str, int]]:
    from data_prep import synthetic

    s = config.data.synthetic
    if category in s.per_category:
        shape = s.per_category[category]
        return shape.n_train, dict(shape.test)
    defects = synthetic.defects_of(category)
    return s.n_train, {"good": s.n_test_good, **{d: s.n_per_defect for d in defects}}


def image_counts(run: Run, categories: Sequence[str] | None = None) -> tuple[dict[str, dict[str, int]], str]:
    """Images per category and manifest split of one data draw (every draw has as many), and where the numbers
    come from: the data on disk when it is there, else ``data.synthetic`` or MVTec AD's known counts."""
    from data_prep import synthetic
    from helpers import splits
    from helpers.data import DatasetError

    cfg = run.config
    data = cfg.data
    categories = list(categories or data.categories)
    root = run.data_root(data.draws[0])
    if all((root / c).is_dir() for c in categories):
        try:
            manifest = splits.make_splits(root, categories, seed=data.draws[0], val_fraction=data.val_fraction,
                                          calib_size=data.calib_size)
        except (DatasetError, ValueError):
            manifest = None
        if manifest is not None:
            out = {}
            for c in categories:
                rows = manifest[manifest["category"] == c]
                counts = {s: int((rows["split"] == s).sum()) for s in splits.SPLITS}
                if data.n_train:
                    counts["train"] = min(counts["train"], int(data.n_train))
                test_good = int(((rows["split"] == "test") & (rows["label"] == 0)).sum())
                out[c] = {**counts, "test_good": test_good, "generated": len(rows)}
            return out, f"the data in {root}"
    out = {}
    if data.dataset == "synthetic":
        for c in categories:
            n_train, test = _synthetic_shape(cfg, c)
            out[c] = split_counts(n_train, test, data.calib_size, data.val_fraction, data.n_train)
        return out, "data.synthetic (the data is not generated yet)"
    unknown = [c for c in categories if c not in synthetic.MVTEC_AD]
    if data.dataset == "mvtec" and not unknown:
        for c in categories:
            known = synthetic.MVTEC_AD[c]
            out[c] = split_counts(known["train"], known["test"], data.calib_size, data.val_fraction, data.n_train)
        return out, "the known MVTec AD counts (the data is not downloaded yet)"
    raise FileNotFoundError(f"cannot count the images of {', '.join(unknown or categories)}: {root} does not hold "
                            f"them yet and their counts are not known; place the data first")


def image_side(run: Run) -> int:
    """Side in pixels of the dataset's images (generated size, MVTec AD's 1024, or the first image found)."""
    cfg = run.config
    if cfg.data.dataset == "synthetic":
        return cfg.data.synthetic.size
    from data_prep import synthetic

    root = run.data_root(cfg.data.draws[0])
    for path in sorted((root / cfg.data.categories[0]).glob("train/*/*.png"))[:1]:
        from PIL import Image

        with Image.open(path) as im:
            return max(im.size)
    return synthetic.MVTEC_AD_SIZE


# --- what a detector costs -----------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def stage_channels(backbone: str) -> dict[str, int]:
    """Channels of each registered stage, read from the architecture on the meta device (no weights, no compute)."""
    import torch

    from helpers import backbones

    s = backbones.spec(backbone)
    with torch.device("meta"):
        net = backbones.feature_net(s)
    return dict(zip(s.stages, net.feature_info.channels()))


def stages_of(detector) -> tuple[str, ...]:
    """The stages a configured detector reads, without building it (a build may need weights not here)."""
    stages = getattr(detector.settings, "stages", None)
    if stages:
        return tuple(stages)
    module = importlib.import_module(detector.spec.detector.__module__)
    return tuple(module.default_stages(detector.backbone))


@dataclass(frozen=True)
class Geometry:
    patches: int  # P: feature-grid cells per image
    channels: int  # D: embedding width

    @classmethod
    def of(cls, detector) -> "Geometry":
        return _geometry(detector)


@lru_cache(maxsize=256)
def _geometry(detector) -> Geometry:
    """P and D of a configured detector: the grid of its shallowest stage, the channels of all its stages."""
    from helpers import backbones

    strides = backbones.spec(detector.backbone).stages
    stages = stages_of(detector)
    side = math.ceil(detector.image_size / min(strides[s] for s in stages))
    return Geometry(side * side, sum(stage_channels(detector.backbone)[s] for s in stages))


def feature_bytes(backbone: str, image_size: int) -> int:
    """Bytes one image's cached features take: every patch stage (stride <= 16) in float32."""
    from helpers import backbones

    spec = backbones.spec(backbone)
    channels = stage_channels(backbone)
    return sum(4 * channels[s] * math.ceil(image_size / spec.stages[s]) ** 2 for s in spec.patch_stages)


@dataclass(frozen=True)
class MethodCost:
    """Work (about multiply-adds) of fitting on N images, of scoring n images with a model fitted on N, and bytes of
    the largest arrays a fit holds and of the fitted model."""

    fit: Callable
    score: Callable
    fit_bytes: Callable
    model_bytes: Callable


def _pixels(detector, n: int) -> float:
    return n * PIXEL_OPS * detector.image_size ** 2


def _bank(detector, n_train: int) -> int:
    return max(1, int(detector.settings.coreset_ratio * n_train * Geometry.of(detector).patches))


def _patchcore_fit(detector, n: int) -> float:
    g, s = Geometry.of(detector), detector.settings
    points = n * g.patches
    width = g.channels if s.target_dim is None else s.target_dim
    projected = min(s.projection_dim or width, width)
    centres = int(s.coreset_ratio * points) if s.coreset_ratio < 1 else 0
    return points * width + centres * points * projected


def _patchcore_score(detector, n: int, n_train: int) -> float:
    g, s = Geometry.of(detector), detector.settings
    width = g.channels if s.target_dim is None else s.target_dim
    return n * g.patches * _bank(detector, n_train) * width + _pixels(detector, n)


def _patchcore_fit_bytes(detector, n: int) -> float:
    g = Geometry.of(detector)
    return 4 * n * g.patches * (g.channels + (detector.settings.projection_dim or 0))


def _patchcore_model_bytes(detector, n: int) -> float:
    return 4 * _bank(detector, n) * Geometry.of(detector).channels


def _padim_fit(detector, n: int) -> float:
    g, d = Geometry.of(detector), detector.settings.n_features
    return n * g.patches * d * d + g.patches * d ** 3


def _padim_score(detector, n: int, n_train: int) -> float:
    g, d = Geometry.of(detector), detector.settings.n_features
    return n * g.patches * d * d + _pixels(detector, n)


def _padim_fit_bytes(detector, n: int) -> float:
    g, d = Geometry.of(detector), detector.settings.n_features
    return 4 * (n * g.patches * d + 2 * g.patches * d * d)


def _padim_model_bytes(detector, n: int) -> float:
    g, d = Geometry.of(detector), detector.settings.n_features
    return 4 * g.patches * (d * d + d)


def _linear_fit(detector, n: int) -> float:
    g = Geometry.of(detector)
    return n * g.patches * g.channels


def _linear_score(detector, n: int, n_train: int) -> float:
    g = Geometry.of(detector)
    return n * g.patches * g.channels + _pixels(detector, n)


def _linear_bytes(detector, n: int) -> float:
    g = Geometry.of(detector)
    return 4 * n * g.patches * g.channels


COSTS: dict[str, MethodCost] = {
    "patchcore": MethodCost(_patchcore_fit, _patchcore_score, _patchcore_fit_bytes, _patchcore_model_bytes),
    "padim": MethodCost(_padim_fit, _padim_score, _padim_fit_bytes, _padim_model_bytes),
}
LINEAR = MethodCost(_linear_fit, _linear_score, _linear_bytes, _linear_bytes)  # a method registered later


def cost(method: str) -> MethodCost:
    return COSTS.get(method, LINEAR)


@lru_cache(maxsize=8)
def backbone_seconds(backbone: str, measure: bool = True) -> float:
    """Seconds per image of a backbone at 224 px on one thread of this machine (random weights: the time does not
    depend on them). Without ``measure``, its GFLOPs stand in (units then differ, ratios do not much)."""
    import torch

    from helpers import backbones

    s = backbones.spec(backbone)
    if not measure:
        from torch.utils.flop_counter import FlopCounterMode

        with torch.device("meta"):
            net = backbones.feature_net(s)
            with FlopCounterMode(display=False) as counter:
                net(torch.empty(1, 3, REFERENCE_SIZE, REFERENCE_SIZE))
        return counter.get_total_flops() / GB
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            net = backbones.feature_net(s)
        net = net.eval().to(memory_format=torch.channels_last)
        batch = torch.randn(2, 3, REFERENCE_SIZE, REFERENCE_SIZE).contiguous(memory_format=torch.channels_last)
        best = math.inf
        with torch.no_grad():
            net(batch)
            for _ in range(2):
                start = time.perf_counter()
                net(batch)
                best = min(best, time.perf_counter() - start)
        return best / len(batch)
    finally:
        torch.set_num_threads(threads)


# --- the batches a profile implies ---------------------------------------------------------------------------

@dataclass
class Batch:
    """One ``run_jobs`` call the profile implies."""

    step: str  # the runner's step (notebook) name
    kind: str  # generate, shift, features, fit, evaluate, matched, sweep, thresholds, unified
    desc: str  # the call's desc, as the progress bar and the timings file show it
    function: str  # the job function, module-qualified
    method: str | None = None
    jobs: int = 0
    images: int = 0  # images written (generate, shift), newly featurised (features) or scored
    fits: int = 0  # models fitted
    work: float = 0.0  # units of SCALING[kind]
    longest: float = 0.0  # the largest job's work
    bytes_written: float = 0.0  # feature-cache bytes (features batches)
    models_written: float = 0.0  # model-cache bytes of the models it fits
    detail: str = ""  # shown beside desc, e.g. the backbone and input size of a features batch
    notes: list[str] = field(default_factory=list)

    def add(self, work: float) -> None:
        self.jobs += 1
        self.work += work
        self.longest = max(self.longest, work)


class _Features:
    """Which images already have features, per backbone and input size: a batch computes only the others."""

    def __init__(self, run: Run, counts: dict, measure: bool) -> None:
        self.run, self.counts, self.measure = run, counts, measure
        self.shared = run.config.data.dataset != "synthetic"  # every draw reads the same image files
        self.done: dict[tuple, int] = {}
        self.asked: set[tuple] = set()

    def new(self, backbone: str, size: int, draw: int, condition, category: str, split: str) -> int:
        """Images of one split that no earlier batch featurised."""
        if not self.shared:
            key = (backbone, size, draw, condition, category, split)
            if key in self.done:
                return 0
            self.done[key] = self.counts[category][split]
            return self.done[key]
        # Splits of different draws are different subsets of the same folder: count up to the folder's size.
        folder = "train" if split in ("train", "calib") else "test"
        pool = sum(self.counts[category][s] for s in (("train", "calib") if folder == "train" else ("val", "test")))
        key, asked = (backbone, size, condition, category, folder), (backbone, size, condition, category, split, draw)
        if asked in self.asked:
            return 0
        self.asked.add(asked)
        fresh = min(self.counts[category][split], pool - self.done.get(key, 0))
        self.done[key] = self.done.get(key, 0) + fresh
        return fresh

    def batch(self, step: str, backbone: str, size: int, sets: list[list[tuple]], only_new: bool = False) -> Batch:
        """One prefetch: one job per image set (a set is a list of (draw, condition, category, split)); with
        ``only_new``, only for a set holding images not featurised yet (the caller filtered the cached ones)."""
        unit = backbone_seconds(backbone, self.measure) * (size / REFERENCE_SIZE) ** 2
        b = Batch(step, "features", "features", "helpers.experiments._features_job")
        for parts in sets:
            fresh = sum(self.new(backbone, size, *part) for part in parts)
            if only_new and not fresh:
                continue
            b.add(fresh * unit)
            b.images += fresh
            b.bytes_written += fresh * feature_bytes(backbone, size)
        b.detail = f"{backbone}, {size} px"
        return b


class _Fits:
    """Models already fitted (the model cache): a later job that needs one loads it."""

    def __init__(self) -> None:
        self.done: set[tuple] = set()

    def new(self, detector, draw: int, category, n_train: int) -> bool:
        settings = dataclasses.asdict(detector.settings)
        for name in getattr(detector.spec.detector, "INFERENCE_SETTINGS", ()):
            settings.pop(name, None)
        key = (detector.method, json.dumps(settings, sort_keys=True, default=str), detector.backbone,
               detector.image_size, detector.seed, draw, str(category), n_train)
        if key in self.done:
            return False
        self.done.add(key)
        return True


def _sweep_overrides(run: Run, method: str) -> list[dict]:
    """``experiments.sweep_grid`` without building a detector (a build may need weights not on this machine)."""
    from helpers import backbones, registry

    cfg = run.config
    base = registry.configured(cfg, method)
    grid = base.spec.sweep_grid(base.settings, base.backbone, base.image_size)
    grid.update({k: list(v) for k, v in cfg.sweep.grids.get(method, {}).items()})
    current = {**dataclasses.asdict(base.settings), "backbone": base.backbone, "image_size": base.image_size,
               "seed": base.seed, "stages": list(stages_of(base))}
    current = {k: list(v) if isinstance(v, tuple) else v for k, v in current.items()}
    overrides = []
    for param, values in grid.items():
        for value in values:
            value = list(value) if isinstance(value, tuple) else value
            if current.get(param) != value and {param: value} not in overrides:
                overrides.append({param: value})
    second = cfg.sweep.second_backbone
    if second and second != cfg.model.backbone and backbones.is_available(second):
        overrides.append({"backbone": second, "stages": None})
    return overrides


def _score(detector, n: int, n_train: int) -> float:
    return cost(detector.method).score(detector, n, n_train)


def _fit(detector, n: int) -> float:
    return cost(detector.method).fit(detector, n)


def _model_bytes(detector, n: int) -> float:
    return cost(detector.method).model_bytes(detector, n)


def batches(run: Run, counts: dict | None = None, measure: bool = True) -> list[Batch]:
    """Every ``run_jobs`` call of a fresh run of the configuration, in the order the notebooks make them."""
    from helpers import experiments, registry
    from helpers.experiments import CLEAN
    from helpers.study import pipeline

    cfg = run.config
    counts = counts or image_counts(run)[0]
    side = image_side(run)
    cats = list(cfg.data.categories)
    draws = [int(d) for d in cfg.data.draws]
    seeds = [int(s) for s in cfg.model.seeds]
    feats, fits = _Features(run, counts, measure), _Fits()
    out: list[Batch] = []
    steps = {s.name: s for s in pipeline(cfg)}

    def test_images(c, parts=("test",)):
        return sum(counts[c][p] for p in parts)

    # 00_data: one generation job per draw and category
    if cfg.data.dataset == "synthetic":
        b = Batch("00_data", "generate", "generate data", "data_prep.prepare._generate_job")
        for draw in draws:
            for c in _draw_categories(run, draw):
                n = counts[c]["generated"] if c in counts else _extra_counts(run, c)["generated"]
                b.add(n * side ** 2)
                b.images += n
        out.append(b)
    # 01_shift: one job per shifted copy, holding the splits the later notebooks read
    b = Batch("01_shift", "shift", "shift conditions", "data_prep.prepare._shift_job")
    for _, parts in sorted(experiments.shift_needs(run).items()):
        n = sum(counts[c][p] for c in cats for p in parts)
        b.add(n * side ** 2)
        b.images += n
    out.append(b)
    # 02/03: one method notebook per method
    for step_name, step in steps.items():
        method = step.parameters.get("method")
        if method is None:
            continue
        base = registry.configured(cfg, method)
        conditions = {d: experiments.drop_conditions(run, d) for d in draws}
        sets = [[(d, CLEAN, c, "train")] for d in draws for c in cats]
        sets += [[(d, cond, c, "test")] for d in draws for c in cats for cond in conditions[d]]
        out.append(feats.batch(step_name, base.backbone, base.image_size, sets))
        fit = Batch(step_name, "fit", f"{method} fit", "helpers.experiments._fit_job", method)
        evaluate = Batch(step_name, "evaluate", f"{method} evaluate", "helpers.experiments._evaluate_job", method)
        for d in draws:
            for s in seeds:
                for c in cats:
                    detector = registry.configured(cfg, method, s)
                    n_train = counts[c]["train"]
                    fit.add(_fit(detector, n_train) if fits.new(detector, d, c, n_train) else 0.0)
                    fit.fits += 1
                    fit.models_written += _model_bytes(detector, n_train)
                    scored = test_images(c) * len(conditions[d])
                    evaluate.add(_score(detector, scored, n_train))
                    evaluate.images += scored
        out += [fit, evaluate]
        matched = _matched_stages(run)
        if "stages" in {f.name for f in dataclasses.fields(base.settings)} and stages_of(base) != matched:
            b = Batch(step_name, "matched", f"{method} matched", "helpers.experiments._evaluate_job", method)
            for d in draws:
                for s in seeds:
                    for c in cats:
                        detector = registry.configured(cfg, method, s).replace(stages=list(matched))
                        n_train = counts[c]["train"]
                        new = fits.new(detector, d, c, n_train)
                        b.add((_fit(detector, n_train) if new else 0.0) + _score(detector, test_images(c), n_train))
                        b.fits += int(new)
                        b.models_written += new * _model_bytes(detector, n_train)
                        b.images += test_images(c)
            out.append(b)
        # the sweep: first draw and seed, val and test splits of clean data and the sweep's shifts
        draw = draws[0]
        sweep_conditions = experiments.sweep_conditions(run)
        variants = [base.replace(**o) for o in _sweep_overrides(run, method)]
        for backbone, size in sorted({(v.backbone, v.image_size) for v in [base, *variants]}):
            sets = [[(draw, CLEAN, c, "train")] for c in cats]
            sets += [[(draw, cond, c, split)] for c in cats for split in ("val", "test") for cond in sweep_conditions]
            out.append(feats.batch(step_name, backbone, size, sets))
        b = Batch(step_name, "sweep", f"{method} sweep", "helpers.experiments._sweep_job", method)
        for detector in [base, *variants]:
            for c in cats:
                n_train = counts[c]["train"]
                new = fits.new(detector, draw, c, n_train)
                scored = test_images(c, ("val", "test")) * len(sweep_conditions)
                b.add((_fit(detector, n_train) if new else 0.0) + _score(detector, scored, n_train))
                b.fits += int(new)
                b.models_written += new * _model_bytes(detector, n_train)
                b.images += scored
        out.append(b)
    out += _threshold_batches(run, counts, feats, fits)
    out += _unified_batches(run, counts, feats)
    return out


def _matched_stages(run: Run) -> tuple[str, ...]:
    from helpers import registry

    cfg = run.config
    if cfg.sweep.matched_stages:
        return tuple(cfg.sweep.matched_stages)
    return stages_of(registry.configured(cfg, cfg.method_names[0]))


def _draw_categories(run: Run, draw: int) -> tuple[str, ...]:
    """The categories a draw generates; the rewritten unified study adds its own on the first draw."""
    from data_prep import prepare

    return tuple(prepare.draw_categories(run, draw))


def _extra_counts(run: Run, category: str) -> dict[str, int]:
    data = run.config.data
    n_train, test = _synthetic_shape(run.config, category)
    return split_counts(n_train, test, data.calib_size, data.val_fraction, data.n_train)


def _threshold_batches(run: Run, counts: dict, feats: _Features, fits: _Fits) -> list[Batch]:
    from helpers import adaptation, registry
    from helpers.experiments import CLEAN

    cfg = run.config
    step = "04_threshold_adaptation"
    plan = adaptation.Plan.of(cfg)
    draw = int(cfg.data.draws[0])
    cats = list(cfg.data.categories)
    conditions = adaptation.conditions_of(cfg)
    sets = []
    for c in cats:
        sets.append([(draw, CLEAN, c, "calib"), (draw, CLEAN, c, "test")])
        sets += [[(draw, cond, c, p) for p in ("calib", "val", "test")] for cond in conditions]
    out = [feats.batch(step, cfg.model.backbone, cfg.model.image_size, sets)]
    b = Batch(step, "thresholds", "threshold regimes", "helpers.adaptation._regime_job")
    seeds = list(cfg.model.seeds)
    model_budgets = sorted(set(plan.adapt_budgets) | set(plan.refit_budgets))
    for method in cfg.methods:
        for seed in seeds[:cfg.thresholds.refit_seeds]:
            if not model_budgets:
                break
            detector = registry.configured(cfg, method, seed)
            for c in cats:
                pool, n_test, n_train = counts[c]["calib"], counts[c]["test"], counts[c]["train"]
                for _ in conditions:
                    work = fitted = 0
                    for budget in [x for x in model_budgets if x <= pool]:
                        n_draws = len(adaptation.draws_for(budget, pool, plan.draws))
                        regimes = [r for r in ("adapted", "refit") if budget in plan.model_budgets(r)]
                        for regime in regimes:
                            held = budget / plan.folds
                            per_draw = (plan.folds * (_fit(detector, budget - held) + _score(detector, held, budget))
                                        + _fit(detector, budget)
                                        + _score(detector, n_test, budget + (n_train if regime == "adapted" else 0)))
                            work += n_draws * per_draw
                            fitted += n_draws * (plan.folds + 1)
                    b.add(work)
                    b.fits += fitted
                    b.images += n_test
    for method in cfg.methods:
        for seed in seeds:
            detector = registry.configured(cfg, method, seed)
            for c in cats:
                n_train = counts[c]["train"]
                new = fits.new(detector, draw, c, n_train)
                scored = counts[c]["calib"] + counts[c]["test"]
                scored += len(conditions) * sum(counts[c][p] for p in ("calib", "val", "test"))
                b.add((_fit(detector, n_train) if new else 0.0) + _score(detector, scored, n_train))
                b.fits += int(new)
                b.images += scored
    out.append(b)
    return out


def _unified_batches(run: Run, counts: dict, feats: _Features) -> list[Batch]:
    """The unified study: every distinct (method, seed, categories) model fitted and scored as a job."""
    cfg = run.config

    def n_train(categories):
        cap = cfg.unified.n_train
        return sum(min(cap, _train(c)) if cap else _train(c) for c in categories)

    def _train(c):
        return counts[c]["train"] if c in counts else _extra_counts(run, c)["train"]

    return _pooled_study_batches(run, counts, feats, n_train)


def _pooled_study_batches(run: Run, counts: dict, feats: "_Features", n_train: Callable) -> list[Batch]:
    """The unified study of named sets and a curve (helpers.unified.pools): a features batch for the images not
    featurised yet (the look-alike categories, the controls' anomalies), one job per distinct (method, seed,
    categories) model that fits and scores it (``unified models``), and the paired bootstrap (``intervals``)."""
    from helpers import registry, unified
    from helpers.experiments import CLEAN

    cfg = run.config
    step, draw = "05_unified", int(cfg.data.draws[0])
    u = cfg.unified
    categories = list(cfg.unified_categories)
    every = {c: counts[c] if c in counts else _extra_counts(run, c) for c in categories}
    # the look-alikes only the unified study reads: their capped training normals are new to the feature cache
    feats.counts.update({c: {**every[c], "train": min(u.n_train or every[c]["train"], every[c]["train"])}
                         for c in categories if c not in counts})
    sources: dict[tuple, dict[str, set]] = {}
    full: dict[tuple, bool] = {}
    for method in cfg.methods:
        for pool in unified.pools(run):
            for seed in pool.seeds:
                for key in [tuple(sorted(pool.categories)), *[(c,) for c in pool.categories]]:
                    entry = sources.setdefault((method, int(seed), key), {c: set() for c in key})
                    for c in key:
                        entry[c] |= set(pool.categories) - {c}
                    full[method, int(seed), key] = full.get((method, int(seed), key), False) or not pool.curve
    controls = unified.controls(run)
    per_pair = u.control_per_pair
    # features: capped training normals, calib/val/test and each control's anomalies (its normals are byte copies
    # of the test normals); a set whose images are all cached makes no job
    sets = [[(draw, CLEAN, c, "train")] for c in categories]
    sets += [[(draw, CLEAN, c, split)] for c in categories for split in unified.SPLITS]
    b = feats.batch(step, cfg.model.backbone, cfg.model.image_size, sets, only_new=True)
    unit = backbone_seconds(cfg.model.backbone, feats.measure) * (cfg.model.image_size / REFERENCE_SIZE) ** 2
    for _ in range(len(categories) * len(controls)):  # one set per category and control
        fresh = per_pair * (len(categories) - 1)
        b.add(fresh * unit)
        b.images += fresh
        b.bytes_written += fresh * feature_bytes(cfg.model.backbone, cfg.model.image_size)
    models = Batch(step, "unified", "unified models", "helpers.unified._model_job")
    first_seed = int(cfg.model.seeds[0])
    for (method, seed, key), entry in sorted(sources.items(), key=lambda item: -len(item[0][2])):
        detector = registry.configured(cfg, method, seed)
        is_full = full[method, seed, key]
        scored = 0
        for c in key:
            splits_scored = ("calib", "val", "test") if is_full and seed == first_seed else ("calib", "test")
            scored += sum(every[c][s] for s in splits_scored)
            shown = len(controls) if is_full else 1
            scored += every[c]["test_good"] + shown * per_pair * len(entry[c])
        models.add(_fit(detector, n_train(key)) + _score(detector, scored, n_train(key)))
        models.fits += 1
        models.models_written += _model_bytes(detector, n_train(key))
        models.images += scored
    groups = len(cfg.methods) * sum(1 for p in unified.pools(run) if not p.curve) * (1 + len(controls))
    rows = models.images / max(groups, 1)
    intervals = Batch(step, "intervals", "intervals", "helpers.unified._group_intervals")
    for _ in range(groups):
        intervals.add(u.n_resamples * rows)
    intervals.notes.append("one job per method, set and data (test or a control), counted approximately")
    return [b, models, intervals]


# --- recorded timings ----------------------------------------------------------------------------------------

_RUN_NAME = re.compile(r"[0-9a-f]{8}")  # the hash part of a run folder's name


@dataclass
class Recorded:
    """Per-step seconds and per-batch timing lines of one earlier run, with its configuration."""

    source: str
    profile: str
    config: object
    steps: dict[str, dict]  # step -> {"seconds", "batches": [lines], "resources": {...}}


def read_run(run_dir: Path) -> Recorded | None:
    """The timings a run folder holds (its ``.state``), or None when it recorded no batch."""
    import yaml

    from helpers.config import StudyConfig, build

    state = Path(run_dir) / ".state"
    if not state.is_dir() or not list(state.glob("*.jobs.jsonl")):
        return None
    config = build(StudyConfig, yaml.safe_load((Path(run_dir) / "config.yaml").read_text()), "",
                   str(Path(run_dir) / "config.yaml"))
    return Recorded(str(run_dir), Path(run_dir).name.rsplit("-", 1)[0], config, step_summaries(state))


def read_summary(path: Path) -> Recorded | None:
    """The timings a published ``job_times.json`` holds."""
    from helpers.config import StudyConfig, build

    if not Path(path).is_file():
        return None
    body = json.loads(Path(path).read_text())
    return Recorded(str(path), body["profile"], build(StudyConfig, body["config"], "", str(path)), body["steps"])


def find_recorded(profile: str, run: Run) -> Recorded | None:
    """Timings of this configuration's run, else of another run of the profile (newest first), else its published
    copy; then the same for ``default``. A run whose configuration no longer loads (an older version's) is passed
    over."""
    from helpers import config as config_module

    for name in dict.fromkeys([profile, "default"]):
        this = run if name == profile else Run(name, config_module.load(name))
        others = [p for p in this.dir.parent.glob(f"{name}-*")
                  if p != this.dir and _RUN_NAME.fullmatch(p.name[len(name) + 1:])]
        folders = [this.dir] + sorted(others, key=lambda p: -p.stat().st_mtime)
        candidates = [lambda f=f: read_run(f) for f in folders]
        if this.publish_dir is not None:
            candidates.append(lambda path=this.publish_dir / JOB_TIMES: read_summary(path))
        for read in candidates:
            try:
                found = read()
            except config_module.ProfileError:
                continue  # recorded by an older version whose configuration no longer loads
            if found is not None:
                return found
    return None


# --- the estimate --------------------------------------------------------------------------------------------

@dataclass
class Rates:
    """Seconds per unit of work by (kind, method) and by kind, overhead seconds per batch by kind, and each step's
    seconds outside its batches, from a recorded run."""

    per_unit: dict[tuple, float]
    overhead: dict[str, float]
    outside: dict[str, float]  # step -> seconds outside batches
    step_job_s: dict[str, float]  # step -> recorded job seconds
    disk: dict[str, dict]  # step -> disk bytes after it
    unmatched: list[str]
    reference: list[Batch]  # the batches the recorded run's configuration implies, as this plan counts them


def _workers_here(execution) -> int:
    from helpers.parallel import resolve_workers

    return resolve_workers(getattr(execution, "workers", 0))


def fit_rates(recorded: Recorded, measure: bool = True) -> Rates:
    """Align the batches the recorded run's configuration implies with the lines it recorded (by step, function,
    desc and order) and divide seconds by work."""
    reference = Run(recorded.profile, recorded.config)
    planned = batches(reference, _counts_of(reference), measure)
    seconds: dict[tuple, float] = {}
    work: dict[tuple, float] = {}
    overheads: dict[str, list[float]] = {}
    outside, step_job_s, disk, unmatched = {}, {}, {}, []
    for step, record in recorded.steps.items():
        disk[step] = record.get("resources", {}).get("disk_bytes", {})
        lines = record.get("batches")
        if lines is None:
            unmatched.append(f"{step}: no batch timings recorded")
            continue
        outside[step] = max(0.0, record["seconds"] - sum(line["wall_s"] for line in lines))
        step_job_s[step] = sum(line["job_s"] for line in lines)
        pending = [b for b in planned if b.step == step]
        for line in lines:
            match = next((b for b in pending if b.function == line["function"] and b.desc == line["desc"]), None)
            if match is None:
                unmatched.append(f"{step}: {line['desc']} ({line['function']}) is not in the plan")
                continue
            pending.remove(match)
            if line["ran"] and match.work > 0:
                for key in ((match.kind, match.method), (match.kind, None)):
                    seconds[key] = seconds.get(key, 0.0) + line["job_s"]
                    work[key] = work.get(key, 0.0) + match.work * line["ran"] / max(line["jobs"], 1)
                parallel = max(line["job_s"] / max(line["workers"], 1), line["job_max_s"])
                overheads.setdefault(match.kind, []).append(max(0.0, line["wall_s"] - parallel))
    per_unit = {k: seconds[k] / work[k] for k in seconds if work[k] > 0}
    overhead = {k: sum(v) / len(v) for k, v in overheads.items()}
    return Rates(per_unit, overhead, outside, step_job_s, disk, unmatched, planned)


def _counts_of(run: Run) -> dict:
    return image_counts(run)[0]


@dataclass
class Estimate:
    batch: Batch
    job_s: float | None  # None: no timing of this kind recorded
    wall_here: float | None
    wall_n: float | None


def wall_seconds(job_s: float, longest_s: float, workers: int, overhead: float) -> float:
    """A batch on ``workers`` workers: its job seconds shared out, never less than its longest job, plus the
    per-batch overhead (worker start-up, result transfer) measured in the recorded run."""
    return max(job_s / max(workers, 1), longest_s) + overhead


def estimate(planned: Sequence[Batch], rates: Rates, workers_here: int, workers_n: int) -> list[Estimate]:
    out = []
    for b in planned:
        rate = rates.per_unit.get((b.kind, b.method), rates.per_unit.get((b.kind, None)))
        if rate is None:
            out.append(Estimate(b, None if b.work else 0.0, None if b.work else 0.0, None if b.work else 0.0))
            continue
        job_s = b.work * rate
        overhead = rates.overhead.get(b.kind, 0.0) if b.jobs else 0.0
        out.append(Estimate(b, job_s, wall_seconds(job_s, b.longest * rate, workers_here, overhead),
                            wall_seconds(job_s, b.longest * rate, workers_n, overhead)))
    return out


def outside_seconds(step: str, estimates: Sequence[Estimate], rates: Rates) -> float | None:
    """A step's seconds outside its batches: what the least of the recorded steps spent there (kernel start,
    imports: the same for every notebook), plus the rest (work in the notebook, figures) scaled as the step's batches
    are."""
    if step not in rates.outside:
        return None
    fixed = min(rates.outside.values())
    mine = sum(e.job_s or 0.0 for e in estimates if e.batch.step == step)
    theirs = rates.step_job_s.get(step, 0.0)
    scale = mine / theirs if theirs > 0 and mine > 0 else 1.0
    return fixed + (rates.outside[step] - fixed) * scale


def scale_factor(planned: Sequence[Batch], rates: Rates) -> float:
    """How many times the recorded run's work the plan's is (all kinds together, each weighted by its rate)."""

    def seconds(chosen):
        return sum(b.work * rates.per_unit.get((b.kind, b.method), rates.per_unit.get((b.kind, None), 0.0))
                   for b in chosen)

    theirs = seconds(rates.reference)
    return seconds(planned) / theirs if theirs > 0 else math.nan


# --- the report ----------------------------------------------------------------------------------------------

def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def memory_notes(run: Run, counts: dict) -> list[str]:
    """The largest arrays a fit of each method holds, and its model's size, on the largest training set (a
    category's, or the unified study's largest pool)."""
    from helpers import registry

    cfg = run.config
    n = max(counts[c]["train"] for c in cfg.data.categories)
    cap = getattr(cfg.unified, "n_train", None)
    for categories in getattr(cfg, "unified_sets", {}).values():
        trains = [counts[c]["train"] if c in counts else _extra_counts(run, c)["train"] for c in categories]
        n = max(n, sum(min(cap, t) if cap else t for t in trains))
    lines = []
    for method in cfg.methods:
        detector = registry.configured(cfg, method)
        c = cost(method)
        lines.append(f"- {method}: a fit on {n} images holds about {_gb(c.fit_bytes(detector, n))} of embeddings; "
                     f"its model takes {_gb(c.model_bytes(detector, n))}")
    return lines


def read_timings(path: str | Path) -> Recorded:
    """The recorded timings of a run folder or of a ``job_times.json``; FileNotFoundError naming it otherwise."""
    path = resolve(path)
    found = read_summary(path) if path.is_file() else read_run(path)
    if found is None:
        raise FileNotFoundError(f"{path} holds no recorded job timings (a run folder with .state/*.jobs.jsonl, "
                                f"or a {JOB_TIMES})")
    return found


def report(profile: str, overrides: dict | None = None, workers: int | None = None, measure: bool = True,
           timings: str | Path | None = None) -> str:
    """The plan of a profile as Markdown: images, batches with jobs, images, fits and estimated seconds, totals,
    disk and memory; nothing is run or written. ``timings``: a run folder or ``job_times.json`` to take the
    recorded times from (default: :func:`find_recorded`)."""
    from helpers import config as config_module
    from helpers.parallel import resolve_workers

    name = config_module.read_profile(profile)[0]
    config = config_module.load(profile, overrides)
    run = Run(name, config)
    counts, counted_from = image_counts(run)
    planned = batches(run, counts, measure)
    here = min(_workers_here(config.execution), resolve_workers(0))
    n = int(workers) if workers else here
    recorded = read_timings(timings) if timings else find_recorded(name, run)
    rates = fit_rates(recorded, measure) if recorded is not None else None
    estimates = estimate(planned, rates, here, n) if rates else [Estimate(b, None, None, None) for b in planned]
    stand_in = f" (stand-in for {config.model.stands_in_for})" if config.model.stands_in_for else ""
    lines = [f"# Plan of profile `{name}` (run `{run.name}`): nothing has run", "",
             f"Backbone {config.model.backbone}{stand_in} at {config.model.image_size} px; data "
             f"`{config.data.dataset}` at {image_side(run)} px; {len(config.data.draws)} data draws x "
             f"{len(config.model.seeds)} model seeds x {len(config.data.categories)} categories x "
             f"{len(config.methods)} methods.", "",
             f"Images per category and data draw, from {counted_from}:", "",
             "| category | train | calib | val | test | images in its folders |", "|---|---|---|---|---|---|"]
    lines += [f"| {c} | {v['train']} | {v['calib']} | {v['val']} | {v['test']} | {v['generated']} |"
              for c, v in counts.items()]
    lines += ["", f"Batches of jobs a fresh run makes, and their seconds on this machine ({here} workers) and on "
                  f"{n} workers:", "",
              "| step | batch | kind | jobs | images | fits | job seconds | wall here | wall on N |",
              "|---|---|---|---|---|---|---|---|---|"]
    totals = {"here": 0.0, "n": 0.0, "job": 0.0}
    unknown = False
    from helpers.study import pipeline

    order = [s.name for s in pipeline(config)]
    for step in order:
        for e in (e for e in estimates if e.batch.step == step):
            b = e.batch
            desc = f"{b.desc} ({b.detail})" if b.detail else b.desc
            lines.append(f"| {step} | {desc} | {b.kind} | {b.jobs} | {b.images} | {b.fits} | {_hms(e.job_s)} | "
                         f"{_hms(e.wall_here)} | {_hms(e.wall_n)} |")
            unknown |= e.wall_here is None
            totals["here"] += e.wall_here or 0.0
            totals["n"] += e.wall_n or 0.0
            totals["job"] += e.job_s or 0.0
        if rates is not None:
            outside = outside_seconds(step, estimates, rates)
            unknown |= outside is None
            lines.append(f"| {step} | outside batches | - | | | | | {_hms(outside)} | {_hms(outside)} |")
            totals["here"] += outside or 0.0
            totals["n"] += outside or 0.0
    if rates is None:
        totals = {key: None for key in totals}
    mark = " + ?" if unknown and rates is not None else ""
    lines.append(f"| **total** | | | {sum(b.jobs for b in planned)} | {sum(b.images for b in planned)} | "
                 f"{sum(b.fits for b in planned)} | {_hms(totals['job'])}{mark} | **{_hms(totals['here'])}{mark}** | "
                 f"**{_hms(totals['n'])}{mark}** |")
    lines += ["", "Per kind of job:", "", "| kind | batches | jobs | images | fits | job seconds |",
              "|---|---|---|---|---|---|"]
    for kind in dict.fromkeys(b.kind for b in planned):
        mine = [e for e in estimates if e.batch.kind == kind]
        job_s = None if any(e.job_s is None for e in mine) else sum(e.job_s for e in mine)
        lines.append(f"| {kind} | {len(mine)} | {sum(e.batch.jobs for e in mine)} | "
                     f"{sum(e.batch.images for e in mine)} | {sum(e.batch.fits for e in mine)} | {_hms(job_s)} |")
    lines += ["", "Disk and memory:", "",
              f"- feature cache: {_gb(sum(b.bytes_written for b in planned))} "
              f"({sum(b.images for b in planned if b.kind == 'features')} images' features)",
              f"- model cache: {_gb(sum(b.models_written for b in planned))} "
              f"({sum(b.fits for b in planned if b.kind != 'thresholds')} fitted models kept)"]
    lines += _disk_notes(run, counts, planned, recorded, rates)
    lines += memory_notes(run, counts)
    lines += ["", "How the estimate is made:", ""]
    if recorded is None:
        lines.append("- no recorded timings: run a profile once (the runner records every batch) to get estimates")
    else:
        lines.append(f"- per-batch timings of {recorded.source} (profile `{recorded.profile}`), divided by the "
                     f"work the same counting gives that run's configuration; each batch here is its work times "
                     f"that rate")
        lines += [f"- work of {kind}: {SCALING[kind]}" for kind in dict.fromkeys(b.kind for b in planned)]
        lines.append("- a batch's wall time: max(job seconds / workers, its longest job) + the per-batch overhead "
                     "measured there; a worker is assumed as fast as one recorded worker (one core each)")
        lines.append("- seconds outside batches: the least any recorded step spent there (kernel start, imports), plus "
                     "the rest of the step's (work in the notebook, figures) scaled as its batches")
        factor = scale_factor(planned, rates)
        lines.append(f"- this plan is {factor:.3g} times the recorded run's work")
        if factor > 20:
            lines.append("- **rough**: the recorded run is much smaller; its jobs are dominated by fixed costs "
                         "(process start, imports, building models) that this proportional model scales too, so "
                         "expect an overestimate. Record a run of similar size: `default` for default, default or "
                         "`mvtec-rehearsal` for mvtec")
        if unknown:
            lines.append("- '?': no timing of that kind or step was recorded; the total leaves it out")
        lines += [f"- not matched: {u}" for u in rates.unmatched]
    for b in planned:
        lines += [f"- {b.step} {b.desc}: {note}" for note in b.notes]
    return "\n".join(lines) + "\n"


def _disk_notes(run: Run, counts: dict, planned: Sequence[Batch], recorded: Recorded | None,
                rates: Rates | None) -> list[str]:
    """Data and shifted copies, from the bytes per pixel the recorded run left on disk (generated data only)."""
    if recorded is None or rates is None:
        return []
    reference = Run(recorded.profile, recorded.config)
    ref_side, side = image_side(reference), image_side(run)
    lines = []
    for step, kind, folder in (("00_data", "generate", "data"), ("01_shift", "shift", "shift")):
        measured = rates.disk.get(step, {}).get(folder)
        ref_images = sum(b.images for b in rates.reference if b.kind == kind)
        mine = sum(b.images for b in planned if b.kind == kind)
        if measured and ref_images and mine:
            per_pixel = measured / (ref_images * ref_side ** 2)
            lines.append(f"- {folder} folder: about {_gb(per_pixel * mine * side ** 2)} ({per_pixel:.2f} bytes per "
                         f"image pixel, as the recorded run left it)")
    return lines

