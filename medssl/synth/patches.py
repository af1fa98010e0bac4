"""Model-ready patches cut from synthetic CT (chest, abdomen), for parity checks and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medssl.pipeline.preprocess import Intensity, PercentileIntensity, Preparation, prepare
from medssl.pipeline.windows import extract_window
from medssl.synth.chest import ChestConfig, generate_chest_ct
from medssl.synth.organs import generate_organ_phantom

__all__ = ["chest_patch", "organ_patch"]


def chest_patch(
    patch: Sequence[int],
    spacing_mm: Sequence[float] | float = 1.0,
    normalisation: Intensity | None = None,
    seed: int = 0,
    matrix: int = 96,
) -> np.ndarray:
    """A preprocessed synthetic chest CT patch centred on a nodule.

    Args:
        patch: patch shape ``(z, y, x)``, voxels of the model grid.
        spacing_mm: the model grid's voxel size ``(z, y, x)`` mm (or one number).
        normalisation: the model's HU window; default :class:`Intensity()`.
        seed: scan seed (:func:`generate_chest_ct`).
        matrix: in-plane matrix of the generated scan (small keeps it fast).

    Returns:
        ``(1, 1, Z, Y, X)`` float32 in ``[-1, 1]``: what a runner is fed in production.
    """
    case = generate_chest_ct(
        seed,
        ChestConfig(
            matrix=matrix, n_slices=max(48, int(patch[0])), n_nodules_range=(1, 1), render_threads=1
        ),
    )
    normalisation = normalisation or Intensity()
    volume = prepare(case.volume, Preparation(_grid(spacing_mm), normalisation))
    centre = volume.world_to_index(case.nodules[0].centre_lps)
    start = [round(c - p / 2) for c, p in zip(centre, patch)]
    pad = normalisation.pad_value
    return extract_window(volume.array, start, patch, pad)[None, None].astype(np.float32)


def organ_patch(
    patch: Sequence[int],
    spacing_mm: Sequence[float] | float,
    normalisation: Intensity | PercentileIntensity | None = None,
    seed: int = 0,
    domain: str = "A",
) -> np.ndarray:
    """A preprocessed synthetic abdominal CT patch centred on the liver.

    Args:
        patch: patch shape ``(z, y, x)``, voxels of the model grid.
        spacing_mm: the model grid's voxel size ``(z, y, x)`` mm (or one number).
        normalisation: the model's normalisation; default :class:`Intensity()`.
        seed: subject seed (:func:`~medssl.synth.organs.generate_organ_phantom`).
        domain: the phantom's imaging domain.

    Returns:
        ``(1, 1, Z, Y, X)`` float32 in ``[-1, 1]``.
    """
    normalisation = normalisation or Intensity()
    case = generate_organ_phantom(seed, domain)
    volume = prepare(case.image, Preparation(_grid(spacing_mm), normalisation))
    liver = np.argwhere(case.label.array == 1)
    centre = volume.world_to_index(case.label.index_to_world(liver.mean(axis=0)))
    start = [round(c - p / 2) for c, p in zip(centre, patch)]
    return extract_window(volume.array, start, patch, normalisation.pad_value)[None, None].astype(
        np.float32
    )


def _grid(spacing_mm: Sequence[float] | float) -> float | tuple[float, float, float]:
    """One number, or the ``(z, y, x)`` triple of a sequence."""
    if isinstance(spacing_mm, (int, float)):
        return float(spacing_mm)
    z, y, x = (float(s) for s in spacing_mm)
    return (z, y, x)
