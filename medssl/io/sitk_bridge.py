"""Conversion between :class:`~medssl.volume.Volume` and SimpleITK images.

SimpleITK orders index, spacing and direction columns as ``(x, y, z)``;
``Volume`` orders them ``(z, y, x)``. Both use LPS physical points, so only the
axis order changes.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from medssl.volume import Volume, affine_from_geometry

__all__ = ["from_sitk", "to_sitk"]


def from_sitk(image: sitk.Image, **meta: object) -> Volume:
    """Wrap a 3D SimpleITK image as a Volume (array copied, shape ``(Z, Y, X)``)."""
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
    direction_xyz = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = affine_from_geometry(
        origin=image.GetOrigin(),
        spacing=image.GetSpacing()[::-1],
        direction=direction_xyz[:, ::-1],
    )
    return Volume(sitk.GetArrayFromImage(image), affine, dict(meta))


def to_sitk(volume: Volume) -> sitk.Image:
    """A SimpleITK image holding ``volume``'s array and geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    image.SetOrigin(tuple(float(v) for v in volume.origin))
    image.SetSpacing(tuple(float(v) for v in volume.spacing[::-1]))
    image.SetDirection(tuple(float(v) for v in volume.direction[:, ::-1].ravel()))
    return image
