import numpy as np
import pandas as pd
import pytest

from helpers import metrics, stats


def score_table(labels, scores_by_seed, draw=0, category="a", images=None):
    images = images if images is not None else [f"img{i:03d}" for i in range(len(labels))]
    rows = [{"draw": draw, "category": category, "seed": seed, "image": img, "label": int(lab), "score": float(sc)}
            for seed, scores in scores_by_seed.items() for img, lab, sc in zip(images, labels, scores)]
    return pd.DataFrame(rows)


def test_row_auroc_equals_the_metric_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (20, 30)).astype(bool)
    labels[:, 0], labels[:, 1] = True, False
    scores = rng.integers(0, 5, (20, 30)).astype(float)  # many ties
    got = stats.auroc_rows(labels, scores)
    want = [metrics.image_auroc(lab, sc) for lab, sc in zip(labels, scores)]
    assert np.allclose(got, want)
    assert np.isnan(stats.auroc_rows(np.ones((1, 4), bool), np.arange(4.0)[None]))[0]


def test_identical_arms_differ_by_exactly_zero():
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(15), np.zeros(10)]
    table = score_table(labels, {s: rng.normal(labels, 1.0) for s in range(3)})
    interval = stats.bootstrap_auroc(table, table.copy(), n_resamples=200)
    assert interval.estimate == interval.lo == interval.hi == 0 and not interval.excludes_zero
    assert (interval.n_units, interval.n_replicates, interval.n_images) == (1, 3, 25)


def test_point_estimate_is_the_mean_over_units_and_seeds():
    rng = np.random.default_rng(2)
    tables, aucs = [], []
    for draw in range(2):
        labels = np.r_[np.ones(12), np.zeros(8)]
        by_seed = {s: rng.normal(labels * (1 + draw), 1.0) for s in range(2)}
        tables.append(score_table(labels, by_seed, draw=draw))
        aucs += [metrics.image_auroc(labels, sc) for sc in by_seed.values()]
    interval = stats.bootstrap_auroc(pd.concat(tables), n_resamples=300)
    assert interval.estimate == pytest.approx(np.mean(aucs))
    assert interval.lo <= interval.estimate <= interval.hi


def test_paired_interval_covers_the_true_difference_about_as_often_as_it_says():
    """Simulated: arm b is arm a with a fixed fraction of anomalous scores pulled down; the true AUROC difference
    is estimated from a very large sample. A 90 % interval should cover it in roughly 90 % of repeats."""
    def sample(rng, n_pos, n_neg):
        labels = np.r_[np.ones(n_pos), np.zeros(n_neg)]
        base = rng.normal(labels * 1.5, 1.0)
        shifted = base - labels * rng.uniform(0, 1.5, labels.size)  # same images, anomalies harder to see
        return labels, base, shifted

    rng = np.random.default_rng(3)
    big_labels, big_a, big_b = sample(rng, 20000, 20000)
    truth = metrics.image_auroc(big_labels, big_a) - metrics.image_auroc(big_labels, big_b)
    covered, repeats = 0, 120
    for r in range(repeats):
        labels, a, b = sample(rng, 30, 20)
        interval = stats.bootstrap_auroc(score_table(labels, {0: a}), score_table(labels, {0: b}), n_resamples=400,
                                         level=0.9, seed=r)
        covered += interval.lo <= truth <= interval.hi
    assert 0.80 <= covered / repeats <= 0.98, covered / repeats


def test_paired_table_and_mismatched_images_are_refused():
    rng = np.random.default_rng(4)
    labels = np.r_[np.ones(10), np.zeros(10)]
    clean = score_table(labels, {0: rng.normal(labels * 3, 1)}).assign(transform="none")
    shifted = score_table(labels, {0: rng.normal(labels * 0.5, 1)}).assign(transform="blur")
    table = stats.paired_table(pd.concat([clean, shifted]), by=["category"], arm="transform", reference="none",
                               n_resamples=300)
    row = table.iloc[0]
    assert row["transform"] == "blur" and row.estimate > 0 and row.lo > 0, "a clear drop excludes 0"
    other = score_table(labels, {0: rng.normal(labels, 1)}, images=[f"x{i}" for i in range(20)])
    with pytest.raises(ValueError, match="different images"):
        stats.bootstrap_auroc(clean, other)


def test_clopper_pearson_exact_values():
    lo, hi = stats.clopper_pearson(0, 20)
    assert lo == 0 and hi == pytest.approx(0.1684, abs=1e-4)
    lo, hi = stats.clopper_pearson(1, 20)
    assert lo == pytest.approx(0.00127, abs=1e-5) and hi == pytest.approx(0.2487, abs=1e-4)
    with pytest.raises(ValueError):
        stats.clopper_pearson(3, 2)


def test_a_contrast_of_four_arms_is_the_difference_of_two_drops():
    rng = np.random.default_rng(5)
    labels = np.r_[np.ones(15), np.zeros(15)]
    arms = [score_table(labels, {0: rng.normal(labels * k, 1)}) for k in (3.0, 1.0, 2.5, 2.0)]
    contrast = stats.bootstrap_contrast(arms, [1, -1, -1, 1], n_resamples=300)
    aucs = [metrics.image_auroc(labels, arm["score"]) for arm in arms]
    assert contrast.estimate == pytest.approx((aucs[0] - aucs[1]) - (aucs[2] - aucs[3]))
    assert contrast.lo <= contrast.estimate <= contrast.hi
    drop = stats.bootstrap_auroc(arms[0], arms[1], n_resamples=300)
    assert drop.estimate == pytest.approx(aucs[0] - aucs[1])
