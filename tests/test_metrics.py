"""mrkd.train.metrics against sklearn, brute force written here, and the official-loop baseline."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score, roc_curve

from mrkd.benchmarks.bench_aupro import synthetic_masks_and_maps
from mrkd.benchmarks.official_reference import official_compute_pro
from mrkd.train import metrics


# ----------------------------------------------------------------------------- brute force references

def brute_force_aupro(masks, maps, max_fpr=0.3, num_th=200):
    """Plain loops: every threshold, every region, pixel sets compared directly."""
    masks = np.asarray(masks).astype(bool)
    low, high = maps.min(), maps.max()
    thresholds = np.arange(low, high, (high - low) / num_th)
    image_of_region = []
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        image_of_region.extend((index, labelled == r) for r in range(1, count + 1))
    fprs, pros = [], []
    for th in thresholds:
        flagged = maps > th
        overlaps = [flagged[index][region].sum() / region.sum() for index, region in image_of_region]
        pros.append(sum(overlaps) / len(overlaps))
        fprs.append((flagged & ~masks).sum() / (~masks).sum())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < max_fpr
    fprs, pros = fprs[keep] / fprs[keep].max(), pros[keep]
    area = 0.0
    for i in range(len(fprs) - 1):  # points come in FPR-descending order
        area += (fprs[i] - fprs[i + 1]) * (pros[i] + pros[i + 1]) / 2
    return area


def random_masks_and_maps(seed, n=3, size=20):
    """Small random masks (several blobs, some touching only diagonally) and correlated maps."""
    rng = np.random.default_rng(seed)
    masks = ndimage.binary_opening(rng.random((n, size, size)) < 0.3, structure=np.ones((1, 2, 1)))
    masks[:, 0, 0] = True  # every image has a defect
    masks[:, size - 1, size - 1] = False
    maps = masks * rng.uniform(0.2, 1.0) + rng.random(masks.shape)
    return masks, maps


# ----------------------------------------------------------------------------- AUROC

@pytest.mark.parametrize("seed", range(3))
def test_image_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + 0.3 * labels, 1)  # rounding makes many ties
    assert metrics.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_pixel_auroc_matches_sklearn_on_raveled_arrays():
    masks, maps = random_masks_and_maps(0, n=4, size=32)
    maps = maps.astype(np.float32)
    maps[:, :4] = 0.5  # a block of tied values across both classes
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(masks.astype(np.uint8), maps) == pytest.approx(expected, abs=1e-12)


def test_rank_auroc_chunks_positives_without_changing_the_result():
    rng = np.random.default_rng(9)
    positive = rng.random(500) < 0.4
    scores = np.round(rng.random(500) + 0.2 * positive, 2)
    expected = roc_auc_score(positive, scores)
    assert metrics._rank_auroc(positive, scores, chunk=7) == pytest.approx(expected, abs=1e-12)


def test_auroc_needs_both_classes_and_finite_scores():
    with pytest.raises(ValueError, match="both classes"):
        metrics.image_auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        metrics.image_auroc([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="0/1"):
        metrics.image_auroc([0, 2, 1], [0.1, 0.2, 0.3])


# ----------------------------------------------------------------------------- AUPRO

@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_brute_force(seed):
    masks, maps = random_masks_and_maps(seed)
    assert ndimage.label(masks[0], structure=np.ones((3, 3)))[1] >= 3  # several regions per image
    assert metrics.aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps), abs=1e-6)


def test_aupro_matches_brute_force_when_map_values_sit_on_thresholds():
    # maps in steps of 0.5 over 0..20 with 20 thresholds 0, 1, ..., 19: "map > 1" flags 1.5 and up,
    # an operating point that ">=" would replace by "1 and up", which no other threshold yields
    masks, maps = random_masks_and_maps(7)
    quantized = np.round(maps / maps.max() * 40) / 2
    assert quantized.min() == 0 and quantized.max() == 20
    expected = brute_force_aupro(masks, quantized, num_th=20)
    assert metrics.aupro(masks, quantized, num_thresholds=20) == pytest.approx(expected, abs=1e-6)


def test_threshold_grid_index_equals_searchsorted_at_and_next_to_every_threshold():
    maps = np.random.default_rng(8).random((2, 16, 16)).astype(np.float32) * 3 - 1
    thresholds = metrics.pro_thresholds(maps, 200)
    values = np.concatenate([maps.ravel(), thresholds, np.nextafter(thresholds, np.inf),
                             np.nextafter(thresholds, -np.inf), [-5.0, 5.0]])
    np.testing.assert_array_equal(metrics._thresholds_below(values, thresholds),
                                  np.searchsorted(thresholds, values, side="left"))


def test_aupro_counts_diagonal_neighbours_as_one_region():
    # 8-connectivity (skimage's 2-D default): a diagonal pair is one region of area 2, not two of 1.
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True
    maps = np.zeros((1, 6, 6))
    maps[0, 1, 1], maps[0, 2, 2], maps[0, 4, 4] = 1.0, 0.1, 0.5
    curve = metrics.pro_curve(masks, maps, num_thresholds=10)
    assert curve["num_regions"] == 1
    assert curve["pro"][5] == pytest.approx(0.5)  # threshold 0.5: only (1, 1) of the pair is above


@pytest.mark.parametrize("seed", range(2))
def test_aupro_matches_official_loop(seed):
    masks, maps = synthetic_masks_and_maps(3, 48, regions_per_image=3, seed=seed)
    assert metrics.aupro(masks, maps) == pytest.approx(official_compute_pro(masks.astype(int), maps), abs=5e-3)


def test_aupro_of_perfect_map_is_one():
    masks, _ = random_masks_and_maps(1)
    assert metrics.aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    # a graded map that still separates defects from background: ordinary (non-degenerate) path
    rng = np.random.default_rng(0)
    graded = np.where(masks, 0.6 + 0.4 * rng.random(masks.shape), 0.5 * rng.random(masks.shape))
    assert metrics.aupro(masks, graded) == pytest.approx(1.0)


def test_aupro_of_constant_map_is_zero():
    masks, _ = random_masks_and_maps(2)
    assert metrics.aupro(masks, np.full(masks.shape, 0.7)) == 0.0


def test_aupro_rejects_masks_without_defect_and_bad_shapes():
    with pytest.raises(ValueError, match="defect region"):
        metrics.aupro(np.zeros((2, 8, 8), bool), np.random.default_rng(0).random((2, 8, 8)))
    with pytest.raises(ValueError, match="differs"):
        metrics.aupro(np.ones((2, 8, 8), bool), np.zeros((2, 8, 9)))
    with pytest.raises(ValueError, match="image 1"):
        masks = np.zeros((2, 4, 4))
        masks[1, 2, 3] = 0.7
        metrics.aupro(masks, np.zeros((2, 4, 4)))


def test_per_image_protocol_matches_loop_over_images():
    masks, maps = random_masks_and_maps(5, n=4)
    masks[2] = False  # a good image: skipped by its label
    labels = np.array([1, 1, 0, 1])
    expected = np.mean([brute_force_aupro(masks[i:i + 1], maps[i:i + 1]) for i in (0, 1, 3)])
    assert metrics.aupro_per_image_mean(masks, maps, labels) == pytest.approx(expected, abs=1e-6)
    assert metrics.aupro_per_image_mean(masks, maps) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="image 2"):
        metrics.aupro_per_image_mean(masks, maps, np.array([1, 1, 1, 1]))


# ----------------------------------------------------------------------------- thresholds, F1, ROC

def brute_force_f1(labels, scores):
    best = (None, -1.0)
    for t in sorted(set(scores.tolist()), reverse=True):
        predicted = scores >= t
        tp = np.sum(predicted & (labels == 1))
        fp = np.sum(predicted & (labels == 0))
        fn = np.sum(~predicted & (labels == 1))
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 > best[1]:
            best = (t, f1)
    return best


@pytest.mark.parametrize("seed", range(3))
def test_f1_optimal_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.random(60) + 0.4 * labels, 2)
    threshold, f1 = metrics.f1_optimal_threshold(labels, scores)
    expected_threshold, expected_f1 = brute_force_f1(labels, scores)
    assert (threshold, f1) == pytest.approx((expected_threshold, expected_f1), abs=1e-12)
    assert metrics.precision_recall_f1(labels, scores, threshold)["f1"] == pytest.approx(f1)


def test_precision_recall_f1_counts():
    result = metrics.precision_recall_f1([0, 0, 1, 1, 1], [0.1, 0.6, 0.6, 0.4, 0.9], 0.5)
    assert (result["tp"], result["fp"], result["fn"], result["tn"]) == (2, 1, 1, 1)
    assert result["precision"] == pytest.approx(2 / 3) and result["recall"] == pytest.approx(2 / 3)


def test_quantile_threshold_is_numpy_quantile():
    good = np.random.default_rng(3).normal(size=137)
    assert metrics.threshold_at_quantile(good, 0.99) == pytest.approx(np.quantile(good, 0.99))
    assert metrics.threshold_at_quantile(good, 1.0) == pytest.approx(good.max())


def test_roc_curve_points_match_sklearn():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 80)
    scores = np.round(rng.random(80) + 0.3 * labels, 1)
    fpr, tpr, thresholds = metrics.roc_curve_points(labels, scores)
    ref_fpr, ref_tpr, ref_thresholds = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    np.testing.assert_allclose(thresholds[1:], ref_thresholds[1:])


def test_evaluate_arrays_combines_everything():
    masks, maps = random_masks_and_maps(6, n=4)
    masks[0] = False
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = maps.max(axis=(1, 2))
    result = metrics.evaluate_arrays(labels, scores, masks, maps, threshold=float(np.median(scores)))
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert result["aupro"] == pytest.approx(brute_force_aupro(masks, maps), abs=1e-6)
    assert result["aupro_paper"] == pytest.approx(
        np.mean([brute_force_aupro(masks[i:i + 1], maps[i:i + 1]) for i in (1, 2, 3)]), abs=1e-6)
    assert {"precision", "recall", "f1"} <= result.keys()
    assert "f1" not in metrics.evaluate_arrays(labels, scores, masks, maps)


def test_evaluate_arrays_with_unmasked_empty_and_full_masks_uses_the_right_images():
    # Images: 0-1 good, 2-3 defects with regions, 4 defect without a mask, 5 empty mask, 6 full mask.
    masks, maps = random_masks_and_maps(7, n=7)
    masks[[0, 1]] = False
    masks[[4, 5]] = False
    masks[6] = True
    labels = np.array([0, 0, 1, 1, 1, 1, 1])
    has_mask = np.array([False, False, True, True, False, True, True])   # good images need no mask file
    scores = maps.max(axis=(1, 2))
    result = metrics.evaluate_arrays(labels, scores, masks, maps, has_mask=has_mask)

    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))        # every image
    pixel = [0, 1, 2, 3, 6]
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks[pixel].ravel(), maps[pixel].ravel()))
    region = [0, 1, 2, 3]
    assert result["aupro"] == pytest.approx(brute_force_aupro(masks[region], maps[region]), abs=1e-6)
    assert result["aupro_paper"] == pytest.approx(
        np.mean([brute_force_aupro(masks[i:i + 1], maps[i:i + 1]) for i in (2, 3)]), abs=1e-6)
    assert (result["n_images"], result["n_good_images"], result["n_defect_with_regions"],
            result["n_defect_without_mask"], result["n_defect_empty_mask"], result["n_defect_full_mask"],
            result["n_defect_with_mask"], result["n_pixel_images"]) == (7, 2, 2, 1, 1, 1, 4, 5)
    assert "over 3 of 5 defect image(s)" in result["pixel_metrics"]
    assert "1 without mask" in result["pixel_metrics"] and "1 with an empty mask" in result["pixel_metrics"]


def test_evaluate_arrays_without_any_mask_reports_pixel_metrics_not_available():
    rng = np.random.default_rng(8)
    labels = np.array([0, 0, 0, 1, 1, 1])
    maps = rng.random((6, 8, 8)) + labels[:, None, None]
    scores = maps.max(axis=(1, 2))
    masks = np.zeros((6, 8, 8), bool)
    for has_mask in (np.zeros(6, bool), None):   # no mask files, or all-empty masks: the same answer
        result = metrics.evaluate_arrays(labels, scores, masks, maps, has_mask=has_mask, threshold=1.0)
        assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
        assert result["pixel_auroc"] is None and result["aupro"] is None and result["aupro_paper"] is None
        assert result["pixel_metrics"].startswith("n/a") and result["f1"] == pytest.approx(
            2 * 3 / (2 * 3 + int(np.sum(scores[:3] >= 1.0))))


def test_metrics_module_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, mrkd.train.metrics; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
