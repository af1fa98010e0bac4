"""Synthetic low-dose chest CT with lung nodules: a LUNA16 lookalike with exact ground truth.

``generate_chest_ct(seed, config)`` draws a scanner setting (pixel size, slice
thickness, noise, reconstruction kernel), a patient (:mod:`.chest_anatomy`:
body habitus, lungs, airways, vessels, heart, bones) and lesions
(:mod:`.nodules`), and renders them on an axial grid in Hounsfield units.

Coordinates: the volume is indexed ``(z, y, x)``; index ``z`` runs head-ward
(+S), ``y`` posterior (+P), ``x`` to the patient's left (+L). World points are
LPS ``(x, y, z)`` mm. The reconstruction centre is near the scanner's
isocentre ``x = y = 0`` (the patient lies roughly centred on the table) and the
table position ``z`` is drawn per scan.

Field of view: a full field (``matrix * pixel >= full_fov_mm``) is centred near
the isocentre and shows the whole chest. A smaller one is a *targeted
reconstruction*, centred on a point drawn 30 mm deep inside one lung, so a
128 x 128 matrix shows ~100 mm of lung and chest wall; ``fov_centre_lps``
overrides the centre. With the default ``n_slices`` the scan covers the
lungs plus 10-30 mm on each side; a given ``n_slices`` shorter than the
lungs is centred on the same target. Nodules always lie wholly inside the
field of view, and their diameters are capped at half its shortest side.

Partial volume: every structure's voxel value is its analytic coverage of
the voxel box (a linear ramp of the signed distance across the box's extent
along the surface normal, slice thickness through-plane, pixel size in-plane;
thin structures get the exact box-filtered profile), so thick slices average
structures over their thickness without supersampling. The reconstruction
kernel is a Gaussian in-plane blur (:func:`~medssl.synth.primitives.kernel_blur`).
Noise is CT-textured white noise (:func:`~medssl.synth.primitives.scanner_noise`)
drawn for a bank of up to 24 slices; every slice takes a bank slice at a random
in-plane shift (a speed trade-off: noise statistics per slice are exact).

Rendering runs in z-slabs on a few threads; every random draw happens before,
so the output is bit-identical for a seed and config whatever the threading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from medssl.synth.chest_anatomy import Tubes, draw_anatomy, draw_trees
from medssl.synth.chest_render import Scene, Texture, body_and_lung_boxes, render
from medssl.synth.chest_scanner import SLICE_THICKNESSES, draw_scanner, place_grid
from medssl.synth.nodules import Confuser, Nodule, place_lesions
from medssl.synth.primitives import scanner_noise
from medssl.volume import Volume, affine_from_geometry

__all__ = [
    "SLICE_THICKNESSES",
    "ChestCase",
    "ChestConfig",
    "Confuser",
    "Nodule",
    "generate_chest_ct",
]

#: Noise bank: at most this many independent noise slices are drawn; every slice of a scan
#: takes one of them at a random in-plane shift of up to ``NOISE_SHIFT`` pixels.
NOISE_BANK_SLICES = 24
NOISE_SHIFT = 32


@dataclass(frozen=True)
class ChestConfig:
    """What to generate. Ranges are ``(low, high)``, drawn uniformly per scan unless noted.

    Attributes:
        matrix: in-plane rows = columns.
        n_slices: slices; default: cover the lungs plus 10-30 mm above and below.
        pixel_spacing_range: in-plane pixel size, mm.
        slice_thickness_range: slice thickness = slice spacing, mm; drawn from the
            thicknesses scanners use (:data:`SLICE_THICKNESSES`) inside the range,
            uniformly if none is.
        n_nodules_range: nodules per scan (inclusive, at most 255).
        nodule_diameter_range: designed diameters (:mod:`medssl.synth.nodules`), mm;
            log-normal, mostly small; capped at half the field of view's shortest side.
        n_confusers_range: micronodules and vessel crossings per scan (inclusive; fewer
            where the field of view has no room for them).
        noise_sigma_range: image noise standard deviation, HU.
        kernel_fwhm_range: reconstruction kernel in-plane FWHM, mm (0.6 sharp, 1.2 soft).
        patient_size_range: linear scale of the patient (1.0 = average adult).
        full_fov_mm: a field of view at least this wide is centred on the isocentre;
            a narrower one is a targeted reconstruction centred in a lung.
        fov_centre_lps: LPS ``(x, y, z)`` mm overriding the field-of-view centre
            (``z`` used only when ``n_slices`` is given).
        render_threads: threads used to render (0: one per CPU, at most 4). Does
            not change the output.
    """

    matrix: int = 512
    n_slices: int | None = None
    pixel_spacing_range: tuple[float, float] = (0.6, 0.9)
    slice_thickness_range: tuple[float, float] = (0.625, 2.5)
    n_nodules_range: tuple[int, int] = (1, 4)
    nodule_diameter_range: tuple[float, float] = (3.0, 30.0)
    n_confusers_range: tuple[int, int] = (1, 4)
    noise_sigma_range: tuple[float, float] = (10.0, 40.0)
    kernel_fwhm_range: tuple[float, float] = (0.6, 1.2)
    patient_size_range: tuple[float, float] = (0.88, 1.12)
    full_fov_mm: float = 250.0
    fov_centre_lps: tuple[float, float, float] | None = None
    render_threads: int = 0

    def __post_init__(self) -> None:
        if self.matrix < 16:
            raise ValueError(f"matrix must be at least 16, got {self.matrix}")
        if self.n_slices is not None and self.n_slices < 1:
            raise ValueError(f"n_slices must be positive or None, got {self.n_slices}")
        for name in ("pixel_spacing_range", "slice_thickness_range", "nodule_diameter_range",
                     "noise_sigma_range", "kernel_fwhm_range", "patient_size_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high, "
                                 f"got {(lo, hi)}")
        for name in ("n_nodules_range", "n_confusers_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, "
                                 f"got {(lo, hi)}")
        if self.n_nodules_range[1] > 255:
            raise ValueError(f"n_nodules_range allows at most 255 nodules (uint8 labels), "
                             f"got {self.n_nodules_range}")
        if self.nodule_diameter_range[0] < 1.0:
            raise ValueError("nodule_diameter_range must start at 1 mm or more, "
                             f"got {self.nodule_diameter_range}")
        if self.render_threads < 0:
            raise ValueError(f"render_threads must be >= 0, got {self.render_threads}")


@dataclass
class ChestCase:
    """A generated scan and its ground truth.

    Attributes:
        volume: float32 HU, shape ``(Z, Y, X)``; ``meta`` holds the scan
            parameters (``seed``, ``pixel_spacing``, ``slice_thickness``,
            ``noise_sigma_hu``, ``kernel_fwhm_mm``, ``kernel``, ``patient_size``,
            ``fov_mm``, ``targeted``, ``fov_centre_lps``).
        nodule_mask: uint8 ``(Z, Y, X)``; 0 background, ``nodule.label`` inside each nodule.
        lung_mask: bool ``(Z, Y, X)``: both lungs, with their vessels, airways and nodules.
        nodules: annotations (centre LPS mm, designed diameter mm, kind, location).
        confusers: look-alikes that are not nodules (LUNA16's excluded annotations).
    """

    volume: Volume
    nodule_mask: np.ndarray
    lung_mask: np.ndarray
    nodules: list[Nodule]
    confusers: list[Confuser]


def generate_chest_ct(seed: int, config: ChestConfig | None = None) -> ChestCase:
    """Generate one synthetic chest CT with nodules, confusers, and lung and nodule masks.

    Deterministic: the same ``seed`` and ``config`` give bit-identical arrays.

    Args:
        seed: random seed of the case.
        config: what to generate; default :class:`ChestConfig()`.

    Returns:
        The :class:`ChestCase`. See the module doc for geometry, field of view
        and partial volume; nodule diameters are designed diameters
        (:mod:`medssl.synth.nodules`).

    Raises:
        RuntimeError: a nodule found no room in the field of view (see
            :func:`~medssl.synth.nodules.place_lesions`).
    """
    cfg = config if config is not None else ChestConfig()
    rng = np.random.default_rng(seed)
    scanner = draw_scanner(rng, cfg)
    anatomy = draw_anatomy(rng, scanner.patient_size)
    grid, targeted = place_grid(rng, cfg, scanner, anatomy)
    sx, _, sz = grid.spacing_xyz
    vessels, airways = draw_trees(anatomy, rng, sx, sz)
    n_nodules = int(rng.integers(cfg.n_nodules_range[0], cfg.n_nodules_range[1] + 1))
    n_confusers = int(rng.integers(cfg.n_confusers_range[0], cfg.n_confusers_range[1] + 1))
    nodules, confusers, crossings = place_lesions(
        anatomy, grid, vessels, rng, n_nodules, cfg.nodule_diameter_range, n_confusers)

    body_box, region = body_and_lung_boxes(anatomy, grid)
    texture = Texture.draw(rng, grid, region, 2.0) if region is not None else None
    n_z, n_y, n_x = grid.shape
    n_bank = min(n_z, NOISE_BANK_SLICES)
    bank = scanner_noise((n_bank, n_y + NOISE_SHIFT, n_x + NOISE_SHIFT), scanner.noise_sigma, rng)
    pick = np.column_stack([
        rng.permutation(n_z) if n_z <= n_bank else rng.integers(0, n_bank, n_z),
        rng.integers(0, NOISE_SHIFT + 1, (n_z, 2)),
    ])

    scene = Scene.build(anatomy, grid, scanner, body_box, region, texture,
                        Tubes.concat([vessels, crossings]), airways, nodules + confusers,
                        bank, pick)
    render(scene, cfg.render_threads or min(4, os.cpu_count() or 1))

    meta = {
        "generator": "medssl.synth.chest", "modality": "CT", "seed": int(seed),
        "pixel_spacing": scanner.pixel, "slice_thickness": scanner.thickness,
        "noise_sigma_hu": scanner.noise_sigma, "kernel_fwhm_mm": scanner.kernel_fwhm,
        "kernel": scanner.kernel_name, "patient_size": scanner.patient_size,
        "fov_mm": cfg.matrix * scanner.pixel, "targeted": targeted,
        "fov_centre_lps": [float(v) for v in np.mean(grid.box(), axis=0)],
    }
    volume = Volume(scene.out["image"], affine_from_geometry(grid.origin, grid.spacing), meta)
    return ChestCase(
        volume=volume, nodule_mask=scene.out["nodules"], lung_mask=scene.out["lung"],
        nodules=[n.record for n in nodules],  # type: ignore[misc]
        confusers=[c.record for c in confusers],  # type: ignore[misc]
    )
