"""process_study: one received study in, the routed models' SR/SEG files out; the findings are
medssl-score's, bad series fail alone, runner failures are transient."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections import Counter
from pathlib import Path

import highdicom as hd
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

from medssl.errors import ModelRepositoryError, RunnerError
from medssl.io import write_dicom_series
from medssl.io.dicom_enhanced import write_enhanced_ct
from medssl.scoring import RunnerSpec, ScoreOptions, SelectionRules, score
from medssl.serving.config import RouteConfig
from medssl.serving.process import ModelSet, TransientError, process_study
from medssl.synth.chest import ChestConfig, generate_chest_ct
from medssl.synth.datasets import chest_series_info
from medssl.synth.organs import generate_organ_phantom
from tests.conftest import ORGAN_SHAPE
from tests.dicom_edits import copy_series
from tests.paths import MODEL_REPOSITORY

pytestmark = [pytest.mark.slow]

#: A finding's SCOORD3D group in our SRs (each finding also has a 2D point group first:
#: tests/medssl/dicom/test_sr_viewers.py).
POINT3D = hd.sr.GraphicTypeValues3D.POINT

#: The shipped detector: trained, so its scores spread and the route's threshold matters (the
#: random-weight ``exported_detector`` scores every box 0.0101).
REPOSITORY = MODEL_REPOSITORY
MODEL = "focalmix-nodules"
SEED = 5
ROUTE = RouteConfig(MODEL, min_probability=0.5)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    """One synthetic chest CT (64 x 64 x 40) written three ways into one study: a classic
    series (``good``), the same with a slice missing (``broken``), and one Enhanced CT file
    (``enhanced``), each in its own folder with its own SeriesInstanceUID."""
    case = generate_chest_ct(SEED, ChestConfig(matrix=64, n_slices=40))
    info = chest_series_info(SEED, case)
    study = {
        "study_uid": info.uid("study"),
        "frame_of_reference_uid": info.uid("frame_of_reference"),
    }
    root = tmp_path_factory.mktemp("study")
    write_dicom_series(case.volume, root / "good", info)
    broken = write_dicom_series(
        case.volume,
        root / "broken",
        dataclasses.replace(info, uid_seed=f"{info.uid_seed}-broken", series_number=2, **study),
    )
    broken[len(broken) // 2].unlink()
    write_enhanced_ct(
        case.volume,
        root / "enhanced" / "ct.dcm",
        dataclasses.replace(info, uid_seed=f"{info.uid_seed}-enhanced", series_number=3, **study),
    )
    return root


@pytest.fixture(scope="module")
def detector():
    models = ModelSet(REPOSITORY, [ROUTE], batch_size=2)
    yield models
    models.close()


def _series_uid(folder: Path) -> str:
    return str(pydicom.dcmread(_files(folder)[0], stop_before_pixels=True).SeriesInstanceUID)


def _points(sr_path: Path) -> np.ndarray:
    """The SR's findings: ``(n, 5)`` centre x, y, z (LPS mm), diameter (mm), probability."""
    report = hd.sr.MeasurementReport.from_sequence([hd.sr.srread(sr_path)])
    rows = []
    for group in report.get_planar_roi_measurement_groups(graphic_type=POINT3D):
        [diameter] = group.get_measurements(name=hd.sr.CodedConcept("81827009", "SCT", "Diameter"))
        [certainty] = group.get_measurements(
            name=hd.sr.CodedConcept("111012", "DCM", "Certainty of Finding")
        )
        rows.append([*group.roi.value[0], diameter.value, certainty.value / 100])
    return np.asarray(rows, dtype=np.float64).reshape(-1, 5)


def _columns(findings) -> np.ndarray:
    keys = ("x_mm", "y_mm", "z_mm", "diameter_mm", "probability")
    return np.asarray([[f[k] for k in keys] for f in findings], dtype=np.float64).reshape(-1, 5)


def test_sr_findings_equal_medssl_scores_on_the_same_series(
    chest, detector, tmp_path, dciodvfy, caplog
):
    good = chest / "good"
    with caplog.at_level(logging.INFO, logger="medssl.serving.process"):
        result = process_study(_files(good), [ROUTE], detector, tmp_path / "out")
    uid = _series_uid(good)
    [outcome] = result.series
    assert (outcome.key, outcome.model, outcome.status) == (uid, MODEL, "ok")
    [output] = result.outputs
    assert output.path == tmp_path / "out" / MODEL / uid / "sr.dcm"
    assert (output.kind, output.model, output.model_version, output.source_series_uid) == (
        "sr",
        MODEL,
        1,
        uid,
    )
    assert output.sop_instance_uid == pydicom.dcmread(output.path).SOPInstanceUID
    assert dciodvfy(output.path) == []
    assert set(result.timings) == {"read", "preprocess", "inference", "write"}
    assert all(t > 0 for t in result.timings.values())

    scored = tmp_path / "score"
    summary = score(good, scored, RunnerSpec(REPOSITORY, MODEL), options=ScoreOptions(workers=0))
    assert summary.counts == {"ok": 1}
    every = _columns(pq.read_table(scored / "findings.parquet").to_pylist())
    expected = every[every[:, 4] >= ROUTE.min_probability]
    assert 0 < len(expected) < len(every) and outcome.n_reported == len(expected)
    np.testing.assert_allclose(_points(output.path), expected, atol=1e-3)
    np.testing.assert_allclose(
        _columns([f.to_row() for f in outcome.reported]), expected, atol=1e-3
    )
    # the log names series by UID, never the patient
    patient = pydicom.dcmread(output.path)
    assert uid in caplog.text
    assert str(patient.PatientID) not in caplog.text
    assert str(patient.PatientName) not in caplog.text


def test_a_route_without_min_probability_reports_from_the_card_s_operating_point(
    chest, tmp_path, caplog
):
    """The card's threshold when the route sets none; an old card warns once
    at load and reports from 0.5."""
    from medssl.metrics.operating_point import OperatingPoint
    from medssl.models.card import CARD_FILE, load_card

    good = _files(chest / "good")
    route = RouteConfig(MODEL)  # no min_probability
    scored = score(
        chest / "good",
        tmp_path / "score",
        RunnerSpec(REPOSITORY, MODEL),
        options=ScoreOptions(workers=0),
    )
    assert scored.counts == {"ok": 1}
    every = _columns(pq.read_table(tmp_path / "score" / "findings.parquet").to_pylist())
    # the card's threshold lets one finding more through than the old cards' 0.5, so the two differ
    at_half = int((every[:, 4] >= 0.5).sum())
    threshold = float(np.sort(every[:, 4])[::-1][at_half])
    for card_op, folder in (
        (OperatingPoint(threshold, "fp_per_scan", 1.0, 0.8, 1.0, 4, 5), "new"),
        (None, "old"),
    ):
        shutil.copytree(REPOSITORY / MODEL, tmp_path / folder / MODEL)
        for path in (tmp_path / folder / MODEL).rglob(CARD_FILE):
            dataclasses.replace(load_card(path), operating_point=card_op).save(path)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="medssl.models.card"):
            models = ModelSet(tmp_path / folder, [route], batch_size=2)
        try:
            result = process_study(good, [route], models, tmp_path / folder / "out")
        finally:
            models.close()
        [outcome] = result.series
        expected = every[every[:, 4] >= (threshold if card_op else 0.5)]
        np.testing.assert_allclose(_points(result.outputs[0].path), expected, atol=1e-3)
        np.testing.assert_allclose(
            _columns([f.to_row() for f in outcome.reported]), expected, atol=1e-3
        )
        warned = [r.getMessage() for r in caplog.records if "no operating point" in r.getMessage()]
        assert len(warned) == (0 if card_op else 1)
    assert len(every[every[:, 4] >= threshold]) == at_half + 1
    assert f"model {MODEL} v1" in warned[0] and ">= 0.5" in warned[0]


def test_each_received_file_is_parsed_once_and_a_second_route_reads_its_own(
    chest, detector, tmp_path, monkeypatch
):
    """The datasets read to group and route the study are the ones the series is read from
    (pixel data deferred), and the writers reuse them: one dcmread per file. A second route on
    the same series reads the files again (the first one's datasets have had their pixel data
    dropped), so it still gets the same findings."""
    reads: Counter[str] = Counter()
    real = pydicom.dcmread

    def counting(path, *args, **kwargs):
        reads[str(path)] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    files = _files(chest / "good")
    result = process_study(files, [ROUTE], detector, tmp_path / "one")
    assert [o.status for o in result.series] == ["ok"]
    assert reads == Counter({str(f.absolute()): 1 for f in files})

    reads.clear()
    twice = process_study(files, [ROUTE, ROUTE], detector, tmp_path / "two")
    assert [o.status for o in twice.series] == ["ok", "ok"]
    assert twice.series[0].n_reported == twice.series[1].n_reported == result.series[0].n_reported
    assert reads == Counter({str(f.absolute()): 2 for f in files})


def test_a_study_whose_series_fail_selection_gives_no_outputs_with_the_reasons(
    chest, detector, tmp_path
):
    strict = dataclasses.replace(ROUTE, select=SelectionRules(min_slices=100))
    models = ModelSet(detector.repository, [strict])
    try:
        result = process_study(
            _files(chest / "good") + _files(chest / "enhanced"), [strict], models, tmp_path
        )
    finally:
        models.close()
    assert result.outputs == [] and _files(tmp_path) == []
    assert [(o.status, o.error, o.n_reported) for o in result.series] == [
        ("skipped", "40 slices, fewer than 100", None)
    ] * 2


def test_a_broken_series_fails_with_its_reason_and_the_good_one_goes_on(chest, detector, tmp_path):
    result = process_study(_files(chest), [ROUTE], detector, tmp_path)
    outcomes = {o.key: o for o in result.series}
    broken = outcomes[_series_uid(chest / "broken")]
    assert broken.status == "failed" and broken.error.startswith("MissingSliceError")
    assert outcomes[_series_uid(chest / "good")].status == "ok"
    assert outcomes[_series_uid(chest / "enhanced")].status == "ok"
    assert {o.source_series_uid for o in result.outputs} == {
        _series_uid(chest / "good"),
        _series_uid(chest / "enhanced"),
    }


def test_an_enhanced_ct_study_gives_a_valid_sr_with_a_companion_seg(
    chest, detector, tmp_path, dciodvfy
):
    """Same volume, same findings as the classic series; the companion SEG holds them."""
    companion = dataclasses.replace(ROUTE, companion_seg=True)
    models = ModelSet(detector.repository, [companion], batch_size=2)
    try:
        enhanced = process_study(_files(chest / "enhanced"), [companion], models, tmp_path / "e")
    finally:
        models.close()
    classic = process_study(_files(chest / "good"), [ROUTE], detector, tmp_path / "c")
    sr, seg = enhanced.outputs
    assert (sr.kind, seg.kind) == ("sr", "seg")
    assert seg.path.name == "findings-seg.dcm"
    assert dciodvfy(sr.path) == [] and dciodvfy(seg.path) == []
    np.testing.assert_allclose(_points(sr.path), _points(classic.outputs[0].path), atol=1e-3)
    segmentation = hd.seg.segread(seg.path)
    assert segmentation.number_of_segments == enhanced.series[0].n_reported
    report = hd.sr.MeasurementReport.from_sequence([hd.sr.srread(sr.path)])
    groups = report.get_planar_roi_measurement_groups(
        graphic_type=POINT3D
    )  # one per finding, tracked like its segment
    assert [g.tracking_uid for g in groups] == [
        segmentation.get_segment_description(i + 1).tracking_uid for i in range(len(groups))
    ]
    assert len(groups) == enhanced.series[0].n_reported


def test_a_runner_failure_is_transient(chest, detector, tmp_path, monkeypatch):
    from medssl.scoring import series

    def unreachable(*_):
        raise RunnerError("Triton http endpoint 127.0.0.1:1 is not reachable")

    monkeypatch.setattr(series, "detect_preprocessed", unreachable)
    with pytest.raises(TransientError, match=r"model 'focalmix-nodules' v1: RunnerError: Triton"):
        process_study(_files(chest / "good"), [ROUTE], detector, tmp_path)


def test_model_set_names_a_missing_model_and_is_ready_until_closed():
    with pytest.raises(ModelRepositoryError, match="no model 'lesions'"):
        ModelSet(REPOSITORY, [ROUTE, RouteConfig("lesions")])
    models = ModelSet(REPOSITORY, [ROUTE, dataclasses.replace(ROUTE, version=1)])
    assert models.ready()
    models.close()
    assert not models.ready()


def test_a_segmentation_route_gives_a_seg_with_every_frame_kept(
    exported_segmenter, tmp_path, dciodvfy
):
    case = generate_organ_phantom(11, "A", shape=ORGAN_SHAPE)
    files = write_dicom_series(case.image, tmp_path / "abdomen")
    # abdominal series are 4 mm thick; the default rules are the lung-screening ones
    route = RouteConfig(
        "organs", select=SelectionRules(max_thickness_mm=5.0, min_slices=16), dense_seg=True
    )  # empty frames are omitted by default
    models = ModelSet(exported_segmenter.repository, [route], batch_size=2)
    try:
        result = process_study(files, [route], models, tmp_path / "out")
    finally:
        models.close()
    [outcome] = result.series
    [output] = result.outputs
    assert outcome.status == "ok" and output.kind == "seg" and output.path.name == "seg.dcm"
    assert dciodvfy(output.path) == []
    seg = hd.seg.segread(output.path)
    labels = exported_segmenter.card.labels
    assert seg.number_of_segments == len(labels)
    assert seg.NumberOfFrames == ORGAN_SHAPE[0] * len(labels)  # empty frames kept
    assert [v.name for v in outcome.labels] == [label.name for label in labels]
    assert outcome.n_reported == sum(v.volume_ml > 0 for v in outcome.labels)


# -- poison series and implausible geometry -------------------------------------------------------

#: A route whose rules admit any series, so a malformed one is run and fails instead of skipped.
ANY = dataclasses.replace(
    ROUTE,
    select=SelectionRules(min_slices=1, orientation="", image_type=(), max_thickness_mm=100.0),
)


@pytest.fixture(scope="module")
def poisoned(chest, tmp_path_factory):
    """Next to the good 40-slice series: one instance of another series with a one-valued
    ImageOrientationPatient, one Enhanced CT file with an empty Shared Functional Groups
    Sequence, and two copies of the good series with PixelSpacing 1000 mm and 12 mm."""
    root = tmp_path_factory.mktemp("poisoned")
    good = chest / "good"
    copy_series(good, root / "one-valued", "one-valued", count=1, ImageOrientationPatient="1")
    enhanced = copy_series(
        chest / "enhanced", root / "empty-shared", "empty-shared", SharedFunctionalGroupsSequence=[]
    )
    copy_series(good, root / "huge", "huge", PixelSpacing=[1000.0, 1000.0])
    copy_series(good, root / "coarse", "coarse", PixelSpacing=[12.0, 12.0])
    assert len(enhanced) == 1
    return root


def test_a_poison_instance_fails_its_own_series_and_the_good_one_is_delivered(
    chest, poisoned, detector, tmp_path
):
    """A one-valued orientation (TypeError) or an empty shared group (IndexError) in another
    series' header sent the whole study to dead-letter after 3 attempts."""
    files = (
        _files(chest / "good") + _files(poisoned / "one-valued") + _files(poisoned / "empty-shared")
    )
    result = process_study(files, [ROUTE], detector, tmp_path / "default")
    outcomes = {o.key: o for o in result.series}
    good = _series_uid(chest / "good")
    assert outcomes.pop(good).status == "ok"
    assert [o.path.parent.name for o in result.outputs] == [good]
    assert {o.status for o in outcomes.values()} == {"skipped"}  # the default rules leave them out

    models = ModelSet(detector.repository, [ANY], batch_size=2)
    try:
        result = process_study(files, [ANY], models, tmp_path / "any")
    finally:
        models.close()
    outcomes = {o.key: o for o in result.series}
    assert outcomes.pop(good).status == "ok" and [o.source_series_uid for o in result.outputs] == [
        good
    ]
    one_valued = outcomes[_series_uid(poisoned / "one-valued")]
    assert one_valued.status == "failed"
    assert (
        one_valued.error.startswith("SeriesGeometryError") and "has 1 value(s)" in one_valued.error
    )
    empty = outcomes[_series_uid(poisoned / "empty-shared")]
    assert empty.status == "failed" and "frame 1 lacks plane position" in empty.error


def test_implausible_geometry_fails_fast_with_the_value_and_the_limit(
    chest, poisoned, detector, tmp_path
):
    """PixelSpacing 1000 mm asked for ~1.2 TiB (3 MemoryErrors, then dead-letter); 12 mm made a
    330 KB study take 57x as long. Both are refused from the headers; the good series goes on."""
    files = _files(chest / "good") + _files(poisoned / "huge") + _files(poisoned / "coarse")
    result = process_study(files, [ROUTE], detector, tmp_path)
    outcomes = {o.key: o for o in result.series}
    assert outcomes[_series_uid(chest / "good")].status == "ok"
    for name, value in (("huge", "1000 mm"), ("coarse", "12 mm")):
        outcome = outcomes[_series_uid(poisoned / name)]
        assert outcome.status == "failed" and outcome.error.startswith("ImplausibleGeometryError")
        assert f"PixelSpacing (row) is {value}, the limit is [0.05, 5] mm" in outcome.error
    # refused before reading pixels: the two bad series cost less than the good one
    assert result.timings["read"] < 5.0
