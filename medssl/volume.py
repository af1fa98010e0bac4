"""The :class:`Volume` type: a 3D array on a grid placed in patient space.

Conventions (see ``design.md``):

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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import ndimage

__all__ = ["Volume", "affine_from_geometry"]

Interpolation = Literal["linear", "nearest"]


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
    ) -> Volume:
        """Resample to a new voxel size, keeping direction and the physical extent.

        The first output voxel centre stays on the first input voxel centre,
        and the output covers the input extent ``(n - 1) * spacing``.

        Args:
            spacing: target ``(sz, sy, sx)`` in mm, or one number for isotropic.
            interpolation: ``"linear"`` for images, ``"nearest"`` for label maps.
            fill_value: value outside the input; default: nearest edge value.

        Returns:
            A new Volume; images become float32, label maps keep their dtype.
        """
        if interpolation not in ("linear", "nearest"):
            raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
        target = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
        if np.any(target <= 0):
            raise ValueError(f"target spacing must be positive, got {spacing!r}")
        scale = target / self.spacing
        extent = (np.asarray(self.shape) - 1) * self.spacing
        out_shape = tuple(int(n) for n in np.floor(extent / target + 1e-6).astype(int) + 1)
        order = 1 if interpolation == "linear" else 0
        src = self.array.astype(np.float32, copy=False) if order == 1 else self.array
        kwargs: dict[str, Any] = (
            {"mode": "nearest"} if fill_value is None else {"mode": "constant", "cval": fill_value}
        )
        out = ndimage.affine_transform(src, scale, output_shape=out_shape, order=order, **kwargs)
        affine = self.affine.copy()
        affine[:3, :3] = self.affine[:3, :3] @ np.diag(scale)
        return Volume(out, affine, dict(self.meta))
