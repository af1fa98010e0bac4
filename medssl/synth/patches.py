"""Model-ready patches cut from synthetic CT (chest, abdomen), for parity checks and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medssl.pipeline.preprocess import Intensity, PercentileIntensity, preprocess_ct
from medssl.pipeline.windows import extract_window
from medssl.synth.chest import ChestConfig, generate_chest_ct
from medssl.synth.organs import generate_organ_phantom

__all__ = ["chest_patch", "organ_patch"]


def chest_patch(
    patch: Sequence[int],
    spacing_mm: Sequence[float] | float = 1.0,
    intensity: Intensity | None = None,
    seed: int = 0,
    matrix: int = 96,
) -> np.ndarray:
    """A preprocessed synthetic chest CT patch centred on a nodule.

    Args:
        patch: patch shape ``(z, y, x)``, voxels of the model grid.
        spacing_mm: the model grid's voxel size ``(z, y, x)`` mm (or one number).
        intensity: the model's HU window; default :class:`Intensity()`.
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
    volume = preprocess_ct(case.volume, spacing_mm, intensity)
    centre = volume.world_to_index(case.nodules[0].centre_lps)
    start = [round(c - p / 2) for c, p in zip(centre, patch)]
    pad = (intensity or Intensity()).pad_value
    return extract_window(volume.array, start, patch, pad)[None, None].astype(np.float32)


def organ_patch(
    patch: Sequence[int],
    spacing_mm: Sequence[float] | float,
    intensity: Intensity | PercentileIntensity | None = None,
    seed: int = 0,
    domain: str = "A",
) -> np.ndarray:
    """A preprocessed synthetic abdominal CT patch centred on the liver.

    Args:
        patch: patch shape ``(z, y, x)``, voxels of the model grid.
        spacing_mm: the model grid's voxel size ``(z, y, x)`` mm (or one number).
        intensity: the model's normalisation; default :class:`Intensity()`.
        seed: subject seed (:func:`~medssl.synth.organs.generate_organ_phantom`).
        domain: the phantom's imaging domain.

    Returns:
        ``(1, 1, Z, Y, X)`` float32 in ``[-1, 1]``.
    """
    intensity = intensity or Intensity()
    case = generate_organ_phantom(seed, domain)
    volume = preprocess_ct(case.image, spacing_mm, intensity)
    liver = np.argwhere(case.label.array == 1)
    centre = volume.world_to_index(case.label.index_to_world(liver.mean(axis=0)))
    start = [round(c - p / 2) for c, p in zip(centre, patch)]
    return extract_window(volume.array, start, patch, intensity.pad_value)[None, None].astype(
        np.float32
    )
