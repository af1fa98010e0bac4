"""The 48 symmetries of a cube: axis permutations followed by flips (FocalMix §3.2).

A :class:`CubeSymmetry` acts on the last three (spatial) axes of an array, so the same
element transforms an image patch ``(..., Z, Y, X)``, a per-level anchor map
``(B, C, z, y, x)`` and, through :meth:`~CubeSymmetry.apply_points`, voxel coordinates.
:meth:`~CubeSymmetry.inverse` is exact: ``g.inverse().apply(g.apply(a))`` is ``a``.

The element is described by axis orders and flip axes only, so one description serves
numpy (``np.transpose``/``np.flip``) and torch (``Tensor.permute``/``torch.flip``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CUBE_GROUP", "CubeSymmetry"]


@dataclass(frozen=True)
class CubeSymmetry:
    """``y = flip(transpose(x, perm), flips)`` on the last three axes.

    Attributes:
        perm: output spatial axis ``i`` is input spatial axis ``perm[i]``.
        flips: after permuting, output spatial axis ``i`` is reversed when ``flips[i]``.
    """

    perm: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[bool, bool, bool] = (False, False, False)

    def __post_init__(self) -> None:
        if sorted(self.perm) != [0, 1, 2] or len(self.flips) != 3:
            raise ValueError(f"not a cube symmetry: perm={self.perm}, flips={self.flips}")

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flips)

    def axes_order(self, ndim: int) -> tuple[int, ...]:
        """The full-array axis order for ``transpose``/``permute`` of an ``ndim``-D array."""
        lead = ndim - 3
        return tuple(range(lead)) + tuple(lead + p for p in self.perm)

    def flip_axes(self, ndim: int) -> tuple[int, ...]:
        """The axes to reverse after permuting, for an ``ndim``-D array."""
        return tuple(ndim - 3 + i for i, f in enumerate(self.flips) if f)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Transform the last three axes of a numpy array (a view)."""
        out = np.transpose(array, self.axes_order(array.ndim))
        axes = self.flip_axes(array.ndim)
        return np.flip(out, axes) if axes else out

    def inverse(self) -> CubeSymmetry:
        """The element undoing this one."""
        inv = tuple(int(i) for i in np.argsort(self.perm))
        return CubeSymmetry(inv, tuple(self.flips[inv[j]] for j in range(3)))  # type: ignore[arg-type]

    def transformed_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """The spatial shape ``(Z, Y, X)`` after the transform."""
        return tuple(int(shape[p]) for p in self.perm)  # type: ignore[return-value]

    def apply_points(self, points: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """Map voxel coordinates ``(N, 3)`` ``(z, y, x)`` of a ``shape`` grid into the
        transformed grid (voxel ``i`` centred at ``i``)."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        out = points[:, list(self.perm)].copy()
        new_shape = self.transformed_shape(shape)
        for i, flipped in enumerate(self.flips):
            if flipped:
                out[:, i] = new_shape[i] - 1 - out[:, i]
        return out


#: All 48 elements; element 0 is the identity.
CUBE_GROUP: tuple[CubeSymmetry, ...] = tuple(
    CubeSymmetry(perm, flips)  # type: ignore[arg-type]
    for perm in itertools.permutations(range(3))
    for flips in itertools.product((False, True), repeat=3)
)
