"""A synthetic NLST-like DICOM archive: chest CT studies, localizers, and broken series.

For batch-scoring tests, demos and benchmarks: every study holds its axial CT series and a
localizer (scout) series; ``broken`` extra studies each hold a CT series damaged the way real
archives are: a truncated file, a missing slice, a slice at the wrong position.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from medssl.io.dicom_writer import SeriesInfo, write_dicom_series
from medssl.synth.datasets import write_chest_dataset
from medssl.volume import Volume

__all__ = ["BREAKAGES", "ArchiveInfo", "write_archive"]

#: How broken series are damaged, in order; the reader's error for each.
BREAKAGES = ("truncated file", "missing slice", "displaced slice")


@dataclass
class ArchiveInfo:
    """What :func:`write_archive` wrote.

    Attributes:
        good: the intact CT series folders.
        localizers: the localizer series folders (one per study).
        broken: ``(series folder, breakage)`` of the damaged CT series.
    """

    good: list[Path] = field(default_factory=list)
    localizers: list[Path] = field(default_factory=list)
    broken: list[tuple[Path, str]] = field(default_factory=list)


def _localizer(series: Path) -> Path:
    """Write a one-image localizer series next to ``series`` (same study and patient)."""
    first = pydicom.dcmread(sorted(series.glob("*.dcm"))[0])
    image = first.pixel_array.astype(np.float32) * float(first.RescaleSlope) + float(
        first.RescaleIntercept
    )
    spacing = [float(v) for v in first.PixelSpacing]
    affine = np.eye(4)
    affine[1, 1], affine[2, 2] = spacing
    affine[:3, 3] = [float(v) for v in first.ImagePositionPatient][::-1]
    info = SeriesInfo(
        uid_seed=f"{first.SeriesInstanceUID}-localizer",
        patient_id=str(first.PatientID),
        study_uid=str(first.StudyInstanceUID),
        series_number=100,
        series_description="Scout",
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
    )
    folder = series.parent / "100-Scout"
    (path,) = write_dicom_series(Volume(image[None], affine), folder, info)
    ds = pydicom.dcmread(path)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(path)
    return folder


def _break(series: Path, breakage: str) -> None:
    files = sorted(series.glob("*.dcm"))
    middle = files[len(files) // 2]
    if breakage == "truncated file":
        data = middle.read_bytes()
        middle.write_bytes(data[: len(data) // 2])
    elif breakage == "missing slice":
        middle.unlink()
    else:
        ds = pydicom.dcmread(middle)
        position = [float(v) for v in ds.ImagePositionPatient]
        position[2] += 0.4 * float(ds.SliceThickness)  # off the regular grid
        ds.ImagePositionPatient = position
        ds.save_as(middle)


def write_archive(
    out: str | Path,
    studies: int,
    broken: int = 0,
    seed: int = 0,
    matrix: int = 512,
    n_slices: int | None = None,
    *,
    family: str = "train",
) -> ArchiveInfo:
    """Write ``studies`` intact and ``broken`` damaged chest CT studies, each with a localizer.

    Args:
        out: the archive folder (``patient/study/series/IM*.dcm``).
        studies: intact studies.
        broken: extra studies whose CT series is damaged (at most ``len(BREAKAGES)``).
        seed: seed of the first study; study ``i`` uses ``seed + i``.
        matrix, n_slices: CT grid (see :class:`medssl.synth.chest.ChestConfig`).
        family: the chest generator family, ``"train"`` or ``"heldout"``
            (:data:`medssl.synth.chest.FAMILIES`).

    Returns:
        The series folders written, by kind.
    """
    if not 0 <= broken <= len(BREAKAGES):
        raise ValueError(f"broken must be in 0..{len(BREAKAGES)}, got {broken}")
    out = Path(out)
    staging = out / ".write"
    series = write_chest_dataset(
        staging,
        studies + broken,
        fmt="dicom",
        seed=seed,
        matrix=matrix,
        n_slices=n_slices,
        family=family,
    )
    info = ArchiveInfo()
    for i, folder in enumerate(series):
        target = out / folder.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(folder, target)
        info.localizers.append(_localizer(target))
        if i < studies:
            info.good.append(target)
        else:
            breakage = BREAKAGES[i - studies]
            _break(target, breakage)
            info.broken.append((target, breakage))
    shutil.rmtree(staging)
    return info
