"""CT preprocessing for medssl models: resample, then window and scale Hounsfield units.

The parameters are part of a model's card (``medssl.json``), so training, scoring and
serving prepare a scan identically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medssl.volume import Volume

__all__ = [
    "Intensity",
    "PercentileIntensity",
    "check_model_grid",
    "normalisation_from_json",
    "preprocess_ct",
    "resample_to_spacing",
]


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
            raise ValueError(
                f"intensity window needs hu_max > hu_min, got [{self.hu_min}, {self.hu_max}]"
            )

    def apply(self, hu: np.ndarray) -> np.ndarray:
        """HU array of any shape → a new float32 array in ``[-1, 1]``."""
        out = np.empty(np.shape(hu), np.float32)
        np.clip(hu, self.hu_min, self.hu_max, out=out)
        self._scale(out)
        return out

    def apply_inplace(self, hu: np.ndarray) -> None:
        """:meth:`apply` on a float32 HU array, in place (what :func:`preprocess_ct` runs on each
        resampled block while it is in cache)."""
        np.clip(hu, self.hu_min, self.hu_max, out=hu)
        self._scale(hu)

    def _scale(self, clipped: np.ndarray) -> None:
        clipped -= self.hu_min
        clipped *= 2.0 / (self.hu_max - self.hu_min)
        clipped -= 1.0

    @property
    def pad_value(self) -> float:
        return float(self.apply(np.array(self.pad_hu)))

    def to_json(self) -> dict[str, float]:
        return {"hu_min": self.hu_min, "hu_max": self.hu_max, "pad_hu": self.pad_hu}


@dataclass(frozen=True)
class PercentileIntensity:
    """Per-volume window: the ``lower``..``upper`` percentiles mapped onto ``[-1, 1]``.

    For data without a calibrated scale (MR) or several domains with different ones: A&D's
    M&Ms preprocessing clips to the 0.5 / 99.5 percentiles and rescales
    (``code/utils/__init__.py: read_data``). The percentiles are taken over the whole
    volume passed to :meth:`apply` (every 7th voxel, which moves them by far less than
    the noise), so apply it to whole scans, never to patches. Padding is the lower end, -1.
    """

    lower: float = 0.5
    upper: float = 99.5

    def __post_init__(self) -> None:
        if not 0 <= self.lower < self.upper <= 100:
            raise ValueError(
                f"need 0 <= lower < upper <= 100 percentiles, got {self.lower}, {self.upper}"
            )

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Any-shape array → float32 in ``[-1, 1]``."""
        sample = np.asarray(array, dtype=np.float32).ravel()[::7]
        lo, hi = np.percentile(sample, [self.lower, self.upper]) if sample.size else (0.0, 1.0)
        scale = 2.0 / max(float(hi - lo), 1e-6)
        out = np.clip(array, lo, hi).astype(np.float32)
        out -= lo
        out *= scale
        out -= 1.0
        return out

    @property
    def pad_value(self) -> float:
        return -1.0

    def to_json(self) -> dict[str, Any]:
        return {"kind": "percentile", "lower": self.lower, "upper": self.upper}


def normalisation_from_json(data: Mapping[str, Any]) -> Intensity | PercentileIntensity:
    """Inverse of ``to_json`` of either normalisation (no ``kind``: an HU window)."""
    body = {k: v for k, v in data.items() if k not in ("kind", "output_range")}
    kind = data.get("kind", "hu_window")
    if kind == "percentile":
        return PercentileIntensity(**body)
    if kind == "hu_window":
        return Intensity(**body)
    raise ValueError(f"normalisation kind must be 'hu_window' or 'percentile', got {kind!r}")


def preprocess_ct(
    volume: Volume,
    spacing_mm: Sequence[float] | float = 1.0,
    intensity: Intensity | PercentileIntensity | None = None,
) -> Volume:
    """Resample a HU volume to ``spacing_mm`` (linear) and scale it with ``intensity``.

    Args:
        volume: HU volume, any spacing and direction.
        spacing_mm: target voxel size ``(z, y, x)`` mm or one number (isotropic).
        intensity: the normalisation; default the HU window :class:`Intensity()`.

    Returns:
        A float32 Volume in ``[-1, 1]`` whose affine maps its voxels to the same LPS
        world as the input, so model outputs convert to world mm with ``index_to_world``.
    """
    intensity = intensity or Intensity()
    target = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    if isinstance(intensity, Intensity) and not np.allclose(volume.spacing, target, atol=1e-3):
        # the window is elementwise: applied to each resampled block in its thread, while in cache
        return volume.resample(target, post=intensity.apply_inplace)
    resampled = resample_to_spacing(volume, spacing_mm)
    return resampled.with_array(intensity.apply(resampled.array))


def resample_to_spacing(volume: Volume, spacing_mm: Sequence[float] | float) -> Volume:
    """``volume`` on a grid of voxel size ``spacing_mm`` (linear), the step every model input takes.

    A volume already within 1e-3 mm of ``spacing_mm`` on every axis is returned as it is
    (same object, dtype kept); otherwise :meth:`Volume.resample` makes a float32 copy whose
    first voxel centre is the input's and whose affine places it in the same LPS world.

    Args:
        volume: any volume, any spacing and direction.
        spacing_mm: target voxel size ``(z, y, x)`` mm or one number (isotropic).
    """
    target = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    if np.allclose(volume.spacing, target, atol=1e-3):
        return volume
    return volume.resample(target)


def check_model_grid(prepared: Volume, spacing_mm: Sequence[float] | float, how: str) -> None:
    """Fail loudly when ``prepared`` is not on the model grid ``spacing_mm``.

    Args:
        how: what to call to prepare a volume properly (named in the error).

    Raises:
        ValueError: the spacing differs by more than 1e-3 mm.
    """
    if not np.allclose(prepared.spacing, spacing_mm, atol=1e-3):
        raise ValueError(
            f"prepared volume has spacing {prepared.spacing.round(4).tolist()} mm but the model grid is "
            f"{np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,)).tolist()} mm; prepare it with {how}"
        )
