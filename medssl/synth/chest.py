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
kernel is a Gaussian in-plane blur, for the sharp (lung) kernels with edge
enhancement and its overshoot (:func:`~medssl.synth.primitives.kernel_blur`).
Noise is CT-textured white noise (:func:`~medssl.synth.primitives.scanner_noise`,
grainier under a sharp kernel) drawn for a bank of up to 24 slices; every slice
takes a bank slice at a random in-plane shift (a speed trade-off: noise
statistics per slice are exact). Noise grows with the patient's size (obese
patients are noisier). IV contrast raises the blood in the heart and
mediastinal vessels to 150-350 HU and the pulmonary vessels to 70-100 % of it.
Breathing motion (:func:`~medssl.synth.chest_scanner.with_breathing`) shows each
slice's anatomy displaced along z (smoothly, most over the diaphragm), so
structures stretch, shrink, or appear twice across slices; the annotations give
the level where a lesion is shown.

Families (:data:`FAMILIES`, :meth:`ChestConfig.for_family`, ``medssl synth chest
--family``): a detector is trained on one family of parameter ranges and tested
on another. ``"train"`` is the :class:`ChestConfig` default; ``"heldout"``
differs in every scanner and patient range and draws from other seeds (seed
``s`` of a family starts the random stream ``s + offset``, offsets 0 and
:data:`SEED_SPAN`; seeds must lie in ``[0, SEED_SPAN)``)::

    range                          train              heldout
    pixel spacing, mm              0.6-0.9            0.55-0.98
    slice thickness, mm            0.625-2.5          0.6-3.0
    noise (average patient), HU    10-60              15-80
    kernel FWHM, mm                0.6-1.2            0.5-1.4
    sharp (edge-enhancing) kernels 40 %, a 0.2-0.7    50 %, a 0.3-1.0
    patient size                   0.85-1.15          0.8-1.25
    subcutaneous fat, mm           6-40               4-60
    IV contrast                    30 %               50 %   (150-350 HU both)
    free / juxta-pleural / -vasc.  45 / 30 / 25 %     35 / 35 / 30 %
    juxta-vasc. at an airway wall  25 %               35 %
    solid / part-solid / GGO       65 / 15 / 20 %     55 / 20 / 25 %
    granulomas + scars per scan    0-3, 50 % gran.    0-4, 60 % gran.
    breathing motion               20 %, 1-6 mm       35 %, 2-10 mm
    nodules 1-4 per scan, 3-30 mm (log-normal), in both families.

Look-alikes (:mod:`medssl.synth.nodules`): micronodules and vessel crossings are
excluded findings (``confusers``: LUNA16's ``annotations_excluded.csv``, a mark
counts neither way); calcified granulomas and scars are ``lookalikes``: in no
annotation file, so a mark on one is a false positive.

Rendering runs in z-slabs on a few threads; every random draw happens before,
so the output is bit-identical for a seed and config whatever the threading.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np

from medssl.synth.chest_anatomy import ScanGrid, Tubes, draw_anatomy, draw_trees
from medssl.synth.chest_config import FAMILIES, FAMILY_SEED_OFFSETS, SEED_SPAN, ChestConfig
from medssl.synth.chest_render import Scene, Texture, body_and_lung_boxes, render
from medssl.synth.chest_scanner import (
    SLICE_THICKNESSES,
    draw_scanner,
    place_grid,
    with_breathing,
    with_contrast,
)
from medssl.synth.nodules import (
    Confuser,
    Lesion,
    Nodule,
    place_lesions,
    place_lookalikes,
)
from medssl.synth.primitives import scanner_noise
from medssl.volume import Volume, affine_from_geometry

__all__ = [
    "FAMILIES",
    "FAMILY_SEED_OFFSETS",
    "SEED_SPAN",
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
        confusers: micronodules and vessel crossings (LUNA16's excluded annotations:
            a mark on one counts neither way).
        lookalikes: calcified granulomas and scars: not nodules and not excluded, so a
            mark on one is a false positive.
    """

    volume: Volume
    nodule_mask: np.ndarray
    lung_mask: np.ndarray
    nodules: list[Nodule]
    confusers: list[Confuser]
    lookalikes: list[Confuser] = field(default_factory=list)


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
    if not 0 <= seed < SEED_SPAN:
        raise ValueError(
            f"seed must be in [0, {SEED_SPAN}) (the family's seed offset is added "
            f"to it), got {seed}"
        )
    rng = np.random.default_rng(seed + cfg.seed_offset)
    scanner = draw_scanner(rng, cfg)
    anatomy = with_contrast(draw_anatomy(rng, scanner.patient_size, fat_mm=scanner.fat_mm), scanner)
    grid, targeted = place_grid(rng, cfg, scanner, anatomy)
    grid = with_breathing(grid, scanner, anatomy)
    sx, _, sz = grid.spacing_xyz
    vessels, airways = draw_trees(anatomy, rng, sx, sz)
    n_nodules = int(rng.integers(cfg.n_nodules_range[0], cfg.n_nodules_range[1] + 1))
    n_confusers = int(rng.integers(cfg.n_confusers_range[0], cfg.n_confusers_range[1] + 1))
    nodules, confusers, crossings = place_lesions(
        anatomy,
        grid,
        vessels,
        rng,
        n_nodules,
        cfg.nodule_diameter_range,
        n_confusers,
        location_shares=cfg.location_shares,
        kind_shares=cfg.kind_shares,
        airways=airways,
        airway_share=cfg.airway_share,
    )
    n_lookalikes = int(rng.integers(cfg.n_lookalikes_range[0], cfg.n_lookalikes_range[1] + 1))
    granulomas, scars, lookalikes, scar_hu = place_lookalikes(
        anatomy,
        grid,
        vessels,
        rng,
        n_lookalikes,
        nodules + confusers,
        granuloma_share=cfg.granuloma_share,
    )
    if grid.z_shift:  # annotate lesions where the moving patient shows them
        nodules, confusers, granulomas = (
            [_shown(grid, lesion) for lesion in group] for group in (nodules, confusers, granulomas)
        )
        lookalikes = [_shown_record(grid, record) for record in lookalikes]  # type: ignore[misc]

    body_box, region = body_and_lung_boxes(anatomy, grid)
    texture = Texture.draw(rng, grid, region, 2.0) if region is not None else None
    n_z, n_y, n_x = grid.shape
    n_bank = min(n_z, NOISE_BANK_SLICES)
    bank = scanner_noise(
        (n_bank, n_y + NOISE_SHIFT, n_x + NOISE_SHIFT),
        scanner.noise_sigma,
        rng,
        edge_enhance=scanner.edge_enhance,
    )
    pick = np.column_stack(
        [
            rng.permutation(n_z) if n_z <= n_bank else rng.integers(0, n_bank, n_z),
            rng.integers(0, NOISE_SHIFT + 1, (n_z, 2)),
        ]
    )

    scene = Scene.build(
        anatomy,
        grid,
        scanner,
        body_box,
        region,
        texture,
        Tubes.concat([vessels, crossings]),
        airways,
        nodules + confusers + granulomas,
        bank,
        pick,
        scars=scars,
        scar_hu=scar_hu,
    )
    render(scene, cfg.render_threads or min(4, os.cpu_count() or 1))

    meta = {
        "generator": "medssl.synth.chest",
        "modality": "CT",
        "seed": int(seed),
        "family": cfg.family,
        "rng_seed": int(seed + cfg.seed_offset),
        "edge_enhance": scanner.edge_enhance,
        "fat_mm": scanner.fat_mm,
        "contrast_hu": scanner.contrast_hu,
        "motion_mm": scanner.motion_mm,
        "pixel_spacing": scanner.pixel,
        "slice_thickness": scanner.thickness,
        "noise_sigma_hu": scanner.noise_sigma,
        "kernel_fwhm_mm": scanner.kernel_fwhm,
        "kernel": scanner.kernel_name,
        "patient_size": scanner.patient_size,
        "fov_mm": cfg.matrix * scanner.pixel,
        "targeted": targeted,
        "fov_centre_lps": [float(v) for v in np.mean(grid.box(), axis=0)],
    }
    volume = Volume(scene.out["image"], affine_from_geometry(grid.origin, grid.spacing), meta)
    return ChestCase(
        volume=volume,
        nodule_mask=scene.out["nodules"],
        lung_mask=scene.out["lung"],
        nodules=[n.record for n in nodules],  # type: ignore[misc]
        confusers=[c.record for c in confusers],  # type: ignore[misc]
        lookalikes=lookalikes,
    )


def _shown_record(grid: ScanGrid, record: Nodule | Confuser) -> Nodule | Confuser:
    """``record`` with its centre at the level where the moving patient shows it."""
    x, y, z = record.centre_lps
    return dataclasses.replace(record, centre_lps=(x, y, grid.apparent_z(z)))


def _shown(grid: ScanGrid, lesion: Lesion) -> Lesion:
    """``lesion`` annotated where the moving patient shows it (its solids stay put)."""
    return dataclasses.replace(lesion, record=_shown_record(grid, lesion.record))
