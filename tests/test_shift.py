"""MVTec-Shift: masks move with images, severity 0 is the identity, seeds reproduce files, labels follow masks,
geometry adds nothing the scene lacks, severities grow, and domain mode gives a condition one set of params."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from data_prep import shift, synthetic
from helpers.data import list_samples, load_image, load_mask

GEOMETRIC = [n for n, t in shift.TRANSFORMS.items() if t.kind == "geometric"]
PHOTOMETRIC = [n for n, t in shift.TRANSFORMS.items() if t.kind == "photometric"]
SYNTHETIC_CATEGORIES = list(synthetic.CATEGORIES)


def square_image(size=128, box=(40, 64, 50, 74), background=60, defect=230):
    """Uniform background with one bright square defect and its exact mask."""
    y0, y1, x0, x1 = box
    image = np.full((size, size, 3), background, np.uint8)
    mask = np.zeros((size, size), bool)
    mask[y0:y1, x0:x1] = True
    image[mask] = defect
    return image, mask


def textured_image(size=256, seed=0):
    rng = np.random.default_rng(seed)
    image = np.clip(120 + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    image[100:140, 60:120] = 220
    return image


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


# --- single images -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("transform", GEOMETRIC)
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_geometric_masks_stay_aligned_with_the_bright_defect(transform, severity):
    image, mask = square_image()
    for seed in range(4):
        out, moved, valid, _ = shift.apply(image, mask, transform, severity, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert moved.dtype == bool and moved.any()
        assert iou((out.mean(axis=2) > 145) & valid, moved) > 0.9


@pytest.mark.parametrize("transform", shift.TRANSFORM_NAMES)
def test_severity_zero_is_the_exact_identity(transform):
    _, mask = square_image()
    image = textured_image(128)
    out, moved, valid, params = shift.apply(image, mask, transform, 0, np.random.default_rng(3))
    assert out.dtype == np.uint8 and out.tobytes() == image.tobytes()
    assert np.array_equal(moved, mask) and valid.all() and params == {}
    out2, _, _, _ = shift.apply_with_params(image, None, transform, 0, {})
    assert out2.tobytes() == image.tobytes()


@pytest.mark.parametrize("transform", PHOTOMETRIC + ["border_fill"])
def test_higher_severity_changes_the_image_more(transform):
    image = textured_image()
    diffs = []
    for severity in range(6):
        per_rng = [np.abs(shift.apply(image, None, transform, severity, np.random.default_rng(s))[0].astype(float)
                          - image).mean() for s in range(4)]
        diffs.append(np.mean(per_rng))
    assert diffs[0] == 0
    assert all(a < b for a, b in zip(diffs, diffs[1:])), diffs


@pytest.mark.parametrize("transform", GEOMETRIC + ["mixed", "border_fill"])
def test_without_a_canvas_reflected_pixels_are_invalid_and_never_a_defect(transform):
    image = textured_image(96)
    full = np.ones(image.shape[:2], bool)  # every pixel a defect: any mask pixel on the border would show
    uncovered = 0
    for seed in range(6):
        _, moved, valid, _ = shift.apply(image, full, transform, 5, np.random.default_rng(seed))
        assert moved.dtype == bool
        assert not (moved & ~valid).any()
        assert np.array_equal(moved, valid)  # inside the frame the all-defect mask stays all defect
        uncovered += (~valid).sum()
    if transform != "mixed":
        assert uncovered > 0


def test_a_defect_moved_out_of_the_frame_leaves_an_empty_mask():
    image, mask = square_image(64, box=(0, 6, 0, 6))
    image = np.maximum(image, textured_image(64))  # texture, so that exact copies can be told apart
    out, moved, valid, _ = shift.apply_with_params(image, mask, "translation", 5, {"dx": -10 / 64, "dy": -10 / 64})
    assert not moved.any()
    assert not valid[-10:, :].any() and not valid[:, -10:].any() and valid[:-10, :-10].all()
    assert np.array_equal(out[:-10, :-10], image[10:, 10:])  # whole pixels: an exact copy
    assert (out != 230).all()  # the defect left the frame, and the reflection beyond the edge does not bring it back


def test_a_surround_shows_the_scene_beyond_the_frame_and_keeps_every_pixel_valid():
    rng = np.random.default_rng(1)
    margin, size = 12, 64
    canvas = rng.integers(0, 256, (size + 2 * margin, size + 2 * margin, 3), dtype=np.uint8)
    canvas_mask = np.zeros(canvas.shape[:2], bool)
    canvas_mask[margin - 5:margin + 4, margin + 20:margin + 30] = True  # a defect reaching beyond the top edge
    frame = canvas[margin:-margin, margin:-margin]
    mask = canvas_mask[margin:-margin, margin:-margin]
    surround = shift.Surround(canvas, canvas_mask, margin)
    out, moved, valid, _ = shift.apply_with_params(frame, mask, "translation", 3, {"dx": 0.125, "dy": 0.125},
                                                   surround)
    assert valid.all()
    assert np.array_equal(out, canvas[margin - 8:margin - 8 + size, margin - 8:margin - 8 + size])
    assert np.array_equal(moved, canvas_mask[margin - 8:margin - 8 + size, margin - 8:margin - 8 + size])
    assert moved.sum() > mask.sum()  # the part of the defect outside the frame comes into view
    for transform in GEOMETRIC:
        for seed in range(4):
            params = shift.draw_params(transform, 5, seed, "any/key", "per_image")
            _, _, valid, _ = shift.apply_with_params(frame, mask, transform, 5, params, surround)
            assert valid.all(), (transform, params)
    with pytest.raises(ValueError, match="surround image"):
        shift.apply_with_params(frame[:-1], mask[:-1], "rotation", 1, {"angle_deg": 2.0}, surround)


@pytest.mark.parametrize("size", [64, 256])
def test_the_canvas_margin_holds_every_pose_at_severity_5(size):
    """Every random part a geometric draw can take (sign, direction, axis) stays on the generator's canvas."""
    margin = synthetic.canvas_margin(size)
    canvas = np.zeros((size + 2 * margin, size + 2 * margin, 3), np.uint8)
    frame = canvas[margin:-margin, margin:-margin]
    surround = shift.Surround(canvas, None, margin)
    angles = np.arange(0, 360, 5)
    top = {t: shift.SEVERITY_TABLE[t][5] for t in GEOMETRIC}
    poses = [("rotation", {"angle_deg": sign * top["rotation"]}) for sign in (-1, 1)]
    poses += [("scale", {"scale": 1 + sign * top["scale"]}) for sign in (-1, 1)]
    poses += [("translation", {"dx": top["translation"] * np.cos(np.deg2rad(a)),
                               "dy": top["translation"] * np.sin(np.deg2rad(a))}) for a in angles]
    poses += [("perspective", {"tilt_deg": top["perspective"], "axis_deg": float(a)}) for a in angles[angles < 180]]
    assert {t for t, _ in poses} == set(GEOMETRIC)
    for transform, params in poses:
        _, _, valid, _ = shift.apply_with_params(frame, None, transform, 5, params, surround)
        assert valid.all(), (transform, params)


def test_rotation_fill_is_the_pose_of_rotation_with_the_frame_of_border_fill():
    image, mask = square_image(160, box=(60, 90, 70, 100))
    for severity in (1, 3, 5):
        params = {"angle_deg": -shift.SEVERITY_TABLE["rotation"][severity]}
        old, old_mask, old_valid, _ = shift.apply_with_params(image, mask, "rotation_fill", severity, params)
        frame, _, frame_valid, _ = shift.apply_with_params(image, None, "border_fill", severity, params)
        pose, pose_mask, _, _ = shift.apply_with_params(image, mask, "rotation", severity, params)
        assert np.array_equal(old_valid, frame_valid)  # the frame border_fill adds
        inner = ndimage.binary_erosion(old_valid, iterations=2)
        assert np.abs(old[inner].astype(int) - pose[inner]).max() <= 1  # the pose rotation makes, inside it
        assert iou(old_mask, pose_mask) > 0.95


def test_border_fill_is_the_old_rotation_frame_without_a_pose_change():
    image = textured_image(160)  # large enough that the 2 degree frame is thicker than its soft edge
    previous = 0.0
    for severity in range(1, 6):
        params = {"angle_deg": shift.SEVERITY_TABLE["rotation"][severity]}
        out, _, valid, _ = shift.apply_with_params(image, None, "border_fill", severity, params)
        _, _, rotation_valid, _ = shift.apply_with_params(image, None, "rotation", severity, params)
        assert np.array_equal(valid, rotation_valid)  # the frame the rotation leaves uncovered
        assert np.array_equal(out[valid], image[valid])  # and nothing else changes
        mean = np.rint(image.reshape(-1, 3).mean(axis=0))
        corners = ndimage.binary_erosion(~valid, iterations=2, border_value=1)  # off the soft inner edge
        assert corners.any() and (np.abs(out[corners] - mean) <= 1).all()
        assert (~valid).mean() > previous
        previous = (~valid).mean()


@pytest.mark.parametrize("transform", shift.TRANSFORM_NAMES)
def test_params_are_json_and_replay_exactly(transform):
    image, mask = square_image()
    out, moved, valid, params = shift.apply(textured_image(128), mask, transform, 4, np.random.default_rng(7))
    replayed = shift.apply_with_params(textured_image(128), mask, transform, 4, json.loads(json.dumps(params)))
    assert np.array_equal(replayed[0], out) and np.array_equal(replayed[1], moved)
    assert np.array_equal(replayed[2], valid)


def test_mixed_composes_several_transforms_with_at_most_one_pose_change():
    counts, with_pose = set(), 0
    for seed in range(40):
        params = shift.apply(textured_image(64), None, "mixed", 3, np.random.default_rng(seed))[3]
        names = [step["transform"] for step in params["steps"]]
        counts.add(len(names))
        assert len(set(names)) == len(names) and not {"mixed", "border_fill"} & set(names)
        geometric = [n for n in names if n in GEOMETRIC]
        assert len(geometric) <= 1 and names[:len(geometric)] == geometric  # the pose comes first
        with_pose += bool(geometric)
    assert counts == {2, 3} and 0 < with_pose < 40


# The random part of each transform's draw: what must not change with the severity.
RANDOM_PART = {
    "brightness": lambda p: np.sign(p["gain"] - 1),
    "contrast": lambda p: np.sign(p["factor"] - 1),
    "gamma": lambda p: np.sign(p["gamma"] - 1),
    "color_temperature": lambda p: np.sign(p["red_gain"] - 1),
    "blur": lambda p: None,
    "noise": lambda p: p["noise_seed"],
    "gradient": lambda p: p["angle_deg"],
    "spotlight": lambda p: (p["cx"], p["cy"], p["radius"], np.sign(p["peak"])),
    "rotation": lambda p: np.sign(p["angle_deg"]),
    "translation": lambda p: round(float(np.arctan2(p["dy"], p["dx"])), 2),
    "scale": lambda p: np.sign(p["scale"] - 1),
    "perspective": lambda p: p["axis_deg"],
    "border_fill": lambda p: np.sign(p["angle_deg"]),
    "rotation_fill": lambda p: np.sign(p["angle_deg"]),
    "mixed": lambda p: [(s["transform"], RANDOM_PART[s["transform"]](s["params"])) for s in p["steps"]],
}


@pytest.mark.parametrize("transform", shift.TRANSFORM_NAMES)
def test_the_parameter_grows_and_the_random_part_is_shared_by_all_severities(transform):
    values = [shift.SEVERITY_TABLE[transform][k] for k in range(1, 6)]
    if transform != "mixed":
        assert all(a < b for a, b in zip(values, values[1:])), values
    for mode in shift.MODES:
        for key in ("cat/test/good/000.png", "cat/train/good/001.png"):
            parts = [RANDOM_PART[transform](shift.draw_params(transform, k, 3, key, mode)) for k in range(1, 6)]
            assert all(part == parts[0] for part in parts), parts


def test_bad_transform_or_severity_names_the_parameter_and_allowed_values():
    image, _ = square_image(32)
    with pytest.raises(ValueError, match=r"transform must be one of .*rotation.*mixed; got 'sepia'"):
        shift.apply(image, None, "sepia", 1, np.random.default_rng(0))
    for bad in (6, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match=r"severity must be an integer in 0\.\.5"):
            shift.apply(image, None, "blur", bad, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"mode must be one of per_image, domain; got 'global'"):
        shift.draw_params("blur", 1, 0, "k", "global")


def test_severity_table_documents_every_transform():
    markdown = shift.severity_table_markdown()
    for name in shift.TRANSFORM_NAMES:
        row = shift.SEVERITY_TABLE[name]
        assert row["parameter"] and all(k in row for k in range(1, 6))
        assert f"| {name} |" in markdown
    assert "mean colour" in markdown and "border_fill" in markdown and "inside hazelnut" in markdown


def test_in_training_variation_marks_what_the_generator_already_varies():
    assert all(shift.in_training_variation("rotation", k, "hazelnut") for k in range(6))  # the nut lies any way
    assert shift.in_training_variation("brightness", 1, "carpet") and not shift.in_training_variation(
        "brightness", 2, "carpet")
    assert all(shift.in_training_variation("translation", k, "carpet") for k in range(6))  # a stationary pile
    assert not any(shift.in_training_variation("color_temperature", k, "zipper") for k in range(1, 6))  # grey
    for category in SYNTHETIC_CATEGORIES:
        assert shift.in_training_variation("blur", 0, category)  # severity 0 is the clean data
        assert not any(shift.in_training_variation(t, 1, category) for t in ("border_fill", "mixed", "noise"))
    with pytest.raises(ValueError, match="synthetic categories"):
        shift.in_training_variation("rotation", 1, "screw")


# --- datasets ------------------------------------------------------------------------------------------------

def test_same_seed_gives_byte_identical_files(tiny_mvtec, tmp_path):
    a = shift.shift_dataset(tiny_mvtec, tmp_path / "a", "mixed", 3, seed=1, progress=False)
    b = shift.shift_dataset(tiny_mvtec, tmp_path / "b", "mixed", 3, seed=1, progress=False)
    c = shift.shift_dataset(tiny_mvtec, tmp_path / "c", "mixed", 3, seed=2, progress=False)
    assert tree_hashes(a) == tree_hashes(b)
    assert tree_hashes(a) != tree_hashes(c)


def test_results_do_not_depend_on_which_categories_are_shifted(tiny_mvtec, tmp_path):
    both = shift.shift_dataset(tiny_mvtec, tmp_path / "both", "rotation", 2, seed=0, progress=False)
    alpha = shift.shift_dataset(tiny_mvtec, tmp_path / "alpha", "rotation", 2, seed=0, categories=["alpha"],
                                progress=False)
    hashes = tree_hashes(alpha)
    hashes.pop("shift_manifest.csv")
    assert hashes and all(tree_hashes(both)[k] == v for k, v in hashes.items())


def test_layout_manifest_and_round_trip(tiny_mvtec, tmp_path):
    dst = shift.shift_dataset(tiny_mvtec, tmp_path / "shifted", "mixed", 4, seed=0, progress=False)
    manifest = shift.read_manifest(dst)
    assert list(manifest.columns) == shift.MANIFEST_COLUMNS
    for category in ("alpha", "beta"):
        before, after = list_samples(tiny_mvtec, category), list_samples(dst, category)
        assert [s.key for s in before] == [s.key for s in after]
    assert sorted(manifest["image"]) == sorted(s.key for c in ("alpha", "beta") for s in list_samples(dst, c))
    for row in manifest.itertuples():
        image, mask, valid, params = shift.replay_sample(tiny_mvtec, dst, row.image)
        assert params == json.loads(row.params)
        assert np.array_equal(image, load_image(dst / row.image))
        if row.label_before == 1:
            category, _, defect, name = row.image.split("/")
            mask_file = dst / category / "ground_truth" / defect / name.replace(".png", "_mask.png")
            written = np.asarray(Image.open(mask_file))
            assert set(np.unique(written)) <= {0, 255}  # still binary on disk
            assert np.array_equal(written > 0, mask)
            assert not (mask & ~valid).any()


def write_corner_defects(root: Path, n_defect=8, size=64):
    """One category whose defects sit in the top-left corner, where a shift can push them out of the frame."""
    rng = np.random.default_rng(0)
    for folder in ("train/good", "test/good", "test/corner", "ground_truth/corner"):
        (root / "cat" / folder).mkdir(parents=True)
    for i in range(3):
        for folder in ("train/good", "test/good"):
            normal = rng.integers(90, 110, (size, size, 3), dtype=np.uint8)
            Image.fromarray(normal).save(root / "cat" / folder / f"{i:03d}.png")
    for i in range(n_defect):
        image = rng.integers(90, 110, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        image[:3, :3], mask[:3, :3] = 255, 255
        Image.fromarray(image).save(root / "cat" / "test" / "corner" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "cat" / "ground_truth" / "corner" / f"{i:03d}_mask.png")
    return root


def test_defect_pushed_out_of_the_frame_becomes_normal(tmp_path):
    src = write_corner_defects(tmp_path / "src")
    dst = shift.shift_dataset(src, tmp_path / "dst", "translation", 5, seed=0, progress=False)
    manifest = shift.read_manifest(dst)
    defects = manifest[manifest["label_before"] == 1]
    overrides = shift.label_overrides(dst)
    for row in defects.itertuples():
        mask_file = dst / "cat" / "ground_truth" / "corner" / Path(row.image).name.replace(".png", "_mask.png")
        assert mask_file.is_file()  # written even when empty, so the layout stays regular
        assert row.label_after == int(load_mask(mask_file).any())
        assert overrides[row.image] == row.label_after
    assert (defects["label_after"] == 0).any() and (defects["label_after"] == 1).any()
    assert (manifest[manifest["label_before"] == 0]["label_after"] == 0).all()
    assert shift.label_overrides(src) == {}


def test_refuses_to_overwrite_and_never_leaves_half_a_dataset(tiny_mvtec, tmp_path, monkeypatch):
    dst = shift.shift_dataset(tiny_mvtec, tmp_path / "out", "blur", 1, seed=0, progress=False)
    with pytest.raises(FileExistsError, match=str(dst)):
        shift.shift_dataset(tiny_mvtec, dst, "blur", 1, seed=0, progress=False)
    shift.shift_dataset(tiny_mvtec, dst, "noise", 1, seed=0, overwrite=True, progress=False)
    assert set(shift.read_manifest(dst)["transform"]) == {"noise"}

    calls = []

    def crash_on_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    real = shift._shift_sample
    monkeypatch.setattr(shift, "_shift_sample", crash_on_fifth)
    with pytest.raises(RuntimeError):
        shift.shift_dataset(tiny_mvtec, tmp_path / "broken", "blur", 1, seed=0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny"]


def test_dst_inside_src_is_refused(tiny_mvtec):
    with pytest.raises(ValueError, match="outside src"):
        shift.shift_dataset(tiny_mvtec, tiny_mvtec / "shifted", "blur", 1, seed=0)


def test_family_layout_and_skipping_complete_members(tiny_mvtec, tmp_path, monkeypatch):
    paths = shift.shift_family(tiny_mvtec, tmp_path / "fam", ["gamma", "scale"], [1, 3], seed=5,
                               categories=["beta"])
    assert paths == [tmp_path / "fam" / "per_image" / t / f"severity={k}" / "seed=5" for t in ("gamma", "scale")
                     for k in (1, 3)]
    assert all(set(shift.read_manifest(p)["category"]) == {"beta"} for p in paths)

    def must_not_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a complete member")

    monkeypatch.setattr(shift, "shift_dataset", must_not_rebuild)
    assert shift.shift_family(tiny_mvtec, tmp_path / "fam", ["gamma", "scale"], [1, 3], seed=5,
                              categories=["beta"]) == paths
    with pytest.raises(FileExistsError, match="not a complete"):
        shift.shift_family(tiny_mvtec, tmp_path / "fam", ["gamma"], [1], seed=5, categories=["alpha"])


def test_both_modes_live_side_by_side_under_their_own_family_path(tiny_mvtec, tmp_path):
    made = {mode: shift.shift_family(tiny_mvtec, tmp_path / "fam", ["rotation"], [2], seed=1, mode=mode)[0]
            for mode in shift.MODES}
    for mode, path in made.items():
        assert path == shift.family_path(tmp_path / "fam", "rotation", 2, 1, mode)
        assert path == tmp_path / "fam" / mode / "rotation" / "severity=2" / "seed=1"
        assert set(shift.read_manifest(path)["mode"]) == {mode}
    assert tree_hashes(made["per_image"]) != tree_hashes(made["domain"])


def test_keys_shift_only_the_listed_samples_with_the_same_draws(tiny_mvtec, tmp_path):
    everything = shift.shift_dataset(tiny_mvtec, tmp_path / "all", "mixed", 3, seed=0, progress=False)
    keys = {"alpha/test/scratch/001.png", "beta/train/good/004.png", "beta/test/good/000.png"}
    subset = shift.shift_dataset(tiny_mvtec, tmp_path / "some", "mixed", 3, seed=0, progress=False, keys=keys)
    assert set(shift.read_manifest(subset)["image"]) == keys
    written = tree_hashes(subset)
    written.pop(shift.MANIFEST)
    assert {k for k in written if "ground_truth" not in k} == keys
    assert "alpha/ground_truth/scratch/001_mask.png" in written
    assert all(tree_hashes(everything)[name] == digest for name, digest in written.items())
    with pytest.raises(ValueError, match="alpha/test/none/000.png"):
        shift.shift_dataset(tiny_mvtec, tmp_path / "bad", "blur", 1, seed=0, keys={"alpha/test/none/000.png"})
    with pytest.raises(ValueError, match="beta/train/good/004.png"):  # not in the parts asked for
        shift.shift_dataset(tiny_mvtec, tmp_path / "bad", "blur", 1, seed=0, keys=keys, parts=("test",))
    assert not (tmp_path / "bad").exists()


def test_the_manifest_records_the_share_of_reflected_pixels(tiny_mvtec, tmp_path):
    dst = shift.shift_dataset(tiny_mvtec, tmp_path / "rot", "rotation", 5, seed=0, progress=False,
                              categories=["alpha"])
    manifest = shift.read_manifest(dst)
    assert (manifest["invalid_fraction"] > 0.05).all()  # no canvas here: the corners are reflections
    for row in manifest.head(4).itertuples():
        _, _, valid, _ = shift.replay_sample(tiny_mvtec, dst, row.image)
        assert row.invalid_fraction == pytest.approx(1 - valid.mean(), abs=1e-6)


def test_shift_condition_job_builds_one_condition_at_its_family_path(tiny_mvtec, tmp_path):
    path = shift.shift_condition_job(tiny_mvtec, tmp_path / "fam", "gamma", 2, 4, mode="domain",
                                     categories=["beta"], parts=("test",))
    assert path == shift.family_path(tmp_path / "fam", "gamma", 2, 4, "domain")
    manifest = shift.read_manifest(path)
    assert set(manifest["split"]) == {"test"} and set(manifest["category"]) == {"beta"}
    assert manifest["params"].nunique() == 1


# --- generated data: canvases instead of borders, severities that grow, domain mode ---------------------------

def largest_flat_border_region(image: np.ndarray) -> float:
    """Area share of the largest 4-connected region of one exact colour that touches the image border."""
    ids = image.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
    border = np.zeros(ids.shape, bool)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    largest = 0
    for colour in np.unique(ids[border]):
        labels, _ = ndimage.label(ids == colour)
        touching = np.unique(labels[border & (ids == colour)])
        largest = max(largest, np.bincount(labels.ravel())[touching].max())
    return largest / ids.size


@pytest.fixture(scope="module")
def synthetic_small(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("synthetic") / "data", seed=0, size=64, n_train=3,
                              n_test_good=1, n_per_defect=1)


@pytest.fixture(scope="module")
def synthetic_full_size(tmp_path_factory) -> Path:
    # 256 px, the study's size: blur severities 1-2 (0.5 and 1 px at 256 px) fall below a pixel on small images
    # and change nothing there
    return synthetic.generate(tmp_path_factory.mktemp("synthetic256") / "data", seed=0, size=256, n_train=2,
                              n_test_good=1, n_per_defect=1)


@pytest.mark.parametrize("mode", shift.MODES)
def test_geometric_images_show_no_flat_border_and_border_fill_does(synthetic_small, tmp_path, mode):
    for category in SYNTHETIC_CATEGORIES:
        clean = [largest_flat_border_region(load_image(s.image_path)) for s in list_samples(synthetic_small, category)]
        assert max(clean) < 0.01  # the measure does not fire on the scenes themselves
    for transform in GEOMETRIC + ["border_fill", "rotation_fill"]:
        dst = shift.shift_dataset(synthetic_small, tmp_path / transform, transform, 5, seed=0, progress=False,
                                  mode=mode)
        manifest = shift.read_manifest(dst)
        for category in SYNTHETIC_CATEGORIES:
            flat = [largest_flat_border_region(load_image(s.image_path)) for s in list_samples(dst, category)]
            invalid = manifest.loc[manifest["category"] == category, "invalid_fraction"]
            if transform in ("border_fill", "rotation_fill"):  # the controls keep the old flat frame
                assert min(flat) > 0.01 and (invalid > 0.1).all(), (category, flat)
            else:
                assert max(flat) < 0.01, (transform, category, flat)
                assert (invalid == 0).all()  # the canvas holds the whole pose change


def test_synthetic_images_and_masks_are_cut_from_the_moved_canvas(synthetic_small, tmp_path):
    dst = shift.shift_dataset(synthetic_small, tmp_path / "moved", "translation", 5, seed=2, progress=False,
                              mode="domain", categories=["carpet"])
    manifest = shift.read_manifest(dst)
    params = json.loads(manifest["params"].iloc[0])
    dx, dy = round(params["dx"] * 64), round(params["dy"] * 64)
    assert max(abs(dx), abs(dy)) >= 7
    m = synthetic.canvas_margin(64)
    for row in manifest.itertuples():
        window = np.s_[m - dy:m - dy + 64, m - dx:m - dx + 64]
        canvas = load_image(synthetic.canvas_path_for(synthetic_small, row.image))
        assert np.array_equal(load_image(dst / row.image), canvas[window])
        if row.label_before == 1:
            canvas_mask = load_mask(synthetic.canvas_path_for(synthetic_small, row.image, mask=True))
            category, _, defect, name = row.image.split("/")
            written = load_mask(dst / category / "ground_truth" / defect / name.replace(".png", "_mask.png"))
            assert np.array_equal(written, canvas_mask[window])
            assert row.label_after == int(written.any())


def test_a_canvas_that_no_longer_matches_its_image_is_refused(tmp_path):
    root = synthetic.generate(tmp_path / "data", seed=0, size=32, categories=("hazelnut",), n_train=1,
                              n_test_good=1, n_per_defect=1)
    image_path = root / "hazelnut" / "train" / "good" / "000.png"
    Image.fromarray(255 - load_image(image_path)).save(image_path)
    with pytest.raises(shift.DatasetError, match="canvas .*000.png"):
        shift.shift_dataset(root, tmp_path / "rot", "rotation", 1, seed=0, progress=False)
    assert not (tmp_path / "rot").exists()
    shift.shift_dataset(root, tmp_path / "light", "brightness", 1, seed=0, progress=False)  # needs no canvas


def test_same_seed_gives_byte_identical_files_through_the_canvas(synthetic_small, tmp_path):
    runs = [shift.shift_dataset(synthetic_small, tmp_path / name, "mixed", 4, seed=seed, progress=False,
                                mode="domain", categories=["zipper"]) for name, seed in (("a", 1), ("b", 1), ("c", 2))]
    assert tree_hashes(runs[0]) == tree_hashes(runs[1]) != tree_hashes(runs[2])


@pytest.mark.parametrize("mode", shift.MODES)
def test_every_severity_changes_every_category_strictly_more(synthetic_full_size, mode):
    distances = shift.image_distances(synthetic_full_size, shift.TRANSFORM_NAMES, shift.SEVERITIES, seed=0,
                                      mode=mode)
    assert (distances["n_images"] == 6).all()
    for (category, transform), rows in distances.groupby(["category", "transform"]):
        rows = rows.sort_values("severity")
        layout = rows["layout_abs_diff"].tolist()
        assert layout[0] == 0 and all(a < b for a, b in zip(layout, layout[1:])), (category, transform, layout)
        if transform not in GEOMETRIC + ["mixed"]:
            # pixel differences of a pose change saturate on periodic textures (see image_distances)
            pixel = rows["pixel_abs_diff"].tolist()
            assert all(a < b for a, b in zip(pixel, pixel[1:])), (category, transform, pixel)


def test_domain_mode_gives_every_image_of_a_condition_the_same_params(synthetic_small, tmp_path):
    for transform in ("rotation", "perspective", "spotlight", "noise", "mixed", "border_fill"):
        counts = {}
        for mode in shift.MODES:
            dst = shift.shift_dataset(synthetic_small, tmp_path / mode / transform, transform, 3, seed=0,
                                      progress=False, mode=mode)
            manifest = shift.read_manifest(dst)
            assert len(manifest) == 3 * 7 and set(manifest["split"]) == {"train", "test"}
            counts[mode] = manifest["params"].nunique()
        assert counts["domain"] == 1 and counts["per_image"] > 1, (transform, counts)
    # One sensor, many frames: the noise params are shared, each image still gets its own noise field.
    dst = tmp_path / "domain" / "noise"
    residuals = []
    for key in ("carpet/train/good/000.png", "carpet/train/good/001.png"):
        clean = load_image(synthetic_small / key).astype(np.int16)
        noisy = load_image(dst / key).astype(np.int16)
        assert np.array_equal(shift.replay_sample(synthetic_small, dst, key)[0], noisy)
        residuals.append(np.where((clean > 60) & (clean < 190), noisy - clean, 0))
    assert not np.array_equal(*residuals)


# --- command line --------------------------------------------------------------------------------------------

def test_cli_single_and_family(tiny_mvtec, tmp_path, capsys):
    assert shift.main(["--src", str(tiny_mvtec), "--dst", str(tmp_path / "one"), "--transform", "spotlight",
                       "--severity", "2", "--seed", "0", "--categories", "alpha"]) == 0
    assert (tmp_path / "one" / "shift_manifest.csv").is_file()
    assert shift.main(["--src", str(tiny_mvtec), "--dst-root", str(tmp_path / "fam"), "--family", "--transforms",
                       "contrast", "--severities", "0", "5", "--seed", "3", "--categories", "alpha"]) == 0
    assert (tmp_path / "fam" / "per_image" / "contrast" / "severity=5" / "seed=3" / "shift_manifest.csv").is_file()
    assert shift.main(["--src", str(tiny_mvtec), "--dst", str(tmp_path / "frame"), "--transform", "border_fill",
                       "--severity", "5", "--seed", "0", "--mode", "domain"]) == 0
    manifest = shift.read_manifest(tmp_path / "frame")
    assert set(manifest["transform"]) == {"border_fill"} and set(manifest["mode"]) == {"domain"}
    assert (manifest["invalid_fraction"] > 0.1).all()


@pytest.mark.parametrize("args, message", [
    (["--transform", "sepia", "--severity", "1"], "transform must be one of"),
    (["--transform", "blur", "--severity", "9"], "severity must be an integer in 0..5"),
    (["--transform", "blur"], "needs --severity"),
    (["--transform", "blur", "--severity", "1", "--mode", "global"], "mode must be one of per_image, domain"),
])
def test_cli_errors_name_the_parameter(tiny_mvtec, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        shift.main(["--src", str(tiny_mvtec), "--dst", str(tmp_path / "x"), "--seed", "0", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_build_conditions_shifts_only_the_folders_asked_for_and_upgrades_in_place(tiny_mvtec, tmp_path):
    from data_prep.shift import build_conditions, family_path, read_manifest

    dst_root = tmp_path / "family"
    [test_only] = build_conditions(tiny_mvtec, dst_root, {("brightness", 3): {"test"}}, seed=0)
    assert set(read_manifest(test_only)["split"]) == {"test"}
    assert not list((test_only / "alpha" / "train").rglob("*.png"))
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    test_files = {p.relative_to(test_only): digest(p) for p in (test_only / "alpha" / "test").rglob("*.png")}

    [both] = build_conditions(tiny_mvtec, dst_root, {("brightness", 3): {"train", "test"}}, seed=0)
    assert both == family_path(dst_root, "brightness", 3, 0)
    assert set(read_manifest(both)["split"]) == {"train", "test"}
    assert len(list((both / "alpha" / "train" / "good").glob("*.png"))) == 12
    # The per-image draws do not depend on which folders were shifted.
    assert test_files == {p.relative_to(both): digest(p) for p in (both / "alpha" / "test").rglob("*.png")}
    mtime = (both / "shift_manifest.csv").stat().st_mtime_ns
    build_conditions(tiny_mvtec, dst_root, {("brightness", 3): {"test"}}, seed=0)
    assert (both / "shift_manifest.csv").stat().st_mtime_ns == mtime, "a complete copy must be kept"
