"""The scanner side of a synthetic chest CT: acquisition parameters and the scan grid.

:func:`draw_scanner` draws pixel size, slice thickness, noise, reconstruction
kernel (blur and edge enhancement), patient size and subcutaneous fat, and
the IV contrast for a :class:`~medssl.synth.chest_config.ChestConfig`;
:func:`with_contrast` gives the patient's blood its enhanced attenuation;
:func:`place_grid` places the axial scan grid (field of view and table
position) on a drawn patient. See :mod:`medssl.synth.chest` for the
coordinate frame and the field-of-view rules.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from medssl.synth.chest_anatomy import ChestAnatomy, ScanGrid, sample_lung_points
from medssl.synth.chest_config import ChestConfig

__all__ = [
    "SLICE_THICKNESSES",
    "TARGET_DEPTH_MM",
    "Scanner",
    "draw_scanner",
    "place_grid",
    "with_breathing",
    "with_contrast",
]

#: How deep inside a lung the centre of a targeted field of view lies, mm.
TARGET_DEPTH_MM = 30.0
#: Slice thicknesses scanners reconstruct (mm) and how often archives hold them.
SLICE_THICKNESSES = (0.6, 0.625, 0.75, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
_THICKNESS_WEIGHTS = (0.5, 1.0, 0.5, 0.5, 1.5, 2.0, 0.5, 2.0, 2.5, 1.0, 1.0)
#: Noise grows with the patient: the drawn noise times ``patient_size ** NOISE_SIZE_POWER``
#: (fewer photons through a wider body at the same dose; AEC makes up part of it), kept
#: inside ``noise_sigma_range``.
NOISE_SIZE_POWER = 2.0
#: Breathing during the scan: table travel per breathing cycle, mm, and the fraction of
#: the displacement left at the apex (the lung bases, over the diaphragm, move most).
BREATH_PERIOD_MM = (30.0, 120.0)
APEX_MOTION = 0.3


@dataclass(frozen=True)
class Scanner:
    """Per-scan acquisition parameters (and the patient's habitus, which they depend on).

    Attributes:
        pixel: in-plane pixel size (rows = columns), mm.
        thickness: slice thickness = slice spacing, mm.
        noise_sigma: image noise standard deviation, HU.
        kernel_fwhm: reconstruction kernel in-plane FWHM, mm.
        patient_size: linear scale of the patient (1.0 = average adult).
        edge_enhance: the kernel's edge enhancement ``a`` (0: a smooth Gaussian kernel;
            see :func:`~medssl.synth.primitives.kernel_blur`).
        fat_mm: subcutaneous fat at the side of the chest of an average-size patient, mm
            (scaled by ``patient_size``).
        contrast_hu: attenuation of enhanced blood in the heart and mediastinal
            vessels, HU; None without IV contrast.
        contrast_lung_fraction: pulmonary vessels reach this fraction of ``contrast_hu``.
        motion_mm: breathing displacement amplitude at the lung bases, mm (0: none).
        motion_period_mm: table travel per breathing cycle, mm.
        motion_phase: phase of the cycle at the first slice, radians.
    """

    pixel: float  # mm
    thickness: float  # mm, = slice spacing
    noise_sigma: float  # HU
    kernel_fwhm: float  # mm
    patient_size: float
    edge_enhance: float = 0.0
    fat_mm: float = 17.0
    contrast_hu: float | None = None
    contrast_lung_fraction: float = 1.0
    motion_mm: float = 0.0
    motion_period_mm: float = 60.0
    motion_phase: float = 0.0

    @property
    def kernel_name(self) -> str:
        """A DICOM ConvolutionKernel-like name (GE's vocabulary) for the kernel."""
        if self.edge_enhance > 0:
            return "LUNG"
        if self.kernel_fwhm < 0.8:
            return "DETAIL"
        return "STANDARD" if self.kernel_fwhm < 1.05 else "SOFT"


def draw_scanner(rng: np.random.Generator, cfg: ChestConfig) -> Scanner:
    """Draw one scan's :class:`Scanner` from the ranges of ``cfg``.

    The slice thickness is drawn from :data:`SLICE_THICKNESSES` inside
    ``cfg.slice_thickness_range`` (weighted by how often archives hold them),
    uniformly in the range (rounded to um) if none is; the pixel size is
    rounded to 0.1 um. The noise is a uniform draw scaled by the patient's
    size (:data:`NOISE_SIZE_POWER`) and kept in ``cfg.noise_sigma_range``.
    A sharp kernel (``edge_enhance > 0``) is drawn with probability
    ``cfg.sharp_kernel_share``; contrast with ``cfg.contrast_share``; breathing
    motion with ``cfg.motion_share``.
    Draws from ``rng`` in a fixed order.
    """
    lo, hi = cfg.slice_thickness_range
    choices = [(t, w) for t, w in zip(SLICE_THICKNESSES, _THICKNESS_WEIGHTS) if lo <= t <= hi]
    if choices:
        values, weights = zip(*choices)
        thickness = float(rng.choice(values, p=np.asarray(weights) / sum(weights)))
    else:
        thickness = round(float(rng.uniform(lo, hi)), 3)
    pixel = round(float(rng.uniform(*cfg.pixel_spacing_range)), 4)
    noise = float(rng.uniform(*cfg.noise_sigma_range))
    fwhm = float(rng.uniform(*cfg.kernel_fwhm_range))
    size = float(rng.uniform(*cfg.patient_size_range))
    sharp = rng.uniform() < cfg.sharp_kernel_share
    enhance = float(rng.uniform(*cfg.edge_enhance_range))
    fat = float(rng.uniform(*cfg.fat_mm_range))
    contrast = rng.uniform() < cfg.contrast_share
    contrast_hu = float(rng.uniform(*cfg.contrast_hu_range))
    lung_fraction = float(rng.uniform(0.7, 1.0))
    moves = rng.uniform() < cfg.motion_share
    motion = float(rng.uniform(*cfg.motion_amplitude_range))
    period = float(rng.uniform(*BREATH_PERIOD_MM))
    phase = float(rng.uniform(0, 2 * np.pi))
    return Scanner(
        pixel=pixel,
        thickness=thickness,
        noise_sigma=float(np.clip(noise * size**NOISE_SIZE_POWER, *cfg.noise_sigma_range)),
        kernel_fwhm=fwhm,
        patient_size=size,
        edge_enhance=enhance if sharp else 0.0,
        fat_mm=fat,
        contrast_hu=contrast_hu if contrast else None,
        contrast_lung_fraction=lung_fraction if contrast else 1.0,
        motion_mm=motion if moves else 0.0,
        motion_period_mm=period,
        motion_phase=phase,
    )


def with_contrast(anatomy: ChestAnatomy, scanner: Scanner) -> ChestAnatomy:
    """The patient as scanned: with IV contrast, blood (heart, mediastinal vessels) at

    ``scanner.contrast_hu``, pulmonary vessels at ``contrast_lung_fraction`` of it and
    the liver enhanced by a fifth of the blood's rise (a venous-phase chest CT);
    ``anatomy`` itself when the scan has no contrast.
    """
    if scanner.contrast_hu is None:
        return anatomy
    hu = anatomy.hu
    rise = scanner.contrast_hu - hu.blood
    enhanced = dataclasses.replace(
        hu,
        blood=scanner.contrast_hu,
        vessel=max(hu.vessel, scanner.contrast_hu * scanner.contrast_lung_fraction),
        liver=hu.liver + 0.2 * rise,
    )
    return dataclasses.replace(anatomy, hu=enhanced)


def place_grid(
    rng: np.random.Generator, cfg: ChestConfig, scanner: Scanner, anatomy: ChestAnatomy
) -> tuple[ScanGrid, bool]:
    """The scan grid and whether it is a targeted reconstruction.

    The grid is ``(n_slices, cfg.matrix, cfg.matrix)`` voxels indexed ``(z, y, x)``,
    spacing ``(thickness, pixel, pixel)`` mm, origin LPS ``(x, y, z)`` mm of voxel 0;
    the field-of-view centre and table position follow the rules in
    :mod:`medssl.synth.chest` (a targeted field is centred :data:`TARGET_DEPTH_MM`
    inside a lung drawn at random).
    """
    fov = cfg.matrix * scanner.pixel
    t = scanner.thickness
    z_low, z_high = anatomy.lowest_lung_z, anatomy.z_apex
    targeted = fov < cfg.full_fov_mm
    short = cfg.n_slices is not None and (cfg.n_slices - 1) * t < z_high - z_low + 20
    given = None if cfg.fov_centre_lps is None else np.asarray(cfg.fov_centre_lps, dtype=float)
    target = None  # a lung point to aim at, drawn when the config gives no centre
    if given is None and (targeted or short):
        side = int(rng.integers(0, 2))
        target = sample_lung_points(anatomy, rng, 1, TARGET_DEPTH_MM, scanner.pixel, t)[side][0]
    if given is not None:
        cx, cy = given[0], given[1]
    elif targeted and target is not None:
        cx, cy = target[0], target[1]
    else:  # the isocentre, give or take the reconstruction offset
        cx, cy = rng.uniform(-10, 10), rng.uniform(-10, 10)
    if cfg.n_slices is None:
        z0 = z_low - rng.uniform(10, 30)
        n_slices = math.ceil((z_high + rng.uniform(10, 30) - z0) / t) + 1
    else:
        n_slices = cfg.n_slices
        extent = (n_slices - 1) * t
        if given is not None:
            centre = float(given[2])
        elif short and target is not None:
            centre = float(np.clip(target[2], z_low - 10 + extent / 2, z_high + 10 - extent / 2))
        else:
            slack = extent - (z_high - z_low)
            centre = 0.5 * (z_low + z_high) + rng.uniform(-0.25, 0.25) * slack
        z0 = centre - extent / 2
    half = (cfg.matrix - 1) / 2 * scanner.pixel
    grid = ScanGrid(
        (cx - half, cy - half, z0),
        (t, scanner.pixel, scanner.pixel),
        (n_slices, cfg.matrix, cfg.matrix),
    )
    return grid, targeted


def with_breathing(grid: ScanGrid, scanner: Scanner, anatomy: ChestAnatomy) -> ScanGrid:
    """The scan grid with the patient breathing during the scan (``grid`` if not).

    Slice ``k`` at nominal level ``z_k`` shows the anatomy displaced along z by
    ``A w(z_k) sin(2 pi (z_k - z_0) / P + phase)``: ``A = scanner.motion_mm``, ``P`` the
    table travel per breathing cycle, ``w`` 1 below the diaphragm's top falling
    linearly to :data:`APEX_MOTION` at the apex. Where the displacement changes
    faster than the table moves, structures are skipped or shown twice in
    consecutive slices, as in a scan of a patient who did not hold their breath.
    """
    if scanner.motion_mm == 0:
        return grid
    z = grid.origin[2] + np.arange(grid.shape[0]) * grid.spacing[0]
    top = max(anatomy.dome_z)
    w = APEX_MOTION + (1 - APEX_MOTION) * np.clip(
        (anatomy.z_apex - z) / (anatomy.z_apex - top), 0.0, 1.0
    )
    shift = (
        scanner.motion_mm
        * w
        * np.sin(2 * np.pi * (z - z[0]) / scanner.motion_period_mm + scanner.motion_phase)
    )
    return dataclasses.replace(grid, z_shift=tuple(float(v) for v in shift))
