"""Scoring one series: read → preprocess (CPU workers) → inference → postprocess (the model).

Detection models give findings (LPS mm) and, for DICOM inputs, a TID 1500 SR; segmentation
models give a label map on the source grid (``labels/<key>.nii.gz``), one volume row per
label and, for DICOM inputs, a DICOM SEG.

The two halves are separate functions so an engine can run them in different places:
:func:`prepare` in a worker process or a Ray task, :func:`infer` next to the model. Every
error a series can cause becomes a ``failed`` row naming the reason (medssl's typed errors
as they are; anything else prefixed "unexpected"); nothing here raises for one series.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from medssl.errors import MedsslError
from medssl.io import read_volume
from medssl.io.dicom_series import read_dicom_series
from medssl.io.nifti import write_nifti
from medssl.models.card import ModelCard, Task
from medssl.pipeline.detect import Detection, DetectionParams, DetectionRunner, detect_preprocessed
from medssl.pipeline.preprocess import preprocess_ct
from medssl.pipeline.segment import SegmentationParams, SegmentationRunner, prepare_segmentation, segment_prepared
from medssl.scoring.manifest import ScanItem
from medssl.volume import Volume

__all__ = ["DicomOutput", "ModelParams", "Prepared", "Scored", "failed_row", "infer", "model_params", "prepare",
           "skipped_row"]

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
        volume: the preprocessed volume (model spacing, intensities in ``[-1, 1]``, affine to
            LPS); None when reading or preprocessing failed.
        timings: seconds spent reading (``read``) and preprocessing (``preprocess``).
        n_slices: slices of the source series.
        error: ``"ErrorType: message"`` when it failed.
        source_affine: the source grid's index → LPS affine (segmentation maps labels back).
        source_shape: the source grid ``(Z, Y, X)``.
    """

    item: ScanItem
    volume: Volume | None
    timings: dict[str, float] = field(default_factory=dict)
    n_slices: int | None = None
    error: str | None = None
    source_affine: np.ndarray | None = None
    source_shape: tuple[int, int, int] | None = None


@dataclass
class Scored:
    """The result rows of one series (``series.parquet`` and ``findings.parquet`` rows)."""

    row: dict[str, Any]
    findings: list[dict[str, Any]]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _read(item: ScanItem) -> Volume:
    if item.is_dicom:
        return read_dicom_series(list(item.paths))
    return read_volume(item.paths[0])


def prepare(item: ScanItem, params: ModelParams) -> Prepared:
    """Read a series and preprocess it for the model; errors become ``Prepared.error``."""
    timings = {"read": 0.0, "preprocess": 0.0}
    start = time.perf_counter()
    try:
        source = _read(item)
        timings["read"] = time.perf_counter() - start
        start = time.perf_counter()
        if isinstance(params, SegmentationParams):
            volume = prepare_segmentation(source, params)
        else:
            volume = preprocess_ct(source, params.spacing_mm, params.intensity)
        timings["preprocess"] = time.perf_counter() - start
    except MedsslError as exc:
        return Prepared(item, None, timings, error=_describe(exc))
    except Exception as exc:  # noqa: BLE001 - one series never stops the batch
        return Prepared(item, None, timings, error=f"unexpected {_describe(exc)}")
    return Prepared(item, volume, timings, n_slices=source.shape[0], source_affine=source.affine.copy(),
                    source_shape=source.shape)


def _base_row(item: ScanItem, card: ModelCard, status: str) -> dict[str, Any]:
    return {"key": item.key, "patient_id": item.patient_id, "study_uid": item.study_uid,
            "series_uid": item.series_uid, "status": status, "error": None, "model": card.name,
            "model_version": card.version, "n_slices": item.n_slices, "source": item.paths[0]}


def skipped_row(item: ScanItem, card: ModelCard, reason: str) -> dict[str, Any]:
    """The row of a series the selection rules left out."""
    return {**_base_row(item, card, "skipped"), "error": reason}


def failed_row(item: ScanItem, card: ModelCard, error: str, timings: dict[str, float] | None = None) -> dict[str, Any]:
    """The row of a series that could not be scored, with the reason."""
    return {**_base_row(item, card, "failed"), "error": error,
            **{f"{k}_s": v for k, v in (timings or {}).items()}}


@dataclass(frozen=True)
class DicomOutput:
    """DICOM results of scored DICOM series.

    Attributes:
        folder: SRs go to ``<folder>/<SeriesInstanceUID>/sr.dcm``, SEGs to ``.../seg.dcm``.
        min_probability: findings below this are left out of the SR (the Parquet tables keep
            every detection down to the model's FROC threshold); a report of 100 marks at
            p = 0.01 helps no reader.
    """

    folder: Path
    min_probability: float = 0.5


def _write_sr(item: ScanItem, detections: Sequence[Detection], card: ModelCard, output: DicomOutput) -> Path:
    """The series' TID 1500 SR (headers of the source files only)."""
    from medssl.serving.sr import write_detection_sr

    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in item.paths]
    folder = output.folder / item.series_uid
    folder.mkdir(parents=True, exist_ok=True)
    reported = [d for d in detections if d.probability >= output.min_probability]
    return write_detection_sr(source, reported, card, folder / "sr.dcm")


def infer(prepared: Prepared, runner: DetectionRunner | SegmentationRunner, card: ModelCard, params: ModelParams,
          dicom: DicomOutput | None = None, label_maps: Path | None = None) -> Scored:
    """Run the model on a prepared series (or pass its failure through).

    Args:
        dicom: also write the TID 1500 SR (detection) or DICOM SEG (segmentation) of a
            scored DICOM series (same UIDs on every retry, so a re-run overwrites).
        label_maps: segmentation: the folder of ``<key>.nii.gz`` label maps on the source
            grid (required for segmentation models).

    Returns:
        The series row (status ``ok`` with timings, ``n_findings``, ``max_probability``;
        or ``failed`` with the reason) and one row per detection (LPS mm) or per label.
    """
    item = prepared.item
    if prepared.volume is None:
        return Scored(failed_row(item, card, prepared.error or "unknown error", prepared.timings), [])
    if isinstance(params, SegmentationParams):
        return _infer_segmentation(prepared, runner, card, params, dicom, label_maps)  # type: ignore[arg-type]
    try:
        result = detect_preprocessed(prepared.volume, runner, params)
    except MedsslError as exc:
        return Scored(failed_row(item, card, _describe(exc), prepared.timings), [])
    except Exception as exc:  # noqa: BLE001 - a failed row, not a dead run
        return Scored(failed_row(item, card, f"unexpected {_describe(exc)}", prepared.timings), [])
    findings = [
        {"key": item.key, "series_uid": item.series_uid or item.key, "index": i,
         "x_mm": float(d.centre_lps[0]), "y_mm": float(d.centre_lps[1]), "z_mm": float(d.centre_lps[2]),
         "diameter_mm": float(d.diameter_mm), "probability": float(d.probability), "model": card.name,
         "model_version": card.version}
        for i, d in enumerate(result.detections)
    ]
    outputs = None
    if dicom is not None and item.is_dicom:
        try:
            outputs = str(_write_sr(item, result.detections, card, dicom))
        except Exception as exc:  # noqa: BLE001 - a failed row, not a dead run
            return Scored(failed_row(item, card, f"writing the SR failed: {_describe(exc)}", prepared.timings), [])
    probabilities = [f["probability"] for f in findings]
    row = {
        **_base_row(item, card, "ok"),
        "n_slices": prepared.n_slices if prepared.n_slices is not None else item.n_slices,
        "read_s": prepared.timings.get("read"), "preprocess_s": prepared.timings.get("preprocess"),
        "inference_s": result.timings["inference"], "postprocess_s": result.timings["postprocess"],
        "n_windows": result.n_windows, "n_findings": len(findings),
        "max_probability": float(np.max(probabilities)) if probabilities else 0.0,
        "dicom_outputs": outputs,
    }
    return Scored(row, findings)


def _write_seg(item: ScanItem, labels: Volume, card: ModelCard, output: DicomOutput) -> Path:
    """The series' BINARY DICOM SEG, pixel-aligned with the source series."""
    from medssl.serving.seg import write_label_seg

    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in item.paths]
    # label_seg's contract: mask k belongs to source[k]; find each file's slice in the volume.
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in source])
    slices = np.rint(labels.world_to_index(positions)[:, 0]).astype(int)
    folder = output.folder / item.series_uid
    folder.mkdir(parents=True, exist_ok=True)
    return write_label_seg(source, np.asarray(labels.array)[slices], card, folder / "seg.dcm")


def _infer_segmentation(prepared: Prepared, runner: SegmentationRunner, card: ModelCard,
                        params: SegmentationParams, dicom: DicomOutput | None,
                        label_maps: Path | None) -> Scored:
    item = prepared.item
    assert prepared.volume is not None and prepared.source_affine is not None and prepared.source_shape
    try:
        if label_maps is None:
            raise MedsslError("segmentation scoring needs a label_maps folder")
        result = segment_prepared(prepared.volume, prepared.source_shape, prepared.source_affine, runner, params)
        label_map = write_nifti(result.labels, label_maps / f"{item.key}.nii.gz")
        outputs = None
        if dicom is not None and item.is_dicom:
            outputs = str(_write_seg(item, result.labels, card, dicom))
    except MedsslError as exc:
        return Scored(failed_row(item, card, _describe(exc), prepared.timings), [])
    except Exception as exc:  # noqa: BLE001 - a failed row, not a dead run
        return Scored(failed_row(item, card, f"unexpected {_describe(exc)}", prepared.timings), [])
    findings = [
        {"key": item.key, "series_uid": item.series_uid or item.key, "index": label.value, "label": label.name,
         "volume_ml": float(result.volumes_ml.get(label.value, 0.0)), "model": card.name,
         "model_version": card.version}
        for label in card.labels
    ]
    t = result.timings
    row = {
        **_base_row(item, card, "ok"),
        "n_slices": prepared.n_slices if prepared.n_slices is not None else item.n_slices,
        "read_s": prepared.timings.get("read"), "preprocess_s": prepared.timings.get("preprocess"),
        "inference_s": t["inference"] + t["blend"], "postprocess_s": t["resample_back"] + t["postprocess"],
        "n_windows": result.n_windows, "n_findings": sum(1 for f in findings if f["volume_ml"] > 0),
        "dicom_outputs": outputs, "label_map": str(label_map),
    }
    return Scored(row, findings)
