"""Which scans a detector run trains, validates and tests on, from a LUNA16 folder.

* test: the scans of ``data.test_subsets`` (never trained or validated on);
* validation: ``n_validation`` scans of the remaining training pool (best checkpoint);
* labeled: ``n_labeled`` further scans of the pool;
* unlabeled: the scans of ``<data>/unlabeled`` and ``data.unlabeled_dirs`` (folders of
  ``.mhd``/``.nii``/``.nii.gz`` files, DICOM trees such as NLST, or the ``.parquet``/``.csv``
  index ``medssl index`` wrote of such a tree), then the leftover pool
  with its labels hidden, capped at ``n_unlabeled``. A fixed unlabeled folder therefore
  gives the same unlabeled pool at every labeled count.

The split is recorded as ``split.json`` in the run folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medssl.datasets.dicom_tree import DicomTree
from medssl.datasets.luna16 import Finding, Luna16
from medssl.datasets.splits import Split, make_split
from medssl.errors import DatasetLayoutError
from medssl.io import read_volume
from medssl.volume import Volume

__all__ = ["DetectionSplit", "ScanSource", "split_luna16"]

VOLUME_SUFFIXES = (".mhd", ".mha", ".nii", ".nii.gz")


@dataclass(frozen=True)
class ScanSource:
    """A scan to cache: its key (seriesuid) and how to read it as a HU Volume."""

    key: str
    load: Callable[[], Volume]


@dataclass(frozen=True)
class DetectionSplit:
    """The scans of a run; ``split`` is the labeled/validation split of the training pool."""

    luna: Luna16
    split: Split
    labeled: list[str]
    validation: list[str]
    test: list[str]
    unlabeled: list[ScanSource]

    def source(self, seriesuid: str) -> ScanSource:
        """A LUNA16 scan as a :class:`ScanSource`."""
        return ScanSource(seriesuid, lambda: self.luna.scan(seriesuid))

    def nodules(self, seriesuid: str) -> list[Finding]:
        return self.luna.annotations(seriesuid)


def _folder_sources(folder: Path) -> list[ScanSource]:
    """The scans of an unlabeled source: volume files, a DICOM tree, or a header index table
    written by ``medssl index`` (so a 21M-file archive is walked once, not per run)."""
    if folder.is_file():
        table = DicomTree(folder)
        return [ScanSource(r.series_uid, lambda r=r: table.volume(r)) for r in table.series()]
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(VOLUME_SUFFIXES))
    if files:
        return [
            ScanSource(p.name.removesuffix(".gz").rsplit(".", 1)[0], lambda p=p: read_volume(p))
            for p in files
        ]
    tree = DicomTree(folder)
    return [ScanSource(r.series_uid, lambda r=r: tree.volume(r)) for r in tree.series()]


def split_luna16(
    root: str | Path,
    n_labeled: int,
    n_unlabeled: int,
    test_subsets: tuple[int, ...],
    n_validation: int,
    split_seed: int,
    unlabeled_dirs: tuple[str, ...] = (),
) -> DetectionSplit:
    """Split a LUNA16 folder for a detector run (see the module docstring).

    Raises:
        DatasetLayoutError: the folder is not LUNA16, an unlabeled folder is missing, or
            there are fewer scans than asked for.
    """
    luna = Luna16(root)
    test = [u for u in luna.seriesuids if luna.subset_of(u) in test_subsets]
    pool = [u for u in luna.seriesuids if luna.subset_of(u) not in test_subsets]
    if n_labeled < 1 or n_labeled + n_validation > len(pool):
        raise DatasetLayoutError(
            f"{root}: asked for {n_labeled} labeled + {n_validation} validation scans, but the "
            "training "
            f"pool (subsets other than {list(test_subsets)}) has {len(pool)}"
        )
    split = make_split(pool, n_labeled, split_seed, n_validation)
    folders = [Path(root) / "unlabeled"] if (Path(root) / "unlabeled").is_dir() else []
    for extra in unlabeled_dirs:
        if not Path(extra).exists():
            raise DatasetLayoutError(
                f"unlabeled source {extra} does not exist (a folder or an index table)"
            )
        folders.append(Path(extra))
    unlabeled = [s for folder in folders for s in _folder_sources(folder)]
    unlabeled += [ScanSource(u, lambda u=u: luna.scan(u)) for u in split.unlabeled]
    return DetectionSplit(
        luna, split, split.labeled, split.validation, test, unlabeled[:n_unlabeled]
    )
