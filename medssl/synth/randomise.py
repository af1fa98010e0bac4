"""Domain randomisation of the organ phantom, after SynthSeg (Billot et al., Medical Image
Analysis 2023).

SynthSeg segments real scans of any contrast and resolution after training only on synthetic
images, because every training image draws its own appearance and geometry (§3.1-3.2: GMM
intensities per label, bias field, blur, resolution and slice thickness, elastic deformation,
scaling) so that the network cannot rely on any of them. :func:`randomised_organ_phantom` does the
same for the abdominal phantom, per case:

* **intensities per tissue**: with probability ``1 - realistic_share`` every soft tissue draws
  its own mean uniformly in ``soft_tissue_hu`` (SynthSeg's uniform GMM means, restricted to the
  soft-tissue window the models see), fat, air/lung/gas and bone within their physical ranges;
  otherwise CT-realistic contrast (:func:`~medssl.synth.domains.ct_intensities`) with a random
  contrast phase, scanner calibration and a per-tissue jitter;
* **texture, noise and blur**: texture SD, noise SD and in-plane PSF drawn from their ranges;
* **resolution and slice thickness**: pixel spacing and slice spacing (= thickness) drawn;
* **bias field**: strength drawn;
* **body size**: the anatomy scaled by a factor (the body is drawn on a grid ``scale`` times
  finer and then labelled with the grid's spacing);
* **organ shape**: a smooth random displacement field (amplitude ``deformation_mm``) applied to
  the tissue and label maps together (nearest neighbour), so labels stay exact;
* **field of view**: the craniocaudal extent and the FOV centre drawn.

The anatomy itself (organ sizes, positions, lobulation) still comes from the seed, as for
every domain. The realistic CT presets (:data:`~medssl.synth.domains.DOMAINS`) are unchanged:
evaluation uses them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from medssl.synth.domains import DOMAINS, Domain, ct_intensities, render_image
from medssl.synth.organ_anatomy import sample_anatomy
from medssl.synth.organ_case import RANDOMISED, OrganCase, organ_grid
from medssl.synth.organ_raster import rasterise
from medssl.synth.organ_scene import LABELS, Tissue
from medssl.synth.primitives import smooth_random_field
from medssl.volume import Volume, float_triple

__all__ = ["RANDOMISED", "DomainRandomisation", "RandomisedDraw", "randomised_organ_phantom"]

_AIRLIKE = ("air", "gas", "lung")
_FIXED_RANGES = {"fat": (-150.0, -40.0), "bone": (250.0, 1200.0), "marrow": (120.0, 350.0)}


@dataclass(frozen=True)
class DomainRandomisation:
    """Ranges of the per-case draws (uniform unless said otherwise).

    Attributes:
        realistic_share: share of cases with CT-realistic contrast (random phase and
            calibration) instead of a random intensity per soft tissue.
        soft_tissue_hu: range of each soft tissue's mean in the random-contrast cases, HU.
        enhancement: contrast phase of the realistic cases, relative to portal-venous.
        gain, offset_hu: scanner calibration of the realistic cases.
        tissue_jitter_hu: SD of a per-tissue shift in the realistic cases, HU.
        noise_hu, texture_hu, blur_fwhm_mm, bias_strength: image-formation ranges.
        pixel_mm, slice_mm: in-plane spacing and slice spacing (= slice thickness), mm.
        body_scale: factor on the body's size.
        deformation_mm: amplitude (SD) of the smooth displacement, mm; correlation
            ``deformation_correlation_mm``.
        extent_z_mm: craniocaudal field of view, mm; in-plane FOV is 384 mm (phantom default).
        fov_shift_mm: SD of the FOV centre's shift, ``(z, y, x)`` mm.
    """

    realistic_share: float = 0.5
    soft_tissue_hu: tuple[float, float] = (-80.0, 300.0)
    enhancement: tuple[float, float] = (0.0, 1.6)
    gain: tuple[float, float] = (0.92, 1.08)
    offset_hu: tuple[float, float] = (-30.0, 40.0)
    tissue_jitter_hu: float = 10.0
    noise_hu: tuple[float, float] = (4.0, 40.0)
    texture_hu: tuple[float, float] = (0.0, 15.0)
    blur_fwhm_mm: tuple[float, float] = (1.0, 5.0)
    bias_strength: tuple[float, float] = (0.0, 0.02)
    pixel_mm: tuple[float, float] = (2.4, 3.6)
    slice_mm: tuple[float, float] = (1.5, 6.0)
    body_scale: tuple[float, float] = (0.85, 1.2)
    deformation_mm: tuple[float, float] = (0.0, 6.0)
    deformation_correlation_mm: float = 40.0
    extent_z_mm: tuple[float, float] = (200.0, 300.0)
    fov_shift_mm: tuple[float, float, float] = (15.0, 10.0, 10.0)

    def __post_init__(self) -> None:
        if not 0 <= self.realistic_share <= 1:
            raise ValueError(f"realistic_share must be in [0, 1], got {self.realistic_share}")
        for name in (
            "soft_tissue_hu",
            "enhancement",
            "gain",
            "offset_hu",
            "noise_hu",
            "texture_hu",
            "blur_fwhm_mm",
            "bias_strength",
            "pixel_mm",
            "slice_mm",
            "body_scale",
            "deformation_mm",
            "extent_z_mm",
        ):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: the range ({lo}, {hi}) is empty")
        positive = (
            "noise_hu",
            "blur_fwhm_mm",
            "pixel_mm",
            "slice_mm",
            "body_scale",
            "extent_z_mm",
            "gain",
        )
        for name in positive:
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def draw(self, rng: np.random.Generator) -> RandomisedDraw:
        """One case's appearance and geometry."""
        realistic = bool(rng.random() < self.realistic_share)
        if realistic:
            base = ct_intensities(
                rng.uniform(*self.enhancement),
                rng.uniform(*self.gain),
                rng.uniform(*self.offset_hu),
            )
            intensity = {
                k: v + (rng.normal(0.0, self.tissue_jitter_hu) if k not in _AIRLIKE else 0.0)
                for k, v in base.items()
            }
        else:
            intensity = {}
            for tissue in sorted(t.name.lower() for t in Tissue):
                if tissue in _AIRLIKE:
                    intensity[tissue] = rng.uniform(-1000.0, -700.0)
                elif tissue in _FIXED_RANGES:
                    intensity[tissue] = rng.uniform(*_FIXED_RANGES[tissue])
                else:
                    intensity[tissue] = rng.uniform(*self.soft_tissue_hu)
        pixel, thickness = rng.uniform(*self.pixel_mm), rng.uniform(*self.slice_mm)
        extent = rng.uniform(*self.extent_z_mm)
        shape = (max(8, round(extent / thickness)), round(384.0 / pixel), round(384.0 / pixel))
        domain = replace(
            DOMAINS["A"],
            name=RANDOMISED,
            tissue_intensity=intensity,
            noise_std=rng.uniform(*self.noise_hu),
            texture_std=rng.uniform(*self.texture_hu),
            blur_fwhm_mm=rng.uniform(*self.blur_fwhm_mm),
            bias_strength=rng.uniform(*self.bias_strength),
            spacing=(thickness, pixel, pixel),
            shape=shape,
            fov_centre_mm=float_triple(rng.normal(0.0, self.fov_shift_mm)),
            case_intensity_sd=0.0,
            case_noise_sd=0.0,  # drawn here already, once per case
        )
        return RandomisedDraw(
            domain,
            realistic,
            float(rng.uniform(*self.body_scale)),
            float(rng.uniform(*self.deformation_mm)),
        )


@dataclass(frozen=True)
class RandomisedDraw:
    """What one randomised case drew: the :class:`Domain` that renders it (spacing, grid,
    contrast, noise...), whether its contrast is CT-realistic, the body scale and the
    displacement amplitude (mm)."""

    domain: Domain
    realistic: bool
    body_scale: float
    deformation_mm: float


def _deform(
    maps: list[np.ndarray],
    spacing: tuple[float, float, float],
    amplitude_mm: float,
    correlation_mm: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """The same smooth displacement (SD ``amplitude_mm``) applied to every uint8 map, nearest."""
    shape = maps[0].shape
    corr = [correlation_mm / s for s in spacing]
    grid = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij", sparse=True)
    coords = [
        g + np.float32(amplitude_mm / s) * smooth_random_field(shape, corr, rng)
        for g, s in zip(grid, spacing)
    ]
    return [ndimage.map_coordinates(m, coords, order=0, mode="nearest") for m in maps]


def randomised_organ_phantom(
    seed: int, randomisation: DomainRandomisation | None = None
) -> OrganCase:
    """A domain-randomised abdominal case; its image and label meta also hold the draw
    (``realistic``, ``body_scale``, ``deformation_mm``, ``slice_thickness``).

    The same seed gives the same subject (anatomy) as in every other domain, seen through its
    own random appearance and geometry; every draw is a function of the seed.
    """
    ranges = randomisation or DomainRandomisation()
    tag = zlib.crc32(RANDOMISED.encode())
    draw = ranges.draw(np.random.default_rng([seed, 3, tag]))
    dom = draw.domain
    affine, axes = organ_grid(dom)
    # A body `body_scale` times larger: the anatomy sampled at coordinates shrunk about its centre.
    canvas = rasterise(sample_anatomy(seed), [a / draw.body_scale for a in axes])
    rng = np.random.default_rng([seed, 4, tag])
    tissue, label = canvas.tissue, canvas.label
    if draw.deformation_mm > 0:
        tissue, label = _deform(
            [tissue, label],
            dom.spacing,
            draw.deformation_mm,
            ranges.deformation_correlation_mm,
            rng,
        )
    image = render_image(tissue, dom, rng)
    meta = {
        "seed": seed,
        "domain": RANDOMISED,
        "modality": "CT",
        "realistic": draw.realistic,
        "body_scale": draw.body_scale,
        "deformation_mm": draw.deformation_mm,
        "slice_thickness": dom.spacing[0],
    }
    return OrganCase(
        image=Volume(image, affine, dict(meta)),
        label=Volume(label, affine.copy(), {**meta, "labels": dict(LABELS)}),
        domain=dom,
    )
