"""Segmentation tiles only the body's box on CT: fewer windows, the same labels."""

from __future__ import annotations

import numpy as np

from medssl import Volume, affine_from_geometry
from medssl.pipeline import SegmentationParams, plan_windows, segment
from medssl.pipeline.preprocess import BODY_MARGIN, body_box
from tests.medssl.pipeline.test_pipeline_segment import BinRunner


def _ct_with_a_body(shape=(40, 96, 96), centre=(20, 40, 52), radii=(14, 22, 18), seed=0):
    """-1000 HU air with noise, an ellipsoid body of 0 HU holding two organs (100, 200 HU)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    inside = sum(((c - m) / r) ** 2 for c, m, r in zip((z, y, x), centre, radii)) <= 1.0
    hu = np.full(shape, -1000.0) + rng.normal(0, 20, shape)
    hu[inside] = 0.0
    truth = np.zeros(shape, np.uint8)
    organ = inside & (np.abs(y - centre[1]) < 8) & (np.abs(x - centre[2]) < 6)
    truth[organ & (z < centre[0])] = 1
    truth[organ & (z >= centre[0])] = 2
    hu[truth == 1], hu[truth == 2] = 100.0, 200.0
    return hu.astype(np.float32), truth, inside


def test_the_body_box_spans_the_body_plus_a_margin_and_ignores_specks():
    hu, _, inside = _ct_with_a_body()
    hu[2, 2, 2:5] = 500.0  # a dense speck in the air (a few voxels) does not make a body plane
    box = body_box(hu, (8, 16, 16))
    for axis, sl in enumerate(box):
        planes = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
        assert sl.start <= planes[0] and sl.stop >= planes[-1] + 1  # the whole body is in
        assert sl.start >= max(planes[0] - BODY_MARGIN - 3, 0)  # and little more
        assert sl.stop <= planes[-1] + 1 + BODY_MARGIN + 3


def test_no_body_means_no_box_and_a_small_body_still_gets_a_whole_window():
    assert body_box(np.full((10, 40, 40), -1000.0, np.float32), (8, 16, 16)) is None
    hu = np.full((30, 60, 60), -1000.0, np.float32)
    hu[13:18, 25:35, 25:35] = 40.0  # 5 x 10 x 10 voxels: every plane through it holds >= 50
    box = body_box(hu, (16, 32, 32))
    assert box is not None and [s.stop - s.start for s in box] == [16, 32, 32]


def test_segmentation_runs_fewer_windows_and_gives_the_same_labels():
    hu, truth, _ = _ct_with_a_body()
    volume = Volume(hu, affine_from_geometry((0, 0, 0), (1.0, 1.0, 1.0)))
    params = SegmentationParams(
        spacing_mm=(1.0, 1.0, 1.0),
        normalisation=BinRunner.normalisation(3),
        window=(8, 16, 16),
        n_classes=3,
        overlap=0.25,
        blending="constant",
    )
    runner = BinRunner(3)
    result = segment(volume, runner, params)
    every = len(plan_windows(hu.shape, params.window, params.overlap))
    assert sum(runner.batches) == result.n_windows < every
    assert result.n_windows_skipped == every - result.n_windows
    assert np.array_equal(result.labels.array, truth)
