"""The method registry: one entry per detector, declaring how to build it from the configuration, its default
stages, its sweep grid, and how figures draw it. A method is one module that calls :func:`register`; the
built-in ones are imported on first use (``BUILTIN``), so loading a configuration never needs a method's
heavy dependencies until that method runs.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from helpers.detector import Detector

# Method name -> module that registers it.
BUILTIN = {"patchcore": "helpers.patchcore", "padim": "helpers.padim"}
# Fields of a detector's configuration that every method shares (the study's model section and the seed).
SHARED_FIELDS = ("backbone", "image_size", "seed")


@dataclass(frozen=True)
class MethodSpec:
    """What the study knows of a method; everything else stays in the method's module."""

    name: str
    detector: type  # a helpers.detector.Detector subclass with a from_settings() classmethod
    settings: type  # frozen dataclass: the profile block ``methods.<name>`` and its defaults
    label: str  # how figures and the report name it
    colour: str  # matplotlib colour; markers and dashes keep it readable in greyscale
    marker: str = "o"
    linestyle: str = "-"
    # {parameter: values} swept one at a time around the configured settings; a parameter is a field of
    # ``settings`` or one of SHARED_FIELDS.
    sweep_grid: Callable[[Any, str, int], dict[str, list]] = lambda settings, backbone, image_size: {}


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add (or replace) a method; returns the spec so a module can keep it as a constant."""
    if not dataclasses.is_dataclass(spec.settings):
        raise TypeError(f"{spec.name}: settings must be a dataclass, got {spec.settings!r}")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def names() -> list[str]:
    return list(dict.fromkeys([*BUILTIN, *_REGISTRY]))


def get(name: str) -> MethodSpec:
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(names())}")
    return _REGISTRY[name]


@dataclass(frozen=True)
class DetectorConfig:
    """One detector fully specified: the method, its settings, and the study-level fields it shares.

    Hashable and picklable, so it travels to worker processes and keys caches."""

    method: str
    settings: Any
    backbone: str
    image_size: int
    seed: int = 0
    device: str = "auto"

    @property
    def spec(self) -> MethodSpec:
        return get(self.method)

    def build(self, cache_dir: str | Path | None = None) -> "Detector":
        """An unfitted detector."""
        return self.spec.detector.from_settings(self.settings, backbone=self.backbone, image_size=self.image_size,
                                                seed=self.seed, device=self.device, cache_dir=cache_dir)

    def replace(self, **changes: Any) -> "DetectorConfig":
        """A copy with shared fields (backbone, image_size, seed, device) or method settings changed."""
        shared = {k: v for k, v in changes.items() if k in (*SHARED_FIELDS, "device")}
        own = {k: v for k, v in changes.items() if k not in shared}
        fields = {f.name for f in dataclasses.fields(self.settings)}
        unknown = set(own) - fields
        if unknown:
            raise ValueError(f"{self.method} has no setting(s) {sorted(unknown)}; known: {sorted(fields)} "
                             f"and {', '.join(SHARED_FIELDS)}")
        own = {k: tuple(v) if isinstance(v, list) else v for k, v in own.items()}
        settings = dataclasses.replace(self.settings, **own) if own else self.settings
        return dataclasses.replace(self, settings=settings, **shared)


def configured(run_config, method: str, seed: int | None = None) -> DetectorConfig:
    """The detector a study configuration asks for, for one model seed (the first by default)."""
    model = run_config.model
    return DetectorConfig(method, run_config.methods[method], model.backbone, model.image_size,
                          int(model.seeds[0] if seed is None else seed), model.device)
