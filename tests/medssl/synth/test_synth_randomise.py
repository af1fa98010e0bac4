"""SynthSeg-style domain randomisation of the organ phantom (``--domain rand``)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from medssl.cli.main import cli
from medssl.synth.organs import LABELS, generate_organ_phantom
from medssl.synth.randomise import DomainRandomisation, randomised_organ_phantom

LIVER = next(k for k, v in LABELS.items() if v == "liver")


def _volume_ml(case, code: int) -> float:
    return float((case.label.array == code).sum() * np.prod(case.label.spacing) / 1000.0)


def test_each_case_draws_its_own_grid_and_contrast_and_the_seed_repeats_it():
    a, b = randomised_organ_phantom(0), randomised_organ_phantom(1)
    assert not np.allclose(a.image.spacing, b.image.spacing)
    assert dict(a.domain.tissue_intensity) != dict(b.domain.tissue_intensity)
    again = generate_organ_phantom(0, "rand")
    np.testing.assert_array_equal(again.image.array, a.image.array)
    np.testing.assert_array_equal(again.label.array, a.label.array)
    assert a.image.meta["slice_thickness"] == pytest.approx(a.image.spacing[0])


def test_labels_stay_on_their_tissue_through_the_deformation():
    """The displacement moves tissue and label maps together: the liver label sits on voxels
    of the drawn liver intensity (noise and texture aside)."""
    ranges = DomainRandomisation(
        deformation_mm=(6.0, 6.0),
        noise_hu=(4.0, 4.0),
        texture_hu=(0.0, 0.0),
        blur_fwhm_mm=(1.0, 1.0),
        bias_strength=(0.0, 0.0),
        realistic_share=0.0,
    )
    case = randomised_organ_phantom(3, ranges)
    liver = case.label.array == LIVER
    inner = liver.copy()
    for axis in range(3):  # away from the boundary, where blur mixes tissues
        inner &= np.roll(liver, 1, axis) & np.roll(liver, -1, axis)
    assert inner.sum() > 1000
    assert np.median(case.image.array[inner]) == pytest.approx(
        case.domain.tissue_intensity["liver"], abs=6.0
    )


def test_random_contrast_cases_break_the_ct_ordering_of_organs():
    """With random contrast the liver is not always brighter than the spleen, so intensity alone
    cannot name an organ; the realistic cases keep CT's physics (fat below water)."""
    ranges = DomainRandomisation(realistic_share=0.0)
    order = {
        randomised_organ_phantom(s, ranges).domain.tissue_intensity["liver"]
        > randomised_organ_phantom(s, ranges).domain.tissue_intensity["spleen"]
        for s in range(12)
    }
    assert order == {True, False}
    realistic = DomainRandomisation(realistic_share=1.0).draw(np.random.default_rng(0))
    assert (
        realistic.realistic
        and realistic.domain.tissue_intensity["fat"]
        < 0
        < realistic.domain.tissue_intensity["liver"]
    )


def test_body_scale_scales_organ_volumes_by_its_cube():
    def case(scale: float):
        return randomised_organ_phantom(
            5,
            DomainRandomisation(
                body_scale=(scale, scale),
                deformation_mm=(0.0, 0.0),
                pixel_mm=(3.0, 3.0),
                slice_mm=(3.0, 3.0),
            ),
        )

    ratio = _volume_ml(case(1.15), LIVER) / _volume_ml(case(0.9), LIVER)
    assert ratio == pytest.approx((1.15 / 0.9) ** 3, rel=0.08)


def test_ranges_are_validated():
    with pytest.raises(ValueError, match="slice_mm"):
        DomainRandomisation(slice_mm=(3.0, 1.0))
    with pytest.raises(ValueError, match="realistic_share"):
        DomainRandomisation(realistic_share=2.0)


def test_the_cli_writes_randomised_cases_and_refuses_a_fixed_shape(tmp_path):
    result = CliRunner().invoke(
        cli, ["synth", "organs", "--cases", "1", "--domain", "rand", str(tmp_path / "r")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "dataset.json").is_file()
    result = CliRunner().invoke(
        cli,
        [
            "synth",
            "organs",
            "--cases",
            "1",
            "--domain",
            "rand",
            "--shape",
            "8",
            "32",
            "32",
            str(tmp_path / "s"),
        ],
    )
    assert result.exit_code == 2 and "own grid" in result.output
