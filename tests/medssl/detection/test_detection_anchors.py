"""Anchors, cube IoU, assignment and the 48-element cube group (torch-free core)."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.detection import (
    CUBE_GROUP,
    AnchorGrid,
    AnchorSpec,
    assign_anchors,
    cube_iou,
    encode_boxes,
)
from medssl.detection.anchors import IGNORE, NEGATIVE, POSITIVE


def test_grid_has_one_anchor_per_output_cell_at_the_cell_centre():
    grid = AnchorGrid.build(AnchorSpec(), (32, 32, 64))
    assert grid.level_shapes == ((16, 16, 32), (8, 8, 16), (4, 4, 8), (2, 2, 4))
    assert grid.n_anchors == sum(int(np.prod(s)) for s in grid.level_shapes)
    level = grid.level_slices[1]  # stride 4: cell (i, j, k) centred at 4i + 1.5
    np.testing.assert_array_equal(grid.centres[level][0], [1.5, 1.5, 1.5])
    np.testing.assert_array_equal(grid.centres[level][1], [1.5, 1.5, 5.5])  # x varies fastest
    assert set(grid.sizes[level]) == {8.0}


def test_patch_not_divisible_by_the_largest_stride_is_refused():
    with pytest.raises(ValueError, match="divisible by the largest stride 16"):
        AnchorGrid.build(AnchorSpec(), (40, 48, 48))


@pytest.mark.parametrize("g", CUBE_GROUP, ids=lambda g: f"{g.perm}{g.flips}")
def test_every_symmetry_maps_the_anchor_set_onto_itself(g):
    grid = AnchorGrid.build(AnchorSpec(), (32, 32, 32))
    moved = g.apply_points(grid.centres, (32, 32, 32))
    original = {(tuple(c), s) for c, s in zip(grid.centres.tolist(), grid.sizes.tolist())}
    assert {(tuple(c), s) for c, s in zip(moved.tolist(), grid.sizes.tolist())} == original


def test_cube_iou_by_hand():
    # Two 4-voxel cubes offset by 2 along x: intersection 4*4*2 = 32, union 64+64-32 = 96.
    iou = cube_iou(
        np.array([[0, 0, 0.0]]),
        np.array([4.0]),
        np.array([[0, 0, 2.0], [0, 0, 10.0]]),
        np.array([4.0, 4.0]),
    )
    np.testing.assert_allclose(iou, [[1 / 3, 0.0]])
    # A 4-cube centred in an 8-cube: 64 / 512.
    np.testing.assert_allclose(
        cube_iou(np.zeros((1, 3)), [8.0], np.zeros((1, 3)), [4.0]), [[0.125]]
    )


def test_assignment_thresholds_positive_negative_ignored():
    spec = AnchorSpec(strides=(8,), sizes=(8.0,), match_best=False)
    grid = AnchorGrid.build(spec, (16, 16, 16))  # 8 anchors centred at 3.5 / 11.5
    # A cube of edge 8 at (3.5, 3.5, 3.5 + 2): IoU with the first anchor = 6/10 = 0.6 -> positive;
    # with its x-neighbour (centred at 11.5, 6 voxels away): 2/14 = 0.143 -> ignored; others 0.
    targets = assign_anchors(grid, np.array([[3.5, 3.5, 5.5, 8.0]]))
    assert targets.labels[0] == POSITIVE and targets.labels[1] == IGNORE
    assert np.all(targets.labels[2:] == NEGATIVE)
    assert targets.matched[0] == 0 and np.all(targets.matched[1:] == -1)
    np.testing.assert_allclose(targets.deltas[0], [0, 0, 2 / 8, 0.0], atol=1e-6)
    assert not targets.deltas[1:].any()


def test_best_anchor_becomes_positive_for_a_nodule_between_anchor_sizes():
    # A 3-voxel nodule centred at 7.5 (between stride-2 anchor centres 6.5 and 8.5) has IoU
    # 0.21 at best, so no anchor passes 0.3; match_best still makes its best anchor positive.
    box = np.array([[7.5, 7.5, 7.5, 3.0]])
    strict = assign_anchors(AnchorGrid.build(AnchorSpec(match_best=False), (16,) * 3), box)
    matched = assign_anchors(AnchorGrid.build(AnchorSpec(), (16,) * 3), box)
    assert (strict.labels == POSITIVE).sum() == 0
    assert (matched.labels == POSITIVE).sum() >= 1


def test_no_boxes_means_every_anchor_negative():
    targets = assign_anchors(AnchorGrid.build(AnchorSpec(), (16,) * 3), np.zeros((0, 4)))
    assert np.all(targets.labels == NEGATIVE)


def test_encode_is_relative_to_the_anchor():
    deltas = encode_boxes(
        np.array([[10.0, 10, 10]]), np.array([8.0]), np.array([[12.0, 6, 10, 16]])
    )
    np.testing.assert_allclose(deltas, [[0.25, -0.5, 0.0, np.log(2)]], rtol=1e-6)


def test_the_group_has_48_distinct_elements_with_exact_inverses():
    array = np.random.default_rng(0).random((2, 3, 4, 5))
    images = {g.apply(array).tobytes() + bytes(g.apply(array).shape) for g in CUBE_GROUP}
    assert len(CUBE_GROUP) == 48 and len(images) == 48
    assert CUBE_GROUP[0].is_identity
    for g in CUBE_GROUP:
        np.testing.assert_array_equal(g.inverse().apply(g.apply(array)), array)
        assert g.inverse().inverse() == g


@pytest.mark.parametrize("index", [1, 7, 13, 30, 47])
def test_points_follow_the_array_transform(index):
    g = CUBE_GROUP[index]
    shape = (3, 4, 5)
    array = np.zeros(shape)
    point = np.array([[2, 1, 3]])
    array[tuple(point[0])] = 1
    moved = g.apply_points(point, shape)[0].astype(int)
    out = g.apply(array)
    assert out.shape == g.transformed_shape(shape)
    assert out[tuple(moved)] == 1
    back = g.inverse().apply_points(moved[None], out.shape)
    np.testing.assert_array_equal(back, point)
