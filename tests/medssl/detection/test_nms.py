"""Greedy 3D NMS of cubes (medssl.detection.nms)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from medssl.detection import cube_iou, nms_3d


def cube(z: float, y: float, x: float, d: float) -> list[float]:
    return [z, y, x, d]


def test_overlapping_cube_above_threshold_is_suppressed_below_is_kept():
    # Two edge-10 cubes shifted by s along x: IoU = (10 - s) / (10 + s).
    boxes = np.array([cube(0, 0, 0, 10), cube(0, 0, 4, 10), cube(0, 0, 7, 10)])
    scores = np.array([0.9, 0.8, 0.7])
    iou = cube_iou(boxes[:1, :3], boxes[:1, 3], boxes[1:, :3], boxes[1:, 3])[0]
    assert iou == pytest.approx([6 / 14, 3 / 17])
    assert nms_3d(boxes, scores, iou_threshold=0.3).tolist() == [0, 2]
    assert nms_3d(boxes, scores, iou_threshold=0.1).tolist() == [0]
    # Boxes 1 and 2 overlap by 7 / 13: at 0.5 box 1 (kept) suppresses box 2.
    assert nms_3d(boxes, scores, iou_threshold=0.5).tolist() == [0, 1]
    assert nms_3d(boxes, scores, iou_threshold=0.6).tolist() == [0, 1, 2]


def test_suppression_is_greedy_from_kept_boxes_only():
    # B overlaps A and C; A suppresses B, so C (disjoint from A) survives.
    boxes = np.array([cube(0, 0, 0, 10), cube(0, 0, 6, 10), cube(0, 0, 12, 10)])
    scores = np.array([0.9, 0.95, 0.8])
    assert nms_3d(boxes, scores, 0.1).tolist() == [1]
    scores = np.array([0.95, 0.9, 0.8])
    assert nms_3d(boxes, scores, 0.1).tolist() == [0, 2]


def test_disjoint_cubes_are_all_kept_in_descending_score_order():
    boxes = np.array([cube(0, 0, 0, 4), cube(20, 0, 0, 4), cube(0, 20, 0, 4), cube(0, 0, 20, 6)])
    scores = np.array([0.2, 0.9, 0.5, 0.7])
    assert nms_3d(boxes, scores, 0.0).tolist() == [1, 3, 2, 0]


def test_equal_scores_keep_the_lower_index_first():
    boxes = np.array([cube(0, 0, 0, 4), cube(0, 0, 1, 4), cube(30, 0, 0, 4)])
    scores = np.array([0.5, 0.5, 0.5])
    assert nms_3d(boxes, scores, 0.1).tolist() == [0, 2]


def test_max_keep_stops_after_that_many_boxes():
    boxes = np.array([cube(10 * i, 0, 0, 4) for i in range(6)])
    scores = np.linspace(0.1, 0.6, 6)
    assert nms_3d(boxes, scores, 0.1, max_keep=3).tolist() == [5, 4, 3]
    assert nms_3d(boxes, scores, 0.1, max_keep=0).tolist() == []


def test_empty_input_gives_empty_int_indices():
    keep = nms_3d(np.zeros((0, 4)), np.zeros(0), 0.1)
    assert keep.shape == (0,) and keep.dtype == np.int64


def test_identical_boxes_collapse_to_the_best():
    boxes = np.array([cube(5, 5, 5, 8)] * 4)
    assert nms_3d(boxes, np.array([0.1, 0.4, 0.3, 0.2]), 0.5).tolist() == [1]


@pytest.mark.parametrize(
    ("boxes", "scores", "threshold", "max_keep", "match"),
    [
        (np.zeros((3, 3)), np.zeros(3), 0.1, None, "boxes must have shape"),
        (np.zeros((3, 4)), np.zeros(2), 0.1, None, "scores must have shape"),
        (np.zeros((1, 4)), np.array([np.nan]), 0.1, None, "finite"),
        (np.zeros((1, 4)), np.zeros(1), 1.5, None, "iou_threshold"),
        (np.zeros((1, 4)), np.zeros(1), 0.1, -1, "max_keep"),
    ],
)
def test_bad_arguments_are_rejected_with_the_reason(boxes, scores, threshold, max_keep, match):
    with pytest.raises(ValueError, match=match):
        nms_3d(boxes, scores, threshold, max_keep)


def _reference_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Textbook O(N^2) greedy NMS over a full IoU matrix."""
    iou = cube_iou(boxes[:, :3], boxes[:, 3], boxes[:, :3], boxes[:, 3])
    order = np.argsort(-scores, kind="stable")
    removed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for i in order:
        if not removed[i]:
            keep.append(int(i))
            removed |= iou[i] > threshold
    return keep


def test_matches_a_textbook_nms_on_random_boxes_and_is_fast():
    rng = np.random.default_rng(0)
    n = 3000
    boxes = np.concatenate([rng.uniform(0, 200, (n, 3)), rng.uniform(3, 30, (n, 1))], axis=1)
    scores = rng.uniform(size=n)
    tic = time.perf_counter()
    keep = nms_3d(boxes, scores, 0.1)
    elapsed = time.perf_counter() - tic
    assert keep.tolist() == _reference_nms(boxes, scores, 0.1)
    assert elapsed < 5.0
