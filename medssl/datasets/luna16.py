"""The LUNA16 layout: ``subset0..9/*.mhd``, annotation CSVs in world mm (LPS).

Files (as the LUNA16 challenge ships them):

* ``subsetK/<seriesuid>.mhd`` (+ ``.raw``/``.zraw``): the CT scans, K = 0..9.
* ``annotations.csv``: ``seriesuid,coordX,coordY,coordZ,diameter_mm``, nodules >= 3 mm.
* ``annotations_excluded.csv``: same columns, the "irrelevant findings" that
  count neither as hits nor as false positives in the FROC.
* ``seriesuids.csv``: one seriesuid per line, no header.
* ``candidates_V2.csv``: ``seriesuid,coordX,coordY,coordZ,class``.
* ``seg-lungs-LUNA16/<seriesuid>.mhd``: lung masks.

medssl's synthetic data adds ``nodule-masks/<seriesuid>.mhd`` (each nodule
labelled with its row number in ``annotations.csv``, per series, from 1) and
``truth.csv`` (nodule kind and location), which real LUNA16 does not have.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from medssl.errors import DatasetLayoutError
from medssl.finding import Finding
from medssl.io.common import hu_int16
from medssl.io.metaimage import read_metaimage, write_metaimage
from medssl.volume import Volume

__all__ = ["Luna16", "Luna16Writer", "read_findings", "write_findings"]

N_SUBSETS = 10
ANNOTATION_FIELDS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
CANDIDATE_FIELDS = ["seriesuid", "coordX", "coordY", "coordZ", "class"]


class Luna16:
    """Read a LUNA16 folder.

    Args:
        root: the folder holding ``subset0``.. and ``annotations.csv``.

    Raises:
        DatasetLayoutError: no ``subset*`` folders or no ``annotations.csv``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._scans = {p.stem: p for p in sorted(self.root.glob("subset*/*.mhd"))}
        if not self._scans:
            raise DatasetLayoutError(
                f"{self.root}: no subset*/<seriesuid>.mhd scans; expected the LUNA16 layout "
                "(subset0..subset9, annotations.csv)"
            )
        if not (self.root / "annotations.csv").is_file():
            raise DatasetLayoutError(f"{self.root}: annotations.csv is missing")

    @property
    def seriesuids(self) -> list[str]:
        """Every scan's seriesuid, in subset then name order."""
        return list(self._scans)

    def subset_of(self, seriesuid: str) -> int:
        """The subset number (0..9) holding ``seriesuid``; LUNA16's cross-validation folds."""
        return int(self._scan_path(seriesuid).parent.name.removeprefix("subset"))

    def scan(self, seriesuid: str) -> Volume:
        """The CT scan as a float32 HU Volume."""
        return read_metaimage(self._scan_path(seriesuid))

    def lung_mask(self, seriesuid: str) -> Volume:
        """The lung mask from ``seg-lungs-LUNA16``."""
        return self._mask("seg-lungs-LUNA16", seriesuid)

    def nodule_mask(self, seriesuid: str) -> Volume:
        """The synthetic nodule label mask (medssl's synthetic data only)."""
        return self._mask("nodule-masks", seriesuid)

    def annotations(self, seriesuid: str | None = None) -> list[Finding]:
        """Nodules from ``annotations.csv``, all or of one series."""
        return read_findings(self.root / "annotations.csv", seriesuid)

    def nodule_truth(self, seriesuid: str | None = None) -> list[dict[str, str]]:
        """The extra per-nodule columns of ``truth.csv`` (medssl's synthetic data: ``kind``,
        ``location``), one dict per nodule in the order of :meth:`annotations` for the same
        ``seriesuid``; empty where the file is absent (real LUNA16).

        Raises:
            DatasetLayoutError: ``truth.csv`` does not list the same nodules as ``annotations.csv``.
        """
        path = self.root / "truth.csv"
        if not path.is_file():
            return []
        rows = [
            r
            for r in _read_rows(path, ("seriesuid", "label"))
            if seriesuid is None or r["seriesuid"] == seriesuid
        ]
        nodules = self.annotations(seriesuid)
        if [r["seriesuid"] for r in rows] != [f.series_uid for f in nodules]:
            raise DatasetLayoutError(f"{path}: its rows do not follow annotations.csv's nodules")
        return [{k: v for k, v in r.items() if k not in ("seriesuid", "label")} for r in rows]

    def excluded(self, seriesuid: str | None = None) -> list[Finding]:
        """Irrelevant findings from ``annotations_excluded.csv`` (empty if the file is absent)."""
        path = self.root / "annotations_excluded.csv"
        return read_findings(path, seriesuid) if path.is_file() else []

    def candidates(self, seriesuid: str | None = None) -> list[tuple[Finding, int]]:
        """``(finding, class)`` rows of ``candidates_V2.csv``; diameter is 0."""
        path = self.root / "candidates_V2.csv"
        if not path.is_file():
            return []
        rows = []
        for row in _read_rows(path, CANDIDATE_FIELDS):
            if seriesuid is None or row["seriesuid"] == seriesuid:
                centre = (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))
                rows.append(
                    (Finding(centre_lps=centre, series_uid=row["seriesuid"]), int(row["class"]))
                )
        return rows

    def _scan_path(self, seriesuid: str) -> Path:
        try:
            return self._scans[seriesuid]
        except KeyError:
            raise DatasetLayoutError(
                f"{self.root}: no scan {seriesuid}.mhd in any subset"
            ) from None

    def _mask(self, folder: str, seriesuid: str) -> Volume:
        path = self.root / folder / f"{seriesuid}.mhd"
        if not path.is_file():
            raise DatasetLayoutError(f"{path} is missing")
        volume = read_metaimage(path)
        volume.array = volume.array.astype(np.int16)
        return volume


class Luna16Writer:
    """Write scans and findings in the LUNA16 layout; CSVs are written by :meth:`close`.

    Scan ``i`` (in order of :meth:`add`) goes to ``subset{i % 10}``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._uids: list[str] = []
        self._annotations: list[Finding] = []
        self._excluded: list[Finding] = []
        self._candidates: list[tuple[Finding, int]] = []
        self._truth: list[dict[str, object]] = []

    def add(
        self,
        seriesuid: str,
        scan: Volume,
        nodules: Sequence[Finding],
        excluded: Sequence[Finding] = (),
        lung_mask: np.ndarray | None = None,
        nodule_mask: np.ndarray | None = None,
        negatives: Iterable[tuple[float, float, float]] = (),
        truth: Sequence[dict[str, object]] = (),
    ) -> Path:
        """Write one scan (int16 HU, as LUNA16 stores it) and its masks; queue its CSV rows.

        Args:
            seriesuid: the scan's name and key in every CSV.
            scan: HU volume.
            nodules: rows of ``annotations.csv``; nodule ``k`` (from 1) is label ``k``
                in ``nodule_mask``.
            excluded: rows of ``annotations_excluded.csv``.
            lung_mask, nodule_mask: arrays on the scan grid ``(Z, Y, X)``.
            negatives: LPS points of class-0 candidates (nodules and excluded
                findings are listed as candidates too, classes 1 and 0).
            truth: extra per-nodule columns for ``truth.csv``, one dict per nodule.
        """
        subset = self.root / f"subset{len(self._uids) % N_SUBSETS}"
        path = write_metaimage(scan.with_array(hu_int16(scan.array)), subset / f"{seriesuid}.mhd")
        if lung_mask is not None:
            write_metaimage(
                scan.with_array(lung_mask.astype(np.uint8)),
                self.root / "seg-lungs-LUNA16" / f"{seriesuid}.mhd",
            )
        if nodule_mask is not None:
            write_metaimage(
                scan.with_array(nodule_mask.astype(np.uint8)),
                self.root / "nodule-masks" / f"{seriesuid}.mhd",
            )
        self._uids.append(seriesuid)
        self._annotations.extend(nodules)
        self._excluded.extend(excluded)
        self._candidates.extend((f, 1) for f in nodules)
        self._candidates.extend((f, 0) for f in excluded)
        self._candidates.extend(
            (Finding(centre_lps=(p[0], p[1], p[2]), series_uid=seriesuid), 0) for p in negatives
        )
        for k, (finding, extra) in enumerate(zip(nodules, truth), start=1):
            self._truth.append({"seriesuid": finding.series_uid, "label": k, **extra})
        return path

    def close(self) -> None:
        """Write ``annotations.csv``, ``annotations_excluded.csv``, ``seriesuids.csv``,
        ``candidates_V2.csv`` and ``truth.csv``."""
        write_findings(self.root / "annotations.csv", self._annotations)
        write_findings(self.root / "annotations_excluded.csv", self._excluded)
        (self.root / "seriesuids.csv").write_text("".join(f"{u}\n" for u in self._uids))
        with open(self.root / "candidates_V2.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(CANDIDATE_FIELDS)
            for finding, label in self._candidates:
                writer.writerow([finding.series_uid, *_coords(finding.centre_lps), label])
        if self._truth:
            with open(self.root / "truth.csv", "w", newline="") as fh:
                truth_writer = csv.DictWriter(fh, fieldnames=list(self._truth[0]))
                truth_writer.writeheader()
                truth_writer.writerows(self._truth)


def _coords(point: Sequence[float]) -> list[str]:
    return [f"{float(v):.4f}" for v in point]


def write_findings(path: Path, findings: Sequence[Finding]) -> None:
    """Write findings with the columns of LUNA16's ``annotations.csv``."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(ANNOTATION_FIELDS)
        for f in findings:
            writer.writerow([f.series_uid, *_coords(f.centre_lps), f"{f.diameter_mm:.4f}"])


def _read_rows(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = set(required) - set(reader.fieldnames or [])
        if missing:
            raise DatasetLayoutError(f"{path}: missing columns {sorted(missing)}")
        return list(reader)


def read_findings(path: str | Path, seriesuid: str | None = None) -> list[Finding]:
    """Findings from a CSV with the columns of LUNA16's ``annotations.csv``, all or of one series.

    Raises:
        DatasetLayoutError: a required column is missing.
        ValueError: a coordinate or diameter is not a number.
    """
    return [
        Finding(
            centre_lps=(float(row["coordX"]), float(row["coordY"]), float(row["coordZ"])),
            diameter_mm=float(row["diameter_mm"]),
            series_uid=row["seriesuid"],
        )
        for row in _read_rows(Path(path), ANNOTATION_FIELDS)
        if seriesuid is None or row["seriesuid"] == seriesuid
    ]
