"""What to score: an archive's series as a manifest of :class:`ScanItem` rows.

Inputs understood by :func:`build_manifest`:

* a DICOM tree of any layout: indexed by headers (:func:`medssl.index.index_tree`);
* an index written by ``medssl index`` (``.parquet`` / ``.csv``), so a 21M-file archive is
  indexed once;
* a LUNA16 folder (``subset*/<seriesuid>.mhd``), or one of its ``subsetN`` folders;
* a Decathlon / nnU-Net folder (``dataset.json``): its ``imagesTs`` cases;
* a text file listing volume paths (NIfTI, MetaImage, DICOM file or folder), one per line.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, overload

from medssl.datasets.decathlon import Decathlon
from medssl.errors import DatasetLayoutError, MedsslError
from medssl.index import DicomIndex, SeriesRecord, index_tree, iter_index

__all__ = ["Layout", "Manifest", "PathList", "ScanItem", "build_manifest"]


class PathList(Sequence[str]):
    """The file paths of one series, immutable and compact: their common prefix and the rest
    joined by NUL (which no path holds). An NLST series' 105 paths take ~1.3 KB instead of
    ~14 KB as Python strings, so a 200k-series manifest fits in a few hundred MB. Equal to
    (and hashes like) the tuple of its paths.
    """

    __slots__ = ("_n", "_prefix", "_rest")

    def __init__(self, paths: Iterable[str]) -> None:
        values = [str(p) for p in paths]
        # A shared string prefix, not a path: the rest of each value is stored after it.
        prefix = os.path.commonprefix(values) if len(values) > 1 else ""  # noqa: RUF071
        self._prefix = prefix
        self._rest = "\0".join(v[len(prefix) :] for v in values)
        self._n = len(values)

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[str]:
        if self._n:
            for rest in self._rest.split("\0"):
                yield self._prefix + rest

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...

    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        if isinstance(index, slice):
            return tuple(self)[index]
        if index < 0:
            index += self._n
        if not 0 <= index < self._n:
            raise IndexError("PathList index out of range")
        if index == 0:
            end = self._rest.find("\0")
            return self._prefix + (self._rest if end < 0 else self._rest[:end])
        return self._prefix + self._rest.split("\0")[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (PathList, tuple, list)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"PathList({list(self)!r})"

    def __reduce__(self) -> tuple[type, tuple[tuple[str, ...]]]:
        return PathList, (tuple(self),)


class Layout(str, Enum):
    """Where a manifest came from (decides e.g. whether a LUNA16 submission is written)."""

    DICOM = "dicom"
    LUNA16 = "luna16"
    DECATHLON = "decathlon"
    PATHS = "paths"


@dataclass(frozen=True)
class ScanItem:
    """One series to score.

    Attributes:
        key: unique id of the row, the same on every run: the SeriesInstanceUID (DICOM), or
            for a DICOM series without one the ``nouid-<20 hex>`` key derived from its members'
            SOP Instance UIDs (:func:`medssl.io.dicom_files.derived_series_key`); the LUNA16
            seriesuid,
            the Decathlon case id or the file name.
        paths: the series' DICOM files (a :class:`PathList` from an index), or one volume
            file (NIfTI/MetaImage).
        patient_id, study_uid, series_uid: identifiers ("" when unknown).
        modality, image_type, orientation, n_slices, slice_thickness_mm: header values used
            by the selection rules (DICOM only; None/"" when unknown).
        series_description: for the report.
        body_part: BodyPartExamined, upper case as stored ("" when absent; DICOM only).
        series_uid_absent: a DICOM series whose files have no SeriesInstanceUID (blanked by
            an anonymiser): ``key`` was derived, ``series_uid`` is ``""``, and DICOM outputs,
            which must reference the source's UIDs, are not written for it.
    """

    key: str
    paths: Sequence[str]
    patient_id: str = ""
    study_uid: str = ""
    series_uid: str = ""
    modality: str = ""
    image_type: str = ""
    orientation: str = ""
    n_slices: int | None = None
    slice_thickness_mm: float | None = None
    series_description: str = ""
    series_uid_absent: bool = False
    body_part: str = ""

    @property
    def is_dicom(self) -> bool:
        """A DICOM series (files of an index), not a volume file."""
        return (bool(self.series_uid) or self.series_uid_absent) and not self.paths[
            0
        ].lower().endswith(_VOLUME_SUFFIXES)

    @property
    def missing_output_uids(self) -> str | None:
        """Why DICOM outputs (SR, SEG) cannot be written for this series: they must name the
        source's StudyInstanceUID and SeriesInstanceUID, and medssl does not invent them for
        an object it did not make. None when they can be written."""
        missing = [
            name
            for name, value in (
                ("SeriesInstanceUID", self.series_uid),
                ("StudyInstanceUID", self.study_uid),
            )
            if not value
        ]
        if not missing:
            return None
        return f"no DICOM outputs: the source has no {' or '.join(missing)}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["paths"] = list(self.paths)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScanItem:
        return cls(**{**data, "paths": PathList(data["paths"])})

    @classmethod
    def from_record(cls, record: SeriesRecord) -> ScanItem:
        """The row of a series of a DICOM index."""
        return cls(
            key=record.series_key or record.series_uid,
            paths=PathList(record.files),
            patient_id=record.patient_id,
            study_uid=record.study_uid,
            series_uid=record.series_uid,
            modality=record.modality,
            image_type=record.image_type,
            orientation=record.orientation,
            n_slices=record.n_slices,
            slice_thickness_mm=record.slice_thickness,
            series_description=record.series_description,
            series_uid_absent=record.series_uid_absent,
            body_part=record.body_part,
        )


_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mhd", ".mha")


@dataclass
class Manifest:
    """The series of an input, and what could not be read while listing them.

    Attributes:
        layout: the input's layout.
        items: one row per series, in a stable order.
        unreadable: ``(path, reason)`` of files the DICOM index could not parse.
        root: the input folder or file.
    """

    layout: Layout
    items: list[ScanItem]
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    root: Path | None = None


def _from_index(index: DicomIndex, root: Path) -> Manifest:
    items = [ScanItem.from_record(r) for r in index.series]
    return Manifest(Layout.DICOM, items, list(index.unreadable), root)


def _luna16(folders: list[Path]) -> Manifest:
    scans = sorted(p for folder in folders for p in folder.glob("*.mhd"))
    items = [ScanItem(key=p.stem, paths=(str(p.resolve()),), series_uid=p.stem) for p in scans]
    return Manifest(Layout.LUNA16, items, [], folders[0])


def _volume_item(path: Path) -> ScanItem:
    name = path.name
    for suffix in _VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return ScanItem(key=name, paths=(str(path.resolve()),))


def build_manifest(source: str | Path, workers: int | None = None) -> Manifest:
    """The series to score in ``source`` (see the module docstring for what it may be).

    Args:
        source: a folder, an index table, or a text file of paths.
        workers: header-reading processes when a DICOM tree is indexed.

    Raises:
        MedsslError: ``source`` does not exist or is none of the supported inputs.
        DatasetLayoutError: a LUNA16/Decathlon folder is malformed.
    """
    source = Path(source)
    if not source.exists():
        raise MedsslError(f"{source}: no such file or folder to score")
    if source.is_file():
        if source.suffix.lower() in (".parquet", ".csv"):
            # streamed: the table's rows become compact items a batch at a time
            return Manifest(
                Layout.DICOM, [ScanItem.from_record(r) for r in iter_index(source)], [], source
            )
        if source.suffix.lower() == ".txt":
            lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
            paths = [
                Path(line) if Path(line).is_absolute() else source.parent / line
                for line in lines
                if line and not line.startswith("#")
            ]
            return Manifest(Layout.PATHS, [_volume_item(p) for p in paths], [], source)
        raise MedsslError(
            f"{source}: expected a folder, an index (.parquet/.csv) or a list of paths (.txt)"
        )
    if list(source.glob("subset*/*.mhd")):
        return _luna16(sorted(p for p in source.glob("subset*") if p.is_dir()))
    if source.name.startswith("subset") and (source.parent / "annotations.csv").is_file():
        return _luna16([source])
    if (source / "dataset.json").is_file():
        dataset = Decathlon(source)
        if not dataset.test:
            raise DatasetLayoutError(f"{source}: dataset.json lists no test cases (imagesTs)")
        items = [
            ScanItem(key=case.case_id, paths=(str(Path(case.image).resolve()),))
            for case in dataset.test
        ]
        return Manifest(Layout.DECATHLON, items, [], source)
    return _from_index(index_tree(source, workers=workers), source)
