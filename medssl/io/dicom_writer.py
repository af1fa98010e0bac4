"""Write a :class:`~medssl.volume.Volume` as a classic DICOM CT Image series.

The objects follow the CT Image IOD (PS3.3 A.3): Patient, General Study,
Patient Study, General Series, Frame of Reference, General Equipment, General
Acquisition, General Image, Image Plane, Image Pixel, CT Image, VOI LUT and SOP
Common modules, and pass dicom3tools' ``dciodvfy`` without errors. UIDs not
given are derived deterministically from ``SeriesInfo.uid_seed``, so writing the
same case twice gives the same objects.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from medssl import __version__
from medssl.io.common import hu_int16
from medssl.io.dicom_files import CT_IMAGE_STORAGE
from medssl.volume import Volume

__all__ = ["SeriesInfo", "derived_uid", "write_dicom_series"]

#: Transfer syntaxes the writer can encode (native, or through pydicom's encoders).
WRITABLE_SYNTAXES = (ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless)


def derived_uid(*parts: str) -> str:
    """A UID derived deterministically from ``parts``: ``2.25.`` + a name-based (v5) UUID.

    PS3.5 B.2 allows UUID-derived UIDs under the ``2.25`` root.
    """
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(str(p) for p in parts)).int}"


@dataclass(frozen=True)
class SeriesInfo:
    """Patient, study and series attributes of a written series.

    UIDs left as ``None`` are derived from ``uid_seed``. Dates are
    ``YYYYMMDD``, times ``HHMMSS``, as DICOM writes them.
    """

    uid_seed: str = "medssl"
    patient_id: str = "ANON0001"
    patient_name: str = "Anonymous^Patient"
    patient_birth_date: str = ""
    patient_sex: str = "O"
    patient_age: str = ""
    study_uid: str | None = None
    study_id: str = "1"
    study_date: str = "20260101"
    study_time: str = "120000"
    accession_number: str = ""
    study_description: str = "CT CHEST"
    series_uid: str | None = None
    series_number: int = 1
    series_description: str = "Chest 1.25mm"
    frame_of_reference_uid: str | None = None
    body_part: str = "CHEST"
    manufacturer: str = "medssl"
    model_name: str = "synthetic"
    kvp: float = 120.0
    convolution_kernel: str = "STANDARD"
    slice_thickness: float | None = None
    window: tuple[float, float] = (-600.0, 1500.0)

    def uid(self, kind: str) -> str:
        """The study, series or frame-of-reference UID, given or derived."""
        given = {
            "study": self.study_uid,
            "series": self.series_uid,
            "frame_of_reference": self.frame_of_reference_uid,
        }[kind]
        return given or derived_uid(self.uid_seed, kind)


def write_dicom_series(
    volume: Volume,
    out_dir: str | Path,
    info: SeriesInfo | None = None,
    transfer_syntax: str | UID = ExplicitVRLittleEndian,
) -> list[Path]:
    """Write one file per slice ``IM00001.dcm`` ... into ``out_dir``.

    Args:
        volume: HU image ``(Z, Y, X)``; the z axis must be perpendicular to the
            (y, x) plane (no gantry tilt). Values are rounded to int16.
        out_dir: folder to create or fill.
        info: patient / study / series attributes.
        transfer_syntax: Explicit VR Little Endian, RLE Lossless or JPEG 2000 Lossless.

    Returns:
        The written paths, in slice order.

    Raises:
        ValueError: a sheared grid, an unsupported transfer syntax, or pixels the
            encoder refuses (OpenJPEG needs images of at least 32 x 32).
    """
    info = info or SeriesInfo()
    syntax = UID(str(transfer_syntax))
    if syntax not in WRITABLE_SYNTAXES:
        names = ", ".join(s.name for s in WRITABLE_SYNTAXES)
        raise ValueError(f"cannot write transfer syntax {syntax.name}; choose one of {names}")
    direction = volume.direction
    normal = np.cross(direction[:, 2], direction[:, 1])
    if abs(abs(float(normal @ direction[:, 0])) - 1.0) > 1e-4:
        raise ValueError("volume z axis is not perpendicular to its slices; cannot write DICOM")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hu = hu_int16(volume.array)
    orientation = [*_ds_values(direction[:, 2]), *_ds_values(direction[:, 1])]
    sy, sx = float(volume.spacing[1]), float(volume.spacing[2])
    thickness = info.slice_thickness or float(volume.spacing[0])
    paths = []
    for z in range(hu.shape[0]):
        position = volume.index_to_world([z, 0, 0])
        ds = _slice_dataset(info, z)
        ds.ImageOrientationPatient = orientation
        ds.ImagePositionPatient = _ds_values(position)
        ds.SliceLocation = _ds_value(float(position @ normal))
        ds.PixelSpacing = [_ds_value(sy), _ds_value(sx)]
        ds.SliceThickness = _ds_value(thickness)
        ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[2])
        ds.PixelData = hu[z].tobytes()
        if syntax != ExplicitVRLittleEndian:
            try:
                ds.compress(
                    syntax, encoding_plugin="pylibjpeg" if syntax == JPEG2000Lossless else ""
                )
            except (RuntimeError, ValueError) as exc:  # encoder plugins raise either
                raise ValueError(f"cannot encode slice {z} as {syntax.name}: {exc}") from None
        path = out / f"IM{z + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _slice_dataset(info: SeriesInfo, z: int) -> Dataset:
    """The dataset of slice ``z`` (0-based) without its geometry and pixels."""
    sop_uid = derived_uid(info.uid_seed, "sop", str(z))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"MEDSSL_{__version__}"[:16]

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    # Patient
    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = info.patient_birth_date
    ds.PatientSex = info.patient_sex
    if info.patient_age:
        ds.PatientAge = info.patient_age
    # General Study
    ds.StudyInstanceUID = info.uid("study")
    ds.StudyDate = info.study_date
    ds.StudyTime = info.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = info.study_id
    ds.AccessionNumber = info.accession_number
    ds.StudyDescription = info.study_description
    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = info.uid("series")
    ds.SeriesNumber = info.series_number
    ds.SeriesDescription = info.series_description
    ds.SeriesDate = info.study_date
    ds.SeriesTime = info.study_time
    ds.BodyPartExamined = info.body_part
    ds.PatientPosition = "HFS"
    # Frame of Reference
    ds.FrameOfReferenceUID = info.uid("frame_of_reference")
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = info.manufacturer
    ds.ManufacturerModelName = info.model_name
    ds.SoftwareVersions = f"medssl {__version__}"
    # General Image / Acquisition
    ds.InstanceNumber = z + 1
    ds.AcquisitionNumber = 1
    ds.ContentDate = info.study_date
    ds.ContentTime = info.study_time
    ds.AcquisitionDate = info.study_date
    ds.AcquisitionTime = info.study_time
    # Image Pixel + CT Image
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.KVP = _ds_value(info.kvp)
    ds.ConvolutionKernel = info.convolution_kernel
    # VOI LUT
    ds.WindowCenter = _ds_value(info.window[0])
    ds.WindowWidth = _ds_value(info.window[1])
    return ds


def _ds_value(value: float) -> str:
    """A Decimal String of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def _ds_values(values: np.ndarray) -> list[str]:
    return [_ds_value(float(v)) for v in values]
