"""Shapes given in millimetres, rasterised onto axis-aligned grids.

A grid here is three ascending 1-D coordinate axes ``(z_mm, y_mm, x_mm)`` in
one physical frame (the phantom's anatomy frame: ``z`` superior, ``y``
posterior, ``x`` patient-left, mm). Everything is defined in mm, never in
voxels, so one shape drawn on two grids of different spacing covers the same
physical region: this is what keeps a synthetic subject's anatomy identical
across imaging domains.

A :class:`Canvas` holds a tissue map and a label map on such a grid. Shapes
yield ``(Window, mask)`` pairs, a window being the grid's sub-block around the
shape, so painting costs the shape's bounding box, not the whole volume.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Canvas",
    "LatticeField",
    "Window",
    "blob_masks",
    "rotation",
    "tube_masks",
]

# Variance of a sum of unit Gaussian bumps placed one sigma apart, per dimension: sqrt(pi).
_LATTICE_STD_3D = float(np.pi**0.75)


@dataclass(frozen=True)
class Window:
    """A box of grid voxels and their coordinates.

    Attributes:
        slices: index slices ``(z, y, x)`` into the full grid.
        z, y, x: open coordinate arrays in mm, shapes ``(n, 1, 1)``, ``(1, m, 1)``, ``(1, 1, l)``.
    """

    slices: tuple[slice, slice, slice]
    z: np.ndarray
    y: np.ndarray
    x: np.ndarray

    @property
    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The window's 1-D axes ``(z, y, x)`` in mm."""
        return self.z.ravel(), self.y.ravel(), self.x.ravel()


class Canvas:
    """A tissue map and a label map on an axis-aligned grid, painted shape by shape.

    Args:
        axes: ascending 1-D coordinate arrays ``(z_mm, y_mm, x_mm)``.

    Attributes:
        tissue: uint8 tissue codes, shape ``(Z, Y, X)``, 0 initially.
        label: uint8 label codes on the same grid, 0 (background) initially.
    """

    def __init__(self, axes: Sequence[np.ndarray]) -> None:
        self.axes = tuple(np.asarray(a, dtype=np.float32) for a in axes)
        for a in self.axes:
            if a.ndim != 1 or a.size < 1 or np.any(np.diff(a) <= 0):
                raise ValueError("Canvas axes must be non-empty, 1-D and strictly ascending")
        shape = tuple(a.size for a in self.axes)
        self.tissue = np.zeros(shape, dtype=np.uint8)
        self.label = np.zeros(shape, dtype=np.uint8)

    @property
    def open_grid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Open coordinate arrays of the whole grid: ``(Z,1,1)``, ``(1,Y,1)``, ``(1,1,X)``, mm."""
        z, y, x = self.axes
        return z[:, None, None], y[None, :, None], x[None, None, :]

    def window(self, lo: Sequence[float], hi: Sequence[float]) -> Window | None:
        """The voxels whose centres lie in the box ``[lo, hi]`` (mm, ``(z, y, x)``), or None."""
        slices = []
        coords = []
        for axis, a, b in zip(self.axes, lo, hi, strict=True):
            i0 = int(np.searchsorted(axis, a, side="left"))
            i1 = int(np.searchsorted(axis, b, side="right"))
            if i1 <= i0:
                return None
            slices.append(slice(i0, i1))
            coords.append(axis[i0:i1])
        z, y, x = coords
        return Window(
            (slices[0], slices[1], slices[2]), z[:, None, None], y[None, :, None], x[None, None, :]
        )

    def paint(
        self,
        window: Window,
        mask: np.ndarray,
        tissue: int,
        label: int = 0,
        onto: np.ndarray | None = None,
    ) -> None:
        """Set ``tissue`` and ``label`` where ``mask`` holds inside ``window``.

        Args:
            window: where ``mask`` lies.
            mask: bool array of the window's shape.
            tissue, label: codes to write.
            onto: optional bool lookup of length 256; only voxels whose current
                tissue code ``t`` has ``onto[t]`` are painted.
        """
        tissue_view = self.tissue[window.slices]
        if onto is not None:
            mask = mask & onto[tissue_view]
        tissue_view[mask] = tissue
        self.label[window.slices][mask] = label


@dataclass(frozen=True)
class LatticeField:
    """A smooth random scalar field defined in mm, about zero mean and unit variance.

    The field is a sum of isotropic Gaussian bumps of width ``step`` on a
    regular lattice with spacing ``step``, weighted by standard normal values.
    Being separable, it is evaluated on an axis-aligned grid by three small
    matrix products. It decays to 0 beyond about one ``step`` outside the
    lattice.

    Attributes:
        origin: mm position ``(z, y, x)`` of lattice node ``(0, 0, 0)``.
        step: lattice spacing and bump width in mm.
        values: node weights, float32 array ``(a, b, c)``.
    """

    origin: tuple[float, float, float]
    step: float
    values: np.ndarray

    @classmethod
    def draw(
        cls,
        rng: np.random.Generator,
        lo: Sequence[float] | np.ndarray,
        hi: Sequence[float] | np.ndarray,
        step: float,
    ) -> LatticeField:
        """A field covering the box ``[lo, hi]`` (mm, ``(z, y, x)``), correlation ``step`` mm."""
        if step <= 0:
            raise ValueError(f"step must be positive, got {step}")
        lo_arr = np.asarray(lo, dtype=np.float64) - step
        counts = np.floor((np.asarray(hi, dtype=np.float64) + step - lo_arr) / step).astype(int) + 1
        values = rng.standard_normal(tuple(int(c) for c in counts)).astype(np.float32)
        values -= values.mean()
        values /= np.float32(_LATTICE_STD_3D)
        return cls((float(lo_arr[0]), float(lo_arr[1]), float(lo_arr[2])), float(step), values)

    def sample(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Evaluate on the grid spanned by 1-D axes ``z, y, x`` (mm); float32 ``(Z, Y, X)``."""
        weights = []
        for k, axis in enumerate((z, y, x)):
            nodes = self.origin[k] + self.step * np.arange(self.values.shape[k], dtype=np.float32)
            d = (np.asarray(axis, dtype=np.float32).ravel()[:, None] - nodes[None, :]) / self.step
            weights.append(np.exp(-0.5 * d * d).astype(np.float32))
        wz, wy, wx = weights
        a = self.values.shape[0]
        t = self.values @ wx.T  # (a, b, X)
        t = wy @ t  # (a, Y, X)
        out = wz @ t.reshape(a, -1)  # (Z, Y*X)
        return out.reshape(wz.shape[0], wy.shape[0], wx.shape[0])


def rotation(angles_deg: Sequence[float] | np.ndarray) -> np.ndarray:
    """Rotation matrix in ``(z, y, x)`` coordinates from angles about the z, y and x axes.

    Args:
        angles_deg: ``(about_z, about_y, about_x)`` in degrees; applied x first, then y, then z.

    Returns:
        float64 array (3, 3); column ``k`` is the shape's own axis ``k`` in grid coordinates.
    """
    az, ay, ax = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    cz, sz, cy, sy, cx, sx = np.cos(az), np.sin(az), np.cos(ay), np.sin(ay), np.cos(ax), np.sin(ax)
    about_z = np.array([[1, 0, 0], [0, cz, -sz], [0, sz, cz]])  # mixes (y, x)
    about_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])  # mixes (z, x)
    about_x = np.array([[cx, -sx, 0], [sx, cx, 0], [0, 0, 1]])  # mixes (z, y)
    return about_z @ about_y @ about_x


def blob_masks(
    canvas: Canvas,
    centre: Sequence[float],
    radii: Sequence[float],
    rot: np.ndarray | None = None,
    field: LatticeField | None = None,
    amplitude: float = 0.0,
) -> Iterator[tuple[Window, np.ndarray]]:
    """A rotated ellipsoid whose surface is pushed in and out by a smooth field.

    A point ``p`` is inside when ``|R^T (p - c) / r| < 1 + amplitude * field(p)``.

    Args:
        canvas: the grid.
        centre: ``(z, y, x)`` in mm.
        radii: semi-axes along the shape's own axes, mm.
        rot: 3x3 rotation (see :func:`rotation`); identity if None.
        field: surface perturbation, evaluated in mm.
        amplitude: relative size of the perturbation (0.1 moves the surface by about 10 %).

    Yields:
        At most one ``(window, mask)`` pair.
    """
    c = np.asarray(centre, dtype=np.float64)
    r = np.asarray(radii, dtype=np.float64)
    rot = np.eye(3) if rot is None else np.asarray(rot, dtype=np.float64)
    reach = 1.0 + 3.0 * abs(amplitude) if field is not None else 1.0
    half = np.sqrt(((rot * r[None, :]) ** 2).sum(axis=1)) * reach
    win = canvas.window(c - half, c + half)
    if win is None:
        return
    # Python floats keep the float32 coordinate arrays float32 (NEP 50).
    dz, dy, dx = win.z - float(c[0]), win.y - float(c[1]), win.x - float(c[2])
    q = np.zeros(np.broadcast_shapes(dz.shape, dy.shape, dx.shape), dtype=np.float32)
    for k in range(3):
        wz, wy, wx = (float(rot[i, k] / r[k]) for i in range(3))
        u = wz * dz + wy * dy + wx * dx
        q += u * u
    if field is None or amplitude == 0.0:
        yield win, q < 1.0
    else:
        limit = np.maximum(1.0 + amplitude * field.sample(*win.axes), 0.0)
        yield win, q < limit * limit


def tube_masks(
    canvas: Canvas,
    points: np.ndarray,
    radii: Sequence[float] | np.ndarray,
) -> Iterator[tuple[Window, np.ndarray]]:
    """A tube along a polyline whose radius varies linearly between vertices.

    The tube is the union of one tapered capsule per segment; segments are
    yielded one at a time so each costs only its own bounding box.

    Args:
        canvas: the grid.
        points: vertices ``(n, 3)`` in mm, ``(z, y, x)``, ``n >= 2``.
        radii: radius at each vertex ``(n,)`` in mm.

    Yields:
        One ``(window, mask)`` pair per segment that touches the grid.
    """
    pts = np.asarray(points, dtype=np.float64)
    rad = np.asarray(radii, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or pts.shape[0] < 2 or rad.shape != (pts.shape[0],):
        raise ValueError(
            f"tube needs points (n>=2, 3) and radii (n,), got {pts.shape}, {rad.shape}"
        )
    for a, b, ra, rb in zip(pts[:-1], pts[1:], rad[:-1], rad[1:], strict=True):
        reach = max(ra, rb)
        win = canvas.window(np.minimum(a, b) - reach, np.maximum(a, b) + reach)
        if win is None:
            continue
        abz, aby, abx = (float(v) for v in b - a)
        length2 = max(abz * abz + aby * aby + abx * abx, 1e-9)
        dz, dy, dx = win.z - float(a[0]), win.y - float(a[1]), win.x - float(a[2])
        t = dz * (abz / length2) + dy * (aby / length2) + dx * (abx / length2)
        np.clip(t, 0.0, 1.0, out=t)
        ez, ey, ex = dz - t * abz, dy - t * aby, dx - t * abx
        r = float(ra) + t * float(rb - ra)
        yield win, ez * ez + ey * ey + ex * ex < r * r
