"""Scoring one series: read → preprocess (CPU workers) → inference → postprocess (the model).

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
from medssl.models.card import ModelCard
from medssl.pipeline.detect import Detection, DetectionParams, DetectionRunner, detect_preprocessed
from medssl.pipeline.preprocess import preprocess_ct
from medssl.scoring.manifest import ScanItem
from medssl.volume import Volume

__all__ = ["DicomOutput", "Prepared", "Scored", "failed_row", "infer", "prepare", "skipped_row"]


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
    """

    item: ScanItem
    volume: Volume | None
    timings: dict[str, float] = field(default_factory=dict)
    n_slices: int | None = None
    error: str | None = None


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


def prepare(item: ScanItem, params: DetectionParams) -> Prepared:
    """Read a series and preprocess it for the model; errors become ``Prepared.error``."""
    timings = {"read": 0.0, "preprocess": 0.0}
    start = time.perf_counter()
    try:
        source = _read(item)
        timings["read"] = time.perf_counter() - start
        start = time.perf_counter()
        volume = preprocess_ct(source, params.spacing_mm, params.intensity)
        timings["preprocess"] = time.perf_counter() - start
    except MedsslError as exc:
        return Prepared(item, None, timings, error=_describe(exc))
    except Exception as exc:  # noqa: BLE001 - one series never stops the batch
        return Prepared(item, None, timings, error=f"unexpected {_describe(exc)}")
    return Prepared(item, volume, timings, n_slices=source.shape[0])


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
        folder: SRs go to ``<folder>/<SeriesInstanceUID>/sr.dcm``.
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


def infer(prepared: Prepared, runner: DetectionRunner, card: ModelCard, params: DetectionParams,
          dicom: DicomOutput | None = None) -> Scored:
    """Run the detector on a prepared series (or pass its failure through).

    Args:
        dicom: also write the TID 1500 SR of a scored DICOM series (same UIDs on every
            retry, so a re-run overwrites instead of duplicating).

    Returns:
        The series row (status ``ok`` with timings, ``n_findings``, ``max_probability``;
        or ``failed`` with the reason) and one row per detection (LPS mm).
    """
    item = prepared.item
    if prepared.volume is None:
        return Scored(failed_row(item, card, prepared.error or "unknown error", prepared.timings), [])
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
