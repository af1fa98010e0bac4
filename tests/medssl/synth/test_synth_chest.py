"""The synthetic chest CT: determinism, HU of tissues, geometry, and the nodule ground truth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from medssl.synth.chest import (
    SLICE_THICKNESSES,
    ChestCase,
    ChestConfig,
    generate_chest_ct,
)
from medssl.synth.nodules import LOCATIONS, MICRONODULE_DIAMETER, NODULE_KINDS

#: A small targeted field of view (~70 mm), nodules up to 15 mm: fast enough for many seeds.
SMALL = ChestConfig(matrix=96, n_slices=48, nodule_diameter_range=(3.0, 15.0))
SEEDS = range(20)
#: The whole chest at a coarse pixel: air, body, lungs, heart and bones in one small volume.
WHOLE = ChestConfig(matrix=128, pixel_spacing_range=(2.5, 2.5), slice_thickness_range=(2.5, 2.5))


@pytest.fixture(scope="module")
def small_cases() -> dict[int, ChestCase]:
    return {seed: generate_chest_ct(seed, SMALL) for seed in SEEDS}


@pytest.fixture(scope="module")
def whole_chest() -> ChestCase:
    return generate_chest_ct(3, WHOLE)


def _centre_index(case: ChestCase, point: tuple[float, float, float]) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.rint(case.volume.world_to_index(point)))  # type: ignore


def test_same_seed_and_config_give_bit_identical_cases_whatever_the_threads() -> None:
    a = generate_chest_ct(5, SMALL)
    b = generate_chest_ct(5, dataclasses.replace(SMALL, render_threads=1))
    assert np.array_equal(a.volume.array, b.volume.array)
    assert np.array_equal(a.volume.affine, b.volume.affine)
    assert np.array_equal(a.nodule_mask, b.nodule_mask)
    assert np.array_equal(a.lung_mask, b.lung_mask)
    assert a.nodules == b.nodules and a.confusers == b.confusers
    assert a.volume.meta == b.volume.meta


def test_different_seeds_give_different_scans(small_cases: dict[int, ChestCase]) -> None:
    a, b = small_cases[0], small_cases[1]
    assert a.volume.shape != b.volume.shape or not np.array_equal(a.volume.array, b.volume.array)
    assert a.nodules != b.nodules


def test_outputs_have_the_documented_types_and_shapes(small_cases: dict[int, ChestCase]) -> None:
    case = small_cases[0]
    assert case.volume.array.dtype == np.float32
    assert case.volume.shape == (48, 96, 96)
    assert case.nodule_mask.dtype == np.uint8 and case.nodule_mask.shape == case.volume.shape
    assert case.lung_mask.dtype == bool and case.lung_mask.shape == case.volume.shape
    assert case.volume.array.min() >= -1024 and case.volume.array.max() <= 3071


def test_tissues_have_ct_attenuation(whole_chest: ChestCase) -> None:
    image = whole_chest.volume.array
    assert abs(np.median(image[:, 0, :]) + 1000) < 5  # air in front of the chest
    lung = image[whole_chest.lung_mask & (whole_chest.nodule_mask == 0)]
    assert -900 < np.median(lung) < -780  # aerated parenchyma
    assert np.percentile(lung, 99) > -300  # with vessels in it
    assert (image > 400).sum() > 1000  # ribs, spine, sternum
    body = image[~whole_chest.lung_mask & (image > -300)]
    assert -120 < np.median(body) < 80  # fat and soft tissue


def test_default_slices_cover_both_lungs_with_margins(whole_chest: ChestCase) -> None:
    lungs = whole_chest.lung_mask
    assert lungs.any()
    assert not lungs[0].any() and not lungs[-1].any()
    assert not whole_chest.volume.meta["targeted"]
    # the lungs fill both halves of the chest: one each side of the midline
    columns = np.flatnonzero(lungs.any(axis=(0, 1)))
    assert columns[0] < lungs.shape[2] // 2 < columns[-1]


def test_geometry_is_axial_lps_with_a_scanner_like_origin(whole_chest: ChestCase) -> None:
    volume = whole_chest.volume
    assert np.allclose(volume.direction, [[0, 0, 1], [0, 1, 0], [1, 0, 0]])
    fov = volume.meta["fov_mm"]
    assert fov == pytest.approx(128 * 2.5)
    # a full field of view is centred near the isocentre
    assert np.all(np.abs(volume.origin[:2] + (128 - 1) / 2 * 2.5) <= 10 + 1e-6)


def test_scan_parameters_stay_in_the_configured_ranges(small_cases: dict[int, ChestCase]) -> None:
    for case in small_cases.values():
        meta = case.volume.meta
        sz, sy, sx = case.volume.spacing
        assert sy == pytest.approx(sx) == pytest.approx(meta["pixel_spacing"])
        assert SMALL.pixel_spacing_range[0] <= sx <= SMALL.pixel_spacing_range[1]
        assert sz == pytest.approx(meta["slice_thickness"])
        assert meta["slice_thickness"] in SLICE_THICKNESSES
        assert SMALL.slice_thickness_range[0] <= sz <= SMALL.slice_thickness_range[1]
        assert SMALL.noise_sigma_range[0] <= meta["noise_sigma_hu"] <= SMALL.noise_sigma_range[1]
        assert SMALL.kernel_fwhm_range[0] <= meta["kernel_fwhm_mm"] <= SMALL.kernel_fwhm_range[1]
        assert meta["targeted"]
        lo, hi = SMALL.n_nodules_range
        assert lo <= len(case.nodules) <= hi
        lo, hi = SMALL.n_confusers_range
        assert len(case.confusers) <= hi


def test_thickness_outside_the_usual_values_is_drawn_from_the_range() -> None:
    config = dataclasses.replace(SMALL, slice_thickness_range=(3.3, 3.6))
    thickness = generate_chest_ct(0, config).volume.meta["slice_thickness"]
    assert 3.3 <= thickness <= 3.6


def test_every_nodule_centre_lands_in_its_own_label(small_cases: dict[int, ChestCase]) -> None:
    for seed, case in small_cases.items():
        for nodule in case.nodules:
            index = _centre_index(case, nodule.centre_lps)
            assert all(0 <= i < n for i, n in zip(index, case.volume.shape)), (seed, nodule)
            assert case.nodule_mask[index] == nodule.label, (seed, nodule)


def test_nodule_labels_are_the_annotated_nodules(small_cases: dict[int, ChestCase]) -> None:
    for case in small_cases.values():
        labels = [n.label for n in case.nodules]
        assert labels == list(range(1, len(labels) + 1))
        assert set(np.unique(case.nodule_mask)) - {0} == set(labels)


def test_nodule_masks_lie_in_the_lungs(small_cases: dict[int, ChestCase]) -> None:
    for seed, case in small_cases.items():
        nodules = case.nodule_mask > 0
        assert not np.any(nodules & ~case.lung_mask), seed


def test_nodules_lie_wholly_inside_the_field_of_view(small_cases: dict[int, ChestCase]) -> None:
    for seed, case in small_cases.items():
        nodules = case.nodule_mask > 0
        for face in (
            nodules[0],
            nodules[-1],
            nodules[:, 0],
            nodules[:, -1],
            nodules[:, :, 0],
            nodules[:, :, -1],
        ):
            assert not face.any(), seed


def test_confusers_are_not_in_the_nodule_mask(small_cases: dict[int, ChestCase]) -> None:
    seen = 0
    for case in small_cases.values():
        for confuser in case.confusers:
            index = _centre_index(case, confuser.centre_lps)
            assert case.nodule_mask[index] == 0
            assert case.lung_mask[index]
            if confuser.kind == "micronodule":
                assert MICRONODULE_DIAMETER[0] <= confuser.diameter_mm < 3.0
            seen += 1
    assert seen > 0


def test_annotations_use_the_documented_vocabulary(small_cases: dict[int, ChestCase]) -> None:
    nodules = [n for case in small_cases.values() for n in case.nodules]
    assert {n.kind for n in nodules} == set(NODULE_KINDS)
    assert {n.location for n in nodules} == set(LOCATIONS)
    kinds = {c.kind for case in small_cases.values() for c in case.confusers}
    assert kinds == {"micronodule", "vessel-crossing"}
    for n in nodules:
        assert SMALL.nodule_diameter_range[0] <= n.diameter_mm <= SMALL.nodule_diameter_range[1]


def test_diameters_skew_small_like_screening_data(small_cases: dict[int, ChestCase]) -> None:
    diameters = [n.diameter_mm for case in small_cases.values() for n in case.nodules]
    assert np.median(diameters) < 9.0


def test_nodule_attenuation_follows_its_kind(small_cases: dict[int, ChestCase]) -> None:
    for case in small_cases.values():
        image = case.volume.array
        for nodule in case.nodules:
            if nodule.diameter_mm < 8:  # small ones are diluted by partial volume
                continue
            core = ndimage.binary_erosion(case.nodule_mask == nodule.label)
            if not core.any():
                continue
            mean = float(image[core].mean())
            if nodule.kind == "solid":
                assert -200 < mean < 120, nodule
            elif nodule.kind == "ground-glass":
                assert -750 < mean < -200, nodule


def test_juxta_pleural_nodules_touch_the_lung_wall(small_cases: dict[int, ChestCase]) -> None:
    found = 0
    for case in small_cases.values():
        wall = case.lung_mask & ~ndimage.binary_erosion(case.lung_mask, iterations=2)
        for nodule in case.nodules:
            if nodule.location == "juxta-pleural":
                near = ndimage.binary_dilation(case.nodule_mask == nodule.label, iterations=2)
                assert (near & wall & ~(case.nodule_mask > 0)).any() or (
                    near & ~case.lung_mask
                ).any(), nodule
                found += 1
    assert found > 0


def test_a_given_fov_centre_centres_the_grid() -> None:
    probe = generate_chest_ct(2, SMALL)
    centre = tuple(probe.volume.meta["fov_centre_lps"])
    config = dataclasses.replace(SMALL, fov_centre_lps=centre, n_nodules_range=(1, 1))
    case = generate_chest_ct(2, config)
    assert np.allclose(case.volume.meta["fov_centre_lps"], centre)


def test_small_crops_hold_nodules_up_to_half_their_shortest_side() -> None:
    config = ChestConfig(matrix=64, n_slices=24)  # default diameters, 3-30 mm
    for seed in range(4):
        case = generate_chest_ct(seed, config)
        shortest = min(np.asarray(case.volume.shape[1:]) - 1) * case.volume.spacing[1]
        shortest = min(shortest, (case.volume.shape[0] - 1) * case.volume.spacing[0])
        assert case.nodules
        for nodule in case.nodules:
            assert 3.0 <= nodule.diameter_mm <= shortest / 2
            assert case.nodule_mask[_centre_index(case, nodule.centre_lps)] == nodule.label


def test_nodules_too_big_for_the_field_of_view_are_an_error() -> None:
    config = ChestConfig(matrix=32, n_slices=16, nodule_diameter_range=(28.0, 30.0))
    with pytest.raises(RuntimeError, match="no room for nodules of 28.0 mm"):
        generate_chest_ct(0, config)


@pytest.mark.parametrize(
    "field, value",
    [
        ("matrix", 8),
        ("n_slices", 0),
        ("pixel_spacing_range", (0.9, 0.6)),
        ("slice_thickness_range", (0.0, 1.0)),
        ("n_nodules_range", (2, 1)),
        ("nodule_diameter_range", (0.5, 3.0)),
        ("render_threads", -1),
    ],
)
def test_bad_config_values_are_rejected_by_name(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ChestConfig(**{field: value})
