import torch

from helpers import features
from helpers.data import list_samples


def _train_paths(root, cat="alpha", n=4):
    return [s.image_path for s in list_samples(root, cat) if s.split == "train"][:n]


def test_cache_returns_what_compute_returns_and_is_reused(tiny_mvtec, tmp_path, monkeypatch):
    paths = _train_paths(tiny_mvtec)
    cache = tmp_path / "cache"
    first = features.extract(paths, "efficientnet_lite0", 64, ["blocks.2"], cache_dir=cache, progress=False)
    direct = features.compute(paths, "efficientnet_lite0", 64, ["blocks.2"])
    assert torch.allclose(first["blocks.2"], direct["blocks.2"])
    assert first["blocks.2"].shape == (4, 40, 8, 8)

    def fail(*a, **k):
        raise AssertionError("backbone recomputed although cached")

    monkeypatch.setattr(features, "compute", fail)
    again = features.extract(paths, "efficientnet_lite0", 64, ["blocks.2"], cache_dir=cache, progress=False)
    assert torch.equal(again["blocks.2"], first["blocks.2"])


def test_changing_an_image_or_size_never_returns_a_stale_entry(tiny_mvtec, tmp_path):
    paths = _train_paths(tiny_mvtec)
    cache = tmp_path / "cache"
    before = features.extract(paths, "efficientnet_lite0", 64, ["blocks.2"], cache_dir=cache, progress=False)
    other_size = features.extract(paths, "efficientnet_lite0", 96, ["blocks.2"], cache_dir=cache, progress=False)
    assert other_size["blocks.2"].shape[-1] == 12
    paths[0].write_bytes(paths[1].read_bytes())  # same name, new content
    after = features.extract(paths, "efficientnet_lite0", 64, ["blocks.2"], cache_dir=cache, progress=False)
    assert torch.allclose(after["blocks.2"][0], before["blocks.2"][1])
    assert not torch.allclose(after["blocks.2"][0], before["blocks.2"][0])
