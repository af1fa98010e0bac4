"""CT preprocessing for medssl models: resample, then window and scale Hounsfield units.

The parameters are part of a model's card (``medssl.json``), so training, scoring and
serving prepare a scan identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medssl.volume import Volume

__all__ = ["Intensity", "preprocess_ct"]


@dataclass(frozen=True)
class Intensity:
    """HU window mapped linearly onto ``[-1, 1]``; values outside are clipped.

    The default is the lung window used by 3D nodule detectors (DeepLung, the
    FocalMix baseline): [-1200, 600] HU. Padding outside a scan uses
    :attr:`pad_value`, air (-1000 HU) after scaling.
    """

    hu_min: float = -1200.0
    hu_max: float = 600.0
    pad_hu: float = -1000.0

    def __post_init__(self) -> None:
        if not self.hu_max > self.hu_min:
            raise ValueError(f"intensity window needs hu_max > hu_min, got [{self.hu_min}, {self.hu_max}]")

    def apply(self, hu: np.ndarray) -> np.ndarray:
        """HU array of any shape → float32 in ``[-1, 1]``."""
        scale = 2.0 / (self.hu_max - self.hu_min)
        out = np.clip(hu, self.hu_min, self.hu_max).astype(np.float32)
        out -= self.hu_min
        out *= scale
        out -= 1.0
        return out

    @property
    def pad_value(self) -> float:
        return float(self.apply(np.array(self.pad_hu)))

    def to_json(self) -> dict[str, float]:
        return {"hu_min": self.hu_min, "hu_max": self.hu_max, "pad_hu": self.pad_hu}


def preprocess_ct(
    volume: Volume, spacing_mm: Sequence[float] | float = 1.0, intensity: Intensity | None = None
) -> Volume:
    """Resample a HU volume to ``spacing_mm`` (linear) and scale it with ``intensity``.

    Args:
        volume: HU volume, any spacing and direction.
        spacing_mm: target voxel size ``(z, y, x)`` mm or one number (isotropic).
        intensity: the window; default :class:`Intensity()`.

    Returns:
        A float32 Volume in ``[-1, 1]`` whose affine maps its voxels to the same LPS
        world as the input, so model outputs convert to world mm with ``index_to_world``.
    """
    intensity = intensity or Intensity()
    target = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    resampled = volume if np.allclose(volume.spacing, target, atol=1e-3) else volume.resample(target)
    return resampled.with_array(intensity.apply(resampled.array))
