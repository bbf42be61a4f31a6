"""Metrics checked against independent computations: scikit-learn, hand-built cases, a slow AUPRO reference."""
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from helpers import metrics


def tied_image_scores(seed: int, n: int = 60):
    """Binary labels and scores rounded to one decimal, so that many scores tie across both classes."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)
    return labels.astype(int), scores


def blob_masks_and_maps(seed: int, n: int = 4, size: int = 16, levels: int | None = 40):
    """Masks with several irregular regions per image and maps correlated with them; ``levels`` rounds the
    maps to that many values so thresholds tie, ``None`` keeps them continuous."""
    rng = np.random.default_rng(seed)
    masks = ndimage.gaussian_filter(rng.random((n, size, size)), (0, 1.2, 1.2)) > 0.56
    masks[0] = False  # a fully normal image, as in MVTec test sets
    maps = rng.random(masks.shape) + 0.7 * masks
    if levels is not None:
        maps = np.round(maps / maps.max() * (levels - 1)) / (levels - 1)
    return masks, maps


def reference_aupro(masks, maps, fpr_limit):
    """Slow but plain AUPRO: at every unique map value, compute PRO over 8-connected regions of each image
    and FPR over all normal pixels directly, then integrate segment by segment, clipping at fpr_limit."""
    regions = []
    for image_index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(image_index, labelled == k) for k in range(1, count + 1)]
    normal = ~masks
    curve = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fpr = (predicted & normal).sum() / normal.sum()
        pro = np.mean([predicted[i][region].mean() for i, region in regions])
        curve.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(curve[:-1], curve[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


# --- image level against scikit-learn -------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_and_ap_match_sklearn_with_ties(seed):
    labels, scores = tied_image_scores(seed)
    assert len(np.unique(scores)) < len(scores)
    assert metrics.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.image_ap(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_matches_sklearn_curve_and_its_threshold_reaches_it(seed):
    labels, scores = tied_image_scores(seed)
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        expected = np.nanmax(2 * precision * recall / (precision + recall))
    f1, threshold = metrics.f1_max(labels, scores)
    assert f1 == pytest.approx(expected, abs=1e-12)
    assert threshold in scores
    assert metrics.at_threshold(labels, scores, threshold)["f1"] == pytest.approx(f1, abs=1e-12)


def test_image_metrics_return_python_floats():
    labels, scores = tied_image_scores(0)
    for value in (metrics.image_auroc(labels, scores), metrics.image_ap(labels, scores),
                  *metrics.f1_max(labels, scores)):
        assert type(value) is float


# --- pixel AUROC ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_auroc_matches_sklearn_with_ties(dtype):
    masks, maps = blob_masks_and_maps(seed=3, n=6, size=24, levels=20)
    maps = maps.astype(dtype)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


# --- AUPRO: hand-built cases ----------------------------------------------------------------------------

def two_regions():
    """One image: a 2x2 region and a 10x10 region on a 20x20 normal background."""
    masks = np.zeros((1, 20, 20), bool)
    masks[0, 1:3, 1:3] = True
    masks[0, 8:18, 8:18] = True
    return masks


def test_aupro_perfect_map_is_one():
    masks, _ = blob_masks_and_maps(seed=1)
    assert metrics.aupro(masks, masks.astype(float)) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_constant_map_is_the_diagonal(fpr_limit):
    # Every pixel ties, so the curve jumps from (0, 0) to (1, 1); the area is interpolated at fpr_limit.
    masks, _ = blob_masks_and_maps(seed=1)
    assert metrics.aupro(masks, np.full(masks.shape, 0.5), fpr_limit) == pytest.approx(fpr_limit / 2, abs=1e-12)


@pytest.mark.parametrize("perfect_region", ["small", "large"])
def test_aupro_weights_regions_equally_whatever_their_size(perfect_region):
    # One region scored above every normal pixel, the other below: PRO is 0.5 from FPR 0 to FPR 1.
    masks = two_regions()
    maps = np.full(masks.shape, 0.5)
    maps[masks] = 0.0
    if perfect_region == "small":
        maps[0, 1:3, 1:3] = 1.0
    else:
        maps[0, 8:18, 8:18] = 1.0
    assert metrics.aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)
    # Pixel AUROC, by contrast, is the share of anomalous pixels ranked on top.
    small_share = 4 / 104
    expected_auroc = small_share if perfect_region == "small" else 1 - small_share
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(expected_auroc, abs=1e-12)


def test_aupro_is_zero_when_regions_are_found_only_past_the_fpr_limit():
    # Half the normal pixels score above the regions: the PRO step happens at FPR 0.5.
    masks = two_regions()
    maps = np.zeros(masks.shape)
    maps[~masks] = np.linspace(0, 1, (~masks).sum())
    maps[masks] = np.median(maps[~masks]) + 1e-9
    assert metrics.aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.0, abs=1e-12)
    assert metrics.aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


def test_aupro_regions_are_8_connected_within_an_image_and_never_across_images():
    # A single pixel touching a 2x2 block diagonally is one region of 5 pixels (1 on top): PRO 0.2.
    diagonal = np.zeros((1, 6, 6), bool)
    diagonal[0, 0, 0] = True
    diagonal[0, 1:3, 1:3] = True
    maps = np.full(diagonal.shape, 0.5)
    maps[diagonal] = 0.0
    maps[0, 0, 0] = 1.0
    assert metrics.aupro(diagonal, maps) == pytest.approx(0.2, abs=1e-12)
    # Overlapping regions in two images stay two regions (2x2 on top, 4x4 below): PRO 0.5, not 4/20.
    stacked = np.zeros((2, 6, 6), bool)
    stacked[0, :2, :2] = True
    stacked[1, :4, :4] = True
    maps = np.full(stacked.shape, 0.5)
    maps[stacked] = 0.0
    maps[0, :2, :2] = 1.0
    assert metrics.aupro(stacked, maps) == pytest.approx(0.5, abs=1e-12)


# --- AUPRO against the slow reference -------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [7, 40, None])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.02, 1.0])
def test_aupro_matches_slow_reference(seed, levels, fpr_limit):
    masks, maps = blob_masks_and_maps(seed, levels=levels)
    assert masks.any()
    expected = reference_aupro(masks, maps, fpr_limit)
    assert metrics.aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_matches_anomalib_on_continuous_maps():
    torch = pytest.importorskip("torch")
    anomalib_aupro = pytest.importorskip("anomalib.metrics.aupro")
    masks, maps = blob_masks_and_maps(seed=7, n=6, size=32, levels=None)
    theirs = anomalib_aupro._AUPRO(fpr_limit=0.3)
    theirs.update(torch.from_numpy(maps.astype(np.float32)), torch.from_numpy(masks.astype(np.int64)))
    assert metrics.aupro(masks, maps.astype(np.float32)) == pytest.approx(float(theirs.compute()), abs=1e-5)


# --- at a threshold -------------------------------------------------------------------------------------

def test_at_threshold_matches_hand_counted_confusion():
    labels = [1, 1, 1, 0, 0, 0, 0]
    scores = [0.9, 0.6, 0.3, 0.7, 0.2, 0.1, 0.6]
    # Predicted anomalous (score >= 0.6): 0.9, 0.6 (anomalous) and 0.7, 0.6 (normal).
    result = metrics.at_threshold(labels, scores, 0.6)
    assert (result["tp"], result["fp"], result["tn"], result["fn"]) == (2, 2, 2, 1)
    assert result["precision"] == pytest.approx(0.5)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(4 / 7)
    assert result["fpr"] == pytest.approx(0.5)


def test_at_threshold_zero_over_zero_is_zero():
    nothing_predicted = metrics.at_threshold([1, 0, 0], [0.2, 0.1, 0.3], 0.5)
    assert nothing_predicted == dict(precision=0.0, recall=0.0, f1=0.0, fpr=0.0, tp=0, fp=0, tn=2, fn=1)
    nothing_anomalous = metrics.at_threshold([0, 0], [0.2, 0.9], 0.5)
    assert nothing_anomalous["recall"] == nothing_anomalous["precision"] == 0.0
    assert nothing_anomalous["fpr"] == 0.5


def test_pixel_at_threshold_matches_hand_counted_confusion():
    masks = np.array([[[1, 1, 0], [0, 0, 0], [0, 0, 1]]], bool)
    maps = np.array([[[0.9, 0.2, 0.8], [0.1, 0.5, 0.1], [0.0, 0.3, 0.5]]])
    # At 0.5: anomalous pixels 0.9 (tp), 0.2 (fn), 0.5 (tp); normal 0.8, 0.5 (fp) and four tn.
    result = metrics.pixel_at_threshold(masks, maps, 0.5)
    assert result == pytest.approx(dict(precision=0.5, recall=2 / 3, f1=4 / 7, fpr=2 / 6))


# --- evaluate -------------------------------------------------------------------------------------------

def test_evaluate_skips_pixel_metrics_without_masks_or_anomalous_pixels():
    labels, scores = tied_image_scores(0)
    result = metrics.evaluate(labels, scores)
    assert set(result) == {"image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_aupro"}
    assert result["pixel_auroc"] is None and result["pixel_aupro"] is None
    assert result["image_auroc"] == metrics.image_auroc(labels, scores)
    empty = np.zeros((len(labels), 4, 4), bool)
    result = metrics.evaluate(labels, scores, empty, np.zeros(empty.shape))
    assert result["pixel_auroc"] is None and result["pixel_aupro"] is None


def test_evaluate_with_masks_agrees_with_the_single_metrics():
    masks, maps = blob_masks_and_maps(seed=2)
    labels, scores = masks.any(axis=(1, 2)), maps.max(axis=(1, 2))
    result = metrics.evaluate(labels, scores, masks, maps)
    assert result["pixel_auroc"] == metrics.pixel_auroc(masks, maps)
    assert result["pixel_aupro"] == metrics.aupro(masks, maps)
    assert result["image_f1max"] == metrics.f1_max(labels, scores)[0]


# --- errors name the argument ---------------------------------------------------------------------------

@pytest.mark.parametrize("call, argument", [
    (lambda: metrics.image_auroc([0, 1, 1], [0.1, 0.2]), "scores"),
    (lambda: metrics.image_auroc([0, 2, 1], [0.1, 0.2, 0.3]), "labels"),
    (lambda: metrics.image_auroc([1, 1, 1], [0.1, 0.2, 0.3]), "labels"),
    (lambda: metrics.image_ap([0, 0], [0.1, 0.2]), "labels"),
    (lambda: metrics.f1_max([0, 1], [0.1, np.nan]), "scores"),
    (lambda: metrics.at_threshold([0, np.nan], [0.1, 0.2], 0.5), "labels"),
    (lambda: metrics.pixel_auroc(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 3))), "maps"),
    (lambda: metrics.pixel_auroc(np.zeros((2, 2), bool), np.zeros((2, 2))), "masks"),
    (lambda: metrics.pixel_auroc(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 2))), "masks"),
    (lambda: metrics.aupro(np.eye(2, dtype=bool)[None], np.full((1, 2, 2), np.nan)), "maps"),
    (lambda: metrics.aupro(np.eye(2, dtype=bool)[None], np.eye(2)[None], fpr_limit=0), "fpr_limit"),
    (lambda: metrics.evaluate([0, 1], [0.1, 0.2], np.eye(2, dtype=bool)[None], np.eye(2)[None]), "masks"),
    (lambda: metrics.evaluate([0, 1], [0.1, 0.2], np.zeros((2, 2, 2), bool)), "maps"),
])
def test_bad_inputs_raise_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


def test_bootstrap_interval_brackets_the_auroc_and_narrows_with_more_data():
    rng = np.random.default_rng(0)
    small_labels = np.r_[np.zeros(20), np.ones(20)].astype(int)
    small_scores = rng.normal(0, 1, 40) + small_labels
    lo, hi = metrics.bootstrap_auroc(small_labels, small_scores, seed=1)
    assert lo < metrics.image_auroc(small_labels, small_scores) < hi
    big_labels = np.r_[np.zeros(200), np.ones(200)].astype(int)
    big_scores = rng.normal(0, 1, 400) + big_labels
    blo, bhi = metrics.bootstrap_auroc(big_labels, big_scores, seed=1)
    assert (bhi - blo) < (hi - lo)
    assert metrics.bootstrap_auroc(small_labels, small_scores, seed=1) == (lo, hi)
