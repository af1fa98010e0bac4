"""Plausible CT geometry: limits checked from headers before any pixel array is allocated.

A header can ask for anything: PixelSpacing 1000 mm on a 64 x 64 image makes a 64 m wide
"patient" whose resampling to a model's 1 mm grid needs ~1.2 TiB; PixelSpacing 12 mm turns a
330 KB study into a 59-million-voxel model input. :class:`GeometryLimits` refuses such series
with a :class:`~medssl.errors.ImplausibleGeometryError` naming the value and the limit, before
the readers allocate the volume and before the pipeline resamples it, so the memory one
series may take is bounded by the limits.

The defaults, and why they suit CT:

* pixel spacing (in-plane) in ``[0.05, 5]`` mm: a CT reconstruction has 256-1024 columns over
  a field of view of 50-700 mm, i.e. 0.05-2.7 mm pixels; 5 mm leaves room for downsampled
  research copies. Micro-CT goes below 0.05 mm but is not what medssl models read.
* slice spacing in ``[0.05, 20]`` mm: thin helical reconstructions are 0.25-0.6 mm, the
  thickest axial protocols and MPR slabs 10 mm; 20 mm leaves room.
* extent (voxels x spacing, per axis) at most 2000 mm: a whole-body scan of a tall patient.
* source voxels at most 2^30 (1.07 G, 4 GiB as float32 HU): 4000 slices of 512 x 512 (whole
  body at 0.5 mm) or 1000 slices of 1024 x 1024 (ultra-high-resolution CT).
* resampled voxels (on the model's grid) at most 2^29 (537 M, 2 GiB as float32): a
  2000 x 500 x 500 mm body on a 1 mm grid.

So one series takes at most about 4 GiB (its HU volume) + 2 x 2 GiB (the resampled volume and
its normalised copy) by default; lower the limits on a smaller host (``GeometryLimits(...)``
passed to :func:`medssl.scoring.series.prepare_series`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medssl.errors import ImplausibleGeometryError

__all__ = ["DEFAULT_LIMITS", "GeometryLimits"]


@dataclass(frozen=True)
class GeometryLimits:
    """The geometry a series may have (see the module docstring for the defaults' reasons).

    Attributes:
        min_spacing_mm: smallest pixel or slice spacing, mm.
        max_pixel_spacing_mm: largest in-plane pixel spacing (PixelSpacing), mm.
        max_slice_spacing_mm: largest distance between slices, mm.
        max_extent_mm: largest size along any axis (voxels x spacing), mm.
        max_source_voxels: most voxels of the series as stored (4 bytes each once in HU).
        max_resampled_voxels: most voxels on the model's grid (4 bytes each, float32).
    """

    min_spacing_mm: float = 0.05
    max_pixel_spacing_mm: float = 5.0
    max_slice_spacing_mm: float = 20.0
    max_extent_mm: float = 2000.0
    max_source_voxels: int = 2**30
    max_resampled_voxels: int = 2**29

    def __post_init__(self) -> None:
        if not 0 < self.min_spacing_mm < min(self.max_pixel_spacing_mm, self.max_slice_spacing_mm):
            raise ValueError(
                "GeometryLimits needs 0 < min_spacing_mm < max_pixel_spacing_mm and "
                f"max_slice_spacing_mm, got {self}"
            )
        if self.max_extent_mm <= 0 or self.max_source_voxels < 1 or self.max_resampled_voxels < 1:
            raise ValueError(f"GeometryLimits needs positive extent and voxel limits, got {self}")

    def check(
        self,
        shape: Sequence[int],
        spacing_mm: Sequence[float],
        source: str | Path,
        target_spacing_mm: Sequence[float] | float | None = None,
    ) -> None:
        """Refuse a grid beyond the limits; allocates nothing.

        Args:
            shape: voxels ``(Z, Y, X)`` (Z slices of Y rows x X columns).
            spacing_mm: ``(slice spacing, row spacing, column spacing)`` in mm, i.e. the
                distance between slices, then PixelSpacing.
            source: the file or folder to name in the error.
            target_spacing_mm: the model's voxel size ``(z, y, x)`` or one number; None checks
                the source grid only.

        Raises:
            ImplausibleGeometryError: the first limit exceeded, naming the value and the limit.
        """
        dz, dy, dx = (float(s) for s in spacing_mm)
        for name, value, top in (
            ("PixelSpacing (row)", dy, self.max_pixel_spacing_mm),
            ("PixelSpacing (column)", dx, self.max_pixel_spacing_mm),
            ("slice spacing", dz, self.max_slice_spacing_mm),
        ):
            if not (math.isfinite(value) and self.min_spacing_mm <= value <= top):
                raise ImplausibleGeometryError(
                    source, name, f"{value:g} mm", f"[{self.min_spacing_mm:g}, {top:g}] mm"
                )
        for axis, n, step in zip("zyx", shape, (dz, dy, dx)):
            extent = int(n) * step
            if extent > self.max_extent_mm:
                raise ImplausibleGeometryError(
                    source,
                    f"extent along {axis} ({int(n)} x {step:g} mm)",
                    f"{extent:g} mm",
                    f"at most {self.max_extent_mm:g} mm",
                )
        voxels = math.prod(int(n) for n in shape)
        if voxels > self.max_source_voxels:
            raise ImplausibleGeometryError(
                source,
                f"voxel count ({' x '.join(str(int(n)) for n in shape)})",
                f"{voxels:,}",
                f"at most {self.max_source_voxels:,}",
            )
        if target_spacing_mm is None:
            return
        target = _three(target_spacing_mm)
        resampled = math.prod(
            math.floor((int(n) - 1) * step / t + 1e-6) + 1
            for n, step, t in zip(shape, (dz, dy, dx), target)
        )
        if resampled > self.max_resampled_voxels:
            raise ImplausibleGeometryError(
                source,
                "voxel count resampled to the model's "
                f"{'/'.join(f'{t:g}' for t in target)} mm grid",
                f"{resampled:,}",
                f"at most {self.max_resampled_voxels:,}",
            )


def _three(spacing: Sequence[float] | float) -> tuple[float, float, float]:
    if isinstance(spacing, (int, float)):
        return (float(spacing),) * 3
    values = tuple(float(s) for s in spacing)
    return values if len(values) == 3 else (values[0],) * 3


#: The limits :func:`medssl.scoring.series.prepare_series` applies unless given others.
DEFAULT_LIMITS = GeometryLimits()
