"""Generated data of MVTec AD's shape: per-category counts, MVTec AD's defect types drawn by stand-in renderers,
greyscale zipper; the uniform shape's files stay what they were."""
import hashlib

import numpy as np
import pytest
from PIL import Image

from data_prep import synthetic


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_counts_given_per_type_write_the_same_bytes_as_the_uniform_shape(tmp_path):
    uniform = synthetic.generate(tmp_path / "uniform", seed=1, size=48, categories=("hazelnut",), n_train=2,
                                 n_test_good=2, n_per_defect=1)
    test = {"good": 2, **{d: 1 for d in synthetic.DEFECTS["hazelnut"]}}
    explicit = synthetic.generate(tmp_path / "explicit", seed=1, size=48, categories=("hazelnut",), n_train=2,
                                  test=test)
    assert _digests(uniform) == _digests(explicit)


def test_mvtec_ad_defect_types_are_drawn_with_masks_by_their_stand_in_renderers():
    for category, stand_ins in synthetic.STAND_IN_DEFECTS.items():
        assert set(stand_ins.values()) <= set(synthetic.DEFECT_RENDERERS[category])
        for defect, renderer in stand_ins.items():
            own = synthetic.render_sample(category, renderer, index=0, seed=0, size=64)
            drawn = synthetic.render_sample(category, defect, index=0, seed=0, size=64)
            assert drawn.mask.any() and ((drawn.image != drawn.clean).any(axis=2) == drawn.mask).all()
            assert not np.array_equal(drawn.image, own.image), f"{defect} repeats {renderer}'s image"


def test_every_mvtec_ad_defect_type_of_the_generated_categories_can_be_drawn():
    for category, shape in synthetic.MVTEC_AD.items():
        assert set(shape["test"]) - {"good"} <= set(synthetic.defect_types(category)), category


def test_an_unknown_defect_type_is_refused_naming_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="cut"):
        synthetic.render_sample("hazelnut", "scratch")
    with pytest.raises(ValueError, match="defect types of carpet"):
        synthetic.generate(tmp_path, categories=("carpet",), size=48, n_train=1, test={"good": 1, "crack": 1})
    with pytest.raises(ValueError, match="greyscale"):
        synthetic.generate(tmp_path, categories=("carpet",), size=48, n_train=1, greyscale=True)


def test_greyscale_zipper_holds_one_channel_of_the_same_pixels(tmp_path):
    test = {"good": 1, "split_teeth": 1}
    grey = synthetic.generate(tmp_path / "grey", seed=0, size=48, categories=("zipper",), n_train=1, test=test,
                              greyscale=True)
    rgb = synthetic.generate(tmp_path / "rgb", seed=0, size=48, categories=("zipper",), n_train=1, test=test)
    images = sorted(p.relative_to(grey) for p in grey.rglob("*.png") if "ground_truth" not in p.parts)
    assert len(images) == 6  # train, good, split_teeth; frames and canvases
    for rel in images:
        with Image.open(grey / rel) as g, Image.open(rgb / rel) as c:
            assert g.mode == "L" and c.mode == "RGB"
            assert np.array_equal(np.asarray(g), np.asarray(c)[..., 0])
    masks = sorted(p.relative_to(grey) for p in grey.rglob("*_mask.png"))
    assert masks and all((grey / m).read_bytes() == (rgb / m).read_bytes() for m in masks)


def test_the_known_mvtec_ad_counts_add_up_to_its_test_sets():
    totals = {c: (v["train"], sum(v["test"].values())) for c, v in synthetic.MVTEC_AD.items()}
    assert totals == {"hazelnut": (391, 110), "carpet": (280, 117), "zipper": (240, 151)}
