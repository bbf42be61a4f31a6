"""The command-line evaluation gives correct, comparable results: on MVTec AD and MVTec AD 2 layouts, with and
without masks, on 16-bit images, and with timings kept apart from the metrics."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
from PIL import Image

from helpers import evaluate, features
from tests.conftest import write_tiny_mvtec
from tests.image_files import GREY, write_png
from tests.mvtec_ad2 import write_tiny_mvtec_ad2

FAST = ["--method", "patchcore", "--image-size", "64", "--coreset-ratio", "0.5", "--k", "3"]


def run_cli(capsys, root, category, *extra) -> dict:
    assert evaluate.main(["--root", str(root), "--category", category, *FAST, *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_two_identical_runs_print_identical_json_apart_from_timing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(features, "CACHE", tmp_path / "cache")
    root = write_tiny_mvtec(tmp_path / "data", categories=("alpha",))
    out = tmp_path / "results.csv"
    first, second = (run_cli(capsys, root, "alpha", "--out", str(out)) for _ in range(2))
    assert set(first["timing"]) == {"fit_s", "predict_s"} and first["timing"]["fit_s"] > 0
    assert not set(first) & {"fit_s", "predict_s"}  # timings only inside "timing"
    first.pop("timing"), second.pop("timing")
    assert first == second
    # The CSV stays a flat table: metrics, then the two timing columns, then the settings.
    table = pd.read_csv(out)
    metric_columns = ["image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_aupro", "fit_s", "predict_s"]
    assert list(table.columns) == ["method", "category", *metric_columns, *list(first)[7:]]
    assert len(table) == 2 and table["image_auroc"].tolist() == [first["image_auroc"]] * 2


def test_a_category_without_ground_truth_gives_null_pixel_metrics(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(features, "CACHE", tmp_path / "cache")
    root = write_tiny_mvtec(tmp_path / "data", categories=("gamma",), with_ground_truth=False)
    record = run_cli(capsys, root, "gamma")
    assert record["pixel_auroc"] is None and record["pixel_aupro"] is None
    assert 0.5 < record["image_auroc"] <= 1


def test_mvtec_ad2_layout_is_evaluated_on_test_public(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(features, "CACHE", tmp_path / "cache")
    root = write_tiny_mvtec_ad2(tmp_path / "ad2", objects=("can",))
    record = run_cli(capsys, root, "can")
    assert record["image_auroc"] > 0.9 and record["pixel_auroc"] > 0.9 and record["pixel_aupro"] is not None


def test_16_bit_grey_images_score_like_their_8_bit_twins(tmp_path, capsys, monkeypatch):
    """The issue's case: 16-bit grey training images used to load as white squares and change the AUROC."""
    monkeypatch.setattr(features, "CACHE", tmp_path / "cache")
    results = []
    for depth in (8, 16):
        root = write_tiny_mvtec(tmp_path / f"data{depth}", categories=("alpha",))
        for image in sorted((root / "alpha").glob("t*/*/*.png")):
            grey = np.asarray(Image.open(image).convert("L"))
            if depth == 8:
                Image.fromarray(grey).save(image)
            else:  # v * 257 keeps v as its high byte, so the loaded images equal the 8-bit twins
                write_png(image, grey.astype(np.uint16) * 257, 16, GREY)
        results.append(run_cli(capsys, root, "alpha"))
        results[-1].pop("timing")
    assert results[0] == results[1]
    assert results[0]["image_auroc"] > 0.9
