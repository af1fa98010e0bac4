"""Imaging domains for the organ phantom: how a scanner turns tissues into an image.

A :class:`Domain` fixes the modality, an intensity per tissue (HU for CT,
arbitrary units for MR), within-tissue texture, a smooth multiplicative bias
field, the point-spread function, noise, and the grid (voxel spacing, matrix
size and field-of-view centre). The anatomy does not depend on the domain, so
domains are pure appearance-and-sampling knobs, as in domain-shift benchmarks:

* ``"A"``..``"D"``: four CT "vendors" (semi-supervised domain generalisation):
  different contrast phase and calibration, noise, kernel, bias, resolution and FOV.
* ``"ct"`` / ``"mr"``: a source/target pair for unsupervised domain adaptation;
  the MR domain is T1-like with fat bright, bone and flowing blood dark.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from scipy import ndimage

from medssl.synth.organ_scene import Tissue
from medssl.synth.primitives import physical_grid, scanner_noise, smooth_random_field
from medssl.synth.shapes import LatticeField

__all__ = ["DOMAINS", "Domain", "ct_intensities", "render_image"]

_TISSUE_NAMES = frozenset(t.name.lower() for t in Tissue)

# (unenhanced HU, enhancement HU in the portal-venous phase) per tissue.
_CT_HU: dict[str, tuple[float, float]] = {
    "air": (-1000.0, 0.0),
    "fat": (-100.0, 0.0),
    "muscle": (45.0, 12.0),
    "bone": (750.0, 0.0),
    "marrow": (220.0, 20.0),
    "disc": (75.0, 10.0),
    "csf": (10.0, 0.0),
    "lung": (-850.0, 0.0),
    "heart": (40.0, 110.0),
    "bowel": (30.0, 35.0),
    "colon_content": (15.0, 0.0),
    "gas": (-950.0, 0.0),
    "vessel": (40.0, 130.0),
    "liver": (60.0, 45.0),
    "spleen": (48.0, 80.0),
    "kidney": (32.0, 170.0),
    "aorta": (42.0, 140.0),
    "ivc": (40.0, 110.0),
    "stomach_wall": (40.0, 55.0),
    "stomach_content": (12.0, 0.0),
    "gallbladder": (8.0, 0.0),
    "pancreas": (40.0, 35.0),
    "adrenal": (25.0, 22.0),
}

# T1-weighted-like MR, arbitrary units: fat and fatty marrow bright, pancreas and liver
# brighter than spleen, fluid and flowing blood dark, cortical bone and air black.
_MR_T1: dict[str, float] = {
    "air": 0.0,
    "fat": 900.0,
    "muscle": 300.0,
    "bone": 30.0,
    "marrow": 620.0,
    "disc": 180.0,
    "csf": 110.0,
    "lung": 25.0,
    "heart": 260.0,
    "bowel": 330.0,
    "colon_content": 380.0,
    "gas": 10.0,
    "vessel": 120.0,
    "liver": 560.0,
    "spleen": 360.0,
    "kidney": 460.0,
    "aorta": 60.0,
    "ivc": 170.0,
    "stomach_wall": 380.0,
    "stomach_content": 140.0,
    "gallbladder": 60.0,
    "pancreas": 720.0,
    "adrenal": 230.0,
}

_CT_RANGE = (-1024.0, 3071.0)
_TEXTURE_CORRELATION_MM = 8.0


def ct_intensities(
    enhancement: float = 1.0, gain: float = 1.0, offset: float = 0.0
) -> dict[str, float]:
    """CT intensity per tissue: ``offset + gain * (unenhanced + enhancement * contrast)``, HU.

    Args:
        enhancement: contrast uptake relative to a portal-venous phase (0: no contrast).
        gain, offset: the scanner's calibration curve (1, 0 for an exact HU scale).
    """
    return {k: offset + gain * (hu + enhancement * enh) for k, (hu, enh) in _CT_HU.items()}


@dataclass(frozen=True)
class Domain:
    """An imaging domain: modality, tissue contrast, artefacts and grid.

    Attributes:
        name: preset name, also used to seed the domain's own random draws.
        modality: ``"CT"`` (intensities in HU, clipped to [-1024, 3071]) or ``"MR"``
            (arbitrary units >= 0, Rician noise).
        tissue_intensity: mean intensity per tissue name (every :class:`Tissue`, lower case).
        noise_std: noise standard deviation, image units.
        bias_strength: standard deviation of the log of the multiplicative bias field;
            the field scales intensity relative to that of air.
        blur_fwhm_mm: in-plane point-spread function, full width at half maximum, mm.
        spacing: voxel size ``(sz, sy, sx)`` in mm; slices are as thick as they are apart.
        shape: default grid ``(Z, Y, X)``; the field of view is ``shape * spacing``.
        texture_std: within-tissue heterogeneity (correlated over about 8 mm), image units.
        bias_correlation_mm: length scale of the bias field, mm.
        fov_centre_mm: grid centre relative to the phantom's body centre, ``(z, y, x)`` mm.
        case_intensity_sd: between-case variation: each case shifts every tissue's mean by one
            common N(0, sd) plus its own N(0, sd/2) (image units): patients differ in contrast
            timing, hydration and calibration drift, so one organ's intensity is not a
            constant of the domain.
        case_noise_sd: between-case variation of the noise level: each case's noise SD is
            ``noise_std * exp(N(0, sd))`` (dose and body size).
    """

    name: str
    modality: str
    tissue_intensity: Mapping[str, float] = field(hash=False)
    noise_std: float
    bias_strength: float
    blur_fwhm_mm: float
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    texture_std: float = 0.0
    bias_correlation_mm: float = 150.0
    fov_centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    case_intensity_sd: float = 0.0
    case_noise_sd: float = 0.0

    def __post_init__(self) -> None:
        if self.modality not in ("CT", "MR"):
            raise ValueError(
                f"Domain {self.name!r}: modality must be 'CT' or 'MR', got {self.modality!r}"
            )
        keys = set(self.tissue_intensity)
        if keys != _TISSUE_NAMES:
            raise ValueError(
                f"Domain {self.name!r}: tissue_intensity must name exactly the tissues "
                f"{sorted(_TISSUE_NAMES)}; missing {sorted(_TISSUE_NAMES - keys)}, "
                f"unknown {sorted(keys - _TISSUE_NAMES)}"
            )
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(
                f"Domain {self.name!r}: spacing must be three positive mm, got {self.spacing}"
            )
        if self.bias_correlation_mm <= 0:
            raise ValueError(
                f"Domain {self.name!r}: bias_correlation_mm must be > 0, "
                f"got {self.bias_correlation_mm}"
            )
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(
                f"Domain {self.name!r}: shape must be three positive ints, got {self.shape}"
            )
        for attr in (
            "noise_std",
            "bias_strength",
            "blur_fwhm_mm",
            "texture_std",
            "case_intensity_sd",
            "case_noise_sd",
        ):
            if getattr(self, attr) < 0:
                raise ValueError(
                    f"Domain {self.name!r}: {attr} must be >= 0, got {getattr(self, attr)}"
                )
        object.__setattr__(self, "tissue_intensity", MappingProxyType(dict(self.tissue_intensity)))

    @property
    def fov_mm(self) -> tuple[float, float, float]:
        """Field of view ``(z, y, x)`` in mm of the default grid."""
        (nz, ny, nx), (sz, sy, sx) = self.shape, self.spacing
        return (nz * sz, ny * sy, nx * sx)

    def lookup_table(self) -> np.ndarray:
        """float32 array indexed by :class:`Tissue` code: the tissue's mean intensity."""
        return np.array([self.tissue_intensity[t.name.lower()] for t in Tissue], dtype=np.float32)


def render_image(tissue: np.ndarray, domain: Domain, rng: np.random.Generator) -> np.ndarray:
    """Turn a tissue map into an image of ``domain``.

    Steps: mean intensity per tissue (shifted per case by ``case_intensity_sd``), smooth
    texture, multiplicative bias
    (relative to air), blur (in-plane PSF, slice profile along z), noise
    (CT: in-plane correlated Gaussian; MR: Rician), CT range clipping.

    Args:
        tissue: uint8 :class:`Tissue` codes, shape ``(Z, Y, X)``, on a grid with the
            domain's spacing.
        domain: the imaging domain.
        rng: the domain's random generator (texture, bias, noise).

    Returns:
        float32 image ``(Z, Y, X)``: HU for CT, arbitrary units for MR.
    """
    lut = domain.lookup_table()
    noise_std = domain.noise_std
    if domain.case_intensity_sd > 0 or domain.case_noise_sd > 0:
        shift = rng.normal(0.0, domain.case_intensity_sd) + rng.normal(
            0.0, domain.case_intensity_sd / 2, lut.shape
        )
        lut = lut + shift.astype(np.float32)
        noise_std = float(noise_std * np.exp(rng.normal(0.0, domain.case_noise_sd)))
    image = lut[tissue]
    spacing = domain.spacing
    sz, sy, sx = spacing
    if domain.texture_std > 0:
        corr = _TEXTURE_CORRELATION_MM
        texture = smooth_random_field(tissue.shape, (corr / sz, corr / sy, corr / sx), rng)
        image += np.float32(domain.texture_std) * texture
    if domain.bias_strength > 0:
        axes = [a.ravel() for a in physical_grid(tissue.shape, spacing)]
        extent = [float(a[-1]) for a in axes]
        field = LatticeField.draw(rng, [-e for e in extent], extent, domain.bias_correlation_mm)
        log_bias = field.sample(*axes)
        air = lut[Tissue.AIR]
        image -= air
        image *= np.exp(np.float32(domain.bias_strength) * log_bias)
        image += air
    sigma_mm = domain.blur_fwhm_mm / 2.3548
    image = ndimage.gaussian_filter(image, (0.425, sigma_mm / sy, sigma_mm / sx), mode="nearest")
    if domain.modality == "CT":
        image += scanner_noise(tissue.shape, noise_std, rng)
        np.clip(image, *_CT_RANGE, out=image)
    else:
        std = np.float32(noise_std)
        real = image + std * rng.standard_normal(tissue.shape, dtype=np.float32)
        imag = std * rng.standard_normal(tissue.shape, dtype=np.float32)
        image = np.sqrt(real * real + imag * imag)
    return image.astype(np.float32, copy=False)


DOMAINS: dict[str, Domain] = {
    "A": Domain(
        name="A",
        modality="CT",
        tissue_intensity=ct_intensities(1.0),
        noise_std=12.0,
        bias_strength=0.004,
        blur_fwhm_mm=3.0,
        spacing=(4.0, 3.0, 3.0),
        shape=(64, 128, 128),
        texture_std=6.0,
        case_intensity_sd=8.0,
        case_noise_sd=0.25,
    ),
    "B": Domain(
        name="B",
        modality="CT",
        tissue_intensity=ct_intensities(0.6, gain=1.08, offset=20.0),
        noise_std=22.0,
        bias_strength=0.008,
        blur_fwhm_mm=2.2,
        spacing=(2.5, 3.4, 3.4),
        shape=(104, 112, 112),
        texture_std=8.0,
        case_intensity_sd=8.0,
        case_noise_sd=0.25,
    ),
    "C": Domain(
        name="C",
        modality="CT",
        tissue_intensity=ct_intensities(1.5, offset=-20.0),
        noise_std=8.0,
        bias_strength=0.005,
        blur_fwhm_mm=4.0,
        spacing=(5.0, 2.7, 2.7),
        shape=(52, 144, 144),
        texture_std=5.0,
        case_intensity_sd=8.0,
        case_noise_sd=0.25,
    ),
    "D": Domain(
        name="D",
        modality="CT",
        tissue_intensity=ct_intensities(0.85, offset=40.0),
        noise_std=16.0,
        bias_strength=0.01,
        blur_fwhm_mm=3.0,
        spacing=(3.0, 2.6, 2.6),
        shape=(84, 128, 128),
        texture_std=6.0,
        fov_centre_mm=(10.0, 0.0, 0.0),
        case_intensity_sd=8.0,
        case_noise_sd=0.25,
    ),
    "ct": Domain(
        name="ct",
        modality="CT",
        tissue_intensity=ct_intensities(1.2),
        noise_std=10.0,
        bias_strength=0.004,
        blur_fwhm_mm=2.5,
        spacing=(3.0, 2.8, 2.8),
        shape=(84, 136, 136),
        texture_std=6.0,
        case_intensity_sd=8.0,
        case_noise_sd=0.25,
    ),
    "mr": Domain(
        name="mr",
        modality="MR",
        tissue_intensity=_MR_T1,
        noise_std=15.0,
        bias_strength=0.2,
        blur_fwhm_mm=2.5,
        spacing=(5.0, 3.0, 3.0),
        shape=(52, 128, 128),
        texture_std=12.0,
        bias_correlation_mm=250.0,
    ),
}
"""Named presets: ``"A"``-``"D"`` (CT vendors), ``"ct"`` and ``"mr"`` (adaptation pair)."""
