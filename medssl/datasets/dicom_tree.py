"""A generic DICOM tree (e.g. NLST's ``patient/study/series/*.dcm``) as a dataset.

The tree is indexed by headers (:mod:`medssl.index`), never by its folder
names; each indexed series is a case, read on demand.
"""

from __future__ import annotations

from pathlib import Path

from medssl.index import DicomIndex, SeriesRecord, index_tree, read_index
from medssl.io.dicom_series import read_dicom_series
from medssl.volume import Volume

__all__ = ["DicomTree"]


class DicomTree:
    """Series of a DICOM tree, or of an index table written earlier.

    Args:
        source: a directory to index, or a ``.parquet`` / ``.csv`` index.
    """

    def __init__(self, source: str | Path) -> None:
        source = Path(source)
        self.index: DicomIndex = read_index(source) if source.is_file() else index_tree(source)

    @property
    def series(self) -> list[SeriesRecord]:
        """The indexed series."""
        return self.index.series

    def volume(self, record: SeriesRecord) -> Volume:
        """Read one series as a HU Volume (typed errors as :func:`read_dicom_series`)."""
        return read_dicom_series(record.files, series_uid=record.series_uid or None)
