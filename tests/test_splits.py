"""Split manifests: disjoint, stratified, deterministic, with calibration carved from train (MVTec AD) or taken from
MVTec AD 2's validation/good, and a clear refusal of a test set without both classes."""
import shutil

import pandas as pd
import pytest

from helpers import splits
from helpers.data import DatasetError
from tests.conftest import write_tiny_mvtec
from tests.mvtec_ad2 import write_tiny_mvtec_ad2


def test_no_image_in_two_splits_and_every_image_placed(tiny_mvtec):
    m = splits.make_splits(tiny_mvtec, ["alpha", "beta"], seed=0, calib_fraction=0.25)
    assert m["image"].is_unique
    assert set(m["split"]) == {"train", "calib", "val", "test"}
    assert len(m) == 2 * (12 + 4 + 6)
    assert (m[m.split.isin(["train", "calib"])]["label"] == 0).all()
    assert (m.groupby("category").apply(lambda g: (g.split == "calib").sum(), include_groups=False) == 3).all()


def test_val_and_test_are_stratified_by_defect_type(tiny_mvtec):
    m = splits.make_splits(tiny_mvtec, ["alpha"], seed=3)
    held = m[m.split.isin(["val", "test"])]
    counts = held.groupby(["defect_type", "split"]).size().unstack()
    assert (counts["val"] >= 1).all() and (counts["test"] >= 1).all()
    assert (abs(counts["val"] - counts["test"]) <= 1).all()


def test_deterministic_per_seed_and_independent_of_other_categories(tiny_mvtec):
    a = splits.make_splits(tiny_mvtec, ["alpha", "beta"], seed=1)
    b = splits.make_splits(tiny_mvtec, ["alpha", "beta"], seed=1)
    pd.testing.assert_frame_equal(a, b)
    only_beta = splits.make_splits(tiny_mvtec, ["beta"], seed=1)
    pd.testing.assert_frame_equal(a[a.category == "beta"].reset_index(drop=True), only_beta)
    other = splits.make_splits(tiny_mvtec, ["alpha", "beta"], seed=2)
    assert not a["split"].equals(other["split"])


def test_round_trip_and_select_on_another_root(tiny_mvtec, tmp_path):
    m = splits.make_splits(tiny_mvtec, ["alpha"], seed=0)
    path = splits.save(m, tmp_path / "m.csv")
    back = splits.load(path)
    pd.testing.assert_frame_equal(m, back)
    copy = write_tiny_mvtec(tmp_path / "copy", categories=("alpha",), seed=9)
    test = splits.select(back, copy, "alpha", "test")
    assert all(p.is_file() and str(p).startswith(str(copy)) for p in test.image_path)
    key = test[test.label == 1].image.iloc[0]
    flipped = splits.select(back, copy, "alpha", "test", label_overrides={key: 0})
    row = flipped[flipped.image == key].iloc[0]
    assert row.label == 0 and row.mask_path is None
    with pytest.raises(FileNotFoundError, match="00_data"):
        splits.load(tmp_path / "absent.csv")


def test_calib_size_is_an_absolute_count_per_category(tiny_mvtec):
    m = splits.make_splits(tiny_mvtec, ["alpha", "beta"], seed=0, calib_size=5)
    calib = m[m.split == "calib"]
    assert calib.groupby("category").size().to_dict() == {"alpha": 5, "beta": 5}
    assert (calib.label == 0).all() and calib.image.str.contains("/train/good/").all()
    # calib_size overrides calib_fraction; without it the fraction still decides (round(0.1 * 12) = 1).
    assert (m.split == "calib").sum() == (splits.make_splits(tiny_mvtec, ["alpha", "beta"], calib_fraction=0.9,
                                                             calib_size=5).split == "calib").sum()
    default = splits.make_splits(tiny_mvtec, ["alpha"], seed=0)
    assert (default.split == "calib").sum() == 1
    with pytest.raises(ValueError, match="alpha: calib_size 12 leaves no training image"):
        splits.make_splits(tiny_mvtec, ["alpha"], calib_size=12)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="calib_size"):
            splits.make_splits(tiny_mvtec, ["alpha"], calib_size=bad)


@pytest.mark.parametrize("remove, words", [("defects", "no anomalous images"), ("good", "no normal images")])
def test_a_test_set_without_both_classes_is_refused_naming_category_and_folder(tiny_mvtec, remove, words):
    test_dir = tiny_mvtec / "beta" / "test"
    for folder in (("scratch", "hole") if remove == "defects" else ("good",)):
        shutil.rmtree(test_dir / folder)
    with pytest.raises(DatasetError, match=words) as info:
        splits.make_splits(tiny_mvtec, ["alpha", "beta"])
    assert "'beta'" in str(info.value) and str(test_dir) in str(info.value)


def test_mvtec_ad2_calib_is_its_validation_set(tmp_path):
    root = write_tiny_mvtec_ad2(tmp_path / "ad2", objects=("can", "walnuts"), n_train=10, n_val=6, n_good=4, n_bad=6)
    m = splits.make_splits(root, ["can", "walnuts"], seed=0)
    assert m["image"].is_unique and len(m) == 2 * (10 + 6 + 4 + 6)
    for category, rows in m.groupby("category"):
        assert set(rows[rows.split == "train"].image.str.split("/").str[1]) == {"train"}
        calib = rows[rows.split == "calib"]
        assert len(calib) == 6 and calib.image.str.startswith(f"{category}/validation/good/").all()
        held = rows[rows.split.isin(["val", "test"])]
        assert held.image.str.startswith(f"{category}/test_public/").all() and len(held) == 10
        assert held.groupby(["split", "label"]).size().to_dict() == {("test", 0): 2, ("test", 1): 3,
                                                                      ("val", 0): 2, ("val", 1): 3}
        assert (held[held.label == 1]["mask"].str.startswith(f"{category}/test_public/ground_truth/bad/")).all()
    assert not m.image.str.contains("test_private").any()
    drawn = splits.make_splits(root, ["can"], seed=0, calib_size=4)
    assert (drawn.split == "calib").sum() == 4 and (drawn.split == "train").sum() == 10
    with pytest.raises(ValueError, match="calib_size 7 exceeds the 6 images"):
        splits.make_splits(root, ["can"], calib_size=7)
    test = splits.select(m, root, "can", "test")
    assert all(p.is_file() for p in test.image_path) and all(p.is_file() for p in test.mask_path if p is not None)
