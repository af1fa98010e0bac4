"""Draw an :class:`~medssl.synth.organ_scene.Anatomy` onto a grid: tissue and label maps.

The grid is three ascending 1-D axes ``(z, y, x)`` in mm of the scanner frame
(``z`` superior, ``y`` posterior, ``x`` patient-left; the anatomy frame
shifted by the subject's ``offset``). Painting order: body outline with
subcutaneous fat and the muscle wall; paraspinal and psoas muscles; spine and
ribs; viscera (organs, vessels, bowel, heart); lungs above the diaphragm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medssl.synth.organ_scene import Anatomy, Stroke, Tissue, Trunk
from medssl.synth.shapes import Canvas

__all__ = ["rasterise"]

_VERTEBRA_PERIOD = 36.0  # mm, vertebral body + disc
_DISC_HEIGHT = 8.0
_RIB_PERIOD = 28.0
_RIB_WIDTH = 9.0


def rasterise(anatomy: Anatomy, axes: Sequence[np.ndarray]) -> Canvas:
    """Tissue and label maps of ``anatomy`` on the grid spanned by ``axes``.

    Args:
        anatomy: the subject.
        axes: ascending 1-D coordinates ``(z, y, x)`` in mm, scanner frame.

    Returns:
        A :class:`~medssl.synth.shapes.Canvas` with ``tissue`` (:class:`Tissue` codes)
        and ``label`` (``LABELS`` codes) uint8 maps of shape ``(Z, Y, X)``.
    """
    canvas = Canvas(
        [np.asarray(a, dtype=np.float64) - o for a, o in zip(axes, anatomy.offset, strict=True)]
    )
    trunk = anatomy.trunk
    regions, diaphragm = _paint_trunk(canvas, trunk)
    for stroke in anatomy.muscles:
        _paint_stroke(canvas, stroke, regions)
    _paint_spine(canvas, trunk)
    _paint_ribs(canvas, trunk, regions)
    for stroke in anatomy.viscera:
        _paint_stroke(canvas, stroke, regions)
    _paint_lungs(canvas, regions, diaphragm)
    return canvas


def _lookup(tissues: frozenset[Tissue]) -> np.ndarray:
    lut = np.zeros(256, dtype=bool)
    lut[[int(t) for t in tissues]] = True
    return lut


def _paint_stroke(canvas: Canvas, stroke: Stroke, regions: dict[str, np.ndarray]) -> None:
    onto = _lookup(stroke.onto)
    region = regions[stroke.region]
    for win, mask in stroke.shape.masks(canvas):
        mask = mask & region[win.slices]
        if stroke.clip is not None:
            mask &= stroke.clip.mask(win)
        canvas.paint(win, mask, int(stroke.tissue), stroke.label, onto)


def _paint_trunk(canvas: Canvas, t: Trunk) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Body, subcutaneous fat, muscle wall; returns the regions and the diaphragm height (Y, X)."""
    z, y, x = canvas.open_grid
    y2, x2 = y[0], x[0]  # (Y, 1), (1, X)
    # Outline scale per voxel: widening towards the ribs, and a smooth irregularity.
    limit = (1.0 + t.taper * z / 100.0) * (1.0 + t.amplitude * t.field.sample(*canvas.axes))

    def outline(ant: float, lat: float, post: float) -> np.ndarray:
        """Relative radius of the cavity outline grown by the given thicknesses (mm)."""
        semi_y = np.where(y2 < 0, t.ay_ant + ant, t.ay_post + post)
        return np.sqrt((x2 / (t.ax + lat)) ** 2 + (y2 / semi_y) ** 2).astype(np.float32)

    fat_a, fat_l, fat_p = t.fat
    w = t.wall
    body = outline(fat_a + w, fat_l + w, fat_p + w) < limit
    inner = outline(w, w, w) < limit
    cavity = outline(0.0, 0.0, 0.0) < limit
    canvas.tissue[body] = Tissue.FAT
    canvas.tissue[inner] = Tissue.MUSCLE
    canvas.tissue[cavity] = Tissue.FAT

    domes = []
    for dz, dy, dx in t.domes:
        spread = ((x2 - dx) / (0.52 * t.ax)) ** 2 + ((y2 - dy) / t.ay_post) ** 2
        domes.append(dz - 45.0 * spread)
    diaphragm = np.maximum(*domes).astype(np.float32)  # (Y, X) height in mm
    below = z < diaphragm[None]
    regions = {
        "inner": inner,
        "cavity": cavity,
        "abdomen": cavity & below,
        "thorax": cavity & ~below,
    }
    return regions, diaphragm


def _paint_spine(canvas: Canvas, t: Trunk) -> None:
    """Vertebral bodies (cortex, marrow, discs), canal, arch, spinous and transverse processes."""
    sway = t.spine_curve * 2.5
    win = canvas.window((-np.inf, t.spine_y - 25.0, -60.0), (np.inf, t.spine_y + 70.0 + sway, 60.0))
    if win is None:
        return
    z, y, x = win.z, win.y, win.x
    dy = y - (t.spine_y + t.spine_curve * (z / 100.0) ** 2)  # (n, m, 1)
    level = np.mod(z - t.disc_phase, _VERTEBRA_PERIOD)  # (n, 1, 1)
    disc = level < _DISC_HEIGHT
    vertebra = (dy / 16.0) ** 2 + (x / 20.0) ** 2 < 1.0
    marrow = (dy / 12.5) ** 2 + (x / 16.5) ** 2 < 1.0
    canal = (dy - 26.0) ** 2 + x**2
    arch = (canal < 16.0**2) & (dy > 14.0)
    spinous = ((dy - 46.0) / 14.0) ** 2 + (x / 4.5) ** 2 < 1.0
    transverse = (((dy - 22.0) / 5.0) ** 2 + ((np.abs(x) - 28.0) / 12.0) ** 2 < 1.0) & (
        (level > 14.0) & (level < 24.0)
    )
    not_air = np.ones(256, dtype=bool)
    not_air[Tissue.AIR] = False
    canvas.paint(win, vertebra | arch | spinous | transverse, Tissue.BONE, onto=not_air)
    canvas.paint(win, marrow & ~disc, Tissue.MARROW, onto=not_air)
    canvas.paint(win, vertebra & disc, Tissue.DISC, onto=not_air)
    canvas.paint(win, canal < 9.0**2, Tissue.CSF, onto=not_air)


def _paint_ribs(canvas: Canvas, t: Trunk, regions: dict[str, np.ndarray]) -> None:
    """Oblique rib bands in the muscle wall of the upper abdomen."""
    wall = regions["inner"] & ~regions["cavity"]
    iz, iy, ix = np.nonzero(wall)
    z, y, x = (a[i] for a, i in zip(canvas.axes, (iz, iy, ix), strict=True))
    anterior = np.clip(-y / t.ay_ant, 0.0, 1.0)
    lowest = -35.0 + 110.0 * anterior**2  # the costal margin climbs towards the front
    phase = np.mod(z - 0.5 * y - t.rib_phase, _RIB_PERIOD)
    # No ribs over the spine, nor at the front midline (the xiphoid gap).
    rib = (z > lowest) & (phase < _RIB_WIDTH) & (np.abs(x) > 45.0)
    rib &= canvas.tissue[iz, iy, ix] == Tissue.MUSCLE
    canvas.tissue[iz[rib], iy[rib], ix[rib]] = Tissue.BONE


def _paint_lungs(canvas: Canvas, regions: dict[str, np.ndarray], diaphragm: np.ndarray) -> None:
    """Diaphragm muscle and lung bases in the thorax; the mediastinum stays fat."""
    z, y, x = canvas.open_grid
    thorax = regions["thorax"]
    fat = canvas.tissue == Tissue.FAT
    muscle_band = thorax & (z < diaphragm[None] + 5.0) & fat
    mediastinum = (np.abs(x[0] - 5.0) < 28.0) & (y[0] > -40.0)  # (Y, X)
    lung = thorax & fat & ~muscle_band & ~mediastinum[None]
    canvas.tissue[muscle_band] = Tissue.MUSCLE
    canvas.tissue[lung] = Tissue.LUNG
