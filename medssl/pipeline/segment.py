"""Semantic segmentation of a CT volume: resample, normalise, blend sliding windows, map back.

This is the one segmentation pipeline: training evaluation, batch scoring and the DICOM
gateway all call :func:`segment` (or :func:`segment_preprocessed` on a volume already on
the model grid, e.g. from a training cache). The model is a :class:`SegmentationRunner`
(onnxruntime, a Triton client, a torch module wrapped by training, a fake in tests); this
module never imports torch.

Frames and steps:

1. The source volume (any spacing and direction) is resampled linearly to
   ``params.spacing_mm`` (:func:`~medssl.pipeline.preprocess.prepare`, as for detection): the
   *model grid*, whose affine places it in the same LPS world as the source.
2. ``params.normalisation`` maps intensities to what the model was trained on (same function).
3. Windows ``params.window`` tile the model grid (:func:`~medssl.pipeline.windows.plan_windows`),
   padded with ``normalisation.pad_value`` where they leave it, and run through the model in
   batches of ``params.batch_size``. For CT (an HU-window normalisation) only the body's
   bounding box is tiled (:func:`~medssl.pipeline.preprocess.body_box`, found on the resampled HU
   before normalisation and
   kept in the prepared volume's ``meta["body_box"]``); the air around it is background
   without running the model there.
4. Each window's class scores are weighted by :func:`importance_map` (Gaussian or constant,
   MONAI's ``sliding_window_inference`` blending) and accumulated; dividing by the summed
   weights gives per-class probabilities ``(C, Z, Y, X)`` on the model grid.
5. ``argmax`` over classes gives the model-grid label map.
6. Back on the source grid: each class's probability map is resampled linearly to the source
   voxel centres (mapped into the model grid through both affines), keeping a running max and
   argmax. This is "resample probabilities, then argmax", as nnU-Net exports its predictions,
   which gives smoother boundaries than resampling the label map with nearest neighbour. It
   never holds the C-channel map on the source grid (12 classes on a 300x512x512 scan would be
   ~3.8 GB of float32): the source grid is filled in slabs of z slices, and a slab costs two
   float32 arrays (the running max and the class being resampled, ~16 MB each) on top of the
   source-sized label map.
7. Optionally, only the largest 26-connected component of some labels is kept
   (:func:`largest_component`), on the source grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from time import perf_counter
from typing import Any, Protocol

import numpy as np
from scipy import ndimage

from medssl.pipeline.checks import (
    Rules,
    check_fields,
    is_int,
    is_number,
    is_triple,
    positive_int,
    positive_number,
)
from medssl.pipeline.preprocess import (
    Normalisation,
    check_model_grid,
    normalisation_from_json,
    prepare,
)
from medssl.pipeline.windows import extract_window, plan_windows
from medssl.volume import Volume, lerp_axis

__all__ = [
    "Blending",
    "Normalisation",
    "SegmentationParams",
    "SegmentationResult",
    "SegmentationRunner",
    "importance_map",
    "largest_component",
    "segment",
    "segment_prepared",
    "segment_preprocessed",
]

#: Largest class count a label map can hold (uint16).
_MAX_CLASSES = 65536

#: Source-grid voxels resampled at once (whole z slices) when mapping probabilities back.
_SLAB_VOXELS = 1 << 22

#: MONAI's floor on importance-map weights (``compute_importance_map``), so that window
#: corners keep a small positive weight and every covered voxel has a non-zero weight sum.
_MIN_WEIGHT = 1e-3


class SegmentationRunner(Protocol):
    """A segmentation model behind a plain numpy call (any callable with this signature).

    ``runner(patches) -> scores`` where

    * ``patches``: ``(B, 1, wz, wy, wx)`` float32, already normalised
      (``params.normalisation``); ``B <= params.batch_size`` (the last batch may be smaller).
    * ``scores``: ``(B, C, wz, wy, wx)`` per-class scores, ``C = params.n_classes``
      (background included). The exported graphs (ONNX, TensorRT) end with the softmax, so
      these are probabilities; the pipeline only needs them comparable across classes and
      does not assume they sum exactly to 1 (float16 engines do not). A one-element tuple
      holding that array is accepted too (the :mod:`medssl.runners` convention).
    """

    def __call__(self, patches: np.ndarray) -> np.ndarray: ...


class Blending(str, Enum):
    """How overlapping windows are weighted (MONAI's ``BlendMode``)."""

    GAUSSIAN = "gaussian"
    CONSTANT = "constant"


def _is_normalisation(value: Any) -> bool:
    return (
        callable(getattr(value, "apply", None))
        and callable(getattr(value, "to_json", None))
        and is_number(getattr(value, "pad_value", None))
    )


_RULES: Rules = {
    "spacing_mm": (
        lambda v, _: is_triple(v, positive_number),
        lambda _: "three positive numbers (z, y, x) mm",
    ),
    "normalisation": (
        lambda v, _: _is_normalisation(v),
        lambda _: "an object with apply(array), a finite pad_value and to_json() (e.g. Intensity)",
    ),
    "window": (
        lambda v, _: is_triple(v, positive_int),
        lambda _: "three positive integers (wz, wy, wx) voxels",
    ),
    "n_classes": (
        lambda v, _: is_int(v) and 2 <= v <= _MAX_CLASSES,
        lambda _: f"an integer in [2, {_MAX_CLASSES}] (background included)",
    ),
    "overlap": (lambda v, _: is_number(v) and 0 <= v < 1, lambda _: "in [0, 1)"),
    "blending": (
        lambda v, _: isinstance(v, Blending),
        lambda _: f"one of {[b.value for b in Blending]}",
    ),
    "sigma_scale": (positive_number, lambda _: "a positive number"),
    "batch_size": (positive_int, lambda _: "a positive integer"),
    "largest_component": (
        lambda v, p: isinstance(v, tuple) and all(is_int(k) and 1 <= k < p.n_classes for k in v),
        lambda p: f"labels in [1, n_classes={p.n_classes!r})",
    ),
}


@dataclass(frozen=True, kw_only=True)
class SegmentationParams:
    """How a scan is prepared, windowed and post-processed (part of the model card).

    Keyword-only. Sequences are stored as tuples, ``blending`` as :class:`Blending`.

    Attributes:
        spacing_mm: voxel size ``(z, y, x)`` mm of the model grid (anisotropic allowed).
        normalisation: intensity normalisation (:class:`Normalisation`, e.g. ``Intensity``).
        window: sliding-window shape ``(wz, wy, wx)``, model-grid voxels.
        n_classes: classes the model scores, background (label 0) included.
        overlap: fraction of a window edge shared by neighbouring windows, ``[0, 1)``.
        blending: ``"gaussian"`` (centre voxels count more) or ``"constant"``.
        sigma_scale: Gaussian sigma per axis as a fraction of the window edge (0.125 is the
            nnU-Net and MONAI default).
        batch_size: windows per runner call.
        largest_component: labels of which only the largest 26-connected component is kept.
    """

    spacing_mm: tuple[float, float, float]
    normalisation: Normalisation
    window: tuple[int, int, int]
    n_classes: int
    overlap: float = 0.5
    blending: Blending | str = Blending.GAUSSIAN
    sigma_scale: float = 0.125
    batch_size: int = 2
    largest_component: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("spacing_mm", "window", "largest_component"):
            value = getattr(self, name)
            if isinstance(value, (list, np.ndarray)):
                object.__setattr__(self, name, tuple(np.asarray(value).tolist()))
        if isinstance(self.blending, str) and self.blending in {b.value for b in Blending}:
            object.__setattr__(self, "blending", Blending(self.blending))
        check_fields(self, _RULES)

    @property
    def crop_to_body(self) -> bool:
        """True: for an HU window, :func:`~medssl.pipeline.preprocess.prepare` records the body
        box and only it is tiled (the air around it is background)."""
        return True

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict for the model card; ``normalisation`` is its own ``to_json()``."""
        return {
            "spacing_mm": list(self.spacing_mm),
            "normalisation": self.normalisation.to_json(),
            "window": list(self.window),
            "n_classes": self.n_classes,
            "overlap": self.overlap,
            "blending": Blending(self.blending).value,
            "sigma_scale": self.sigma_scale,
            "batch_size": self.batch_size,
            "largest_component": list(self.largest_component),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SegmentationParams:
        """Inverse of :meth:`to_json`; a ``normalisation`` mapping becomes an ``Intensity`` or
        ``PercentileIntensity``.

        Missing optional keys take the defaults.

        Raises:
            ValueError: an unknown or missing required key, or a value that fails validation.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown SegmentationParams keys {unknown}; expected some of {sorted(known)}"
            )
        missing = sorted({"spacing_mm", "normalisation", "window", "n_classes"} - set(data))
        if missing:
            raise ValueError(f"SegmentationParams needs keys {missing}")
        values = dict(data)
        if isinstance(values["normalisation"], Mapping):
            try:
                values["normalisation"] = normalisation_from_json(values["normalisation"])
            except TypeError as exc:
                raise ValueError(f"SegmentationParams.normalisation: {exc}") from None
        return cls(**values)


@dataclass
class SegmentationResult:
    """What :func:`segment` found, and what it cost.

    Attributes:
        labels: label map on the source grid (same shape and affine as the input volume),
            uint8 if ``n_classes <= 256`` else uint16; 0 is background.
        model_grid_labels: argmax on the model grid (``params.spacing_mm``), before
            :func:`largest_component`; what training evaluation compares with resampled truth.
        timings: seconds per stage: ``resample`` (source → model grid), ``normalise``,
            ``inference`` (window extraction and runner calls), ``blend`` (weighted
            accumulation and division), ``resample_back`` (per-class probabilities → source
            grid, running argmax), ``postprocess`` (model-grid argmax, largest components,
            volumes).
        volumes_ml: per label ``1 .. n_classes - 1``, its volume on the source grid in ml
            (voxel count × voxel volume mm³ / 1000); 0.0 for labels not found.
        n_windows: windows run through the model.
        n_windows_skipped: windows of the whole model grid not run because they lie outside
            the body box (0 without a box).
    """

    labels: Volume
    model_grid_labels: Volume
    timings: dict[str, float]
    volumes_ml: dict[int, float]
    n_windows: int
    n_windows_skipped: int = 0


def importance_map(
    window: Sequence[int], blending: Blending | str = Blending.GAUSSIAN, sigma_scale: float = 0.125
) -> np.ndarray:
    """Per-voxel weight of a window's scores when overlapping windows are blended.

    Follows MONAI's ``compute_importance_map`` (MONAI 1.x): ``"constant"`` is all ones;
    ``"gaussian"`` is the separable Gaussian ``exp(-d² / (2 σ²))`` with ``d`` the distance
    (voxels) from the window centre ``(w - 1) / 2`` and ``σ = sigma_scale × w`` per axis,
    then floored at ``max(min, 1e-3)`` so that window corners keep a small positive weight.
    The peak is 1 for odd edges and slightly below 1 for even ones (MONAI 1.x dropped the
    division by the max; blending divides by the weight sum, so only the floor sees the scale).

    Args:
        window: window shape ``(wz, wy, wx)``, voxels.
        blending: ``"gaussian"`` or ``"constant"``.
        sigma_scale: sigma as a fraction of the window edge (gaussian only).

    Returns:
        float32 ``(wz, wy, wx)`` weights in ``(0, 1]``.
    """
    shape = tuple(int(w) for w in window)
    if Blending(blending) is Blending.CONSTANT:
        return np.ones(shape, dtype=np.float32)
    weights = np.ones((1, 1, 1), dtype=np.float64)
    for axis, w in enumerate(shape):
        d = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
        profile = np.exp(-(d**2) / (2.0 * (sigma_scale * w) ** 2))
        weights = weights * profile.reshape([-1 if a == axis else 1 for a in range(3)])
    weights = weights.astype(np.float32)
    return np.maximum(weights, max(float(weights.min()), _MIN_WEIGHT))


def segment(
    volume: Volume, runner: SegmentationRunner, params: SegmentationParams
) -> SegmentationResult:
    """Segment a volume: the label map on its own grid, and per-label volumes.

    Args:
        volume: source scan (e.g. HU), any spacing and direction.
        runner: the model (:class:`SegmentationRunner`).
        params: grid, normalisation, windowing and post-processing settings.

    Returns:
        :class:`SegmentationResult`; ``labels`` has ``volume``'s shape and affine.

    Raises:
        ValueError: the normalisation changed the array's shape, or the runner broke its
            contract (shapes, non-finite scores).
    """
    timings = _new_timings()
    prepared = prepare(volume, params, timings)
    result = segment_prepared(prepared, volume.shape, volume.affine, runner, params, timings)
    result.labels.meta.update(volume.meta)
    return result


def _new_timings() -> dict[str, float]:
    return dict.fromkeys(
        ("resample", "normalise", "inference", "blend", "resample_back", "postprocess"), 0.0
    )


def segment_prepared(
    prepared: Volume,
    source_shape: Sequence[int],
    source_affine: np.ndarray,
    runner: SegmentationRunner,
    params: SegmentationParams,
    timings: dict[str, float] | None = None,
) -> SegmentationResult:
    """The model half of :func:`segment`: sliding windows on ``prepared`` (the output of
    :func:`~medssl.pipeline.preprocess.prepare`), then labels on the source grid ``source_shape`` /
    ``source_affine`` (index ``(z, y, x)`` → LPS), post-processing and volumes."""
    timings = _new_timings() if timings is None else timings
    probabilities, n_windows, n_skipped = _blend_windows(prepared, runner, params, timings)

    tic = perf_counter()
    dtype = _label_dtype(params.n_classes)
    model_labels = np.argmax(probabilities, axis=0).astype(dtype)
    timings["postprocess"] += perf_counter() - tic

    tic = perf_counter()
    shape = tuple(int(n) for n in source_shape)
    affine = np.asarray(source_affine, dtype=np.float64)
    labels = _argmax_on_grid(probabilities, model_labels, prepared.affine, shape, affine, dtype)
    del probabilities
    timings["resample_back"] = perf_counter() - tic

    tic = perf_counter()
    if params.largest_component:
        labels = largest_component(labels, params.largest_component)
    volumes_ml = _volumes_ml(labels, affine, params.n_classes)
    timings["postprocess"] += perf_counter() - tic

    return SegmentationResult(
        labels=Volume(labels, affine.copy()),
        model_grid_labels=prepared.with_array(model_labels),
        timings=timings,
        volumes_ml=volumes_ml,
        n_windows=n_windows,
        n_windows_skipped=n_skipped,
    )


def segment_preprocessed(
    prepared: Volume, runner: SegmentationRunner, params: SegmentationParams
) -> np.ndarray:
    """Blended class probabilities of a volume already on the model grid and normalised.

    Args:
        prepared: volume at ``params.spacing_mm``, already normalised with
            ``params.normalisation`` (e.g. from the training cache).
        runner: the model (:class:`SegmentationRunner`).
        params: the settings ``prepared`` was made with.

    Returns:
        float32 ``(C, Z, Y, X)`` on ``prepared``'s grid: the importance-weighted mean of the
        windows' scores (probabilities when the runner returns probabilities).

    Raises:
        ValueError: ``prepared`` is not at ``params.spacing_mm``, or the runner broke its
            contract (shapes, non-finite scores).
    """
    timings = {"inference": 0.0, "blend": 0.0}
    return _blend_windows(prepared, runner, params, timings)[0]


def largest_component(labels: np.ndarray, keep: Sequence[int]) -> np.ndarray:
    """Keep only the largest 26-connected component of each label in ``keep``.

    Voxels of the smaller components become background (0); other labels are untouched.
    Between equally large components the first in C order is kept.

    Args:
        labels: integer label map ``(Z, Y, X)``.
        keep: labels to clean (absent ones are ignored).

    Returns:
        A new label map, ``labels``'s shape and dtype.
    """
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be an integer (Z, Y, X) array, got {labels.dtype} {labels.shape}"
        )
    out = labels.copy()
    structure = np.ones((3, 3, 3), dtype=bool)
    for label in dict.fromkeys(int(k) for k in keep):
        box = _bounding_box(out == label)
        if box is None:
            continue
        mask = out[box] == label
        components, count = ndimage.label(mask, structure=structure)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        out[box][mask & (components != int(np.argmax(sizes)))] = 0
    return out


# -- internals ----------------------------------------------------------------------------


def _blend_windows(
    prepared: Volume,
    runner: SegmentationRunner,
    params: SegmentationParams,
    timings: dict[str, float],
) -> tuple[np.ndarray, int, int]:
    """``(C, Z, Y, X)`` float32 blended scores, the windows run and the windows skipped outside
    the body box (``prepared.meta["body_box"]``: voxels outside it are background, score 1
    for class 0); adds to ``timings``."""
    _check_prepared(prepared, params)
    full = prepared.array.astype(np.float32, copy=False)
    box = prepared.meta.get("body_box")
    if box is None:
        return (*_blend_box(full, runner, params, timings), 0)
    region = tuple(slice(int(lo), int(hi)) for lo, hi in box)
    scores, n_windows = _blend_box(full[region], runner, params, timings)
    out = np.zeros((params.n_classes, *full.shape), dtype=np.float32)
    out[0] = 1.0
    index = (slice(None), *region)
    out[index] = scores
    every = len(plan_windows(full.shape, params.window, params.overlap))
    return out, n_windows, max(every - n_windows, 0)


def _blend_box(
    array: np.ndarray,
    runner: SegmentationRunner,
    params: SegmentationParams,
    timings: dict[str, float],
) -> tuple[np.ndarray, int]:
    """Sliding windows over all of ``array`` (the model grid or its body box)."""
    shape, window = array.shape, params.window
    starts = plan_windows(shape, window, params.overlap)
    weights = importance_map(window, params.blending, params.sigma_scale)
    scores_sum = np.zeros((params.n_classes, *shape), dtype=np.float32)
    weight_sum = np.zeros(shape, dtype=np.float32)
    pad = float(params.normalisation.pad_value)
    for first in range(0, len(starts), params.batch_size):
        tic = perf_counter()
        batch = starts[first : first + params.batch_size]
        patches = np.stack([extract_window(array, s, window, pad) for s in batch])[:, None]
        scores = _checked_scores(runner(patches), len(batch), params)
        timings["inference"] += perf_counter() - tic

        tic = perf_counter()
        for start, window_scores in zip(batch, scores):
            target, crop = _overlap_slices(start, window, shape)
            w = weights[crop]
            into, part = (slice(None), *target), (slice(None), *crop)
            scores_sum[into] += window_scores[part] * w
            weight_sum[target] += w
        timings["blend"] += perf_counter() - tic
    tic = perf_counter()
    scores_sum /= weight_sum  # every voxel is covered by a window, every weight is > 0
    timings["blend"] += perf_counter() - tic
    return scores_sum, len(starts)


def _overlap_slices(
    start: Sequence[int], window: Sequence[int], shape: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices of the volume and of the window where the window lies inside the volume."""
    target, crop = [], []
    for s, w, n in zip(start, window, shape):
        lo, hi = max(int(s), 0), min(int(s) + int(w), int(n))
        target.append(slice(lo, hi))
        crop.append(slice(lo - int(s), hi - int(s)))
    return tuple(target), tuple(crop)


def _checked_scores(scores: Any, batch: int, params: SegmentationParams) -> np.ndarray:
    """Runner output as float32 ``(B, C, wz, wy, wx)``, or a ValueError naming the shapes.

    A one-element tuple (what :mod:`medssl.runners` return for a one-output card) is unwrapped.
    """
    if isinstance(scores, (tuple, list)) and len(scores) == 1:
        scores = scores[0]
    scores = np.asarray(scores)
    expected = (batch, params.n_classes, *params.window)
    if scores.shape != expected:
        raise ValueError(
            f"runner must return scores (B, C, wz, wy, wx) = {expected} for {batch} patches "
            f"of {params.window} and n_classes={params.n_classes}, got {scores.shape}"
        )
    scores = scores.astype(np.float32, copy=False)
    if not np.isfinite(scores).all():
        raise ValueError("runner returned non-finite scores")
    return scores


def _argmax_on_grid(
    probabilities: np.ndarray,
    model_labels: np.ndarray,
    model_affine: np.ndarray,
    source_shape: tuple[int, ...],
    source_affine: np.ndarray,
    dtype: type[np.unsignedinteger],
) -> np.ndarray:
    """Argmax of ``probabilities (C, z, y, x)`` resampled, class by class, to the source grid.

    Source voxel centres map into the model grid through ``inv(model_affine) @ source_affine``;
    each class is interpolated linearly there, points past the model grid's last voxel centre
    taking the edge value: ``scipy.ndimage.map_coordinates(order=1, mode="nearest")`` on
    those points. The source grid is filled in slabs of whole z slices; per slab, a running
    max and argmax over the classes keep two slab-sized float32 arrays, never ``C``.

    When the two grids are axis-aligned (the mapping is diagonal, as for any grid made by
    :meth:`Volume.resample`), the trilinear interpolation is done as three separable 1D
    interpolations (gathers and lerps; some 20x faster than scipy's generic interpolator);
    otherwise ``scipy.ndimage.affine_transform`` interpolates each slab.
    """
    mapping = np.linalg.inv(model_affine) @ source_affine
    if source_shape == model_labels.shape and np.allclose(mapping, np.eye(4), atol=1e-6):
        return model_labels.copy()
    matrix, offset = mapping[:3, :3], mapping[:3, 3]
    rows, cols = source_shape[1], source_shape[2]
    labels = np.zeros(source_shape, dtype=dtype)
    step = max(1, _SLAB_VOXELS // (rows * cols))
    if np.allclose(matrix, np.diag(np.diag(matrix)), atol=1e-9):
        grid = probabilities.shape[1:]
        coords = [
            np.clip(matrix[a, a] * np.arange(n) + offset[a], 0.0, grid[a] - 1)
            for a, n in enumerate(source_shape)
        ]

        def resample(channel: np.ndarray, z0: int, z1: int) -> np.ndarray:
            z = coords[0][z0:z1]
            first = int(np.floor(z.min()))
            slab = channel[first : int(np.ceil(z.max())) + 1]
            slab = lerp_axis(slab, z - first, 0)
            return lerp_axis(lerp_axis(slab, coords[1], 1), coords[2], 2)

    else:

        def resample(channel: np.ndarray, z0: int, z1: int) -> np.ndarray:
            return ndimage.affine_transform(
                channel,
                matrix,
                offset + matrix[:, 0] * z0,
                output_shape=(z1 - z0, rows, cols),
                output=np.float32,
                order=1,
                mode="nearest",
                prefilter=False,
            )

    for z0 in range(0, source_shape[0], step):
        z1 = min(z0 + step, source_shape[0])
        best = resample(probabilities[0], z0, z1)
        slab_labels = labels[z0:z1]
        for label in range(1, probabilities.shape[0]):
            current = resample(probabilities[label], z0, z1)
            slab_labels[current > best] = label
            np.maximum(best, current, out=best)
    return labels


def _volumes_ml(labels: np.ndarray, affine: np.ndarray, n_classes: int) -> dict[int, float]:
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=n_classes)
    return {label: float(counts[label]) * voxel_ml for label in range(1, n_classes)}


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Smallest box holding every True voxel of a 3D ``mask``, or None when it is empty."""
    box = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if len(hits) == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def _label_dtype(n_classes: int) -> type[np.unsignedinteger]:
    return np.uint8 if n_classes <= 256 else np.uint16


def _check_prepared(prepared: Volume, params: SegmentationParams) -> None:
    """Fail loudly when ``prepared`` is not on the grid ``params`` expects."""
    check_model_grid(prepared, params.spacing_mm, "prepare(volume, params), or call segment()")
