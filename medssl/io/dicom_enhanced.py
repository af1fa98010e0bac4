"""Enhanced (multi-frame) CT: one file per series, one frame per slice.

Geometry and rescale come from the functional groups (PS3.3 C.7.6.16): each
attribute is taken from the frame's Per-Frame Functional Groups item when
present there, else from the Shared Functional Groups.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from medssl.errors import LocalizerError, SeriesGeometryError
from medssl.io.dicom_files import frame_pixels, series_meta
from medssl.io.slice_stack import PlaneGeometry, sort_slices
from medssl.volume import Volume

__all__ = ["read_enhanced"]


def read_enhanced(ds: Dataset, path: Path) -> Volume:
    """Stack the frames of a multi-frame CT dataset into a Volume in HU.

    Args:
        ds: the dataset, read with its pixel data.
        path: its file, named in errors.

    Returns:
        float32 HU volume ``(Z, Y, X)``, frames sorted along the slice normal.

    Raises:
        LocalizerError: the image is a localizer.
        SeriesGeometryError: frames lack plane position/orientation, or do not
            form one regular grid.
    """
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if "LOCALIZER" in image_type:
        raise LocalizerError(path, "is a LOCALIZER (scout) image, not a CT volume")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    if len(per_frame) != n_frames:
        raise SeriesGeometryError(
            path, f"has {n_frames} frames but {len(per_frame)} per-frame functional group items"
        )
    planes, slopes, intercepts = [], [], []
    for k, frame in enumerate(per_frame):
        position = _group_attr(frame, shared, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _group_attr(
            frame, shared, "PlaneOrientationSequence", "ImageOrientationPatient"
        )
        spacing = _group_attr(frame, shared, "PixelMeasuresSequence", "PixelSpacing")
        if position is None or orientation is None or spacing is None:
            raise SeriesGeometryError(
                path, f"frame {k + 1} lacks plane position, orientation or pixel spacing"
            )
        planes.append(
            PlaneGeometry(
                position=tuple(float(v) for v in position),
                orientation=tuple(float(v) for v in orientation),
                pixel_spacing=tuple(float(v) for v in spacing),
                name=f"{path.name} frame {k + 1}",
            )
        )
        slope = _group_attr(frame, shared, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _group_attr(
            frame, shared, "PixelValueTransformationSequence", "RescaleIntercept"
        )
        slopes.append(float(slope) if slope is not None else 1.0)
        intercepts.append(float(intercept) if intercept is not None else 0.0)
    between = _group_attr(per_frame[0], shared, "PixelMeasuresSequence", "SpacingBetweenSlices")
    thickness = _group_attr(per_frame[0], shared, "PixelMeasuresSequence", "SliceThickness")
    stack = sort_slices(planes, path, float(between or thickness or 1.0))
    pixels = frame_pixels(ds, path)
    order = stack.order
    array = pixels[order].astype(np.float32)
    array *= np.asarray(slopes, dtype=np.float32)[order, None, None]
    array += np.asarray(intercepts, dtype=np.float32)[order, None, None]
    meta = {
        **series_meta(ds),
        "format": "dicom-enhanced",
        "files": [str(path)],
        "slice_thickness": float(thickness) if thickness is not None else None,
    }
    return Volume(array, stack.affine, meta)


def _group_attr(frame: Dataset, shared: Dataset, sequence: str, keyword: str) -> Any:
    """``keyword`` from the frame's ``sequence`` item, else from the shared group's."""
    for group in (frame, shared):
        items = group.get(sequence)
        if items and keyword in items[0]:
            return items[0][keyword].value
    return None
