"""The one interface both detectors satisfy, so every experiment is written once.

A detector is fit on normal images and predicts, for each image, a scalar anomaly score and an anomaly map
at the model's input resolution (``image_size`` x ``image_size``). Images are given as paths: the detector
gets their backbone features from the on-disk feature cache (:mod:`helpers.features`), so a sweep never
recomputes the backbone.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass
class Prediction:
    image_scores: np.ndarray  # (N,) float32, higher = more anomalous
    anomaly_maps: np.ndarray  # (N, image_size, image_size) float32

    def __post_init__(self) -> None:
        if self.image_scores.ndim != 1 or self.anomaly_maps.ndim != 3:
            raise ValueError("image_scores must be (N,) and anomaly_maps (N, H, W)")
        if len(self.image_scores) != len(self.anomaly_maps):
            raise ValueError("image_scores and anomaly_maps disagree on N")


class Detector(ABC):
    """Fit on normal images; predict image scores and anomaly maps; save; load."""

    method: str
    # Settings that only change scoring, not the fitted state: changing them never requires a re-fit.
    INFERENCE_SETTINGS: tuple[str, ...] = ()

    @abstractmethod
    def fit(self, images: Sequence[str | Path]) -> "Detector":
        """Learn normality from defect-free images. Returns self."""

    @abstractmethod
    def predict(self, images: Sequence[str | Path]) -> Prediction:
        """Score images; maps are at ``image_size`` resolution."""

    @abstractmethod
    def save(self, path: str | Path) -> Path:
        """Write the fitted model to ``path`` (a safetensors/npz file, never a pickle)."""

    @classmethod
    @abstractmethod
    def load(cls, path: str | Path) -> "Detector":
        """Read a model written by :meth:`save`."""

    @abstractmethod
    def settings(self) -> dict:
        """Every hyperparameter, as plain values: used for result paths and cache keys."""


METHODS = ("patchcore", "padim")


def detector_class(method: str) -> type[Detector]:
    if method == "patchcore":
        from helpers.patchcore import PatchCore

        return PatchCore
    if method == "padim":
        from helpers.padim import Padim

        return Padim
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def make_detector(method: str, **settings) -> Detector:
    """Build an unfitted detector by name; ``settings`` are its constructor's keyword arguments."""
    return detector_class(method)(**settings)


def saved_settings(path: str | Path, method: str | None = None) -> tuple[str, dict]:
    """(method, settings) recorded in a saved detector; with ``method``, refuse a file of another method."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    found = meta.get("method")
    if found not in METHODS or (method is not None and found != method):
        raise ValueError(f"{path}: not a saved {method or 'detector'} model (metadata method={found!r})")
    return found, json.loads(meta["settings"])


def write_model(path: str | Path, tensors: dict, method: str, settings: dict, **metadata: str) -> Path:
    """A detector's tensors as safetensors, with its method and settings in the metadata (what
    :func:`saved_settings` reads back); written aside and renamed, so no reader ever sees half a model."""
    import json

    from safetensors.torch import save_file

    from helpers.paths import atomic_write

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"method": method, "settings": json.dumps(settings), **metadata}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_model(cls: type[Detector], path: str | Path, device: str = "auto",
               cache_dir: str | Path | None = None) -> tuple[Detector, dict]:
    """An unfitted ``cls`` built from the settings a saved model records, and the model's tensors on its device."""
    from safetensors.torch import load_file

    _, settings = saved_settings(path, cls.method)
    detector = cls(**settings, device=device, cache_dir=cache_dir)
    return detector, load_file(str(path), device=str(detector.device))


def load_detector(path: str | Path) -> Detector:
    """Load a saved detector of either method (the file records which)."""
    method, _ = saved_settings(path)
    return detector_class(method).load(path)
