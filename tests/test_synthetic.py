"""The synthetic dataset: MVTec layout, exact masks, byte-for-byte reproducibility, safe writing, and the wider
canvas beside every image that MVTec-Shift warps instead of inventing a border."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import synthetic, validate
from data_prep.synthetic import CATEGORIES, DEFECTS, generate, main, render_sample
from helpers.data import list_categories, list_samples, load_image, load_mask

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(size=64, n_train=5, n_test_good=3, n_per_defect=2)
SEED = 3


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synthetic") / "data", seed=SEED, **SMALL)


def test_layout_is_readable_with_the_requested_counts(small_dataset):
    assert list_categories(small_dataset) == sorted(CATEGORIES)
    assert sorted(p.name for p in small_dataset.iterdir()) == sorted(CATEGORIES)  # no staging folder left
    for category in CATEGORIES:
        samples = list_samples(small_dataset, category)
        train = [s for s in samples if s.split == "train"]
        good = [s for s in samples if s.split == "test" and s.label == 0]
        defective = [s for s in samples if s.label == 1]
        assert len(train) == SMALL["n_train"] and len(good) == SMALL["n_test_good"]
        assert sorted({s.defect_type for s in defective}) == sorted(DEFECTS[category])
        assert len(defective) == SMALL["n_per_defect"] * len(DEFECTS[category])
        assert all(s.mask_path is not None for s in defective)
        assert train[0].image_path.name == "000.png"
        image = load_image(samples[0].image_path)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8


def test_every_category_has_at_least_three_defect_types():
    assert set(DEFECTS) == set(CATEGORIES)
    assert all(len(set(defects)) >= 3 for defects in DEFECTS.values())


def test_masks_are_single_channel_binary_and_non_empty(small_dataset):
    for category in CATEGORIES:
        for sample in list_samples(small_dataset, category):
            if sample.label == 0:
                continue
            with Image.open(sample.mask_path) as im:
                assert im.mode == "L" and im.size == (64, 64)
                values = np.asarray(im)
            assert set(np.unique(values)) <= {0, 255}
            assert (values == 255).any()


def test_mask_is_exactly_the_changed_pixels_and_matches_the_files(small_dataset):
    for category in CATEGORIES:
        for defect in DEFECTS[category]:
            for index in range(SMALL["n_per_defect"]):
                sample = render_sample(category, defect, index, seed=SEED, size=64)
                assert sample.mask is not None and sample.mask.any()
                np.testing.assert_array_equal(sample.mask, (sample.image != sample.clean).any(axis=2))
                assert sample.mask.mean() < 0.25, f"{category}/{defect} {index}: defect covers most of the image"
                stem = f"{index:03d}"
                written = load_image(small_dataset / category / "test" / defect / f"{stem}.png")
                np.testing.assert_array_equal(written, sample.image)
                mask_file = small_dataset / category / "ground_truth" / defect / f"{stem}_mask.png"
                np.testing.assert_array_equal(load_mask(mask_file), sample.mask)


def test_every_image_is_the_centre_of_its_canvas_and_the_readers_ignore_canvases(small_dataset):
    margin = synthetic.canvas_margin(64)
    assert margin == 11  # CANVAS_MARGIN 0.17 of the side, rounded up
    for category in CATEGORIES:
        info = synthetic.read_canvas_info(small_dataset / category)
        assert info["frame_size"] == 64 and info["margin"] == margin and info["seed"] == SEED
        samples = list_samples(small_dataset, category)
        assert len(samples) == SMALL["n_train"] + SMALL["n_test_good"] + SMALL["n_per_defect"] * 3
        for sample in samples:
            canvas = load_image(synthetic.canvas_path_for(small_dataset, sample.key))
            assert canvas.shape == (64 + 2 * margin, 64 + 2 * margin, 3)
            np.testing.assert_array_equal(synthetic.crop_to_frame(canvas, 64), load_image(sample.image_path))
            # the margin is more of the scene, not a copy of the frame's edge
            assert not np.array_equal(canvas[margin - 1], canvas[margin])
            if sample.mask_path is not None:
                canvas_mask = load_mask(synthetic.canvas_path_for(small_dataset, sample.key, mask=True))
                np.testing.assert_array_equal(synthetic.crop_to_frame(canvas_mask, 64), load_mask(sample.mask_path))
    assert validate.validate(small_dataset) == []


def test_canvas_mask_is_exactly_the_changed_canvas_pixels():
    for category in CATEGORIES:
        for defect in DEFECTS[category]:
            sample = render_sample(category, defect, 1, seed=SEED, size=64, canvas=True)
            np.testing.assert_array_equal(sample.mask, (sample.image != sample.clean).any(axis=2))
            assert synthetic.crop_to_frame(sample.mask, 64).any()  # every defect shows in the saved frame
            frame = render_sample(category, defect, 1, seed=SEED, size=64)
            np.testing.assert_array_equal(frame.image, synthetic.crop_to_frame(sample.image, 64))


def test_a_broken_canvas_description_names_its_file(tmp_path):
    (tmp_path / "carpet" / ".canvas").mkdir(parents=True)
    (tmp_path / "carpet" / ".canvas" / "canvas.json").write_text("{\"margin\": 3}")
    with pytest.raises(ValueError, match="canvas.json"):
        synthetic.read_canvas_info(tmp_path / "carpet")
    assert synthetic.read_canvas_info(tmp_path / "nothing") is None


def test_good_samples_have_no_mask():
    for category in CATEGORIES:
        sample = render_sample(category, "good", 0, seed=SEED, size=64, split="train")
        assert sample.mask is None
        np.testing.assert_array_equal(sample.image, sample.clean)


def test_normal_images_vary_between_shots(small_dataset):
    for category in CATEGORIES:
        train = [load_image(s.image_path).astype(np.float32)
                 for s in list_samples(small_dataset, category) if s.split == "train"]
        assert len({img.tobytes() for img in train}) == len(train)
        # Lighting and pose change the picture, not only its noise: mean brightness differs between shots.
        assert np.std([img.mean() for img in train]) > 0.5


def test_same_seed_gives_byte_identical_files_also_from_the_command_line(tmp_path, small_dataset):
    again = tmp_path / "again"
    command = [sys.executable, "-m", "data_prep.synthetic", "--root", str(again), "--seed", str(SEED),
               "--size", "64", "--n-train", "5", "--n-test-good", "3", "--n-per-defect", "2"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    for category in CATEGORIES:
        assert sum(line.startswith(f"{category}: ") for line in lines) == 1
    assert digests(again) == digests(small_dataset)


def test_a_file_does_not_depend_on_the_other_splits_or_categories(tmp_path, small_dataset):
    fewer = generate(tmp_path / "fewer", seed=SEED, size=64, categories=("zipper",), n_train=2, n_test_good=1,
                     n_per_defect=1)
    subset = digests(fewer)
    assert subset and all(digests(small_dataset)[name] == digest for name, digest in subset.items())


def test_different_seed_gives_different_images(tmp_path, small_dataset):
    other = digests(generate(tmp_path / "other", seed=SEED + 1, **SMALL))
    reference = digests(small_dataset)
    assert other.keys() == reference.keys()
    images = [name for name in reference if "ground_truth" not in name]
    assert all(other[name] != reference[name] for name in images)


def test_refuses_to_overwrite_a_non_empty_category(tmp_path, capsys):
    root = generate(tmp_path / "data", seed=0, size=32, categories=("carpet",), n_train=1, n_test_good=1,
                    n_per_defect=1)
    before = digests(root)
    with pytest.raises(FileExistsError, match=str(root / "carpet")):
        generate(root, seed=1, size=32, categories=("carpet",), n_train=1, n_test_good=1, n_per_defect=1)
    assert digests(root) == before
    assert main(["--root", str(root), "--categories", "carpet", "--size", "32", "--n-train", "1"]) == 2
    assert str(root / "carpet") in capsys.readouterr().err
    generate(root, seed=1, size=32, categories=("carpet",), n_train=1, n_test_good=1, n_per_defect=1,
             overwrite=True)
    after = digests(root)
    assert after.keys() == before.keys() and after != before
    assert sorted(p.name for p in root.iterdir()) == ["carpet"]


def test_an_empty_category_folder_is_filled(tmp_path):
    (tmp_path / "data" / "hazelnut").mkdir(parents=True)
    generate(tmp_path / "data", size=32, categories=("hazelnut",), n_train=1, n_test_good=1, n_per_defect=1)
    assert len(list_samples(tmp_path / "data", "hazelnut")) == 1 + 1 + len(DEFECTS["hazelnut"])


def test_an_interrupted_run_leaves_no_category_behind(tmp_path, monkeypatch):
    real_render = synthetic.render_sample
    calls = {"n": 0}

    def fails_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 20:  # well into the second category
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_sample", fails_midway)
    root = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        generate(root, size=32, n_train=5, n_test_good=2, n_per_defect=1)
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("bad", [dict(categories=("carpet", "wood")), dict(size=16), dict(n_train=0),
                                 dict(seed=-1), dict(categories=())])
def test_rejects_bad_arguments(tmp_path, bad):
    with pytest.raises(ValueError):
        generate(tmp_path / "data", **{"size": 32, "n_train": 1, "n_test_good": 1, "n_per_defect": 1, **bad})
    assert not (tmp_path / "data").exists()
