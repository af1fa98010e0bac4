"""The synthetic chest's anatomy: drawn patient parameters and implicit organ shapes.

Frames and units: world points are LPS ``(x, y, z)`` in mm (``x`` to the
patient's left, ``y`` posterior, ``z`` head-ward). Field functions take
broadcastable coordinate arrays ``x, y, z`` in mm: open grid axes of shapes
``(1, 1, X)``, ``(1, Y, 1)``, ``(Z, 1, 1)`` for a scan grid, or equal 1-D
arrays for a list of points; the same code serves both.

Shapes are implicit: each structure has a signed distance-like field in mm,
and :func:`ramp` (depth inside) or :func:`cover` (distance outside) turns it
into the fraction of a voxel the structure covers. That is the partial-volume
model: the coverage of a voxel box by a locally flat surface, a linear ramp
across the box's extent along the surface normal (pixel size in-plane, slice
thickness through-plane).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = [
    "AIRWAY_WALL",
    "ChestAnatomy",
    "ScanGrid",
    "TissueHU",
    "Tubes",
    "blend",
    "cover",
    "draw_anatomy",
    "draw_trees",
    "grow_tree",
    "ramp",
    "round_coverage",
    "sample_lung_points",
    "sphere_directions",
    "sphere_lung_occupancy",
    "tube_field",
]

_F32 = np.float32

#: The airway wall around a lumen of radius ``r`` mm reaches ``r * scale + offset_mm``:
#: ``(scale, offset_mm)``, so it is 0.15 r + 0.4 mm thick (0.6-1.1 mm in the lungs).
AIRWAY_WALL = (1.15, 0.4)


@dataclass(frozen=True)
class ScanGrid:
    """An axial scan grid (index ``z -> +S``, ``y -> +P``, ``x -> +L``).

    Breathing motion: slice ``k`` nominally lies at ``z_k = origin_z + k * sz`` (what
    the scanner records) but shows the patient's level ``z_k + z_shift[k]``;
    :meth:`axes` gives the levels shown, :meth:`index_slices` the slices showing
    a box, and :meth:`box`, :meth:`to_index`, :meth:`voxel_centre` the nominal grid.

    Attributes:
        origin: LPS ``(x, y, z)`` mm of the centre of voxel ``(0, 0, 0)``.
        spacing: voxel size ``(sz, sy, sx)`` in mm.
        shape: ``(Z, Y, X)``.
        z_shift: per-slice displacement of the anatomy shown, ``Z`` values in mm; empty
            without motion.
    """

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    z_shift: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.z_shift and len(self.z_shift) != self.shape[0]:
            raise ValueError(
                f"z_shift must have one value per slice ({self.shape[0]}), got {len(self.z_shift)}"
            )

    @property
    def motion_mm(self) -> float:
        """Largest breathing displacement of a slice, mm (0 without motion)."""
        return float(np.max(np.abs(self.z_shift))) if self.z_shift else 0.0

    def apparent_z(self, z: float) -> float:
        """The nominal level (mm) at which the anatomy at level ``z`` appears.

        Solves ``t + shift(t) = z`` (the shift interpolated linearly between slices)
        on a grid of an eighth of a slice; where motion shows the level more than once,
        the solution nearest ``z``. ``z`` itself without motion.
        """
        if not self.z_shift:
            return float(z)
        sz = self.spacing[0]
        nominal = self.origin[2] + np.arange(self.shape[0]) * sz
        fine = np.arange(nominal[0], nominal[-1] + 1e-9, sz / 8)
        shown = fine + np.interp(fine, nominal, np.asarray(self.z_shift))
        miss = np.abs(shown - z)
        best = np.flatnonzero(miss <= miss.min() + sz / 16)
        return float(fine[best[np.argmin(np.abs(fine[best] - z))]])

    @property
    def spacing_xyz(self) -> tuple[float, float, float]:
        """Voxel size in world order ``(sx, sy, sz)``, mm."""
        return self.spacing[2], self.spacing[1], self.spacing[0]

    @property
    def reach(self) -> float:
        """How far beyond a surface a voxel can still be partly covered: half the voxel diagonal."""
        return 0.5 * float(np.linalg.norm(self.spacing)) + 0.01

    def axes(
        self,
        zs: slice = slice(None),
        ys: slice = slice(None),
        xs: slice = slice(None),
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Open float32 LPS axes ``x (1,1,nx)``, ``y (1,ny,1)``, ``z (nz,1,1)`` of a sub-grid

        (``z``: the levels shown, breathing shift included).
        """
        out = []
        for k, (sl, n) in enumerate(zip((xs, ys, zs), self.shape[::-1])):
            idx = np.arange(n)[sl]
            coord = self.origin[k] + idx * self.spacing_xyz[k]
            if k == 2 and self.z_shift:
                coord = coord + np.asarray(self.z_shift)[idx]
            coord = coord.astype(_F32)
            view = [1, 1, 1]
            view[2 - k] = len(idx)
            out.append(coord.reshape(view))
        return out[0], out[1], out[2]

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """LPS ``(lo, hi)`` of the first and last voxel centres, ``(x, y, z)`` mm."""
        lo = np.asarray(self.origin, dtype=np.float64)
        return lo, lo + (np.asarray(self.shape[::-1]) - 1) * np.asarray(self.spacing_xyz)

    def to_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous ``(z, y, x)`` indices ``(..., 3)`` of LPS points ``(..., 3)``."""
        xyz = (np.asarray(points, dtype=np.float64) - self.origin) / np.asarray(self.spacing_xyz)
        return xyz[..., ::-1]

    def voxel_centre(self, points: np.ndarray) -> np.ndarray:
        """LPS centres ``(..., 3)`` of the voxels holding ``points`` (nearest voxel)."""
        idx = np.rint(self.to_index(points))[..., ::-1]
        return self.origin + idx * np.asarray(self.spacing_xyz)

    def index_slices(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index ranges ``(z, y, x)`` of the voxel centres inside the LPS box, or None if empty.

        With breathing motion, the z range runs from the first to the last slice
        whose shown level lies in the box.
        """
        limit = np.asarray(self.shape)
        a = np.clip(np.ceil(self.to_index(lo) - 1e-9), 0, limit).astype(int)
        b = np.clip(np.floor(self.to_index(hi) + 1e-9) + 1, 0, limit).astype(int)
        if self.z_shift:
            shown = self.axes()[2].ravel().astype(np.float64)
            inside = np.flatnonzero((shown >= float(lo[2]) - 1e-6) & (shown <= float(hi[2]) + 1e-6))
            a[0], b[0] = (inside[0], inside[-1] + 1) if len(inside) else (0, 0)
        if np.any(b <= a):
            return None
        return slice(a[0], b[0]), slice(a[1], b[1]), slice(a[2], b[2])


# -- partial volume and compositing ---------------------------------------------------------------


def ramp(inside_mm: np.ndarray | float, width_mm: np.ndarray | float) -> np.ndarray:
    """Voxel coverage in [0, 1] of a surface at signed depth ``inside_mm`` (> 0 inside).

    Args:
        inside_mm: signed distance of the voxel centre from the surface, positive inside.
        width_mm: extent of the voxel box along the surface normal.
    """
    occ = np.asarray(np.divide(inside_mm, width_mm, dtype=_F32))
    occ += _F32(0.5)
    return np.clip(occ, 0.0, 1.0, out=occ)


def cover(outside_mm: np.ndarray | float, width_mm: np.ndarray | float) -> np.ndarray:
    """:func:`ramp` from a signed distance positive *outside* the structure."""
    occ = np.asarray(np.divide(outside_mm, -np.asarray(width_mm, dtype=_F32), dtype=_F32))
    occ += _F32(0.5)
    return np.clip(occ, 0.0, 1.0, out=occ)


def round_coverage(
    dist_mm: np.ndarray, radius_mm: np.ndarray | float, width_mm: np.ndarray | float
) -> np.ndarray:
    """Coverage of a voxel by a solid of local radius ``radius_mm`` at distance ``dist_mm >= 0``.

    The box-filtered profile along the normal: correct also for structures
    thinner than a voxel (a 1 mm vessel in a 2.5 mm slice covers 40 %).
    """
    occ = ramp(np.subtract(radius_mm, dist_mm, dtype=_F32), width_mm)
    thin = np.add(radius_mm, dist_mm, dtype=_F32)
    np.negative(thin, out=thin)
    occ -= ramp(thin, width_mm)
    return np.maximum(occ, 0.0, out=occ)


def blend(image: np.ndarray, occupancy: np.ndarray, hu: np.ndarray | float) -> None:
    """In place: ``image <- image + occupancy * (hu - image)`` (painter's algorithm)."""
    delta = np.subtract(hu, image, dtype=_F32)
    delta *= occupancy
    image += delta


# -- tubes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tubes:
    """Straight tube segments whose radius varies linearly from ``r0`` to ``r1``.

    Attributes:
        start, end: ``(N, 3)`` LPS ``(x, y, z)`` mm end points of the axes.
        r0, r1: ``(N,)`` radii in mm at ``start`` and ``end``.
        clipped: ``(N,)`` bool; True where the tube is drawn only inside the lungs.
    """

    start: np.ndarray
    end: np.ndarray
    r0: np.ndarray
    r1: np.ndarray
    clipped: np.ndarray

    @staticmethod
    def polyline(points: np.ndarray, radii: np.ndarray, clipped: bool = False) -> Tubes:
        """Consecutive segments through ``points`` ``(K, 3)`` with radii ``(K,)`` at them."""
        points = np.asarray(points, dtype=np.float64)
        radii = np.asarray(radii, dtype=np.float64)
        n = len(points) - 1
        return Tubes(points[:-1], points[1:], radii[:-1], radii[1:], np.full(n, clipped))

    @staticmethod
    def concat(parts: list[Tubes]) -> Tubes:
        """All segments of ``parts`` in order."""
        if not parts:
            empty = np.zeros((0, 3))
            return Tubes(empty, empty, np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool))
        return Tubes(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("start", "end", "r0", "r1", "clipped")
            )
        )

    def __len__(self) -> int:
        return len(self.r0)

    def branchings(self) -> tuple[np.ndarray, np.ndarray]:
        """Where the lung-clipped tubes divide: ``(points (B, 3) LPS mm, parent radii (B,) mm)``.

        A branching is the end of a clipped segment where other clipped segments
        start (as :func:`grow_tree` builds a tree); the radius is the parent's there.
        """
        starts = {tuple(p) for p in np.round(self.start[self.clipped], 6)}
        ends = np.round(self.end, 6)
        keep = self.clipped & np.array([tuple(p) in starts for p in ends], dtype=bool)
        return self.end[keep], self.r1[keep]

    def axis_distance(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance from ``points`` ``(M, 3)`` LPS mm to every segment's axis, and the

        segment's radius at the nearest axis point: ``(dist, radius)``, float64 ``(M, N)`` mm
        (a point is inside segment ``k`` where ``dist[:, k] < radius[:, k]``).
        """
        p = np.asarray(points, dtype=np.float64)
        ab = self.end - self.start
        length2 = np.maximum((ab * ab).sum(axis=1), 1e-12)
        # with q = (p - start) . ab: |p - start - t ab|^2 = |p - start|^2 - 2 t q + t^2 |ab|^2
        q = p @ ab.T - (self.start * ab).sum(axis=1)
        t = np.clip(q / length2, 0.0, 1.0)
        d2 = (p * p).sum(axis=1)[:, None] - 2 * (p @ self.start.T) + (self.start**2).sum(axis=1)
        d2 += t * (t * length2 - 2 * q)
        return np.sqrt(np.maximum(d2, 0.0)), self.r0 + t * (self.r1 - self.r0)


def tube_field(
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    ra: float,
    rb: float,
    spacing_xyz: tuple[float, float, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distance to a tapered tube's axis, its local radius, and the voxel width along the normal.

    Args:
        x, y, z: broadcastable LPS coordinates in mm.
        a, b: axis end points ``(x, y, z)`` mm; ``ra``, ``rb`` radii there.
        spacing_xyz: voxel size ``(sx, sy, sz)`` in mm.

    Returns:
        ``(dist, radius, width)`` float32 arrays of the broadcast shape, mm.
    """
    ab = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    scale = 1.0 / max(float(ab @ ab), 1e-9)
    px, py, pz = x - _F32(a[0]), y - _F32(a[1]), z - _F32(a[2])
    t = px * _F32(ab[0] * scale) + py * _F32(ab[1] * scale)
    t = t + pz * _F32(ab[2] * scale)
    np.clip(t, 0.0, 1.0, out=t)
    dx = px - t * _F32(ab[0])
    dy = py - t * _F32(ab[1])
    dz = pz - t * _F32(ab[2])
    dist = np.sqrt(dx * dx + dy * dy + dz * dz)
    sx, sy, sz = spacing_xyz
    width = np.abs(dx) * _F32(sx) + np.abs(dy) * _F32(sy) + np.abs(dz) * _F32(sz)
    width /= np.maximum(dist, _F32(1e-3))
    np.maximum(width, _F32(0.5 * min(spacing_xyz)), out=width)
    radius = t * _F32(rb - ra)
    radius += _F32(ra)
    return dist, radius, width


# -- the patient ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TissueHU:
    """Mean attenuation of the tissues of one patient, HU (drawn per patient, no contrast)."""

    fat: float
    muscle: float
    blood: float
    liver: float
    abdomen: float
    lung: float  # parenchyma mean at mid-depth
    lung_gradient: float  # posterior minus anterior parenchyma (supine, gravity)
    lung_texture: float  # std of the smooth parenchymal texture
    vessel: float
    cortical: float
    cancellous: float
    cartilage: float
    disc: float


@dataclass(frozen=True)
class ChestAnatomy:
    """One patient's chest, all lengths in mm, positions LPS.

    The body outline is an ellipse per axial level (``body_*``, scaled along z
    by :meth:`body_axes`); the skin is that outline cut flat where the back
    lies on the table (``back_y``). Subcutaneous fat and the chest wall are
    offsets of the outline; the thoracic cavity (inside the ribs) is what
    remains, narrowing towards the apex (:meth:`shoulder_wall`). Lungs fill
    the cavity above the diaphragm domes, below the apical caps, outside the
    mediastinum (a midline band, the spine, the heart ellipsoid and the
    mediastinal tubes).
    """

    size: float
    xm: float  # midline x
    cy: float  # y of the body's centre
    zc: float  # z of the carina
    body_a: float  # lateral semi-axis at mid-chest
    body_b_ant: float
    body_b_post: float
    back_y: float
    fat: float
    wall_lat: float
    wall_ant: float
    wall_post: float
    shoulder: float  # extra lateral wall depth at the apex (shoulder girdle)
    z_apex: float
    z_shoulder: float  # apical caps start narrowing here
    apex_x: float  # cap centre |x - xm|
    apex_y: float
    apex_ra: float
    apex_rb: float
    dome_z: tuple[float, float]  # (right, left) dome tops
    dome_drop: float
    dome_x: float  # dome centre |x - xm|
    dome_y: float
    dome_ax: float
    dome_by: tuple[float, float]  # (anterior, posterior) semi-axes
    band_ant: float  # half-width of the mediastinal band at the anterior junction
    band_mid: float  # ... behind it
    band_y: float  # where the band widens
    vb_y: float  # vertebral body centre y
    vb_r: tuple[float, float]  # vertebral body semi-axes (x, y)
    pitch: float  # vertebral / rib period along z
    rib_z1: float  # z of the first rib at its head
    rib_drop: float  # how much lower a rib's front end is than its head
    sternum_z: tuple[float, float]  # (top, bottom)
    scapula: tuple[float, float, float, float]  # z top, z bottom, angle of the centre, half-width
    heart_centre: tuple[float, float, float]
    heart_radii: tuple[float, float, float]
    heart_rot: np.ndarray  # (3, 3), columns: heart axes in LPS
    mediastinal: Tubes  # aorta, great vessels, SVC, oesophagus, pulmonary trunk
    trachea: Tubes  # trachea and main bronchi (lumen radii)
    hila: np.ndarray  # (2, 3, 3): [side right/left][artery, vein, bronchus] roots
    vessel_roots: Tubes  # pulmonary arteries and veins between the heart and the hila
    clavicles: Tubes
    gastric_bubble: tuple[float, float, float, float] | None  # centre xyz, radius
    hu: TissueHU

    # -- body and cavity ---------------------------------------------------------------------
    def body_axes(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Body semi-axes ``(a, b_ant, b_post)`` at levels ``z``: narrower towards the neck."""
        u = np.clip((np.asarray(z, dtype=_F32) - _F32(self.zc + 20.0)) / _F32(110.0), 0.0, 1.0)
        s = u * u * (3.0 - 2.0 * u)
        return (
            _F32(self.body_a) * (1 - 0.10 * s),
            _F32(self.body_b_ant) * (1 - 0.12 * s),
            _F32(self.body_b_post) * (1 - 0.06 * s),
        )

    def outline_distance(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Radial distance outside the body's elliptical outline, mm (negative inside)."""
        a, b_ant, b_post = self.body_axes(z)
        dx = np.asarray(x - _F32(self.xm), dtype=_F32)
        dy = np.asarray(y - _F32(self.cy), dtype=_F32)
        b = np.where(dy < 0, b_ant, b_post)
        g = np.sqrt((dx / a) ** 2 + (dy / b) ** 2)
        rho = np.sqrt(dx * dx + dy * dy)
        ray = rho / np.maximum(g, _F32(1e-6))  # distance from centre to the outline along the ray
        np.clip(ray, np.minimum(a, b), np.maximum(a, b), out=ray)
        g -= _F32(1.0)
        g *= ray
        return g

    def wall_depths(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Depths below the outline of the muscle layer and of the cavity (mm), by angle around."""
        cos = self._cos_angle(x, y)
        post, ant = np.maximum(cos, 0.0), np.maximum(-cos, 0.0)
        fat = self.fat * (1.0 - 0.45 * post)
        wall = (
            self.wall_lat
            + (self.wall_post - self.wall_lat) * post**2
            + (self.wall_ant - self.wall_lat) * ant**2
        )
        return fat.astype(_F32), (fat + wall).astype(_F32)

    def shoulder_wall(
        self,
        x: np.ndarray | float,
        y: np.ndarray | float,
        z: np.ndarray | float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Extra chest-wall depth of the upper thorax: ``(mm by level, weight by angle)``.

        ``x``, ``y``, ``z`` are LPS mm, arrays or scalars that broadcast together.

        Shoulder-girdle muscles thicken the wall towards the apex, except at the
        back, so the rib cage narrows upwards. Their product adds to the cavity depth.
        """
        u = np.clip(
            (np.asarray(z, dtype=_F32) - _F32(self.zc - 60.0))
            / _F32(self.z_apex + 20.0 - self.zc + 60.0),
            0.0,
            1.0,
        )
        extra = _F32(self.shoulder) * u * u * (3.0 - 2.0 * u)
        weight = 1.0 - np.maximum(self._cos_angle(x, y), 0.0) ** 2
        return extra.astype(_F32), weight.astype(_F32)

    def skin_distance(self, outline: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Distance outside the skin: the outline cut flat where the back lies on the table."""
        return np.maximum(outline, y - _F32(self.back_y))

    def muscle_distance(
        self,
        outline: np.ndarray,
        y: np.ndarray,
        fat_depth: np.ndarray,
    ) -> np.ndarray:
        """Distance outside the muscle layer, under the subcutaneous fat."""
        return np.maximum(outline + fat_depth, y - _F32(self.back_y - 0.55 * self.fat))

    def cavity_distance(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Distance outside the thoracic cavity (the inner surface of the rib cage), mm."""
        extra, weight = self.shoulder_wall(x, y, z)
        return self.outline_distance(x, y, z) + self.wall_depths(x, y)[1] + extra * weight

    def rib_angle(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Angle around the body from the posterior midline (0) to the sternum (pi), radians."""
        return np.arccos(np.clip(self._cos_angle(x, y), -1.0, 1.0)).astype(_F32)

    def _cos_angle(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        u = (np.asarray(x, dtype=np.float64) - self.xm) / self.body_a
        v = (np.asarray(y, dtype=np.float64) - self.cy) / (
            0.5 * (self.body_b_ant + self.body_b_post)
        )
        return v / np.maximum(np.sqrt(u * u + v * v), 1e-9)

    # -- lungs ---------------------------------------------------------------------------------
    def diaphragm_z(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height of the diaphragm's upper surface, mm: a dome under each lung."""
        dx = np.asarray(x, dtype=np.float64) - self.xm
        dy = np.asarray(y, dtype=np.float64) - self.dome_y
        by = np.where(dy < 0, self.dome_by[0], self.dome_by[1])
        q2 = ((np.abs(dx) - self.dome_x) / self.dome_ax) ** 2 + (dy / by) ** 2
        top = np.where(dx < 0, self.dome_z[0], self.dome_z[1])
        return (top - self.dome_drop * (1 - np.exp(-q2))).astype(_F32)

    @cached_property
    def lowest_lung_z(self) -> float:
        """z of the deepest costophrenic recess."""
        ys = self.cy + np.linspace(-self.body_b_ant, self.body_b_post, 61)
        xs = self.xm + np.linspace(-self.body_a, self.body_a, 61)
        x, y = np.meshgrid(xs, ys, sparse=True)
        zmid = np.full((1, 1), self.dome_z[1] - self.dome_drop, dtype=_F32)
        inside = self.cavity_distance(x, y, zmid) < 0
        return float(self.diaphragm_z(x, y)[inside].min())

    def medial_depth(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed distance outside the mediastinal band and the vertebral body, mm."""
        dx = np.abs(np.asarray(x, dtype=_F32) - _F32(self.xm))
        dy = np.asarray(y, dtype=_F32)
        width = self.band_ant + (self.band_mid - self.band_ant) / (
            1 + np.exp(-(dy - _F32(self.band_y)) / _F32(8.0))
        )
        band = dx - width
        rx, ry = self.vb_r
        g = np.sqrt((dx / _F32(rx + 3.0)) ** 2 + ((dy - _F32(self.vb_y)) / _F32(ry + 3.0)) ** 2)
        spine = (g - 1) * _F32(min(rx, ry) + 3.0)
        return np.minimum(band, spine).astype(_F32)

    def apex_depth(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Signed depth inside the apical caps (mm, > 0 inside).

        Below ``z_shoulder`` a cap holds the whole lung section; above, it shrinks
        to a point at ``z_apex``, rounding the apex.
        """
        dx = np.abs(np.asarray(x, dtype=_F32) - _F32(self.xm)) - _F32(self.apex_x)
        dy = np.asarray(y, dtype=_F32) - _F32(self.apex_y)
        rho = np.sqrt((dx / _F32(self.apex_ra)) ** 2 + (dy / _F32(self.apex_rb)) ** 2)
        u = np.clip(
            (np.asarray(z, dtype=_F32) - _F32(self.z_shoulder))
            / _F32(self.z_apex - self.z_shoulder),
            0.0,
            1.0,
        )
        scale = _F32(APEX_CAP_SCALE) * (1.0 - u) ** _F32(0.6)
        above = np.maximum(np.asarray(z, dtype=_F32) - _F32(self.z_apex), 0.0)
        return (scale - rho) * _F32(min(self.apex_ra, self.apex_rb)) - above

    def heart_distance(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Approximate distance outside the heart ellipsoid, mm."""
        c = self.heart_centre
        px, py, pz = x - _F32(c[0]), y - _F32(c[1]), z - _F32(c[2])

        def squared(k: int) -> np.ndarray:
            """Squared coordinate along the ellipsoid's axis ``k``, in radii."""
            r = self.heart_rot[:, k] / self.heart_radii[k]
            q = px * _F32(r[0]) + py * _F32(r[1])
            q = q + pz * _F32(r[2])
            return q * q

        e = squared(0) + squared(1) + squared(2)
        return (np.sqrt(e) - 1) * _F32(min(self.heart_radii))

    def heart_box(self, margin: float) -> tuple[np.ndarray, np.ndarray]:
        """LPS box ``(lo, hi)`` holding the heart grown by ``margin``."""
        half = np.abs(self.heart_rot) @ np.asarray(self.heart_radii) + margin
        return np.asarray(self.heart_centre) - half, np.asarray(self.heart_centre) + half

    def lung_occupancy(
        self, x: np.ndarray, y: np.ndarray, z: np.ndarray, width_xy: float, width_z: float
    ) -> np.ndarray:
        """Lung coverage in [0, 1] at arbitrary points (the renderer's formula, everywhere)."""
        occ = ramp(-self.cavity_distance(x, y, z), width_xy)
        np.minimum(occ, ramp(self.apex_depth(x, y, z), width_xy), out=occ)
        np.minimum(occ, ramp(z - self.diaphragm_z(x, y), width_z), out=occ)
        np.minimum(occ, ramp(self.medial_depth(x, y), width_xy), out=occ)
        np.minimum(occ, ramp(self.heart_distance(x, y, z) - _F32(HEART_FAT_MM), width_xy), out=occ)
        t = self.mediastinal
        for k in range(len(t)):
            dist, radius, width = tube_field(
                x, y, z, t.start[k], t.end[k], t.r0[k], t.r1[k], (width_xy, width_xy, width_z)
            )
            np.minimum(occ, ramp(dist - radius - _F32(MEDIASTINAL_FAT_MM), width), out=occ)
        return occ

    def lung_box(self) -> tuple[np.ndarray, np.ndarray]:
        """LPS box ``(lo, hi)`` holding both lungs (the cavity below the shoulders, 3 mm more)."""
        half_x = self.body_a - self.fat - self.wall_lat + 3.0
        front = self.body_b_ant - self.fat - self.wall_ant + 3.0
        back = self.body_b_post - 0.55 * self.fat - self.wall_post + 3.0
        return (
            np.array([self.xm - half_x, self.cy - front, self.lowest_lung_z - 2.0]),
            np.array([self.xm + half_x, self.cy + back, self.z_apex + 2.0]),
        )

    def body_box(self) -> tuple[np.ndarray, np.ndarray]:
        """LPS ``(x, y)`` box ``(lo, hi)`` holding every axial section of the body."""
        return (
            np.array([self.xm - self.body_a - 1.0, self.cy - self.body_b_ant - 1.0]),
            np.array([self.xm + self.body_a + 1.0, self.back_y + 1.0]),
        )


#: Size of the apical caps at the shoulders, relative to their semi-axes (they then hold
#: the whole lung section), shrinking as ``(1 - u) ** 0.6`` to 0 at the apex (``u = 1``).
APEX_CAP_SCALE = 1.15
#: Fat kept between the lungs and the heart / mediastinal tubes, mm.
HEART_FAT_MM = 3.0
MEDIASTINAL_FAT_MM = 2.5


def draw_anatomy(
    rng: np.random.Generator,
    size: float,
    *,
    fat_mm: float | None = None,
) -> ChestAnatomy:
    """Draw a patient: body habitus, organ positions and tissue attenuations.

    Args:
        rng: the random generator (the only source of randomness).
        size: overall linear scale of the patient (1.0 = average adult).
        fat_mm: subcutaneous fat at the side of the chest for ``size`` 1, mm (scaled
            by ``size``; thinner at the back, where the patient lies on it); default
            drawn in 6-28 mm. An obese patient has 40-60 mm.
    """
    if fat_mm is not None and not 0 < fat_mm <= 150:
        raise ValueError(f"fat_mm must be in (0, 150] mm, got {fat_mm}")
    sw, sd, sh = (size * rng.uniform(0.94, 1.06) for _ in range(3))
    xm, cy, zc = rng.uniform(-15, 15), rng.uniform(-30, 10), rng.uniform(-220, 40)
    fat = (rng.uniform(6, 28) if fat_mm is None else fat_mm) * size
    wall_lat, wall_ant, wall_post = 14 * sw, 18 * sd, 55 * sd
    cav_a, cav_ant, cav_post = 130 * sw, 80 * sd, 72 * sd
    body_a = cav_a + wall_lat + fat
    body_b_ant = cav_ant + wall_ant + fat
    body_b_post = cav_post + wall_post + 0.55 * fat + 6
    z_apex = zc + rng.uniform(75, 95) * sh
    dome_r = zc - rng.uniform(95, 120) * sh
    dome_l = dome_r - rng.uniform(8, 25)
    vb_r = (22 * size, 18 * size)
    vb_y = cy + cav_post - 0.45 * vb_r[1]
    y_tr = vb_y - vb_r[1] - 22 * size
    pitch = rng.uniform(23, 28) * sh

    heart_r = (
        rng.uniform(0.42, 0.5) * cav_a,
        rng.uniform(0.5, 0.6) * cav_ant,
        rng.uniform(48, 58) * sh,
    )
    heart_c = (xm + 0.2 * cav_a, cy - 0.25 * cav_ant, dome_l + 0.45 * heart_r[2])
    yaw, pitch_tilt = np.radians(rng.uniform(20, 40)), np.radians(rng.uniform(5, 20))
    rz = np.array([[np.cos(yaw), np.sin(yaw), 0], [-np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    ry = np.array(
        [
            [np.cos(pitch_tilt), 0, np.sin(pitch_tilt)],
            [0, 1, 0],
            [-np.sin(pitch_tilt), 0, np.cos(pitch_tilt)],
        ]
    )
    heart_rot = rz @ ry
    heart_top = heart_c[2] + 0.8 * heart_r[2]

    s = size
    top = z_apex + 120.0
    bottom = dome_l - 260.0
    aorta = Tubes.polyline(
        np.array(
            [
                [xm + 4, cy - 0.30 * cav_ant, heart_top - 25],
                [xm + 2, cy - 0.36 * cav_ant, zc + 12],
                [xm + 10, cy - 0.18 * cav_ant, zc + 32],
                [xm + 27 * s, vb_y - 38 * s, zc + 30],
                [xm + 28 * s, vb_y - 30 * s, zc + 5],
                [xm + 24 * s, vb_y - 26 * s, dome_l - 20],
                [xm + 10 * s, vb_y - 26 * s, bottom],
            ]
        ),
        np.array([14, 15, 13.5, 12.5, 12, 11.5, 10.5]) * s * rng.uniform(0.9, 1.15),
    )
    great = [
        Tubes.polyline(
            np.array(
                [
                    [xm + dx * s, cy + dy * cav_ant, zc + 30],
                    [xm + 1.6 * dx * s, cy + dy * cav_ant, top],
                ]
            ),
            np.array([r, r]) * s,
        )
        for dx, dy, r in ((-9, -0.32, 6.5), (5, -0.22, 5.0), (18, -0.05, 5.5))
    ]
    svc = Tubes.polyline(
        np.array(
            [[xm - 26 * s, cy - 0.3 * cav_ant, top], [xm - 24 * s, cy - 0.28 * cav_ant, heart_top]]
        ),
        np.array([9.0, 10.0]) * s,
    )
    oesophagus = Tubes.polyline(
        np.array(
            [
                [xm + 5 * s, y_tr + 16 * s, top],
                [xm + 7 * s, y_tr + 17 * s, zc - 60],
                [xm + 18 * s, y_tr + 8 * s, dome_l - 15],
                [xm + 45 * s, cy - 0.1 * cav_ant, dome_l - 45],
            ]
        ),
        np.array([7.5, 8.0, 8.5, 9.0]) * s,
    )
    trachea = Tubes.polyline(np.array([[xm, y_tr, top], [xm, y_tr, zc]]), np.array([9.0, 9.0]) * s)
    hila = np.zeros((2, 3, 3))
    main_bronchi = []
    for side, sign in enumerate((-1.0, 1.0)):
        lateral = (0.2 if side == 0 else 0.3) * cav_a
        drop = 22 if side == 0 else 35
        end = np.array([xm + sign * lateral, y_tr + 8, zc - drop * sh])
        main_bronchi.append(
            Tubes.polyline(
                np.array([[xm, y_tr, zc], end]),
                np.array([6.5, 6.0] if side == 0 else [5.8, 5.3]) * s,
            )
        )
        hila[side, 0] = (xm + sign * 0.32 * cav_a, cy + 0.05 * cav_post, zc - 18 * sh)
        hila[side, 1] = (xm + sign * 0.3 * cav_a, cy + 0.15 * cav_post, zc - 52 * sh)
        hila[side, 2] = end
    bifurcation = np.array([xm + 8 * s, cy - 0.22 * cav_ant, zc - 14])
    pa_trunk = Tubes.polyline(
        np.array([[xm + 18 * s, cy - 0.62 * cav_ant, heart_top - 10], bifurcation]),
        np.array([13.0, 12.0]) * s,
    )
    atrium = np.array(heart_c) + heart_rot @ np.array([0.0, 0.8 * heart_r[1], 0.25 * heart_r[2]])
    vessel_roots = Tubes.concat(
        [
            Tubes.polyline(np.array([bifurcation, hila[side, 0]]), np.array([10.0, 8.5]) * s)
            for side in (0, 1)
        ]
        + [
            Tubes.polyline(
                np.array([atrium + np.array((sign * 15 * s, 0, 0)), hila[side, 1]]),
                np.array([7.5, 6.5]) * s,
            )
            for side, sign in ((0, -1.0), (1, 1.0))
        ]
    )

    clavicles = Tubes.concat(
        [
            Tubes.polyline(
                np.array(
                    [
                        [xm + sign * 14 * s, cy - body_b_ant + fat + 8, z_apex - 25],
                        [xm + sign * 0.55 * body_a, cy - body_b_ant + fat + 12, z_apex - 10],
                        [xm + sign * (body_a - fat - 12), cy - 0.2 * cav_ant, z_apex + 5],
                    ]
                ),
                np.array([7.0, 6.0, 7.5]) * s,
            )
            for sign in (-1.0, 1.0)
        ]
    )
    bubble = None
    if rng.uniform() < 0.6:
        bubble = (xm + 0.45 * cav_a, cy - 0.1 * cav_ant, dome_l - 32 * sh, rng.uniform(12, 28))

    lung = rng.uniform(-880, -830)
    hu = TissueHU(
        fat=rng.uniform(-115, -85),
        muscle=rng.uniform(38, 55),
        blood=rng.uniform(32, 48),
        liver=rng.uniform(52, 66),
        abdomen=rng.uniform(25, 42),
        lung=lung,
        lung_gradient=rng.uniform(30, 90),
        lung_texture=rng.uniform(8, 20),
        vessel=rng.uniform(30, 55),
        cortical=rng.uniform(750, 1100),
        cancellous=rng.uniform(150, 300),
        cartilage=rng.uniform(80, 160),
        disc=rng.uniform(70, 100),
    )
    return ChestAnatomy(
        size=size,
        xm=xm,
        cy=cy,
        zc=zc,
        body_a=body_a,
        body_b_ant=body_b_ant,
        body_b_post=body_b_post,
        back_y=cy + body_b_post - 8 * size,
        fat=fat,
        wall_lat=wall_lat,
        wall_ant=wall_ant,
        wall_post=wall_post,
        shoulder=rng.uniform(25, 45) * size,
        z_apex=z_apex,
        z_shoulder=zc - rng.uniform(10, 40) * sh,
        apex_x=0.45 * cav_a,
        apex_y=cy + 0.1 * cav_post,
        apex_ra=0.6 * cav_a,
        apex_rb=0.95 * cav_ant,
        dome_z=(dome_r, dome_l),
        dome_drop=rng.uniform(70, 95) * sh,
        dome_x=0.45 * cav_a,
        dome_y=cy - 0.2 * cav_ant,
        dome_ax=0.55 * cav_a,
        dome_by=(1.0 * cav_ant, 1.0 * cav_post),
        band_ant=rng.uniform(3, 8),
        band_mid=rng.uniform(18, 26) * s,
        band_y=cy - 0.45 * cav_ant,
        vb_y=vb_y,
        vb_r=vb_r,
        pitch=pitch,
        rib_z1=z_apex - rng.uniform(2, 12),
        rib_drop=rng.uniform(3.6, 4.4) * pitch,
        sternum_z=(zc + rng.uniform(40, 60) * sh, dome_r - rng.uniform(10, 30)),
        scapula=(
            z_apex + rng.uniform(0, 15),
            zc - rng.uniform(60, 90) * sh,
            rng.uniform(0.28, 0.36) * np.pi,
            rng.uniform(40, 55) * size,
        ),
        heart_centre=heart_c,
        heart_radii=heart_r,
        heart_rot=heart_rot,
        mediastinal=Tubes.concat([aorta, *great, svc, oesophagus, pa_trunk]),
        trachea=Tubes.concat([trachea, *main_bronchi]),
        hila=hila,
        vessel_roots=vessel_roots,
        clavicles=clavicles,
        gastric_bubble=bubble,
        hu=hu,
    )


# -- point queries and the bronchovascular trees --------------------------------------------------


def sphere_directions(n: int = 48) -> np.ndarray:
    """``n`` unit vectors spread evenly over the sphere (a Fibonacci lattice), ``(n, 3)``."""
    k = np.arange(n) + 0.5
    polar = np.arccos(1 - 2 * k / n)
    azimuth = np.pi * (1 + 5**0.5) * k
    return np.stack(
        [np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1
    )


def sphere_lung_occupancy(
    anatomy: ChestAnatomy,
    centres: np.ndarray,
    radii: np.ndarray,
    width_xy: float,
    width_z: float,
    n_directions: int = 48,
) -> np.ndarray:
    """Lung coverage at ``n_directions`` points on spheres: ``(M, n)`` for ``centres`` ``(M, 3)``.

    ``radii``: ``(M,)`` mm; ``width_xy``, ``width_z``: voxel size in-plane and along z, mm.
    """
    pts = centres[:, None, :] + radii[:, None, None] * sphere_directions(n_directions)[None]
    flat = pts.reshape(-1, 3)
    occ = anatomy.lung_occupancy(flat[:, 0], flat[:, 1], flat[:, 2], width_xy, width_z)
    return occ.reshape(pts.shape[:2])


def sample_lung_points(
    anatomy: ChestAnatomy,
    rng: np.random.Generator,
    n: int,
    depth: float,
    width_xy: float,
    width_z: float,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points per lung, uniform, ``depth`` mm inside the pleura.

    Returns:
        ``(right, left)``, each ``(n, 3)`` LPS mm.
    """
    lo, hi = anatomy.lung_box()
    found: list[list[np.ndarray]] = [[], []]
    for _ in range(100):
        cand = rng.uniform(lo, hi, size=(max(3 * n, 256), 3))
        ok = anatomy.lung_occupancy(cand[:, 0], cand[:, 1], cand[:, 2], width_xy, width_z) >= 1
        if depth > 0 and ok.any():
            shell = sphere_lung_occupancy(
                anatomy, cand[ok], np.full(ok.sum(), depth), width_xy, width_z, n_directions=14
            )
            ok[ok] = shell.min(axis=1) >= 1
        left = cand[:, 0] > anatomy.xm
        found[0].append(cand[ok & ~left])
        found[1].append(cand[ok & left])
        sides = [np.concatenate(f) for f in found]
        if min(len(p) for p in sides) >= n:
            return sides[0][:n], sides[1][:n]
    raise RuntimeError(
        f"found fewer than {n} points {depth} mm deep in each lung; "
        "the drawn anatomy has too little lung"
    )


def grow_tree(
    root: np.ndarray, targets: np.ndarray, r_root: float, exponent: float, rng: np.random.Generator
) -> Tubes:
    """A branching tube tree from ``root`` to every target, tapering as it divides.

    Each branch serves a set of targets: it runs part of the way from its start
    towards their centroid; there the set is split in two across its longest
    extent, and each part grows a child branch. A branch serving ``n`` of the
    ``N`` targets has radius ``r_root * (n / N) ** (1 / exponent)`` (Murray's
    law for ``exponent`` 3), so the tree thins towards the periphery. The tree
    grows a generation at a time, all its branches at once.

    Args:
        root: start ``(x, y, z)`` mm. targets: ``(N, 3)`` end points, mm.
        r_root: radius of the first branch, mm. exponent: branching exponent.
        rng: the random generator.
    """
    n_all = len(targets)
    order = np.arange(n_all)  # a branch owns the targets order[lo:hi]
    lo, hi = np.array([0]), np.array([n_all])
    start = np.asarray(root, dtype=np.float64)[None]
    starts, ends, served = [], [], []
    generation = 0
    while len(lo):
        n = hi - lo
        leaf = n == 1
        starts.append(start[leaf])
        ends.append(targets[order[lo[leaf]]])
        served.append(n[leaf])
        lo, hi, start, n = lo[~leaf], hi[~leaf], start[~leaf], n[~leaf]
        if len(lo) == 0:
            break
        branch = np.repeat(np.arange(len(lo)), n)
        first = np.cumsum(n) - n
        pos = np.arange(n.sum()) - np.repeat(first, n) + np.repeat(lo, n)
        pts = targets[order[pos]]
        centre = np.stack([np.bincount(branch, pts[:, k]) for k in range(3)], axis=1) / n[:, None]
        extent = np.maximum.reduceat(pts, first) - np.minimum.reduceat(pts, first)
        axis = np.argmax(extent, axis=1)[branch]
        order[pos] = order[pos][np.lexsort((pts[np.arange(len(pts)), axis], branch))]
        run, split = rng.uniform(size=(2, len(lo)))
        a, b = (0.2, 0.4) if generation < 2 else (0.35, 0.6)
        end = start + (a + (b - a) * run)[:, None] * (centre - start)
        starts.append(start)
        ends.append(end)
        served.append(n)
        cut = np.clip(np.rint(n * (0.35 + 0.3 * split)).astype(int), 1, n - 1)
        lo, hi = np.concatenate([lo, lo + cut]), np.concatenate([lo + cut, hi])
        start = np.concatenate([end, end])
        generation += 1
    r = r_root * (np.concatenate(served) / n_all) ** (1.0 / exponent)
    return Tubes(
        np.concatenate(starts), np.concatenate(ends), r, 0.9 * r, np.ones(len(r), dtype=bool)
    )


#: Terminal branches per vessel tree (two trees, arteries and veins, per lung) and per airway tree.
VESSEL_LEAVES = 260
AIRWAY_LEAVES = 24


def draw_trees(
    anatomy: ChestAnatomy, rng: np.random.Generator, width_xy: float, width_z: float
) -> tuple[Tubes, Tubes]:
    """Pulmonary vessels and the bronchial tree, lumen radii in mm: ``(vessels, airways)``.

    Vessels: per lung an arterial tree from the hilum and a venous tree from
    the lower hilum, each ending at points spread through the lung, plus the
    unclipped roots joining them to the heart. Airways: the trachea and main
    bronchi, then a tree per lung ending at least 12 mm inside the pleura.
    """
    s = anatomy.size
    vessel_ends = sample_lung_points(anatomy, rng, 2 * VESSEL_LEAVES, 3.0, width_xy, width_z)
    airway_ends = sample_lung_points(anatomy, rng, AIRWAY_LEAVES, 12.0, width_xy, width_z)
    vessels, airways = [anatomy.vessel_roots], [anatomy.trachea]
    for side in (0, 1):
        arteries, veins = vessel_ends[side][::2], vessel_ends[side][1::2]
        vessels.append(grow_tree(anatomy.hila[side, 0], arteries, 6.0 * s, 2.6, rng))
        vessels.append(grow_tree(anatomy.hila[side, 1], veins, 5.0 * s, 2.6, rng))
        airways.append(grow_tree(anatomy.hila[side, 2], airway_ends[side], 4.5 * s, 3.0, rng))
    return Tubes.concat(vessels), Tubes.concat(airways)
