"""The widened chest generator: families and their seeds, thickness, kernels and noise,
habitus, contrast, nodule location and kind shares, and the unlabeled pool's hidden truth."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
from click.testing import CliRunner

from medssl.cli.main import cli
from medssl.datasets.luna16 import Luna16
from medssl.synth.chest import (
    FAMILIES,
    SEED_SPAN,
    ChestConfig,
    generate_chest_ct,
)
from medssl.synth.chest_anatomy import ScanGrid, draw_anatomy, draw_trees
from medssl.synth.chest_scanner import draw_scanner, place_grid
from medssl.synth.datasets import chest_series_info, write_chest_dataset
from medssl.synth.nodules import place_lesions
from medssl.synth.primitives import kernel_blur, scanner_noise

#: A small targeted field of view (~70 mm): fast enough for several seeds.
SMALL = ChestConfig(matrix=96, n_slices=48, nodule_diameter_range=(3.0, 12.0))
#: The whole chest at a coarse pixel (heart, mediastinum and body wall in view).
WHOLE = ChestConfig(
    matrix=96,
    n_slices=40,
    pixel_spacing_range=(4.0, 4.0),
    slice_thickness_range=(2.5, 2.5),
    nodule_diameter_range=(3.0, 10.0),
)


def _scanners(config: ChestConfig, n: int = 400) -> list:
    rng = np.random.default_rng(123)
    return [draw_scanner(rng, config) for _ in range(n)]


# -- families ---------------------------------------------------------------------------------


def test_the_default_config_is_the_train_family() -> None:
    assert ChestConfig.for_family("train") == ChestConfig()
    assert ChestConfig().family == "train" and ChestConfig().seed_offset == 0


def test_families_draw_from_different_ranges() -> None:
    train, heldout = ChestConfig.for_family("train"), ChestConfig.for_family("heldout")
    changed = [
        f.name
        for f in dataclasses.fields(ChestConfig)
        if getattr(train, f.name) != getattr(heldout, f.name)
    ]
    for name in (
        "pixel_spacing_range",
        "slice_thickness_range",
        "noise_sigma_range",
        "kernel_fwhm_range",
        "edge_enhance_range",
        "patient_size_range",
        "fat_mm_range",
        "contrast_share",
        "location_shares",
        "kind_shares",
    ):
        assert name in changed
    a, b = _scanners(train), _scanners(heldout)
    assert max(s.thickness for s in b) > max(s.thickness for s in a)
    assert max(s.noise_sigma for s in b) > max(s.noise_sigma for s in a)
    assert max(s.fat_mm for s in b) > max(s.fat_mm for s in a)
    assert np.mean([s.contrast_hu is not None for s in b]) > np.mean(
        [s.contrast_hu is not None for s in a]
    )


def test_families_never_share_a_seed_and_record_it() -> None:
    heldout = dataclasses.replace(SMALL, family="heldout")
    a = generate_chest_ct(
        0, dataclasses.replace(heldout, **{k: getattr(SMALL, k) for k in FAMILIES["heldout"]})
    )  # the same ranges, other seeds
    b = generate_chest_ct(0, SMALL)
    assert a.volume.meta["rng_seed"] == SEED_SPAN and b.volume.meta["rng_seed"] == 0
    assert a.volume.meta["family"] == "heldout" and b.volume.meta["family"] == "train"
    assert a.nodules != b.nodules
    assert a.volume.shape != b.volume.shape or not np.array_equal(a.volume.array, b.volume.array)


def test_a_seed_outside_the_family_span_is_rejected() -> None:
    with pytest.raises(ValueError, match="seed must be in"):
        generate_chest_ct(SEED_SPAN, SMALL)
    with pytest.raises(ValueError, match="family"):
        ChestConfig(family="test")
    with pytest.raises(ValueError, match="family"):
        ChestConfig.for_family("validation")


def test_a_family_with_every_new_feature_is_bit_identical_for_a_seed() -> None:
    config = ChestConfig.for_family(
        "heldout",
        matrix=64,
        n_slices=32,
        sharp_kernel_share=1.0,
        contrast_share=1.0,
        motion_share=1.0,
        n_lookalikes_range=(3, 3),
        nodule_diameter_range=(3.0, 10.0),
    )
    a = generate_chest_ct(7, config)
    b = generate_chest_ct(7, dataclasses.replace(config, render_threads=1))
    assert np.array_equal(a.volume.array, b.volume.array)
    assert np.array_equal(a.nodule_mask, b.nodule_mask)
    assert a.nodules == b.nodules and a.confusers == b.confusers
    assert a.lookalikes == b.lookalikes and a.lookalikes
    assert a.volume.meta == b.volume.meta
    assert a.volume.meta["edge_enhance"] > 0 and a.volume.meta["contrast_hu"] is not None
    assert a.volume.meta["motion_mm"] > 0


# -- scanner ----------------------------------------------------------------------------------


def test_the_heldout_thickness_spans_0_6_to_3_mm() -> None:
    thick = {s.thickness for s in _scanners(ChestConfig.for_family("heldout"))}
    assert min(thick) == 0.6 and max(thick) == 3.0
    assert all(0.6 <= t <= 3.0 for t in thick)
    train = {s.thickness for s in _scanners(ChestConfig())}
    assert all(0.625 <= t <= 2.5 for t in train)


def test_a_sharp_kernel_overshoots_at_an_edge_and_a_smooth_one_does_not() -> None:
    step = np.full((1, 8, 64), -850.0, dtype=np.float32)
    step[:, :, 32:] = 40.0  # lung next to soft tissue
    smooth = kernel_blur(step, 1.0, (1.0, 0.5, 0.5))
    sharp = kernel_blur(step, 1.0, (1.0, 0.5, 0.5), edge_enhance=0.6)
    assert smooth.max() <= 40.0 + 1e-3 and smooth.min() >= -850.0 - 1e-3
    assert sharp.max() > 40.0 + 50 and sharp.min() < -850.0 - 50  # bright and dark rims
    assert sharp[0, 0, 0] == pytest.approx(-850.0) and sharp[0, 0, -1] == pytest.approx(40.0)
    with pytest.raises(ValueError, match="edge_enhance"):
        kernel_blur(step, 1.0, (1.0, 0.5, 0.5), edge_enhance=-0.1)


def test_a_sharp_kernel_gives_finer_noise_of_the_same_sigma() -> None:
    def neighbour_correlation(noise: np.ndarray) -> float:
        return float(np.corrcoef(noise[:, :, :-1].ravel(), noise[:, :, 1:].ravel())[0, 1])

    smooth = scanner_noise((2, 128, 128), 40.0, np.random.default_rng(0))
    sharp = scanner_noise((2, 128, 128), 40.0, np.random.default_rng(0), edge_enhance=0.8)
    assert smooth.std() == pytest.approx(40.0, rel=1e-3)
    assert sharp.std() == pytest.approx(40.0, rel=1e-3)
    assert neighbour_correlation(sharp) < neighbour_correlation(smooth) - 0.1


def test_sharp_kernels_are_drawn_at_their_share_and_named_lung() -> None:
    scanners = _scanners(ChestConfig(sharp_kernel_share=0.5))
    sharp = [s for s in scanners if s.edge_enhance > 0]
    assert 0.4 < len(sharp) / len(scanners) < 0.6
    assert all(0.2 <= s.edge_enhance <= 0.7 and s.kernel_name == "LUNG" for s in sharp)
    case = generate_chest_ct(1, dataclasses.replace(SMALL, sharp_kernel_share=1.0))
    assert case.volume.meta["kernel"] == "LUNG" and case.volume.meta["edge_enhance"] > 0


def test_low_dose_noise_reaches_80_hu_and_grows_with_the_patient() -> None:
    scanners = _scanners(ChestConfig.for_family("heldout"))
    noise = np.array([s.noise_sigma for s in scanners])
    size = np.array([s.patient_size for s in scanners])
    assert noise.max() > 75 and noise.min() >= 15 and noise.max() <= 80
    assert np.corrcoef(noise, size)[0, 1] > 0.2


# -- patient ----------------------------------------------------------------------------------


def _body_width_mm(config: ChestConfig) -> float:
    case = generate_chest_ct(4, dataclasses.replace(config, pixel_spacing_range=(5.0, 5.0)))
    z, y, _ = np.argwhere(case.lung_mask).mean(axis=0).astype(int)
    row = case.volume.array[z, y]  # across both lungs, above the table
    columns = np.flatnonzero(row > -500)
    return float(columns[-1] - columns[0]) * case.volume.spacing[2]


def test_an_obese_habitus_has_a_wider_body() -> None:
    lean = _body_width_mm(dataclasses.replace(WHOLE, fat_mm_range=(6.0, 6.0)))
    obese = _body_width_mm(dataclasses.replace(WHOLE, fat_mm_range=(55.0, 55.0)))
    assert obese > lean + 2 * 40.0  # 49 mm more fat on each side, times the patient's size


def test_contrast_raises_the_blood_and_the_lung_vessels() -> None:
    plain = dataclasses.replace(WHOLE, contrast_share=0.0, contrast_hu_range=(300.0, 300.0))
    enhanced = dataclasses.replace(plain, contrast_share=1.0)
    a, b = generate_chest_ct(2, plain), generate_chest_ct(2, enhanced)
    assert a.volume.meta["contrast_hu"] is None and b.volume.meta["contrast_hu"] == 300.0
    rise = b.volume.array - a.volume.array  # same draws, same noise: only contrast
    assert rise.max() > 200  # the heart and great vessels
    vessels = a.lung_mask & (a.volume.array > -300) & (a.nodule_mask == 0)
    assert vessels.sum() > 50
    assert rise[vessels].mean() > 50  # pulmonary vessels enhance too
    assert np.abs(rise[:, 0, :]).max() < 1e-3  # nothing changes in the air in front


# -- nodules ----------------------------------------------------------------------------------


def _placed_locations(config: ChestConfig, seeds: range) -> list[str]:
    """Nodule locations as :func:`generate_chest_ct` places them (4 per scan), unrendered."""
    locations = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        scanner = draw_scanner(rng, config)
        anatomy = draw_anatomy(rng, scanner.patient_size, fat_mm=scanner.fat_mm)
        grid, _ = place_grid(rng, config, scanner, anatomy)
        sx, _, sz = grid.spacing_xyz
        vessels, _ = draw_trees(anatomy, rng, sx, sz)
        nodules, _, _ = place_lesions(
            anatomy,
            grid,
            vessels,
            rng,
            4,
            config.nodule_diameter_range,
            0,
            location_shares=config.location_shares,
        )
        locations += [n.record.location for n in nodules]
    return locations


def test_location_shares_decide_where_nodules_lie() -> None:
    # at the full 512 x 512 geometry: a small crop may have no pleura for a nodule to touch
    for k, location in enumerate(("juxta-pleural", "juxta-vascular")):
        shares = [0.0, 0.0, 0.0]
        shares[k + 1] = 1.0
        placed = _placed_locations(ChestConfig(location_shares=tuple(shares)), range(5))
        assert placed.count(location) >= 0.9 * len(placed)
    placed = _placed_locations(ChestConfig(), range(10))  # 45 / 30 / 25 %
    assert 0.2 <= placed.count("juxta-pleural") / len(placed) <= 0.45
    assert 0.15 <= placed.count("juxta-vascular") / len(placed) <= 0.4


def test_kind_shares_decide_the_nodule_kinds() -> None:
    config = dataclasses.replace(SMALL, n_nodules_range=(3, 3), kind_shares=(0.0, 0.0, 1.0))
    kinds = {n.kind for s in range(3) for n in generate_chest_ct(s, config).nodules}
    assert kinds == {"ground-glass"}


@pytest.mark.parametrize(
    "field, value",
    [
        ("location_shares", (0.5, 0.5, 0.5)),
        ("kind_shares", (1.0, 0.0)),
        ("contrast_share", 1.5),
        ("sharp_kernel_share", -0.1),
        ("fat_mm_range", (0.0, 10.0)),
        ("contrast_hu_range", (300.0, 150.0)),
    ],
)
def test_bad_new_config_values_are_rejected_by_name(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ChestConfig(**{field: value})


# -- datasets ---------------------------------------------------------------------------------


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_the_unlabeled_pool_has_hidden_truth_the_split_does_not_read(tmp_path) -> None:
    from medssl.training.detection.scans import split_luna16

    out = tmp_path / "luna"
    write_chest_dataset(out, cases=2, unlabeled=2, matrix=64, n_slices=32, seed=3)
    truth = _rows(out / "unlabeled" / "truth_annotations.csv")
    excluded = _rows(out / "unlabeled" / "truth_annotations_excluded.csv")
    pool = {p.stem for p in (out / "unlabeled").glob("*.mhd")}
    assert len(pool) == 2 and {r["seriesuid"] for r in truth} == pool  # every scan has a nodule
    assert {r["seriesuid"] for r in excluded} <= pool
    labeled = {r["seriesuid"] for r in _rows(out / "annotations.csv")}
    assert not labeled & pool
    split = split_luna16(
        out, n_labeled=1, n_unlabeled=10, test_subsets=(), n_validation=0, split_seed=0
    )
    names = {s.key for s in split.unlabeled}
    assert pool <= names and not any("truth" in n for n in names)


def test_the_cli_family_option_writes_the_heldout_family(tmp_path) -> None:
    train, heldout = tmp_path / "train", tmp_path / "heldout"
    for out, family in ((train, "train"), (heldout, "heldout")):
        result = CliRunner().invoke(
            cli,
            [
                "synth",
                "chest",
                "--cases",
                "1",
                "--matrix",
                "48",
                "--slices",
                "24",
                "--family",
                family,
                str(out),
            ],
        )
        assert result.exit_code == 0, result.output
    a, b = Luna16(train), Luna16(heldout)
    assert set(a.seriesuids).isdisjoint(b.seriesuids)  # other seeds, so other UIDs
    case = generate_chest_ct(0, ChestConfig.for_family("heldout", matrix=48, n_slices=24))
    assert b.seriesuids == [chest_series_info(SEED_SPAN, case).uid("series")]


# -- breathing motion -------------------------------------------------------------------------


def test_a_breathing_grid_shows_shifted_levels_and_finds_them_again() -> None:
    still = ScanGrid((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (6, 4, 4))
    shift = (0.0, 0.5, 1.0, -2.5, -2.5, 0.0)  # slice 3 shows level 0.5: a level shown twice
    moving = dataclasses.replace(still, z_shift=shift)
    assert np.allclose(moving.axes()[2].ravel(), [0.0, 1.5, 3.0, 0.5, 1.5, 5.0])
    assert np.allclose(moving.axes()[0], still.axes()[0])  # in-plane unchanged
    assert np.array_equal(moving.box(), still.box()) and moving.motion_mm == 2.5
    assert moving.index_slices(np.array([0, 0, 1.2]), np.array([3, 3, 1.8]))[0] == slice(1, 5)
    assert still.index_slices(np.array([0, 0, 1.2]), np.array([3, 3, 1.8])) is None
    assert moving.apparent_z(3.0) == pytest.approx(2.0)
    assert still.apparent_z(3.3) == 3.3
    with pytest.raises(ValueError, match="z_shift"):
        dataclasses.replace(still, z_shift=(0.0, 1.0))


def test_breathing_makes_a_nodule_span_other_slices_and_annotations_follow_it() -> None:
    still = ChestConfig(
        matrix=96,
        n_slices=48,
        nodule_diameter_range=(3.0, 12.0),
        slice_thickness_range=(1.0, 1.0),
        motion_share=0.0,
        motion_amplitude_range=(10.0, 10.0),
    )
    changed = 0
    for seed in range(2):
        a = generate_chest_ct(seed, still)
        b = generate_chest_ct(seed, dataclasses.replace(still, motion_share=1.0))
        assert a.volume.meta["motion_mm"] == 0 and b.volume.meta["motion_mm"] == 10.0
        assert np.array_equal(a.volume.affine, b.volume.affine)  # same nominal slices
        for na, nb in zip(a.nodules, b.nodules):
            slices_a = (a.nodule_mask == na.label).any(axis=(1, 2)).sum()
            slices_b = (b.nodule_mask == nb.label).any(axis=(1, 2)).sum()
            changed += slices_a != slices_b
            # annotated where the moving patient shows it: the drawn nodule is around it
            z, y, x = np.rint(b.volume.world_to_index(nb.centre_lps)).astype(int)
            around = b.nodule_mask[max(z - 1, 0) : z + 2, y - 1 : y + 2, x - 1 : x + 2] == nb.label
            assert around.sum() >= 5, nb
    assert changed >= 2


def test_an_archive_of_the_heldout_family_uses_its_seeds(tmp_path) -> None:
    import pydicom

    from medssl.synth.archive import write_archive

    info = write_archive(tmp_path / "archive", 1, matrix=32, n_slices=8, family="heldout")
    first = pydicom.dcmread(sorted(info.good[0].glob("*.dcm"))[0])
    assert first.PatientID == f"SYN{SEED_SPAN:06d}"
