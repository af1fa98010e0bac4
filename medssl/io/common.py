"""Small helpers shared by the volume readers and writers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from medssl.errors import VolumeReadError

__all__ = ["hu_int16", "last_line", "positive_number", "rescale_number", "storage_array"]


def storage_array(array: np.ndarray) -> np.ndarray:
    """The array to store on disk: int16 for whole-number floats in the int16 range (HU).

    Label maps and other integer arrays are returned unchanged; floats that
    are not whole numbers stay float32.
    """
    if array.dtype.kind != "f":
        return array
    if (
        array.size
        and np.all(np.isfinite(array))
        and array.min() >= -32768
        and array.max() <= 32767
        and np.array_equal(array, np.round(array))
    ):
        return array.astype(np.int16)
    return array.astype(np.float32, copy=False)


def hu_int16(array: np.ndarray) -> np.ndarray:
    """CT intensities as a scanner stores them: rounded to whole HU, int16."""
    return np.clip(np.rint(array), -32768, 32767).astype(np.int16)


def last_line(exc: BaseException) -> str:
    """The last non-empty line of an exception's message (ITK messages are long)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def positive_number(value: object) -> float | None:
    """A header value (the first of several) as a positive finite float; None when it is
    absent, zero, negative or not a number, so a malformed optional attribute (SliceThickness,
    SpacingBetweenSlices) does not stop reading."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0] if len(value) else None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def rescale_number(
    read: Callable[[], object], default: float, keyword: str, path: str | Path
) -> float:
    """A RescaleSlope / RescaleIntercept header value as a finite float.

    Args:
        read: returns the element's value (e.g. ``lambda: ds.get("RescaleSlope")``); it is
            called here because pydicom converts a DS value on access and raises
            ``ValueError`` for one that is no number.
        default: the value when the element is absent or empty (1 for the slope, 0 for the
            intercept, as readers do).
        keyword: the attribute, for the error.
        path: the file, for the error.

    A value that is not a finite number (or a zero slope) would make every voxel's HU wrong,
    so it is an error rather than a silent default.

    Raises:
        VolumeReadError: the value is not a finite number; the message names ``keyword`` and
            the file but not the value (a hostile header may hold anything, PHI included).
    """
    try:
        value = read()
    except (TypeError, ValueError, OverflowError):
        value = "invalid"
    if value is None or value == "":
        return default
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0] if len(value) else None
        if value is None:
            return default
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number) or (keyword == "RescaleSlope" and number == 0.0):
        raise VolumeReadError(
            path, f"{keyword} is not a finite (non-zero slope) number; cannot compute HU"
        )
    return number
