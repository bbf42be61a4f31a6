"""The one interface every detector satisfies, so every experiment is written once.

A detector is fit on normal images and predicts, for each image, a scalar anomaly score and an anomaly map
at the model's input resolution (``image_size`` x ``image_size``). Images are given as paths, or as backbone
features read from the on-disk feature cache (:mod:`helpers.features`), so a sweep never recomputes the
backbone and an experiment can fit on any subset of cached images.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch


@dataclass
class Prediction:
    image_scores: np.ndarray  # (N,) float32, higher = more anomalous
    anomaly_maps: np.ndarray  # (N, image_size, image_size) float32

    def __post_init__(self) -> None:
        if self.image_scores.ndim != 1 or self.anomaly_maps.ndim != 3:
            raise ValueError("image_scores must be (N,) and anomaly_maps (N, H, W)")
        if len(self.image_scores) != len(self.anomaly_maps):
            raise ValueError("image_scores and anomaly_maps disagree on N")


Features = dict[str, torch.Tensor]  # stage name -> (N, C, h, w) float32


class Detector(ABC):
    """Fit on normal images; predict image scores and anomaly maps; save; load.

    Subclasses set ``method``, ``backbone``, ``image_size``, ``stages``, ``device`` and ``cache_dir``.
    """

    method: str
    backbone: str
    image_size: int
    stages: tuple[str, ...]
    device: torch.device
    cache_dir: str | Path | None = None
    # Settings that only change scoring, not the fitted state: changing them never requires a re-fit.
    INFERENCE_SETTINGS: tuple[str, ...] = ()

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Any, *, backbone: str, image_size: int, seed: int, device: str = "auto",
                      cache_dir: str | Path | None = None) -> "Detector":
        """An unfitted detector from the method's settings dataclass and the study-level fields."""

    def features(self, images: Sequence[str | Path]) -> Features:
        """Backbone features of ``images`` at this detector's stages, from the feature cache."""
        from helpers import features

        return features.extract(list(images), self.backbone, self.image_size, self.stages,
                                device=str(self.device), cache_dir=self.cache_dir)

    def fit(self, images: Sequence[str | Path]) -> "Detector":
        """Learn normality from defect-free images. Returns self."""
        return self.fit_features(self.features(images))

    def predict(self, images: Sequence[str | Path]) -> Prediction:
        """Score images; maps are at ``image_size`` resolution."""
        return self.predict_features(self.features(images))

    @abstractmethod
    def fit_features(self, feats: Features) -> "Detector":
        """Learn normality from normal images' features. Returns self."""

    @abstractmethod
    def predict_features(self, feats: Features) -> Prediction:
        """Scores and maps from features."""

    def adapted(self, feats: Features) -> "Detector":
        """A new detector that keeps this fitted model and adds the normal images ``feats`` (e.g. a few normals of
        a new domain); this detector is left unchanged. Methods that support it override this."""
        raise NotImplementedError(f"{type(self).__name__}.adapted is not implemented: method {self.method!r} "
                                  f"cannot add normal images to a fitted model")

    @abstractmethod
    def save(self, path: str | Path) -> Path:
        """Write the fitted model to ``path`` (safetensors, never a pickle)."""

    @classmethod
    @abstractmethod
    def load(cls, path: str | Path, device: str = "auto", cache_dir: str | Path | None = None) -> "Detector":
        """Read a model written by :meth:`save`."""

    @abstractmethod
    def settings(self) -> dict:
        """Every hyperparameter as plain values (constructor keywords): used for cache keys and saved models."""

    # --- what the unified study asks of a method; None where the method has no such notion ----------------

    def patch_neighbours(self, feats: Features) -> tuple[np.ndarray, np.ndarray] | None:
        """For a memory-bank method: per test patch ``(N, h, w)`` its score and the training-patch row its
        nearest bank entry came from (image-major, ``h * w`` rows per training image)."""
        return None

    def gaussian(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a Gaussian method: per-position mean ``(D, P)`` and covariance ``(P, D, D)``."""
        return None


def saved_settings(path: str | Path, method: str | None = None) -> tuple[str, dict]:
    """(method, settings) recorded in a saved detector; with ``method``, refuse a file of another method."""
    from safetensors import safe_open

    from helpers import registry

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    found = meta.get("method")
    if found not in registry.names() or (method is not None and found != method):
        raise ValueError(f"{path}: not a saved {method or 'detector'} model (metadata method={found!r})")
    return found, json.loads(meta["settings"])


def write_model(path: str | Path, tensors: dict, method: str, settings: dict, **metadata: str) -> Path:
    """A detector's tensors as safetensors, with its method and settings in the metadata (what
    :func:`saved_settings` reads back); written aside and renamed, so no reader ever sees half a model."""
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


def load_detector(path: str | Path, device: str = "auto", cache_dir: str | Path | None = None) -> Detector:
    """Load a saved detector of any registered method (the file records which)."""
    from helpers import registry

    method, _ = saved_settings(path)
    return registry.get(method).detector.load(path, device=device, cache_dir=cache_dir)
