"""The HU lung mask: synthetic chests (targeted and full field of view), abdomens, errors."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.pipeline.lungmask import LungMaskParams, lung_mask
from medssl.synth.chest import ChestConfig, generate_chest_ct
from medssl.synth.organ_anatomy import sample_anatomy
from medssl.synth.organ_raster import rasterise
from medssl.synth.organ_scene import Tissue
from medssl.synth.organs import generate_organ_phantom, organ_grid

TIGHT = LungMaskParams(margin_mm=0.0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def centres_inside(case, mask: np.ndarray) -> list[tuple[str, bool]]:
    out = []
    for nodule in case.nodules:
        index = np.round(case.volume.world_to_index(np.asarray(nodule.centre_lps))).astype(int)
        out.append((nodule.location, bool(mask[tuple(index)])))
    return out


@pytest.fixture(scope="module")
def targeted_cases():
    config = ChestConfig(matrix=128, n_slices=60, n_nodules_range=(3, 6))
    return [generate_chest_ct(seed, config) for seed in range(4)]


def test_every_nodule_centre_of_targeted_reconstructions_is_inside_the_mask(targeted_cases):
    locations = []
    for case in targeted_cases:
        assert case.volume.meta["targeted"]
        mask = lung_mask(case.volume)
        inside = centres_inside(case, mask)
        assert all(ok for _, ok in inside), inside
        assert (mask & case.lung_mask).sum() >= 0.99 * case.lung_mask.sum()
        locations += [loc for loc, _ in inside]
    assert "juxta-pleural" in locations  # the hard case is exercised


def test_the_lung_touching_a_targeted_field_of_view_is_kept_not_taken_for_outside_air(targeted_cases):
    for case in targeted_cases:
        mask = lung_mask(case.volume, params=TIGHT)
        border = np.concatenate([mask[:, [0, -1], :].ravel(), mask[:, :, [0, -1]].ravel()])
        truth = np.concatenate([case.lung_mask[:, [0, -1], :].ravel(),
                                case.lung_mask[:, :, [0, -1]].ravel()])
        assert truth.mean() > 0.2  # the lung fills much of the field's border
        assert (border & truth).sum() >= 0.95 * truth.sum()
        assert dice(mask, case.lung_mask) > 0.93


def test_a_full_field_of_view_keeps_both_lungs_and_leaves_out_outside_air_and_the_table():
    case = generate_chest_ct(1, ChestConfig(matrix=512, n_slices=60, n_nodules_range=(3, 6)))
    assert not case.volume.meta["targeted"]
    tight = lung_mask(case.volume, params=TIGHT)
    assert dice(tight, case.lung_mask) > 0.95
    assert (tight & ~case.lung_mask).sum() < 0.05 * case.lung_mask.sum()  # no table foam
    mask = lung_mask(case.volume)
    assert all(ok for _, ok in centres_inside(case, mask)), centres_inside(case, mask)


def test_the_margin_grows_the_mask_by_millimetres():
    case = generate_chest_ct(0, ChestConfig(matrix=128, n_slices=40))
    tight = lung_mask(case.volume, params=TIGHT)
    wide = lung_mask(case.volume, params=LungMaskParams(margin_mm=8.0))
    assert np.all(wide[tight]) and wide.sum() > tight.sum()


def test_an_array_with_spacing_gives_the_same_mask_as_the_volume():
    case = generate_chest_ct(2, ChestConfig(matrix=96, n_slices=40))
    np.testing.assert_array_equal(
        lung_mask(case.volume.array, case.volume.spacing), lung_mask(case.volume)
    )


@pytest.mark.parametrize("domain, seed", [("ct", 0), ("A", 1), ("D", 1)])
def test_an_abdomen_without_lungs_gives_an_empty_mask(domain, seed):
    case = generate_organ_phantom(seed, domain)
    _, axes = organ_grid(domain)
    lung_slices = np.flatnonzero((rasterise(sample_anatomy(seed), axes).tissue == Tissue.LUNG).any(axis=(1, 2)))
    below = case.image.array[: lung_slices.min() - 2]
    assert (below < -400).sum() > 1000  # bowel gas and outside air are there to be rejected
    mask = lung_mask(below, case.image.spacing)
    assert mask.shape == below.shape and not mask.any()


def test_the_lung_bases_of_an_abdomen_are_found():
    case = generate_organ_phantom(0, "ct")
    _, axes = organ_grid("ct")
    lung = rasterise(sample_anatomy(0), axes).tissue == Tissue.LUNG
    mask = lung_mask(case.image)
    assert (mask & lung).sum() > 0.95 * lung.sum()


@pytest.mark.parametrize("fill", [-1000.0, 0.0])
def test_air_alone_or_water_alone_has_no_lung(fill):
    assert not lung_mask(np.full((30, 40, 40), fill, np.float32), (2.0, 2.0, 2.0)).any()


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((np.zeros((4, 4, 4)),), {}, "needs spacing"),
        ((np.zeros((4, 4)), (1, 1)), {}, "3D"),
        ((np.zeros((4, 4, 4)), (1, 0, 1)), {}, "positive"),
        ((np.full((4, 4, 4), np.nan), (1, 1, 1)), {}, "finite"),
    ],
)
def test_bad_inputs_are_named(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lung_mask(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"air_hu": -300.0}, "below threshold_hu"), ({"margin_mm": -1.0}, "margin_mm"),
     ({"second_fraction": 2.0}, "second_fraction"), ({"work_mm": float("nan")}, "work_mm")],
)
def test_invalid_lung_mask_params_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LungMaskParams(**kwargs)
