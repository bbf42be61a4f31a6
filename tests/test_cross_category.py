"""The positive control's data: a square of another category's normal image pasted at the same place, exact masks,
every ordered pair, deterministic, rebuilt only when what it is made from changes."""
import hashlib

import numpy as np
import pytest
from PIL import Image

from data_prep import cross_category
from helpers.data import load_image, load_mask


def test_the_square_is_the_donors_at_the_same_place_and_the_mask_is_exactly_it():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 100, (40, 50, 3), dtype=np.uint8)
    donor = rng.integers(150, 255, (40, 50, 3), dtype=np.uint8)
    image, mask = cross_category.paste_patch(base, donor, np.random.default_rng(1), 0.25)
    assert mask.sum() == 10 * 10  # a quarter of the shorter side
    rows, cols = np.nonzero(mask)
    assert rows.max() - rows.min() == cols.max() - cols.min() == 9
    np.testing.assert_array_equal(image[mask], donor[mask])
    np.testing.assert_array_equal(image[~mask], base[~mask])
    whole, full = cross_category.paste_patch(base[:40, :40], donor[:40, :40], np.random.default_rng(1), 1.0)
    assert full.all() and np.array_equal(whole, donor[:40, :40])


def test_the_square_goes_where_the_two_images_differ_most():
    base = np.zeros((64, 64, 3), np.uint8)
    donor = np.zeros((64, 64, 3), np.uint8)
    donor[:, 32:] = 255  # only the right half differs
    for seed in range(5):
        _, mask = cross_category.paste_patch(base, donor, np.random.default_rng(seed), 0.25)
        assert mask[:, 32:].sum() > mask[:, :32].sum()


def test_bad_arguments_are_refused():
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="same shape"):
        cross_category.paste_patch(image, image[:4], np.random.default_rng(0), 0.5)
    with pytest.raises(ValueError, match=r"patch must lie in \(0, 1\]"):
        cross_category.paste_patch(image, image, np.random.default_rng(0), 1.5)


def _images(folder, level, n, size=32):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(level)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        Image.fromarray(np.clip(level + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


LEVELS = {"alpha": 40, "beta": 120, "gamma": 200}


@pytest.fixture
def sources(tmp_path):
    goods = {c: _images(tmp_path / "src" / c / "good", level, 3) for c, level in LEVELS.items()}
    donors = {c: _images(tmp_path / "src" / c / "calib", level + 10, 2) for c, level in LEVELS.items()}
    return goods, donors


def digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_ordered_pair_is_written_in_mvtec_layout_with_its_masks(sources, tmp_path):
    goods, donors = sources
    out = cross_category.build(tmp_path / "control", goods, donors, per_pair=2, patch=0.5, seed=0)
    manifest = cross_category.load_manifest(out)
    for target in goods:
        rows = manifest[manifest["category"] == target]
        assert sorted(rows["defect_type"].unique()) == sorted(
            ["good"] + [cross_category.defect_name(s) for s in goods if s != target])
        assert (rows["defect_type"] == "good").sum() == 3
        for source in (s for s in goods if s != target):
            anomalies = rows[rows["defect_type"] == f"from_{source}"]
            assert len(anomalies) == 2 and (anomalies["label"] == 1).all()
            for r in anomalies.itertuples():
                image, mask = load_image(out / r.image), load_mask(out / r.mask)
                assert mask.mean() == pytest.approx(0.25)
                # The square holds the source's grey level (its donors sit 10 above it), the rest the target's.
                assert abs(image[mask].mean() - (LEVELS[source] + 10)) < 15
                assert abs(image[~mask].mean() - LEVELS[target]) < 15
    # The normal images are byte-for-byte copies, so the feature cache already holds them.
    good = manifest[(manifest["category"] == "beta") & (manifest["label"] == 0)]
    assert (out / good["image"].iloc[0]).read_bytes() == goods["beta"][0].read_bytes()
    assert cross_category.source_of("from_gamma") == "gamma" and cross_category.source_of("good") is None


def test_same_inputs_give_the_same_files_and_a_matching_folder_is_kept(sources, tmp_path):
    goods, donors = sources
    a = cross_category.build(tmp_path / "a", goods, donors, per_pair=2, patch=0.5, seed=3)
    b = cross_category.build(tmp_path / "b", goods, donors, per_pair=2, patch=0.5, seed=3)
    assert digests(a) == digests(b)
    stamp = (a / cross_category.STAMP).stat().st_mtime_ns
    cross_category.build(a, goods, donors, per_pair=2, patch=0.5, seed=3)
    assert (a / cross_category.STAMP).stat().st_mtime_ns == stamp  # nothing rewritten
    cross_category.build(a, goods, donors, per_pair=1, patch=0.5, seed=3)  # another recipe: replaced whole
    manifest = cross_category.load_manifest(a)
    assert (manifest["label"] == 1).sum() == 3 * 2 * 1
    assert not (a / "alpha" / "test" / "from_beta" / "001.png").exists()
    assert not list(a.parent.glob(".*staging*"))


def test_a_control_needs_two_categories_with_images(sources, tmp_path):
    goods, donors = sources
    with pytest.raises(ValueError, match="two or more categories"):
        cross_category.build(tmp_path / "c", {"alpha": goods["alpha"]}, donors, per_pair=1, patch=0.5)
    with pytest.raises(ValueError, match="beta"):
        cross_category.build(tmp_path / "c", {"alpha": goods["alpha"], "beta": []}, donors, per_pair=1, patch=0.5)
    with pytest.raises(FileNotFoundError, match="has not been built"):
        cross_category.load_manifest(tmp_path / "nowhere")
