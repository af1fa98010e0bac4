"""Sliding windows over a 3D array: where they start, and cutting one out (padded).

Frames: window starts are voxel indices ``(z, y, x)`` of the array they tile. A box found
at voxel ``p`` of the window starting at ``s`` sits at voxel ``s + p`` of the array.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["extract_window", "plan_windows"]


def plan_windows(
    shape: Sequence[int], window: Sequence[int], overlap: float
) -> list[tuple[int, int, int]]:
    """Start indices of windows that together cover every voxel of a ``shape`` array.

    Along each axis the starts run from 0 to ``n - w`` (the last window flush with the
    end), evenly spread, with neighbours sharing at least ``overlap * w`` voxels (the step
    is at most ``floor(w * (1 - overlap))``, and at least 1). An axis shorter than its
    window gets a single window at 0, which :func:`extract_window` pads.

    Args:
        shape: array shape ``(Z, Y, X)``, voxels.
        window: window shape ``(wz, wy, wx)``, voxels.
        overlap: fraction of a window edge shared with its neighbour, in ``[0, 1)``.

    Returns:
        Starts ``(z, y, x)`` in C order (z slowest).

    Raises:
        ValueError: on a non-3D or non-positive shape or window, or overlap outside ``[0, 1)``.
    """
    if len(shape) != 3 or any(int(n) < 1 for n in shape):
        raise ValueError(f"shape must be three positive edges (Z, Y, X), got {tuple(shape)}")
    if len(window) != 3 or any(int(w) < 1 for w in window):
        raise ValueError(f"window must be three positive edges (wz, wy, wx), got {tuple(window)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    axes = [_axis_starts(int(n), int(w), overlap) for n, w in zip(shape, window)]
    return [(z, y, x) for z in axes[0] for y in axes[1] for x in axes[2]]


def _axis_starts(n: int, w: int, overlap: float) -> list[int]:
    """Evenly spread starts along one axis of ``n`` voxels, step at most ``w (1 - overlap)``."""
    if n <= w:
        return [0]
    step = max(1, math.floor(w * (1.0 - overlap)))
    count = math.ceil((n - w) / step) + 1
    return sorted({int(s) for s in np.round(np.linspace(0, n - w, count))})


def extract_window(
    array: np.ndarray, start: Sequence[int], window: Sequence[int], pad_value: float
) -> np.ndarray:
    """Cut the window ``[start, start + window)`` out of ``array``, padding outside it.

    Args:
        array: ``(Z, Y, X)``.
        start: window origin ``(z, y, x)``, voxels; may be negative or reach past the end.
        window: window shape ``(wz, wy, wx)``, voxels.
        pad_value: value of window voxels that fall outside ``array``.

    Returns:
        A new ``(wz, wy, wx)`` array of ``array``'s dtype.
    """
    if array.ndim != 3 or len(start) != 3 or len(window) != 3:
        raise ValueError(
            f"need a 3D array, start and window; got array {array.shape}, start {tuple(start)}, "
            f"window {tuple(window)}"
        )
    out = np.full(tuple(int(w) for w in window), pad_value, dtype=array.dtype)
    src, dst = [], []
    for n, s, w in zip(array.shape, start, window):
        lo, hi = max(int(s), 0), min(int(s) + int(w), n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(s), hi - int(s)))
    out[tuple(dst)] = array[tuple(src)]
    return out
