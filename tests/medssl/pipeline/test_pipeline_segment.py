"""The segmentation pipeline: blending (cross-checked with MONAI), grids, components, volumes."""

from __future__ import annotations

import importlib
import json
import re

import numpy as np
import pytest
from scipy import ndimage

from medssl import Volume, affine_from_geometry
from medssl.pipeline import (
    Blending,
    Intensity,
    SegmentationParams,
    importance_map,
    largest_component,
    plan_windows,
    resample_to_spacing,
    segment,
    segment_preprocessed,
)

# the module (``medssl.pipeline.segment`` the attribute is the function)
MODULE = importlib.import_module("medssl.pipeline.segment")

# A flipped x axis and an odd origin, so that every grid change goes through the affines.
DIRECTION = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
ORIGIN = (37.5, -120.25, -310.0)


def _volume(array: np.ndarray, spacing) -> Volume:
    return Volume(array, affine_from_geometry(ORIGIN, spacing, DIRECTION))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


class BinRunner:
    """Class = intensity bin: label ``k`` was written as ``k * 100`` HU, normalised by
    ``Intensity(0, 100 * (C - 1))`` onto [-1, 1]. Soft scores with per-call noise that never
    changes the argmax, so only a blending or grid bug can change the labels."""

    def __init__(self, n_classes: int, seed: int = 0):
        self.n_classes = n_classes
        self.rng = np.random.default_rng(seed)
        self.batches: list[int] = []

    @staticmethod
    def normalisation(n_classes: int) -> Intensity:
        return Intensity(hu_min=0.0, hu_max=100.0 * (n_classes - 1), pad_hu=0.0)

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        assert patches.dtype == np.float32 and patches.ndim == 5 and patches.shape[1] == 1
        self.batches.append(len(patches))
        label = np.rint((patches[:, 0] + 1.0) / 2.0 * (self.n_classes - 1)).astype(int)
        onehot = np.moveaxis(np.eye(self.n_classes, dtype=np.float32)[label], -1, 1)
        noise = self.rng.uniform(0.0, 0.05, onehot.shape).astype(np.float32)
        return 0.6 * onehot + 0.1 + noise


def _blobs(shape, n_classes, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(size=(n_classes, *shape)), sigma=(0, 2, 3, 3))
    return np.argmax(smooth, axis=0).astype(np.uint8)


# -- exact reproduction with an unchanged grid -------------------------------------------


@pytest.mark.parametrize("blending", ["gaussian", "constant"])
@pytest.mark.parametrize(
    "shape, window, overlap",
    [
        ((20, 45, 38), (8, 16, 16), 0.5),
        ((13, 50, 29), (6, 12, 10), 0.3),
        ((5, 10, 9), (8, 16, 16), 0.5),  # smaller than the window: one padded window
    ],
)
def test_segment_reproduces_a_label_map_exactly_when_the_grid_is_unchanged(
    shape, window, overlap, blending
):
    n_classes, spacing = 4, (1.5, 0.8, 0.75)
    truth = _blobs(shape, n_classes)
    volume = _volume(truth.astype(np.int16) * 100, spacing)
    runner = BinRunner(n_classes)
    params = SegmentationParams(
        spacing_mm=spacing,
        normalisation=BinRunner.normalisation(n_classes),
        window=window,
        n_classes=n_classes,
        overlap=overlap,
        blending=blending,
        batch_size=3,
    )
    result = segment(volume, runner, params)

    assert result.labels.array.dtype == np.uint8
    assert np.array_equal(result.labels.array, truth)
    assert np.array_equal(result.labels.affine, volume.affine)
    assert np.array_equal(result.model_grid_labels.array, truth)
    n_windows = len(plan_windows(shape, window, overlap))
    assert result.n_windows == n_windows == sum(runner.batches)
    assert max(runner.batches) <= 3
    assert set(result.timings) == {
        "resample",
        "normalise",
        "inference",
        "blend",
        "resample_back",
        "postprocess",
    }
    assert all(t >= 0 for t in result.timings.values())


def test_blended_probabilities_are_a_weighted_mean_of_window_scores():
    shape, n_classes = (12, 30, 26), 3
    truth = _blobs(shape, n_classes, seed=4)
    prepared = _volume(BinRunner.normalisation(n_classes).apply(truth * 100.0), (1.0, 1.0, 1.0))
    params = SegmentationParams(
        spacing_mm=(1, 1, 1),
        normalisation=BinRunner.normalisation(n_classes),
        window=(8, 16, 16),
        n_classes=n_classes,
    )
    probs = segment_preprocessed(prepared, BinRunner(n_classes), params)
    assert probs.shape == (n_classes, *shape) and probs.dtype == np.float32
    # scores are 0.6 onehot + 0.1 + U(0, 0.05): any weighted mean stays in that band
    onehot = np.moveaxis(np.eye(n_classes)[truth], -1, 0)
    assert np.all(probs >= 0.6 * onehot + 0.1 - 1e-6)
    assert np.all(probs <= 0.6 * onehot + 0.15 + 1e-6)


# -- resampling round trip -----------------------------------------------------------------


def test_a_sphere_survives_the_round_trip_through_an_anisotropic_model_grid():
    source_spacing, model_spacing = (2.5, 0.7, 0.8), (2.0, 1.0, 1.0)
    shape = (40, 140, 125)
    volume = _volume(np.zeros(shape, np.float32), source_spacing)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    world = volume.index_to_world(index)
    centre = volume.index_to_world((np.asarray(shape) - 1) / 2.0) + np.array([3.3, -2.1, 4.7])
    truth = np.linalg.norm(world - centre, axis=-1) <= 32.0
    volume = volume.with_array(np.where(truth, 100.0, -100.0).astype(np.float32))

    def threshold_runner(patches: np.ndarray) -> np.ndarray:
        foreground = 1.0 / (1.0 + np.exp(-20.0 * patches))  # normalised 0 = 0 HU, mid-way
        return np.concatenate([1.0 - foreground, foreground], axis=1).astype(np.float32)

    params = SegmentationParams(
        spacing_mm=model_spacing,
        normalisation=Intensity(-200.0, 200.0, -100.0),
        window=(16, 48, 48),
        n_classes=2,
    )
    result = segment(volume, threshold_runner, params)

    assert result.model_grid_labels.shape != shape
    assert np.allclose(result.model_grid_labels.spacing, model_spacing)
    assert result.labels.shape == shape
    assert np.array_equal(result.labels.affine, volume.affine)
    assert _dice(result.labels.array == 1, truth) > 0.97
    truth_ml = np.count_nonzero(truth) * np.prod(source_spacing) / 1000.0
    assert result.volumes_ml[1] == pytest.approx(truth_ml, rel=0.03)


def _smooth_scan(shape, seed) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(size=shape)
    return (ndimage.gaussian_filter(noise, 2.0) * 3000.0).astype(np.float32)


def _softmax_runner(n_classes: int):
    """Pointwise soft classes: probabilities vary smoothly with intensity."""
    centres = np.linspace(-1.0, 1.0, n_classes, dtype=np.float32)[None, :, None, None, None]

    def runner(patches):
        logits = -8.0 * (patches - centres) ** 2
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    return runner


def _reference_labels(probs: np.ndarray, model_grid: Volume, source: Volume) -> np.ndarray:
    """The spec: source voxel centres → model grid through the affines, linear interpolation
    of each class there (edge value outside), argmax."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in source.shape], indexing="ij"), axis=0)
    points = model_grid.world_to_index(source.index_to_world(np.moveaxis(index, 0, -1)))
    coords = np.moveaxis(points, -1, 0)
    resampled = [
        ndimage.map_coordinates(p, coords, order=1, mode="nearest", prefilter=False) for p in probs
    ]
    return np.argmax(np.stack(resampled), axis=0)


@pytest.mark.parametrize("slab_voxels", [1 << 22, 1000])
def test_labels_are_the_argmax_of_probabilities_resampled_to_the_source_grid(
    monkeypatch, slab_voxels
):
    monkeypatch.setattr(MODULE, "_SLAB_VOXELS", slab_voxels)  # 1000: one z slice per slab
    n_classes, shape = 5, (18, 40, 36)
    volume = _volume(_smooth_scan(shape, seed=11), (2.5, 0.7, 0.8))
    params = SegmentationParams(
        spacing_mm=(2.0, 1.1, 0.9),
        normalisation=Intensity(-400.0, 400.0, 0.0),
        window=(8, 16, 16),
        n_classes=n_classes,
    )
    result = segment(volume, _softmax_runner(n_classes), params)

    grid = resample_to_spacing(volume, params.spacing_mm)
    prepared = grid.with_array(params.normalisation.apply(grid.array))
    probs = segment_preprocessed(prepared, _softmax_runner(n_classes), params)
    expected = _reference_labels(probs, prepared, volume)
    assert len(np.unique(expected)) == n_classes
    assert np.array_equal(result.model_grid_labels.array, np.argmax(probs, axis=0))
    # float32 separable lerps vs scipy's float64 interpolation: only near-ties may differ
    assert np.count_nonzero(result.labels.array != expected) <= 2


def test_a_rotated_model_grid_is_resampled_through_the_general_path(monkeypatch):
    monkeypatch.setattr(MODULE, "_SLAB_VOXELS", 1000)
    n_classes = 4
    source = _volume(np.zeros((10, 24, 20), np.float32), (2.0, 0.8, 0.9))
    angle = np.deg2rad(10.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1.0]]
    )
    model_grid = Volume(
        np.zeros((14, 22, 22), np.float32),
        affine_from_geometry(
            source.index_to_world((-1.0, -2.0, -1.5)), (1.6, 1.0, 1.0), rotation @ DIRECTION
        ),
    )
    rng = np.random.default_rng(2)
    probs = ndimage.gaussian_filter(rng.uniform(size=(n_classes, *model_grid.shape)), (0, 1, 1, 1))
    probs = probs.astype(np.float32)
    labels = MODULE._argmax_on_grid(
        probs, np.argmax(probs, axis=0), model_grid.affine, source.shape, source.affine, np.uint8
    )
    expected = _reference_labels(probs, model_grid, source)
    assert labels.dtype == np.uint8
    assert np.count_nonzero(labels != expected) <= 2


# -- blending, cross-checked with MONAI ----------------------------------------------------


@pytest.mark.parametrize("window", [(8, 8, 8), (7, 16, 12), (9, 13, 1)])
def test_importance_map_matches_monai(window):
    from monai.data.utils import compute_importance_map

    for mode in ("gaussian", "constant"):
        theirs = compute_importance_map(window, mode=mode, sigma_scale=0.125).numpy()
        ours = importance_map(window, mode, 0.125)
        assert ours.dtype == np.float32 and ours.shape == window
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert importance_map(window).min() >= 1e-3  # corners are floored, never zero


# A smoothing kernel (sums to 1) and gains/biases that keep every output >= 1, far from 0, so
# a relative tolerance is meaningful.
KERNEL = np.random.default_rng(7).uniform(0.0, 1.0, (3, 3, 3))
KERNEL = (KERNEL / KERNEL.sum()).astype(np.float32)
GAIN = np.array([1.5, -0.7, 0.3], dtype=np.float32)
BIAS = np.array([2.0, 3.0, 4.0], dtype=np.float32)


def _numpy_network(patches: np.ndarray) -> np.ndarray:
    """3x3x3 correlation, zero-padded at the patch edge (so results depend on the window
    position and blending matters), then a per-channel affine: ``(B, 1, ...) -> (B, 3, ...)``."""
    smooth = np.stack([ndimage.correlate(p[0], KERNEL, mode="constant", cval=0.0) for p in patches])
    return (smooth[:, None] * GAIN[:, None, None, None] + BIAS[:, None, None, None]).astype(
        np.float32
    )


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_blending_matches_monai_sliding_window_inference(mode):
    import torch
    from monai.data.utils import dense_patch_slices
    from monai.inferers import sliding_window_inference
    from monai.inferers.utils import _get_scan_interval

    def torch_network(patches: torch.Tensor) -> torch.Tensor:
        kernel = torch.from_numpy(KERNEL)[None, None]
        smooth = torch.nn.functional.conv3d(patches, kernel, padding=1)
        return (
            smooth * torch.from_numpy(GAIN)[:, None, None, None]
            + torch.from_numpy(BIAS)[:, None, None, None]
        )

    # MONAI steps by int(w * (1 - overlap)) from 0 and clamps the last window to the end;
    # plan_windows spreads its starts evenly between 0 and n - w. They agree when every
    # edge is exactly w + k * step, as here (steps 4, 8, 6); checked below before comparing.
    window, overlap = (8, 16, 12), 0.5
    shape = (8 + 3 * 4, 16 + 2 * 8, 12 + 3 * 6)
    interval = _get_scan_interval(shape, window, 3, (overlap,) * 3)
    slices = dense_patch_slices(shape, window, interval)
    monai_starts = [tuple(s.start for s in sl) for sl in slices]
    assert sorted(monai_starts) == plan_windows(shape, window, overlap)

    array = np.random.default_rng(3).uniform(0.0, 1.0, shape).astype(np.float32)
    params = SegmentationParams(
        spacing_mm=(1.0, 1.0, 1.0),
        normalisation=Intensity(),
        window=window,
        n_classes=3,
        overlap=overlap,
        blending=mode,
        sigma_scale=0.125,
        batch_size=2,
    )
    ours = segment_preprocessed(_volume(array, (1.0, 1.0, 1.0)), _numpy_network, params)
    with torch.no_grad():
        theirs = sliding_window_inference(
            torch.from_numpy(array)[None, None],
            roi_size=window,
            sw_batch_size=2,
            predictor=torch_network,
            overlap=overlap,
            mode=mode,
            sigma_scale=0.125,
        )[0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_gaussian_and_constant_blending_differ_where_windows_overlap():
    shape, window = (16, 32, 24), (8, 16, 12)
    array = np.random.default_rng(5).uniform(0.0, 1.0, shape).astype(np.float32)
    prepared = _volume(array, (1, 1, 1))
    params = _params(window=window)
    gauss = segment_preprocessed(prepared, _numpy_network, params)
    constant = _params(window=window, blending="constant")
    const = segment_preprocessed(prepared, _numpy_network, constant)
    assert np.abs(gauss - const).max() > 1e-2


# -- largest connected component -----------------------------------------------------------


def test_largest_component_keeps_only_the_biggest_piece_of_listed_labels():
    labels = np.zeros((12, 12, 12), dtype=np.uint8)
    labels[1:4, 1:4, 1:4] = 1  # 27 voxels
    labels[4, 4, 4] = 1  # touches the big cube by a corner only: same 26-component
    labels[8:10, 8:10, 8:10] = 1  # 8 voxels, separate
    labels[1:3, 8:11, 1:3] = 2  # 12 voxels
    labels[8, 1, 8] = 2  # 1 voxel, separate
    kept = largest_component(labels, keep=[1])

    expected = labels.copy()
    expected[8:10, 8:10, 8:10] = 0
    assert kept.dtype == np.uint8
    assert np.array_equal(kept, expected)
    assert kept[4, 4, 4] == 1 and kept[8, 1, 8] == 2
    both = largest_component(labels, keep=(1, 2, 3))  # 3 is absent: ignored
    assert both[8, 1, 8] == 0 and np.count_nonzero(both == 2) == 12
    assert np.array_equal(labels[8:10, 8:10, 8:10], np.ones((2, 2, 2)))  # input untouched


def test_segment_applies_largest_component_on_the_source_grid():
    n_classes, spacing = 3, (2.0, 0.5, 0.8)
    truth = np.zeros((10, 30, 30), dtype=np.uint8)
    truth[2:7, 3:15, 3:15] = 1
    truth[8:10, 25:28, 25:28] = 1
    truth[2:5, 20:25, 2:6] = 2
    truth[8, 2, 27] = 2
    volume = _volume(truth.astype(np.float32) * 100, spacing)
    params = SegmentationParams(
        spacing_mm=spacing,
        normalisation=BinRunner.normalisation(n_classes),
        window=(8, 16, 16),
        n_classes=n_classes,
        largest_component=(1,),
    )
    result = segment(volume, BinRunner(n_classes), params)
    expected = truth.copy()
    expected[8:10, 25:28, 25:28] = 0
    assert np.array_equal(result.labels.array, expected)
    assert np.array_equal(result.model_grid_labels.array, truth)  # before the clean-up


# -- volumes -------------------------------------------------------------------------------


def test_volumes_ml_is_voxel_count_times_voxel_volume():
    n_classes, spacing = 3, (2.0, 0.5, 0.8)
    truth = np.zeros((16, 40, 36), dtype=np.uint8)
    truth[3:13, 10:20, 20:30] = 1  # 1000 voxels of 0.8 mm³
    volume = _volume(truth.astype(np.float32) * 100, spacing)
    params = SegmentationParams(
        spacing_mm=spacing,
        normalisation=BinRunner.normalisation(n_classes),
        window=(8, 16, 16),
        n_classes=n_classes,
    )
    result = segment(volume, BinRunner(n_classes), params)
    assert result.volumes_ml == {1: pytest.approx(0.8), 2: 0.0}


def test_more_than_256_classes_give_a_uint16_label_map():
    n_classes = 300
    truth = np.zeros((6, 8, 8), dtype=np.uint16)
    truth[1:4, 2:6, 2:6] = 299
    volume = _volume(truth.astype(np.float32) * 100, (1.0, 1.0, 1.0))
    params = SegmentationParams(
        spacing_mm=(1, 1, 1),
        normalisation=BinRunner.normalisation(n_classes),
        window=(4, 8, 8),
        n_classes=n_classes,
    )
    result = segment(volume, BinRunner(n_classes), params)
    assert result.labels.array.dtype == np.uint16
    assert np.array_equal(result.labels.array, truth)
    assert result.volumes_ml[299] == pytest.approx(0.048)


# -- contracts -----------------------------------------------------------------------------


def _params(**overrides) -> SegmentationParams:
    base = {
        "spacing_mm": (1.0, 1.0, 1.0),
        "normalisation": Intensity(),
        "window": (4, 8, 8),
        "n_classes": 3,
    }
    return SegmentationParams(**{**base, **overrides})


@pytest.mark.parametrize(
    "returned",
    [(2, 3, 4, 8, 7), (2, 2, 4, 8, 8), (1, 3, 4, 8, 8), (2, 3, 4, 8)],
)
def test_a_runner_returning_the_wrong_shape_is_named(returned):
    volume = _volume(np.zeros((6, 10, 10), np.float32), (1.0, 1.0, 1.0))

    def runner(patches):
        return np.zeros(returned, np.float32)

    with pytest.raises(ValueError, match=re.escape("(2, 3, 4, 8, 8) for 2 patches")) as info:
        segment(volume, runner, _params())
    assert str(returned) in str(info.value)


def test_non_finite_runner_scores_are_rejected():
    volume = _volume(np.zeros((4, 8, 8), np.float32), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="non-finite"):
        segment(volume, lambda p: np.full((len(p), 3, 4, 8, 8), np.nan, np.float32), _params())


def test_segment_preprocessed_rejects_a_volume_off_the_model_grid():
    prepared = _volume(np.zeros((4, 8, 8), np.float32), (2.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        segment_preprocessed(prepared, BinRunner(3), _params())


@pytest.mark.parametrize(
    "field, value",
    [
        ("spacing_mm", (1.0, 1.0)),
        ("spacing_mm", (1.0, 0.0, 1.0)),
        ("spacing_mm", (1.0, float("nan"), 1.0)),
        ("normalisation", object()),
        ("window", (4, 8, 0)),
        ("window", (4, 8, 8.5)),
        ("n_classes", 1),
        ("n_classes", 70000),
        ("overlap", 1.0),
        ("overlap", -0.1),
        ("blending", "linear"),
        ("sigma_scale", 0.0),
        ("batch_size", 0),
        ("batch_size", True),
        ("largest_component", (0,)),
        ("largest_component", (3,)),
    ],
)
def test_bad_params_are_rejected_naming_the_value(field, value):
    with pytest.raises(ValueError, match=re.escape(f"SegmentationParams.{field}")) as info:
        _params(**{field: value})
    assert repr(value) in str(info.value)


def test_params_round_trip_through_json():
    params = _params(
        spacing_mm=[2.5, 0.7, 0.8],
        window=[16, 64, 64],
        normalisation=Intensity(-160, 240, -1000),
        overlap=0.25,
        blending=Blending.CONSTANT,
        sigma_scale=0.2,
        batch_size=4,
        largest_component=[1, 2],
    )
    assert params.spacing_mm == (2.5, 0.7, 0.8) and params.largest_component == (1, 2)
    assert params.blending is Blending.CONSTANT
    data = json.loads(json.dumps(params.to_json()))
    assert data["blending"] == "constant"
    assert SegmentationParams.from_json(data) == params
    with pytest.raises(ValueError, match="unknown SegmentationParams keys"):
        SegmentationParams.from_json({**data, "stride": 2})
    with pytest.raises(ValueError, match="needs keys"):
        SegmentationParams.from_json({"n_classes": 3})


def test_any_normalisation_with_the_interface_is_accepted():
    class ZScore:
        pad_value = 0.0

        def apply(self, array):
            return ((array - 50.0) / 25.0).astype(np.float32)

        def to_json(self):
            return {"mean": 50.0, "std": 25.0}

    truth = _blobs((6, 12, 12), 2)
    volume = _volume(truth * 100.0, (1.0, 1.0, 1.0))

    def runner(patches):
        fg = (patches > 0).astype(np.float32)
        return np.concatenate([1 - fg, fg], axis=1)

    result = segment(volume, runner, _params(normalisation=ZScore(), n_classes=2))
    assert np.array_equal(result.labels.array, truth)
