"""Classic DICOM CT series (one file per slice) to a :class:`~medssl.volume.Volume` in HU.

Files are grouped by SeriesInstanceUID (by folder and geometry where an anonymiser blanked
it: :func:`medssl.io.dicom_files.series_key`), sorted along the slice normal from
ImagePositionPatient / ImageOrientationPatient (never InstanceNumber), checked
for one regular grid (:mod:`medssl.io.slice_stack`), and rescaled to HU with
each slice's RescaleSlope / RescaleIntercept.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from medssl.errors import (
    LocalizerError,
    MultipleSeriesError,
    SeriesGeometryError,
    VolumeReadError,
)
from medssl.io.common import positive_number, rescale_number
from medssl.io.dicom_enhanced import read_enhanced
from medssl.io.dicom_files import (
    ENHANCED_CT_IMAGE_STORAGE,
    derived_series_key,
    frame_pixels,
    is_dicom_file,
    is_localizer,
    iter_files,
    read_dataset,
    require_image,
    series_key,
    series_meta,
)
from medssl.io.limits import GeometryLimits
from medssl.io.slice_stack import PlaneGeometry, plane_geometry, sort_slices
from medssl.volume import Volume

__all__ = ["DicomSeries", "load_dicom_series", "read_dicom_series"]

#: Threads reading files. Parsing holds the GIL, so one is fastest for uncompressed
#: files on local disk; more help with compressed syntaxes (decoders release the GIL)
#: and network file systems.
DEFAULT_WORKERS = 1


#: Pixel Data: the datasets :func:`load_dicom_series` keeps end before it.
_PIXEL_DATA = Tag("PixelData")


@dataclass
class DicomSeries:
    """A series read once: its volume and the headers it was read from.

    Attributes:
        volume: the volume in HU (:func:`read_dicom_series`).
        headers: the series' datasets in the order their files were given (directory
            order for a folder), each ending before its Pixel Data (as
            ``stop_before_pixels`` reads them): what the result writers (SR, SEG) reference.
    """

    volume: Volume
    headers: list[Dataset]


def read_dicom_series(
    source: str | Path | Sequence[str | Path],
    series_uid: str | None = None,
    workers: int = DEFAULT_WORKERS,
    limits: GeometryLimits | None = None,
    target_spacing_mm: Sequence[float] | float | None = None,
) -> Volume:
    """Read one CT series from a directory, a list of files, or one file.

    Args:
        source: a directory (searched recursively), a list of files, or one file.
            Files without the DICOM preamble are ignored; they are listed in
            ``meta["ignored_files"]``.
        series_uid: the SeriesInstanceUID to read when ``source`` holds several, or the
            derived ``nouid-...`` key of a series without one.
        workers: threads reading files in parallel.
        limits: refuse geometry beyond these limits from the headers, before the pixels
            are read (:class:`~medssl.io.limits.GeometryLimits`); None checks nothing.
        target_spacing_mm: with ``limits``: the model grid the volume will be resampled
            to, so the resampled voxel count is checked too.

    Returns:
        Volume with float32 HU, shape ``(Z, Y, X)``, z ascending along the slice
        normal. ``meta`` holds UIDs, modality, and ``files`` in slice order;
        ``series_key`` (the SeriesInstanceUID, or the ``nouid-...`` key of
        :func:`~medssl.io.dicom_files.derived_series_key`) and ``series_uid_absent``.

    Raises:
        CorruptFileError: a file is truncated or malformed (named).
        NotAnImageError: no image series, or a non-image object in the chosen series.
        MultipleSeriesError: several image series and no ``series_uid``.
        LocalizerError: the series is a scout/localizer.
        ImplausibleGeometryError: spacing, extent or voxel count beyond ``limits``.
        SeriesGeometryError: missing / duplicate slices, uneven spacing, gantry tilt,
            mixed orientation or matrix size.
    """
    return load_dicom_series(source, series_uid, workers, limits, target_spacing_mm).volume


def load_dicom_series(
    source: str | Path | Sequence[str | Path],
    series_uid: str | None = None,
    workers: int = DEFAULT_WORKERS,
    limits: GeometryLimits | None = None,
    target_spacing_mm: Sequence[float] | float | None = None,
    headers: MutableMapping[str, Dataset] | None = None,
) -> DicomSeries:
    """:func:`read_dicom_series`, keeping the headers it read (each file is parsed once).

    Arguments and errors are :func:`read_dicom_series`'s, plus ``headers``: datasets already
    read with their pixel data deferred (:func:`medssl.index.index_files` with
    ``keep_headers``), by file path as given. Each one used is taken out of the mapping (its
    pixel data is dropped once read); a file without one is read here. Returns the volume and
    the chosen series' datasets (:class:`DicomSeries`), without their pixel data.
    """
    if isinstance(source, (str, Path)):
        label = Path(source)
    else:  # a list of files: name the folder they share
        label = Path(os.path.commonpath([str(p) for p in source])) if source else Path(".")
    paths, ignored = _collect(source)
    if not paths:
        raise VolumeReadError(label, "holds no DICOM files")

    def read(path: Path) -> Dataset:
        known = headers.pop(str(path), None) if headers is not None else None
        return known if known is not None else read_dataset(path, defer_pixels=True)

    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            datasets = list(pool.map(read, paths))
    else:
        datasets = [read(p) for p in paths]
    series = _group(datasets, paths)
    chosen = _choose(series, series_uid, label)
    files = [paths[i] for i in chosen]
    members = [datasets[i] for i in chosen]
    for ds, path in zip(members, files):
        require_image(ds, path)
    if len(members) == 1 and (
        members[0].SOPClassUID == ENHANCED_CT_IMAGE_STORAGE
        or int(members[0].get("NumberOfFrames", 1) or 1) > 1
    ):
        volume = read_enhanced(members[0], files[0], limits, target_spacing_mm)
    else:
        volume = _stack(members, files, label, limits, target_spacing_mm)
        volume.meta["ignored_files"] = [str(p) for p in ignored]
    key = next(k for k, indices in series.items() if indices is chosen)
    volume.meta.update(series_key=key, series_uid_absent=not volume.meta.get("series_uid"))
    for ds in members:
        _drop_pixels(ds)
    return DicomSeries(volume, members)


def _drop_pixels(ds: Dataset) -> None:
    """Remove Pixel Data and what follows it from ``ds`` (in place): the header as
    ``stop_before_pixels`` reads it, without a decoded pixel array kept alive."""
    for tag in [t for t in ds.keys() if t >= _PIXEL_DATA]:  # noqa: SIM118 - iterating parses
        del ds[tag]


def _collect(source: str | Path | Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    if isinstance(source, (str, Path)):
        root = Path(source)
        if not root.exists():
            raise VolumeReadError(root, "does not exist")
        candidates = list(iter_files(root)) if root.is_dir() else [root]
        flags = [is_dicom_file(p) for p in candidates]
        dicom = [p for p, ok in zip(candidates, flags) if ok]
        if root.is_file() and not dicom:
            return [root], []  # let read_dataset say why it is not DICOM
        return dicom, [p for p, ok in zip(candidates, flags) if not ok]
    return [Path(p) for p in source], []


def _group(datasets: list[Dataset], paths: list[Path]) -> dict[str, list[int]]:
    """File indices per series: by SeriesInstanceUID, or for files without one by folder and
    geometry, such a group keyed by :func:`derived_series_key` of its members."""
    groups: dict[tuple[str, bool], list[int]] = {}
    for i, ds in enumerate(datasets):
        groups.setdefault(series_key(ds, str(paths[i].parent.absolute())), []).append(i)
    series: dict[str, list[int]] = {}
    for (key, absent), indices in groups.items():
        if absent:
            key = derived_series_key(
                [str(datasets[i].get("SOPInstanceUID", "")) for i in indices], key
            )
        series[key] = indices
    return series


def _choose(series: dict[str, list[int]], series_uid: str | None, label: Path) -> list[int]:
    if series_uid is not None:
        if series_uid not in series:
            raise VolumeReadError(label, f"holds no series with SeriesInstanceUID {series_uid}")
        return series[series_uid]
    if len(series) == 1:
        return next(iter(series.values()))
    raise MultipleSeriesError(label, sorted(series))


def _plane(ds: Dataset, path: Path) -> PlaneGeometry:
    missing = [
        k
        for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
        if k not in ds
    ]
    if missing:
        raise SeriesGeometryError(path, f"lacks {', '.join(missing)}; cannot place it in space")
    return plane_geometry(
        ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing, path.name, path
    )


def _stack(
    datasets: list[Dataset],
    files: list[Path],
    label: Path,
    limits: GeometryLimits | None = None,
    target_spacing_mm: Sequence[float] | float | None = None,
) -> Volume:
    for ds, path in zip(datasets, files):
        if is_localizer(ds):
            raise LocalizerError(path, "is a LOCALIZER (scout) image, not part of a CT volume")
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(shapes) > 1:
        raise SeriesGeometryError(label, f"slices have different matrix sizes {sorted(shapes)}")
    first = datasets[0]
    thickness = (
        positive_number(first.get("SpacingBetweenSlices"))
        or positive_number(first.get("SliceThickness"))
        or 1.0
    )
    stack = sort_slices([_plane(ds, p) for ds, p in zip(datasets, files)], label, float(thickness))
    rows, cols = shapes.pop()
    if limits is not None:  # from the headers, before the volume is allocated
        spacing = np.linalg.norm(stack.affine[:3, :3], axis=0)
        limits.check((len(datasets), rows, cols), spacing, label, target_spacing_mm)
    array = np.empty((len(datasets), rows, cols), dtype=np.float32)
    for z, i in enumerate(stack.order):
        ds = datasets[i]
        array[z] = frame_pixels(ds, files[i])[0]
        slope = rescale_number(partial(ds.get, "RescaleSlope"), 1.0, "RescaleSlope", files[i])
        intercept = rescale_number(
            partial(ds.get, "RescaleIntercept"), 0.0, "RescaleIntercept", files[i]
        )
        if slope != 1.0:
            array[z] *= np.float32(slope)
        if intercept != 0.0:
            array[z] += np.float32(intercept)
    meta = {
        **series_meta(first),
        "format": "dicom",
        "files": [str(files[i]) for i in stack.order],
        "slice_thickness": positive_number(first.get("SliceThickness")),
    }
    if str(first.get("Modality", "")) not in ("CT", ""):
        meta["warning"] = f"modality is {first.Modality}, not CT: values are not HU"
    return Volume(array, stack.affine, meta)
