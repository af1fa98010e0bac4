"""The :class:`Volume` type: a 3D array on a grid placed in patient space.

Conventions (``docs/explanation/architecture.md``, "Conventions"):

* ``array`` is indexed ``(z, y, x)`` = (slice, row, column).
* World coordinates are DICOM patient coordinates, LPS, in millimetres, and
  world points are written ``(x, y, z)`` = (L, P, S) as DICOM, ITK and LUNA16
  write them.
* ``affine`` is the 4x4 matrix taking a homogeneous index ``(z, y, x, 1)`` to
  a homogeneous LPS point ``(x, y, z, 1)``. Index coordinates are voxel
  centres: index ``(0, 0, 0)`` is the centre of the first voxel.
* ``spacing`` is in index order ``(z, y, x)``, in mm. ``direction`` is the
  3x3 rotation whose column ``k`` is the unit LPS vector of index axis ``k``
  (columns in ``(z, y, x)`` order, rows ``(L, P, S)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = ["Volume", "affine_from_geometry", "float_triple", "lerp_axis", "resample_array"]

Interpolation = Literal["linear", "nearest"]


def float_triple(
    values: Sequence[float] | np.ndarray, what: str = "value"
) -> tuple[float, float, float]:
    """Three numbers as a tuple of Python floats: a ``(z, y, x)`` spacing or voxel, an LPS point.

    Raises:
        ValueError: ``values`` does not hold exactly three numbers (``what`` names it).
    """
    items = [float(v) for v in values]
    if len(items) != 3:
        raise ValueError(f"{what} must be three numbers, got {values!r}")
    return items[0], items[1], items[2]


def affine_from_geometry(
    origin: Sequence[float],
    spacing: Sequence[float],
    direction: np.ndarray | None = None,
) -> np.ndarray:
    """Build an index ``(z, y, x)`` -> LPS affine.

    Args:
        origin: LPS position ``(x, y, z)`` in mm of the centre of voxel ``(0, 0, 0)``.
        spacing: voxel size ``(sz, sy, sx)`` in mm.
        direction: 3x3 matrix, column ``k`` = unit LPS direction of index axis
            ``k`` (``z, y, x``). Default: axial, ``z -> +S``, ``y -> +P``, ``x -> +L``.

    Returns:
        float64 array of shape (4, 4).
    """
    if direction is None:
        direction = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    if spacing_arr.shape != (3,) or np.any(spacing_arr <= 0):
        raise ValueError(f"spacing must be three positive numbers (z, y, x), got {spacing!r}")
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction, dtype=np.float64) @ np.diag(spacing_arr)
    affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    return affine


@dataclass
class Volume:
    """A 3D image or label map placed in LPS patient space.

    Args:
        array: voxel values, shape ``(Z, Y, X)``. CT images hold Hounsfield
            units (float32); label maps hold integers.
        affine: 4x4 matrix from index ``(z, y, x, 1)`` to LPS ``(x, y, z, 1)`` in mm.
        meta: free-form provenance (source path, UIDs, tags of interest).
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3D (z, y, x), got shape {self.array.shape}")
        if self.affine.shape != (4, 4) or not np.allclose(self.affine[3], [0, 0, 0, 1]):
            raise ValueError("Volume affine must be a 4x4 homogeneous matrix")
        if abs(np.linalg.det(self.affine[:3, :3])) < 1e-12:
            raise ValueError("Volume affine is singular")

    # -- geometry ---------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(Z, Y, X)``."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size ``(sz, sy, sx)`` in mm."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def origin(self) -> np.ndarray:
        """LPS position ``(x, y, z)`` in mm of the centre of voxel ``(0, 0, 0)``."""
        return self.affine[:3, 3].copy()

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix; column ``k`` is the unit LPS vector of index axis ``k`` (z, y, x)."""
        return self.affine[:3, :3] / self.spacing

    def index_to_world(self, index: np.ndarray | Sequence[float]) -> np.ndarray:
        """Map index coordinates ``(..., 3)`` in ``(z, y, x)`` to LPS ``(..., 3)`` in mm."""
        idx = np.asarray(index, dtype=np.float64)
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_index(self, world: np.ndarray | Sequence[float]) -> np.ndarray:
        """Map LPS points ``(..., 3)`` in mm to continuous ``(z, y, x)`` indices."""
        pts = np.asarray(world, dtype=np.float64)
        inv = np.linalg.inv(self.affine)
        return pts @ inv[:3, :3].T + inv[:3, 3]

    def with_array(self, array: np.ndarray, **meta: Any) -> Volume:
        """A volume on the same grid holding ``array`` (same shape), meta updated."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match grid {self.array.shape}")
        return Volume(array, self.affine.copy(), {**self.meta, **meta})

    def summary(self) -> dict[str, Any]:
        """JSON-able geometry and intensity range (what ``medssl info --json`` prints).

        Keys: ``format``, ``shape`` (z, y, x), ``affine`` (index (z, y, x, 1) -> LPS),
        ``origin`` (LPS mm), ``spacing`` (z, y, x mm), ``direction`` (3x3, columns
        z, y, x), ``min``, ``max``.
        """
        return {
            "format": str(self.meta.get("format", "")),
            "shape": list(self.shape),
            "affine": self.affine.round(6).tolist(),
            "origin": self.origin.round(6).tolist(),
            "spacing": self.spacing.round(6).tolist(),
            "direction": self.direction.round(6).tolist(),
            "min": float(np.min(self.array)),
            "max": float(np.max(self.array)),
        }

    # -- resampling -------------------------------------------------------
    def resample(
        self,
        spacing: Sequence[float] | float,
        interpolation: Interpolation = "linear",
        fill_value: float | None = None,
        post: Callable[[np.ndarray], None] | None = None,
    ) -> Volume:
        """Resample to a new voxel size, keeping direction and the physical extent.

        The first output voxel centre stays on the first input voxel centre,
        and the output covers the input extent ``(n - 1) * spacing``.

        Args:
            spacing: target ``(sz, sy, sx)`` in mm, or one number for isotropic.
            interpolation: ``"linear"`` for images, ``"nearest"`` for label maps.
            fill_value: value outside the input; default: nearest edge value.
            post: an elementwise function applied in place to each linearly resampled block
                of output slices (e.g. an HU window), see :func:`resample_array`.

        Returns:
            A new Volume; images become float32, label maps keep their dtype.

        The interpolation is :func:`resample_array` (SimpleITK's multi-threaded resampler).
        """
        if interpolation not in ("linear", "nearest"):
            raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
        target = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
        if np.any(target <= 0):
            raise ValueError(f"target spacing must be positive, got {spacing!r}")
        scale = target / self.spacing
        extent = (np.asarray(self.shape) - 1) * self.spacing
        out_shape = tuple(int(n) for n in np.floor(extent / target + 1e-6).astype(int) + 1)
        out = resample_array(self.array, scale, out_shape, interpolation, fill_value, post=post)
        affine = self.affine.copy()
        affine[:3, :3] = self.affine[:3, :3] @ np.diag(scale)
        return Volume(out, affine, dict(self.meta))


#: Output slices per task of :func:`resample_array`: a 4 x 512 x 512 float32 block of input
#: (4 MB) stays in cache through the three passes; 2-4 measured fastest, 16 no faster than one slab.
_BLOCK_SLICES = 4


def resample_array(
    array: np.ndarray,
    scale: Sequence[float],
    out_shape: Sequence[int],
    interpolation: Interpolation = "linear",
    fill_value: float | None = None,
    threads: int | None = None,
    post: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """Sample ``array`` at input index ``o * scale`` for every output index ``o`` (axis-aligned).

    The grid convention of :meth:`Volume.resample`: output voxel ``(0, 0, 0)`` is input voxel
    ``(0, 0, 0)``; output index ``o`` along an axis reads the input at ``o * scale``.

    Trilinear interpolation on an axis-aligned grid is separable, so it runs as three 1-D
    passes (x, then y, then z), each two gathers and a blend (:func:`lerp_axis`), on blocks of
    :data:`_BLOCK_SLICES` output slices whose input stays in cache, in ``threads`` threads
    (numpy releases the GIL). This equals ``scipy.ndimage.affine_transform`` (order 1, mode
    nearest) to float32 rounding and is faster than SimpleITK's multi-threaded
    ``ResampleImageFilter`` to the same grid (``benchmarks/detector_speed.py``). Nearest
    neighbour rounds half up per axis, as ``scipy.ndimage`` does.

    Args:
        array: ``(Z, Y, X)`` input.
        scale: input voxels per output voxel, ``(z, y, x)``.
        out_shape: ``(Z', Y', X')``.
        interpolation: ``linear`` (output float32) or ``nearest`` (dtype kept).
        fill_value: the value of output voxels whose sample point lies outside the input
            (beyond its first or last voxel centre); None: the nearest edge value.
        threads: threads (default: the CPU count, at most 8).
        post: linear only: an elementwise function applied in place to each finished block of
            output slices, in its thread, while the block is in cache (an HU window); it must
            not depend on other voxels. Applied before ``fill_value``.

    Returns:
        ``(Z', Y', X')`` array.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    if array.ndim != 3 or len(scale) != 3 or len(out_shape) != 3:
        raise ValueError(
            f"expected a 3D array, 3 scales and a 3D shape, got {array.shape}, {scale}, {out_shape}"
        )
    linear = interpolation == "linear"
    src = array.astype(np.float32, copy=False) if linear else array
    coords = [
        np.clip(np.arange(int(m), dtype=np.float64) * float(f), 0.0, n - 1)
        for n, f, m in zip(src.shape, scale, out_shape)
    ]
    if not linear:  # nearest: round half up, per axis
        index = [np.floor(c + 0.5).astype(np.intp) for c in coords]
        return _fill_outside(src[np.ix_(*index)], src.shape, scale, fill_value)
    out = np.empty(tuple(int(m) for m in out_shape), np.float32)

    def block(o0: int) -> None:
        o1 = min(o0 + _BLOCK_SLICES, out.shape[0])
        z = coords[0][o0:o1]
        first = min(int(np.floor(z.min())), src.shape[0] - 2) if src.shape[0] > 1 else 0
        part = src[first : int(np.ceil(z.max())) + 2]
        out[o0:o1] = lerp_axis(lerp_axis(lerp_axis(part, coords[2], 2), coords[1], 1), z - first, 0)
        if post is not None:
            post(out[o0:o1])

    starts = range(0, out.shape[0], _BLOCK_SLICES)
    n_threads = max(1, min(threads or min(os.cpu_count() or 1, 8), len(starts)))
    if n_threads == 1:
        for o0 in starts:
            block(o0)
    else:
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(block, starts))
    return _fill_outside(out, src.shape, scale, fill_value)


def _fill_outside(
    out: np.ndarray, in_shape: Sequence[int], scale: Sequence[float], fill_value: float | None
) -> np.ndarray:
    """Set output voxels whose sample point lies outside the input to ``fill_value``."""
    if fill_value is not None:
        for axis, n, s, m in zip(range(3), in_shape, scale, out.shape):
            coords = np.arange(int(m)) * float(s)
            outside = (coords < -1e-6) | (coords > n - 1 + 1e-6)
            if outside.any():
                index: list[Any] = [slice(None)] * 3
                index[axis] = outside
                out[tuple(index)] = fill_value
    return out


def lerp_axis(array: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``array`` along ``axis`` at ``coords`` in ``[0, n - 1]``
    (one pass of a separable trilinear interpolation).

    Returns float32 with ``len(coords)`` entries along ``axis``.
    """
    n = array.shape[axis]
    if n == 1:
        return np.repeat(array, len(coords), axis=axis).astype(np.float32, copy=False)
    low = np.minimum(np.floor(coords).astype(np.intp), n - 2)
    shape = [1, 1, 1]
    shape[axis] = -1
    fraction = (coords - low).astype(np.float32).reshape(shape)
    out = np.take(array, low, axis=axis).astype(np.float32, copy=False)
    high = np.take(array, low + 1, axis=axis).astype(np.float32, copy=False)
    high -= out
    high *= fraction
    out += high
    return out
