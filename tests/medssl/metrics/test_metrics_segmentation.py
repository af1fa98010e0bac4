"""Segmentation metrics: hand-computed cases, empty-mask rules, and MONAI as the reference."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
)
from monai.metrics.utils import get_edge_surface_distance
from scipy import ndimage
from scipy.spatial.distance import cdist

from medssl.metrics.segmentation import (
    ClassMetrics,
    asd,
    dice,
    hd95,
    jaccard,
    segmentation_metrics,
    summarize_cases,
)

# MONAI's own get_mask_edges call passes an argument it has deprecated; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")

SPACING = (2.5, 0.8, 0.7)
VOXEL_DIAGONAL = math.sqrt(sum(s * s for s in SPACING))


def blob(shape, seed: int, threshold: float = 0.6) -> np.ndarray:
    """A few smooth random blobs, shape ``(Z, Y, X)``."""
    noise = np.random.default_rng(seed).random(shape)
    smooth = ndimage.gaussian_filter(noise, sigma=(1.0, 3.0, 3.0))
    return smooth > np.quantile(smooth, threshold)


def perturbed(mask: np.ndarray, seed: int) -> np.ndarray:
    """The mask, dilated or eroded per region and shifted a voxel: a plausible prediction."""
    rng = np.random.default_rng(seed)
    out = ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 3)))
    out &= ~blob(mask.shape, seed + 1000, threshold=0.8)
    return np.roll(out, int(rng.integers(-2, 3)), axis=2)


def monai_input(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(mask[None, None].astype(np.float32))


def brute_force_distances(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple:
    """Directed surface distances from all surface-voxel pairs (no distance transform)."""
    structure = ndimage.generate_binary_structure(3, 1)
    surfaces = [m ^ ndimage.binary_erosion(m, structure) for m in (pred, ref)]
    points = [np.argwhere(s) * np.asarray(spacing) for s in surfaces]
    pairwise = cdist(points[0], points[1])
    return pairwise.min(axis=1), pairwise.min(axis=0)


# -- hand-computed ----------------------------------------------------------------


def test_cubes_offset_along_x_give_known_dice_jaccard_and_hausdorff():
    n, k = 6, 2
    ref = np.zeros((12, 14, 16), dtype=bool)
    pred = np.zeros_like(ref)
    ref[3 : 3 + n, 4 : 4 + n, 5 : 5 + n] = True
    pred[3 : 3 + n, 4 : 4 + n, 5 + k : 5 + k + n] = True

    assert dice(pred, ref) == pytest.approx((n - k) / n)
    assert jaccard(pred, ref) == pytest.approx((n - k) / (n + k))
    d_pr, d_rp = brute_force_distances(pred, ref, SPACING)
    # The far x-faces are k voxels apart along x, and nothing is farther.
    assert max(d_pr.max(), d_rp.max()) == pytest.approx(k * SPACING[2])
    assert hd95(pred, ref, SPACING) == pytest.approx(np.percentile(np.hstack((d_pr, d_rp)), 95))
    assert asd(pred, ref, SPACING) == pytest.approx(d_pr.mean())


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_parallel_plates_are_the_offset_times_that_axis_spacing_apart(axis):
    k = 3
    ref = np.zeros((10, 10, 10), dtype=bool)
    pred = np.zeros_like(ref)
    plate = [slice(2, 8)] * 3
    plate[axis] = slice(2, 3)
    ref[tuple(plate)] = True
    plate[axis] = slice(2 + k, 3 + k)
    pred[tuple(plate)] = True

    assert dice(pred, ref) == 0.0
    assert hd95(pred, ref, SPACING) == pytest.approx(k * SPACING[axis])
    assert asd(pred, ref, SPACING) == pytest.approx(k * SPACING[axis])


def test_asd_is_one_directional_pred_to_ref_as_medpy_asd():
    ref = np.zeros((9, 9, 20), dtype=bool)
    ref[4, 4, 2] = True
    pred = ref.copy()
    pred[4, 4, 12] = True  # a far false positive: counts pred -> ref only
    # pred surface: two voxels at 0 and 10 voxels from ref; ref's one voxel is at 0 from pred.
    assert asd(pred, ref, (1.0, 1.0, 1.0)) == pytest.approx(5.0)
    assert asd(ref, pred, (1.0, 1.0, 1.0)) == pytest.approx(0.0)


def test_mask_touching_the_array_border_has_its_border_voxels_on_the_surface():
    ref = np.zeros((6, 8, 8), dtype=bool)
    ref[:, :, :4] = True  # touches five faces of the array
    pred = np.zeros_like(ref)
    pred[:, :, :5] = True
    d_pr, d_rp = brute_force_distances(pred, ref, SPACING)
    assert hd95(pred, ref, SPACING) == pytest.approx(np.percentile(np.hstack((d_pr, d_rp)), 95))
    assert asd(pred, ref, SPACING) == pytest.approx(d_pr.mean())


# -- empty masks ------------------------------------------------------------------


def test_both_empty_is_a_perfect_score():
    empty = np.zeros((4, 5, 6), dtype=np.uint8)
    metrics = segmentation_metrics(empty, empty, [1], SPACING)[1]
    assert metrics == ClassMetrics(1.0, 1.0, 0.0, 0.0, 0, 0)


def test_prediction_without_reference_is_dice_zero_and_undefined_distances():
    ref = np.zeros((4, 5, 6), dtype=np.uint8)
    pred = ref.copy()
    pred[1, 2, 3] = 1
    metrics = segmentation_metrics(pred, ref, [1], SPACING)[1]
    assert (metrics.dice, metrics.jaccard) == (0.0, 0.0)
    assert math.isnan(metrics.hd95_mm) and math.isnan(metrics.asd_mm)
    assert (metrics.pred_voxels, metrics.ref_voxels) == (1, 0)


def test_reference_without_prediction_is_dice_zero_and_undefined_distances():
    pred = np.zeros((4, 5, 6), dtype=bool)
    ref = pred.copy()
    ref[1, 2, 3] = True
    assert dice(pred, ref) == 0.0 and jaccard(pred, ref) == 0.0
    assert math.isnan(hd95(pred, ref, SPACING)) and math.isnan(asd(pred, ref, SPACING))


# -- MONAI as the reference ---------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_binary_metrics_match_monai_on_random_blobs_with_anisotropic_spacing(seed):
    ref = blob((20, 48, 40), seed)
    pred = perturbed(ref, seed)
    y_pred, y = monai_input(pred), monai_input(ref)

    assert dice(pred, ref) == pytest.approx(float(compute_dice(y_pred, y)), abs=1e-6)
    assert jaccard(pred, ref) == pytest.approx(float(compute_iou(y_pred, y)), abs=1e-6)
    monai_asd = compute_average_surface_distance(y_pred, y, symmetric=False, spacing=SPACING)
    assert asd(pred, ref, SPACING) == pytest.approx(float(monai_asd), rel=1e-5)
    monai_hd95 = compute_hausdorff_distance(y_pred, y, percentile=95, spacing=SPACING)
    assert abs(hd95(pred, ref, SPACING) - float(monai_hd95)) <= VOXEL_DIAGONAL


@pytest.mark.parametrize("seed", [4, 5])
def test_surfaces_and_distances_are_monais_exactly(seed):
    """Same edges and distances as MONAI; only MONAI's HD95 reduction differs (max of the
    two directed 95th percentiles instead of the percentile of their union)."""
    ref = blob((20, 48, 40), seed)
    pred = perturbed(ref, seed)
    _, (d_pr, d_rp), _ = get_edge_surface_distance(
        torch.from_numpy(pred), torch.from_numpy(ref), spacing=SPACING, symmetric=True
    )
    union = np.hstack((d_pr.numpy(), d_rp.numpy()))
    assert hd95(pred, ref, SPACING) == pytest.approx(np.percentile(union, 95), rel=1e-5)
    assert asd(pred, ref, SPACING) == pytest.approx(float(d_pr.numpy().mean()), rel=1e-5)


def test_label_map_metrics_match_monai_per_class():
    first = blob((20, 48, 40), 7)
    second = blob((20, 48, 40), 8) & ~first
    ref = first.astype(np.uint8) + 2 * second.astype(np.uint8)
    pred = np.where(perturbed(first, 9), 1, 0).astype(np.uint8)
    pred[perturbed(second, 10) & (pred == 0)] = 2

    ours = segmentation_metrics(pred, ref, [1, 2], SPACING)
    for label in (1, 2):
        y_pred, y = monai_input(pred == label), monai_input(ref == label)
        assert ours[label].dice == pytest.approx(float(compute_dice(y_pred, y)), abs=1e-6)
        assert ours[label].jaccard == pytest.approx(float(compute_iou(y_pred, y)), abs=1e-6)
        monai_asd = compute_average_surface_distance(y_pred, y, spacing=SPACING)
        assert ours[label].asd_mm == pytest.approx(float(monai_asd), rel=1e-5)
        monai_hd95 = compute_hausdorff_distance(y_pred, y, percentile=95, spacing=SPACING)
        assert abs(ours[label].hd95_mm - float(monai_hd95)) <= VOXEL_DIAGONAL
        assert ours[label].pred_voxels == int((pred == label).sum())
        assert ours[label].ref_voxels == int((ref == label).sum())


def test_small_organ_in_a_full_ct_volume_is_fast():
    ref = np.zeros((300, 512, 512), dtype=np.uint8)
    ref[140:160, 240:280, 250:290] = blob((20, 40, 40), 11)
    pred = np.roll(ref, 1, axis=2)
    start = time.perf_counter()
    metrics = segmentation_metrics(pred, ref, [1], SPACING)
    assert time.perf_counter() - start < 3.0
    assert 0.0 < metrics[1].dice < 1.0


# -- validation -------------------------------------------------------------------


def test_different_shapes_are_rejected_naming_both():
    with pytest.raises(ValueError, match=r"\(4, 5, 6\) vs \(4, 5, 7\)"):
        segmentation_metrics(
            np.zeros((4, 5, 6), np.uint8), np.zeros((4, 5, 7), np.uint8), [1], SPACING
        )


def test_two_dimensional_masks_are_rejected():
    with pytest.raises(ValueError, match="3D"):
        dice(np.zeros((4, 5), bool), np.zeros((4, 5), bool))


def test_float_label_maps_are_rejected():
    with pytest.raises(ValueError, match="float32"):
        segmentation_metrics(
            np.zeros((4, 5, 6), np.float32), np.zeros((4, 5, 6), np.uint8), [1], SPACING
        )


@pytest.mark.parametrize(
    "spacing", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -2.0, 1.0), (1, 1, math.nan)]
)
def test_bad_spacing_is_rejected_naming_it(spacing):
    mask = np.zeros((4, 5, 6), bool)
    with pytest.raises(ValueError, match="spacing must be three positive numbers"):
        hd95(mask, mask, spacing)


@pytest.mark.parametrize("labels", [[], [1, 1]])
def test_labels_must_be_distinct_and_not_empty(labels):
    labelmap = np.zeros((4, 5, 6), np.uint8)
    with pytest.raises(ValueError, match="labels must be distinct"):
        segmentation_metrics(labelmap, labelmap, labels, SPACING)


# -- report -----------------------------------------------------------------------


def test_summary_leaves_undefined_values_out_of_means_and_counts_them():
    cases = [
        {
            1: ClassMetrics(0.8, 0.6, 2.0, 1.0, 10, 12),
            2: ClassMetrics(0.0, 0.0, math.nan, math.nan, 5, 0),
        },
        {1: ClassMetrics(0.6, 0.4, 4.0, 3.0, 9, 11), 2: ClassMetrics(1.0, 1.0, 0.0, 0.0, 0, 0)},
        {
            1: ClassMetrics(0.0, 0.0, math.nan, math.nan, 0, 7),
            2: ClassMetrics(1.0, 1.0, 0.0, 0.0, 0, 0),
        },
    ]
    report = summarize_cases(cases)
    json.dumps(report, allow_nan=False)  # JSON-able, no NaN

    assert report["n_cases"] == 3
    one, two = report["classes"]["1"], report["classes"]["2"]
    assert one["dice"] == {"mean": pytest.approx(1.4 / 3), "n_cases": 3}
    assert one["hd95_mm"] == {"mean": pytest.approx(3.0), "n_cases": 2}
    assert (one["false_negative_cases"], one["false_positive_cases"]) == (1, 0)
    assert two["asd_mm"] == {"mean": 0.0, "n_cases": 2}
    assert (two["false_positive_cases"], two["both_empty_cases"]) == (1, 2)
    assert report["mean"]["dice"] == {"mean": pytest.approx((1.4 / 3 + 2 / 3) / 2), "n_classes": 2}
    assert report["mean"]["asd_mm"] == {"mean": pytest.approx(1.0), "n_classes": 2}


def test_summary_of_a_class_never_defined_reports_null():
    cases = [{3: ClassMetrics(0.0, 0.0, math.nan, math.nan, 4, 0)}]
    report = summarize_cases(cases)
    assert report["classes"]["3"]["hd95_mm"] == {"mean": None, "n_cases": 0}
    assert report["mean"]["hd95_mm"] == {"mean": None, "n_classes": 0}


def test_summary_rejects_cases_with_different_labels():
    with pytest.raises(ValueError, match="case 1 has labels"):
        summarize_cases([{1: ClassMetrics(1, 1, 0, 0, 1, 1)}, {2: ClassMetrics(1, 1, 0, 0, 1, 1)}])


def test_class_metrics_to_json_writes_nan_as_null():
    row = ClassMetrics(0.0, 0.0, math.nan, math.nan, 3, 0).to_json()
    assert row == {
        "dice": 0.0,
        "jaccard": 0.0,
        "hd95_mm": None,
        "asd_mm": None,
        "pred_voxels": 3,
        "ref_voxels": 0,
    }
