"""PaDiM wrapper: it is anomalib's model, it round-trips through safetensors, it separates defects, and it is seeded."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.models.image.padim.torch_model import PadimModel

from helpers import backbones, efficiency
from helpers import padim as padim_module
from helpers.data import list_samples
from helpers.detector import load_detector
from helpers.padim import Padim
from tests.conftest import write_tiny_mvtec

BACKBONE = "efficientnet_lite0"
STAGES = padim_module.default_stages(BACKBONE)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One category of the tiny_mvtec data, shared so the module fits PaDiM once."""
    root = write_tiny_mvtec(tmp_path_factory.mktemp("padim") / "tiny", categories=("alpha",))
    samples = list_samples(root, "alpha")
    test = [s for s in samples if s.split == "test"]
    return ([s.image_path for s in samples if s.split == "train"], [s.image_path for s in test],
            np.array([s.label for s in test]))


@pytest.fixture(scope="module")
def fitted(tiny, tmp_path_factory):
    detector = Padim(image_size=64, n_features=50, seed=3, device="cpu", cache_dir=tmp_path_factory.mktemp("cache"))
    return detector.fit(tiny[0])


def test_matches_anomalib_padim_trained_its_own_way():
    gen = torch.Generator().manual_seed(1)
    train_images = torch.randn(6, 3, 64, 64, generator=gen)  # already "normalised": zero mean, unit variance
    test_images = torch.randn(3, 3, 64, 64, generator=gen)

    torch.manual_seed(7)  # how an anomalib user seeds the random feature subset
    reference = PadimModel(backbone=backbones.spec(BACKBONE).timm_name, layers=list(STAGES), pre_trained=False,
                           n_features=60)
    reference.feature_extractor.feature_extractor.load_state_dict(backbones.features_state_dict(BACKBONE))
    # Our backbone runs channels-last with its batch norms folded (test_backbones checks both against timm's
    # network); the same network here makes the two PaDiM computations comparable to float rounding, which the
    # covariance inverse of six images amplifies.
    backbones.fold_batch_norms(reference.feature_extractor.feature_extractor.eval())
    reference.feature_extractor.to(memory_format=torch.channels_last)
    train_images, test_images = (x.contiguous(memory_format=torch.channels_last) for x in (train_images, test_images))
    reference.train()
    reference(train_images)
    reference.fit()
    reference.eval()
    expected = reference(test_images)

    ours = Padim(image_size=64, n_features=60, seed=7, device="cpu", batch_size=4)  # 4: chunking is exercised
    assert torch.equal(ours.idx, reference.idx)
    net = backbones.load(BACKBONE, "cpu")
    ours.fit_features(backbones.forward_stages(net, BACKBONE, train_images))
    got = ours.predict_features(backbones.forward_stages(net, BACKBONE, test_images))

    assert got.anomaly_maps.shape == (3, 64, 64)
    torch.testing.assert_close(torch.from_numpy(got.anomaly_maps), expected.anomaly_map[:, 0], rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.from_numpy(got.image_scores), expected.pred_score.flatten(), rtol=1e-5, atol=0)


def test_fit_predict_shapes_and_defects_score_higher(tiny, fitted):
    _, test, labels = tiny
    pred = fitted.predict(test)
    assert pred.image_scores.shape == (len(test),)
    assert pred.anomaly_maps.shape == (len(test), 64, 64)
    assert np.isfinite(pred.anomaly_maps).all()
    assert pred.image_scores[labels == 1].mean() > pred.image_scores[labels == 0].mean()


def test_save_load_round_trip(tiny, fitted, tmp_path):
    detector, test = fitted, tiny[1]
    path = detector.save(tmp_path / "model" / "padim.safetensors")
    loaded = load_detector(path, cache_dir=detector.cache_dir)
    assert isinstance(loaded, Padim)
    assert loaded.settings() == detector.settings() == {
        "backbone": BACKBONE, "stages": list(STAGES), "image_size": 64, "n_features": 50, "seed": 3}
    assert torch.equal(loaded.idx, detector.idx)
    before, after = detector.predict(test), loaded.predict(test)
    np.testing.assert_array_equal(after.image_scores, before.image_scores)
    np.testing.assert_array_equal(after.anomaly_maps, before.anomaly_maps)


def test_unfitted_model_refuses_to_predict_or_save(tmp_path):
    detector = Padim(image_size=64, n_features=10, device="cpu")
    with pytest.raises(RuntimeError, match="before fit"):
        detector.predict_features({s: torch.zeros(1, 1, 1, 1) for s in STAGES})
    with pytest.raises(RuntimeError, match="before fit"):
        detector.save(tmp_path / "m.safetensors")


@pytest.mark.parametrize("n_features", [0, 177])  # the three default stages have 24 + 40 + 112 = 176 channels
def test_n_features_out_of_range_is_a_clear_error(n_features):
    with pytest.raises(ValueError, match="n_features"):
        Padim(n_features=n_features, device="cpu")


def test_feature_subset_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = (Padim(n_features=50, seed=s, device="cpu").idx for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len(a.unique()) == 50


def test_efficiency_measures_padim_and_knows_no_method():
    source = Path(efficiency.__file__).read_text()
    imported = {alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert not any("padim" in m or "patchcore" in m or "anomalib" in m for m in imported)


def test_efficiency_measure_reports_positive_costs(tiny):
    train, test, _ = tiny
    result = efficiency.measure(lambda cache: Padim(image_size=64, n_features=20, device="cpu", cache_dir=cache),
                                train, test, warmup=False)  # the module's other tests already warmed up
    for key in ("fit_s", "infer_ms_per_image", "model_bytes"):
        assert result[key] > 0, key
    for key in ("fit_peak_mb", "infer_peak_mb"):
        assert result[key] >= 0 and math.isfinite(result[key]), key
    assert (result["n_train"], result["n_test"]) == (len(train), len(test))
