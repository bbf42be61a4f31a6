"""Reading datasets: samples of both layouts, and every image mode scaled (never clipped) to 8-bit RGB."""
import numpy as np
import pytest
from PIL import Image

from helpers.data import (
    MVTEC_AD,
    MVTEC_AD2,
    MVTEC_AD2_OBJECTS,
    DatasetError,
    has_ground_truth,
    layout_of,
    list_categories,
    list_samples,
    load_image,
    load_mask,
    mask_path_for,
)
from tests.conftest import write_tiny_mvtec
from tests.image_files import GREY, GREY_ALPHA, RGB, RGB_ALPHA, write_png, write_png_rows
from tests.mvtec_ad2 import write_tiny_mvtec_ad2

# Values across the whole 16-bit range, including those that an 8-bit clip would turn white.
WORDS = np.array([[0, 255, 256, 257], [1000, 32768, 65280, 65535]], dtype=np.uint16)
BYTES = np.array([[0, 1, 127, 128], [200, 254, 255, 33]], dtype=np.uint8)


def grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(grey, np.uint8)[..., None], 3, axis=2)


def high_byte(words: np.ndarray) -> np.ndarray:
    return (np.asarray(words).astype(np.uint32) >> 8).astype(np.uint8)


def case_1bit_png(d):
    bits = BYTES > 127
    Image.fromarray(bits).save(d / "a.png")
    return d / "a.png", "1", grey_rgb(bits * 255)


def case_1bit_tiff(d):
    bits = BYTES > 127
    Image.fromarray(bits).save(d / "a.tif")
    return d / "a.tif", "1", grey_rgb(bits * 255)


def case_grey8_png(d):
    Image.fromarray(BYTES).save(d / "a.png")
    return d / "a.png", "L", grey_rgb(BYTES)


def case_grey8_bmp(d):
    Image.fromarray(BYTES).save(d / "a.bmp")
    return d / "a.bmp", "L", grey_rgb(BYTES)


def case_grey4_png(d):  # Pillow scales 4-bit grey (0..15) to 0..255 itself
    write_png_rows(d / "a.png", 4, 4, GREY, [bytes([0x0F, 0x8F])])
    return d / "a.png", "L", grey_rgb([[0, 255, 136, 255]])


def case_grey16_png(d):
    write_png(d / "a.png", WORDS, 16, GREY)
    return d / "a.png", "I;16", grey_rgb(high_byte(WORDS))


def case_grey16_big_endian_tiff(d):
    Image.frombytes("I;16B", WORDS.shape[::-1], WORDS.astype(">u2").tobytes()).save(d / "a.tif")
    return d / "a.tif", "I;16B", grey_rgb(high_byte(WORDS))


def case_grey16_pgm(d):  # Pillow opens 16-bit PGM as mode "I"
    Image.frombytes("I;16", WORDS.shape[::-1], WORDS.astype("<u2").tobytes()).save(d / "a.pgm")
    return d / "a.pgm", "I", grey_rgb(high_byte(WORDS))


def case_int32_tiff(d):
    Image.fromarray(WORDS.astype(np.int32)).save(d / "a.tif")
    return d / "a.tif", "I", grey_rgb(high_byte(WORDS))


def case_float_tiff(d):
    values = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
    Image.fromarray(values).save(d / "a.tif")
    return d / "a.tif", "F", grey_rgb([[0, 64, 128, 255]])


def case_rgb8_png(d):
    rgb = np.stack([BYTES, BYTES[::-1], 255 - BYTES], axis=2)
    Image.fromarray(rgb).save(d / "a.png")
    return d / "a.png", "RGB", rgb


def case_rgb48_png(d):
    words = np.stack([WORDS, WORDS[::-1], 65535 - WORDS], axis=2)
    write_png(d / "a.png", words, 16, RGB)
    return d / "a.png", "RGB", high_byte(words)


def case_rgba8_png(d):
    rgba = np.stack([BYTES, 255 - BYTES, BYTES[::-1], np.full_like(BYTES, 7)], axis=2)  # alpha is dropped
    Image.fromarray(rgba, mode="RGBA").save(d / "a.png")
    return d / "a.png", "RGBA", rgba[..., :3]


def case_rgba64_png(d):
    words = np.stack([WORDS, 65535 - WORDS, WORDS[::-1], np.full_like(WORDS, 9)], axis=2)
    write_png(d / "a.png", words, 16, RGB_ALPHA)
    return d / "a.png", "RGBA", high_byte(words[..., :3])


def case_grey_alpha8_png(d):
    Image.fromarray(np.stack([BYTES, 255 - BYTES], axis=2), mode="LA").save(d / "a.png")
    return d / "a.png", "LA", grey_rgb(BYTES)


def case_grey_alpha16_png(d):
    write_png(d / "a.png", np.stack([WORDS, 65535 - WORDS], axis=2), 16, GREY_ALPHA)
    return d / "a.png", "RGBA", grey_rgb(high_byte(WORDS))  # Pillow opens it as RGBA


def case_palette_png(d):
    palette_image = Image.new("P", (4, 2))
    colours = [(10, 20, 30), (200, 100, 0), (0, 255, 128), (255, 255, 255)]
    palette_image.putpalette([c for rgb in colours for c in rgb])
    index = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)
    palette_image.putdata(index.ravel().tolist())
    palette_image.save(d / "a.png")
    return d / "a.png", "P", np.array(colours, np.uint8)[index]


def case_palette_bmp(d):
    image, index = Image.new("P", (2, 1)), np.array([[1, 0]], np.uint8)
    image.putpalette([5, 6, 7, 250, 240, 230])
    image.putdata(index.ravel().tolist())
    image.save(d / "a.bmp")
    return d / "a.bmp", "P", np.array([[[250, 240, 230], [5, 6, 7]]], np.uint8)


def case_cmyk_jpeg(d):
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[:8, :, 0] = 255  # pure cyan
    cmyk[8:, :, 3] = 255  # pure black
    Image.fromarray(cmyk, mode="CMYK").save(d / "a.jpg", quality=100)
    expected = np.zeros((16, 16, 3), np.uint8)
    expected[:8] = (0, 255, 255)
    return d / "a.jpg", "CMYK", expected


def case_grey8_jpeg(d):
    Image.fromarray(np.full((16, 16), 90, np.uint8)).save(d / "a.jpg", quality=100)
    return d / "a.jpg", "L", grey_rgb(np.full((16, 16), 90))


CASES = [case_1bit_png, case_1bit_tiff, case_grey8_png, case_grey8_bmp, case_grey4_png, case_grey16_png,
         case_grey16_big_endian_tiff, case_grey16_pgm, case_int32_tiff, case_float_tiff, case_rgb8_png,
         case_rgb48_png, case_rgba8_png, case_rgba64_png, case_grey_alpha8_png, case_grey_alpha16_png,
         case_palette_png, case_palette_bmp, case_cmyk_jpeg, case_grey8_jpeg]
LOSSY = {case_cmyk_jpeg, case_grey8_jpeg}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.removeprefix("case_"))
def test_every_mode_loads_scaled_to_8_bit_rgb(tmp_path, case):
    path, mode, expected = case(tmp_path)
    with Image.open(path) as im:
        assert im.mode == mode  # the file really is in the mode this case is about
    loaded = load_image(path)
    assert loaded.dtype == np.uint8 and loaded.shape == expected.shape
    if case in LOSSY:
        assert np.abs(loaded.astype(int) - expected).max() <= 3
    else:
        np.testing.assert_array_equal(loaded, expected)


def test_a_mid_grey_16_bit_image_is_mid_grey_not_white(tmp_path):
    write_png(tmp_path / "a.png", np.full((8, 8), 30000, np.uint16), 16, GREY)
    assert np.unique(load_image(tmp_path / "a.png")).tolist() == [117]  # 30000 >> 8


def test_48_bit_tiff_loads_scaled(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    words = np.stack([WORDS, 65535 - WORDS, WORDS[::-1]], axis=2)
    tifffile.imwrite(tmp_path / "a.tif", words, photometric="rgb")
    np.testing.assert_array_equal(load_image(tmp_path / "a.tif"), high_byte(words))


def test_images_without_a_known_scale_are_refused_with_their_path(tmp_path):
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(DatasetError, match=r"wide\.tif.*0\.\.70000"):
        load_image(tmp_path / "wide.tif")
    Image.fromarray(np.array([[0.0, 3.5]], np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(DatasetError, match=r"float\.tif.*\[0, 1\]"):
        load_image(tmp_path / "float.tif")


def test_resizing_keeps_the_scaled_values(tmp_path):
    write_png(tmp_path / "a.png", np.full((10, 12), 51400, np.uint16), 16, GREY)
    resized = load_image(tmp_path / "a.png", size=16)
    assert resized.shape == (16, 16, 3) and np.unique(resized).tolist() == [200]


@pytest.mark.parametrize("defect_value", [1, 255, 257, 65535])
def test_16_bit_masks_are_binary_at_their_own_depth(tmp_path, defect_value):
    values = np.zeros((20, 20), np.uint16)
    values[5:9, 5:9] = defect_value
    write_png(tmp_path / "m.png", values, 16, GREY)
    mask = load_mask(tmp_path / "m.png")
    np.testing.assert_array_equal(mask, values > 0)
    assert load_mask(tmp_path / "m.png", size=40).sum() == 8 * 8


def test_8_bit_and_colour_masks(tmp_path):
    soft = np.zeros((20, 20), np.uint8)
    soft[5:9, 5:9] = 128
    Image.fromarray(soft).save(tmp_path / "soft.png")
    mask = load_mask(tmp_path / "soft.png", size=40)
    assert mask.dtype == bool and mask.sum() == 8 * 8
    red = np.zeros((20, 20, 3), np.uint8)
    red[2:4, 2:5, 0] = 1  # a dark red pixel is still defect: no luminance weighting can drop it
    Image.fromarray(red).save(tmp_path / "red.png")
    assert load_mask(tmp_path / "red.png").sum() == 6
    assert load_mask(None, size=8).shape == (8, 8) and not load_mask(None, shape=(3, 4)).any()


def test_lists_samples_with_labels_and_masks(tiny_mvtec):
    assert list_categories(tiny_mvtec) == ["alpha", "beta"]
    assert layout_of(tiny_mvtec, "alpha") == MVTEC_AD
    samples = list_samples(tiny_mvtec, "alpha")
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    assert len(train) == 12 and len(test) == 4 + 2 * 3
    for s in test:
        assert s.label == (s.defect_type != "good")
        assert (s.mask_path is not None) == bool(s.label)
    assert len({s.key for s in samples}) == len(samples)
    for s in samples:  # the key is the path below the dataset root
        assert s.key == s.image_path.relative_to(tiny_mvtec).as_posix()


def test_mvtec_ad2_layout_is_read_with_validation_as_calibration(tmp_path):
    root = write_tiny_mvtec_ad2(tmp_path / "ad2", objects=("can", "walnuts"))
    assert list_categories(root) == ["can", "walnuts"]
    assert layout_of(root, "can") == MVTEC_AD2 and has_ground_truth(root, "can")
    samples = list_samples(root, "can")
    by_split = {split: [s for s in samples if s.split == split] for split in ("train", "calib", "test")}
    assert [len(by_split[k]) for k in ("train", "calib", "test")] == [10, 6, 4 + 6]
    assert len(samples) == 10 + 6 + 10  # nothing from test_private or test_private_mixed
    assert all(s.image_path.parent == root / "can" / "validation" / "good" for s in by_split["calib"])
    assert all(s.label == 0 and s.mask_path is None for s in by_split["train"] + by_split["calib"])
    bad = [s for s in by_split["test"] if s.label == 1]
    assert len(bad) == 6 and {s.defect_type for s in bad} == {"bad"}
    for s in bad:
        assert s.mask_path == root / "can" / "test_public" / "ground_truth" / "bad" / f"{s.image_path.stem}_mask.png"
        assert s.mask_path == mask_path_for(root, "can", "bad", s.image_path) and s.mask_path.is_file()
    keys = [s.key for s in samples]
    assert len(set(keys)) == len(keys)
    assert all(s.key == s.image_path.relative_to(root).as_posix() for s in samples)
    assert "can/validation/good/000_regular.png" in keys and "can/test_public/bad/000_overexposed.png" in keys


def test_every_mvtec_ad2_object_name_is_a_category(tmp_path):
    root = write_tiny_mvtec_ad2(tmp_path / "ad2", objects=MVTEC_AD2_OBJECTS, n_train=1, n_val=1, n_good=1, n_bad=1)
    assert list_categories(root) == sorted(MVTEC_AD2_OBJECTS)
    assert all(layout_of(root, name) == MVTEC_AD2 and len(list_samples(root, name)) == 4 for name in MVTEC_AD2_OBJECTS)


def test_mvtec_ad2_errors_name_the_path(tmp_path):
    root = write_tiny_mvtec_ad2(tmp_path / "ad2", objects=("can",))
    mask = root / "can" / "test_public" / "ground_truth" / "bad" / "002_overexposed_mask.png"
    mask.unlink()
    with pytest.raises(DatasetError, match="002_overexposed.png has no mask"):
        list_samples(root, "can")
    (root / "can" / "test").mkdir()
    with pytest.raises(DatasetError, match="ambiguous"):
        list_samples(root, "can")


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
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tiny_mvtec / "beta" / "train" / "good" / "000.png").read_bytes()[:-300])
    with pytest.raises(DatasetError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(DatasetError, match="absent.png"):
        load_mask(tmp_path / "absent.png")
