"""The HU lung mask: synthetic chests (targeted and full field of view), abdomens, errors."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pytest

from medssl.metrics.calibration import Calibration
from medssl.pipeline import DetectionParams, Intensity, detect, detect_preprocessed, prepare
from medssl.pipeline.lungmask import LungMaskParams, lung_mask
from medssl.pipeline.windows import plan_windows
from medssl.synth.chest import ChestConfig, generate_chest_ct
from medssl.synth.organ_anatomy import sample_anatomy
from medssl.synth.organ_raster import rasterise
from medssl.synth.organ_scene import Tissue
from medssl.synth.organs import generate_organ_phantom, organ_grid
from medssl.volume import Volume

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


def test_the_lung_touching_a_targeted_field_of_view_is_kept_not_taken_for_outside_air(
    targeted_cases,
):
    for case in targeted_cases:
        mask = lung_mask(case.volume, params=TIGHT)
        border = np.concatenate([mask[:, [0, -1], :].ravel(), mask[:, :, [0, -1]].ravel()])
        truth = np.concatenate(
            [case.lung_mask[:, [0, -1], :].ravel(), case.lung_mask[:, :, [0, -1]].ravel()]
        )
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
    lung_slices = np.flatnonzero(
        (rasterise(sample_anatomy(seed), axes).tissue == Tissue.LUNG).any(axis=(1, 2))
    )
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
    [
        ({"air_hu": -300.0}, "below threshold_hu"),
        ({"margin_mm": -1.0}, "margin_mm"),
        ({"second_fraction": 2.0}, "second_fraction"),
        ({"work_mm": float("nan")}, "work_mm"),
    ],
)
def test_invalid_lung_mask_params_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LungMaskParams(**kwargs)


# -- detect restricted to the lungs ---------------------------------------------------------


class GridRunner:
    """Fake detector: 27 boxes per window on a 3 x 3 x 3 grid of the window, score 0.5.

    Records how many windows it saw."""

    def __init__(self, score: float = 0.5):
        self.windows = 0
        self.score = score

    def __call__(self, patches):
        n, edge = len(patches), patches.shape[-1]
        axis = np.array([edge / 6, edge / 2, 5 * edge / 6])
        centres = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        boxes = np.concatenate([centres, np.full((len(centres), 1), 6.0)], axis=1)
        self.windows += n
        return (
            np.broadcast_to(boxes, (n, *boxes.shape)).astype(np.float32),
            np.full((n, len(boxes)), self.score, np.float32),
        )


def hu_of(prepared, intensity):
    """Preprocessed values back to HU (the inverse of Intensity.apply inside its window)."""
    return intensity.hu_min + (prepared.array + 1.0) * (intensity.hu_max - intensity.hu_min) / 2.0


@pytest.fixture(scope="module")
def chest_1mm():
    """A full-field chest on a 1 mm grid (as the detector sees it) and its grid mask."""
    case = generate_chest_ct(
        5,
        ChestConfig(
            matrix=256,
            pixel_spacing_range=(1.0, 1.0),
            slice_thickness_range=(2.5, 2.5),
            n_slices=56,
        ),
    )
    assert not case.volume.meta["targeted"]
    return case


def test_detect_with_the_lung_mask_skips_windows_without_lung_and_drops_boxes_outside(chest_1mm):
    p = DetectionParams(window=64, overlap=0.25, max_detections=1000, nms_iou=0.5, lung_mask=True)
    prepared = prepare(chest_1mm.volume, p)
    mask = lung_mask(hu_of(prepared, p.normalisation), prepared.spacing)
    starts = plan_windows(prepared.shape, p.window, p.overlap)
    touching = [s for s in starts if mask[tuple(slice(a, a + 64) for a in s)].any()]
    assert 0 < len(touching) < len(starts)

    plain_runner, masked_runner = GridRunner(), GridRunner()
    plain = detect_preprocessed(prepared, plain_runner, replace(p, lung_mask=False))
    masked = detect_preprocessed(prepared, masked_runner, p)

    assert masked.n_windows == masked_runner.windows == len(touching)
    assert masked.n_windows_skipped == len(starts) - len(touching)
    assert plain.n_windows == len(starts) and plain.n_windows_skipped == 0
    assert masked.timings["lung_mask"] > 0 and not masked.warnings

    def inside(result):
        voxels = np.rint([d.centre_voxel for d in result.detections]).astype(int)
        return mask[tuple(voxels.T)]

    assert inside(masked).all() and len(masked.detections) > 0
    assert not inside(plain).all()  # the fake detector fires outside the lungs too


def test_detect_on_a_scan_without_lungs_runs_every_window_and_says_why(caplog):
    volume = Volume(np.full((40, 64, 64), 40.0, np.float32), np.eye(4))  # soft tissue only
    runner = GridRunner()
    p = DetectionParams(window=32, overlap=0.25, max_detections=1000, lung_mask=True)
    with caplog.at_level(logging.WARNING, logger="medssl.pipeline.detect"):
        result = detect(volume, runner, p)
    plain = detect(volume, GridRunner(), replace(p, lung_mask=False))
    assert result.n_windows == runner.windows == plain.n_windows and result.n_windows_skipped == 0
    assert [d.centre_lps for d in result.detections] == [d.centre_lps for d in plain.detections]
    assert len(result.warnings) == 1 and "no lung found" in result.warnings[0]
    assert "no lung found" in caplog.text


def test_the_lung_mask_needs_an_intensity_window_holding_its_thresholds():
    with pytest.raises(
        ValueError, match=r"lung_mask needs the normalisation window.*\[-160.0, 240.0\]"
    ):
        DetectionParams(normalisation=Intensity(-160.0, 240.0, -160.0), lung_mask=True)
    DetectionParams(normalisation=Intensity(-160.0, 240.0, -160.0))  # fine without the mask


def test_old_cards_read_with_the_mask_off_and_the_identity_calibration():
    old = {
        "spacing_mm": 1.0,
        "window": 96,
        "divisor": 16,
        "overlap": 0.25,
        "batch_size": 2,
        "score_threshold": 0.01,
        "pre_nms_top_k": 1000,
        "max_nms_candidates": 100000,
        "nms_iou": 0.1,
        "max_detections": 100,
        "min_diameter_mm": 0.0,
        "intensity": {"hu_min": -1200.0, "hu_max": 600.0, "pad_hu": -1000.0},
    }
    params = DetectionParams.from_json(old)
    assert params.lung_mask is False and params.calibration.is_identity
    new = replace(
        params,
        lung_mask=True,
        lung_margin_mm=8.0,
        calibration=Calibration(method="platt", a=1.5, b=-0.25),
    )
    assert DetectionParams.from_json(json.loads(json.dumps(new.to_json()))) == new
    with pytest.raises(
        ValueError, match=r"DetectionParams.calibration: Calibration.a must be > 0.*-1.0"
    ):
        DetectionParams.from_json({**old, "calibration": {"method": "platt", "a": -1.0, "b": 0.0}})


def phantom_with_table() -> tuple[np.ndarray, np.ndarray]:
    """Air, a soft-tissue body with one block of lung (-850 HU, 216 mL), and under it a
    table whose foam core (-880 HU, larger than the lung) spans the field between two
    +300 HU shells. 2 mm voxels. Returns (HU, lung truth)."""
    hu = np.full((40, 100, 100), -1000.0, np.float32)
    _, y, x = np.ogrid[:40, :100, :100]
    hu[:, (((y - 45) / 38.0) ** 2 + ((x - 50) / 45.0) ** 2 <= 1)[0]] = 40.0
    lung = np.zeros(hu.shape, bool)
    lung[5:35, 30:60, 35:65] = True
    hu[lung] = -850.0
    hu[:, 86:88] = 300.0
    hu[:, 88:96] = -880.0
    hu[:, 96:98] = 300.0
    return hu, lung


def test_a_table_foam_core_near_outside_air_is_not_taken_for_a_lung():
    hu, lung = phantom_with_table()
    mask = lung_mask(hu, (2.0, 2.0, 2.0), params=TIGHT)
    assert not mask[:, 88:96].any()
    assert dice(mask, lung) > 0.95


def test_the_trachea_above_the_lungs_is_left_out():
    case = generate_chest_ct(
        0, ChestConfig(matrix=256, pixel_spacing_range=(1.0, 1.0), slice_thickness_range=(2.5, 2.5))
    )
    apex = int(np.flatnonzero(case.lung_mask.any(axis=(1, 2))).max())
    assert apex + 3 < case.volume.shape[0]  # the scan runs on above the lungs: the trachea
    kept = lung_mask(case.volume, params=LungMaskParams(margin_mm=0.0, drop_airways=False))
    assert kept[apex + 3 :].sum() > 500
    mask = lung_mask(case.volume, params=TIGHT)
    assert not mask[apex + 3 :].any()
    assert dice(mask, case.lung_mask) > 0.97
