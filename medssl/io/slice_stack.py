"""Geometry of a stack of DICOM image planes: sort, validate, build the affine.

Shared by the classic (one file per slice) and the enhanced (one frame per
slice) CT readers. Slices are ordered by their position along the slice normal
``n = row_direction x column_direction`` (DICOM PS3.3 C.7.6.2.1.1), never by
InstanceNumber. Every way a stack can fail to be one regular grid raises a
typed :class:`~medssl.errors.SeriesGeometryError` naming the slices at fault.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medssl.errors import (
    DuplicateSliceError,
    GantryTiltError,
    MissingSliceError,
    NonUniformSpacingError,
    SeriesGeometryError,
)
from medssl.volume import affine_from_geometry

__all__ = ["PlaneGeometry", "SliceStack", "plane_geometry", "sort_slices"]

#: Largest deviation of one slice gap from the median, relative to the median.
SPACING_TOLERANCE = 0.05
#: Largest in-plane drift of the stack, in mm, before it counts as gantry tilt.
TILT_TOLERANCE_MM = 0.05
#: Orientation cosines of two slices that differ by more than this are different planes.
ORIENTATION_TOLERANCE = 1e-4


@dataclass(frozen=True)
class PlaneGeometry:
    """Where one image plane lies, as DICOM's Image Plane module gives it.

    Args:
        position: ImagePositionPatient, LPS mm of the centre of the first pixel ``(x, y, z)``.
        orientation: ImageOrientationPatient, row then column direction cosines (6 values).
        pixel_spacing: PixelSpacing ``(row spacing, column spacing)`` in mm, i.e. ``(sy, sx)``.
        name: how to name this plane in an error (file name, or file name + frame number).
    """

    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    name: str


def _numbers(
    value: object, count: int, keyword: str, name: str, source: str | Path
) -> tuple[float, ...]:
    """``count`` finite floats of a header value (a one-valued DS is not a list), or a
    SeriesGeometryError naming the attribute, the slice and what it held."""
    values = (
        list(value)
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes))
        else [value]
    )
    where = "" if name == Path(source).name else f" of {name}"
    if len(values) != count:
        raise SeriesGeometryError(
            source, f"{keyword}{where} has {len(values)} value(s), {count} expected"
        )
    try:
        numbers = tuple(float(v) for v in values)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SeriesGeometryError(source, f"{keyword}{where} is not numeric") from None
    if not all(np.isfinite(numbers)):
        raise SeriesGeometryError(source, f"{keyword}{where} is not finite")
    return numbers


def plane_geometry(
    position: object, orientation: object, pixel_spacing: object, name: str, source: str | Path
) -> PlaneGeometry:
    """A :class:`PlaneGeometry` from raw header values, checked.

    Args:
        position: ImagePositionPatient (3 numbers, LPS mm).
        orientation: ImageOrientationPatient (6 direction cosines, neither vector zero).
        pixel_spacing: PixelSpacing (2 numbers, mm).
        name: the slice, for errors.
        source: the file or folder named in errors.

    Raises:
        SeriesGeometryError: a value has the wrong count (a one-valued ImageOrientationPatient),
            is not numeric or finite, or a direction vector is zero.
    """
    cosines = _numbers(orientation, 6, "ImageOrientationPatient", name, source)
    if min(np.linalg.norm(cosines[:3]), np.linalg.norm(cosines[3:])) < 1e-6:
        where = "" if name == Path(source).name else f" of {name}"
        raise SeriesGeometryError(source, f"ImageOrientationPatient{where} has a zero direction")
    return PlaneGeometry(
        position=_numbers(position, 3, "ImagePositionPatient", name, source),  # type: ignore[arg-type]
        orientation=cosines,
        pixel_spacing=_numbers(pixel_spacing, 2, "PixelSpacing", name, source),  # type: ignore[arg-type]
        name=name,
    )


@dataclass(frozen=True)
class SliceStack:
    """A validated slice order and the grid it forms.

    Attributes:
        order: indices into the input planes, sorted along the slice normal.
        affine: 4x4 index ``(z, y, x)`` -> LPS mm affine of the stacked volume.
    """

    order: np.ndarray
    affine: np.ndarray


def sort_slices(
    planes: Sequence[PlaneGeometry],
    source: str | Path,
    single_slice_spacing: float = 1.0,
) -> SliceStack:
    """Sort planes along the slice normal and check that they form one regular grid.

    Args:
        planes: one entry per slice, in any order.
        source: the file or directory to name in errors.
        single_slice_spacing: z spacing in mm to use when there is one plane
            (SpacingBetweenSlices or SliceThickness of that slice).

    Returns:
        The order and the affine. z runs along ``+n``, y along the column
        direction, x along the row direction.

    Raises:
        SeriesGeometryError: mixed orientations or pixel spacings.
        DuplicateSliceError: two planes at the same position.
        MissingSliceError: a gap that is a whole multiple of the usual spacing.
        NonUniformSpacingError: any other irregular spacing.
        GantryTiltError: the stack drifts in-plane as it advances (sheared grid).
    """
    if not planes:
        raise SeriesGeometryError(source, "no image planes to stack")
    orientations = np.array([p.orientation for p in planes], dtype=np.float64)
    if orientations.shape[1] != 6:
        raise SeriesGeometryError(source, "ImageOrientationPatient must have 6 values")
    bad = np.abs(orientations - orientations[0]).max(axis=1) > ORIENTATION_TOLERANCE
    if bad.any():
        other = planes[int(np.argmax(bad))].name
        raise SeriesGeometryError(
            source,
            f"slices have different ImageOrientationPatient ({planes[0].name} vs {other}); "
            "this is not one volume",
        )
    spacings = np.array([p.pixel_spacing for p in planes], dtype=np.float64)
    if np.abs(spacings - spacings[0]).max() > 1e-4:
        raise SeriesGeometryError(source, "slices have different PixelSpacing")

    row = orientations[0, :3] / np.linalg.norm(orientations[0, :3])
    col = orientations[0, 3:] / np.linalg.norm(orientations[0, 3:])
    normal = np.cross(row, col)
    positions = np.array([p.position for p in planes], dtype=np.float64)
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    distance = distance[order]
    names = [planes[i].name for i in order]

    if len(planes) == 1:
        dz = single_slice_spacing
    else:
        dz = _check_spacing(distance, names, source)
        _check_tilt(positions[order], normal, distance, source)

    direction = np.stack([normal, col, row], axis=1)
    affine = affine_from_geometry(
        origin=positions[order[0]],
        spacing=(dz, spacings[0, 0], spacings[0, 1]),
        direction=direction,
    )
    return SliceStack(order=order, affine=affine)


def _check_spacing(distance: np.ndarray, names: list[str], source: str | Path) -> float:
    """Validate sorted slice positions along the normal; return the slice spacing in mm."""
    gaps = np.diff(distance)
    duplicates = np.flatnonzero(gaps < 1e-3)
    if duplicates.size:
        i = int(duplicates[0])
        raise DuplicateSliceError(
            source,
            f"{duplicates.size + 1} slices share positions along the slice normal, e.g. "
            f"{names[i]} and {names[i + 1]} at {distance[i]:.3f} mm",
        )
    dz = float(np.median(gaps))
    deviation = np.abs(gaps - dz)
    tolerance = SPACING_TOLERANCE * dz
    if deviation.max() <= tolerance:
        return dz
    i = int(np.argmax(deviation))
    ratio = gaps[i] / dz
    if ratio > 1.5 and abs(ratio - round(ratio)) * dz <= tolerance:
        missing = int(np.sum((np.round(gaps / dz) - 1)[gaps / dz > 1.5]))
        raise MissingSliceError(
            source,
            f"{missing} slice(s) missing: gap of {gaps[i]:.3f} mm between {names[i]} "
            f"({distance[i]:.3f} mm) and {names[i + 1]} ({distance[i + 1]:.3f} mm), "
            f"where slices are {dz:.3f} mm apart",
        )
    raise NonUniformSpacingError(
        source,
        f"slice spacing varies from {gaps.min():.3f} to {gaps.max():.3f} mm "
        f"(median {dz:.3f} mm, worst between {names[i]} and {names[i + 1]}); "
        "resample the series on the scanner or read it slice by slice",
    )


def _check_tilt(
    positions: np.ndarray, normal: np.ndarray, distance: np.ndarray, source: str | Path
) -> None:
    """Raise GantryTiltError when slice origins drift in-plane along the stack."""
    along = positions - positions[0]
    in_plane = along - np.outer(distance - distance[0], normal)
    drift = float(np.linalg.norm(in_plane, axis=1).max())
    if drift > TILT_TOLERANCE_MM:
        span = float(distance[-1] - distance[0])
        angle = float(np.degrees(np.arctan2(drift, span)))
        raise GantryTiltError(
            source,
            f"slice positions drift {drift:.2f} mm in-plane over {span:.1f} mm "
            f"(gantry tilt of about {angle:.1f} degrees); the slices form a sheared grid, "
            "which medssl does not resample silently",
        )
