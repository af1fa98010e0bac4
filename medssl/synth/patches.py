"""Model-ready patches cut from synthetic chest CT, for parity checks and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medssl.pipeline.preprocess import Intensity, preprocess_ct
from medssl.pipeline.windows import extract_window
from medssl.synth.chest import ChestConfig, generate_chest_ct

__all__ = ["chest_patch"]


def chest_patch(patch: Sequence[int], spacing_mm: Sequence[float] | float = 1.0,
                intensity: Intensity | None = None, seed: int = 0, matrix: int = 96) -> np.ndarray:
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
    case = generate_chest_ct(seed, ChestConfig(matrix=matrix, n_slices=max(48, int(patch[0])),
                                               n_nodules_range=(1, 1), render_threads=1))
    volume = preprocess_ct(case.volume, spacing_mm, intensity)
    centre = volume.world_to_index(case.nodules[0].centre_lps)
    start = [int(round(c - p / 2)) for c, p in zip(centre, patch)]
    pad = (intensity or Intensity()).pad_value
    return extract_window(volume.array, start, patch, pad)[None, None].astype(np.float32)
