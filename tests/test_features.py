from types import SimpleNamespace

import torch

from helpers import experiments, features, parallel
from helpers.data import list_samples


def _train_paths(root, cat="alpha", n=4):
    return [s.image_path for s in list_samples(root, cat) if s.split == "train"][:n]


def test_cache_returns_what_compute_returns_and_is_reused(tiny_mvtec, tmp_path, monkeypatch):
    paths = _train_paths(tiny_mvtec)
    cache = tmp_path / "cache"
    first = features.extract(paths, "efficientnet_lite0", 64, ["blocks.2"], cache_dir=cache, progress=False)
    direct = features.compute(paths, "efficientnet_lite0", 64, ["blocks.2"])
    assert torch.allclose(first["blocks.2"], direct["blocks.2"])
    assert first["blocks.2"].shape == (4, 40, 8, 8)

    def fail(*a, **k):
        raise AssertionError("backbone recomputed although cached")

    monkeypatch.setattr(features, "compute", fail)
    again = features.extract(paths, "efficientnet_lite0", 64, ["blocks.2"], cache_dir=cache, progress=False)
    assert torch.equal(again["blocks.2"], first["blocks.2"])


def test_changing_an_image_or_size_never_returns_a_stale_entry(tiny_mvtec, tmp_path):
    paths = _train_paths(tiny_mvtec)
    cache = tmp_path / "cache"
    before = features.extract(paths, "efficientnet_lite0", 64, ["blocks.2"], cache_dir=cache, progress=False)
    other_size = features.extract(paths, "efficientnet_lite0", 96, ["blocks.2"], cache_dir=cache, progress=False)
    assert other_size["blocks.2"].shape[-1] == 12
    paths[0].write_bytes(paths[1].read_bytes())  # same name, new content
    after = features.extract(paths, "efficientnet_lite0", 64, ["blocks.2"], cache_dir=cache, progress=False)
    assert torch.allclose(after["blocks.2"][0], before["blocks.2"][1])
    assert not torch.allclose(after["blocks.2"][0], before["blocks.2"][0])


def test_any_subset_and_order_of_cached_images_reads_back_the_same_features(tiny_mvtec, tmp_path, monkeypatch):
    paths = _train_paths(tiny_mvtec, n=6)
    cache = tmp_path / "cache"
    full = features.extract(paths, "efficientnet_lite0", 64, ["blocks.2"], cache_dir=cache)["blocks.2"]
    monkeypatch.setattr(features, "compute", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    subset = features.extract([paths[4], paths[1]], "efficientnet_lite0", 64, ["blocks.2"], cache_dir=cache)
    assert torch.equal(subset["blocks.2"], full[[4, 1]])


def test_an_unreadable_entry_is_discarded_and_recomputed(tiny_mvtec, tmp_path, caplog):
    paths = _train_paths(tiny_mvtec, n=2)
    cache = tmp_path / "cache"
    first = features.extract(paths, "efficientnet_lite0", 64, ["blocks.2"], cache_dir=cache)["blocks.2"]
    entry = features.cache_folder("efficientnet_lite0", 64, cache) / f"{features.file_digest(paths[0])}.safetensors"
    entry.write_bytes(entry.read_bytes()[:50])  # cut short, as a full disk leaves it
    with caplog.at_level("WARNING"):
        again = features.extract(paths, "efficientnet_lite0", 64, ["blocks.2"], cache_dir=cache)["blocks.2"]
    assert torch.equal(again, first) and str(entry) in caplog.text
    assert entry.stat().st_size > 50


def test_a_killed_extraction_leaves_no_temporary_file_and_the_rerun_is_byte_identical(tmp_path):
    """Kill a process mid-way through filling the cache; the next run removes its temporary files and writes the
    same bytes as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers.paths import ROOT
    from tests.conftest import write_tiny_mvtec

    root = write_tiny_mvtec(tmp_path / "tiny", categories=("alpha",), n_train=200, size=96)
    paths = [str(p) for p in sorted((root / "alpha" / "train" / "good").glob("*.png"))]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    script = ("import sys, time; from helpers import features, threads\n"
              "paths = sys.argv[2:]\n"
              "orig = features._write\n"
              "def slow(path, tensors):\n"
              "    orig(path, tensors); time.sleep(0.05)\n"
              "features._write = slow\n"
              "features.extract(paths, 'efficientnet_lite0', 96, ['blocks.2'], device='cpu', cache_dir=sys.argv[1])\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(killed), *paths], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL)
    folder = features.cache_folder("efficientnet_lite0", 96, killed)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(folder.glob("*.safetensors"))) < 20:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list(folder.glob("*.safetensors")))
    assert 0 < written < len(paths), "the kill must land mid-way"
    (folder / f".{os.urandom(4).hex()}.safetensors.999999.tmp").write_bytes(b"half")  # as a kill mid-write leaves
    features.extract(paths, "efficientnet_lite0", 96, ["blocks.2"], device="cpu", cache_dir=killed)
    features.extract(paths, "efficientnet_lite0", 96, ["blocks.2"], device="cpu", cache_dir=clean)
    assert not list(folder.glob(".*.tmp"))
    other = features.cache_folder("efficientnet_lite0", 96, clean)
    names = sorted(p.name for p in folder.glob("*.safetensors"))
    assert names == sorted(p.name for p in other.glob("*.safetensors")) and len(names) == len(paths)
    assert all((folder / n).read_bytes() == (other / n).read_bytes() for n in names)


def test_prefetch_gives_each_image_not_cached_yet_one_job_and_cached_ones_none(tiny_mvtec, tmp_path, monkeypatch):
    monkeypatch.setattr(features, "CACHE", tmp_path / "cache")
    paths = _train_paths(tiny_mvtec, n=6)
    features.extract(paths[:2], "efficientnet_lite0", 64, ["blocks.2"], device="cpu")
    jobs = []
    monkeypatch.setattr(parallel, "run_jobs", lambda fn, batch, *a, **k: jobs.extend(batch))
    model = SimpleNamespace(backbone="efficientnet_lite0", image_size=64, device="cpu")
    run = SimpleNamespace(config=SimpleNamespace(model=model, execution=None))
    experiments.prefetch_features(run, [paths[:4], paths[3:6], paths[:2]])  # overlapping sets, one all cached
    assert [job[0] for job in jobs] == [paths[2:4], paths[4:6]]
    assert {job[1:] for job in jobs} == {("efficientnet_lite0", 64, "cpu")}
    cut_short = features.entry(paths[1], "efficientnet_lite0", 64)
    cut_short.write_bytes(cut_short.read_bytes()[:50])  # unreadable: prefetched again, not left to every reader
    jobs.clear()
    experiments.prefetch_features(run, [paths[:2]])
    assert [job[0] for job in jobs] == [paths[1:2]]
