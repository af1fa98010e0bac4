"""Lesions of the widened chest generator: juxta-vascular nodules at vessel branchings and
(peribronchial) at airway walls where the airways divide, and the false-positive look-alikes
(calcified granulomas, scars) with their CSV semantics."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest

from medssl.datasets.luna16 import Luna16
from medssl.synth.chest import FAMILIES, ChestConfig, generate_chest_ct
from medssl.synth.chest_anatomy import AIRWAY_WALL, Tubes, draw_anatomy, draw_trees
from medssl.synth.chest_scanner import draw_scanner, place_grid
from medssl.synth.datasets import UNLABELED_TRUTH, write_chest_dataset
from medssl.synth.nodules import (
    CONFUSER_KINDS,
    GRANULOMA_DIAMETER,
    LOOKALIKE_KINDS,
    SCAR_LENGTH,
    Lesion,
    place_lesions,
)

SMALL = ChestConfig(matrix=96, n_slices=48, nodule_diameter_range=(3.0, 12.0))
#: The realistic 512 x 512 full-chest geometry (placement only: nothing is rendered).
WIDE = ChestConfig(nodule_diameter_range=(3.0, 20.0))


def _placed(
    seed: int,
    config: ChestConfig = SMALL,
    *,
    airway_share: float | None = None,
    with_airways: bool = True,
) -> tuple[list[Lesion], Tubes, Tubes]:
    """Place four juxta-vascular nodules the way :func:`generate_chest_ct` does:

    ``(nodules, vessels, airways)``. ``airway_share`` None: the call without airways
    (as before they could hold nodules); else passed on, with the airways if ``with_airways``.
    """
    rng = np.random.default_rng(seed)
    scanner = draw_scanner(rng, config)
    anatomy = draw_anatomy(rng, scanner.patient_size, fat_mm=scanner.fat_mm)
    grid, _ = place_grid(rng, config, scanner, anatomy)
    sx, _, sz = grid.spacing_xyz
    vessels, airways = draw_trees(anatomy, rng, sx, sz)
    args = (anatomy, grid, vessels, rng, 4, config.nodule_diameter_range, 0)
    if airway_share is None:
        nodules, _, _ = place_lesions(*args, location_shares=(0.0, 0.0, 1.0))
    else:
        nodules, _, _ = place_lesions(
            *args,
            location_shares=(0.0, 0.0, 1.0),
            airways=airways if with_airways else None,
            airway_share=airway_share,
        )
    return nodules, vessels, airways


def _juxta_vascular(seed: int) -> tuple[list[Lesion], Tubes]:
    nodules, vessels, _ = _placed(seed)
    return nodules, vessels


def test_juxta_vascular_nodules_touch_a_vessel_often_where_it_branches() -> None:
    touching = at_branching = total = 0
    for seed in range(10):
        nodules, v = _juxta_vascular(seed)
        fork_at, fork_r = v.branchings()
        for nodule in nodules:
            if nodule.record.location != "juxta-vascular":
                continue
            c, r = nodule.centre, nodule.record.diameter_mm / 2
            ab = v.end - v.start
            t = np.clip(((c - v.start) * ab).sum(1) / np.maximum((ab * ab).sum(1), 1e-9), 0, 1)
            gap = np.linalg.norm(v.start + t[:, None] * ab - c, axis=1) - (v.r0 + t * (v.r1 - v.r0))
            touching += gap.min() < r  # the nodule overlaps a vessel
            to_fork = np.linalg.norm(fork_at - c, axis=1) - fork_r
            at_branching += to_fork.min() <= 0.85 * r + 1e-6
            total += 1
    assert total >= 30 and touching == total
    assert at_branching >= 0.55 * total  # ~0.35 when placed along segments only


def _airway_contact(nodule: Lesion, airways: Tubes) -> tuple[float, float, float]:
    """``(to_wall, to_lumen, to_fork)`` mm from the nodule's mean surface (a sphere of half its

    designed diameter) to the nearest airway wall's outer surface and lumen surface
    (negative: overlapping), and to the outer wall around the nearest airway branching.
    """
    r = nodule.record.diameter_mm / 2
    dist, lumen = airways.axis_distance(nodule.centre[None])
    scale, offset = AIRWAY_WALL
    fork_at, fork_r = airways.branchings()
    to_fork = np.linalg.norm(fork_at - nodule.centre, axis=1) - (fork_r * scale + offset)
    return (
        float((dist - (lumen * scale + offset)).min()) - r,
        float((dist - lumen).min()) - r,
        float(to_fork.min()) - r,
    )


def test_peribronchial_nodules_abut_an_airway_wall_where_it_divides() -> None:
    contacts, attached = [], []
    for seed in range(8):
        nodules, _, airways = _placed(seed, WIDE, airway_share=1.0)
        for nodule in nodules:
            assert nodule.record.location == "juxta-vascular"  # the 3 locations stay
            attached.append(nodule.record.attached_to)
            if nodule.record.attached_to == "airway":
                contacts.append(_airway_contact(nodule, airways))
    assert len(attached) == 32 and set(attached) <= {"airway", "vessel"}
    assert attached.count("airway") >= 0.9 * len(attached)
    to_wall, to_lumen, to_fork = np.array(contacts).T
    assert to_wall.max() <= 1.0  # every one touches (here: reaches into) a wall
    assert to_lumen.min() >= -0.05  # and stays out of the lumen
    assert np.mean(to_fork <= 1.0) >= 0.8  # next to where the airway divides


def test_without_airway_share_juxta_vascular_nodules_keep_off_the_airways() -> None:
    """The contrast the test above needs (today's juxta-vascular placement touches airways
    by chance only), and ``airway_share=0`` draws nothing more: earlier outputs stay."""
    touching = total = 0
    for seed in range(8):
        nodules, _, airways = _placed(seed, WIDE, airway_share=0.0)
        plain, _, _ = _placed(seed, WIDE)
        assert [n.record for n in nodules] == [n.record for n in plain]
        for nodule in nodules:
            assert nodule.record.attached_to == "vessel"
            touching += _airway_contact(nodule, airways)[0] <= 1.0
            total += 1
    assert total == 32 and touching <= 0.25 * total


def test_airway_share_is_validated_and_set_per_family() -> None:
    with pytest.raises(ValueError, match="airway_share"):
        ChestConfig(airway_share=1.5)
    with pytest.raises(ValueError, match="airway_share"):
        _placed(0, airway_share=-0.1)
    with pytest.raises(ValueError, match="airway_share"):
        _placed(0, airway_share=0.5, with_airways=False)
    assert ChestConfig().airway_share == 0.25
    assert ChestConfig.for_family("heldout").airway_share == FAMILIES["heldout"]["airway_share"]


def test_peribronchial_scans_are_reproducible() -> None:
    config = dataclasses.replace(
        SMALL,
        airway_share=1.0,
        location_shares=(0.0, 0.0, 1.0),
        n_nodules_range=(2, 2),
        render_threads=2,
    )
    a, b = (generate_chest_ct(3, config) for _ in range(2))
    assert [n.attached_to for n in a.nodules].count("airway") >= 1
    assert a.nodules == b.nodules
    assert np.array_equal(a.volume.array, b.volume.array)
    assert np.array_equal(a.nodule_mask, b.nodule_mask)


@pytest.fixture(scope="module")
def with_lookalikes() -> list:
    config = dataclasses.replace(
        SMALL, n_lookalikes_range=(4, 4), slice_thickness_range=(0.625, 0.625)
    )
    return [generate_chest_ct(seed, config) for seed in range(4)]


def test_granulomas_are_dense_and_small_and_scars_are_long_bands(with_lookalikes) -> None:
    kinds = [c.kind for case in with_lookalikes for c in case.lookalikes]
    assert set(kinds) == set(LOOKALIKE_KINDS) and len(kinds) >= 12
    for case in with_lookalikes:
        image = case.volume.array
        for look in case.lookalikes:
            z, y, x = np.rint(case.volume.world_to_index(look.centre_lps)).astype(int)
            near = image[max(z - 1, 0) : z + 2, y - 1 : y + 2, x - 1 : x + 2]
            if look.kind == "granuloma":
                assert GRANULOMA_DIAMETER[0] <= look.diameter_mm <= GRANULOMA_DIAMETER[1]
                assert near.max() > 200  # calcified
            else:
                assert SCAR_LENGTH[0] <= look.diameter_mm <= SCAR_LENGTH[1]
                assert near.max() > -400  # a soft-tissue band in aerated lung
            assert case.nodule_mask[z, y, x] == 0  # not a nodule
            assert case.lung_mask[z, y, x]


def test_lookalikes_are_neither_nodules_nor_excluded_findings(with_lookalikes) -> None:
    for case in with_lookalikes:
        assert {c.kind for c in case.confusers} <= set(CONFUSER_KINDS)
        centres = {n.centre_lps for n in case.nodules} | {c.centre_lps for c in case.confusers}
        assert not centres & {c.centre_lps for c in case.lookalikes}


def test_no_lookalikes_when_the_range_is_zero() -> None:
    case = generate_chest_ct(0, dataclasses.replace(SMALL, n_lookalikes_range=(0, 0)))
    assert case.lookalikes == []
    with pytest.raises(ValueError, match="granuloma_share"):
        ChestConfig(granuloma_share=2.0)
    with pytest.raises(ValueError, match="n_lookalikes_range"):
        ChestConfig(n_lookalikes_range=(3, 1))


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_lookalikes_are_written_as_false_positive_candidates_not_annotations(tmp_path) -> None:
    out = tmp_path / "luna"
    write_chest_dataset(out, cases=3, unlabeled=1, matrix=64, n_slices=40, seed=11)
    looks = _rows(out / "lookalikes.csv")
    luna = Luna16(out)
    assert looks, "seeds 11-13 draw look-alikes"
    key = {(r["seriesuid"], round(float(r["coordX"]), 2)) for r in looks}
    annotated = {
        (f.series_uid, round(f.centre_lps[0], 2)) for f in luna.annotations() + luna.excluded()
    }
    assert not key & annotated
    negatives = {
        (f.series_uid, round(f.centre_lps[0], 2)) for f, cls in luna.candidates() if cls == 0
    }
    assert key <= negatives
    for name in UNLABELED_TRUTH:
        assert (out / "unlabeled" / name).is_file()
