"""Enhanced (multi-frame) CT: one file per series, one frame per slice.

Geometry and rescale come from the functional groups (PS3.3 C.7.6.16): each
attribute is taken from the frame's Per-Frame Functional Groups item when
present there, else from the Shared Functional Groups.

:func:`write_enhanced_ct` writes a Volume as one Enhanced CT Image Storage file
(PS3.3 A.38.1) that dicom3tools' ``dciodvfy`` accepts without errors: the
synthetic counterpart of what modern scanners send, for tests and demos.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import UID

from medssl.errors import LocalizerError, SeriesGeometryError
from medssl.io.common import hu_int16, positive_number, rescale_number
from medssl.io.dicom_files import ENHANCED_CT_IMAGE_STORAGE, frame_pixels, series_meta
from medssl.io.dicom_writer import SeriesInfo, _ds_value, _ds_values, _slice_dataset, derived_uid
from medssl.io.limits import GeometryLimits
from medssl.io.slice_stack import PlaneGeometry, plane_geometry, sort_slices
from medssl.volume import Volume

__all__ = ["frame_planes", "frame_positions", "read_enhanced", "write_enhanced_ct"]


def read_enhanced(
    ds: Dataset,
    path: Path,
    limits: GeometryLimits | None = None,
    target_spacing_mm: Sequence[float] | float | None = None,
) -> Volume:
    """Stack the frames of a multi-frame CT dataset into a Volume in HU.

    Args:
        ds: the dataset, read with its pixel data (or with it deferred).
        path: its file, named in errors.
        limits: refuse geometry beyond these limits before the pixels are decoded.
        target_spacing_mm: with ``limits``: the model grid, to check the resampled size.

    Returns:
        float32 HU volume ``(Z, Y, X)``, frames sorted along the slice normal.

    Raises:
        LocalizerError: the image is a localizer.
        ImplausibleGeometryError: spacing, extent or voxel count beyond ``limits``.
        SeriesGeometryError: frames lack plane position/orientation, or do not
            form one regular grid.
    """
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if "LOCALIZER" in image_type:
        raise LocalizerError(path, "is a LOCALIZER (scout) image, not a CT volume")
    _, shared, per_frame = _functional_groups(ds, path)
    planes: list[PlaneGeometry] = []
    slopes: list[float] = []
    intercepts: list[float] = []
    for k, frame in enumerate(per_frame):
        position = _group_attr(frame, shared, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _group_attr(
            frame, shared, "PlaneOrientationSequence", "ImageOrientationPatient"
        )
        spacing = _group_attr(frame, shared, "PixelMeasuresSequence", "PixelSpacing")
        if position is None or orientation is None or spacing is None:
            raise SeriesGeometryError(
                path, f"frame {k + 1} lacks plane position, orientation or pixel spacing"
            )
        planes.append(
            plane_geometry(position, orientation, spacing, f"{path.name} frame {k + 1}", path)
        )
        for keyword, default, values in (
            ("RescaleSlope", 1.0, slopes),
            ("RescaleIntercept", 0.0, intercepts),
        ):
            values.append(
                rescale_number(
                    partial(
                        _group_attr, frame, shared, "PixelValueTransformationSequence", keyword
                    ),
                    default,
                    keyword,
                    path,
                )
            )
    between = _group_attr(per_frame[0], shared, "PixelMeasuresSequence", "SpacingBetweenSlices")
    thickness = _group_attr(per_frame[0], shared, "PixelMeasuresSequence", "SliceThickness")
    stack = sort_slices(planes, path, positive_number(between) or positive_number(thickness) or 1.0)
    if limits is not None:  # from the headers, before the frames are decoded
        rows, columns = int(ds.Rows), int(ds.Columns)
        limits.check(
            (len(planes), rows, columns),
            np.linalg.norm(stack.affine[:3, :3], axis=0),
            path,
            target_spacing_mm,
        )
    pixels = frame_pixels(ds, path)
    order = stack.order
    array = pixels[order].astype(np.float32)
    array *= np.asarray(slopes, dtype=np.float32)[order, None, None]
    array += np.asarray(intercepts, dtype=np.float32)[order, None, None]
    meta = {
        **series_meta(ds),
        "format": "dicom-enhanced",
        "files": [str(path)],
        "slice_thickness": positive_number(thickness),
    }
    return Volume(array, stack.affine, meta)


def _functional_groups(ds: Dataset, path: Path) -> tuple[int, Dataset, Sequence[Dataset]]:
    """``(NumberOfFrames, the shared item, the per-frame items)``; raises SeriesGeometryError
    when the per-frame items do not match the number of frames."""
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    # An empty (or absent) shared sequence is read as an empty item: each frame must then
    # carry its geometry, and a frame that does not is named.
    shared_items = ds.get("SharedFunctionalGroupsSequence") or [Dataset()]
    shared = shared_items[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != n_frames:
        raise SeriesGeometryError(
            path, f"has {n_frames} frames but {len(per_frame)} per-frame functional group items"
        )
    return n_frames, shared, per_frame


def _group_attr(frame: Dataset, shared: Dataset, sequence: str, keyword: str) -> Any:
    """``keyword`` from the frame's ``sequence`` item, else from the shared group's."""
    for group in (frame, shared):
        items = group.get(sequence)
        if items and keyword in items[0]:
            return items[0][keyword].value
    return None


def frame_positions(ds: Dataset) -> np.ndarray:
    """ImagePositionPatient of every frame of a multi-frame dataset, in frame order.

    Args:
        ds: an enhanced (multi-frame) image dataset; headers suffice.

    Returns:
        ``(NumberOfFrames, 3)`` float64: LPS mm of the centre of each frame's first pixel,
        from its Plane Position (Patient) functional group (per-frame, else shared).

    Raises:
        SeriesGeometryError: the per-frame items do not match NumberOfFrames, or a frame has
            no plane position (its number named).
    """
    return frame_planes(ds, orientation=False)[0]


def frame_planes(
    ds: Dataset, orientation: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plane position, orientation and pixel spacing of every frame of a multi-frame dataset.

    Args:
        ds: an enhanced (multi-frame) image dataset; headers suffice.
        orientation: also read orientations and spacings (False: positions only; the other
            two arrays are then empty).

    Returns:
        ``positions`` ``(NumberOfFrames, 3)`` (LPS mm of each frame's first pixel centre),
        ``orientations`` ``(NumberOfFrames, 6)`` (ImageOrientationPatient: row then column
        direction cosines) and ``spacings`` ``(NumberOfFrames, 2)`` (PixelSpacing: between
        rows, between columns, mm), float64, each from the frame's functional group, else
        the shared one.

    Raises:
        SeriesGeometryError: the per-frame items do not match NumberOfFrames, or a frame
            lacks one of them (its number named).
    """
    path = Path(str(getattr(ds, "filename", None) or ds.get("SOPInstanceUID", "dataset")))
    n_frames, shared, per_frame = _functional_groups(ds, path)
    groups = [("PlanePositionSequence", "ImagePositionPatient", "a plane position", 3)]
    if orientation:
        groups += [
            ("PlaneOrientationSequence", "ImageOrientationPatient", "an orientation", 6),
            ("PixelMeasuresSequence", "PixelSpacing", "a pixel spacing", 2),
        ]
    out = []
    for sequence, keyword, what, count in groups:
        values = []
        for k, frame in enumerate(per_frame):
            value = _group_attr(frame, shared, sequence, keyword)
            if value is None or len(value) != count:
                raise SeriesGeometryError(path, f"frame {k + 1} lacks {what}")
            values.append([float(v) for v in value])
        out.append(np.asarray(values, dtype=np.float64).reshape(n_frames, count))
    while len(out) < 3:
        out.append(np.empty((n_frames, 0)))
    return out[0], out[1], out[2]


#: Attributes of the classic CT header that Enhanced CT keeps in functional groups instead
#: (or as AcquisitionDateTime).
_CLASSIC_ONLY = (
    "AcquisitionDate",
    "AcquisitionTime",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "KVP",
    "ConvolutionKernel",
    "WindowCenter",
    "WindowWidth",
)
#: Frame acquisition duration (ms) and plausible constant acquisition parameters of the
#: synthetic scanner: a helical chest protocol.
_FRAME_DURATION_MS = 50.0
_TUBE_CURRENT_MA = 100.0
_REVOLUTION_S = 0.5
_COLLIMATION_MM = (0.625, 40.0)
_PITCH = 1.0
_SOURCE_TO_DETECTOR_MM = 1085.6
_SOURCE_TO_CENTRE_MM = 595.0


def _item(**attributes: Any) -> Dataset:
    """A sequence item with the given keyword attributes; numbers (scalars or sequences) of
    Decimal String attributes become DS text of at most 16 characters, FD ones floats."""
    item = Dataset()
    for keyword, value in attributes.items():
        if isinstance(value, (float, np.ndarray)) or (
            isinstance(value, (list, tuple)) and value and isinstance(value[0], float)
        ):
            numbers = np.atleast_1d(np.asarray(value, dtype=np.float64))
            tag = tag_for_keyword(keyword)
            if tag is None:
                raise ValueError(f"{keyword!r} is not a DICOM keyword (pydicom's dictionary)")
            if dictionary_VR(tag) == "DS":
                value = _ds_values(numbers) if numbers.size > 1 else _ds_value(float(numbers[0]))
            else:
                value = [float(v) for v in numbers] if numbers.size > 1 else float(numbers[0])
        setattr(item, keyword, value)
    return item


def write_enhanced_ct(volume: Volume, path: str | Path, info: SeriesInfo | None = None) -> Path:
    """Write ``volume`` as one Enhanced CT Image Storage file (one frame per slice).

    The object follows the Enhanced CT Image IOD (PS3.3 A.38.1): the patient, study,
    series, frame of reference and equipment attributes of :func:`write_dicom_series`
    (same :class:`SeriesInfo`, same derived UIDs), the Enhanced CT Image, Multi-frame
    Functional Groups and Multi-frame Dimension modules, and the functional groups the
    IOD requires of an ORIGINAL image: pixel measures, plane orientation, frame anatomy,
    pixel value transformation (HU), frame VOI LUT, irradiation event, CT image frame
    type and the CT acquisition, table, position, geometry, reconstruction, exposure and
    X-ray groups (shared), plus frame content and plane position per frame. ImageType is
    ``ORIGINAL\\PRIMARY\\AXIAL\\NONE``, so scoring's default selection admits it.

    Args:
        volume: HU image ``(Z, Y, X)``; the z axis must be perpendicular to the (y, x)
            plane. Values are rounded to int16. Frame ``k`` is slice ``z = k``; a volume
            whose z runs along the slice normal (as medssl's readers return it) reads back
            identical through :func:`medssl.io.read_volume`.
        path: the file to write (its folder is created).
        info: patient / study / series attributes; the SOPInstanceUID derives from
            ``info.uid_seed``.

    Returns:
        ``path``.

    Raises:
        ValueError: a sheared grid (z not perpendicular to the slices).
    """
    info = info or SeriesInfo()
    direction = volume.direction
    normal = np.cross(direction[:, 2], direction[:, 1])
    if abs(abs(float(normal @ direction[:, 0])) - 1.0) > 1e-4:
        raise ValueError("volume z axis is not perpendicular to its slices; cannot write DICOM")
    hu = hu_int16(volume.array)
    n_frames, rows, columns = hu.shape
    sop_uid = derived_uid(info.uid_seed, "enhanced-ct")
    ds = _slice_dataset(info, 0)
    for keyword in _CLASSIC_ONLY:
        delattr(ds, keyword)
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    acquired = f"{info.study_date}{info.study_time}"
    # Enhanced General Equipment
    ds.DeviceSerialNumber = derived_uid(info.uid_seed, "device")[-16:]
    # Enhanced CT Image
    ds.AcquisitionDateTime = acquired
    ds.AcquisitionDuration = n_frames * _FRAME_DURATION_MS / 1000.0
    ds.ContentQualification = "RESEARCH"
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.AcquisitionContextSequence = []
    # Multi-frame Functional Groups and Dimension
    ds.NumberOfFrames = n_frames
    ds.Rows, ds.Columns = int(rows), int(columns)
    dimensions_uid = derived_uid(info.uid_seed, "dimension-organization")
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=dimensions_uid)]
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = [
        _item(
            DimensionOrganizationUID=dimensions_uid,
            DimensionIndexPointer=0x00209056,
            FunctionalGroupPointer=0x00209111,
            DimensionDescriptionLabel="Stack ID",
        ),
        _item(
            DimensionOrganizationUID=dimensions_uid,
            DimensionIndexPointer=0x00209057,
            FunctionalGroupPointer=0x00209111,
            DimensionDescriptionLabel="In-Stack Position",
        ),
    ]
    ds.SharedFunctionalGroupsSequence = [_shared_groups(volume, info)]
    ds.PerFrameFunctionalGroupsSequence = [
        _item(
            FrameContentSequence=[
                _item(
                    FrameAcquisitionDateTime=acquired,
                    FrameReferenceDateTime=acquired,
                    FrameAcquisitionDuration=_FRAME_DURATION_MS,
                    StackID="1",
                    InStackPositionNumber=z + 1,
                    DimensionIndexValues=[1, z + 1],
                )
            ],
            PlanePositionSequence=[_item(ImagePositionPatient=volume.index_to_world([z, 0, 0]))],
        )
        for z in range(n_frames)
    ]
    ds.PixelData = hu.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _shared_groups(volume: Volume, info: SeriesInfo) -> Dataset:
    """The Shared Functional Groups item: geometry, rescale and the CT acquisition groups."""
    direction = volume.direction
    spacing_z, spacing_y, spacing_x = (float(s) for s in volume.spacing)
    rows, columns = volume.shape[1:]
    centre = volume.index_to_world([(volume.shape[0] - 1) / 2, (rows - 1) / 2, (columns - 1) / 2])
    fov = max(rows * spacing_y, columns * spacing_x)
    exposure_ms = _REVOLUTION_S * 1000.0
    return _item(
        PixelMeasuresSequence=[
            _item(
                PixelSpacing=[spacing_y, spacing_x],
                SliceThickness=info.slice_thickness or spacing_z,
                SpacingBetweenSlices=spacing_z,
            )
        ],
        PlaneOrientationSequence=[
            _item(ImageOrientationPatient=[*direction[:, 2], *direction[:, 1]])
        ],
        FrameAnatomySequence=[
            _item(
                AnatomicRegionSequence=[
                    _item(CodeValue="51185008", CodingSchemeDesignator="SCT", CodeMeaning="Thorax")
                ],
                FrameLaterality="U",
            )
        ],
        PixelValueTransformationSequence=[
            _item(RescaleIntercept="0", RescaleSlope="1", RescaleType="HU")
        ],
        FrameVOILUTSequence=[_item(WindowCenter=info.window[0], WindowWidth=info.window[1])],
        IrradiationEventIdentificationSequence=[
            _item(IrradiationEventUID=derived_uid(info.uid_seed, "irradiation-event"))
        ],
        CTImageFrameTypeSequence=[
            _item(
                FrameType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"],
                PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE",
            )
        ],
        CTAcquisitionTypeSequence=[
            _item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO")
        ],
        CTAcquisitionDetailsSequence=[
            _item(
                DataCollectionDiameter=500.0,
                RevolutionTime=_REVOLUTION_S,
                SingleCollimationWidth=_COLLIMATION_MM[0],
                TotalCollimationWidth=_COLLIMATION_MM[1],
                TableHeight=150.0,
                GantryDetectorTilt=0.0,
                RotationDirection="CW",
            )
        ],
        CTTableDynamicsSequence=[
            _item(
                TableSpeed=_COLLIMATION_MM[1] * _PITCH / _REVOLUTION_S,
                TableFeedPerRotation=_COLLIMATION_MM[1] * _PITCH,
                SpiralPitchFactor=_PITCH,
            )
        ],
        CTPositionSequence=[
            _item(
                TablePosition=float(centre[2]),
                ReconstructionTargetCenterPatient=centre,
                DataCollectionCenterPatient=centre,
            )
        ],
        CTGeometrySequence=[
            _item(
                DistanceSourceToDetector=_SOURCE_TO_DETECTOR_MM,
                DistanceSourceToDataCollectionCenter=_SOURCE_TO_CENTRE_MM,
            )
        ],
        CTReconstructionSequence=[
            _item(
                ReconstructionAlgorithm="FILTER_BACK_PROJ",
                ConvolutionKernel=info.convolution_kernel,
                ConvolutionKernelGroup="LUNG",
                ReconstructionDiameter=fov,
                ReconstructionPixelSpacing=[spacing_y, spacing_x],
                ReconstructionAngle=360.0,
                ImageFilter="NONE",
            )
        ],
        CTExposureSequence=[
            _item(
                ExposureTimeInms=exposure_ms,
                XRayTubeCurrentInmA=_TUBE_CURRENT_MA,
                ExposureInmAs=_TUBE_CURRENT_MA * exposure_ms / 1000.0,
                ExposureModulationType="NONE",
                CTDIvol=3.0,
                CTDIPhantomTypeCodeSequence=[
                    _item(
                        CodeValue="113691",
                        CodingSchemeDesignator="DCM",
                        CodeMeaning="IEC Body Dosimetry Phantom",
                    )
                ],
            )
        ],
        CTXRayDetailsSequence=[
            _item(KVP=info.kvp, FocalSpots=[1.2], FilterType="BODY", FilterMaterial=["ALUMINUM"])
        ],
    )
