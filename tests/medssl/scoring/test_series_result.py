"""Scoring one series gives a typed SeriesResult: rows from to_row(), headers read once, one
Finding type, one prepare() and one parameter vocabulary for detection and segmentation."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medssl import Volume, affine_from_geometry
from medssl.finding import FINDING_ROW_COLUMNS, Finding
from medssl.io import SeriesInfo, write_dicom_series
from medssl.metrics.calibration import Calibration
from medssl.models import load_card
from medssl.pipeline import (
    DetectionParams,
    Intensity,
    PercentileIntensity,
    Preparation,
    SegmentationParams,
    prepare,
)
from medssl.scoring.manifest import ScanItem
from medssl.scoring.result import LabelVolume, SeriesResult, SeriesStatus
from medssl.scoring.series import DicomOutput, infer, prepare_series, skipped_result
from medssl.scoring.store import FINDING_COLUMNS, SERIES_COLUMNS
from tests.paths import DETECTOR_DIR

CARD_DIR = DETECTOR_DIR
SHAPE = (36, 90, 90)
SPACING = (2.0, 0.8, 0.8)


def _volume() -> Volume:
    hu = np.full(SHAPE, -1000.0, np.float32)
    hu[4:32, 10:80, 10:80] = 40.0  # a body
    return Volume(hu, affine_from_geometry((-36.0, -36.0, -36.0), SPACING))


@pytest.fixture(scope="module")
def dicom_item(tmp_path_factory) -> ScanItem:
    paths = write_dicom_series(_volume(), tmp_path_factory.mktemp("ct"), SeriesInfo(uid_seed="r"))
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return ScanItem(
        key=str(ds.SeriesInstanceUID),
        paths=tuple(str(p) for p in paths),
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        modality="CT",
        n_slices=len(paths),
    )


def _params() -> DetectionParams:
    """The shipped card's parameters with scores reported as the runner gives them."""
    params = load_card(CARD_DIR).detection_params(2)
    return dataclasses.replace(params, calibration=Calibration(), lung_mask=False)


def _runner(patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two boxes per window near its centre: one likely, one not."""
    b, w = len(patches), patches.shape[-1]
    c = (w - 1) / 2
    boxes = np.tile(np.array([[c, c, c, 6.0], [c - 3, c, c, 5.0]], np.float32), (b, 1, 1))
    return boxes, np.tile(np.array([0.9, 0.05], np.float32), (b, 1))


# -- headers are read once per series ----------------------------------------------------------


def test_scoring_a_dicom_series_reads_each_header_once(dicom_item, tmp_path, monkeypatch):
    """Read, SR and companion SEG all use the headers read with the pixels: one parse per file
    (the SR and SEG writers used to read every file again)."""
    reads: Counter[str] = Counter()
    real = pydicom.dcmread

    def counting(path, *args, **kwargs):
        reads[str(path)] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    card = load_card(CARD_DIR)
    params = _params()
    result = infer(
        prepare_series(dicom_item, params),
        _runner,
        card,
        params,
        DicomOutput(tmp_path, min_probability=0.5, companion_seg=True),
    )
    assert result.status is SeriesStatus.OK, result.error
    assert [w.kind for w in result.written] == ["sr", "seg"]
    assert reads == Counter(dict.fromkeys(dicom_item.paths, 1))


def test_the_written_sr_references_the_source_series(dicom_item, tmp_path):
    card = load_card(CARD_DIR)
    params = _params()
    result = infer(prepare_series(dicom_item, params), _runner, card, params, DicomOutput(tmp_path))
    [sr] = result.written
    ds = pydicom.dcmread(sr.path)
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    sources = {str(pydicom.dcmread(p).SOPInstanceUID) for p in dicom_item.paths}
    assert referenced == sources
    assert ds.SOPInstanceUID == sr.sop_instance_uid and ds.SOPClassUID == sr.sop_class_uid


# -- the result and its rows -----------------------------------------------------------------


def test_a_detection_result_gives_the_parquet_rows(dicom_item, tmp_path):
    card = load_card(CARD_DIR)
    params = _params()
    result = infer(
        prepare_series(dicom_item, params), _runner, card, params, DicomOutput(tmp_path, 0.5)
    )
    row = result.to_row()
    assert set(row) <= set(SERIES_COLUMNS)
    assert row["status"] == "ok" and row["report_threshold"] == 0.5
    assert row["n_findings"] == len(result.findings) == len(result.finding_rows()) > 0
    assert row["dicom_outputs"] == str(result.written[0].path)
    assert row["max_probability"] == max(f.probability for f in result.findings)
    rows = result.finding_rows()
    assert all(set(r) <= set(FINDING_COLUMNS) for r in rows)
    assert [r["passed"] for r in rows] == [f.probability >= 0.5 for f in result.findings]
    assert sum(r["passed"] for r in rows) == len(result.reported) == result.n_reported
    assert [Finding.from_row(r) for r in rows] == [
        Finding(
            centre_lps=f.centre_lps,
            diameter_mm=f.diameter_mm,
            probability=f.probability,
            series_uid=dicom_item.series_uid,
        )
        for f in result.findings
    ]
    json.dumps(row, allow_nan=False)  # what the store writes


def test_failed_and_skipped_results_keep_the_old_row_shape(dicom_item):
    card = load_card(CARD_DIR)
    skipped = skipped_result(dicom_item, card, "40 slices, fewer than 100").to_row()
    assert skipped == {
        "key": dicom_item.key,
        "patient_id": "",
        "study_uid": dicom_item.study_uid,
        "series_uid": dicom_item.series_uid,
        "status": "skipped",
        "error": "40 slices, fewer than 100",
        "model": card.name,
        "model_version": card.version,
        "n_slices": dicom_item.n_slices,
        "source": dicom_item.paths[0],
        "series_uid_absent": False,
    }
    failed = SeriesResult(
        dicom_item,
        card.name,
        card.version,
        "failed",
        "CorruptFileError: x",
        timings={"read": 0.5, "preprocess": 0.0, "write": 1.0},
    )
    assert failed.status is SeriesStatus.FAILED and failed.n_findings is None
    assert failed.to_row() == {
        **skipped,
        "status": "failed",
        "error": "CorruptFileError: x",
        "read_s": 0.5,
        "preprocess_s": 0.0,
    }


def test_a_segmentation_result_gives_one_row_per_label():
    item = ScanItem(key="case", paths=("/data/case.nii.gz",))
    result = SeriesResult(
        item,
        "organs",
        2,
        SeriesStatus.OK,
        labels=[LabelVolume(1, "liver", 1500.0), LabelVolume(2, "spleen", 0.0)],
        label_map=Path("/out/labels/case.nii.gz"),
        n_windows=4,
        n_windows_skipped=0,
    )
    assert result.to_row()["n_findings"] == result.n_reported == 1
    assert result.to_row()["label_map"] == "/out/labels/case.nii.gz"
    assert "report_threshold" not in result.to_row()
    assert result.finding_rows() == [
        {
            "key": "case",
            "series_uid": "case",
            "index": 1,
            "label": "liver",
            "volume_ml": 1500.0,
            "model": "organs",
            "model_version": 2,
        },
        {
            "key": "case",
            "series_uid": "case",
            "index": 2,
            "label": "spleen",
            "volume_ml": 0.0,
            "model": "organs",
            "model_version": 2,
        },
    ]


def test_a_finding_is_keyword_only_and_round_trips_through_its_row():
    with pytest.raises(TypeError):
        Finding((1.0, 2.0, 3.0), 5.0, 0.5)  # type: ignore[misc]
    with pytest.raises(ValueError, match="three numbers"):
        Finding(centre_lps=(1.0, 2.0))  # type: ignore[arg-type]
    f = Finding(centre_lps=np.array([1, 2, 3]), diameter_mm=5.0, probability=0.5, series_uid="s")
    assert f.centre_lps == (1.0, 2.0, 3.0) and set(f.to_row()) == set(FINDING_ROW_COLUMNS)
    assert Finding.from_row(f.to_row()) == f
    with pytest.raises(ValueError, match="diameter_mm"):
        Finding.from_row({"x_mm": 1, "y_mm": 2, "z_mm": 3, "probability": 0.5, "series_uid": ""})


# -- one prepare(), one vocabulary -------------------------------------------------------------


def test_prepare_takes_detection_and_segmentation_params_alike():
    volume = _volume()
    window = Intensity(-1000.0, 400.0, -1000.0)
    detection = DetectionParams(spacing_mm=1.0, normalisation=window, window=16, divisor=16)
    segmentation = SegmentationParams(
        spacing_mm=(1.0, 1.0, 1.0), normalisation=window, window=(8, 16, 16), n_classes=2
    )
    a = prepare(volume, detection)
    b = prepare(volume, segmentation)
    c = prepare(volume, Preparation(1.0, window))
    np.testing.assert_allclose(a.array, b.array, atol=1e-6)
    np.testing.assert_array_equal(a.array, c.array)
    np.testing.assert_allclose(a.affine, b.affine)
    assert a.array.dtype == np.float32 and float(a.array.min()) == -1.0
    # only the segmenter tiles the body alone: its box is recorded
    assert "body_box" in b.meta and "body_box" not in a.meta
    timings: dict[str, float] = {}
    prepare(volume, Preparation(1.0, PercentileIntensity()), timings)
    assert set(timings) == {"resample", "normalise"}


def test_detection_params_use_the_segmentation_vocabulary():
    p = DetectionParams(normalisation=Intensity(-1000.0, 400.0), window=64)
    assert p.window == (64, 64, 64)
    data = p.to_json()
    assert "intensity" not in data and data["window"] == [64, 64, 64]
    assert data["normalisation"] == {"hu_min": -1000.0, "hu_max": 400.0, "pad_hu": -1000.0}
    assert DetectionParams.from_json(json.loads(json.dumps(data))) == p


def test_detection_params_written_before_the_shared_vocabulary_still_read():
    old = {"intensity": {"hu_min": -1000.0, "hu_max": 400.0, "pad_hu": -1000.0}, "window": 64}
    p = DetectionParams.from_json(old)
    assert p.normalisation == Intensity(-1000.0, 400.0) and p.window == (64, 64, 64)
    with pytest.raises(ValueError, match="both 'normalisation' and its old name 'intensity'"):
        DetectionParams.from_json({**old, "normalisation": old["intensity"]})
    with pytest.raises(ValueError, match=r"DetectionParams.window must be .*divisible"):
        DetectionParams(window=(64, 64, 40))
