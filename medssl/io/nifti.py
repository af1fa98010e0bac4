"""NIfTI-1/2 (``.nii``, ``.nii.gz``) through nibabel, converting RAS <-> LPS.

A NIfTI affine maps the on-disk index ``(i, j, k)`` (i fastest) to RAS mm. A
Volume maps ``(z, y, x) = (k, j, i)`` to LPS. So::

    affine_volume = diag(-1, -1, 1, 1) @ affine_nifti @ P,   P swaps index 0 and 2.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage

from medssl.errors import CorruptFileError
from medssl.io.common import last_line, storage_array
from medssl.volume import Volume

__all__ = ["nifti_grid", "read_nifti", "write_nifti"]

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SWAP_ZX = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


def read_nifti(path: str | Path, label: bool = False) -> Volume:
    """Read a 3D NIfTI file.

    Args:
        path: ``.nii`` or ``.nii.gz``.
        label: keep integer values (label maps) instead of float32 intensities.

    Returns:
        Volume with array ``(Z, Y, X)``; float32 with scl_slope/scl_inter
        applied, or the stored integer dtype when ``label``.

    Raises:
        CorruptFileError: unreadable, truncated, or not 3D.
    """
    path = Path(path)
    image = _load(path)
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad files
        raise CorruptFileError(path, f"NIfTI could not be read: {last_line(exc)}") from None
    data = np.squeeze(data, axis=tuple(range(3, data.ndim))) if data.ndim > 3 else data
    if data.ndim != 3:
        raise CorruptFileError(path, f"expected a 3D image, found shape {data.shape}")
    array = data.transpose(2, 1, 0)
    array = np.ascontiguousarray(array if label else array.astype(np.float32, copy=False))
    affine = _RAS_TO_LPS @ image.affine @ _SWAP_ZX
    return Volume(array, affine, {"source": str(path), "format": "nifti"})


def nifti_grid(path: str | Path) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Shape ``(Z, Y, X)`` and spacing ``(z, y, x)`` mm of a NIfTI file, from its header only
    (the data is not read), as :func:`read_nifti` would return them.

    Raises:
        CorruptFileError: the header cannot be read or the image is not 3D.
    """
    path = Path(path)
    image = _load(path)
    shape = tuple(int(n) for n in image.shape)
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        raise CorruptFileError(path, f"expected a 3D image, found shape {shape}")
    spacing = np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0)
    return (shape[2], shape[1], shape[0]), (float(spacing[2]), float(spacing[1]), float(spacing[0]))


def _load(path: Path) -> SpatialImage:
    """The image nibabel reads at ``path`` (its data not read yet).

    Raises:
        CorruptFileError: unreadable, or not an image with an affine (e.g. CIFTI-2).
    """
    try:
        image = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad files
        raise CorruptFileError(path, f"NIfTI could not be read: {last_line(exc)}") from None
    if not isinstance(image, SpatialImage):
        raise CorruptFileError(
            path, f"expected a NIfTI volume with an affine, nibabel read a {type(image).__name__}"
        )
    return image


def write_nifti(volume: Volume, path: str | Path) -> Path:
    """Write ``volume`` as NIfTI-1 with qform and sform set (code 1, scanner).

    Whole-number float images in the int16 range (HU) are stored as int16;
    integer label maps keep their dtype.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = storage_array(volume.array).transpose(2, 1, 0)
    affine = _RAS_TO_LPS @ volume.affine @ _SWAP_ZX
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))
    return path
