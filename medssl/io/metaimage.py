"""MetaImage (``.mhd`` + ``.raw``/``.zraw``, as LUNA16 ships it) through SimpleITK.

MetaImage stores ITK physical coordinates, which are LPS, so no flip is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medssl.errors import CorruptFileError
from medssl.io.common import last_line, storage_array
from medssl.io.sitk_bridge import from_sitk, to_sitk
from medssl.volume import Volume

__all__ = ["metaimage_grid", "read_metaimage", "write_metaimage"]


def read_metaimage(path: str | Path) -> Volume:
    """Read a ``.mhd`` (or single-file ``.mha``) as a float32 Volume in HU.

    Raises:
        CorruptFileError: the header or the raw data cannot be read.
    """
    path = Path(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise CorruptFileError(path, f"MetaImage could not be read: {last_line(exc)}") from None
    if image.GetDimension() != 3:
        raise CorruptFileError(path, f"expected a 3D image, found {image.GetDimension()}D")
    volume = from_sitk(image, source=str(path), format="metaimage")
    volume.array = volume.array.astype(np.float32, copy=False)
    return volume


def metaimage_grid(path: str | Path) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Shape ``(Z, Y, X)`` and spacing ``(z, y, x)`` mm of a MetaImage, from its header only
    (the raw data is not read).

    Raises:
        CorruptFileError: the header cannot be read or the image is not 3D.
    """
    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise CorruptFileError(path, f"MetaImage could not be read: {last_line(exc)}") from None
    if reader.GetDimension() != 3:
        raise CorruptFileError(path, f"expected a 3D image, found {reader.GetDimension()}D")
    x, y, z = (int(n) for n in reader.GetSize())
    sx, sy, sz = (float(s) for s in reader.GetSpacing())
    return (z, y, x), (sz, sy, sx)


def write_metaimage(volume: Volume, path: str | Path, compress: bool = True) -> Path:
    """Write ``volume`` as ``path`` (``.mhd`` header + ``.zraw``/``.raw`` data).

    Intensities are stored as int16 when the array holds whole numbers in the
    int16 range (CT in HU), else in the array's own dtype.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    volume = Volume(storage_array(volume.array), volume.affine)
    sitk.WriteImage(to_sitk(volume), str(path), useCompression=compress)
    return path
