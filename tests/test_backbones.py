"""Backbone registry: the offline EfficientNet-Lite0 weights are the real ImageNet ones, stages have the
registered strides, and the torchvision-weights path loads a cached file or fails with a useful message."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data

from helpers import backbones

EGYPTIAN_CAT = 285  # ImageNet-1k class index


@pytest.fixture
def fresh_backbone_cache():
    """Loaded networks are memoised; tests that swap weights must not leak them into other tests."""
    backbones._load_cached.cache_clear()
    yield
    backbones._load_cached.cache_clear()


def test_lite0_weights_classify_a_cat_as_an_egyptian_cat():
    s = backbones.spec("efficientnet_lite0")
    with torch.random.fork_rng(devices=[]):
        net = timm.create_model(s.timm_name, pretrained=False)
    net.load_state_dict(s.weights(), strict=True)  # the full classifier: a mis-mapped tensor cannot hide
    image = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224), Image.BILINEAR))
    x = backbones.normalise(torch.from_numpy(image.copy()).permute(2, 0, 1)[None], "efficientnet_lite0")
    with torch.no_grad():
        probs = net.eval()(x).softmax(1)[0]
    assert int(probs.argmax()) == EGYPTIAN_CAT
    assert float(probs[EGYPTIAN_CAT]) > 0.3


def test_stage_outputs_have_the_registered_channels_and_strides():
    net = backbones.load("efficientnet_lite0", "cpu")
    out = backbones.forward_stages(net, "efficientnet_lite0", torch.zeros(2, 3, 64, 96))
    s = backbones.spec("efficientnet_lite0")
    assert list(out) == list(s.stages)
    for (stage, stride), channels in zip(s.stages.items(), net.feature_info.channels()):
        assert out[stage].shape == (2, channels, 64 // stride, 96 // stride), stage


def _resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model("resnet18", pretrained=False).state_dict()


def test_torchvision_weights_are_read_from_the_hub_cache(tmp_path, monkeypatch, fresh_backbone_cache):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("STUDY_OFFLINE", "1")  # never download, even when the file were missing
    state = _resnet18_state(seed=4)
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    assert backbones.is_available("resnet18")

    net = backbones.load("resnet18", "cpu")
    with torch.random.fork_rng(devices=[]):
        reference = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
    reference.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    got = backbones.forward_stages(net, "resnet18", x)
    with torch.no_grad():
        for (stage, tensor), expected in zip(got.items(), reference.eval()(x)):
            # Our network runs channels-last, which only reorders the convolutions' sums.
            torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-5, msg=stage)


def test_missing_torchvision_weights_offline_name_the_file_and_the_fallback(tmp_path, monkeypatch,
                                                                             fresh_backbone_cache):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("STUDY_OFFLINE", "1")
    assert not backbones.is_available("resnet18")
    with pytest.raises(backbones.BackboneUnavailable) as info:
        backbones.load("resnet18", "cpu")
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message and "efficientnet_lite0" in message
    assert str(tmp_path) in message  # where to put the file


def test_unknown_backbone_and_stage_are_named():
    with pytest.raises(KeyError, match="unknown backbone 'vgg'"):
        backbones.spec("vgg")
    with pytest.raises(ValueError, match="layer9"):
        backbones.check_stages("resnet18", ["layer9"])
