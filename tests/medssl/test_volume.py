import numpy as np
import pytest

from medssl import Volume, affine_from_geometry
from tests.conftest import oblique_direction, ramp_volume


def test_index_and_world_are_inverse_for_oblique_grids():
    vol = ramp_volume(direction=oblique_direction(30))
    idx = np.array([[0, 0, 0], [5, 19, 23], [2.5, 3.25, 7.75]])
    assert np.allclose(vol.world_to_index(vol.index_to_world(idx)), idx)


def test_geometry_properties_follow_the_affine():
    vol = ramp_volume(spacing=(2.0, 0.5, 0.75), origin=(1, 2, 3), direction=oblique_direction(10))
    assert np.allclose(vol.spacing, [2.0, 0.5, 0.75])
    assert np.allclose(vol.origin, [1, 2, 3])
    assert np.allclose(vol.direction.T @ vol.direction, np.eye(3))
    # index z advances along +S for an axial grid rotated about S
    assert np.allclose(vol.index_to_world([1, 0, 0]) - vol.origin, [0, 0, 2.0])


def test_default_direction_is_axial_lps():
    affine = affine_from_geometry((0, 0, 0), (3, 2, 1))
    vol = Volume(np.zeros((2, 2, 2), np.float32), affine)
    assert np.allclose(vol.index_to_world([1, 1, 1]), [1, 2, 3])  # x->L, y->P, z->S


def test_resample_keeps_world_positions_of_a_linear_ramp():
    # intensity = world x coordinate: linear interpolation must reproduce it exactly
    shape, spacing = (10, 12, 14), (2.0, 1.0, 1.5)
    vol = Volume(np.zeros(shape, np.float32), affine_from_geometry((5, -3, 7), spacing))
    zz, yy, xx = np.indices(shape)
    world = vol.index_to_world(np.stack([zz, yy, xx], -1).reshape(-1, 3).astype(float))
    vol.array = world[:, 0].reshape(shape).astype(np.float32)
    out = vol.resample(1.0)
    assert np.allclose(out.spacing, 1.0)
    assert np.allclose(out.origin, vol.origin)
    zz, yy, xx = np.indices(out.shape)
    world_out = out.index_to_world(np.stack([zz, yy, xx], -1).reshape(-1, 3).astype(float))
    assert np.allclose(out.array.ravel(), world_out[:, 0], atol=1e-3)
    assert out.shape == (19, 12, 20)


def test_resample_nearest_keeps_label_values_and_dtype():
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[2:6, 2:6, 2:6] = 3
    vol = Volume(labels, affine_from_geometry((0, 0, 0), (2, 2, 2)))
    out = vol.resample(0.5, interpolation="nearest")
    assert out.array.dtype == np.uint8
    assert set(np.unique(out.array)) == {0, 3}
    with pytest.raises(ValueError, match="interpolation"):
        vol.resample(1.0, interpolation="cubic")


def test_summary_has_the_info_keys():
    summary = ramp_volume().summary()
    assert {"shape", "affine", "origin", "spacing", "direction", "min", "max"} <= set(summary)
    assert summary["shape"] == [6, 20, 24]
    assert summary["min"] == -1000.0


@pytest.mark.parametrize(
    "scale, shape",
    [
        ((1.6, 1.4, 1.4), (37, 64, 57)),
        ((0.5, 0.7, 0.7), (119, 128, 113)),
        ((1.0, 1.0, 1.0), (60, 90, 80)),
    ],
)
@pytest.mark.parametrize("threads", [1, 3])
def test_resample_array_equals_scipy_affine_transform(scale, shape, threads):
    from scipy import ndimage

    from medssl.volume import resample_array

    rng = np.random.default_rng(0)
    image = (rng.normal(size=(60, 90, 80)) * 300).astype(np.float32)
    labels = rng.integers(0, 12, (60, 90, 80)).astype(np.uint8)
    linear = ndimage.affine_transform(
        image, np.array(scale), output_shape=shape, order=1, mode="nearest"
    )
    nearest = ndimage.affine_transform(
        labels, np.array(scale), output_shape=shape, order=0, mode="nearest"
    )
    out = resample_array(image, scale, shape, threads=threads)
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_allclose(out, linear, atol=1e-3)
    labelled = resample_array(labels, scale, shape, "nearest", threads=threads)
    assert labelled.dtype == np.uint8 and np.array_equal(labelled, nearest)


def test_resample_array_fills_samples_outside_the_input():
    from medssl.volume import resample_array

    image = np.arange(4, dtype=np.float32).reshape(4, 1, 1) * np.ones((4, 2, 2), np.float32)
    out = resample_array(image, (1.0, 1.0, 1.0), (6, 2, 2), fill_value=-5.0)
    assert out[:, 0, 0].tolist() == [0, 1, 2, 3, -5, -5]
    edge = resample_array(image, (1.0, 1.0, 1.0), (6, 2, 2))
    assert edge[:, 0, 0].tolist() == [0, 1, 2, 3, 3, 3]


def test_float_triple_gives_python_floats_and_names_a_wrong_length():
    from medssl.volume import float_triple

    got = float_triple(np.array([1, 2.5, 3], dtype=np.float32))
    assert got == (1.0, 2.5, 3.0) and all(type(v) is float for v in got)
    with pytest.raises(ValueError, match=r"spacing must be three numbers, got \[1.0, 2.0\]"):
        float_triple([1.0, 2.0], "spacing")
