"""A third detector is one module and one registry entry: prove it with a trivial detector run through the
experiment layer, with no change anywhere else."""
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from helpers import config, experiments, registry
from helpers.detector import Detector, Prediction, read_model, write_model
from helpers.paths import Run
from tests.helpers_run import tiny_run


@dataclass(frozen=True)
class MeanDistanceSettings:
    scale: float = 1.0


class MeanDistance(Detector):
    """Distance of each patch feature to the mean training feature: the simplest embedding detector."""

    method = "mean_distance"

    def __init__(self, backbone="efficientnet_lite0", image_size=64, scale=1.0, seed=0, device="cpu",
                 cache_dir=None, stages=("blocks.2",)):
        self.backbone, self.image_size, self.scale, self.seed = backbone, int(image_size), float(scale), seed
        self.stages, self.device, self.cache_dir = tuple(stages), torch.device(device), cache_dir
        self.mean = None

    @classmethod
    def from_settings(cls, settings, *, backbone, image_size, seed, device="auto", cache_dir=None):
        return cls(backbone=backbone, image_size=image_size, scale=settings.scale, seed=seed, device="cpu",
                   cache_dir=cache_dir)

    def fit_features(self, feats):
        self.mean = feats[self.stages[0]].mean(dim=(0, 2, 3))
        return self

    def predict_features(self, feats):
        x = feats[self.stages[0]]
        dist = ((x - self.mean[None, :, None, None]) ** 2).sum(1).sqrt() * self.scale
        maps = torch.nn.functional.interpolate(dist[:, None], size=self.image_size, mode="bilinear")[:, 0]
        return Prediction(dist.amax(dim=(1, 2)).numpy().astype(np.float32), maps.numpy().astype(np.float32))

    def save(self, path):
        return write_model(path, {"mean": self.mean}, self.method, self.settings())

    @classmethod
    def load(cls, path, device="auto", cache_dir=None):
        detector, tensors = read_model(cls, path, "cpu", cache_dir)
        detector.mean = tensors["mean"]
        return detector

    def settings(self):
        return {"backbone": self.backbone, "image_size": self.image_size, "scale": self.scale, "seed": self.seed,
                "stages": list(self.stages)}


@pytest.fixture
def third_method():
    registry.register(registry.MethodSpec(name="mean_distance", detector=MeanDistance, settings=MeanDistanceSettings,
                                          label="Mean distance", colour="C2", marker="^", linestyle=":",
                                          sweep_grid=lambda s, b, i: {"scale": [2.0]}))
    yield
    registry.unregister("mean_distance")


def test_a_registered_third_detector_runs_through_the_experiment_layer(third_method, tiny_mvtec, tmp_path,
                                                                         monkeypatch):
    run = tiny_run(tiny_mvtec, tmp_path, monkeypatch, overrides={"methods": {"mean_distance": {"scale": 3.0}}})
    assert set(run.config.methods) == {"patchcore", "padim", "mean_distance"}
    assert run.config.methods["mean_distance"] == MeanDistanceSettings(3.0)
    table, scores = experiments.run_method(run, "mean_distance", [experiments.CLEAN], seeds=[0], progress=False)
    assert set(table["category"]) == {"alpha", "beta"} and (table["method"] == "mean_distance").all()
    assert table["image_auroc"].between(0, 1).all() and len(scores) == table["n_images"].sum()
    # The tiny defects are bright or dark squares: a distance to the mean feature finds most of them.
    assert table["image_auroc"].mean() > 0.6
    sweep, _ = experiments.sweep(run, "mean_distance", [experiments.CLEAN], progress=False)
    assert set(sweep["param"]) == {"default", "scale"}
    from helpers import plots

    assert plots.method_style("mean_distance")["marker"] == "^"


def test_an_unregistered_method_in_a_profile_is_named(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("data: {dataset: synthetic, root: x, categories: [a]}\nmethods: {mean_distance: {}}\n")
    with pytest.raises(config.ProfileError, match="unknown method 'methods.mean_distance'"):
        Run.open(path)


def test_detector_config_replace_checks_the_method_settings():
    base = registry.DetectorConfig("patchcore", registry.get("patchcore").settings(), "efficientnet_lite0", 64)
    assert base.replace(k=3).settings.k == 3 and base.replace(image_size=96).image_size == 96
    with pytest.raises(ValueError, match="patchcore has no setting"):
        base.replace(n_features=3)
