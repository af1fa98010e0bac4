"""Volume I/O: DICOM (classic and enhanced CT), NIfTI and MetaImage, all to LPS Volumes in HU.

``read_volume`` picks the reader from the path; ``write_volume`` the writer
from the suffix. DICOM series are written by :func:`write_dicom_series`.
"""

from __future__ import annotations

from pathlib import Path

from medssl.errors import UnsupportedFormatError
from medssl.io.dicom_files import is_dicom_file
from medssl.io.dicom_series import read_dicom_series
from medssl.io.dicom_writer import SeriesInfo, write_dicom_series
from medssl.io.metaimage import metaimage_grid, read_metaimage, write_metaimage
from medssl.io.nifti import nifti_grid, read_nifti, write_nifti
from medssl.volume import Volume

__all__ = [
    "SeriesInfo",
    "read_dicom_series",
    "read_grid",
    "read_metaimage",
    "read_nifti",
    "read_volume",
    "write_dicom_series",
    "write_metaimage",
    "write_nifti",
    "write_volume",
]

_NIFTI = (".nii", ".nii.gz")
_METAIMAGE = (".mhd", ".mha")


def read_volume(path: str | Path, series_uid: str | None = None) -> Volume:
    """Read any supported volume: a DICOM file or directory, NIfTI, or MetaImage.

    Args:
        path: a ``.nii``/``.nii.gz``/``.mhd``/``.mha`` file, a DICOM file, or a
            directory holding one DICOM series (or several, with ``series_uid``).
        series_uid: which series to read from a directory of several.

    Raises:
        UnsupportedFormatError: the path is none of the above.
        VolumeReadError: (and subclasses) the file or series is unreadable; see
            :mod:`medssl.errors`.
    """
    path = Path(path)
    name = path.name.lower()
    if path.is_file() and name.endswith(_NIFTI):
        return read_nifti(path)
    if path.is_file() and name.endswith(_METAIMAGE):
        return read_metaimage(path)
    if path.is_dir() or (path.is_file() and is_dicom_file(path)):
        return read_dicom_series(path, series_uid=series_uid)
    if not path.exists():
        raise UnsupportedFormatError(path, "does not exist")
    raise UnsupportedFormatError(
        path, "is not DICOM, NIfTI (.nii, .nii.gz) or MetaImage (.mhd, .mha)"
    )


def read_grid(path: str | Path) -> tuple[tuple[int, int, int], tuple[float, float, float]] | None:
    """Shape ``(Z, Y, X)`` and spacing ``(z, y, x)`` mm of a NIfTI or MetaImage file from its
    header, without reading the data (so its size can be checked before it is allocated);
    None for other paths (DICOM: its reader checks the headers itself).

    Raises:
        CorruptFileError: the header cannot be read or the image is not 3D.
    """
    path = Path(path)
    name = path.name.lower()
    if path.is_file() and name.endswith(_NIFTI):
        return nifti_grid(path)
    if path.is_file() and name.endswith(_METAIMAGE):
        return metaimage_grid(path)
    return None


def write_volume(volume: Volume, path: str | Path) -> Path:
    """Write ``volume`` as NIfTI or MetaImage, chosen by the suffix of ``path``."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(_NIFTI):
        return write_nifti(volume, path)
    if name.endswith(_METAIMAGE):
        return write_metaimage(volume, path)
    raise UnsupportedFormatError(
        path, "unknown suffix: use .nii, .nii.gz, .mhd or .mha (or write_dicom_series)"
    )
