import numpy as np
import pytest
from PIL import Image

from helpers.data import DatasetError, list_categories, list_samples, load_image, load_mask
from tests.conftest import write_tiny_mvtec


def test_lists_samples_with_labels_and_masks(tiny_mvtec):
    assert list_categories(tiny_mvtec) == ["alpha", "beta"]
    samples = list_samples(tiny_mvtec, "alpha")
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    assert len(train) == 12 and len(test) == 4 + 2 * 3
    for s in test:
        assert s.label == (s.defect_type != "good")
        assert (s.mask_path is not None) == bool(s.label)
    assert len({s.key for s in samples}) == len(samples)


def test_images_come_out_rgb_and_masks_binary(tmp_path, tiny_mvtec):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((10, 12), 77, np.uint8)).save(grey)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.full((10, 12, 4), 200, np.uint8), mode="RGBA").save(rgba)
    pal = tmp_path / "pal.png"
    Image.fromarray(np.full((10, 12, 3), 30, np.uint8)).convert("P").save(pal)
    for path in (grey, rgba, pal):
        img = load_image(path)
        assert img.shape == (10, 12, 3) and img.dtype == np.uint8
    assert load_image(grey, size=16).shape == (16, 16, 3)
    soft = tmp_path / "soft_mask.png"
    m = np.zeros((20, 20), np.uint8)
    m[5:9, 5:9] = 128
    Image.fromarray(m).save(soft)
    mask = load_mask(soft, size=40)
    assert mask.dtype == bool and mask.sum() == 8 * 8


def test_category_without_ground_truth_is_image_level_only(tmp_path):
    root = write_tiny_mvtec(tmp_path / "d", categories=("gamma",), with_ground_truth=False)
    samples = list_samples(root, "gamma")
    assert any(s.label == 1 for s in samples)
    assert all(s.mask_path is None for s in samples)


def test_clear_errors_name_the_path(tmp_path, tiny_mvtec):
    with pytest.raises(DatasetError, match="nope"):
        list_samples(tiny_mvtec, "nope")
    missing = next((tiny_mvtec / "alpha" / "ground_truth" / "hole").glob("*.png"))
    missing.unlink()
    with pytest.raises(DatasetError, match="has no mask"):
        list_samples(tiny_mvtec, "alpha")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DatasetError, match="broken.png"):
        load_image(broken)
