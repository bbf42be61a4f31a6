"""MVTec-Shift: masks move with images, severity 0 is the identity, seeds reproduce files, labels follow masks."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import shift
from helpers.data import list_samples, load_image, load_mask

GEOMETRIC = [n for n, t in shift.TRANSFORMS.items() if t.kind == "geometric"]
PHOTOMETRIC = [n for n, t in shift.TRANSFORMS.items() if t.kind == "photometric"]


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
        assert iou(out.mean(axis=2) > 145, moved) > 0.9


@pytest.mark.parametrize("transform", shift.TRANSFORM_NAMES)
def test_severity_zero_is_the_exact_identity(transform):
    _, mask = square_image()
    image = textured_image(128)
    out, moved, valid, params = shift.apply(image, mask, transform, 0, np.random.default_rng(3))
    assert out.dtype == np.uint8 and out.tobytes() == image.tobytes()
    assert np.array_equal(moved, mask) and valid.all() and params == {}
    out2, _, _, _ = shift.apply_with_params(image, None, transform, 0, {})
    assert out2.tobytes() == image.tobytes()


@pytest.mark.parametrize("transform", PHOTOMETRIC)
def test_higher_severity_changes_the_image_more(transform):
    image = textured_image()
    diffs = []
    for severity in range(6):
        per_rng = [np.abs(shift.apply(image, None, transform, severity, np.random.default_rng(s))[0].astype(float)
                          - image).mean() for s in range(4)]
        diffs.append(np.mean(per_rng))
    assert diffs[0] == 0
    assert all(a < b for a, b in zip(diffs, diffs[1:])), diffs


@pytest.mark.parametrize("transform", GEOMETRIC + ["mixed"])
def test_uncovered_border_is_never_a_defect_and_masks_stay_binary(transform):
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
    out, moved, valid, _ = shift.apply_with_params(image, mask, "translation", 5, {"dx": -10, "dy": -10})
    assert not moved.any()
    assert not valid[-10:, :].any() and not valid[:, -10:].any() and valid[:-10, :-10].all()
    assert (out != 230).all()  # the defect left the frame; the uncovered border is mean colour, not defect


@pytest.mark.parametrize("transform", shift.TRANSFORM_NAMES)
def test_params_are_json_and_replay_exactly(transform):
    image, mask = square_image()
    out, moved, valid, params = shift.apply(textured_image(128), mask, transform, 4, np.random.default_rng(7))
    replayed = shift.apply_with_params(textured_image(128), mask, transform, 4, json.loads(json.dumps(params)))
    assert np.array_equal(replayed[0], out) and np.array_equal(replayed[1], moved)
    assert np.array_equal(replayed[2], valid)


def test_mixed_composes_several_transforms_at_the_same_severity():
    counts = set()
    for seed in range(20):
        params = shift.apply(textured_image(64), None, "mixed", 3, np.random.default_rng(seed))[3]
        names = [step["transform"] for step in params["steps"]]
        counts.add(len(names))
        assert len(set(names)) == len(names) and "mixed" not in names
    assert counts == {2, 3}


def test_bad_transform_or_severity_names_the_parameter_and_allowed_values():
    image, _ = square_image(32)
    with pytest.raises(ValueError, match=r"transform must be one of .*rotation.*mixed; got 'sepia'"):
        shift.apply(image, None, "sepia", 1, np.random.default_rng(0))
    for bad in (6, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match=r"severity must be an integer in 0\.\.5"):
            shift.apply(image, None, "blur", bad, np.random.default_rng(0))


def test_severity_table_documents_every_transform():
    markdown = shift.severity_table_markdown()
    for name in shift.TRANSFORM_NAMES:
        row = shift.SEVERITY_TABLE[name]
        assert row["parameter"] and all(k in row for k in range(1, 6))
        assert f"| {name} |" in markdown
    assert "mean colour" in markdown


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
    assert paths == [tmp_path / "fam" / t / f"severity={k}" / "seed=5" for t in ("gamma", "scale") for k in (1, 3)]
    assert all(set(shift.read_manifest(p)["category"]) == {"beta"} for p in paths)

    def must_not_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a complete member")

    monkeypatch.setattr(shift, "shift_dataset", must_not_rebuild)
    assert shift.shift_family(tiny_mvtec, tmp_path / "fam", ["gamma", "scale"], [1, 3], seed=5,
                              categories=["beta"]) == paths
    with pytest.raises(FileExistsError, match="not a complete"):
        shift.shift_family(tiny_mvtec, tmp_path / "fam", ["gamma"], [1], seed=5, categories=["alpha"])


# --- command line --------------------------------------------------------------------------------------------

def test_cli_single_and_family(tiny_mvtec, tmp_path, capsys):
    assert shift.main(["--src", str(tiny_mvtec), "--dst", str(tmp_path / "one"), "--transform", "spotlight",
                       "--severity", "2", "--seed", "0", "--categories", "alpha"]) == 0
    assert (tmp_path / "one" / "shift_manifest.csv").is_file()
    assert shift.main(["--src", str(tiny_mvtec), "--dst-root", str(tmp_path / "fam"), "--family", "--transforms",
                       "contrast", "--severities", "0", "5", "--seed", "3", "--categories", "alpha"]) == 0
    assert (tmp_path / "fam" / "contrast" / "severity=5" / "seed=3" / "shift_manifest.csv").is_file()


@pytest.mark.parametrize("args, message", [
    (["--transform", "sepia", "--severity", "1"], "transform must be one of"),
    (["--transform", "blur", "--severity", "9"], "severity must be an integer in 0..5"),
    (["--transform", "blur"], "needs --severity"),
])
def test_cli_errors_name_the_parameter(tiny_mvtec, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        shift.main(["--src", str(tiny_mvtec), "--dst", str(tmp_path / "x"), "--seed", "0", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_build_conditions_shifts_only_the_folders_asked_for_and_upgrades_in_place(tiny_mvtec, tmp_path):
    import hashlib

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
