import numpy as np
import pandas as pd
import pytest

from helpers import metrics, summaries


def scores_for(method="patchcore", condition=("none", "none", 0), separation=3.0, draws=(0, 1), seeds=(0, 1),
               categories=("a", "b"), n=(12, 8), seed=0, param=None, split="test"):
    """Per-image scores of one condition: anomalies (two defect types) shifted up by ``separation``."""
    rng = np.random.default_rng([seed, int(separation * 10), hash(condition) % 1000])
    rows = []
    for draw in draws:
        for category in categories:
            labels = np.r_[np.ones(n[0]), np.zeros(n[1])]
            defects = ["crack" if i % 2 else "hole" for i in range(n[0])] + ["good"] * n[1]
            for s in seeds:
                score = rng.normal(labels * separation, 1.0)
                for i in range(len(labels)):
                    rows.append({"method": method, "draw": draw, "category": category, "seed": s,
                                 "image": f"{category}/test/{defects[i]}/{i:03d}.png", "label": int(labels[i]),
                                 "defect_type": defects[i], "score": score[i], "mode": condition[0],
                                 "transform": condition[1], "severity": condition[2], "split": split,
                                 **({"param": param[0], "value": param[1]} if param else {})})
    return pd.DataFrame(rows)


def test_drop_summary_pools_draws_categories_and_seeds_with_an_interval():
    clean = scores_for(separation=3.0)
    shifted = scores_for(condition=("domain", "blur", 5), separation=0.5)
    drops = summaries.drop_summary(pd.concat([clean, shifted]), n_resamples=200)
    row = drops.iloc[0]
    assert (row["mode"], row["transform"], row["severity"]) == ("domain", "blur", 5)
    assert row.drop_lo > 0 and row["drop"] == pytest.approx(row.auroc_clean - row.auroc_shifted)
    assert (row.n_units, row.n_seeds, row.n_images) == (4, 2, 80)
    by_category = summaries.drop_summary(pd.concat([clean, shifted]), by=["method", "category"], n_resamples=200)
    assert set(by_category["category"]) == {"a", "b"} and (by_category["n_units"] == 2).all()


def test_per_defect_type_is_each_defect_against_the_normals():
    table = summaries.per_defect_type(scores_for())
    assert set(table["defect_type"]) == {"crack", "hole"} and (table["n_runs"] == 4).all()
    one = scores_for(draws=(0,), seeds=(0,), categories=("a",))
    normal = one[one.label == 0].score.to_numpy()
    crack = one[one.defect_type == "crack"].score.to_numpy()
    want = metrics.image_auroc(np.r_[np.zeros(len(normal)), np.ones(len(crack))], np.r_[normal, crack])
    got = summaries.per_defect_type(one).set_index("defect_type").loc["crack", "image_auroc"]
    assert got == pytest.approx(want)


def test_control_summary_splits_the_old_drop_into_frame_and_pose():
    drops = pd.DataFrame([
        {"method": "m", "mode": "domain", "severity": 3, "transform": t, "drop": d, "drop_lo": d - 0.1,
         "drop_hi": d + 0.1} for t, d in (("rotation_fill", 0.4), ("border_fill", 0.3), ("rotation", 0.02))])
    row = summaries.control_summary(drops).iloc[0]
    assert row.frame_share_of_old_drop == pytest.approx(0.75) and row.pose_only_drop == 0.02


def test_paired_difference_calls_a_difference_only_when_its_interval_excludes_zero():
    a = scores_for(method="patchcore", separation=3.0)
    b = scores_for(method="padim", separation=0.3, seed=1)
    same = scores_for(method="padim", separation=3.0, seed=0)
    clear = summaries.paired_difference(pd.concat([a, b]), "method", "patchcore", "padim", n_resamples=200)
    assert clear.iloc[0].excludes_zero and clear.iloc[0].difference > 0
    none = summaries.paired_difference(pd.concat([a, same]), "method", "patchcore", "padim", n_resamples=200)
    assert none.iloc[0].difference == pytest.approx(0) and not none.iloc[0].excludes_zero


def test_sweep_summary_gives_clean_differences_and_differences_of_drops():
    parts = []
    for param, sep_clean, sep_shift in ((("default", "default"), 3.0, 1.0), (("k", "1"), 3.0, 2.5)):
        for split in ("val", "test"):
            parts.append(scores_for(param=param, separation=sep_clean, split=split, seeds=(0,)))
            parts.append(scores_for(param=param, condition=("domain", "spotlight", 5), separation=sep_shift,
                                    split=split, seeds=(0,)))
    summary = summaries.sweep_summary(pd.concat(parts), n_resamples=200)
    row = summary.iloc[0]
    assert (row.param, row.value) == ("k", "1")
    assert row.drop_difference_spotlight5 < 0 and row.drop_difference_spotlight5_hi < 0, "k=1 drops less"
    assert "chosen_on_val" in summary and "val_auroc_clean" in summary
