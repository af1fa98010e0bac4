"""Preparing a scan for a medssl model: resample to the model grid, then normalise intensities.

:func:`prepare` is the one entry point, for detection and segmentation alike: it takes a
volume and the model's parameters (:class:`~medssl.pipeline.detect.DetectionParams`,
:class:`~medssl.pipeline.segment.SegmentationParams`, or a bare :class:`Preparation`), whose
shared vocabulary is ``spacing_mm`` (the model grid) and ``normalisation`` (:class:`Intensity`,
an HU window, or :class:`PercentileIntensity`). The parameters are part of a model's card
(``medssl.json``), so training, scoring and serving prepare a scan identically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Protocol

import numpy as np

from medssl.volume import Volume

__all__ = [
    "BODY_HU",
    "BODY_MARGIN",
    "BODY_MIN_VOXELS",
    "Intensity",
    "ModelGrid",
    "PercentileIntensity",
    "Preparation",
    "body_box",
    "check_model_grid",
    "normalisation_from_json",
    "prepare",
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
        """:meth:`apply` on a float32 HU array, in place (what :func:`prepare` runs on each
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


class Normalisation(Protocol):
    """Intensity normalisation of a model (part of its card).

    :class:`~medssl.pipeline.preprocess.Intensity` is one; any object with this interface works.
    """

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Source intensities of any shape → float32 model input of the same shape."""
        ...

    @property
    def pad_value(self) -> float:
        """Normalised value of voxels outside the scan (window padding)."""
        ...

    def to_json(self) -> dict[str, Any]: ...


class ModelGrid(Protocol):
    """What :func:`prepare` reads from a model's parameters (the shared vocabulary).

    Attributes:
        spacing_mm: the model grid's voxel size, mm: one number (isotropic) or ``(z, y, x)``.
        normalisation: the intensity mapping onto the model's input range.
        crop_to_body: record the body's bounding box (HU windows only) in the prepared
            volume's ``meta["body_box"]``, so sliding windows tile only the body.
        window: the sliding window ``(wz, wy, wx)`` (the body box is at least this large).
    """

    @property
    def spacing_mm(self) -> float | tuple[float, float, float]: ...

    @property
    def normalisation(self) -> Normalisation: ...

    @property
    def crop_to_body(self) -> bool: ...

    @property
    def window(self) -> tuple[int, int, int]: ...


@dataclass(frozen=True)
class Preparation:
    """The preparation half of a model's parameters, for callers that have no model (a training
    cache, patch makers): a grid and a normalisation, no body box.

    Attributes:
        spacing_mm: voxel size, mm: one number (isotropic) or ``(z, y, x)``.
        normalisation: the intensity mapping; default the HU window :class:`Intensity()`.
    """

    spacing_mm: float | tuple[float, float, float] = 1.0
    normalisation: Intensity | PercentileIntensity = Intensity()

    @property
    def crop_to_body(self) -> bool:
        return False

    @property
    def window(self) -> tuple[int, int, int]:
        return (1, 1, 1)


def prepare(volume: Volume, params: ModelGrid, timings: dict[str, float] | None = None) -> Volume:
    """Resample ``volume`` to the model grid ``params.spacing_mm`` (linear) and normalise it with
    ``params.normalisation``: a model's input, for detection and segmentation alike.

    An HU window on a volume that needs resampling is applied to each resampled block while it
    is in cache (:meth:`Volume.resample`'s ``post``); anything else is resampled (a volume
    already on the grid, within 1e-3 mm, is not) and then normalised. With
    ``params.crop_to_body`` and an HU window, the body's bounding box (:func:`body_box`, found
    on the resampled HU) goes to ``meta["body_box"]`` as ``[[start, stop]] * 3``.

    Args:
        volume: source scan (HU for CT), any spacing and direction.
        params: :class:`~medssl.pipeline.detect.DetectionParams`,
            :class:`~medssl.pipeline.segment.SegmentationParams` or :class:`Preparation`.
        timings: when given, ``resample`` and ``normalise`` seconds are set in it (a window
            applied while resampling counts as ``resample``).

    Returns:
        A float32 Volume of normalised intensities whose affine maps its voxels to the same
        LPS world as the input, so model outputs convert to world mm with ``index_to_world``.

    Raises:
        ValueError: the normalisation changed the array's shape.
    """
    normalisation = params.normalisation
    target = [float(s) for s in np.broadcast_to(np.asarray(params.spacing_mm, dtype=float), (3,))]
    hu_window = isinstance(normalisation, Intensity)
    crop = hu_window and params.crop_to_body
    tic = perf_counter()
    if (
        isinstance(normalisation, Intensity)
        and not crop
        and not np.allclose(volume.spacing, target, atol=1e-3)
    ):
        # the window is elementwise: applied to each resampled block in its thread, while in cache
        prepared = volume.resample(target, post=normalisation.apply_inplace)
        if timings is not None:
            timings["resample"], timings["normalise"] = perf_counter() - tic, 0.0
        return prepared
    resampled = resample_to_spacing(volume, target)
    if timings is not None:
        timings["resample"] = perf_counter() - tic
    tic = perf_counter()
    normalised = np.asarray(normalisation.apply(resampled.array), dtype=np.float32)
    if normalised.shape != resampled.shape:
        raise ValueError(
            f"normalisation {normalisation!r} changed the array shape {resampled.shape} to "
            f"{normalised.shape}"
        )
    prepared = resampled.with_array(normalised)
    if crop:
        box = body_box(resampled.array, params.window)
        if box is not None:
            prepared.meta["body_box"] = [[b.start, b.stop] for b in box]
    if timings is not None:
        timings["normalise"] = perf_counter() - tic
    return prepared


#: HU above which a voxel is body, not air (fat is about -100, lung about -850, air -1000).
BODY_HU = -500.0
#: Voxels above :data:`BODY_HU` a plane must hold to count as body (drops noise and specks).
BODY_MIN_VOXELS = 50
#: Model-grid voxels added around the body box.
BODY_MARGIN = 4


def body_box(hu: np.ndarray, window: Sequence[int]) -> tuple[slice, slice, slice] | None:
    """The bounding box of the body in a HU volume, for sliding-window segmentation.

    A plane (along each axis) belongs to the body when it holds at least
    :data:`BODY_MIN_VOXELS` voxels above :data:`BODY_HU`; the box spans those planes plus
    :data:`BODY_MARGIN` voxels, grown to at least ``window`` and clipped to the volume. The
    lungs, inside the chest wall, are inside the box; the table, when dense, widens it.

    Args:
        hu: ``(Z, Y, X)`` HU on the model grid.
        window: the sliding window ``(wz, wy, wx)``.

    Returns:
        Slices ``(z, y, x)``, or None when the volume holds no body (nothing is skipped then).
    """
    mask = hu > BODY_HU
    box = []
    for axis in range(3):
        counts = mask.sum(axis=tuple(a for a in range(3) if a != axis))
        planes = np.flatnonzero(counts >= BODY_MIN_VOXELS)
        if planes.size == 0:
            return None
        n, w = hu.shape[axis], int(window[axis])
        lo, hi = max(int(planes[0]) - BODY_MARGIN, 0), min(int(planes[-1]) + 1 + BODY_MARGIN, n)
        if hi - lo < w:  # at least one window, centred on the body where the volume allows
            lo = max(0, min(lo - (w - (hi - lo)) // 2, n - w))
            hi = min(n, lo + w)
        box.append(slice(lo, hi))
    return box[0], box[1], box[2]


def resample_to_spacing(volume: Volume, spacing_mm: Sequence[float] | float) -> Volume:
    """``volume`` on a grid of voxel size ``spacing_mm`` (linear), the step every model input takes.

    A volume already within 1e-3 mm of ``spacing_mm`` on every axis is returned as it is
    (same object, dtype kept); otherwise :meth:`Volume.resample` makes a float32 copy whose
    first voxel centre is the input's and whose affine places it in the same LPS world.

    Args:
        volume: any volume, any spacing and direction.
        spacing_mm: target voxel size ``(z, y, x)`` mm or one number (isotropic).
    """
    target = [float(s) for s in np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))]
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
            f"prepared volume has spacing {prepared.spacing.round(4).tolist()} mm but the model "
            f"grid is {np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,)).tolist()} mm; "
            f"prepare it with {how}"
        )
