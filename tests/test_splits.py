import pandas as pd
import pytest

from helpers import splits
from tests.conftest import write_tiny_mvtec


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
