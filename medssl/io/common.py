"""Small helpers shared by the volume readers and writers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["hu_int16", "last_line", "positive_number", "storage_array"]


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
