"""Lung nodules and their look-alikes for the synthetic chest CT: shapes, placement, drawing.

World points are LPS ``(x, y, z)`` in mm; arrays are indexed ``(z, y, x)``.

A lesion is one or more star-shaped solids (:class:`LesionShape`): a sphere of
radius ``R`` whose surface radius along a direction ``u`` is perturbed by a
few smooth harmonics (lobulation) and narrow spikes (spiculation). Solid
nodules are one sharp solid; ground-glass nodules one hazy solid (a wider
partial-volume ramp); part-solid nodules a hazy halo around a solid core.

The annotated diameter is the *designed* diameter ``2 R``: twice the mean
surface radius of the lesion's outer solid over all directions, spikes
excluded, before a juxta-pleural nodule is cut by the pleura.

Locations (:data:`LOCATIONS`): a free nodule lies in aerated lung; a
juxta-pleural one touches the pleura; a juxta-vascular one lies in the
bronchovascular bundle, abutting a vessel -- along it or, half the time, at
a branching -- or, a fraction ``airway_share`` of the time (peribronchial),
the wall of a bronchus where it divides: its mean surface reaches into the
wall (:data:`~medssl.synth.chest_anatomy.AIRWAY_WALL`) but not the lumen.
:attr:`Nodule.attached_to` records which structure the nodule abuts
(:data:`ATTACHMENTS`).

Look-alikes come in two groups, scored differently (LUNA16 semantics):

* confusers (:data:`CONFUSER_KINDS`): micronodules below 3 mm (some calcified)
  and vessel crossings -- LUNA16's "irrelevant findings"
  (``annotations_excluded.csv``): a mark on one is neither a true nor a false
  positive;
* lookalikes (:data:`LOOKALIKE_KINDS`): calcified granulomas (3-8 mm, 400-1000
  HU: benign, Lung-RADS category 1) and scars (linear or band-like
  opacities, 10-30 mm long, 1.2-3 mm thick): findings a radiologist would not
  accept as nodules, so a mark on one is a false positive. They are in no
  annotation file (the LUNA16 layout lists them as class-0 candidates and in
  ``lookalikes.csv``). Unlike LIDC, whose readers also annotated calcified
  nodules of 3 mm or more, a benign-calcified granuloma here is not a nodule.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from medssl.synth.chest_anatomy import (
    AIRWAY_WALL,
    ChestAnatomy,
    ScanGrid,
    Tubes,
    round_coverage,
    sphere_directions,
    sphere_lung_occupancy,
)
from medssl.volume import float_triple

__all__ = [
    "ATTACHMENTS",
    "CONFUSER_KINDS",
    "LOCATIONS",
    "LOOKALIKE_KINDS",
    "MICRONODULE_DIAMETER",
    "NODULE_KINDS",
    "Confuser",
    "Lesion",
    "LesionShape",
    "Nodule",
    "check_shares",
    "paint_lesion",
    "place_lesions",
    "place_lookalikes",
]

_F32 = np.float32

NODULE_KINDS = ("solid", "part-solid", "ground-glass")
LOCATIONS = ("free", "juxta-pleural", "juxta-vascular")
#: What a nodule abuts (:attr:`Nodule.attached_to`): nothing (free), the pleura
#: (juxta-pleural), a vessel or an airway wall (juxta-vascular: the bronchovascular bundle).
ATTACHMENTS = ("none", "pleura", "vessel", "airway")
#: How a placement mode (a location, or a peribronchial juxta-vascular nodule) is recorded:
#: ``mode: (location, attached_to)``.
_RECORDED = {
    "free": ("free", "none"),
    "juxta-pleural": ("juxta-pleural", "pleura"),
    "juxta-vascular": ("juxta-vascular", "vessel"),
    "peribronchial": ("juxta-vascular", "airway"),
}
#: Draws (diameter, shape, location) per nodule before giving up on placing it.
NODULE_TRIES = 5
#: Diameters of micronodules (confusers below LUNA16's 3 mm threshold), mm.
MICRONODULE_DIAMETER = (1.0, 2.9)
#: Excluded look-alikes (a mark on one does not count) and false-positive ones (it does).
CONFUSER_KINDS = ("micronodule", "vessel-crossing")
LOOKALIKE_KINDS = ("granuloma", "scar")
#: Calcified granulomas: diameter (mm) and attenuation (HU) ranges.
GRANULOMA_DIAMETER = (3.0, 8.0)
GRANULOMA_HU = (400.0, 1000.0)
#: Scars: length, half-thickness (mm) and attenuation (HU) ranges.
SCAR_LENGTH = (10.0, 30.0)
SCAR_HALF_THICKNESS = (0.6, 1.5)
SCAR_HU = (-100.0, 40.0)


@dataclass(frozen=True)
class Nodule:
    """A nodule as annotated: centre LPS ``(x, y, z)`` mm, designed diameter mm (see module doc).

    ``attached_to`` (:data:`ATTACHMENTS`): what it abuts; a juxta-vascular nodule abuts a
    ``"vessel"`` or (peribronchial) an ``"airway"`` wall.
    """

    centre_lps: tuple[float, float, float]
    diameter_mm: float
    kind: str  # "solid" | "part-solid" | "ground-glass"
    location: str  # "free" | "juxta-pleural" | "juxta-vascular"
    label: int  # value of this nodule in ChestCase.nodule_mask
    attached_to: str = "none"  # "none" | "pleura" | "vessel" | "airway"


@dataclass(frozen=True)
class Confuser:
    """A nodule look-alike that is not a nodule (see the module doc for how each is scored).

    ``diameter_mm``: a granuloma's or micronodule's diameter, a crossing's bulge, a
    scar's length.
    """

    centre_lps: tuple[float, float, float]
    diameter_mm: float
    kind: str  # CONFUSER_KINDS (excluded) | LOOKALIKE_KINDS (false positives)


_DIRECTIONS = sphere_directions(512)


@dataclass(frozen=True)
class LesionShape:
    """A star-shaped solid around ``centre``; its surface radius along unit direction ``u`` is

    ``R * (1 + sum_k a_k (cos(w_k u.v_k + p_k) - m_k)) + sum_j L_j ((u.s_j - c_j) / (1 - c_j))+^2``

    where ``m_k`` is the mean of the cosine over the sphere, so the mean radius
    without spikes is exactly ``R``.

    Attributes:
        centre: LPS ``(x, y, z)`` mm. radius: ``R`` mm.
        lobes: ``(K, 6)`` rows ``(v_x, v_y, v_z, w, p, a)``.
        spikes: ``(S, 5)`` rows ``(s_x, s_y, s_z, c, L)``.
    """

    centre: np.ndarray
    radius: float
    lobes: np.ndarray
    spikes: np.ndarray

    @cached_property
    def extent(self) -> float:
        """Largest surface radius, mm (bounds the solid; lobes sampled in 512 directions)."""
        u = _DIRECTIONS
        surface = np.full(len(u), self.radius)
        for vx, vy, vz, w, p, a in self.lobes:
            mean = np.cos(p) * np.sin(w) / w
            surface += self.radius * a * (np.cos(u @ np.array([vx, vy, vz]) * w + p) - mean)
        spike = float(self.spikes[:, 4].max()) if len(self.spikes) else 0.0
        return float(surface.max()) * 1.02 + spike

    def moved(self, centre: np.ndarray) -> LesionShape:
        """The same solid around another centre."""
        return LesionShape(
            np.asarray(centre, dtype=np.float64), self.radius, self.lobes, self.spikes
        )

    def field(
        self,
        x: np.ndarray,
        y: np.ndarray,
        z: np.ndarray,
        spacing_xyz: tuple[float, float, float],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rho, surface_radius, width)``: distance from the centre, surface radius along

        that direction and voxel width along it, float32 mm of the broadcast shape.
        """
        dx, dy, dz = x - _F32(self.centre[0]), y - _F32(self.centre[1]), z - _F32(self.centre[2])
        rho = np.sqrt(dx * dx + dy * dy + dz * dz)
        inv = 1.0 / np.maximum(rho, _F32(1e-3))
        ux, uy, uz = dx * inv, dy * inv, dz * inv
        surface = np.full(rho.shape, self.radius, dtype=_F32)
        for vx, vy, vz, w, p, a in self.lobes:
            mean = np.cos(p) * np.sin(w) / w
            cos = np.cos((ux * _F32(vx) + uy * _F32(vy) + uz * _F32(vz)) * _F32(w) + _F32(p))
            surface += _F32(self.radius * a) * (cos - _F32(mean))
        for sx, sy, sz, c, length in self.spikes:
            t = (ux * _F32(sx) + uy * _F32(sy) + uz * _F32(sz) - _F32(c)) * _F32(1.0 / (1.0 - c))
            np.maximum(t, 0.0, out=t)
            surface += _F32(length) * t * t
        px, py, pz = spacing_xyz
        width = np.abs(ux) * _F32(px) + np.abs(uy) * _F32(py) + np.abs(uz) * _F32(pz)
        return rho, surface, width


@dataclass(frozen=True)
class Lesion:
    """What is drawn for one nodule or confuser.

    Attributes:
        layers: ``(shape, hu, haze_mm)`` drawn in order, each raising the image
            towards ``hu`` where it covers the voxel; ``haze_mm`` widens the
            edge. The first layer is the lesion's outline (the mask).
        label: value in the nodule mask; 0 for confusers (not in the mask).
        record: the annotation.
    """

    layers: tuple[tuple[LesionShape, float, float], ...]
    label: int
    record: Nodule | Confuser

    @cached_property
    def extent(self) -> float:
        """Largest distance from the annotated centre to the lesion's surface, mm."""
        return max(
            shape.extent + float(np.linalg.norm(shape.centre - self.centre))
            for shape, _, _ in self.layers
        )

    @property
    def centre(self) -> np.ndarray:
        """The annotated centre, LPS ``(x, y, z)`` mm."""
        return np.asarray(self.record.centre_lps, dtype=np.float64)


# -- drawing shapes -------------------------------------------------------------------------------


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _shape(
    rng: np.random.Generator,
    radius: float,
    lobulation: float,
    n_spikes: int,
) -> LesionShape:
    """A solid of mean radius ``radius`` mm around the origin.

    ``lobulation``: the sum of the lobe amplitudes (relative to the radius).
    """
    k = 3
    lobes = np.column_stack(
        [
            _unit(rng, k),
            rng.uniform(2.0, 5.0, k),
            rng.uniform(0, 2 * np.pi, k),
            lobulation * rng.dirichlet(np.ones(k)),
        ]
    )
    spikes = np.zeros((0, 5))
    if n_spikes:
        lengths = np.minimum(rng.uniform(0.4, 1.0, n_spikes) * radius, 12.0)
        spikes = np.column_stack(
            [_unit(rng, n_spikes), np.cos(np.radians(rng.uniform(6, 12, n_spikes))), lengths]
        )
    return LesionShape(np.zeros(3), radius, lobes, spikes)


def _nodule_layers(
    rng: np.random.Generator,
    diameter: float,
    kind: str,
) -> tuple[tuple[LesionShape, float, float], ...]:
    """Layers of a nodule of designed ``diameter`` mm around the origin."""
    radius = diameter / 2
    solid_hu = rng.uniform(15, 60)
    ggo_hu = rng.uniform(-650, -350)
    style = rng.choice(["round", "lobulated", "spiculated"], p=[0.4, 0.4, 0.2])
    if diameter < 5 or (style == "spiculated" and (kind == "ground-glass" or diameter < 8)):
        style = "round"
    lobulation = rng.uniform(0.0, 0.06) if style == "round" else rng.uniform(0.12, 0.3)
    n_spikes = int(rng.integers(6, 13)) if style == "spiculated" else 0
    outer = _shape(rng, radius, lobulation, n_spikes)
    if kind == "solid":
        return ((outer, solid_hu, 0.0),)
    haze = rng.uniform(0.8, 2.0)
    if kind == "ground-glass":
        return ((outer, ggo_hu, haze),)
    core_r = rng.uniform(0.3, 0.6) * radius
    offset = _unit(rng, 1)[0] * rng.uniform(0, 0.25) * radius
    core = _shape(rng, core_r, rng.uniform(0.0, 0.15), 0).moved(offset)
    return ((outer, ggo_hu, haze), (core, solid_hu, 0.0))


def _draw_diameter(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Truncated log-normal between ``lo`` and ``hi``: mostly small, a long tail of large ones."""
    if hi <= lo:
        return lo
    span = np.log(hi / lo)
    while True:
        d = lo * np.exp(rng.normal(0.3 * span, 0.35 * span))
        if lo <= d <= hi:
            return float(d)


def _draw_kind(rng: np.random.Generator, diameter: float, shares: tuple[float, ...]) -> str:
    """A kind from :data:`NODULE_KINDS` with probabilities ``shares``; part-solid needs 6 mm."""
    kind = str(rng.choice(NODULE_KINDS, p=shares))
    return "solid" if kind == "part-solid" and diameter < 6 else kind


# -- placement ------------------------------------------------------------------------------------

_NO_TUBES = Tubes.concat([])


@dataclass(frozen=True)
class _Placer:
    """Finds lesion centres in the lungs, inside the scan, apart from each other."""

    anatomy: ChestAnatomy
    grid: ScanGrid
    vessels: Tubes
    rng: np.random.Generator
    airways: Tubes = _NO_TUBES  # none: no peribronchial places

    @property
    def widths(self) -> tuple[float, float]:
        sx, _, sz = self.grid.spacing_xyz
        return sx, sz

    def _box(self, margin: float) -> tuple[np.ndarray, np.ndarray]:
        """Where centres may lie: ``margin`` mm inside the grid (and its breathing shift

        along z, so a lesion stays in the field of view) and inside the lungs' box.
        """
        lo, hi = self.grid.box()
        llo, lhi = self.anatomy.lung_box()
        pad = np.array([margin, margin, margin + self.grid.motion_mm])
        return np.maximum(lo + pad, llo), np.minimum(hi - pad, lhi)

    def _apart(
        self,
        centres: np.ndarray,
        extent: float,
        placed: list[Lesion],
        gap: float,
    ) -> np.ndarray:
        ok = np.ones(len(centres), dtype=bool)
        for other in placed:
            ok &= np.linalg.norm(centres - other.centre, axis=1) > extent + other.extent + gap
        return ok

    def _centre_inside(self, centres: np.ndarray) -> np.ndarray:
        """True where the voxel holding the centre lies wholly in the lung, and a sphere

        of the voxel's half-diagonal around the centre too.
        """
        vox = self.grid.voxel_centre(centres)
        occ = self.anatomy.lung_occupancy(vox[:, 0], vox[:, 1], vox[:, 2], *self.widths)
        half_diag = 0.5 * float(np.linalg.norm(self.grid.spacing)) + 0.3
        shell = sphere_lung_occupancy(
            self.anatomy, centres, np.full(len(centres), half_diag), *self.widths, n_directions=14
        )
        return (occ >= 1) & (shell.min(axis=1) >= 1)

    def find(
        self, location: str, extent: float, radius: float, placed: list[Lesion], gap: float
    ) -> np.ndarray | None:
        """A centre for a lesion of outer ``extent`` and mean ``radius`` (mm), or None.

        ``location``: a placement mode of :data:`_RECORDED`.
        """
        lo, hi = self._box(extent + 1.0)
        if np.any(hi <= lo):
            return None
        for _ in range(40):
            if location == "juxta-vascular":
                cand = self._near_vessels(64, radius, lo, hi)
            elif location == "peribronchial":
                cand = self._at_airway_branchings(32, radius, lo, hi)
            else:  # half uniform, half near the centre of the field of view (deep in a lung)
                mid, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
                cand = np.concatenate(
                    [
                        self.rng.uniform(lo, hi, size=(64, 3)),
                        np.clip(mid + 0.3 * half * self.rng.standard_normal((64, 3)), lo, hi),
                    ]
                )
            if len(cand) == 0:
                return None
            cand = cand[self._apart(cand, extent, placed, gap)]
            cand = cand[self._centre_inside(cand)] if len(cand) else cand
            if len(cand) == 0:
                continue
            cand = cand[:32]
            if location == "juxta-pleural":
                shell = sphere_lung_occupancy(
                    self.anatomy, cand, np.full(len(cand), radius), *self.widths
                )
                outside = (shell < 0.5).mean(axis=1)
                ok = (outside > 0.0) & (outside <= 0.3)
            else:
                shell = sphere_lung_occupancy(
                    self.anatomy, cand, np.full(len(cand), extent + 1.5), *self.widths
                )
                ok = shell.min(axis=1) >= 1
            if ok.any():
                return cand[np.argmax(ok)]
        return None

    def _segments(self, r_lo: float, r_hi: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Indices of lung vessel segments of mean radius in ``[r_lo, r_hi]`` inside the box."""
        v = self.vessels
        mid = 0.5 * (v.start + v.end)
        r = 0.5 * (v.r0 + v.r1)
        ok = v.clipped & (r >= r_lo) & (r <= r_hi) & np.all((mid >= lo) & (mid <= hi), axis=1)
        return np.flatnonzero(ok)

    def _on_vessels(
        self,
        n: int,
        lo: np.ndarray,
        hi: np.ndarray,
        r_lo: float,
        r_hi: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``n`` random points on vessel axes: ``(points, axis unit vectors, radii, normals)``."""
        segs = self._segments(r_lo, r_hi, lo, hi)
        if len(segs) == 0:
            return (np.zeros((0, 3)),) * 2 + (np.zeros(0), np.zeros((0, 3)))
        k = segs[self.rng.integers(0, len(segs), n)]
        t = self.rng.uniform(0.15, 0.85, n)[:, None]
        v = self.vessels
        axis = v.end[k] - v.start[k]
        points = v.start[k] + t * axis
        axis /= np.maximum(np.linalg.norm(axis, axis=1, keepdims=True), 1e-9)
        normal = np.cross(axis, _unit(self.rng, n))
        normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-9)
        radii = v.r0[k] + t[:, 0] * (v.r1[k] - v.r0[k])
        return points, axis, radii, normal

    @cached_property
    def _branchings(self) -> tuple[np.ndarray, np.ndarray]:
        """Where lung vessels divide: ``(points (B, 3) LPS mm, parent radii (B,) mm)``."""
        return self.vessels.branchings()

    @cached_property
    def _airway_branchings(self) -> tuple[np.ndarray, np.ndarray]:
        """Where lung airways divide: ``(points (B, 3) LPS mm, parent lumen radii (B,) mm)``."""
        return self.airways.branchings()

    def _at_airway_branchings(
        self,
        n: int,
        radius: float,
        lo: np.ndarray,
        hi: np.ndarray,
    ) -> np.ndarray:
        """Centres of peribronchial nodules of mean ``radius`` mm at airway branchings.

        From a branching inside the box (widened by the radius), a random direction;
        along it, the first point (0.2 mm steps) whose distance to every airway lumen
        is ``radius + g``, ``g`` drawn from 10-50 % of the local wall thickness: the
        nodule's mean surface reaches into the wall of the nearest airway (it abuts
        it) but not into any lumen. Only points whose mean surface comes within 1 mm
        of the parent's wall at the branching count (the nodule sits in the fork or
        on its shoulder); a direction along an airway reaches none and gives no
        centre. Returns ``(<= n, 3)`` LPS mm centres inside the box.
        """
        points, radii = self._airway_branchings
        near = np.all((points >= lo - radius) & (points <= hi + radius), axis=1)
        if not near.any():
            return np.zeros((0, 3))
        k = np.flatnonzero(near)[self.rng.integers(0, int(near.sum()), n)]
        u = _unit(self.rng, n)
        reach = self.rng.uniform(0.1, 0.5, n)
        a = self.airways
        scale, offset = AIRWAY_WALL
        fork = radii[k] * scale + offset + radius + 1.0  # farthest centre from the branching
        steps = np.arange(0.0, float(fork.max()) + 1e-9, 0.2)
        cand = points[k][:, None, :] + steps[None, :, None] * u[:, None, :]  # (n, S, 3)
        # only the airways that can be nearest a centre's surface (a centre lies within
        # `fork` of its branching): the others' lumens are too far from every branching
        dist, lumen = a.axis_distance(points[np.unique(k)])
        wall_max = float(np.maximum(a.r0, a.r1).max()) * (scale - 1.0) + offset
        mine = (dist - lumen).min(axis=0) <= float(fork.max()) + radius + wall_max + 0.5
        sub = Tubes(*(getattr(a, f)[mine] for f in ("start", "end", "r0", "r1", "clipped")))
        dist, lumen = sub.axis_distance(cand.reshape(-1, 3))
        clear = (dist - lumen).reshape(n, len(steps), -1)  # to each lumen's surface
        nearest = clear.argmin(axis=2)
        wall = (lumen * (scale - 1.0) + offset).reshape(n, len(steps), -1)
        wall = np.take_along_axis(wall, nearest[:, :, None], axis=2)[:, :, 0]
        gap = np.take_along_axis(clear, nearest[:, :, None], axis=2)[:, :, 0]
        ok = (gap >= radius + reach[:, None] * wall) & (steps[None, :] <= fork[:, None])
        found = ok.any(axis=1)
        first = ok.argmax(axis=1)
        out = cand[np.arange(n), first][found]
        return out[np.all((out >= lo) & (out <= hi), axis=1)]

    def _at_branchings(
        self,
        n: int,
        lo: np.ndarray,
        hi: np.ndarray,
        r_lo: float,
        r_hi: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` random vessel branchings inside the box: ``(points, parent radii)``."""
        points, radii = self._branchings
        ok = (radii >= r_lo) & (radii <= r_hi) & np.all((points >= lo) & (points <= hi), axis=1)
        if not ok.any():
            return np.zeros((0, 3)), np.zeros(0)
        k = np.flatnonzero(ok)[self.rng.integers(0, int(ok.sum()), n)]
        return points[k], radii[k]

    def _near_vessels(self, n: int, radius: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Centres of juxta-vascular nodules: overlapping a vessel by 15-60 % of their radius,

        half beside a vessel segment, half at a branching (in the crotch or beside it, so
        the nodule touches the parent vessel and usually a child).
        """
        points, _, radii, normal = self._on_vessels(n, lo - radius, hi + radius, 0.8, 3.5)
        fork, fork_r = self._at_branchings(n // 2, lo - radius, hi + radius, 0.8, 3.5)
        m = n - len(fork)
        points = np.concatenate([fork, points[:m]])
        radii = np.concatenate([fork_r, radii[:m]])
        normal = np.concatenate([_unit(self.rng, len(fork)), normal[:m]])
        offset = radii + radius * self.rng.uniform(0.4, 0.85, len(radii))
        cand = (points + offset[:, None] * normal)[self.rng.permutation(len(radii))]
        return cand[np.all((cand >= lo) & (cand <= hi), axis=1)]

    def vessel_crossing(
        self,
        placed: list[Lesion],
        vessel_hu: float,
    ) -> tuple[Lesion, Tubes] | None:
        """A bulge where a second vessel crosses a lung vessel, and that crossing vessel."""
        lo, hi = self._box(6.0)
        if np.any(hi <= lo):
            return None
        for _ in range(20):
            points, _axis, radii, normal = self._on_vessels(32, lo, hi, 0.9, 2.5)
            if len(points) == 0:
                return None
            half = self.rng.uniform(8, 15, len(points))[:, None]
            ends = np.concatenate([points - half * normal, points + half * normal])
            occ = self.anatomy.lung_occupancy(ends[:, 0], ends[:, 1], ends[:, 2], *self.widths)
            bulge = radii * self.rng.uniform(1.4, 1.8, len(points))
            ok = (occ[: len(points)] >= 1) & (occ[len(points) :] >= 1)
            ok &= np.all((points >= lo) & (points <= hi), axis=1)
            for i in np.flatnonzero(ok):
                c = points[i : i + 1]
                if not self._apart(c, bulge[i], placed, 3.0)[0]:
                    continue
                shell = sphere_lung_occupancy(self.anatomy, c, bulge[i : i + 1] + 2.0, *self.widths)
                if shell.min() < 1:
                    continue
                r_cross = radii[i] * self.rng.uniform(0.8, 1.0)
                crossing = Tubes(
                    points[i : i + 1] - half[i] * normal[i],
                    points[i : i + 1] + half[i] * normal[i],
                    np.array([r_cross]),
                    np.array([r_cross]),
                    np.array([True]),
                )
                shape = _shape(self.rng, float(bulge[i]), 0.05, 0).moved(points[i])
                record = Confuser(float_triple(points[i]), float(2 * bulge[i]), "vessel-crossing")
                return Lesion(((shape, vessel_hu, 0.0),), 0, record), crossing
        return None


def check_shares(name: str, shares: tuple[float, ...]) -> None:
    """Raise ValueError naming ``name`` unless ``shares`` are 3 probabilities summing to 1."""
    if len(shares) != 3 or min(shares) < 0 or abs(sum(shares) - 1) > 1e-6:
        raise ValueError(f"{name} must be 3 non-negative probabilities summing to 1, got {shares}")


def place_lesions(
    anatomy: ChestAnatomy,
    grid: ScanGrid,
    vessels: Tubes,
    rng: np.random.Generator,
    n_nodules: int,
    diameter_range: tuple[float, float],
    n_confusers: int,
    *,
    location_shares: tuple[float, float, float] = (0.5, 0.3, 0.2),
    kind_shares: tuple[float, float, float] = (0.65, 0.15, 0.2),
    airways: Tubes | None = None,
    airway_share: float = 0.0,
) -> tuple[list[Lesion], list[Lesion], Tubes]:
    """Draw and place nodules and confusers inside the scan grid's field of view.

    A nodule's location is drawn from :data:`LOCATIONS` with probabilities
    ``location_shares`` (a juxta-pleural or juxta-vascular nodule that finds no
    such place in the field of view becomes a free one, and is recorded so);
    its kind from :data:`NODULE_KINDS` with ``kind_shares``. A juxta-vascular
    nodule is peribronchial with probability ``airway_share``: it abuts the wall
    of one of ``airways`` where it divides (see the module doc), or, where none
    in the field of view has room, a vessel; ``Nodule.attached_to`` records
    which. ``airway_share`` 0 draws nothing more (the outputs of earlier
    versions).

    Nodules lie wholly in the lungs (juxta-pleural ones touch the pleura and
    are cut by it) and wholly in the field of view; the voxel holding a
    nodule's centre lies in the lung. Lesions keep 2 mm (nodules) or 3 mm
    (confusers) apart. Diameters are drawn from ``diameter_range`` capped at
    half the field of view's shortest side (a small crop holds small nodules
    only); a nodule that finds no room is drawn again, up to
    :data:`NODULE_TRIES` times.

    Returns:
        ``(nodules, confusers, crossing_vessels)``; nodule labels are 1, 2, ...

    Raises:
        RuntimeError: no room for a nodule: the field of view is too small for
            the diameter range, or holds too little lung.
        ValueError: shares that are not three non-negative numbers summing to 1,
            an ``airway_share`` outside ``[0, 1]``, or one above 0 without ``airways``.
    """
    check_shares("location_shares", location_shares)
    check_shares("kind_shares", kind_shares)
    if not 0 <= airway_share <= 1:
        raise ValueError(f"airway_share must be a probability in [0, 1], got {airway_share}")
    if airway_share > 0 and airways is None:
        raise ValueError(
            f"airway_share={airway_share} needs the airways (the tree "
            "draw_trees returns); pass airways=..."
        )
    placer = _Placer(anatomy, grid, vessels, rng, airways if airways is not None else _NO_TUBES)
    lo, hi = grid.box()
    where = f"the field of view {np.round(lo, 1).tolist()} .. {np.round(hi, 1).tolist()} mm"
    if grid.motion_mm:
        where += (
            f" (less {grid.motion_mm:.1f} mm of breathing motion at each end; "
            "motion_share=0 keeps it whole)"
        )
    d_lo, d_hi = diameter_range
    d_hi = min(d_hi, 0.5 * float(np.min(hi - lo)))
    if n_nodules and d_lo > d_hi:
        raise RuntimeError(
            f"no room for nodules of {d_lo:.1f} mm or more in {where} (they "
            "may span half its shortest side); use a larger matrix or n_slices"
        )
    nodules: list[Lesion] = []
    for label in range(1, n_nodules + 1):
        for _ in range(NODULE_TRIES):
            diameter = _draw_diameter(rng, d_lo, d_hi)
            kind = _draw_kind(rng, diameter, kind_shares)
            layers = _nodule_layers(rng, diameter, kind)
            extent = max(s.extent + float(np.linalg.norm(s.centre)) for s, _, _ in layers)
            first = str(rng.choice(LOCATIONS, p=location_shares))
            if first == "juxta-vascular" and airway_share > 0 and rng.uniform() < airway_share:
                first = "peribronchial"
            for mode in dict.fromkeys(
                (first, "juxta-vascular" if first == "peribronchial" else first, "free")
            ):
                centre = placer.find(mode, extent, diameter / 2, nodules, 2.0)
                if centre is not None:
                    break
            if centre is not None:
                break
        else:
            raise RuntimeError(
                f"no room for nodule {label} ({n_nodules} drawn, {d_lo:.1f}-{d_hi:.1f} mm) in "
                f"{where}; use a larger matrix or n_slices, or a smaller nodule_diameter_range"
            )
        location, attached_to = _RECORDED[mode]
        record = Nodule(float_triple(centre), float(diameter), kind, location, label, attached_to)
        nodules.append(
            Lesion(
                tuple((s.moved(s.centre + centre), hu, haze) for s, hu, haze in layers),
                label,
                record,
            )
        )

    confusers: list[Lesion] = []
    crossings: list[Tubes] = []
    for _ in range(n_confusers):
        if rng.uniform() < 0.5:
            found = placer.vessel_crossing(nodules + confusers, anatomy.hu.vessel)
            if found is not None:
                confusers.append(found[0])
                crossings.append(found[1])
                continue
        diameter = float(rng.uniform(*MICRONODULE_DIAMETER))
        calcified = rng.uniform() < 0.25
        hu = rng.uniform(250, 700) if calcified else rng.uniform(0, 60)
        shape = _shape(rng, diameter / 2, 0.03, 0)
        centre = placer.find("free", shape.extent, diameter / 2, nodules + confusers, 3.0)
        if centre is None:
            continue
        micronodule = Confuser(float_triple(centre), diameter, "micronodule")
        confusers.append(Lesion(((shape.moved(centre), hu, 0.0),), 0, micronodule))
    return nodules, confusers, Tubes.concat(crossings)


def place_lookalikes(
    anatomy: ChestAnatomy,
    grid: ScanGrid,
    vessels: Tubes,
    rng: np.random.Generator,
    n: int,
    placed: list[Lesion],
    *,
    granuloma_share: float,
) -> tuple[list[Lesion], Tubes, list[Confuser], float]:
    """Draw and place ``n`` false-positive look-alikes: calcified granulomas and scars.

    Each is a granuloma with probability ``granuloma_share``, else a scar (see the
    module doc for sizes and attenuations). Both lie wholly in the lungs and the
    field of view, 3 mm or more apart from ``placed`` lesions and each other; one
    that finds no room is left out.

    Returns:
        ``(granulomas, scars, records, scar_hu)``: granuloma lesions (label 0), the
        scars as lung-clipped tubes (a bent band, two segments each), every
        look-alike's record in drawing order, and the scars' attenuation (HU).
    """
    if not 0 <= granuloma_share <= 1:
        raise ValueError(f"granuloma_share must be in [0, 1], got {granuloma_share}")
    placer = _Placer(anatomy, grid, vessels, rng)
    scar_hu = float(rng.uniform(*SCAR_HU))
    granulomas: list[Lesion] = []
    scars: list[Tubes] = []
    records: list[Confuser] = []
    taken = list(placed)
    for _ in range(n):
        if rng.uniform() < granuloma_share:
            diameter = float(rng.uniform(*GRANULOMA_DIAMETER))
            shape = _shape(rng, diameter / 2, 0.03, 0)
            hu = float(rng.uniform(*GRANULOMA_HU))
            centre = placer.find("free", shape.extent, diameter / 2, taken, 3.0)
            if centre is None:
                continue
            record = Confuser(float_triple(centre), diameter, "granuloma")
            lesion = Lesion(((shape.moved(centre), hu, 0.0),), 0, record)
            granulomas.append(lesion)
        else:
            length = float(rng.uniform(*SCAR_LENGTH))
            half = float(rng.uniform(*SCAR_HALF_THICKNESS))
            axis = _unit(rng, 1)[0]
            bend = np.cross(axis, _unit(rng, 1)[0])
            bend *= rng.uniform(0.05, 0.15) * length / max(float(np.linalg.norm(bend)), 1e-9)
            centre = placer.find("free", 0.5 * length + half, half, taken, 3.0)
            if centre is None:
                continue
            points = np.stack(
                [centre - 0.5 * length * axis, centre + bend, centre + 0.5 * length * axis]
            )
            occ = anatomy.lung_occupancy(points[:, 0], points[:, 1], points[:, 2], *placer.widths)
            if occ.min() < 1:
                continue
            scars.append(Tubes.polyline(points, np.array([0.7, 1.0, 0.7]) * half, clipped=True))
            record = Confuser(float_triple(points[1]), length, "scar")  # the band's middle
            shape = _shape(rng, 0.5 * length, 0.0, 0).moved(centre)  # its room, never drawn
            lesion = Lesion(((shape, scar_hu, 0.0),), 0, record)
        taken.append(lesion)
        records.append(record)
    return granulomas, Tubes.concat(scars), records, scar_hu


# -- drawing --------------------------------------------------------------------------------------


def paint_lesion(
    lesion: Lesion,
    grid: ScanGrid,
    zs: slice,
    image: np.ndarray,
    lung: np.ndarray,
    mask: np.ndarray,
) -> None:
    """Draw a lesion into one slab of the scan, in place.

    Each layer raises the image towards its HU in proportion to its voxel
    coverage times the lung coverage (so juxta-pleural nodules stop at the
    pleura). The outline's voxels (surface radius >= distance) in the lung get
    the lesion's label, and so does the voxel holding the annotated centre.

    Args:
        lesion: what to draw. grid: the scan grid. zs: the slab's slices ``start:stop``.
        image: float32 HU ``(nz, Y, X)`` of the slab. lung: float32 lung coverage, same shape.
        mask: the slab's nodule label map, same shape.
    """
    z0 = zs.start
    pad = lesion.extent + max(haze for _, _, haze in lesion.layers) + grid.reach
    box = grid.index_slices(lesion.centre - pad, lesion.centre + pad)
    if box is None:
        return
    bz = slice(max(box[0].start, zs.start), min(box[0].stop, zs.stop))
    if bz.stop <= bz.start:
        return
    x, y, z = grid.axes(bz, box[1], box[2])
    local = (slice(bz.start - z0, bz.stop - z0), box[1], box[2])
    img, lung_sub = image[local], lung[local]
    for k, (shape, hu, haze) in enumerate(lesion.layers):
        rho, surface, width = shape.field(x, y, z, grid.spacing_xyz)
        if haze:
            width += _F32(haze)
        occ = round_coverage(rho, surface, width)
        occ *= lung_sub
        rise = np.subtract(_F32(hu), img, dtype=_F32)
        np.maximum(rise, 0.0, out=rise)
        rise *= occ
        img += rise
        if k == 0 and lesion.label:
            sub = mask[local]
            sub[(rho <= surface) & (lung_sub >= 0.5) & (sub == 0)] = lesion.label
    if lesion.label:
        iz, iy, ix = (int(v) for v in np.rint(grid.to_index(lesion.centre)))
        if zs.start <= iz < zs.stop:
            mask[iz - z0, iy, ix] = lesion.label
