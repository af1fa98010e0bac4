"""A point finding in world coordinates: the one type for nodules found, annotated or scored.

The detection pipeline returns findings (:func:`medssl.pipeline.detect.detect`), LUNA16's
annotation and submission files hold them (:mod:`medssl.datasets.luna16`,
:mod:`medssl.metrics.luna16`), the DICOM writers report them (TID 1500 SR, companion SEG),
scoring stores them as ``findings.parquet`` rows (:meth:`Finding.to_row`) and the gateway
records them per series.

Frames: ``centre_lps`` is a DICOM patient (LPS) point in millimetres, the frame of LUNA16's
``coordX, coordY, coordZ`` (ITK physical points); ``centre_voxel``, where known, is the
continuous ``(z, y, x)`` index of that point in the source scan (voxel ``i`` centred at ``i``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medssl.volume import float_triple

__all__ = ["FINDING_ROW_COLUMNS", "Finding"]

#: The columns :meth:`Finding.to_row` writes (those of ``findings.parquet`` a finding fills).
FINDING_ROW_COLUMNS = ("series_uid", "x_mm", "y_mm", "z_mm", "diameter_mm", "probability")


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One point finding: a centre in LPS mm, a diameter in mm, a probability.

    Keyword-only. What a finding carries depends on where it came from; the defaults say
    "not recorded": a reference annotation is certain (``probability`` 1), a CAD mark read
    from a LUNA16 submission or a candidate has no size (``diameter_mm`` 0).

    Attributes:
        centre_lps: centre ``(x, y, z)``, LPS mm (stored as three floats).
        diameter_mm: diameter (a detector's cube edge), mm; 0 when not recorded. LUNA16's
            excluded findings use -1 ("no size"), kept as read.
        probability: in ``[0, 1]`` for the pipeline's findings (calibrated by the card's
            calibration); 1 for a reference annotation. A CAD mark read from a submission
            may carry any finite score.
        series_uid: the series it belongs to (SeriesInstanceUID, or LUNA16's seriesuid);
            "" when the context says it (one series' findings).
        centre_voxel: centre ``(z, y, x)`` in the input scan's index frame (continuous);
            None where not recorded.
        score: the model's raw score before calibration, ``[0, 1]`` (equal to
            ``probability`` under the identity calibration); None where not recorded.
    """

    centre_lps: tuple[float, float, float]
    diameter_mm: float = 0.0
    probability: float = 1.0
    series_uid: str = ""
    centre_voxel: tuple[float, float, float] | None = None
    score: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "centre_lps", float_triple(self.centre_lps, "Finding.centre_lps"))
        if self.centre_voxel is not None:
            object.__setattr__(
                self, "centre_voxel", float_triple(self.centre_voxel, "Finding.centre_voxel")
            )

    def to_row(self) -> dict[str, Any]:
        """The finding's columns of ``findings.parquet``: ``series_uid``, ``x_mm``, ``y_mm``,
        ``z_mm`` (LPS mm), ``diameter_mm`` and ``probability`` (:data:`FINDING_ROW_COLUMNS`)."""
        x, y, z = self.centre_lps
        return {
            "series_uid": self.series_uid,
            "x_mm": x,
            "y_mm": y,
            "z_mm": z,
            "diameter_mm": float(self.diameter_mm),
            "probability": float(self.probability),
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Finding:
        """Inverse of :meth:`to_row` (other columns of the row are ignored).

        Raises:
            ValueError: a column is missing (named).
        """
        missing = [c for c in FINDING_ROW_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"a finding row needs columns {missing}; it has {sorted(row)}")
        return cls(
            centre_lps=(row["x_mm"], row["y_mm"], row["z_mm"]),
            diameter_mm=float(row["diameter_mm"]),
            probability=float(row["probability"]),
            series_uid=str(row["series_uid"] or ""),
        )
