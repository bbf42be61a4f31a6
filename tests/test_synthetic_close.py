"""The generated look-alikes of the unified study's close set (rug for carpet, walnut for hazelnut): their twins'
three defect types with exact masks, reproducible, valid MVTec layout, and no effect on the main categories."""
import hashlib

import numpy as np
import pytest

from data_prep import synthetic, validate
from data_prep.synthetic import CLOSE_CATEGORIES, defects_of, generate, render_sample
from helpers.data import list_samples

SMALL = dict(size=64, n_train=3, n_test_good=2, n_per_defect=2)


def digests(root, category):
    folder = root / category
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("category", sorted(CLOSE_CATEGORIES))
def test_look_alikes_have_their_twins_defect_types_with_exact_masks(category):
    twin = CLOSE_CATEGORIES[category]
    assert defects_of(category) == defects_of(twin) and len(defects_of(category)) == 3
    for defect in defects_of(category):
        sample = render_sample(category, defect, 1, seed=2, size=64)
        assert sample.mask.any() and sample.mask.mean() < 0.25
        np.testing.assert_array_equal(sample.mask, (sample.image != sample.clean).any(axis=2))
        again = render_sample(category, defect, 1, seed=2, size=64)
        np.testing.assert_array_equal(again.image, sample.image)


@pytest.mark.parametrize("category", sorted(CLOSE_CATEGORIES))
def test_a_look_alike_resembles_its_twin_more_than_the_other_categories(category):
    def colour(name):
        return np.mean([render_sample(name, "good", i, seed=0, size=64).image.reshape(-1, 3).mean(0)
                        for i in range(3)], axis=0)

    own = colour(category)
    distances = {other: np.abs(own - colour(other)).sum() for other in synthetic.CATEGORIES}
    assert min(distances, key=distances.get) == CLOSE_CATEGORIES[category]
    # ...and is still another category: its normal images are not its twin's.
    assert not np.array_equal(render_sample(category, "good", 0, seed=0, size=64).image,
                              render_sample(CLOSE_CATEGORIES[category], "good", 0, seed=0, size=64).image)


def test_look_alikes_are_written_in_mvtec_layout_and_leave_the_main_categories_alone(tmp_path):
    main_only = generate(tmp_path / "main", seed=1, categories=synthetic.CATEGORIES, **SMALL)
    both = generate(tmp_path / "both", seed=1, categories=synthetic.ALL_CATEGORIES, **SMALL)
    for category in synthetic.CATEGORIES:
        assert digests(main_only, category) == digests(both, category)
    for category in CLOSE_CATEGORIES:
        samples = list_samples(both, category)
        assert sum(s.split == "train" for s in samples) == SMALL["n_train"]
        assert sorted({s.defect_type for s in samples if s.label == 1}) == sorted(defects_of(category))
        assert all(s.mask_path is not None for s in samples if s.label == 1)
    assert validate.validate(both, list(CLOSE_CATEGORIES)) == []
    with pytest.raises(ValueError, match="rug, walnut"):
        generate(tmp_path / "bad", categories=("screw",), **SMALL)
