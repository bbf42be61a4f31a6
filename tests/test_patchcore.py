"""PatchCore: anomalib's numbers from the same features, an exact greedy coreset, an exact search, seeded fits
and a lossless save/load."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from unittest.mock import patch

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from anomalib.models.image.patchcore.torch_model import PatchcoreModel

from helpers import backbones, bench, evaluate, features, patchcore, splits
from helpers.data import list_samples, load_mask
from helpers.detector import load_detector
from helpers.patchcore import (
    BankIndex,
    PatchCore,
    _bf16_parts,
    _bf16_split,
    anomaly_maps,
    coreset_indices,
    default_stages,
    fast_bf16_available,
    greedy_kcenter,
    patch_embedding,
    random_projection,
    rows_of,
)
from tests.conftest import write_tiny_mvtec

BACKBONE = "efficientnet_lite0"
STAGES = default_stages(BACKBONE)
SIZE = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny_mvtec category: train/test paths, test labels and masks, and their features (computed once)."""
    root = write_tiny_mvtec(tmp_path_factory.mktemp("patchcore") / "tiny", categories=("alpha",))
    samples = list_samples(root, "alpha")
    train = [s.image_path for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    return {"train": train, "test": [s.image_path for s in test], "labels": np.array([s.label for s in test]),
            "masks": np.stack([load_mask(s.mask_path, size=SIZE) for s in test]),
            "train_features": features.compute(train, BACKBONE, SIZE, STAGES),
            "test_features": features.compute([s.image_path for s in test], BACKBONE, SIZE, STAGES)}


@pytest.fixture(scope="module")
def fitted(tiny, tmp_path_factory):
    detector = PatchCore(image_size=SIZE, coreset_ratio=0.25, seed=3, device="cpu",
                         cache_dir=tmp_path_factory.mktemp("cache"))
    return detector.fit(tiny["train"])


def _anomalib_model(k: int = 9) -> PatchcoreModel:
    model = PatchcoreModel(layers=list(STAGES), backbone=backbones.spec(BACKBONE).timm_name, pre_trained=False,
                           num_neighbors=k)
    model.feature_extractor.feature_extractor.load_state_dict(backbones.features_state_dict(BACKBONE), strict=False)
    return model


def test_fit_predict_shapes_and_defects_score_higher(tiny, fitted):
    pred = fitted.predict(tiny["test"])
    n = len(tiny["test"])
    assert pred.image_scores.shape == (n,) and pred.anomaly_maps.shape == (n, SIZE, SIZE)
    assert pred.image_scores.dtype == np.float32 and np.isfinite(pred.anomaly_maps).all()
    labels, masks = tiny["labels"], tiny["masks"]
    assert pred.image_scores[labels == 1].mean() > pred.image_scores[labels == 0].mean()
    assert pred.anomaly_maps[masks].mean() > pred.anomaly_maps[~masks].mean()
    assert len(fitted.memory_bank) == int(12 * 8 * 8 * 0.25) == len(fitted.bank_sources)
    assert torch.equal(fitted.memory_bank, rows_of(fitted.embed(tiny["train_features"]))[fitted.bank_sources])


def test_embedding_is_anomalibs(tiny):
    model = _anomalib_model()
    feats = tiny["train_features"]
    expected = model.generate_embedding({s: model.feature_pooler(feats[s]) for s in STAGES})
    assert torch.equal(patch_embedding(feats, STAGES), expected)


def test_without_coreset_scores_and_maps_are_anomalibs(tiny):
    ours = PatchCore(image_size=SIZE, coreset_ratio=1.0, device="cpu").fit_features(tiny["train_features"])
    got = ours.predict_features(tiny["test_features"])

    model = _anomalib_model().eval()
    model.memory_bank = rows_of(ours.embed(tiny["train_features"]))  # anomalib's bank before subsampling
    assert torch.equal(model.memory_bank, ours.memory_bank)
    images = backbones.normalise(features.image_batch(tiny["test"], SIZE), BACKBONE)
    with torch.no_grad():
        expected = model(images)  # anomalib end to end, its own feature extractor included
        embedding = model.reshape_embedding(model.generate_embedding(
            {s: model.feature_pooler(f) for s, f in model.feature_extractor(images).items()}))
        patch_scores, _ = model.nearest_neighbors(embedding, n_neighbors=1)
    np.testing.assert_allclose(got.image_scores, expected.pred_score.numpy(), rtol=1e-4)

    d2, _ = BankIndex(ours.memory_bank).search(rows_of(ours.embed(tiny["test_features"])))
    np.testing.assert_allclose(d2.sqrt().numpy(), patch_scores.numpy(), rtol=1e-4, atol=1e-4)
    # anomalib 2.7 upsamples with nearest neighbour; we follow the paper (bilinear) and then use its blur.
    grid = patch_scores.reshape(len(images), 1, 8, 8)
    bilinear = model.anomaly_map_generator.blur(F.interpolate(grid, size=(SIZE, SIZE), mode="bilinear"))
    np.testing.assert_allclose(got.anomaly_maps, bilinear[:, 0].numpy(), rtol=1e-4, atol=1e-4)
    assert not np.allclose(got.anomaly_maps, expected.anomaly_map[:, 0].numpy(), rtol=1e-4, atol=1e-4)


def _reference_greedy(points: torch.Tensor, n: int, start: int) -> list[int]:
    """The textbook farthest-point loop, in float64."""
    x = points.double()
    min_d = torch.full((len(x),), float("inf"), dtype=torch.float64)
    chosen = [start]
    for _ in range(n - 1):
        min_d = torch.minimum(min_d, ((x - x[chosen[-1]]) ** 2).sum(1))
        chosen.append(int(torch.argmax(min_d)))
    return chosen


def test_greedy_coreset_picks_the_reference_greedy_indices():
    bank = torch.randn(700, 40, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.2, 3, 40)
    for block in (32, 256):  # many blocks (the lazy bound at work) and few
        assert greedy_kcenter(bank, 90, start=11, block=block).tolist() == _reference_greedy(bank, 90, 11)
    picked = coreset_indices(bank, 0.1, projection_dim=16, seed=5)
    assert len(picked) == 70
    assert picked.tolist() == _reference_greedy(random_projection(bank, 16, seed=5), 70, int(picked[0]))


@pytest.mark.parametrize("backend", ["bf16", "faiss", "torch"])
def test_every_search_backend_finds_the_exact_nearest_neighbour(backend):
    if backend == "bf16" and not fast_bf16_available():
        pytest.skip("no fast bfloat16 products on this CPU")
    gen = torch.Generator().manual_seed(1)
    bank = torch.randn(1000, 152, generator=gen) * 3 + 5  # offset: the bf16 path must handle a large mean
    bank = torch.cat([bank, bank[10:15]])  # exact duplicates: ties go to the lower index
    queries = torch.cat([bank[:50] + 1e-3 * torch.randn(50, 152, generator=gen),  # near-duplicates
                         bank[50:60],  # exact copies: distance 0, where bfloat16 can round below zero
                         torch.randn(1100, 152, generator=gen) * 3 + 5])  # more than one group of queries
    dists = torch.cdist(queries.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist").numpy()
    expected = torch.from_numpy(dists.argmin(1))  # numpy's argmin returns the first of equal minima
    index = BankIndex(bank, backend)
    for chunk in (None, 128, 1000):  # default, several chunks per group, a chunk that splits a group unevenly
        d2, idx = index.search(queries, chunk=chunk)
        assert torch.equal(idx, expected), chunk
        np.testing.assert_allclose(d2.sqrt().double().numpy(), dists.min(1), rtol=1e-5, atol=1e-4)


def test_norms_split_into_the_same_bfloat16_parts_from_float32_as_from_float64():
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.rand(1000, generator=gen) * 10.0 ** torch.randint(-30, 30, (1000,), generator=gen),
                   torch.tensor([0.0, 1.0, 3.0e38, 1.1754944e-38])]).float()
    out = torch.empty(len(x), 3, dtype=torch.bfloat16)
    _bf16_split(x, out)
    assert torch.equal(out, _bf16_parts(x.double()))
    assert torch.equal(out.double().sum(1), x.double())  # exact: three 8-bit parts hold a 24-bit significand


def test_concurrent_searches_on_threads_each_get_their_own_scratch_buffers():
    if not fast_bf16_available():
        pytest.skip("no fast bfloat16 products on this CPU: only the bf16 search uses scratch buffers")
    gen = torch.Generator().manual_seed(4)
    bank = torch.randn(700, 152, generator=gen)
    queries = [torch.randn(3000, 152, generator=gen) for _ in range(4)]
    index = BankIndex(bank, "bf16")
    expected = [index.search(q) for q in queries]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            found = list(pool.map(index.search, queries))
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(found, expected))


def test_scratch_buffers_keep_at_most_their_limit_and_results_do_not_change_with_it():
    if not fast_bf16_available():
        pytest.skip("no fast bfloat16 products on this CPU")
    gen = torch.Generator().manual_seed(5)
    bank = torch.cat([torch.randn(300, 152, generator=gen), torch.zeros(400, 152)])  # 400 equal rows: many
    queries = torch.randn(2000, 152, generator=gen) * 0.01  # candidates per query (ties near zero)
    index = BankIndex(bank, "bf16")
    kept = index.search(queries)
    small = patchcore._Workspace(limit=64 * 1024)
    with patch.object(patchcore._THREAD, "space", small, create=True):
        capped = index.search(queries)
    assert torch.equal(kept[0], capped[0]) and torch.equal(kept[1], capped[1])
    assert 0 < small.nbytes() <= 7 * 64 * 1024


def test_bf16_search_refuses_queries_it_cannot_bound():
    if not fast_bf16_available():
        pytest.skip("no fast bfloat16 products on this CPU")
    index = BankIndex(torch.randn(700, 152, generator=torch.Generator().manual_seed(6)), "bf16")
    for bad in (float("nan"), float("inf"), 1e30):
        queries = torch.zeros(10, 152)
        queries[3, 7] = bad
        with pytest.raises(ValueError, match="NaN or infinite|too large"):
            index.search(queries)


def test_bf16_search_resolves_ties_finer_than_bfloat16():
    if not fast_bf16_available():
        pytest.skip("no fast bfloat16 products on this CPU")
    gen = torch.Generator().manual_seed(2)
    queries = torch.randn(40, 152, generator=gen) * 3 + 5
    away = F.normalize(torch.randn(2, 40, 152, generator=gen), dim=2)
    # Two rows per query at distances 4 (1 + 1e-5) and 4: bfloat16 (8 bits) cannot order them, float32 can.
    bank = torch.cat([torch.randn(500, 152, generator=gen) * 3 + 5, queries + 4 * (1 + 1e-5) * away[0],
                      queries + 4 * away[1]])
    d2, idx = BankIndex(bank, "bf16").search(queries)
    assert torch.equal(idx, torch.arange(540, 580))
    np.testing.assert_allclose(d2.sqrt().numpy(), 4, rtol=1e-5)


def test_seeded_fits_are_identical_and_seeds_matter(tiny):
    def fit(seed):
        detector = PatchCore(image_size=SIZE, coreset_ratio=0.1, seed=seed, device="cpu")
        return detector.fit_features(tiny["train_features"]).memory_bank

    assert torch.equal(fit(0), fit(0))
    assert not torch.equal(fit(0), fit(1))


def test_save_load_round_trip(tiny, fitted, tmp_path):
    path = fitted.save(tmp_path / "model.safetensors")
    for loaded in (PatchCore.load(path, device="cpu"), load_detector(path)):
        assert isinstance(loaded, PatchCore) and loaded.settings() == fitted.settings()
        before, after = fitted.predict_features(tiny["test_features"]), loaded.predict_features(tiny["test_features"])
        assert np.array_equal(before.image_scores, after.image_scores)
        assert np.array_equal(before.anomaly_maps, after.anomaly_maps)
        assert torch.equal(loaded.bank_sources, fitted.bank_sources)
    assert path.read_bytes()[8:9] == b"{"  # a safetensors JSON header, not a pickle


def test_settings_record_every_hyperparameter():
    detector = PatchCore(image_size=96, coreset_ratio=0.5, k=3, target_dim=64, projection_dim=32, seed=2)
    assert detector.settings() == {"backbone": BACKBONE, "stages": list(STAGES), "image_size": 96,
                                   "coreset_ratio": 0.5, "k": 3, "target_dim": 64, "projection_dim": 32, "seed": 2}
    assert PatchCore.INFERENCE_SETTINGS == ("k",)


def test_target_dim_pools_channels_and_k1_is_the_max_patch_score(tiny):
    feats = tiny["test_features"]
    assert patch_embedding(feats, STAGES, target_dim=64).shape == (len(tiny["test"]), 64, 8, 8)
    ours = PatchCore(image_size=SIZE, coreset_ratio=1.0, k=1, device="cpu").fit_features(tiny["train_features"])
    pred = ours.predict_features(feats)
    d2, _ = BankIndex(ours.memory_bank).search(rows_of(ours.embed(feats)))
    np.testing.assert_allclose(pred.image_scores, d2.sqrt().view(len(pred.image_scores), -1).amax(1).numpy())


def test_map_is_smooth_and_keeps_a_constant_grid_constant():
    maps = anomaly_maps(torch.full((2, 8, 8), 3.0), 64)
    np.testing.assert_allclose(maps.numpy(), 3.0, rtol=1e-5)


def test_evaluate_cli_prints_one_json_line_and_appends_csv_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(features, "CACHE", tmp_path / "cache")  # keep the repository's feature cache clean
    root = write_tiny_mvtec(tmp_path / "data", categories=("alpha",))
    out = tmp_path / "results.csv"
    argv = ["--root", str(root), "--category", "alpha", "--method", "patchcore", "--image-size", "64",
            "--coreset-ratio", "0.5", "--k", "3", "--n-features", "7", "--out", str(out)]
    assert evaluate.main(argv) == 0
    captured = capsys.readouterr()
    row = json.loads(captured.out.strip().splitlines()[-1])
    assert "--n-features does not apply to patchcore" in captured.err
    assert row["method"] == "patchcore" and row["k"] == 3 and row["coreset_ratio"] == 0.5
    assert row["stages"] == "+".join(STAGES) and 0 <= row["image_auroc"] <= 1 and row["pixel_aupro"] is not None
    evaluate.main(argv)
    table = pd.read_csv(out)
    assert len(table) == 2 and set(table.columns) == set(row) - {"timing"} | set(row["timing"])

    out.write_text("other,columns\n1,2\n")
    with pytest.raises(SystemExit):
        evaluate.main(argv)
    assert "has columns" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--root", str(root), "--category", "gamma", "--method", "patchcore"])
    assert "'gamma' is not in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--root", str(tmp_path / "nowhere"), "--category", "alpha", "--method", "patchcore"])
    assert "does not exist" in capsys.readouterr().err


def test_evaluate_split_skips_pixel_metrics_without_ground_truth(tmp_path):
    root = write_tiny_mvtec(tmp_path / "data", categories=("alpha",), with_ground_truth=False)
    manifest = splits.make_splits(root, ["alpha"], 0)
    detector = PatchCore(image_size=SIZE, coreset_ratio=0.5, device="cpu", cache_dir=tmp_path / "cache")
    result, pred, rows = evaluate.evaluate_split(detector, manifest, root, "alpha", SIZE)
    assert result["pixel_auroc"] is None and result["pixel_aupro"] is None
    assert len(rows) == len(pred.image_scores) and set(rows["split"]) == {"test"}
    assert result["fit_s"] > 0 and result["predict_s"] > 0


def test_bench_runs_both_implementations_on_the_same_images(tmp_path):
    root = write_tiny_mvtec(tmp_path / "data", categories=("alpha",))
    result = bench.bench_patchcore(root, "alpha", n_train=6, image_size=SIZE, coreset_ratio=0.5, log=lambda *_: None)
    assert result["n_train"] == 6 and result["n_test"] > 0
    for key in ("ours_image_auroc", "peer_image_auroc", "ours_pixel_auroc", "peer_pixel_auroc"):
        assert 0 <= result[key] <= 1, key
    assert result["coreset_speedup"] == result["peer_coreset_s"] / result["ours_coreset_s"]
    assert result["infer_over_backbone"] == result["ours_infer_s"] / result["backbone_s"]


def test_bench_without_peer_at_study_defaults_times_ours_against_the_backbone(tmp_path, capsys):
    root = write_tiny_mvtec(tmp_path / "data", categories=("alpha",))
    argv = ["patchcore", "--root", str(root), "--category", "alpha", "--n-train", "6", "--no-peer",
            "--study-defaults", "--image-size", "64", "--repeat", "2"]  # an explicit flag wins over the profile
    assert bench.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    profile = bench.study_defaults()
    assert result["image_size"] == 64 and result["coreset_ratio"] == profile["coreset_ratio"] != 0.1
    assert result["peer_infer_s"] is None and result["peer_coreset_s"] is None and result["coreset_speedup"] is None
    assert len(result["ours_times_s"]) == len(result["backbone_times_s"]) == 2
    assert result["ours_infer_s"] == min(result["ours_times_s"]) and result["ours_phases_s"]["search"] > 0
    ratios = sorted(o / b for o, b in zip(result["ours_times_s"], result["backbone_times_s"]))
    assert result["infer_over_backbone_paired"] == pytest.approx((ratios[0] + ratios[1]) / 2)
    assert set(result["ours_phases_s"]) == {"embed", "search", "image_scores", "anomaly_maps"}
    with pytest.raises(SystemExit):
        bench.main(argv + ["--repeat", "0"])
