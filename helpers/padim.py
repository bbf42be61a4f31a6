"""PaDiM as anomalib implements it (``PadimModel``), behind the study's :class:`~helpers.detector.Detector` API."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from helpers import backbones, registry
from helpers import patchcore as maps_module  # the shared bilinear-upsampling + Gaussian-blur operator
from helpers.detector import Detector, Prediction, read_model, write_model
from helpers.threads import one_torch_thread

if TYPE_CHECKING:
    from anomalib.models.image.padim.torch_model import PadimModel


@dataclass(frozen=True)
class PadimSettings:
    """The profile block ``methods.padim``."""

    n_features: int = 100  # random subset of embedding channels (anomalib's ``n_features``)
    stages: tuple[str, ...] | None = None  # None: the backbone's stride-4, -8 and -16 stages


def default_stages(backbone: str) -> tuple[str, ...]:
    """The first three stages (ResNet's layer1..layer3), as in the paper."""
    return tuple(backbones.spec(backbone).stage_names[0:3])


def mahalanobis(embedding: torch.Tensor, mean: torch.Tensor, inv_covariance: torch.Tensor) -> torch.Tensor:
    """``(B, 1, h, w)`` Mahalanobis distances of ``(B, D, h, w)`` embeddings to per-position Gaussians (mean
    ``(D, h*w)``, inverse covariance ``(h*w, D, D)``): anomalib's ``AnomalyMapGenerator.compute_distance``, the
    same products, with the differences laid out position-major before the batched product, which then reads
    contiguous rows instead of a permuted view (a fraction of the time on the CPU)."""
    b, d, h, w = embedding.shape
    delta = (embedding.reshape(b, d, h * w) - mean).permute(2, 0, 1).contiguous()
    distances = torch.linalg.vecdot(torch.bmm(delta, inv_covariance), delta)
    return distances.T.reshape(b, 1, h, w).clamp(0).sqrt()


class Padim(Detector):
    """anomalib's PaDiM model, fed with backbone features from the on-disk cache instead of its own extractor."""

    method = "padim"

    def __init__(self, backbone: str = "efficientnet_lite0", stages: Sequence[str] | None = None,
                 image_size: int = 256, n_features: int = 100, seed: int = 0, device: str = "auto",
                 cache_dir: str | Path | None = None, batch_size: int = 32) -> None:
        self.backbone = backbone
        self.stages = backbones.check_stages(backbone, stages or default_stages(backbone))
        self.image_size = int(image_size)
        self.n_features = int(n_features)
        self.seed = int(seed)
        self.device = backbones.resolve_device(device)
        self.cache_dir = cache_dir
        self.batch_size = batch_size  # images per embedding chunk: bounds memory, does not change results
        self.model = self._build_model().to(self.device).eval()

    @classmethod
    def from_settings(cls, settings: PadimSettings, *, backbone: str, image_size: int, seed: int,
                      device: str = "auto", cache_dir: str | Path | None = None) -> "Padim":
        return cls(backbone=backbone, stages=settings.stages, image_size=image_size,
                   n_features=settings.n_features, seed=seed, device=device, cache_dir=cache_dir)

    def _build_model(self) -> "PadimModel":
        from anomalib.models.image.padim.torch_model import PadimModel  # imported here: anomalib loads slowly

        # anomalib reads n_features=0 as "use the paper default", which does not exist for our backbones.
        if self.n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {self.n_features}")
        # anomalib draws the feature subset `idx` with the global torch RNG while constructing; seeding a
        # forked RNG makes idx a function of `seed` and leaves the caller's random state untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            try:
                model = PadimModel(backbone=backbones.spec(self.backbone).timm_name, layers=list(self.stages),
                                   pre_trained=False, n_features=self.n_features)
            except ValueError as exc:  # anomalib's bound: n_features <= channels of the chosen stages
                raise ValueError(f"n_features={self.n_features} does not fit backbone {self.backbone} "
                                 f"stages {list(self.stages)}: {exc}") from None
            # Inside the fork too: reading the weights builds a randomly initialised timm model.
            weights = backbones.features_state_dict(self.backbone)
        # Unexpected keys are stages past the last one used (timm truncates); missing ones would be random.
        missing, _ = model.feature_extractor.feature_extractor.load_state_dict(weights, strict=False)
        if missing:
            raise RuntimeError(f"backbone {self.backbone}: weights lack {len(missing)} tensors, e.g. {missing[:3]}")
        return model

    @property
    def idx(self) -> torch.Tensor:
        """The random subset of embedding channels anomalib keeps (drawn from ``seed``)."""
        return self.model.idx.cpu()

    @property
    def is_fitted(self) -> bool:
        return self.model.gaussian.mean.numel() > 0

    def settings(self) -> dict:
        return {"backbone": self.backbone, "stages": list(self.stages), "image_size": self.image_size,
                "n_features": self.n_features, "seed": self.seed}

    def _embedding(self, feats: dict[str, torch.Tensor], start: int, stop: int) -> torch.Tensor:
        chunk = {s: feats[s][start:stop].to(self.device) for s in self.stages}
        return self.model.generate_embedding(chunk)

    @torch.no_grad()
    def fit_features(self, feats: dict[str, torch.Tensor]) -> "Padim":
        """Fit anomalib's Gaussian to the embeddings of normal images' features ``{stage: (N, C, h, w)}``."""
        n = len(feats[self.stages[0]])
        # anomalib's training path is memory_bank.append(embedding) per batch, then gaussian.fit(vstack(...));
        # filling one preallocated tensor chunk by chunk gives the same input without the stacked copy.
        first = self._embedding(feats, 0, self.batch_size)
        embeddings = first.new_empty((n, *first.shape[1:]))
        embeddings[:len(first)] = first
        for start in range(self.batch_size, n, self.batch_size):
            embeddings[start:start + self.batch_size] = self._embedding(feats, start, start + self.batch_size)
        with one_torch_thread(self.device.type == "cpu"):  # anomalib loops over positions with tiny matrices
            self.model.gaussian.fit(embeddings)
        # anomalib's inverse comes back transposed in memory; a saved and reloaded model is contiguous, and the
        # Mahalanobis product rounds differently in the two layouts. Contiguous here, so a freshly fitted model
        # and its cached copy give bit-identical scores.
        gaussian = self.model.gaussian
        gaussian.inv_covariance = gaussian.inv_covariance.contiguous()
        gaussian.mean = gaussian.mean.contiguous()
        return self

    @torch.no_grad()
    def predict_features(self, feats: dict[str, torch.Tensor]) -> Prediction:
        """Anomaly maps and image scores exactly as anomalib's eval-mode ``PadimModel.forward`` computes them."""
        if not self.is_fitted:
            raise RuntimeError("Padim.predict before fit (or load)")
        n = len(feats[self.stages[0]])
        with one_torch_thread(self.device.type == "cpu"):  # per-position products of 100-d matrices (threads.py)
            return self._predict_batches(feats, n)

    def _predict_batches(self, feats: dict[str, torch.Tensor], n: int) -> Prediction:
        scores, maps = [], []
        for start in range(0, n, self.batch_size):
            distance = mahalanobis(self._embedding(feats, start, start + self.batch_size),
                                   self.model.gaussian.mean, self.model.gaussian.inv_covariance)
            # anomalib then upsamples bilinearly to the input size and blurs with its GaussianBlur2d (sigma 4, as
            # PatchCore's). Both are separable linear maps, applied here as two small matrix products: the same
            # map to float32 rounding, and a small fraction of the cost of the 33 x 33 convolution.
            anomaly_map = maps_module.anomaly_maps(distance[:, 0], self.image_size, maps_module.MAP_SIGMA)
            scores.append(torch.amax(anomaly_map, dim=(-2, -1)).flatten().cpu())
            maps.append(anomaly_map.cpu())
        return Prediction(torch.cat(scores).numpy().astype(np.float32), torch.cat(maps).numpy().astype(np.float32))

    def save(self, path: str | Path) -> Path:
        if not self.is_fitted:
            raise RuntimeError("Padim.save before fit")
        tensors = {"mean": self.model.gaussian.mean, "inv_covariance": self.model.gaussian.inv_covariance,
                   "idx": self.model.idx}
        import anomalib

        return write_model(path, tensors, self.method, self.settings(), anomalib_version=anomalib.__version__)

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", cache_dir: str | Path | None = None) -> "Padim":
        detector, tensors = read_model(cls, path, device, cache_dir)
        # idx comes from the file, not from re-drawing it, so a model stays valid across library versions.
        detector.model.idx = tensors["idx"]
        detector.model.gaussian.mean = tensors["mean"]
        detector.model.gaussian.inv_covariance = tensors["inv_covariance"]
        return detector

    def gaussian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position mean ``(D, P)`` and covariance ``(P, D, D)`` (inverted back from anomalib's stored
        inverse, in float64)."""
        if not self.is_fitted:
            raise RuntimeError("Padim.gaussian before fit (or load)")
        return self.model.gaussian.mean, torch.linalg.inv(self.model.gaussian.inv_covariance.double())

    @torch.no_grad()
    def adapted(self, feats: dict[str, torch.Tensor]) -> "Padim":
        """This model with its per-position means re-estimated from the normal images ``feats`` and its inverse
        covariances kept. A shift of the domain moves the features' centre far more than their spread can be
        estimated from a few images (100-dimensional covariances from 5-40 images are mostly the 0.01 ridge
        anomalib adds), so the covariances stay the source's; re-estimating both is the refit regime.
        ``self`` is unchanged."""
        import copy

        if not self.is_fitted:
            raise RuntimeError("Padim.adapted before fit (or load)")
        n = len(feats[self.stages[0]])
        if n < 1:
            raise ValueError("Padim.adapted needs at least one image")
        total = None
        for start in range(0, n, self.batch_size):
            chunk = self._embedding(feats, start, start + self.batch_size)
            part = chunk.reshape(len(chunk), chunk.shape[1], -1).sum(0)
            total = part if total is None else total + part
        # Shallow copies with their own module and buffer tables: the backbone, the channel subset and the inverse
        # covariances are shared with the source (nothing writes them after a fit); a deep copy of the whole
        # model would cost more than everything else here.
        gaussian = copy.copy(self.model.gaussian)
        gaussian._buffers = dict(self.model.gaussian._buffers)
        gaussian.mean = (total / n).contiguous()
        model = copy.copy(self.model)
        model._modules = {**self.model._modules, "gaussian": gaussian}
        adapted = copy.copy(self)
        adapted.model = model
        return adapted


SPEC = registry.register(registry.MethodSpec(
    name="padim", detector=Padim, settings=PadimSettings, label="PaDiM", colour="C1", marker="s",
    linestyle="--",
    sweep_grid=lambda settings, backbone, image_size: {
        "n_features": [50, 100], "image_size": [image_size, 256],
        "stages": [list(default_stages(backbone)), list(default_stages(backbone)[1:])]}))
