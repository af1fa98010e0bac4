"""Nodule detection on a CT volume: preprocess, slide windows through a model, merge boxes.

This is the one detection pipeline: training evaluation, batch scoring and the DICOM
gateway all call :func:`detect` (or :func:`detect_preprocessed` on a cached, already
preprocessed volume). The model itself is a :class:`DetectionRunner` (onnxruntime, a
Triton client, a torch module wrapped by training, a fake in tests); this module never
imports torch.

Frames: the model sees windows of the preprocessed volume (isotropic
``params.spacing_mm`` voxels); its boxes are cubes ``(z, y, x, d)`` in the window's voxel
frame (voxel ``i`` centred at ``i``, see :mod:`medssl.detection.anchors`). Boxes move to
the preprocessed volume's voxel frame by adding the window start, and to LPS mm through
the preprocessed volume's affine, which places it in the same world as the input scan.

False-positive control (both off by default, so an old card detects as it always did):

* ``params.lung_mask``: a lung mask (:func:`medssl.pipeline.lungmask.lung_mask`) is computed
  on the preprocessed volume, its intensities mapped back to HU through ``params.normalisation``
  (exact inside the window, which must hold the mask's thresholds). Computing it there, not
  on the input scan, gives :func:`detect_preprocessed` (cached volumes, training evaluation)
  the same behaviour as :func:`detect`, on the 1 mm grid that is cheap to process. Windows
  that hold no mask voxel are not run; boxes centred outside the mask are dropped before NMS
  (so a box outside cannot suppress one inside). A scan where no lung is found (an abdomen)
  runs every window, keeps every box, and says so in ``DetectionResult.warnings`` and the
  log: skipping everything would report a scan as clean that was never looked at.
* ``params.calibration``: a monotone map (:class:`~medssl.metrics.calibration.Calibration`)
  applied to the merged detections' scores after NMS. ``score_threshold`` stays a floor on
  the raw model score; ``Finding.probability`` is the calibrated probability and
  ``Finding.score`` the raw one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from time import perf_counter
from typing import Any, Protocol

import numpy as np

from medssl.detection.nms import nms_3d
from medssl.finding import Finding
from medssl.metrics.calibration import Calibration
from medssl.pipeline.checks import (
    Rules,
    check_fields,
    is_number,
    is_probability,
    is_triple,
    positive_int,
    positive_number,
)
from medssl.pipeline.lungmask import LungMaskParams, lung_mask
from medssl.pipeline.preprocess import (
    Intensity,
    check_model_grid,
    normalisation_from_json,
    prepare,
)
from medssl.pipeline.windows import extract_window, plan_windows
from medssl.volume import Volume, float_triple

__all__ = [
    "DetectionParams",
    "DetectionResult",
    "DetectionRunner",
    "detect",
    "detect_preprocessed",
    "prepared_lung_mask",
    "window_touches",
]

log = logging.getLogger("medssl.pipeline.detect")

#: Tolerance on runner probabilities slightly outside [0, 1] (float rounding in a graph).
_PROB_TOLERANCE = 1e-5

#: The name :class:`DetectionParams` JSON used for ``normalisation`` before the pipeline's
#: parameter classes shared one vocabulary; :meth:`DetectionParams.from_json` still reads it.
_OLD_NORMALISATION_KEY = "intensity"


def _window_ok(value: Any, params: Any) -> bool:
    return (
        is_triple(value, positive_int)
        and positive_int(params.divisor)
        and all(w % params.divisor == 0 for w in value)
    )


_RULES: Rules = {
    "spacing_mm": (positive_number, lambda _: "a positive number (isotropic voxels, mm)"),
    "normalisation": (
        lambda v, _: isinstance(v, Intensity),
        lambda _: "an Intensity (an HU window: the lung mask is found in HU)",
    ),
    "divisor": (positive_int, lambda _: "a positive integer"),
    "window": (
        _window_ok,
        lambda p: f"three positive integers (wz, wy, wx) divisible by divisor={p.divisor!r}",
    ),
    "overlap": (lambda v, _: is_number(v) and 0 <= v < 1, lambda _: "in [0, 1)"),
    "batch_size": (positive_int, lambda _: "a positive integer"),
    "score_threshold": (lambda v, _: is_probability(v), lambda _: "in [0, 1]"),
    "pre_nms_top_k": (positive_int, lambda _: "a positive integer"),
    "max_nms_candidates": (positive_int, lambda _: "a positive integer"),
    "nms_iou": (lambda v, _: is_probability(v), lambda _: "in [0, 1]"),
    "max_detections": (positive_int, lambda _: "a positive integer"),
    "min_diameter_mm": (lambda v, _: is_number(v) and v >= 0, lambda _: "a number >= 0"),
    "lung_mask": (lambda v, _: isinstance(v, bool), lambda _: "a bool"),
    "lung_margin_mm": (lambda v, _: is_number(v) and v >= 0, lambda _: "a number >= 0 (mm)"),
    "calibration": (lambda v, _: isinstance(v, Calibration), lambda _: "a Calibration"),
}


class DetectionRunner(Protocol):
    """A detection model behind a plain numpy call (any callable with this signature).

    ``runner(patches) -> (boxes, scores)`` where

    * ``patches``: ``(B, 1, Z, Y, X)`` float32, already prepared
    (:func:`~medssl.pipeline.preprocess.prepare`);
      ``B <= params.batch_size`` (the last batch may be smaller).
    * ``boxes``: ``(B, N, 4)`` cubes ``(z, y, x, d)`` in each patch's voxel frame, decoded
      (the model or its exported graph applies the anchor decoding); ``N`` = anchors.
    * ``scores``: ``(B, N)`` probabilities in ``[0, 1]`` (after the sigmoid).
    """

    def __call__(self, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class DetectionParams:
    """How a scan is prepared and how model boxes become detections (part of the model card).

    The preparation vocabulary is :class:`~medssl.pipeline.segment.SegmentationParams`'s:
    ``spacing_mm``, ``normalisation``, ``window`` ``(wz, wy, wx)``, ``overlap``,
    ``batch_size``; :func:`~medssl.pipeline.preprocess.prepare` takes either.

    Attributes:
        spacing_mm: isotropic voxel size the model works at, mm (one number: the model's
            boxes are cubes, their edge in voxels times this is the diameter in mm).
        normalisation: the HU window mapped onto ``[-1, 1]`` and its padding value
            (:class:`~medssl.pipeline.preprocess.Intensity`).
        window: sliding-window shape ``(wz, wy, wx)``, voxels of the preprocessed grid, each
            a multiple of ``divisor``; one integer means a cube (stored as the triple).
        divisor: the model's largest stride; window edges must be divisible by it.
        overlap: fraction of a window edge shared by neighbouring windows, ``[0, 1)``.
        batch_size: windows per runner call.
        score_threshold: boxes scoring below this are dropped before NMS, ``[0, 1]``.
        pre_nms_top_k: best boxes kept per window before the global NMS.
        max_nms_candidates: best boxes of the whole scan entering the global NMS (a running
            top-k over the windows). Without it a model whose scores all clear
            ``score_threshold`` sends ``pre_nms_top_k`` boxes per window, millions per scan,
            into NMS (minutes per scan, GBs of memory).
        nms_iou: cubes overlapping a better one by IoU above this are suppressed, ``[0, 1]``.
        max_detections: detections reported per scan at most.
        min_diameter_mm: boxes smaller than this (mm) are dropped before NMS.
        lung_mask: restrict detection to the lungs: skip windows without lung, drop boxes
            centred outside it (see the module doc). Needs ``normalisation`` to hold the
            mask's HU thresholds (-950 and -400 HU).
        lung_margin_mm: the lung mask's dilation, mm (nodules on the pleura stay inside).
        calibration: maps the merged detections' raw scores to probabilities (identity by
            default); ``score_threshold`` applies to the raw score.
    """

    spacing_mm: float = 1.0
    normalisation: Intensity = field(default_factory=Intensity)
    window: tuple[int, int, int] = (128, 128, 128)  # an int is taken as a cube
    divisor: int = 16
    overlap: float = 0.25
    batch_size: int = 2
    score_threshold: float = 0.01
    pre_nms_top_k: int = 1000
    max_nms_candidates: int = 100_000
    nms_iou: float = 0.1
    max_detections: int = 100
    min_diameter_mm: float = 0.0
    lung_mask: bool = False
    lung_margin_mm: float = 5.0
    calibration: Calibration = field(default_factory=Calibration)

    def __post_init__(self) -> None:
        window: Any = self.window
        if positive_int(window):
            window = (window, window, window)
        elif isinstance(window, (list, np.ndarray)):
            window = tuple(np.asarray(window).tolist())
        object.__setattr__(self, "window", window)
        check_fields(self, _RULES)
        if self.lung_mask:
            needed = self.lung_mask_params
            if not (
                self.normalisation.hu_min < needed.air_hu
                and self.normalisation.hu_max > needed.threshold_hu
            ):
                raise ValueError(
                    f"DetectionParams.lung_mask needs the normalisation window to hold the lung "
                    f"mask's thresholds ({needed.air_hu} and {needed.threshold_hu} HU), got "
                    f"[{self.normalisation.hu_min}, {self.normalisation.hu_max}] HU; "
                    "set lung_mask=False"
                )

    @property
    def lung_mask_params(self) -> LungMaskParams:
        """The lung mask's settings: the defaults of :class:`LungMaskParams` with this margin."""
        return LungMaskParams(margin_mm=float(self.lung_margin_mm))

    @property
    def crop_to_body(self) -> bool:
        """False: detection runs every window (or the lung mask's); see
        :func:`~medssl.pipeline.preprocess.prepare`."""
        return False

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict; ``normalisation`` and ``calibration`` are nested dicts."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["normalisation"] = self.normalisation.to_json()
        data["window"] = list(self.window)
        data["calibration"] = self.calibration.to_json()
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DetectionParams:
        """Inverse of :meth:`to_json`. Missing keys take the defaults; unknown keys are errors.

        A dict written before a field existed reads as it always did: no lung mask, the
        identity calibration. One written before the shared vocabulary reads too: its
        ``"intensity"`` is the ``normalisation``, its integer ``window`` a cube.

        Raises:
            ValueError: an unknown key, both ``normalisation`` and ``intensity``, or a value
                that fails validation (named).
        """
        values = dict(data)
        if _OLD_NORMALISATION_KEY in values:
            if "normalisation" in values:
                raise ValueError(
                    "DetectionParams: both 'normalisation' and its old name 'intensity' are "
                    "given; keep 'normalisation'"
                )
            values["normalisation"] = values.pop(_OLD_NORMALISATION_KEY)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown DetectionParams keys {unknown}; expected some of {sorted(known)}"
            )
        if isinstance(values.get("normalisation"), Mapping):
            try:
                values["normalisation"] = normalisation_from_json(values["normalisation"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"DetectionParams.normalisation: {exc}") from None
        if isinstance(values.get("calibration"), Mapping):
            try:
                values["calibration"] = Calibration.from_json(values["calibration"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"DetectionParams.calibration: {exc}") from None
        return cls(**values)


@dataclass
class DetectionResult:
    """What :func:`detect` found, and what it cost.

    Attributes:
        detections: the findings (:class:`~medssl.finding.Finding`, with ``centre_voxel``
            and the raw ``score``), by descending probability.
        timings: seconds per stage: ``preprocess``, ``lung_mask`` (0 without it),
            ``inference`` (window extraction and runner calls) and ``postprocess``
            (filtering, NMS, calibration, coordinate conversion).
        n_windows: windows run through the model.
        n_windows_skipped: windows not run because they hold no lung (``params.lung_mask``).
        warnings: what the caller should know about this scan (e.g. no lung found, so
            every window ran and no box was dropped).
    """

    detections: list[Finding]
    timings: dict[str, float]
    n_windows: int
    n_windows_skipped: int = 0
    warnings: list[str] = field(default_factory=list)


def detect(
    volume: Volume, runner: DetectionRunner, params: DetectionParams = DetectionParams()
) -> DetectionResult:
    """Detect nodules in a HU volume.

    Args:
        volume: CT in Hounsfield units, any spacing and direction.
        runner: the model (:class:`DetectionRunner`).
        params: preprocessing, windowing and post-processing settings.

    Returns:
        Detections in LPS mm, with ``centre_voxel`` in ``volume``'s index frame.
    """
    start = perf_counter()
    prepared = prepare(volume, params)
    elapsed = perf_counter() - start
    result = detect_preprocessed(prepared, runner, params, reference_affine=volume.affine)
    result.timings["preprocess"] = elapsed
    return result


def detect_preprocessed(
    prepared: Volume,
    runner: DetectionRunner,
    params: DetectionParams = DetectionParams(),
    *,
    reference_affine: np.ndarray | None = None,
) -> DetectionResult:
    """Detect nodules in a volume already prepared by :func:`~medssl.pipeline.preprocess.prepare`
    (e.g. cached).

    [lung mask → windows without lung skipped] → windows → runner in batches → per window:
    score threshold, drop boxes centred in padding [or outside the lung mask], minimum
    diameter, top-k → shift to the volume frame → global NMS → at most ``max_detections``
    → calibration of the scores → LPS mm through ``prepared.affine``.

    Args:
        prepared: preprocessed volume, spacing ``params.spacing_mm`` on every axis.
        runner: the model (:class:`DetectionRunner`).
        params: the settings ``prepared`` was made with.
        reference_affine: 4x4 index ``(z, y, x)`` -> LPS affine of the grid that
            ``centre_voxel`` is reported in (the original scan's); default ``prepared``'s.

    Returns:
        The detections; ``timings["preprocess"]`` is 0.

    Raises:
        ValueError: ``prepared`` is not at ``params.spacing_mm``, or the runner broke its
            contract (shapes, non-finite values, scores outside [0, 1]).
    """
    _check_prepared(prepared, params)
    reference = (
        prepared.affine if reference_affine is None else np.asarray(reference_affine, np.float64)
    )
    starts = plan_windows(prepared.shape, params.window, params.overlap)
    timings = {"preprocess": 0.0, "lung_mask": 0.0, "inference": 0.0, "postprocess": 0.0}
    inside, notes = None, []
    if params.lung_mask:
        tic = perf_counter()
        inside = prepared_lung_mask(prepared, params)
        if inside.any():
            starts_all, starts = (
                starts,
                [s for s in starts if window_touches(inside, s, params.window)],
            )
        else:
            starts_all, inside = starts, None
            notes.append(
                "lung mask: no lung found (not a chest CT, or the field of view misses "
                "the lungs); every window was run and no finding was dropped"
            )
            log.warning("%s", notes[-1])
        timings["lung_mask"] = perf_counter() - tic
    boxes, scores = [], []
    for batch_starts, batch_boxes, batch_scores in _run_batches(
        prepared, starts, runner, params, timings
    ):
        tic = perf_counter()
        for start, window_boxes, window_scores in zip(batch_starts, batch_boxes, batch_scores):
            kept_boxes, kept_scores = _window_candidates(
                window_boxes, window_scores, start, prepared.shape, params, inside
            )
            boxes.append(kept_boxes)
            scores.append(kept_scores)
        if sum(len(s) for s in scores) > 2 * params.max_nms_candidates:
            best_boxes, best_scores = _best(boxes, scores, params.max_nms_candidates)
            boxes, scores = [best_boxes], [best_scores]
        timings["postprocess"] += perf_counter() - tic
    tic = perf_counter()
    detections = _merge(
        *_best(boxes, scores, params.max_nms_candidates), prepared, reference, params
    )
    timings["postprocess"] += perf_counter() - tic
    skipped = len(starts_all) - len(starts) if params.lung_mask else 0
    return DetectionResult(detections, timings, len(starts), skipped, notes)


def prepared_lung_mask(prepared: Volume, params: DetectionParams) -> np.ndarray:
    """The lung mask ``(Z, Y, X)`` bool of a preprocessed volume, its values mapped back to HU.

    The inverse of :meth:`Intensity.apply` is exact inside ``[hu_min, hu_max]``; the mask's
    thresholds lie inside it (checked by :class:`DetectionParams`).
    """
    window = params.normalisation
    scale = np.float32((window.hu_max - window.hu_min) / 2.0)
    hu = prepared.array * scale
    hu += np.float32(window.hu_min + scale)
    return lung_mask(hu, prepared.spacing.tolist(), params=params.lung_mask_params)


def window_touches(mask: np.ndarray, start: Sequence[int], window: Sequence[int]) -> bool:
    """True when the window ``[start, start + window)`` holds a voxel of ``mask``."""
    box = tuple(slice(max(int(s), 0), int(s) + int(w)) for s, w in zip(start, window))
    return bool(mask[box].any())


def _run_batches(
    prepared: Volume,
    starts: list[tuple[int, int, int]],
    runner: DetectionRunner,
    params: DetectionParams,
    timings: dict[str, float],
) -> Iterator[tuple[list[tuple[int, int, int]], np.ndarray, np.ndarray]]:
    """Yield ``(starts, boxes (B, N, 4), scores (B, N))`` per batch.

    Window extraction and the runner call are added to ``timings["inference"]``.
    """
    pad = params.normalisation.pad_value
    for first in range(0, len(starts), params.batch_size):
        tic = perf_counter()
        batch = starts[first : first + params.batch_size]
        patches = np.stack([extract_window(prepared.array, s, params.window, pad) for s in batch])
        patches = patches[:, None].astype(np.float32, copy=False)
        boxes, scores = runner(patches)
        timings["inference"] += perf_counter() - tic
        yield batch, *_checked_output(boxes, scores, len(batch))


def _checked_output(boxes: Any, scores: Any, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Runner outputs as arrays ``(B, N, 4)`` and ``(B, N)`` (dtype kept), or a ValueError."""
    boxes, scores = np.asarray(boxes), np.asarray(scores)
    if (
        boxes.ndim != 3
        or boxes.shape[0] != batch
        or boxes.shape[2] != 4
        or scores.shape != boxes.shape[:2]
    ):
        raise ValueError(
            f"runner must return boxes (B, N, 4) and scores (B, N) for B={batch} patches, "
            f"got boxes {boxes.shape} and scores {scores.shape}"
        )
    if scores.size:
        low, high = float(scores.min()), float(scores.max())  # NaN propagates
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("runner returned non-finite scores")
        if low < -_PROB_TOLERANCE or high > 1 + _PROB_TOLERANCE:
            raise ValueError(
                f"runner scores must be probabilities in [0, 1], got range [{low:.4g}, "
                f"{high:.4g}]; apply the sigmoid in the model graph"
            )
    return boxes, scores


def _window_candidates(
    boxes: np.ndarray,
    scores: np.ndarray,
    start: Sequence[int],
    shape: Sequence[int],
    params: DetectionParams,
    inside: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One window's boxes worth merging, moved to the volume's voxel frame.

    Keeps boxes scoring at least ``score_threshold``, centred inside the volume (not in
    window padding) and at least ``min_diameter_mm`` wide, [centred in ``inside``,] then
    the ``pre_nms_top_k`` best.

    Args:
        boxes: ``(N, 4)`` in the window frame; scores: ``(N,)``.
        start: window start ``(z, y, x)`` in the volume; shape: volume ``(Z, Y, X)``.
        inside: bool ``(Z, Y, X)`` lung mask of the volume, or None (no restriction).

    Returns:
        ``(M, 4)`` boxes in the volume frame and their ``(M,)`` scores, ``M <= pre_nms_top_k``.
    """
    origin = np.asarray(start, dtype=np.float64)
    low, high = -0.5 - origin, np.asarray(shape, dtype=np.float64) - 0.5 - origin
    keep = scores >= params.score_threshold
    for axis in range(3):  # written so that NaN stays in, to be reported below
        keep &= ~((boxes[:, axis] < low[axis]) | (boxes[:, axis] > high[axis]))
    keep &= ~(boxes[:, 3] * params.spacing_mm < params.min_diameter_mm)
    if inside is not None:  # the nearest voxel of the centre; non-finite boxes stay, reported below
        index = np.flatnonzero(keep)
        centre = boxes[index, :3].astype(np.float64) + origin
        finite = np.all(np.isfinite(centre), axis=1)
        voxel = np.rint(np.where(finite[:, None], centre, 0.0)).astype(np.intp)
        voxel = np.clip(voxel, 0, np.asarray(shape) - 1)
        keep[index] = ~finite | inside[voxel[:, 0], voxel[:, 1], voxel[:, 2]]
    index = np.flatnonzero(keep)
    if len(index) > params.pre_nms_top_k:
        top = np.argpartition(-scores[index], params.pre_nms_top_k - 1)[: params.pre_nms_top_k]
        index = index[top]
    kept = boxes[index].astype(np.float64)
    if not np.all(np.isfinite(kept)) or np.any(kept[:, 3] <= 0):
        raise ValueError(
            "runner returned a box above the score threshold with a non-finite value "
            "or a non-positive diameter"
        )
    kept[:, :3] += origin
    return kept, np.clip(scores[index].astype(np.float64), 0.0, 1.0)


def _best(
    boxes: list[np.ndarray], scores: list[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of the collected candidates: ``(M, 4)`` boxes and ``(M,)`` scores, M <= k."""
    all_boxes, all_scores = np.concatenate(boxes), np.concatenate(scores)
    if len(all_scores) > k:
        top = np.sort(np.argpartition(-all_scores, k - 1)[:k])  # keep the windows' order
        all_boxes, all_scores = all_boxes[top], all_scores[top]
    return all_boxes, all_scores


def _merge(
    boxes: np.ndarray,
    scores: np.ndarray,
    prepared: Volume,
    reference: np.ndarray,
    params: DetectionParams,
) -> list[Finding]:
    """Global NMS over all windows' boxes ``(M, 4)`` (volume frame), calibration, then mm.

    The calibration is strictly increasing, so it leaves the NMS order unchanged.
    """
    keep = nms_3d(boxes, scores, params.nms_iou, max_keep=params.max_detections)
    boxes, scores = boxes[keep], scores[keep]
    probabilities = params.calibration.apply(scores)
    lps = prepared.index_to_world(boxes[:, :3])
    inverse = np.linalg.inv(reference)
    voxels = lps @ inverse[:3, :3].T + inverse[:3, 3]
    return [
        Finding(
            centre_lps=float_triple(point),
            diameter_mm=float(box[3] * params.spacing_mm),
            probability=float(probability),
            centre_voxel=float_triple(voxel),
            score=float(score),
        )
        for point, box, score, probability, voxel in zip(lps, boxes, scores, probabilities, voxels)
    ]


def _check_prepared(prepared: Volume, params: DetectionParams) -> None:
    """Fail loudly when ``prepared`` is not on the grid ``params`` expects."""
    check_model_grid(
        prepared,
        params.spacing_mm,
        "prepare(volume, params) or call detect()",
    )
