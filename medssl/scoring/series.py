"""Scoring one series: read → prepare (CPU workers) → inference → postprocess (the model).

Detection models give findings (LPS mm) and, for DICOM inputs, a TID 1500 SR; segmentation
models give a label map on the source grid (``labels/<key>.nii.gz``), one volume per label
and, for DICOM inputs, a DICOM SEG. Either way the result is a
:class:`~medssl.scoring.result.SeriesResult`.

The two halves are separate functions so an engine can run them in different places:
:func:`prepare_series` in a worker process or a Ray task, :func:`infer` next to the model.
Every error a series can cause becomes a ``failed`` result naming the reason (medssl's typed
errors as they are; anything else prefixed "unexpected"); nothing here raises for one series.

A DICOM series' headers are read once, with its pixels
(:func:`~medssl.io.dicom_series.load_dicom_series`):
the result writers (SR, SEG) reference the same datasets, carried in :attr:`Prepared.headers`.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import numpy as np
from pydicom.dataset import Dataset

from medssl.dicom.seg import detection_seg, frame_slices, label_seg
from medssl.dicom.sr import detection_sr
from medssl.dicom.written import WrittenObject, save
from medssl.errors import MedsslError, RunnerError, describe_error
from medssl.finding import Finding
from medssl.io import read_grid, read_volume
from medssl.io.dicom_series import load_dicom_series
from medssl.io.limits import DEFAULT_LIMITS, GeometryLimits
from medssl.io.nifti import write_nifti
from medssl.models.card import ModelCard, Task
from medssl.pipeline.detect import DetectionParams, DetectionRunner, detect_preprocessed
from medssl.pipeline.preprocess import prepare
from medssl.pipeline.segment import SegmentationParams, SegmentationRunner, segment_prepared
from medssl.scoring.manifest import ScanItem
from medssl.scoring.result import LabelVolume, SeriesResult, SeriesStatus
from medssl.volume import Volume

__all__ = [
    "DicomOutput",
    "ModelParams",
    "Prepared",
    "infer",
    "model_params",
    "prepare_series",
    "skipped_result",
]

#: The shared pipeline's parameters of a detector or a segmenter.
ModelParams = DetectionParams | SegmentationParams


def model_params(card: ModelCard, batch_size: int) -> ModelParams:
    """The pipeline parameters of ``card``'s task."""
    if card.task is Task.SEGMENTATION:
        return card.segmentation_params(batch_size)
    return card.detection_params(batch_size)


@dataclass
class Prepared:
    """A series ready for the model, or the reason it is not.

    Attributes:
        item: the manifest row.
        volume: the prepared volume (model spacing, normalised intensities, affine to LPS);
            None when reading or preparing failed.
        timings: seconds spent reading (``read``) and preparing (``preprocess``).
        n_slices: slices of the source series.
        error: ``"ErrorType: message"`` when it failed.
        source_affine: the source grid's index → LPS affine (segmentation maps labels back).
        source_shape: the source grid ``(Z, Y, X)``.
        transient: always False: a series' reading and preparing fail for the series' own
            reasons (kept so engines treat prepared and scored results alike).
        headers: a DICOM series' datasets as read with its pixels (pixel data dropped), in
            ``item.paths`` order: what the SR and SEG reference; None for other inputs.
    """

    item: ScanItem
    volume: Volume | None
    timings: dict[str, float] = field(default_factory=dict)
    n_slices: int | None = None
    error: str | None = None
    source_affine: np.ndarray | None = None
    source_shape: tuple[int, int, int] | None = None
    transient: bool = False
    headers: list[Dataset] | None = None


def _describe(exc: BaseException) -> str:
    """The type and message of medssl's errors, only the type and place of others (whose
    messages may quote header values: PHI); see :func:`medssl.errors.describe_error`."""
    return describe_error(exc)


def _read(
    item: ScanItem,
    limits: GeometryLimits,
    spacing_mm: Sequence[float] | float,
    headers: MutableMapping[str, Dataset] | None = None,
) -> tuple[Volume, list[Dataset] | None]:
    """The series in HU and, for DICOM, its headers; its geometry checked against ``limits``
    (with the resampled size on the model grid ``spacing_mm``) from its headers before its
    pixels are read (DICOM, NIfTI, MetaImage), and for any other volume path after reading,
    before resampling."""
    if item.is_dicom:
        series = load_dicom_series(
            list(item.paths), limits=limits, target_spacing_mm=spacing_mm, headers=headers
        )
        return series.volume, series.headers
    grid = read_grid(item.paths[0])  # NIfTI / MetaImage headers: checked before the data is read
    if grid is not None:
        limits.check(*grid, item.paths[0], spacing_mm)
    volume = read_volume(item.paths[0])
    limits.check(volume.shape, volume.spacing.tolist(), item.paths[0], spacing_mm)
    return volume, None


def prepare_series(
    item: ScanItem,
    params: ModelParams,
    limits: GeometryLimits = DEFAULT_LIMITS,
    headers: MutableMapping[str, Dataset] | None = None,
) -> Prepared:
    """Read a series and prepare it for the model (:func:`medssl.pipeline.preprocess.prepare`);
    errors become ``Prepared.error``.

    Every failure here is the series' own (its headers, its pixels, its size), so none is
    transient: an unexpected ``TypeError``/``IndexError`` from a malformed header, or a
    ``MemoryError`` of a series within ``limits`` on a host that cannot hold it, fails this
    series with the reason and is not retried. Only the model runner's failures (in
    :func:`infer`) are transient.

    Args:
        item: the series.
        params: the model's pipeline parameters (its grid ``spacing_mm``).
        limits: the plausible geometry (:mod:`medssl.io.limits`); they bound the memory one
            series may take.
        headers: the series' datasets already read (``index_files(..., keep_headers=True)``),
            by path; those used are taken out (see
            :func:`~medssl.io.dicom_series.load_dicom_series`).
    """
    timings = {"read": 0.0, "preprocess": 0.0}
    start = time.perf_counter()
    try:
        source, kept = _read(item, limits, params.spacing_mm, headers)
        timings["read"] = time.perf_counter() - start
        start = time.perf_counter()
        volume = prepare(source, params)
        timings["preprocess"] = time.perf_counter() - start
    except MedsslError as exc:
        return Prepared(item, None, timings, error=_describe(exc))
    except Exception as exc:  # noqa: BLE001 - one series never stops the batch
        # The type only: the message of an unexpected error may quote header values (PHI).
        return Prepared(
            item,
            None,
            timings,
            error=f"unexpected {type(exc).__name__} while reading or preprocessing the series",
        )
    return Prepared(
        item,
        volume,
        timings,
        n_slices=source.shape[0],
        source_affine=source.affine.copy(),
        source_shape=source.shape,
        headers=kept,
    )


def _dicom_skipped(item: ScanItem, dicom: DicomOutput | None) -> str | None:
    """Why the asked-for DICOM outputs of ``item`` are not written (its source lacks a UID they
    must reference), or None."""
    return item.missing_output_uids if dicom is not None and item.is_dicom else None


def skipped_result(item: ScanItem, card: ModelCard, reason: str) -> SeriesResult:
    """The result of a series the selection rules left out."""
    return SeriesResult(item, card.name, card.version, SeriesStatus.SKIPPED, reason)


def _failed(
    item: ScanItem,
    card: ModelCard,
    error: str,
    timings: dict[str, float] | None = None,
    transient: bool = False,
) -> SeriesResult:
    """The result of a series that could not be scored, with the reason."""
    return SeriesResult(
        item,
        card.name,
        card.version,
        SeriesStatus.FAILED,
        error,
        timings=dict(timings or {}),
        transient=transient,
    )


#: Segmentation types a label SEG can be written as (:class:`medssl.dicom.seg.SegType`).
SEG_TYPES = ("binary", "labelmap", "labelmap-rle")


@dataclass(frozen=True)
class DicomOutput:
    """DICOM results of scored DICOM series.

    Attributes:
        folder: SRs go to ``<folder>/<SeriesInstanceUID>/sr.dcm``, SEGs to ``.../seg.dcm``,
            companion SEGs of detections to ``.../findings-seg.dcm``.
        min_probability: findings below this are left out of the SR and its SEG (the Parquet
            tables keep every detection down to the model's FROC threshold, with ``passed``);
            None (default) takes the card's operating point, chosen on validation
            (:meth:`~medssl.models.card.ModelCard.report_threshold`); a report of 100 marks at
            p = 0.01 helps no reader.
        companion_seg: detection: also write a SEG of the reported findings (a sphere of
            its diameter each), tracked like the SR's findings and listed in its evidence.
        seg_type: segmentation: ``"binary"`` (default, understood everywhere),
            ``"labelmap"`` or ``"labelmap-rle"`` (DICOM 2024c, the latter RLE Lossless
            compressed; not understood by Orthanc 1.10, dcmtk 3.6.7, dciodvfy 2022),
            :class:`medssl.dicom.seg.SegType`.
        dense_seg: segmentation: write every frame of the SEG, empty ones too (default:
            empty frames are omitted, :mod:`medssl.dicom.seg`).

    The threshold and the options are part of the objects' content keys, so outputs written
    with other settings never share a UID with these (:mod:`medssl.dicom.uids`).

    Raises:
        ValueError: ``min_probability`` outside ``[0, 1]`` or an unknown ``seg_type``.
    """

    folder: Path
    min_probability: float | None = None
    companion_seg: bool = False
    seg_type: str = "binary"
    dense_seg: bool = False

    def __post_init__(self) -> None:
        if self.min_probability is not None and not 0.0 <= float(self.min_probability) <= 1.0:
            raise ValueError(
                f"DicomOutput.min_probability must be in [0, 1], got {self.min_probability}"
            )
        seg_type = str(self.seg_type).lower()
        if seg_type not in SEG_TYPES:
            raise ValueError(
                f"DicomOutput.seg_type must be one of {list(SEG_TYPES)}, got {self.seg_type!r}"
            )
        object.__setattr__(self, "seg_type", seg_type)


def _headers(prepared: Prepared) -> list[Dataset]:
    """The source headers the result objects reference (read once, with the pixels)."""
    if prepared.headers is None:
        raise ValueError(
            f"series {prepared.item.key}: no DICOM headers were kept while reading it; "
            "prepare it with prepare_series() to write DICOM outputs"
        )
    return prepared.headers


def _write_sr(
    prepared: Prepared, detections: Sequence[Finding], card: ModelCard, output: DicomOutput
) -> list[WrittenObject]:
    """The series' TID 1500 SR of the detections at or above the threshold in effect
    (``output.min_probability``, else the card's operating point), and its companion SEG if
    asked for and anything is reported (:attr:`Prepared.headers` as the source); the SR first."""
    item = prepared.item
    source = _headers(prepared)
    folder = output.folder / item.series_uid
    folder.mkdir(parents=True, exist_ok=True)
    threshold = card.report_threshold(output.min_probability).value
    reported = [d for d in detections if d.probability >= threshold]
    # what chose these findings and outputs: part of the SR's content key (its UIDs); the
    # threshold in effect, so another threshold (set or the card's) never shares a UID
    settings = {"min_probability": float(threshold), "companion_seg": bool(output.companion_seg)}
    if not (output.companion_seg and reported):
        return [save(detection_sr(source, reported, card, settings=settings), folder / "sr.dcm")]
    assert prepared.source_affine is not None and prepared.source_shape is not None
    seg = detection_seg(
        source, reported, card, prepared.source_affine, prepared.source_shape, settings=settings
    )
    seg_written = save(seg, folder / "findings-seg.dcm")
    return [
        save(
            detection_sr(source, reported, card, companion_seg=seg, settings=settings),
            folder / "sr.dcm",
        ),
        seg_written,
    ]


def _failure(prepared: Prepared, card: ModelCard, exc: BaseException) -> SeriesResult:
    """The failed result of a series whose inference raised ``exc`` (medssl's typed errors as
    they are, anything else prefixed "unexpected")."""
    reason = _describe(exc) if isinstance(exc, MedsslError) else f"unexpected {_describe(exc)}"
    return _failed(
        prepared.item,
        card,
        reason,
        prepared.timings,
        transient=isinstance(exc, (RunnerError, MemoryError)),
    )


def infer(
    prepared: Prepared,
    runner: DetectionRunner | SegmentationRunner,
    card: ModelCard,
    params: ModelParams,
    dicom: DicomOutput | None = None,
    label_maps: Path | None = None,
) -> SeriesResult:
    """Run the model on a prepared series (or pass its failure through).

    Args:
        dicom: also write the TID 1500 SR (detection) or DICOM SEG (segmentation) of a
            scored DICOM series (same UIDs on every retry, so a re-run overwrites).
        label_maps: segmentation: the folder of ``<key>.nii.gz`` label maps on the source
            grid; None writes none.

    Returns:
        The :class:`~medssl.scoring.result.SeriesResult`: ``ok`` with timings, every
        candidate finding (LPS mm) and the report threshold in effect (detection; see
        :meth:`~medssl.models.card.ModelCard.report_threshold`) or one volume per label
        (segmentation), and the DICOM objects written; or ``failed`` with the reason.
    """
    item = prepared.item
    if prepared.volume is None:
        return _failed(
            item,
            card,
            prepared.error or "unknown error",
            prepared.timings,
            transient=prepared.transient,
        )
    if isinstance(params, SegmentationParams):
        return _infer_segmentation(prepared, runner, card, params, dicom, label_maps)  # type: ignore[arg-type]
    try:
        # a detection card's runner returns the detector's boxes
        result = detect_preprocessed(prepared.volume, cast(DetectionRunner, runner), params)
    except Exception as exc:  # noqa: BLE001 - a failed result, not a dead run
        return _failure(prepared, card, exc)
    threshold = card.report_threshold(dicom.min_probability if dicom is not None else None)
    series_uid = item.series_uid or item.key
    findings = [replace(d, series_uid=series_uid) for d in result.detections]
    files: list[WrittenObject] = []
    start = time.perf_counter()
    if dicom is not None and item.is_dicom and not _dicom_skipped(item, dicom):
        try:
            files = _write_sr(prepared, findings, card, dicom)
        except Exception as exc:  # noqa: BLE001 - a failed result, not a dead run
            return _failed(item, card, f"writing the SR failed: {_describe(exc)}", prepared.timings)
    timings = {
        **prepared.timings,
        "inference": result.timings["inference"],
        "postprocess": result.timings["postprocess"],
        "lung_mask": result.timings.get("lung_mask", 0.0),
        "write": time.perf_counter() - start,
    }
    return SeriesResult(
        item,
        card.name,
        card.version,
        SeriesStatus.OK,
        timings=timings,
        findings=findings,
        threshold=threshold,
        written=files,
        n_slices=prepared.n_slices,
        n_windows=result.n_windows,
        n_windows_skipped=result.n_windows_skipped,
        warnings=list(result.warnings),
        note=_dicom_skipped(item, dicom),
    )


def _write_seg(
    item: ScanItem,
    source: Sequence[Dataset],
    labels: Volume,
    card: ModelCard,
    output: DicomOutput,
) -> WrittenObject:
    """The series' DICOM SEG (``output.seg_type``, empty frames omitted unless
    ``output.dense_seg``) of the source headers ``source``, its frames mapped to theirs."""
    # label_seg's contract: mask k belongs to the source's frame k; find each frame's slice.
    slices = frame_slices(source, labels.affine, labels.shape[0])
    folder = output.folder / item.series_uid
    folder.mkdir(parents=True, exist_ok=True)
    return save(
        label_seg(
            source,
            np.asarray(labels.array)[slices],
            card,
            seg_type=output.seg_type,
            omit_empty_frames=not output.dense_seg,
        ),
        folder / "seg.dcm",
    )


def _infer_segmentation(
    prepared: Prepared,
    runner: SegmentationRunner,
    card: ModelCard,
    params: SegmentationParams,
    dicom: DicomOutput | None,
    label_maps: Path | None,
) -> SeriesResult:
    item = prepared.item
    assert (
        prepared.volume is not None and prepared.source_affine is not None and prepared.source_shape
    )
    try:
        result = segment_prepared(
            prepared.volume, prepared.source_shape, prepared.source_affine, runner, params
        )
        start = time.perf_counter()
        label_map = (
            None
            if label_maps is None
            else write_nifti(result.labels, label_maps / f"{item.key}.nii.gz")
        )
        files = (
            [_write_seg(item, _headers(prepared), result.labels, card, dicom)]
            if (dicom is not None and item.is_dicom and not _dicom_skipped(item, dicom))
            else []
        )
        write_s = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - a failed result, not a dead run
        return _failure(prepared, card, exc)
    t = result.timings
    return SeriesResult(
        item,
        card.name,
        card.version,
        SeriesStatus.OK,
        timings={
            **prepared.timings,
            "inference": t["inference"] + t["blend"],
            "postprocess": t["resample_back"] + t["postprocess"],
            "write": write_s,
        },
        labels=[
            LabelVolume(label.value, label.name, float(result.volumes_ml.get(label.value, 0.0)))
            for label in card.labels
        ],
        written=files,
        n_slices=prepared.n_slices,
        n_windows=result.n_windows,
        n_windows_skipped=result.n_windows_skipped,
        note=_dicom_skipped(item, dicom),
        label_map=Path(label_map) if label_map is not None else None,
    )
