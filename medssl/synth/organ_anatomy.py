"""The anatomy of a synthetic abdominal subject, drawn from a seed.

:func:`sample_anatomy` writes a subject in the vocabulary of
:mod:`medssl.synth.organ_scene`, in mm in the anatomy frame. It depends only on
its seed, so one subject seen by two imaging domains has the same organs in the
same places; :mod:`medssl.synth.organ_raster` draws it onto a grid and
:mod:`medssl.synth.domains` turns tissues into intensities.

Variation between subjects: body width, depth and fat thickness; organ
positions (scaled with the body, plus independent shifts), sizes, small
rotations and smooth lobulation of every organ surface; the course of the
vessels, stomach, colon and small bowel; diaphragm height.
"""

from __future__ import annotations

import numpy as np

from medssl.synth.organ_scene import (
    AORTA,
    FAT_ONLY,
    GALLBLADDER,
    IVC,
    LEFT_ADRENAL,
    LEFT_KIDNEY,
    LIVER,
    ORGAN_ONTO,
    PANCREAS,
    RIGHT_ADRENAL,
    RIGHT_KIDNEY,
    SPLEEN,
    STOMACH,
    Anatomy,
    Blob,
    Clip,
    Stroke,
    Tissue,
    Trunk,
    Tube,
)
from medssl.synth.shapes import LatticeField, rotation

__all__ = ["sample_anatomy"]


class _Sampler:
    """Draws one subject; holds the random generator and the body scale."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        sx = rng.uniform(0.88, 1.12)
        self.scale = np.array([rng.uniform(0.92, 1.08), sx * rng.uniform(0.94, 1.06), sx])
        self.shift = rng.normal(0.0, 5.0, 3)  # all viscera together, relative to the body

    def point(self, nominal: tuple[float, float, float], jitter: float) -> np.ndarray:
        """A nominal ``(z, y, x)`` point scaled to this body, shifted, jittered (mm)."""
        return np.asarray(nominal) * self.scale + self.shift + self.rng.normal(0.0, jitter, 3)

    def polyline(self, nominal: list[tuple[float, float, float]], jitter: float) -> np.ndarray:
        """Vertices ``(n, 3)`` of a path, each jittered independently."""
        return np.stack([self.point(p, jitter) for p in nominal])

    def size(self, spread: float) -> float:
        """A subject-specific size factor (log-normal)."""
        return float(np.exp(self.rng.normal(0.0, spread)))

    def blob(
        self,
        centre: tuple[float, float, float],
        radii: tuple[float, float, float],
        angles: tuple[float, float, float],
        *,
        jitter: float = 6.0,
        spread: float = 0.1,
        lobulation: float = 0.1,
    ) -> Blob:
        """A lobulated ellipsoid around nominal ``centre`` / ``radii`` (mm) and ``angles`` (deg)."""
        c = self.point(centre, jitter)
        r = np.asarray(radii) * self.scale * self.size(spread) * np.exp(self.rng.normal(0, 0.05, 3))
        rot = rotation(np.asarray(angles) + self.rng.normal(0.0, 6.0, 3))
        reach = float(r.max()) * 1.5
        step = max(float(np.mean(r)) * 0.4, 5.0)
        field = LatticeField.draw(self.rng, c - reach, c + reach, step)
        return Blob(tuple(c), tuple(r), rot, field, lobulation)

    def tube(
        self, nominal: list[tuple[float, float, float]], radii: list[float], *, jitter: float = 4.0
    ) -> Tube:
        """A tube along a jittered nominal path; radii scale with the subject."""
        pts = self.polyline(nominal, jitter)
        return Tube(pts, np.asarray(radii) * self.size(0.08))

    def walk(self, lo: np.ndarray, hi: np.ndarray, steps: int, step_mm: float) -> np.ndarray:
        """A persistent random walk ``(steps + 1, 3)`` mm kept inside the box ``[lo, hi]``."""
        p = self.rng.uniform(lo, hi)
        d = self.rng.normal(size=3)
        points = [p]
        for _ in range(steps):
            d = d / np.linalg.norm(d) + 0.9 * self.rng.normal(size=3)
            d /= np.linalg.norm(d)
            q = p + step_mm * d
            outside = (q < lo) | (q > hi)
            d[outside] *= -1.0
            p = np.clip(p + step_mm * d, lo, hi)
            points.append(p)
        return np.stack(points)


def _trunk(s: _Sampler) -> Trunk:
    rng = s.rng
    obese = rng.uniform(0.5, 1.7)
    ay_post = 78.0 * s.scale[1]
    # The viscera and the diaphragm move together (breathing, body habitus).
    dome_r = 110.0 * s.scale[0] + s.shift[0] + rng.normal(0.0, 3.0)
    dome_l = dome_r - rng.uniform(5.0, 20.0)
    return Trunk(
        ax=130.0 * s.scale[2],
        ay_ant=88.0 * s.scale[1] * rng.uniform(0.95, 1.08),
        ay_post=ay_post,
        fat=(20.0 * obese * rng.uniform(0.8, 1.2), 18.0 * obese, 13.0 * obese),
        wall=rng.uniform(7.0, 11.0),
        taper=rng.uniform(0.02, 0.06),
        field=LatticeField.draw(rng, (-300.0, -150.0, -200.0), (300.0, 150.0, 200.0), 45.0),
        amplitude=0.03,
        spine_y=ay_post - 40.0,
        spine_curve=rng.uniform(0.0, 8.0),
        disc_phase=rng.uniform(0.0, 36.0),
        rib_phase=rng.uniform(0.0, 30.0),
        domes=(
            (dome_r, 0.0, -55.0 * s.scale[2]),
            (dome_l, 5.0, 60.0 * s.scale[2]),
        ),
    )


def _muscles(s: _Sampler, spine_y: float) -> tuple[Stroke, ...]:
    """Paraspinal and psoas muscles, placed relative to the spine (body frame, not the viscera)."""
    strokes = []
    for side in (-1.0, 1.0):
        centre = np.array([0.0, spine_y + 45.0, side * 38.0 * s.scale[2]])
        half = np.array([300.0, 40.0, 45.0])
        para = Blob(
            tuple(centre),
            tuple(np.array([400.0, 22.0, 28.0]) * s.size(0.12)),
            np.eye(3),
            LatticeField.draw(s.rng, centre - half, centre + half, 15.0),
            0.08,
        )
        psoas = Tube(
            np.stack(
                [
                    (40.0, spine_y + 4.0, side * 22.0),
                    (-40.0, spine_y, side * 36.0),
                    (-160.0, spine_y - 12.0, side * 52.0),
                ]
            )
            * [1.0, 1.0, s.scale[2]],
            np.array([4.0, 15.0, 22.0]) * s.size(0.12),
        )
        strokes += [
            Stroke(para, Tissue.MUSCLE, 0, "inner", FAT_ONLY),
            Stroke(psoas, Tissue.MUSCLE, 0, "cavity", FAT_ONLY),
        ]
    return tuple(strokes)


def _bowel(s: _Sampler) -> list[Stroke]:
    colon = s.tube(
        [
            (-170.0, 10.0, -85.0),
            (-60.0, 5.0, -95.0),
            (-5.0, -10.0, -90.0),
            (5.0, -45.0, -70.0),
            (-15.0, -72.0, -20.0),
            (-10.0, -70.0, 30.0),
            (25.0, -35.0, 85.0),
            (10.0, 15.0, 98.0),
            (-60.0, 25.0, 95.0),
            (-170.0, 15.0, 80.0),
        ],
        [24, 24, 23, 22, 21, 20, 19, 18, 17, 17],
    )
    stool = LatticeField.draw(s.rng, (-200.0, -110.0, -140.0), (60.0, 60.0, 140.0), 9.0)
    strokes = [
        Stroke(colon, Tissue.BOWEL, 0, "abdomen", FAT_ONLY),
        Stroke(colon.thinner(3.0), Tissue.COLON_CONTENT, 0, "abdomen", frozenset({Tissue.BOWEL})),
        Stroke(
            colon.thinner(3.0),
            Tissue.GAS,
            0,
            "abdomen",
            frozenset({Tissue.COLON_CONTENT}),
            Clip(field=stool, above=s.rng.uniform(-0.1, 0.6)),
        ),
    ]
    lo = np.array([-150.0, -85.0, -85.0]) * s.scale
    hi = np.array([-5.0, 20.0, 85.0]) * s.scale
    for _ in range(8):
        loop = Tube(s.walk(lo, hi, 14, 22.0), np.full(15, 13.0 * s.size(0.1)))
        strokes.append(Stroke(loop, Tissue.BOWEL, 0, "abdomen", FAT_ONLY))
    return strokes


def _liver(s: _Sampler) -> list[Stroke]:
    right = s.blob((58.0, -5.0, -70.0), (72.0, 85.0, 68.0), (0, 0, 0), spread=0.06)
    left = s.blob((58.0, -50.0, 10.0), (42.0, 32.0, 60.0), (-12.0, 12.0, 0), spread=0.1)
    portal = s.tube(
        [(5.0, -15.0, -5.0), (35.0, -10.0, -35.0), (50.0, -5.0, -75.0), (60.0, 0.0, -105.0)],
        [7.0, 7.0, 5.0, 3.0],
    )
    portal_left = s.tube(
        [(35.0, -10.0, -35.0), (55.0, -40.0, -5.0), (70.0, -55.0, 25.0)], [5, 4, 3]
    )
    veins = [
        s.tube([(105.0, 0.0, -25.0), (85.0, -10.0, -70.0), (60.0, -20.0, -110.0)], [6, 5, 3]),
        s.tube([(105.0, 0.0, -25.0), (80.0, -40.0, -45.0), (55.0, -60.0, -55.0)], [5, 4, 3]),
        s.tube([(105.0, 0.0, -25.0), (90.0, -40.0, -5.0), (75.0, -60.0, 20.0)], [5, 4, 3]),
    ]
    into_liver = frozenset({Tissue.LIVER})
    strokes = [
        Stroke(right, Tissue.LIVER, LIVER, "abdomen", ORGAN_ONTO),
        Stroke(left, Tissue.LIVER, LIVER, "abdomen", ORGAN_ONTO),
    ]
    for vessel in (portal, portal_left, *veins):
        strokes.append(Stroke(vessel, Tissue.VESSEL, LIVER, "abdomen", into_liver))
    strokes.append(Stroke(portal, Tissue.VESSEL, 0, "abdomen", FAT_ONLY))
    return strokes


def _stomach(s: _Sampler) -> list[Stroke]:
    wall = s.tube(
        [
            (85.0, 20.0, 50.0),
            (60.0, -15.0, 60.0),
            (35.0, -45.0, 45.0),
            (25.0, -58.0, 15.0),
            (25.0, -45.0, -12.0),
        ],
        [30.0, 29.0, 24.0, 17.0, 10.0],
    )
    lumen = wall.thinner(4.0)
    # Supine patient: an air-fluid level 25-45 mm below the most anterior point of the lumen.
    gas_level = float((lumen.points[:, 1] - lumen.radii).min() + s.rng.uniform(25.0, 45.0))
    return [
        Stroke(wall, Tissue.STOMACH_WALL, STOMACH, "abdomen", ORGAN_ONTO),
        Stroke(lumen, Tissue.STOMACH_CONTENT, STOMACH, "abdomen", frozenset({Tissue.STOMACH_WALL})),
        Stroke(
            lumen,
            Tissue.GAS,
            STOMACH,
            "abdomen",
            frozenset({Tissue.STOMACH_CONTENT}),
            Clip(anterior_of=gas_level),
        ),
    ]


def _spleen(s: _Sampler) -> Stroke:
    spleen = s.blob((58.0, 38.0, 84.0), (48.0, 50.0, 28.0), (-35.0, 0, 10.0), spread=0.1)
    return Stroke(spleen, Tissue.SPLEEN, SPLEEN, "abdomen", ORGAN_ONTO)


def _kidneys(s: _Sampler) -> list[Stroke]:
    strokes = []
    for side, label, z in ((1.0, LEFT_KIDNEY, -20.0), (-1.0, RIGHT_KIDNEY, -38.0)):
        kidney = s.blob(
            (z, 25.0, side * 72.0),
            (50.0, 26.0, 24.0),
            (side * 25.0, side * 12.0, -10.0),
            spread=0.08,
        )
        c = np.asarray(kidney.centre)
        hilum_dir = np.array([0.0, -0.5, -side * 0.87])
        hilum = s.blob(tuple(c + 20.0 * hilum_dir), (16.0, 9.0, 9.0), (0, 0, 0), jitter=1.0)
        ivc_x = -22.0 * s.scale[2]
        vein = Tube(
            np.stack(
                [c + 18.0 * hilum_dir, c + np.array([0.0, -30.0, -side * 40.0]), (z, 5.0, ivc_x)]
            ),
            np.array([5.0, 5.0, 5.0]),
        )
        strokes += [
            Stroke(kidney, Tissue.KIDNEY, label, "abdomen", ORGAN_ONTO),
            Stroke(hilum, Tissue.FAT, 0, "abdomen", frozenset({Tissue.KIDNEY})),
            Stroke(vein, Tissue.VESSEL, 0, "abdomen", FAT_ONLY),
        ]
    return strokes


def _small_organs(s: _Sampler) -> list[Stroke]:
    pancreas = s.tube(
        [
            (0.0, -22.0, -32.0),
            (8.0, -30.0, -8.0),
            (15.0, -20.0, 22.0),
            (28.0, 2.0, 52.0),
            (38.0, 18.0, 70.0),
        ],
        [16.0, 11.0, 11.0, 10.0, 8.0],
    )
    gallbladder = s.blob((20.0, -50.0, -50.0), (28.0, 13.0, 13.0), (20.0, 0, -25.0), spread=0.15)
    return [
        Stroke(pancreas, Tissue.PANCREAS, PANCREAS, "abdomen", ORGAN_ONTO),
        Stroke(gallbladder, Tissue.GALLBLADDER, GALLBLADDER, "abdomen", ORGAN_ONTO),
    ]


def _great_vessels(s: _Sampler) -> list[Stroke]:
    ivc = s.tube(
        [(130.0, -5.0, -15.0), (100.0, 0.0, -25.0), (40.0, 5.0, -25.0), (-110.0, 8.0, -20.0)],
        [13.0, 12.0, 11.0, 11.0],
        jitter=3.0,
    )
    aorta = s.tube(
        [(150.0, 25.0, 22.0), (90.0, 8.0, 12.0), (0.0, 2.0, 10.0), (-110.0, 0.0, 6.0)],
        [12.0, 11.5, 10.5, 9.0],
        jitter=3.0,
    )
    bifurcation = tuple(aorta.points[-1])
    iliacs = [
        Tube(
            np.stack([bifurcation, s.point((-180.0, 10.0, side * 45.0), 4.0)]), np.array([6.0, 6.0])
        )
        for side in (-1.0, 1.0)
    ]
    strokes = [
        Stroke(ivc, Tissue.IVC, IVC, "cavity", ORGAN_ONTO),
        Stroke(aorta, Tissue.AORTA, AORTA, "cavity", ORGAN_ONTO),
    ]
    strokes += [Stroke(t, Tissue.VESSEL, 0, "abdomen", ORGAN_ONTO - {Tissue.AORTA}) for t in iliacs]
    return strokes


def _adrenals(s: _Sampler) -> list[Stroke]:
    strokes = []
    for label, apex, feet in (
        (RIGHT_ADRENAL, (58.0, 25.0, -36.0), ((30.0, 36.0, -46.0), (32.0, 18.0, -30.0))),
        (LEFT_ADRENAL, (42.0, 20.0, 34.0), ((15.0, 32.0, 44.0), (17.0, 12.0, 30.0))),
    ):
        pts = s.polyline([feet[0], apex, feet[1]], 2.0)
        r = 4.5 * s.size(0.1)
        strokes.append(
            Stroke(
                Tube(pts, np.array([r * 0.8, r, r * 0.8])),
                Tissue.ADRENAL,
                label,
                "abdomen",
                ORGAN_ONTO,
            )
        )
    return strokes


def _heart(s: _Sampler) -> Stroke:
    """The heart on the central diaphragm (nominal dome height 110 mm), above the abdomen."""
    heart = s.blob((140.0, -30.0, 25.0), (55.0, 55.0, 70.0), (20, 0, 0))
    return Stroke(heart, Tissue.HEART, 0, "thorax", FAT_ONLY)


def sample_anatomy(seed: int) -> Anatomy:
    """Draw a subject's anatomy from ``seed`` alone (no grid, no domain).

    Args:
        seed: non-negative integer.

    Returns:
        The :class:`Anatomy`; rasterise it with :func:`medssl.synth.organ_raster.rasterise`.
    """
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    s = _Sampler(np.random.default_rng([seed, 0]))
    trunk = _trunk(s)
    offset = (s.rng.uniform(-15.0, 15.0), s.rng.normal(0.0, 6.0), s.rng.normal(0.0, 6.0))
    muscles = _muscles(s, trunk.spine_y)
    viscera = [
        *_bowel(s),
        *_liver(s),
        *_stomach(s),
        _spleen(s),
        *_kidneys(s),
        *_small_organs(s),
        *_great_vessels(s),
        *_adrenals(s),
        _heart(s),
    ]
    return Anatomy(seed, offset, trunk, muscles, tuple(viscera))
