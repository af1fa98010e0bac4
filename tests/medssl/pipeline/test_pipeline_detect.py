"""The detection pipeline: sliding windows, a fake numpy model, merging, LPS conversion."""

from __future__ import annotations

import importlib
import itertools
import json

import numpy as np
import pytest
from scipy import ndimage

from medssl import Volume, affine_from_geometry
from medssl.pipeline import (
    DetectionParams,
    Intensity,
    Preparation,
    detect,
    detect_preprocessed,
    extract_window,
    plan_windows,
    prepare,
)

# -- sliding windows ----------------------------------------------------------------------

WINDOW = (16, 32, 24)


@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (10, 50, 64), (16, 32, 24), (65, 130, 200), (7, 301, 33)]
)
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
def test_windows_cover_every_voxel_flush_with_the_end(shape, overlap):
    starts = plan_windows(shape, WINDOW, overlap)
    per_axis = [sorted({s[axis] for s in starts}) for axis in range(3)]
    assert starts == list(itertools.product(*per_axis))
    for n, w, axis_starts in zip(shape, WINDOW, per_axis):
        assert axis_starts[0] == 0
        assert axis_starts[-1] == max(n - w, 0)
        covered = np.zeros(max(n, w), dtype=int)
        for s in axis_starts:
            covered[s : s + w] += 1
        assert covered[:n].min() >= 1
        steps = np.diff(axis_starts)
        assert np.all(steps >= 1) and np.all(steps <= max(1, int(w * (1 - overlap))))


def test_windows_cover_every_voxel_in_3d():
    shape, window = (23, 41, 37), (8, 16, 16)
    covered = np.zeros(shape, dtype=int)
    for z, y, x in plan_windows(shape, window, 0.3):
        covered[z : z + 8, y : y + 16, x : x + 16] += 1
    assert covered.min() >= 1


def test_a_volume_smaller_than_the_window_gets_one_padded_window():
    array = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    assert plan_windows(array.shape, (8, 8, 8), 0.25) == [(0, 0, 0)]
    patch = extract_window(array, (0, 0, 0), (8, 8, 8), pad_value=-7.0)
    assert patch.shape == (8, 8, 8) and patch.dtype == np.float32
    assert np.array_equal(patch[:3, :4, :5], array)
    assert np.count_nonzero(patch == -7.0) == 8**3 - array.size


@pytest.mark.parametrize("start", [(0, 0, 0), (-2, 3, -1), (2, 4, 5), (-10, 0, 0), (5, 9, 9)])
def test_extract_window_pads_outside_the_array_with_the_pad_value(start):
    array = np.arange(4 * 6 * 7, dtype=np.int16).reshape(4, 6, 7) + 1
    window, margin = (3, 5, 4), 12
    padded = np.pad(array, margin, constant_values=-1)
    lo = [s + margin for s in start]
    expected = padded[lo[0] : lo[0] + 3, lo[1] : lo[1] + 5, lo[2] : lo[2] + 4]
    patch = extract_window(array, start, window, pad_value=-1)
    assert patch.dtype == np.int16
    assert np.array_equal(patch, expected)


def test_plan_windows_rejects_an_overlap_of_one():
    with pytest.raises(ValueError, match="overlap"):
        plan_windows((10, 10, 10), (4, 4, 4), 1.0)


# -- a fake model ---------------------------------------------------------------------------


class BlobRunner:
    """Fake detector: one box (d=8, score 0.95) per bright blob seen whole, plus junk.

    A blob is a connected region of the patch above 0 (about -300 HU with the default
    window) that does not touch the patch border; its box sits at the blob's
    intensity-weighted centroid (patch voxels). Every other anchor holds a random junk box
    scoring below ``junk_score``; ``extra`` boxes ``((z, y, x), d, score)`` (patch frame)
    are added to every patch.
    """

    def __init__(self, n_anchors=40, junk_score=0.005, extra=(), seed=0):
        self.n_anchors, self.junk_score, self.extra = n_anchors, junk_score, list(extra)
        self.rng = np.random.default_rng(seed)
        self.batches: list[tuple[int, ...]] = []
        self.blob_boxes = 0

    def __call__(self, patches):
        assert patches.dtype == np.float32 and patches.ndim == 5 and patches.shape[1] == 1
        self.batches.append(patches.shape)
        n_batch, edge = len(patches), patches.shape[-1]
        boxes = np.concatenate(
            [
                self.rng.uniform(0, edge, (n_batch, self.n_anchors, 3)),
                self.rng.uniform(2, 12, (n_batch, self.n_anchors, 1)),
            ],
            axis=-1,
        )
        scores = self.rng.uniform(0, self.junk_score, (n_batch, self.n_anchors))
        for b, patch in enumerate(patches[:, 0]):
            slot = itertools.count()
            for centre in self._blob_centres(patch):
                k = next(slot)
                boxes[b, k], scores[b, k] = (*centre, 8.0), 0.95
                self.blob_boxes += 1
            for centre, d, score in self.extra:
                k = next(slot)
                boxes[b, k], scores[b, k] = (*centre, d), score
        return boxes.astype(np.float32), scores.astype(np.float32)

    @staticmethod
    def _blob_centres(patch):
        labels, n = ndimage.label(patch > 0)
        border = np.ones(patch.shape, dtype=bool)
        border[1:-1, 1:-1, 1:-1] = False
        whole = [i for i in range(1, n + 1) if not np.any(border & (labels == i))]
        return ndimage.center_of_mass(np.clip(patch, 0, None), labels, whole)


def tilted_direction() -> np.ndarray:
    """Columns: LPS directions of index z, y, x; rotated about S by 25 and about L by 15 degrees."""
    a, b = np.radians(25.0), np.radians(15.0)
    about_s = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    about_l = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    axial = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    return about_s @ about_l @ axial


def blob_volume(
    centres_index, shape=(24, 96, 96), spacing=(2.5, 0.7, 0.7), sigma_mm=2.5
) -> tuple[Volume, np.ndarray]:
    """Air (-1000 HU) with Gaussian blobs (+200 HU peak) centred at the given continuous
    indices ``(z, y, x)``; returns the volume and the blob centres in LPS mm ``(K, 3)``."""
    affine = affine_from_geometry((-80.0, 120.0, -300.0), spacing, tilted_direction())
    volume = Volume(np.zeros(shape, dtype=np.float32), affine)
    truth = volume.index_to_world(np.asarray(centres_index, dtype=np.float64).reshape(-1, 3))
    world = volume.index_to_world(np.indices(shape).reshape(3, -1).T)
    hu = np.full(len(world), -1000.0)
    for centre in truth:
        hu += 1200.0 * np.exp(-np.sum((world - centre) ** 2, axis=1) / (2 * sigma_mm**2))
    return volume.with_array(hu.reshape(shape).astype(np.float32)), truth


BLOBS = [(8.3, 30.4, 60.2), (15.7, 62.9, 35.5)]


def params(**overrides) -> DetectionParams:
    return DetectionParams(**{"window": 32, "overlap": 0.5, "batch_size": 3, **overrides})


# -- detect ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing_mm", [1.0, 1.5])
def test_detect_reports_each_blob_once_at_its_lps_position(spacing_mm):
    volume, truth = blob_volume(BLOBS)
    runner = BlobRunner()
    result = detect(volume, runner, params(spacing_mm=spacing_mm))

    assert runner.blob_boxes > len(BLOBS)  # overlapping windows saw blobs more than once
    assert len(result.detections) == len(BLOBS)
    found = np.array([d.centre_lps for d in result.detections])
    distance = np.linalg.norm(found[:, None] - truth[None], axis=-1)
    assert sorted(distance.argmin(axis=1).tolist()) == [0, 1]
    assert distance.min(axis=1).max() < 1.0
    for det in result.detections:
        assert det.diameter_mm == pytest.approx(8.0 * spacing_mm)
        assert det.probability == pytest.approx(0.95)
        assert np.allclose(volume.index_to_world(det.centre_voxel), det.centre_lps, atol=1e-6)
    voxels = np.array([d.centre_voxel for d in result.detections])
    nearest = np.asarray(BLOBS)[distance.argmin(axis=1)]
    assert np.all(np.abs(voxels - nearest) * volume.spacing < 1.0)


def test_detect_sends_preprocessed_windows_in_batches_and_times_each_stage():
    volume, _ = blob_volume(BLOBS)
    runner = BlobRunner()
    p = params(batch_size=5)
    result = detect(volume, runner, p)

    prepared_shape = prepare(volume, p).shape
    assert result.n_windows == len(plan_windows(prepared_shape, p.window, p.overlap)) > 1
    assert sum(shape[0] for shape in runner.batches) == result.n_windows
    assert all(shape[0] <= 5 and shape[1:] == (1, 32, 32, 32) for shape in runner.batches)
    assert set(result.timings) == {"preprocess", "lung_mask", "inference", "postprocess"}
    assert result.timings["lung_mask"] == 0.0 and result.n_windows_skipped == 0  # off by default
    assert all(t >= 0 for t in result.timings.values())
    assert result.timings["preprocess"] > 0 and result.timings["inference"] > 0


def test_detections_come_sorted_by_probability_and_capped_at_max_detections():
    volume, _ = blob_volume(BLOBS)
    extra = [((4.0 + 8 * i, 16.0, 16.0), 6.0, 0.2 + 0.1 * i) for i in range(3)]
    runner = BlobRunner(extra=extra)
    many = detect(volume, runner, params()).detections
    assert len(many) > 4
    probabilities = [d.probability for d in many]
    assert probabilities == sorted(probabilities, reverse=True)

    capped = detect(volume, BlobRunner(extra=extra), params(max_detections=3)).detections
    assert [d.probability for d in capped] == pytest.approx(probabilities[:3])


def test_score_threshold_drops_low_scoring_boxes_before_merging():
    volume, _ = blob_volume(BLOBS)
    assert len(detect(volume, BlobRunner(), params()).detections) == 2
    junk_kept = detect(volume, BlobRunner(), params(score_threshold=0.0)).detections
    assert len(junk_kept) > 2
    assert detect(volume, BlobRunner(), params(score_threshold=0.96)).detections == []


def test_boxes_centred_in_window_padding_are_dropped():
    volume, _ = blob_volume([], shape=(8, 30, 30))  # 18 x 21 x 21 at 1 mm: one padded window
    in_padding = ((25.0, 25.0, 25.0), 6.0, 0.9)
    inside = ((5.0, 6.0, 7.0), 6.0, 0.8)
    result = detect(volume, BlobRunner(extra=[in_padding, inside]), params())
    assert result.n_windows == 1
    assert [d.probability for d in result.detections] == pytest.approx([0.8])
    prepared = prepare(volume, Preparation(1.0))
    assert np.allclose(result.detections[0].centre_lps, prepared.index_to_world([5.0, 6.0, 7.0]))


def test_min_diameter_drops_small_boxes():
    volume, _ = blob_volume(BLOBS)
    small = ((16.0, 16.0, 16.0), 3.0, 0.9)
    kept = detect(volume, BlobRunner(extra=[small]), params()).detections
    assert {d.diameter_mm for d in kept} == {3.0, 8.0}
    dropped = detect(volume, BlobRunner(extra=[small]), params(min_diameter_mm=4.0)).detections
    assert {d.diameter_mm for d in dropped} == {8.0}
    assert len(dropped) == 2


def test_pre_nms_top_k_keeps_only_the_best_boxes_of_each_window():
    volume, _ = blob_volume(BLOBS)
    best = ((16.0, 16.0, 16.0), 6.0, 0.99)
    result = detect(volume, BlobRunner(extra=[best]), params(pre_nms_top_k=1))
    assert result.detections and all(
        d.probability == pytest.approx(0.99) for d in result.detections
    )


def test_detect_preprocessed_gives_the_same_detections_without_preprocessing():
    volume, _ = blob_volume(BLOBS)
    p = params()
    prepared = prepare(volume, p)
    full = detect(volume, BlobRunner(seed=1), p)
    cached = detect_preprocessed(prepared, BlobRunner(seed=1), p, reference_affine=volume.affine)
    assert cached.detections == full.detections
    assert cached.timings["preprocess"] == 0.0

    own_frame = detect_preprocessed(prepared, BlobRunner(seed=1), p)
    for det in own_frame.detections:
        assert np.allclose(prepared.index_to_world(det.centre_voxel), det.centre_lps, atol=1e-6)


def test_detect_preprocessed_rejects_a_volume_not_at_the_model_spacing():
    volume, _ = blob_volume([], shape=(8, 30, 30))
    with pytest.raises(ValueError, match="spacing"):
        detect_preprocessed(volume, BlobRunner(), params())


class BrokenRunner:
    def __init__(self, kind):
        self.kind = kind

    def __call__(self, patches):
        n = len(patches)
        boxes, scores = np.full((n, 5, 4), 4.0, np.float32), np.full((n, 5), 0.5, np.float32)
        if self.kind == "shape":
            return boxes[:, :, :3], scores
        if self.kind == "logits":
            return boxes, scores + 3.0
        if self.kind == "nan":
            return boxes, scores * np.nan
        boxes[:, :, 3] = np.inf
        return boxes, scores


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("shape", r"boxes \(B, N, 4\)"),
        ("logits", "probabilities"),
        ("nan", "non-finite"),
        ("inf_box", "box"),
    ],
)
def test_a_runner_breaking_its_contract_is_reported(kind, match):
    volume, _ = blob_volume([], shape=(8, 30, 30))
    with pytest.raises(ValueError, match=match):
        detect(volume, BrokenRunner(kind), params())


# -- parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("spacing_mm", 0.0),
        ("normalisation", {"hu_min": 0}),
        ("window", 100),
        ("window", 0),
        ("divisor", 0),
        ("overlap", 1.0),
        ("overlap", -0.1),
        ("batch_size", 0),
        ("batch_size", 2.5),
        ("score_threshold", 1.5),
        ("pre_nms_top_k", 0),
        ("nms_iou", -0.1),
        ("max_detections", 0),
        ("min_diameter_mm", -1.0),
        ("min_diameter_mm", float("nan")),
    ],
)
def test_invalid_params_name_the_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        DetectionParams(**{field: value})
    message = str(info.value)
    assert f"DetectionParams.{field}" in message and repr(value) in message


def test_params_round_trip_through_json():
    p = DetectionParams(
        spacing_mm=1.25, normalisation=Intensity(-1000, 400, -1000), window=96, overlap=0.3,
        batch_size=4, score_threshold=0.05, pre_nms_top_k=300, nms_iou=0.2,
        max_detections=20, min_diameter_mm=3.0,
    )  # fmt: skip
    assert DetectionParams.from_json(json.loads(json.dumps(p.to_json()))) == p
    assert DetectionParams.from_json({}) == DetectionParams()


def test_params_from_json_rejects_unknown_keys():
    with pytest.raises(ValueError, match="nms_threshold"):
        DetectionParams.from_json({"nms_threshold": 0.1})
    with pytest.raises(ValueError, match="DetectionParams.normalisation"):
        DetectionParams.from_json({"normalisation": {"window": 3}})


def test_the_scan_wide_candidate_cap_keeps_the_same_detections_and_bounds_nms(monkeypatch):
    detect_module = importlib.import_module("medssl.pipeline.detect")
    from medssl.pipeline.detect import DetectionParams, detect_preprocessed
    from medssl.pipeline.preprocess import Intensity
    from medssl.volume import Volume

    rng = np.random.default_rng(0)
    volume = Volume(rng.uniform(-1, 1, (48, 48, 48)).astype(np.float32), np.eye(4))

    def noisy_runner(patches):  # every anchor clears the threshold, like an uncalibrated model
        b = len(patches)
        centres = rng.uniform(0, 32, (b, 500, 3))
        boxes = np.concatenate([centres, rng.uniform(4, 12, (b, 500, 1))], axis=2)
        return boxes.astype(np.float32), rng.uniform(0.02, 1.0, (b, 500)).astype(np.float32)

    base = {
        "normalisation": Intensity(),
        "window": 32,
        "divisor": 16,
        "overlap": 0.5,
        "pre_nms_top_k": 500,
        "max_detections": 20,
    }
    state = rng.bit_generator.state
    uncapped = detect_preprocessed(
        volume, noisy_runner, DetectionParams(**base, max_nms_candidates=10**9)
    )
    rng.bit_generator.state = state
    sizes = []
    real_nms = detect_module.nms_3d

    def recording_nms(boxes, scores, *args, **kwargs):
        sizes.append(len(boxes))
        return real_nms(boxes, scores, *args, **kwargs)

    monkeypatch.setattr(detect_module, "nms_3d", recording_nms)
    capped = detect_preprocessed(
        volume, noisy_runner, DetectionParams(**base, max_nms_candidates=800)
    )
    assert sizes == [800]  # 8 windows x 500 candidates, capped before NMS
    assert [d.probability for d in capped.detections] == [
        d.probability for d in uncapped.detections
    ]
    assert [d.centre_lps for d in capped.detections] == [d.centre_lps for d in uncapped.detections]
