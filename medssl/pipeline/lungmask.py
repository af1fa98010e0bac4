"""A lung mask from Hounsfield units and connected components (torch-free: numpy + scipy).

The classic pipeline of the LUNA16 systems' preprocessing (e.g. the grt123 and DeepLung
``prep`` steps: threshold, drop air outside the body, keep the largest components, fill,
grow the mask so nodules on the pleura stay inside), written for two kinds of scans:

* a full field of view, where air surrounds the body and touches the image border;
* a targeted reconstruction (a ~100 mm field inside one lung, no outside air), where the
  *lung* touches the border. The usual "drop the air connected to the border" rule would
  delete the lung here, so this module tells air from lung by what it is, not where:
  air outside the body, gas in the bowel and the trachea are air (about -1000 HU), while
  aerated lung parenchyma is tissue and blood mixed with air (about -700 to -900 HU). A
  low-HU component whose mean, on a 2 mm grid, is below ``air_hu`` (-950) is air, not
  lung, wherever it lies.

Steps (:func:`lung_mask`), on a working grid of about ``work_mm`` (block means of the input,
which also average the noise away):

1. ``low = hu < threshold_hu`` (-400 HU); label its 6-connected components.
2. Drop the air components (mean HU below ``air_hu``): outside air, bowel gas, a
   trachea that is its own component. Outside air is the air components touching the
   in-plane image border; every other low-HU component that touches that border within
   ``outside_gap_mm`` of outside air is outside the body too (the foam core of the
   table, blankets): a lung lies behind a chest wall of 15 mm or more. A targeted
   reconstruction has no outside air, so the lung touching its border stays.
3. Airways: voxels below ``air_hu`` connected to the first or last slice (the trachea
   leaves the scan through its top), grown by :data:`AIRWAY_WALL_MM` to take the lumen's
   partial-volume rim, are taken out of what remains: the trachea and main bronchi leave
   the mask, which also separates the lungs where only they join them. Inside the lung
   the closing (step 5) puts the bronchi back.
4. Keep the largest component, and the second if it holds at least ``second_fraction``
   of the largest's volume; components below ``min_volume_ml`` are never lungs. No
   component left: an empty mask (an abdomen, a head): the caller decides what to do.
5. Per lung, a closing by ``closing_mm`` (15 mm): the bite a juxta-pleural or
   juxta-mediastinal nodule takes out of the low-HU region is filled up to that radius.
   Outside the field of view counts as "not lung" here, so the closing does not spread
   along the image border.
6. Fill the holes (vessels, nodules inside the lung) and dilate by ``margin_mm`` (5 mm),
   so a nodule attached to the chest wall stays inside with its whole centre region.

Morphology uses exact Euclidean distance transforms in mm (anisotropic grids included),
so radii are millimetres whatever the voxel size and cost does not grow with them.
Arrays are ``(z, y, x)``; spacing is ``(z, y, x)`` mm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medssl.volume import Volume

__all__ = ["LungMaskParams", "lung_mask"]

#: The airways taken out (``drop_airways``) are the air-density lumen grown by this much, mm:
#: the lumen's rim, partial-volumed with the wall on the working grid, goes with it.
AIRWAY_WALL_MM = 4.0


@dataclass(frozen=True)
class LungMaskParams:
    """How :func:`lung_mask` finds the lungs (HU thresholds, sizes in mm and mL).

    Attributes:
        threshold_hu: low-density threshold; lung parenchyma is below it, HU.
        air_hu: a component whose mean is below this is air, not lung, HU (``< threshold_hu``).
        work_mm: voxel size of the working grid (block means of the input), mm.
        min_volume_ml: the smallest component that can be a lung, mL. A chest CT shows
            1-3 L of each lung, a targeted reconstruction a few hundred mL; gas pockets
            of the bowel, which a partial volume with the wall can lift above ``air_hu``
            on a coarse grid, hold tens of mL.
        second_fraction: the second largest component is kept as the other lung when it
            holds at least this fraction of the largest's volume, ``[0, 1]``.
        outside_gap_mm: low-HU components this close to outside air are outside the body, mm.
        closing_mm: per-lung closing radius (fills juxta-pleural nodules up to it), mm.
        margin_mm: final dilation, mm.
        drop_airways: take the trachea and main bronchi (air connected to the first or
            last slice) out before choosing the lungs.
    """

    threshold_hu: float = -400.0
    air_hu: float = -950.0
    work_mm: float = 2.0
    min_volume_ml: float = 100.0
    second_fraction: float = 0.1
    outside_gap_mm: float = 10.0
    closing_mm: float = 15.0
    margin_mm: float = 5.0
    drop_airways: bool = True

    def __post_init__(self) -> None:
        for name in (
            "threshold_hu",
            "air_hu",
            "work_mm",
            "min_volume_ml",
            "second_fraction",
            "outside_gap_mm",
            "closing_mm",
            "margin_mm",
        ):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ValueError(f"LungMaskParams.{name} must be a finite number, got {value!r}")
        if not self.air_hu < self.threshold_hu:
            raise ValueError(
                f"LungMaskParams.air_hu ({self.air_hu}) must be below threshold_hu "
                f"({self.threshold_hu})"
            )
        if self.work_mm <= 0:
            raise ValueError(f"LungMaskParams.work_mm must be > 0, got {self.work_mm!r}")
        for name in ("min_volume_ml", "outside_gap_mm", "closing_mm", "margin_mm"):
            if getattr(self, name) < 0:
                raise ValueError(f"LungMaskParams.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.second_fraction <= 1:
            raise ValueError(
                f"LungMaskParams.second_fraction must be in [0, 1], got {self.second_fraction!r}"
            )
        if not isinstance(self.drop_airways, bool):
            raise ValueError(
                f"LungMaskParams.drop_airways must be a bool, got {self.drop_airways!r}"
            )


def lung_mask(
    volume_hu: Volume | np.ndarray,
    spacing: Sequence[float] | None = None,
    *,
    params: LungMaskParams = LungMaskParams(),
) -> np.ndarray:
    """Both lungs (with their vessels, airways inside them and nodules), grown by a margin.

    Args:
        volume_hu: CT in Hounsfield units, ``(Z, Y, X)``: a :class:`Volume` (its spacing
            is used) or an array (then ``spacing`` is required).
        spacing: voxel size ``(z, y, x)`` mm; only with an array.
        params: thresholds and sizes (:class:`LungMaskParams`).

    Returns:
        bool ``(Z, Y, X)`` on the input grid; all False when no lung is found (a scan of
        the abdomen or head, a field of view outside the lungs).

    Raises:
        ValueError: not 3D, no or a non-positive spacing, non-finite intensities.
    """
    hu, spacing_zyx = _inputs(volume_hu, spacing)
    factors = tuple(max(1, math.floor(params.work_mm / s + 0.5)) for s in spacing_zyx)
    work_spacing = np.asarray(spacing_zyx) * factors
    coarse = _block_mean(hu, factors)
    voxel_ml = float(np.prod(work_spacing)) / 1000.0

    low = coarse < params.threshold_hu
    labels, n = ndimage.label(low)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    means = ndimage.mean(coarse, labels, np.arange(1, n + 1))
    air_ids = np.flatnonzero(means < params.air_hu) + 1
    outside_ids = _outside_body(labels, air_ids, work_spacing, params.outside_gap_mm)
    candidates = low & ~np.isin(labels, np.union1d(air_ids, outside_ids))
    if params.drop_airways:
        candidates &= ~_dilate(
            _airways(coarse, candidates, params.air_hu), work_spacing, AIRWAY_WALL_MM
        )
    lungs = _largest_components(candidates, voxel_ml, params)
    if not lungs:
        return np.zeros(hu.shape, dtype=bool)
    mask = np.zeros(coarse.shape, dtype=bool)
    for lung in lungs:
        mask |= _close(lung, work_spacing, params.closing_mm)
    mask = ndimage.binary_fill_holes(mask)
    return _upsample(_dilate(mask, work_spacing, params.margin_mm), factors, hu.shape)


def _inputs(
    volume_hu: Volume | np.ndarray, spacing: Sequence[float] | None
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The HU array and its ``(z, y, x)`` spacing, validated."""
    if isinstance(volume_hu, Volume):
        if spacing is not None and not np.allclose(spacing, volume_hu.spacing):
            raise ValueError(
                f"spacing {tuple(spacing)} contradicts the volume's {volume_hu.spacing.tolist()}; "
                "pass a Volume without spacing, or an array with it"
            )
        hu, spacing_zyx = volume_hu.array, volume_hu.spacing
    else:
        if spacing is None:
            raise ValueError(
                "lung_mask needs spacing (z, y, x) mm with a bare array; or pass a Volume"
            )
        hu, spacing_zyx = np.asarray(volume_hu), np.asarray(spacing, dtype=np.float64)
    if hu.ndim != 3:
        raise ValueError(f"lung_mask needs a 3D (Z, Y, X) volume, got shape {hu.shape}")
    if np.shape(spacing_zyx) != (3,) or not np.all(np.asarray(spacing_zyx) > 0):
        raise ValueError(f"spacing must be three positive mm values (z, y, x), got {spacing_zyx!r}")
    return hu, tuple(float(s) for s in spacing_zyx)  # type: ignore[return-value]


def _block_mean(array: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Means over blocks of ``factors`` voxels (the last block on an axis may be smaller)."""
    out = np.asarray(array, dtype=np.float32)
    for axis, f in enumerate(factors):
        if f == 1:
            continue
        n = out.shape[axis]
        starts = np.arange(0, n, f)
        counts = np.minimum(starts + f, n) - starts
        out = np.add.reduceat(out, starts, axis=axis)
        shape = [1, 1, 1]
        shape[axis] = len(starts)
        out /= counts.reshape(shape).astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise ValueError("lung_mask needs finite HU values; the volume holds NaN or inf")
    return out


def _outside_body(
    labels: np.ndarray, air_ids: np.ndarray, spacing: np.ndarray, gap_mm: float
) -> np.ndarray:
    """Labels of the non-air components that touch the in-plane border within ``gap_mm`` of
    outside air (the air components touching that border).

    Each is tested in its own bounding box grown by the gap, so the cost follows those
    components (the table: a thin slab), not the scan.
    """
    rim = np.unique(np.concatenate([labels[:, [0, -1], :].ravel(), labels[:, :, [0, -1]].ravel()]))
    outside_air = np.intersect1d(air_ids, rim)
    touching = np.setdiff1d(rim[rim > 0], air_ids)
    if len(outside_air) == 0 or len(touching) == 0:  # e.g. a targeted reconstruction
        return np.zeros(0, dtype=np.int64)
    pad = [math.ceil(gap_mm / s) + 1 for s in spacing]
    boxes = ndimage.find_objects(labels)
    near = []
    for index in touching:
        box = tuple(slice(max(b.start - p, 0), b.stop + p) for b, p in zip(boxes[index - 1], pad))
        crop = labels[box]
        air = np.isin(crop, outside_air)
        if air.any():
            distance = ndimage.distance_transform_edt(~air, sampling=spacing)
            if np.any(distance[crop == index] <= gap_mm):
                near.append(index)
    return np.asarray(near, dtype=np.int64)


def _airways(coarse: np.ndarray, candidates: np.ndarray, air_hu: float) -> np.ndarray:
    """Air-density voxels of ``candidates`` connected to the first or last slice (trachea)."""
    air = candidates & (coarse < air_hu)
    labels, n = ndimage.label(air)
    if n == 0:
        return air
    ends = np.union1d(labels[0], labels[-1])
    return np.isin(labels, ends[ends > 0])


def _largest_components(
    candidates: np.ndarray, voxel_ml: float, params: LungMaskParams
) -> list[np.ndarray]:
    """The lung components: the largest, and the second if big enough (both >= min volume)."""
    labels, n = ndimage.label(candidates)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:].astype(np.float64)
    order = np.argsort(-sizes)
    kept = [order[0]] if sizes[order[0]] * voxel_ml >= params.min_volume_ml else []
    if kept and n > 1:
        second = order[1]
        if (
            sizes[second] >= params.second_fraction * sizes[order[0]]
            and sizes[second] * voxel_ml >= params.min_volume_ml
        ):
            kept.append(second)
    return [labels == index + 1 for index in kept]


def _dilate(mask: np.ndarray, spacing: np.ndarray, radius_mm: float) -> np.ndarray:
    """Dilation of ``mask`` by a ball of ``radius_mm`` (exact Euclidean, mm), in its grown bounding
    box."""
    if radius_mm <= 0 or not mask.any():
        return mask
    pad = [math.ceil(radius_mm / s) + 1 for s in spacing]
    (box,) = ndimage.find_objects(mask.astype(np.uint8))
    grown = tuple(slice(max(b.start - p, 0), b.stop + p) for b, p in zip(box, pad))
    out = np.zeros_like(mask)
    out[grown] = ndimage.distance_transform_edt(~mask[grown], sampling=spacing) <= radius_mm
    return out


def _close(mask: np.ndarray, spacing: np.ndarray, radius_mm: float) -> np.ndarray:
    """Closing of one component by a ball of ``radius_mm``, treating the outside as background.

    Computed in the component's bounding box padded by the radius, so the cost follows the
    lung, not the scan; the padding is False, so nothing spreads along the image border.
    """
    if radius_mm <= 0:
        return mask
    pad = [math.ceil(radius_mm / s) + 1 for s in spacing]
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    crop = np.pad(mask[box], [(p, p) for p in pad])
    grown = ndimage.distance_transform_edt(~crop, sampling=spacing) <= radius_mm
    closed = ndimage.distance_transform_edt(grown, sampling=spacing) > radius_mm
    inner = tuple(slice(p, p + (s.stop - s.start)) for p, s in zip(pad, box))
    out = mask.copy()
    out[box] |= closed[inner]
    return out


def _upsample(mask: np.ndarray, factors: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-block upsampling of the working-grid mask back onto the ``shape`` input grid."""
    index = [np.arange(n) // f for n, f in zip(shape, factors)]
    return mask[np.ix_(*index)]
