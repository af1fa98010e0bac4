"""What scoring one series gave: a :class:`SeriesResult`, from the pipeline to the scorer and the
gateway.

:func:`medssl.scoring.series.infer` returns one per series (ok or failed), the scorer's
selection makes the skipped ones; ``medssl-score`` stores :meth:`SeriesResult.to_row` and
:meth:`SeriesResult.finding_rows` (the ``series.parquet`` and ``findings.parquet`` rows,
:mod:`medssl.scoring.store`), and the gateway records the same object per (route, series) and
sends its :attr:`SeriesResult.written` objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from medssl.dicom.written import WrittenObject
from medssl.finding import Finding
from medssl.models.card import ReportThreshold
from medssl.scoring.manifest import ScanItem

__all__ = ["LabelVolume", "SeriesResult", "SeriesStatus"]

#: Stage timings that have a ``<stage>_s`` column in ``series.parquet``.
ROW_TIMINGS = ("read", "preprocess", "inference", "postprocess", "lung_mask")


class SeriesStatus(str, Enum):
    """What became of a series."""

    OK = "ok"  #: scored, results written
    SKIPPED = "skipped"  #: the selection rules left it out (``error`` says why)
    FAILED = "failed"  #: it could not be read or scored (``error`` says why)


@dataclass(frozen=True)
class LabelVolume:
    """One label of a segmentation: its class value, name and volume on the source grid.

    Attributes:
        value: the class value in the label map (1 ..).
        name: the card's label name.
        volume_ml: voxel count x voxel volume / 1000, ml; 0.0 when the label was not found.
    """

    value: int
    name: str
    volume_ml: float

    def to_row(self) -> dict[str, Any]:
        """Its columns of ``findings.parquet``: ``index`` (the value), ``label``, ``volume_ml``."""
        return {"index": self.value, "label": self.name, "volume_ml": float(self.volume_ml)}


@dataclass
class SeriesResult:
    """The result of one series with one model.

    Attributes:
        item: the series (its manifest row: key, UIDs, paths, description).
        model, model_version: the model's card name and version.
        status: :class:`SeriesStatus`.
        error: why it was skipped or failed (``"ErrorType: message"``); None when ok.
        timings: seconds per stage: ``read``, ``preprocess``, ``inference``,
            ``postprocess``, ``lung_mask`` (detection), ``write`` (the result objects).
        findings: detection: every candidate the pipeline returned (LPS mm, by descending
            probability, ``series_uid`` set); the report holds those at or above
            ``threshold`` (:attr:`reported`).
        threshold: detection: the report threshold in effect and where it came from
            (:meth:`~medssl.models.card.ModelCard.report_threshold`); None otherwise.
        labels: segmentation: one :class:`LabelVolume` per label of the card.
        written: the DICOM objects written (SR or SEG first, then a companion SEG), with their
            SOP class, SOP instance and series UIDs.
        n_slices: slices of the source series as read (None: the manifest's count).
        n_windows, n_windows_skipped: windows run, and skipped (outside the lung mask or the
            body box).
        warnings: what the pipeline reported about the series (e.g. no lung found).
        note: why asked-for DICOM outputs were not written (the source lacks a UID).
        label_map: segmentation: the NIfTI label map written, if any.
        transient: the failure was the model runner's (or memory): a retry may succeed.
    """

    item: ScanItem
    model: str
    model_version: int
    status: SeriesStatus
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    threshold: ReportThreshold | None = None
    labels: list[LabelVolume] = field(default_factory=list)
    written: list[WrittenObject] = field(default_factory=list)
    n_slices: int | None = None
    n_windows: int | None = None
    n_windows_skipped: int | None = None
    warnings: list[str] = field(default_factory=list)
    note: str | None = None
    label_map: Path | None = None
    transient: bool = False

    def __post_init__(self) -> None:
        self.status = SeriesStatus(self.status)

    @property
    def key(self) -> str:
        """The series' key (:attr:`ScanItem.key`: its SeriesInstanceUID or a derived key)."""
        return self.item.key

    @property
    def reported(self) -> list[Finding]:
        """Detection: the findings at or above the threshold in effect (what the SR holds)."""
        if self.threshold is None:
            return []
        return [f for f in self.findings if f.probability >= self.threshold.value]

    @property
    def n_findings(self) -> int | None:
        """Ok detection: the candidates kept (``findings.parquet`` rows); ok segmentation:
        the labels found (volume > 0); None otherwise."""
        if self.status is not SeriesStatus.OK:
            return None
        if self.threshold is not None:
            return len(self.findings)
        return sum(1 for label in self.labels if label.volume_ml > 0)

    @property
    def n_reported(self) -> int | None:
        """Ok detection: the findings reported (in the SR, :attr:`reported`); ok segmentation:
        the labels found (volume > 0); None otherwise. What the gateway records."""
        if self.status is not SeriesStatus.OK:
            return None
        return len(self.reported) if self.threshold is not None else self.n_findings

    def to_row(self) -> dict[str, Any]:
        """The ``series.parquet`` row (:data:`medssl.scoring.store.SERIES_COLUMNS`)."""
        item = self.item
        row: dict[str, Any] = {
            "key": item.key,
            "patient_id": item.patient_id,
            "study_uid": item.study_uid,
            "series_uid": item.series_uid,
            "status": self.status.value,
            "error": self.error,
            "model": self.model,
            "model_version": self.model_version,
            "n_slices": item.n_slices,
            "source": item.paths[0],
            "series_uid_absent": item.series_uid_absent,
        }
        row.update({f"{k}_s": self.timings[k] for k in ROW_TIMINGS if k in self.timings})
        if self.status is not SeriesStatus.OK:
            return row
        row.update(
            n_slices=self.n_slices if self.n_slices is not None else item.n_slices,
            n_windows=self.n_windows,
            n_windows_skipped=self.n_windows_skipped,
            n_findings=self.n_findings,
            dicom_outputs=str(self.written[0].path) if self.written else None,
            note=self.note,
        )
        if self.threshold is not None:
            row.update(
                warning="; ".join(self.warnings) or None,
                max_probability=max((f.probability for f in self.findings), default=0.0),
                report_threshold=self.threshold.value,
                threshold_source=self.threshold.source,
            )
        else:
            row["label_map"] = str(self.label_map) if self.label_map is not None else None
        return row

    def finding_rows(self) -> list[dict[str, Any]]:
        """The ``findings.parquet`` rows: per detection :meth:`Finding.to_row` with ``passed``
        (in the report), per label :meth:`LabelVolume.to_row`; each with the series' key,
        its index and the model."""
        item = self.item
        common = {"key": item.key, "series_uid": item.series_uid or item.key}
        model = {"model": self.model, "model_version": self.model_version}
        if self.threshold is not None:
            return [
                {
                    **common,
                    "index": i,
                    **{k: v for k, v in f.to_row().items() if k != "series_uid"},
                    "passed": bool(f.probability >= self.threshold.value),
                    **model,
                }
                for i, f in enumerate(self.findings)
            ]
        return [{**common, **label.to_row(), **model} for label in self.labels]
