"""The study's one typed configuration: frozen sections with their documented defaults, loaded from a profile
(``profiles/<name>.yaml``) plus optional overrides, validated key by key, and hashed into the run it names.

A profile states only what differs from the defaults below; a misspelt key, a wrong type or a missing
required key stops with a :class:`ProfileError` naming the file, the key and, for a misspelling, the closest
valid key. ``python -m helpers.config --profile NAME`` prints the resolved configuration.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from helpers.paths import PROFILES


class ProfileError(ValueError):
    """A profile or override holds an unknown key, a wrong type or a bad value; the message names the file and key."""

# --- sections -----------------------------------------------------------------------------------------------


# Metadata of a field added after runs were named: while it keeps its default it stays out of the run's hash, so
# adding it renames no existing run (see run_hash).
HASHED_WHEN_SET = {"hashed_when_set": True}


@dataclass(frozen=True)
class SyntheticCategory:
    """The shape of one generated category when it should not be the uniform one: its train normals, its test
    images per type (``good`` and defect types, as MVTec AD's folders name them) and whether it is saved as
    single-channel greyscale (MVTec AD's zipper is). A defect type without a renderer of its own is drawn by the
    category's stand-in renderer (``data_prep.synthetic.STAND_IN_DEFECTS``)."""

    n_train: int
    test: dict[str, int]  # e.g. {good: 40, crack: 18, cut: 17}
    greyscale: bool = False


@dataclass(frozen=True)
class SyntheticData:
    """Sizes of the generated dataset (``data.dataset: synthetic``), per category and data draw."""

    size: int = 192  # image side in pixels
    n_train: int = 200  # normal images in train/good (data.calib_size of them are held out for calibration)
    n_test_good: int = 60
    n_per_defect: int = 15  # test images per defect type (three types per category)
    ground_truth: bool = True  # False: no pixel masks (image-level labels only, as many inspection datasets)
    # Categories of another shape (the mvtec-rehearsal profile: MVTec AD's own counts); the others keep the
    # uniform shape above.
    per_category: dict[str, SyntheticCategory] = field(default_factory=dict, metadata=HASHED_WHEN_SET)


@dataclass(frozen=True)
class DataConfig:
    """Which images, and how they are drawn and split. A data draw ``d`` is split seed ``d``; for generated
    data it is also generator seed ``d``, so a draw changes the images themselves."""

    dataset: Literal["synthetic", "mvtec", "folder"]  # folder: any MVTec AD / AD 2 layout placed by hand
    root: str
    categories: tuple[str, ...]
    draws: tuple[int, ...] = (0, 1, 2)
    synthetic: SyntheticData = field(default_factory=SyntheticData)
    calib_size: int | None = 40  # train normals held out per category for normal-only calibration
    val_fraction: float = 0.5  # share of the labelled test folder used for (oracle) validation
    n_train: int | None = None  # cap on training normals per category (None: all not held out)


@dataclass(frozen=True)
class ModelConfig:
    """What every detector shares: the frozen backbone, the input size, the model seeds, the device."""

    backbone: str = "efficientnet_lite0"
    image_size: int = 160  # sized for 2 CPU cores; the mvtec profile uses 256
    seeds: tuple[int, ...] = (0, 1, 2)  # coreset / feature-subset seeds
    device: str = "auto"
    # Overrides (dotted keys, as --set takes them) applied when `backbone`'s weights are not on this machine, e.g.
    # {model.backbone: efficientnet_lite0, methods.padim.n_features: 176}: an offline rehearsal of a GPU profile.
    # Resolved when the profile loads: `stands_in_for` then names the backbone the profile asked for, so the run's
    # config.yaml, its hash and the report's setup all say that a stand-in ran.
    stand_in: dict[str, Any] | None = field(default=None, metadata=HASHED_WHEN_SET)
    stands_in_for: str | None = field(default=None, metadata=HASHED_WHEN_SET)  # set by loading, never by a profile


@dataclass(frozen=True)
class ShiftConfig:
    """MVTec-Shift conditions the drop study scores (severity 0, the clean data, is always included)."""

    root: str = "data/shift"
    seed: int = 0
    modes: tuple[Literal["domain", "per_image"], ...] = ("domain", "per_image")
    first_draw_only: tuple[Literal["domain", "per_image"], ...] = ("per_image",)  # modes scored on draw 0 only
    transforms: tuple[str, ...] = ("brightness", "blur", "spotlight", "rotation", "rotation_fill", "border_fill",
                                   "mixed")
    # per_image mode only where a draw has a random part to vary (blur has none; the controls only a sign): by
    # default one photometric and one geometric shift, within the 2-core budget
    per_image_transforms: tuple[str, ...] | None = ("spotlight", "rotation")
    severities: tuple[int, ...] = (1, 3, 5)


@dataclass(frozen=True)
class SweepConfig:
    """One-at-a-time hyperparameter sweeps, clean and under ``shifts``; ``grids`` overrides a method's
    registered grid per parameter (``{patchcore: {coreset_ratio: [0.01, 0.1]}}``)."""

    shifts: tuple[tuple[str, int], ...] = (("spotlight", 3), ("spotlight", 5), ("rotation", 3), ("rotation", 5))
    grids: dict[str, dict[str, tuple[Any, ...]]] = field(default_factory=dict)
    second_backbone: str | None = "resnet18"  # swept only when its weights are on this machine
    matched_stages: tuple[str, ...] | None = None  # stages all methods share in the matched row (None: first method's)


@dataclass(frozen=True)
class ThresholdConfig:
    """Threshold regimes under shift (notebook 04, ``helpers.adaptation``): on which ``domain``-mode conditions,
    with how many target-domain normals (``budgets``, each drawn ``draws`` times from the shifted calib split of
    ``data.calib_size`` images), which normal-only estimators, and where adapted and refit models are fitted."""

    transforms: tuple[str, ...] = ("spotlight", "mixed")
    severities: tuple[int, ...] = (3,)
    budgets: tuple[int, ...] = (5, 10, 20, 40)  # target normals N; at most data.calib_size ("all" = calib_size)
    draws: int = 10  # random subsets per budget (one where N is the whole calib split)
    estimators: tuple[Literal["normal_percentile", "mean_3sigma", "conformal"], ...] = (
        "normal_percentile", "mean_3sigma", "conformal")
    percentile: float = 99.0  # q of normal_percentile
    sigmas: float = 3.0  # k of mean + k sigma
    alphas: tuple[float, ...] = (0.01, 0.05)  # target false-positive rates of the conformal estimator
    anomalies: tuple[int, ...] = (0, 1, 2, 4, 8)  # labelled shifted anomalies A of the label-budget curve
    # Budgets with adapted models (None: every budget); every PaDiM adaptation inverts one covariance per grid
    # position, so the default adapts at a small and the full budget only.
    adapt_budgets: tuple[int, ...] | None = (10, 40)
    # Budgets with refit models (None: every budget). Cross-fitting needs three fits per draw, ten draws per
    # budget: too many PaDiM fits for two CPU cores, so the default refits on the whole pool only (one draw).
    refit_budgets: tuple[int, ...] | None = (40,)
    refit_seeds: int = 1  # adapted and refit models for the first this many model seeds
    folds: int = 2  # cross-fitting folds of the adapted and refit thresholds
    seed: int = 0  # draws of target normals, labelled anomalies and folds


@dataclass(frozen=True)
class UnifiedConfig:
    """The unified setting: per named set of categories, one model on their pooled normals against one model per
    category, on the first data draw, with a positive control of cross-category anomalies.

    ``sets`` None: ``far``, the data's categories (when there are two or more), and on generated data also
    ``close``, each data category that has a generated look-alike beside it (``CLOSE_CATEGORIES`` of
    ``data_prep.synthetic``); no set at all leaves the unified study nothing to do. Categories a set names
    beyond ``data.categories`` are generated or prepared for the first data draw only. ``curve`` None: every
    set's categories, the largest set first; pooled 2, 3, ... of them at a time, with the first model seed only.
    """

    sets: dict[str, tuple[str, ...]] | None = None
    curve: tuple[str, ...] | None = None  # () leaves the curve over the number of pooled categories out
    # Training normals per category, the same for pooled and per-category models so they compare: a pooled
    # PatchCore's coreset search grows with (patches x centres), i.e. with the square of the pooled images.
    n_train: int | None = 60
    control_per_pair: int = 4  # positive-control images per ordered category pair and square size
    # Sides of the pasted squares, as shares of the image side; each is its own control. A small square's
    # cells see its border through the backbone's receptive field, so the whole image (1) is the control where
    # the shortcut must show if it can.
    control_patches: tuple[float, ...] = (0.3, 0.6, 1.0)
    control_root: str | None = None  # None: beside the data, <parent of data.root>/cross_category
    threshold: Literal["normal_percentile", "mean_3sigma"] = "normal_percentile"  # fitted on calib normals
    normal_quantile: float = 99.0  # percentile of normal calibration scores (images and patches)
    patch_area: float = 0.5  # a feature-grid patch is anomalous when this share of its cell is ground truth
    n_resamples: int = 1000  # paired bootstrap of per-category against pooled AUROC


@dataclass(frozen=True)
class EfficiencyConfig:
    categories: tuple[str, ...] | None = None  # fitted from scratch and timed; None: the first data category


@dataclass(frozen=True)
class ExecutionConfig:
    """How jobs run; never changes a result, so it is left out of the run's hash."""

    workers: int = 0  # parallel jobs; 0: one per CPU core
    engine: Literal["local", "dask"] = "local"
    scheduler: str | None = None  # dask scheduler address; None starts a LocalCluster


@dataclass(frozen=True)
class OutputConfig:
    """Where runs and published figures go; left out of the run's hash."""

    runs_dir: str = "runs"
    figures_dir: str | None = None  # the run's figures and report are copied here (None: not published)


@dataclass(frozen=True)
class StudyConfig:
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    methods: dict[str, Any] = field(default_factory=dict)  # method name -> its registered settings dataclass
    shift: ShiftConfig = field(default_factory=ShiftConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    thresholds: ThresholdConfig = field(default_factory=ThresholdConfig)
    unified: UnifiedConfig = field(default_factory=UnifiedConfig)
    efficiency: EfficiencyConfig = field(default_factory=EfficiencyConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def method_names(self) -> tuple[str, ...]:
        return tuple(self.methods)

    @property
    def unified_sets(self) -> dict[str, tuple[str, ...]]:
        """The named category sets the unified study pools (see :class:`UnifiedConfig`)."""
        if self.unified.sets is not None:
            return dict(self.unified.sets)
        sets = {"far": tuple(self.data.categories)} if len(self.data.categories) > 1 else {}
        if self.data.dataset == "synthetic":
            from data_prep.synthetic import CLOSE_CATEGORIES

            twins = {twin: name for name, twin in CLOSE_CATEGORIES.items()}
            close = tuple(c for category in self.data.categories if category in twins
                          for c in (category, twins[category]))
            if close:
                sets["close"] = close
        return sets

    @property
    def unified_curve(self) -> tuple[str, ...]:
        """Categories in the order the curve over the number of pooled categories adds them."""
        if self.unified.curve is not None:
            return tuple(self.unified.curve)
        ordered = sorted(self.unified_sets.values(), key=len, reverse=True)
        return tuple(dict.fromkeys(c for categories in ordered for c in categories))

    @property
    def unified_categories(self) -> tuple[str, ...]:
        """Every category the unified study uses, data categories first."""
        named = [c for categories in self.unified_sets.values() for c in categories] + list(self.unified_curve)
        return tuple(dict.fromkeys([c for c in self.data.categories if c in named] + named))

    @property
    def unified_extra_categories(self) -> tuple[str, ...]:
        """Categories only the unified study uses: generated or prepared for the first data draw alone."""
        return tuple(c for c in self.unified_categories if c not in self.data.categories)


DEFAULT_METHODS = ("patchcore", "padim")
# Sections that change how or where a run executes, never what it computes.
UNHASHED = ("execution", "output")


# --- loading ------------------------------------------------------------------------------------------------


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class _Bad(Exception):
    """A value does not fit its type; the message says what was expected."""


def _coerce(tp, value, where: str, source: str):
    """``value`` checked against the annotation ``tp`` (lists become tuples); _Bad when it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return _freeze(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where, source)
            except _Bad as exc:
                errors.append(str(exc))
        raise _Bad(" or ".join(errors) + (" or null" if type(None) in args else ""))
    if origin is Literal:
        if value not in args:
            raise _Bad(f"one of {', '.join(map(repr, args))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _Bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Bad("a string")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Bad("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise _Bad(f"a list of {len(args)} values")
        return tuple(_coerce(a, v, f"{where}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _Bad("a mapping")
        key_type, value_type = args
        return {_coerce(key_type, k, where, source): _coerce(value_type, v, _join(where, str(k)), source)
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, source)
    raise TypeError(f"configuration type {tp!r} at {where} is not supported")  # a bug in this module


def _freeze(value):
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return {k: _freeze(v) for k, v in value.items()}
    return value


def build(cls, raw, where: str = "", source: str = "configuration"):
    """An instance of the frozen dataclass ``cls`` from a mapping: unknown keys, wrong types and missing required
    keys raise a ProfileError naming ``source`` and the dotted key."""
    if not isinstance(raw, Mapping):
        raise ProfileError(f"{source}: '{where or 'top level'}' must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
            hint = f"did you mean '{_join(where, close[0])}'?" if close else f"valid keys: {', '.join(fields)}"
            raise ProfileError(f"{source}: unknown key '{_join(where, str(key))}' ({hint})")
    values = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name in raw:
            if name == "methods" and cls is StudyConfig:
                continue  # validated against the method registry below
            try:
                values[name] = _coerce(hints[name], raw[name], key, source)
            except _Bad as exc:
                raise ProfileError(f"{source}: '{key}' must be {exc}, got {raw[name]!r}") from None
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProfileError(f"{source}: missing required key '{key}'")
    if cls is StudyConfig:
        values["methods"] = _methods(raw.get("methods"), source)
    return cls(**values)


def _methods(raw, source: str) -> dict[str, Any]:
    """Method blocks over the defaults (every default method, with its registered settings); ``name: null``
    leaves a method out, a new name adds a registered method."""
    from helpers import registry

    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ProfileError(f"{source}: 'methods' must be a mapping of method name to settings")
    merged: dict[str, Any] = {name: {} for name in DEFAULT_METHODS}
    for name, block in raw.items():
        if block is None:
            merged.pop(name, None)
        else:
            merged[name] = block
    out = {}
    for name, block in merged.items():
        if name not in registry.names():
            close = difflib.get_close_matches(str(name), registry.names(), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"registered: {', '.join(registry.names())}"
            raise ProfileError(f"{source}: unknown method 'methods.{name}' ({hint})")
        out[name] = build(registry.get(name).settings, block, f"methods.{name}", source)
    if not out:
        raise ProfileError(f"{source}: 'methods' leaves no method to run")
    return out


def deep_merge(base: Mapping, extra: Mapping) -> dict:
    """``extra`` over ``base``, mapping by mapping; a dotted key (``methods.patchcore.k``) addresses a nested one."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for key, value in extra.items():
        if isinstance(key, str) and "." in key:
            head, rest = key.split(".", 1)
            value, key = {rest: value}, head
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = dict(deep_merge({}, value)) if isinstance(value, Mapping) else value
    return out


def profile_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILES / f"{name_or_path}.yaml"
    return path


def read_profile(name_or_path: str | Path) -> tuple[str, dict, Path]:
    """(profile name, raw mapping, path) of ``profiles/<name>.yaml`` or a YAML path."""
    path = profile_path(name_or_path)
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise ProfileError(f"profile file {path} does not exist (known profiles: {', '.join(known)})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return path.stem, raw, path


def load(profile: str | Path = "default", overrides: Mapping | None = None) -> StudyConfig:
    """The resolved configuration of a profile with ``overrides`` (nested or dotted keys) applied on top."""
    _, raw, path = read_profile(profile)
    source = str(path) if not overrides else f"{path} with overrides {dict(overrides)}"
    merged = deep_merge(raw, dict(overrides or {}))
    config = build(StudyConfig, merged, "", source)
    if config.model.stands_in_for is not None:
        raise ProfileError(f"{source}: 'model.stands_in_for' is set when the profile loads (from model.stand_in), "
                           f"not by a profile")
    check(config, source)
    if config.model.stand_in and not _weights_here(config.model.backbone):
        # The stand-in's values over the profile's, the caller's overrides over both.
        merged = deep_merge(deep_merge(deep_merge(raw, config.model.stand_in), dict(overrides or {})),
                            {"model.stands_in_for": config.model.backbone})
        config = build(StudyConfig, merged, "", f"{source} with model.stand_in")
        check(config, f"{source} with model.stand_in")
    return config


def _weights_here(backbone: str) -> bool:
    from helpers import backbones

    return backbones.is_available(backbone)


def check(config: StudyConfig, source: str) -> None:
    """Cross-field rules a type cannot express; each names its key."""
    from helpers import backbones

    def bad(key, message):
        raise ProfileError(f"{source}: '{key}' {message}")

    data, model = config.data, config.model
    if not data.categories:
        bad("data.categories", "must list at least one category")
    if len(set(data.categories)) != len(data.categories):
        bad("data.categories", f"lists a category twice: {list(data.categories)}")
    if not data.draws:
        bad("data.draws", "must list at least one data draw")
    if not 0 < data.val_fraction < 1:
        bad("data.val_fraction", f"must lie in (0, 1), got {data.val_fraction}")
    if data.calib_size is not None and data.calib_size < 0:
        bad("data.calib_size", f"must be >= 0, got {data.calib_size}")
    if model.image_size < 32:
        bad("model.image_size", f"must be at least 32, got {model.image_size}")
    if not model.seeds:
        bad("model.seeds", "must list at least one seed")
    if model.backbone not in backbones.REGISTRY:
        bad("model.backbone", f"must be one of {', '.join(backbones.REGISTRY)}, got {model.backbone!r}")
    if model.stand_in is not None:
        nested = deep_merge({}, model.stand_in)  # dotted keys as nested sections
        stand_in_model = nested.get("model") if isinstance(nested.get("model"), Mapping) else {}
        if "backbone" not in stand_in_model:
            bad("model.stand_in", f"must name the backbone that stands in (model.backbone), got {dict(model.stand_in)}")
        if {"stand_in", "stands_in_for"} & set(stand_in_model) or set(nested) & set(UNHASHED):
            bad("model.stand_in", "changes what a run computes: it cannot set model.stand_in, model.stands_in_for, "
                                  "execution or output")
    if data.dataset == "synthetic":
        _check_synthetic(data, bad)
    if config.execution.scheduler and config.execution.engine != "dask":
        bad("execution.scheduler", "names a Dask scheduler; it needs execution.engine: dask")
    if config.execution.workers < 0:
        bad("execution.workers", f"must be 0 (one per core) or a positive count, got {config.execution.workers}")
    unknown = set(config.efficiency.categories or ()) - set(data.categories)
    if unknown:
        bad("efficiency.categories", f"must be a subset of data.categories, got {sorted(unknown)}")
    _check_unified(config, bad)
    for name in config.sweep.grids:
        if name not in config.methods:
            bad(f"sweep.grids.{name}", f"names no method of this study ({', '.join(config.methods)})")
    _check_thresholds(config, bad)


def _check_synthetic(data: DataConfig, bad) -> None:
    from data_prep import synthetic

    for category, shape in data.synthetic.per_category.items():
        key = f"data.synthetic.per_category.{category}"
        if category not in synthetic.SCENES:
            bad("data.synthetic.per_category", f"names {category!r}, which the generator cannot make "
                                               f"(it makes {', '.join(synthetic.SCENES)})")
        if shape.n_train < 1:
            bad(f"{key}.n_train", f"must be at least 1, got {shape.n_train}")
        known = synthetic.defect_types(category)
        unknown = sorted(set(shape.test) - {"good", *known})
        if unknown:
            bad(f"{key}.test", f"names defect types {unknown} the generator cannot draw on {category} "
                               f"(it draws {', '.join(known)})")
        if shape.test.get("good", 0) < 1 or len(shape.test) < 2:
            bad(f"{key}.test", f"must hold good images and at least one defect type, got {dict(shape.test)}")
        if any(count < 1 for count in shape.test.values()):
            bad(f"{key}.test", f"must give every type at least one image, got {dict(shape.test)}")


def _check_thresholds(config: StudyConfig, bad) -> None:
    th, calib = config.thresholds, config.data.calib_size
    if not th.transforms or not th.severities:
        bad("thresholds.transforms", "and 'thresholds.severities' must each list at least one value")
    if any(not 1 <= s <= 5 for s in th.severities):
        bad("thresholds.severities", f"must lie in 1..5, got {list(th.severities)}")
    if not th.budgets or min(th.budgets) < 2 or len(set(th.budgets)) != len(th.budgets):
        bad("thresholds.budgets", f"must list distinct budgets of at least 2 normals, got {list(th.budgets)}")
    if calib is not None and max(th.budgets) > calib:
        bad("thresholds.budgets", f"must not exceed data.calib_size ({calib}), the pool of target normals; "
                                  f"got {list(th.budgets)}")
    if th.draws < 1:
        bad("thresholds.draws", f"must be at least 1, got {th.draws}")
    if not th.estimators:
        bad("thresholds.estimators", "must list at least one estimator")
    if not 0 < th.percentile < 100:
        bad("thresholds.percentile", f"must lie in (0, 100), got {th.percentile}")
    if th.sigmas <= 0:
        bad("thresholds.sigmas", f"must be positive, got {th.sigmas}")
    if "conformal" in th.estimators and (not th.alphas or any(not 0 < a < 1 for a in th.alphas)):
        bad("thresholds.alphas", f"must list rates in (0, 1), got {list(th.alphas)}")
    if any(a < 0 for a in th.anomalies):
        bad("thresholds.anomalies", f"must be counts >= 0, got {list(th.anomalies)}")
    if th.folds < 2:
        bad("thresholds.folds", f"must be at least 2, got {th.folds}")
    for key in ("adapt_budgets", "refit_budgets"):
        chosen = th.budgets if getattr(th, key) is None else getattr(th, key)
        if not set(chosen) <= set(th.budgets):
            bad(f"thresholds.{key}", f"must be a subset of thresholds.budgets, got {list(chosen)}")
        # Each fold model is fitted on the other folds: at least 2 images, which PaDiM's covariance needs.
        if chosen and min(chosen) < 2 * th.folds:
            bad(f"thresholds.{key}", f"must be at least 2 x thresholds.folds ({2 * th.folds}), got {list(chosen)}")
    if not 0 <= th.refit_seeds <= len(config.model.seeds):
        bad("thresholds.refit_seeds", f"must lie in 0..{len(config.model.seeds)} (model.seeds), got {th.refit_seeds}")


def _check_unified(config: StudyConfig, bad) -> None:
    unified = config.unified
    for name, categories in config.unified_sets.items():
        if not name or name.startswith("curve_"):
            bad("unified.sets", f"names a set {name!r}: a name must be non-empty and not start with 'curve_' "
                                f"(the curve's steps are named so)")
        if len(categories) < 2:
            bad(f"unified.sets.{name}", f"must pool at least two categories, got {list(categories)}")
        if len(set(categories)) != len(categories):
            bad(f"unified.sets.{name}", f"lists a category twice: {list(categories)}")
    curve = config.unified_curve
    if len(curve) == 1 or len(set(curve)) != len(curve):
        bad("unified.curve", f"must list two or more distinct categories, or none, got {list(curve)}")
    if config.data.dataset == "synthetic":
        from data_prep.synthetic import ALL_CATEGORIES

        unknown = sorted(set(config.unified_categories) - set(ALL_CATEGORIES))
        if unknown:
            bad("unified.sets", f"names categories the generator cannot make: {unknown} "
                                f"(it makes {', '.join(ALL_CATEGORIES)})")
    if config.data.calib_size is not None and config.data.calib_size < 2:
        bad("data.calib_size", f"must be at least 2: the unified study fits its thresholds and score statistics on "
                               f"calibration normals, got {config.data.calib_size}")
    if unified.n_train is not None and unified.n_train < 2:
        bad("unified.n_train", f"must be at least 2 (or null: every training normal), got {unified.n_train}")
    if unified.control_per_pair < 1:
        bad("unified.control_per_pair", f"must be at least 1, got {unified.control_per_pair}")
    if not unified.control_patches or not all(0 < p <= 1 for p in unified.control_patches):
        bad("unified.control_patches", f"must list shares in (0, 1], got {list(unified.control_patches)}")
    if len(set(unified.control_patches)) != len(unified.control_patches):
        bad("unified.control_patches", f"lists a size twice: {list(unified.control_patches)}")
    if not 0 < unified.normal_quantile < 100:
        bad("unified.normal_quantile", f"must lie in (0, 100), got {unified.normal_quantile}")
    if not 0 < unified.patch_area <= 1:
        bad("unified.patch_area", f"must lie in (0, 1], got {unified.patch_area}")
    if unified.n_resamples < 100:
        bad("unified.n_resamples", f"must be at least 100, got {unified.n_resamples}")


# --- identity -----------------------------------------------------------------------------------------------


def to_dict(config) -> dict:
    """Plain nested mapping (tuples as lists) of a configuration, method settings included."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def _identity(value):
    """``to_dict`` of what names a run: fields marked ``HASHED_WHEN_SET`` are left out while at their default."""
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if f.metadata.get("hashed_when_set"):
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                if v == default:
                    continue
            out[f.name] = _identity(v)
        return out
    if isinstance(value, dict):
        return {k: _identity(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_identity(v) for v in value]
    return value


def run_hash(config: StudyConfig) -> str:
    """Eight hex digits of everything that changes a result (execution and output settings excluded)."""
    body = {k: v for k, v in _identity(config).items() if k not in UNHASHED}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:8]


def dump(config: StudyConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None, width=110)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    args = parser.parse_args(argv)
    try:
        config = load(args.profile)
    except ProfileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"# profile {args.profile}, run hash {run_hash(config)}")
    print(dump(config), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
