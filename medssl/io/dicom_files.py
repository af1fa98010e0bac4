"""Reading single DICOM files with typed errors, and decoding their pixels.

pydicom does the parsing and, through its decoder plugins (pylibjpeg,
python-gdcm), the decompression of JPEG lossless, JPEG-LS, JPEG 2000 and RLE
transfer syntaxes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medssl.errors import CorruptFileError, NotAnImageError, VolumeReadError

__all__ = [
    "CT_IMAGE_STORAGE",
    "ENHANCED_CT_IMAGE_STORAGE",
    "derived_series_key",
    "frame_pixels",
    "is_dicom_file",
    "is_localizer",
    "iter_files",
    "read_dataset",
    "require_image",
    "series_key",
    "series_meta",
]

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
_NATIVE_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_PIXEL_DATA = 0x7FE00010
#: Values larger than this (bytes) are deferred by ``read_dataset(defer_pixels=True)``.
DEFER_SIZE = 64 * 1024


def is_dicom_file(path: Path) -> bool:
    """True when the file carries the DICOM Part 10 preamble and ``DICM`` magic."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def iter_files(root: Path) -> Iterator[Path]:
    """Every regular file under ``root`` (recursively), in sorted order; hidden files skipped."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and path.name != "DICOMDIR":
            yield path


def read_dataset(
    path: str | Path, stop_before_pixels: bool = False, defer_pixels: bool = False
) -> Dataset:
    """Read one DICOM Part 10 file.

    Args:
        path: the file.
        stop_before_pixels: read the header only.
        defer_pixels: leave values over :data:`DEFER_SIZE` (the pixel data) on disk;
            :func:`frame_pixels` reads them straight into an array. This keeps a
            series' headers in memory without its pixels.

    Raises:
        CorruptFileError: not DICOM, truncated, or malformed; the message names the problem.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(
            path,
            stop_before_pixels=stop_before_pixels,
            defer_size=DEFER_SIZE if defer_pixels else None,
        )
    except FileNotFoundError:
        raise VolumeReadError(path, "does not exist") from None
    except InvalidDicomError:
        raise CorruptFileError(path, "not a DICOM file (no DICM preamble)") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, NotImplementedError) as exc:
        # The exception's type only: a parser's message may quote element values (PHI).
        raise CorruptFileError(
            path, f"truncated or malformed DICOM ({type(exc).__name__})"
        ) from None
    _sop_identity_from_meta(ds)
    # pydicom stops quietly at end of file: a file cut short parses as a shorter dataset.
    if "SOPClassUID" not in ds:
        raise CorruptFileError(
            path, f"truncated or malformed DICOM: no SOPClassUID in {path.stat().st_size} bytes"
        )
    return ds


def _sop_identity_from_meta(ds: Dataset) -> None:
    """Fill a blank or missing SOPClassUID / SOPInstanceUID from the file meta (in memory).

    Anonymisers blank the dataset's UIDs and keep MediaStorageSOPClassUID /
    MediaStorageSOPInstanceUID, which name the same object (PS3.10 7.1). A SOPClassUID
    missing altogether is taken from the meta only when the dataset reached its image
    module (``Rows``): a file cut short before that stays a truncated file.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return
    for keyword, meta_keyword in (
        ("SOPClassUID", "MediaStorageSOPClassUID"),
        ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
    ):
        if str(ds.get(keyword, "") or "").strip():
            continue
        value = str(meta.get(meta_keyword, "") or "").strip()
        if value and (keyword in ds or "Rows" in ds):
            setattr(ds, keyword, value)


def require_image(ds: Dataset, path: Path) -> None:
    """Check that ``ds`` holds a single-channel image with its pixel data.

    Raises:
        NotAnImageError: a non-image SOP class (SR, SEG, RT Structure Set, ...) or a
            colour image.
        CorruptFileError: an image header whose pixel data is missing (a cut file).
    """
    sop_name = ds.SOPClassUID.name
    if not sop_name.endswith("Image Storage"):
        raise NotAnImageError(path, f"is a {sop_name} object, which holds no image")
    if "Rows" not in ds or "PixelData" not in ds:
        raise CorruptFileError(path, "is truncated: the file ends before its pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise NotAnImageError(
            path, f"has {ds.SamplesPerPixel} samples per pixel; CT is single-channel"
        )


def frame_pixels(ds: Dataset, path: Path) -> np.ndarray:
    """Stored pixel values (before rescale), shape ``(frames, rows, columns)``.

    Uncompressed little-endian data whose stored bits fill the allocated bits
    is read straight into the array (from the file when the value was deferred,
    else from the buffer); anything else goes through pydicom's decoders.

    Raises:
        CorruptFileError: the pixel data is shorter than the header says, or cannot be decoded.
    """
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    if (
        ds.file_meta.TransferSyntaxUID in _NATIVE_LE
        and bits in (8, 16, 32)
        and int(ds.get("BitsStored", bits)) == bits
    ):
        dtype = np.dtype(f"<{'i' if ds.get('PixelRepresentation', 0) else 'u'}{bits // 8}")
        count = rows * cols * frames
        # pydicom's overload says DataElement; a deferred (not yet read) value is a raw one
        element: DataElement | RawDataElement = ds.get_item(_PIXEL_DATA, keep_deferred=True)
        if isinstance(element, RawDataElement) and element.value is None:
            # deferred: pydicom recorded where the value starts
            with open(path, "rb") as fh:
                fh.seek(element.value_tell)
                pixels = np.fromfile(fh, dtype=dtype, count=count)
        else:
            data = b"" if element.value is None else element.value  # None: reported as truncated
            pixels = np.frombuffer(data, dtype=dtype, count=min(count, len(data) // dtype.itemsize))
        if pixels.size < count:
            raise CorruptFileError(
                path,
                f"pixel data is truncated: {pixels.size * dtype.itemsize} of "
                f"{count * dtype.itemsize} bytes ({frames} x {rows} x {cols} x {bits} bits)",
            )
        return pixels.reshape(frames, rows, cols)
    try:
        array = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoder plugins raise assorted types
        raise CorruptFileError(
            # the decoder's type only: its message may quote the data (PHI)
            path,
            f"pixel data could not be decoded ({ds.file_meta.TransferSyntaxUID.name}, "
            f"{type(exc).__name__})",
        ) from None
    return array.reshape(frames, rows, cols)


def is_localizer(ds: Dataset) -> bool:
    """True for scout / topogram images (ImageType value 3 is LOCALIZER)."""
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    return len(image_type) > 2 and image_type[2] == "LOCALIZER"


def _text_values(ds: Dataset, keyword: str, digits: int = 4) -> str:
    """A header value as stable text for a signature: numbers rounded, never raising."""
    try:
        value = ds.get(keyword)
        if value is None:
            return ""
        values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
        out = []
        for v in values:
            try:
                out.append(f"{round(float(v), digits):g}")
            except (TypeError, ValueError):
                out.append(str(v).strip())
        return "\\".join(out)
    except Exception:  # noqa: BLE001 - a signature of a malformed header is still a signature
        return "?"


def series_key(ds: Dataset, folder: str) -> tuple[str, bool]:
    """The key that groups a file into its series: ``(key, uid_absent)``.

    The SeriesInstanceUID when the dataset has one. Otherwise (anonymisers blank it) a
    grouping key ``nouid-<20 hex>``: a SHA-256 of the file's folder and the geometry and
    identity a series shares: StudyInstanceUID, FrameOfReferenceUID and SeriesNumber (when
    present), ImageOrientationPatient and PixelSpacing (rounded to 1e-4), Rows and Columns.
    Two blank-UID series in one folder with the same geometry and no SeriesNumber fall in one
    group (which then fails the slice checks, e.g. as duplicate slices). Once a group's
    members are known, :func:`derived_series_key` names it.

    Args:
        ds: a dataset, headers suffice.
        folder: the folder to group by.

    Returns:
        The key, and True when it was derived (the series has no SeriesInstanceUID).
    """
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    if uid:
        return uid, False
    signature = "|".join(
        [
            folder,
            str(ds.get("StudyInstanceUID", "") or "").strip(),
            str(ds.get("FrameOfReferenceUID", "") or "").strip(),
            _text_values(ds, "SeriesNumber"),
            _text_values(ds, "ImageOrientationPatient"),
            _text_values(ds, "PixelSpacing"),
            _text_values(ds, "Rows"),
            _text_values(ds, "Columns"),
        ]
    )
    return "nouid-" + hashlib.sha256(signature.encode("utf-8", "replace")).hexdigest()[:20], True


def derived_series_key(sop_instance_uids: Sequence[str], group_key: str) -> str:
    """The key of a series without a SeriesInstanceUID, unique and the same on every run.

    ``nouid-`` + 20 hex digits of a SHA-256 of its members' SOP Instance UIDs (sorted; from the
    file meta where the dataset's were blank): globally unique like the UIDs themselves, and
    independent of where the archive lies or which folder a reader was given, so
    ``medssl index``, ``medssl-score`` and ``medssl info`` name the series alike. Where a member
    has no SOP Instance UID at all, the ``group_key`` of :func:`series_key` (folder and
    geometry) is the key.
    """
    uids = [str(u).strip() for u in sop_instance_uids]
    if not uids or not all(uids):
        return group_key
    digest = hashlib.sha256("\n".join(sorted(uids)).encode("utf-8", "replace")).hexdigest()
    return "nouid-" + digest[:20]


def series_meta(ds: Dataset) -> dict[str, object]:
    """Identifying tags of a series, taken from one of its datasets."""
    return {
        "patient_id": str(ds.get("PatientID", "")),
        "study_uid": str(ds.get("StudyInstanceUID", "")),
        "series_uid": str(ds.get("SeriesInstanceUID", "")),
        "modality": str(ds.get("Modality", "")),
        "sop_class_uid": str(ds.get("SOPClassUID", "")),
        "series_description": str(ds.get("SeriesDescription", "")),
    }
