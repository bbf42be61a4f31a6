"""Dataset validation: each way of breaking a tiny MVTec AD or MVTec AD 2 folder is reported with its path, all at
once, and the image modes found are summarised."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.validate import Problem, check, main, validate
from helpers.paths import ROOT
from tests.conftest import write_tiny_mvtec
from tests.image_files import GREY, write_png
from tests.mvtec_ad2 import write_tiny_mvtec_ad2


def only(problems: list[Problem], path: Path, words: str) -> Problem:
    """The single problem reported for ``path``, checking its message mentions ``words``."""
    found = [p for p in problems if p.path == path]
    assert len(found) == 1, problems
    assert words in found[0].message, found[0]
    return found[0]


def save_mask(path: Path, values: np.ndarray) -> None:
    Image.fromarray(values.astype(np.uint8)).save(path)


def test_a_clean_dataset_has_no_problems(tiny_mvtec, capsys):
    assert validate(tiny_mvtec) == []
    assert main(["--root", str(tiny_mvtec)]) == 0
    # 2 x (12 train + 4 good + 2 x 3 defect) images, 2 x 6 masks
    assert capsys.readouterr().out.splitlines() == ["image modes: RGB 44", "mask modes: L 12",
                                                    "ok: 2 categories, 44 images"]


def test_missing_folders_and_empty_train_set(tmp_path):
    root = write_tiny_mvtec(tmp_path / "d", categories=("alpha", "beta", "gamma"))
    shutil.rmtree(root / "alpha" / "train")
    shutil.rmtree(root / "beta" / "test")
    for image in (root / "gamma" / "train" / "good").iterdir():
        image.unlink()
    problems = validate(root)
    only(problems, root / "alpha" / "train" / "good", "missing folder")
    only(problems, root / "beta" / "test", "missing folder")
    only(problems, root / "gamma" / "train" / "good", "holds no images")
    only(validate(root, ["delta"]), root / "delta", "does not exist")
    only(validate(tmp_path / "nowhere"), tmp_path / "nowhere", "does not exist")


def test_unreadable_and_truncated_images(tiny_mvtec):
    garbage = tiny_mvtec / "alpha" / "train" / "good" / "000.png"
    garbage.write_bytes(b"not a png")
    truncated = tiny_mvtec / "alpha" / "test" / "good" / "001.png"
    truncated.write_bytes(truncated.read_bytes()[:-300])  # header intact: only decoding finds it
    problems = validate(tiny_mvtec, ["alpha"])
    only(problems, garbage, "cannot be decoded")
    only(problems, truncated, "cannot be decoded")


def test_mask_problems(tiny_mvtec):
    ground_truth = tiny_mvtec / "alpha" / "ground_truth"
    image_without_mask = tiny_mvtec / "alpha" / "test" / "scratch" / "000.png"
    (ground_truth / "scratch" / "000_mask.png").unlink()
    wrong_size = ground_truth / "scratch" / "001_mask.png"
    save_mask(wrong_size, np.full((32, 32), 255))
    empty = ground_truth / "scratch" / "002_mask.png"
    save_mask(empty, np.zeros((64, 64)))
    soft = ground_truth / "hole" / "000_mask.png"
    save_mask(soft, np.tile(np.arange(64) * 4, (64, 1)))  # a gradient, as anti-aliased masks are
    two_labels = ground_truth / "hole" / "001_mask.png"
    save_mask(two_labels, np.repeat([0, 1, 255, 0], 16)[None, :].repeat(64, axis=0))
    orphan = ground_truth / "hole" / "007_mask.png"
    save_mask(orphan, np.full((64, 64), 255))
    problems = validate(tiny_mvtec)
    only(problems, image_without_mask, "has no mask")
    assert "000_mask.png" in only(problems, image_without_mask, "has no mask").message
    assert "32x32" in only(problems, wrong_size, "64x64").message
    only(problems, empty, "empty")
    only(problems, soft, "not binary")
    only(problems, two_labels, "not binary")
    only(problems, orphan, "has no image")
    assert len(problems) == 6  # every problem listed, and nothing else flagged


def test_masks_are_not_required_without_ground_truth(tmp_path):
    root = write_tiny_mvtec(tmp_path / "d", categories=("gamma",), with_ground_truth=False)
    assert validate(root) == []


def test_all_problems_are_listed_and_the_command_fails(tiny_mvtec, capsys):
    broken_image = tiny_mvtec / "beta" / "test" / "hole" / "002.png"
    broken_image.write_bytes(b"")
    missing_test = tiny_mvtec / "alpha" / "test"
    shutil.rmtree(missing_test)
    assert main(["--root", str(tiny_mvtec)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"{missing_test}: missing folder" in lines
    assert any(line.startswith(f"{broken_image}: image cannot be decoded") for line in lines)
    # alpha's six masks now have no image, so they are listed too, each on its own line.
    assert sum("has no image" in line for line in lines) == 6
    assert lines[-3:-1] == ["image modes: RGB 33", "mask modes: L 6"]  # the broken image has no mode
    assert lines[-1] == f"{len(lines) - 3} problem(s) in 2 categories, 34 images"  # alpha train 12 + beta 22
    assert main(["--root", str(tiny_mvtec), "--category", "beta"]) == 1


@pytest.mark.parametrize("break_it, status", [(False, 0), (True, 1)])
def test_command_line_runs_as_a_module(tiny_mvtec, break_it, status):
    if break_it:
        (tiny_mvtec / "beta" / "train" / "good" / "003.png").write_bytes(b"broken")
    done = subprocess.run([sys.executable, "-m", "data_prep.validate", "--root", str(tiny_mvtec)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == status, done.stdout + done.stderr


def test_modes_are_counted_and_16_bit_images_pass(tiny_mvtec, capsys):
    words = np.full((64, 64), 40000, np.uint16)
    for name in ("000.png", "001.png", "002.png"):
        write_png(tiny_mvtec / "alpha" / "train" / "good" / name, words, 16, GREY)
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(tiny_mvtec / "alpha" / "train" / "good" / "003.png")
    found = check(tiny_mvtec, ["alpha"])
    assert found.problems == [] and found.image_modes == {"RGB": 18, "I;16": 3, "L": 1}
    assert main(["--root", str(tiny_mvtec), "--category", "alpha"]) == 0
    assert "image modes: RGB 18, I;16 3, L 1" in capsys.readouterr().out.splitlines()


def test_images_the_reader_cannot_scale_are_problems(tiny_mvtec):
    wide = tiny_mvtec / "alpha" / "train" / "good" / "000.tif"
    Image.fromarray(np.full((64, 64), 70000, np.int32)).save(wide)
    only(validate(tiny_mvtec, ["alpha"]), wide, "32-bit integer image")


def test_16_bit_masks_are_checked_at_their_own_depth(tiny_mvtec):
    ground_truth = tiny_mvtec / "alpha" / "ground_truth"
    binary = np.zeros((64, 64), np.uint16)
    binary[10:20, 10:20] = 65535
    write_png(ground_truth / "hole" / "000_mask.png", binary, 16, GREY)
    gradient = ground_truth / "hole" / "001_mask.png"
    write_png(gradient, np.tile(np.arange(64, dtype=np.uint16) * 1000, (64, 1)), 16, GREY)
    only(validate(tiny_mvtec, ["alpha"]), gradient, "not binary")
    assert len(validate(tiny_mvtec, ["alpha"])) == 1


@pytest.mark.parametrize("remove, words", [("defects", "no anomalous images"), ("good", "no normal images")])
def test_a_test_split_without_both_classes_is_a_problem(tiny_mvtec, remove, words):
    test_dir = tiny_mvtec / "alpha" / "test"
    if remove == "defects":
        for defect in ("scratch", "hole"):
            shutil.rmtree(test_dir / defect)
        shutil.rmtree(tiny_mvtec / "alpha" / "ground_truth")
        path = test_dir
    else:
        shutil.rmtree(test_dir / "good")
        path = test_dir / "good"
    problem = only(validate(tiny_mvtec), path, words)
    assert "'alpha'" in problem.message  # the category is named
    assert len(validate(tiny_mvtec)) == 1


def test_mvtec_ad2_layout(tmp_path, capsys):
    root = write_tiny_mvtec_ad2(tmp_path / "ad2", objects=("can", "vial"))
    assert validate(root) == []
    assert main(["--root", str(root)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "ok: 2 categories, 52 images"  # 2 x (10 + 6 + 4 + 6)
    masks = root / "vial" / "test_public" / "ground_truth" / "bad"
    save_mask(masks / "001_overexposed_mask.png", np.full((32, 32), 255))
    save_mask(masks / "002_overexposed_mask.png", np.tile(np.arange(64) * 4, (64, 1)))
    (masks / "003_overexposed_mask.png").unlink()
    shutil.rmtree(root / "can" / "validation")
    (root / "can" / "test_private" / "broken.png").write_bytes(b"never read")
    problems = validate(root)
    only(problems, masks / "001_overexposed_mask.png", "32x32")
    only(problems, masks / "002_overexposed_mask.png", "not binary")
    only(problems, root / "vial" / "test_public" / "bad" / "003_overexposed.png", "has no mask")
    only(problems, root / "can" / "validation" / "good", "missing folder")
    assert len(problems) == 4
