"""Result writers on what real archives hold: patient and study values that are invalid (birth date
``00000000``, study date ``20230231``) and series without a Frame of Reference UID (LIDC-style)
still give valid SRs and SEGs.

Each output is checked with dciodvfy (0 errors) and read back with highdicom.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from medssl import Volume, affine_from_geometry
from medssl.dicom.seg import write_detection_seg, write_label_seg
from medssl.dicom.sr import write_detection_sr
from medssl.finding import Finding
from medssl.io import SeriesInfo, write_dicom_series
from medssl.models import load_card
from tests.paths import DETECTOR_DIR

#: A finding's SCOORD3D group in our SRs (each finding also has a 2D point group first:
#: tests/medssl/dicom/test_sr_viewers.py).
POINT3D = hd.sr.GraphicTypeValues3D.POINT

CARD_DIR = DETECTOR_DIR
SHAPE = (6, 24, 24)
NAME = "Doe Jane"  # no "^": highdicom's name check would log it


@pytest.fixture(scope="module")
def card():
    return load_card(CARD_DIR)


def _volume() -> Volume:
    return Volume(
        np.zeros(SHAPE, np.float32), affine_from_geometry((-12.0, -12.0, -6.0), (2.0, 1.0, 1.0))
    )


def _series(folder: Path, **values: str | None) -> list[pydicom.Dataset]:
    """A CT series written by medssl's writer, then given ``values`` (keyword -> value; None
    deletes the attribute) as an archive would hold them; its headers."""
    info = SeriesInfo(uid_seed=folder.name, patient_name=NAME, patient_birth_date="19580214")
    paths = write_dicom_series(_volume(), folder, info)
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in values.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def _outputs(folder: Path, source: list[pydicom.Dataset], card) -> list[Path]:
    """SR with companion SEG, SR without findings, label SEG (BINARY) of ``source``."""
    volume = _volume()
    found = [
        Finding(
            centre_lps=tuple(float(c) for c in volume.index_to_world(np.array([3.0, 12.0, 12.0]))),
            diameter_mm=6.0,
            probability=0.9,
            centre_voxel=(3.0, 12.0, 12.0),
        )
    ]
    seg_path, seg = write_detection_seg(
        source, found, card, volume.affine, SHAPE, folder / "findings-seg.dcm"
    )
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:4, 8:14, 8:14] = 1
    return [
        write_detection_sr(source, found, card, folder / "sr.dcm", companion_seg=seg),
        seg_path,
        write_detection_sr(source, [], card, folder / "absent.dcm"),
        write_label_seg(source, labels, card, folder / "seg.dcm"),
    ]


def _read_back(path: Path):
    ds = pydicom.dcmread(path)
    return hd.seg.segread(path) if ds.Modality == "SEG" else hd.sr.srread(path)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # a birth date of zeros is no DA (dciodvfy: error): left empty; the others copied
        ({"PatientBirthDate": "00000000"}, {"PatientBirthDate": "", "StudyDate": "20250101"}),
        # a day the calendar lacks, in valid DA syntax: copied as received (the PACS matches it)
        ({"StudyDate": "20230231"}, {"StudyDate": "20230231", "PatientBirthDate": "19580214"}),
        # an invalid time, an unknown sex, a two-valued name: left empty
        (
            {"StudyTime": "256199", "PatientSex": "Q", "PatientName": "A\\B"},
            {"StudyTime": "", "PatientSex": "", "PatientName": "", "PatientBirthDate": "19580214"},
        ),
        # Type 2 attributes an anonymiser removed: present and empty (highdicom needs them)
        (
            {
                "PatientBirthDate": None,
                "PatientSex": None,
                "StudyTime": None,
                "AccessionNumber": None,
                "StudyID": None,
                "ReferringPhysicianName": None,
            },
            {
                "PatientBirthDate": "",
                "PatientSex": "",
                "StudyTime": "",
                "AccessionNumber": "",
                "StudyID": "",
                "ReferringPhysicianName": "",
            },
        ),
    ],
)
def test_invalid_patient_and_study_values_never_fail_the_writers(
    tmp_path, card, dciodvfy, values, expected, caplog
):
    source = _series(tmp_path / "ct", **{"StudyDate": "20250101", **values})
    with caplog.at_level(logging.DEBUG):
        paths = _outputs(tmp_path, source, card)
    for path in paths:
        assert dciodvfy(path) == [], path.name
        output = _read_back(path)
        for keyword, value in expected.items():
            assert keyword in output and str(output.get(keyword) or "") == value, (
                path.name,
                keyword,
            )
        assert output.PatientID == source[0].PatientID
        assert output.StudyInstanceUID == source[0].StudyInstanceUID
    assert NAME not in caplog.text and "Doe" not in caplog.text  # no name reached a log


def test_valid_values_are_copied_as_received(tmp_path, card, dciodvfy):
    source = _series(
        tmp_path / "ct",
        StudyDate="20250101",
        StudyTime="101500",
        ReferringPhysicianName="Roe^Richard",
    )
    for path in _outputs(tmp_path, source, card):
        output = _read_back(path)
        for keyword in (
            "PatientName",
            "PatientBirthDate",
            "PatientSex",
            "StudyDate",
            "StudyTime",
            "ReferringPhysicianName",
            "PatientID",
            "AccessionNumber",
            "StudyID",
        ):
            received = str(source[0].get(keyword, ""))
            assert str(output.get(keyword, "")) == received, (path.name, keyword)


def test_the_received_datasets_are_not_changed(tmp_path):
    from medssl.dicom.source import output_source
    from medssl.dicom.uids import frame_of_reference_uid

    source = _series(tmp_path / "ct", FrameOfReferenceUID=None, PatientBirthDate="00000000")
    prepared = output_source(source)
    assert "FrameOfReferenceUID" not in source[0] and source[0].PatientBirthDate == "00000000"
    assert prepared.derived_frame_of_reference
    assert all(
        ds.FrameOfReferenceUID == frame_of_reference_uid(source[0].SeriesInstanceUID)
        for ds in prepared.datasets
    )


@pytest.mark.parametrize("missing", ["absent", "blank"])
def test_a_series_without_frame_of_reference_gets_outputs_in_a_derived_one(
    tmp_path, card, dciodvfy, missing
):
    """LIDC-style slices: SR and SEGs are written, valid, and share one derived frame of
    reference that names the series (not the source's, which it lacks)."""
    from medssl.dicom.uids import frame_of_reference_uid

    source = _series(tmp_path / "ct", FrameOfReferenceUID=None if missing == "absent" else "")
    assert not source[0].get("FrameOfReferenceUID")
    paths = _outputs(tmp_path, source, card)
    derived = frame_of_reference_uid(source[0].SeriesInstanceUID)
    for path in paths:
        assert dciodvfy(path) == [], path.name
    sr, seg_path, _, label_path = paths
    report = hd.sr.MeasurementReport.from_sequence([hd.sr.srread(sr)])
    [group] = report.get_planar_roi_measurement_groups(graphic_type=POINT3D)
    assert group.roi.ReferencedFrameOfReferenceUID == derived
    for path in (seg_path, label_path):
        seg = hd.seg.segread(path)
        assert seg.FrameOfReferenceUID == derived
        mask = seg.get_pixels_by_source_instance(
            [ds.SOPInstanceUID for ds in source],
            segment_numbers=[1],
            assert_missing_frames_are_empty=True,
        )
        assert mask.any()
    assert derived != frame_of_reference_uid("1.2.3")


@pytest.mark.parametrize("charset", [["", "ISO 2022 IR 87"], "ISO_IR 999"])
def test_character_sets_highdicom_refuses_give_utf8_outputs_with_the_same_text(
    tmp_path, card, dciodvfy, charset
):
    """A Japanese archive's code-extension set (first value empty: valid DICOM, refused by
    highdicom) and an unknown term: the outputs are UTF-8 and hold the received name."""
    name = "Yamada^Tarou=山田^太郎=やまだ^たろう" if isinstance(charset, list) else "Doe^Jane"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom: unknown character set, default used
        source = _series(tmp_path / "ct", SpecificCharacterSet=charset, PatientName=name)
    for path in _outputs(tmp_path, source, card):
        assert dciodvfy(path) == [], path.name
        output = _read_back(path)
        assert output.SpecificCharacterSet == "ISO_IR 192"
        assert str(output.PatientName) == str(source[0].PatientName) == name


def test_identifiers_are_kept_as_received_and_invalid_descriptive_values_dropped(
    tmp_path, card, dciodvfy
):
    """An over-long PatientID is what the PACS files the study under: copied as it is (the one
    dciodvfy error, which the source has too); an invalid PatientAge and an over-long
    StudyDescription (Type 3) are left out rather than copied."""
    source = _series(
        tmp_path / "ct", PatientID="P" * 70, PatientAge="45", StudyDescription="x" * 80
    )
    for path in _outputs(tmp_path, source, card):
        errors = dciodvfy(path)
        assert errors and all("Patient ID" in e or "invalid data values" in e for e in errors)
        output = pydicom.dcmread(path)
        assert output.PatientID == "P" * 70
        assert "PatientAge" not in output and "StudyDescription" not in output
