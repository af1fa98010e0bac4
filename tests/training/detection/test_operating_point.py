"""The operating point (issue 18 item 1): chosen on validation by a stated rule, carried by the
card, and applied by medssl-score --write-dicom (SR findings at or above it; findings.parquet
keeps every candidate with ``passed``), overridable, and old cards keep working with a warning."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from medssl.errors import ModelCardError
from medssl.finding import Finding
from medssl.metrics.operating_point import (
    OperatingPoint,
    OperatingPointError,
    OperatingRule,
    choose_operating_point,
    choose_threshold,
)
from medssl.models.card import CARD_FILE, LEGACY_REPORT_THRESHOLD, ModelCard, load_card
from tests.paths import ROOT

pytestmark = [pytest.mark.slow]

SHIPPED_WEIGHTS = ROOT / "benchmarks" / "assets" / "focalmix-nodules.pt"
#: The run fixture's validation calibration (Platt: sigmoid(1.5 logit p - 0.5)).
RUN_CALIBRATION = {"method": "platt", "a": 1.5, "b": -0.5}


def _point(**change) -> OperatingPoint:
    base = {
        "threshold": 0.6,
        "rule": "fp_per_scan",
        "target": 1.0,
        "validation_sensitivity": 0.75,
        "validation_fp_per_scan": 0.5,
        "n_scans": 4,
        "n_nodules": 8,
        "source": "test",
    }
    return OperatingPoint(**{**base, **change})


# -- choosing -----------------------------------------------------------------------------------


def test_fp_rule_takes_the_lowest_threshold_within_the_target_and_sensitivity_rule_the_highest():
    t = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    sens = np.array([0.2, 0.4, 0.6, 0.8, 0.9])
    fps = np.array([0.0, 0.5, 1.0, 1.5, 3.0])
    assert t[choose_threshold(t, sens, fps)] == 0.7  # FP/scan exactly at the target counts
    assert t[choose_threshold(t, sens, fps, rule="fp_per_scan", target=0.25)] == 0.9
    assert t[choose_threshold(t, sens, fps, rule="sensitivity", target=0.6)] == 0.7
    assert t[choose_threshold(t, sens, fps, rule=OperatingRule.SENSITIVITY, target=0.85)] == 0.5
    # candidates in any order give the same choice
    order = np.array([3, 0, 4, 2, 1])
    assert t[order][choose_threshold(t[order], sens[order], fps[order])] == 0.7


def test_edge_cases_no_fps_unreachable_targets_and_no_candidates():
    t = np.array([0.9, 0.4, 0.2])
    # no false positive at all: every candidate passes the FP rule, the lowest is chosen
    assert t[choose_threshold(t, np.array([0.5, 0.7, 1.0]), np.zeros(3))] == 0.2
    with pytest.raises(
        OperatingPointError, match=r"even the highest score \(0.9\) gives 2.000 FP/scan"
    ):
        choose_threshold(t, np.array([0.0, 0.5, 0.5]), np.array([2.0, 3.0, 4.0]), target=1.0)
    with pytest.raises(OperatingPointError, match="the most the marks reach is 0.500"):
        choose_threshold(t, np.array([0.0, 0.5, 0.5]), np.zeros(3), rule="sensitivity", target=0.9)
    with pytest.raises(OperatingPointError, match="marked nothing"):
        choose_threshold(np.zeros(0), np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match="rule must be one of.*'fp'"):
        choose_threshold(t, t, t, rule="fp")
    with pytest.raises(ValueError, match=r"'sensitivity' must be in \(0, 1\], got 1.5"):
        choose_threshold(t, t, t, rule="sensitivity", target=1.5)


def _marks():
    """Two scans, three nodules (one never hit), one excluded finding; LPS mm."""
    nodules = [
        Finding(series_uid="a", centre_lps=(0.0, 0.0, 0.0), diameter_mm=10.0),
        Finding(series_uid="a", centre_lps=(50.0, 0.0, 0.0), diameter_mm=10.0),
        Finding(series_uid="b", centre_lps=(0.0, 0.0, 0.0), diameter_mm=10.0),
    ]
    excluded = [Finding(series_uid="b", centre_lps=(80.0, 0.0, 0.0), diameter_mm=10.0)]
    marks = [
        Finding(series_uid="a", centre_lps=(0.5, 0.0, 0.0), probability=0.9),  # TP nodule a0
        Finding(series_uid="a", centre_lps=(100.0, 0.0, 0.0), probability=0.8),  # FP
        Finding(series_uid="b", centre_lps=(0.0, 0.5, 0.0), probability=0.7),  # TP nodule b0
        Finding(
            series_uid="b", centre_lps=(80.0, 0.0, 0.0), probability=0.65
        ),  # on the excluded finding: ignored
        Finding(series_uid="b", centre_lps=(-90.0, 0.0, 0.0), probability=0.6),  # FP
        Finding(series_uid="a", centre_lps=(0.0, 90.0, 0.0), probability=0.3),  # FP
        Finding(series_uid="c", centre_lps=(0.0, 0.0, 0.0), probability=0.95),
    ]  # a scan not listed: ignored
    return nodules, excluded, marks


def test_choose_operating_point_on_hand_made_luna16_marks():
    nodules, excluded, marks = _marks()
    # FP/scan: 0.5 from 0.8 down, 1.0 from 0.6, 1.5 at 0.3; sensitivity 2/3 from 0.7
    one = choose_operating_point(nodules, excluded, ["a", "b"], marks, source="unit")
    assert (one.threshold, one.validation_fp_per_scan) == (0.6, 1.0)
    assert one.validation_sensitivity == pytest.approx(2 / 3)
    assert (one.n_scans, one.n_nodules, one.rule, one.target, one.source) == (
        2,
        3,
        OperatingRule.FP_PER_SCAN,
        1.0,
        "unit",
    )
    half = choose_operating_point(
        nodules, excluded, ["a", "b"], marks, rule="fp_per_scan", target=0.5
    )
    # 0.65 (the mark on the excluded finding) keeps 0.5 FP/scan: the lowest such candidate
    assert (half.threshold, half.validation_fp_per_scan) == (0.65, 0.5)
    sens = choose_operating_point(
        nodules, excluded, ["a", "b"], marks, rule="sensitivity", target=0.6
    )
    assert (sens.threshold, sens.validation_fp_per_scan) == (0.7, 0.5)
    with pytest.raises(OperatingPointError, match="no predictions on the 2 validation scans"):
        choose_operating_point(nodules, excluded, ["a", "b"], [marks[-1]])
    with pytest.raises(OperatingPointError, match="the most the marks reach is 0.667"):
        choose_operating_point(nodules, excluded, ["a", "b"], marks, rule="sensitivity", target=1.0)


# -- the card -----------------------------------------------------------------------------------


def test_operating_point_json_round_trips_and_names_bad_keys():
    point = _point()
    assert OperatingPoint.from_json(json.loads(json.dumps(point.to_json()))) == point
    with pytest.raises(ValueError, match=r"unknown keys \['treshold'\]"):
        OperatingPoint.from_json({**point.to_json(), "treshold": 0.5})
    with pytest.raises(ValueError, match=r"missing keys \['n_nodules'\]"):
        OperatingPoint.from_json({k: v for k, v in point.to_json().items() if k != "n_nodules"})
    with pytest.raises(ValueError, match="threshold must be a probability in"):
        _point(threshold=1.5)


def test_the_card_carries_the_operating_point_and_an_old_card_loads_without_one(
    exported_detector, tmp_path
):
    card = dataclasses.replace(exported_detector.card, operating_point=_point(threshold=0.42))
    (tmp_path / "new").mkdir()
    saved = json.loads(card.save(tmp_path / "new" / CARD_FILE).read_text())
    assert (
        saved["operating_point"]["threshold"] == 0.42
        and saved["operating_point"]["rule"] == "fp_per_scan"
    )
    loaded = load_card(tmp_path / "new")
    assert loaded == card and loaded.report_threshold() == (0.42, "operating_point")
    from medssl.metrics.calibration import Calibration

    platt = Calibration.from_json(RUN_CALIBRATION)
    with_calibration = dataclasses.replace(
        card, decoding=dataclasses.replace(card.decoding, calibration=platt)
    )
    assert (
        ModelCard.from_json(json.loads(json.dumps(with_calibration.to_json()))) == with_calibration
    )
    assert with_calibration.detection_params().calibration == platt
    assert loaded.report_threshold(0.8) == (0.8, "override")
    del saved["operating_point"]  # a card written before cards carried one
    (tmp_path / "old").mkdir()
    del saved["decoding"]["calibration"]  # nor a calibration: the identity
    (tmp_path / "old" / CARD_FILE).write_text(json.dumps(saved))
    old = load_card(tmp_path / "old")
    assert old.decoding.calibration.is_identity
    assert old.operating_point is None and old.report_threshold() == (
        LEGACY_REPORT_THRESHOLD,
        "legacy_default",
    )
    saved["operating_point"] = {**card.operating_point.to_json(), "rule": "youden"}
    (tmp_path / "old" / CARD_FILE).write_text(json.dumps(saved))
    with pytest.raises(ModelCardError, match="'operating_point'.*rule must be one of"):
        load_card(tmp_path / "old")


def test_a_segmentation_card_refuses_an_operating_point():
    from medssl.models.card import LUNG, MORPHOLOGICALLY_ABNORMAL_STRUCTURE, Label, TensorSpec
    from medssl.pipeline.preprocess import Intensity

    card = ModelCard(
        name="organs",
        version=1,
        task="segmentation",
        input=TensorSpec("image", "FP32", (1, 16, 16, 16)),
        outputs=(TensorSpec("logits", "FP32", (2, 16, 16, 16)),),
        max_batch_size=1,
        input_spacing=(1.0, 1.0, 1.0),
        normalisation=Intensity(-1000.0, 400.0),
        overlap=0.5,
        labels=(Label(1, "Lung", MORPHOLOGICALLY_ABNORMAL_STRUCTURE, LUNG),),
    )
    with pytest.raises(ValueError, match="'operating_point' is for detection cards only"):
        dataclasses.replace(card, operating_point=_point())
    with pytest.raises(
        ValueError, match="segmentation model, not a detector|has no report threshold"
    ):
        card.report_threshold()


# -- export: measured again with the exported model on the run's validation scans --------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A medssl-train run folder of the shipped weights: ``checkpoints/best.pt`` (provenance
    ``data`` = a 3-scan synthetic LUNA16 folder), ``split.json`` (all 3 validate) and the
    training-time ``validation/operating_point.json`` and ``calibration.json``."""
    torch = pytest.importorskip("torch")
    from medssl.cli.main import cli
    from medssl.datasets.luna16 import Luna16
    from medssl.datasets.splits import Split, write_split

    root = tmp_path_factory.mktemp("op-run")
    made = CliRunner().invoke(
        cli,
        [
            "synth",
            "chest",
            "--cases",
            "3",
            "--matrix",
            "96",
            "--slices",
            "48",
            "--seed",
            "11",
            str(root / "luna16"),
        ],
    )
    assert made.exit_code == 0, made.output
    state = torch.load(SHIPPED_WEIGHTS, weights_only=False)
    state["provenance"] = {**state.get("provenance", {}), "data": str(root / "luna16")}
    (root / "run" / "checkpoints").mkdir(parents=True)
    torch.save(state, root / "run" / "checkpoints" / "best.pt")
    uids = Luna16(root / "luna16").seriesuids
    write_split(Split(0, 0, len(uids), [], [], uids), root / "run" / "split.json")
    (root / "run" / "validation").mkdir()
    (root / "run" / "validation" / "operating_point.json").write_text(
        json.dumps(_point(threshold=0.77, source="medssl-train").to_json())
    )
    (root / "run" / "validation" / "calibration.json").write_text(
        json.dumps({"calibration": RUN_CALIBRATION})
    )
    return root / "run"


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    from medssl.export import ExportOptions, export_checkpoint
    from medssl.models.triton_config import ServingOptions

    repository = tmp_path_factory.mktemp("op-repository")
    return export_checkpoint(
        run,
        repository,
        "nodules",
        ExportOptions(max_batch_size=2, serving=ServingOptions(kind="cpu")),
    )


def test_export_chooses_the_operating_point_with_the_exported_model_on_validation(exported, run):
    from medssl.datasets.luna16 import Luna16
    from medssl.metrics import froc_at_thresholds
    from medssl.metrics.calibration import Calibration
    from medssl.pipeline.detect import detect_preprocessed
    from medssl.pipeline.preprocess import prepare
    from medssl.runners.onnx import OnnxRunner

    point = load_card(exported.model_dir).operating_point
    assert point is not None and point == exported.card.operating_point
    # the card's decoding carries the run's calibration; the point is on calibrated probabilities
    assert load_card(exported.model_dir).decoding.calibration == Calibration.from_json(
        RUN_CALIBRATION
    )
    assert point.rule is OperatingRule.FP_PER_SCAN and point.target == 1.0 and point.n_scans == 3
    assert "onnxruntime" in point.source and "split.json" in point.source
    # independently: the exported model's marks on the three scans, the FROC at the chosen
    # threshold, and one candidate lower is beyond 1 FP/scan (or there is none lower)
    luna = Luna16(run.parent / "luna16")
    params = exported.card.detection_params()
    runner = OnnxRunner(exported.onnx_path, exported.card)
    marks = [
        Finding(series_uid=u, centre_lps=d.centre_lps, probability=d.probability)
        for u in luna.seriesuids
        for d in detect_preprocessed(prepare(luna.scan(u), params), runner, params).detections
    ]
    scores = np.unique([m.probability for m in marks])
    assert point.threshold in scores
    sens, fps = froc_at_thresholds(
        luna.annotations(), luna.excluded(), luna.seriesuids, marks, [point.threshold]
    )
    assert (sens[0], fps[0]) == pytest.approx(
        (point.validation_sensitivity, point.validation_fp_per_scan)
    )
    assert fps[0] <= 1.0
    lower = scores[scores < point.threshold]
    if len(lower):
        _, fps_lower = froc_at_thresholds(
            luna.annotations(), luna.excluded(), luna.seriesuids, marks, [lower.max()]
        )
        assert fps_lower[0] > 1.0


def test_export_names_what_is_missing_and_takes_the_run_s_point_when_asked(
    run, tmp_path, detector_checkpoint
):
    from medssl.cli.export import export
    from medssl.errors import ExportError
    from medssl.export import ExportOptions, export_checkpoint

    with pytest.raises(
        ExportError, match="not in a medssl-train run folder.*--operating-point-from-run"
    ):
        export_checkpoint(detector_checkpoint, tmp_path / "repo", "m")
    gone = tmp_path / "gone"
    shutil.copytree(run, gone)
    import torch

    state = torch.load(gone / "checkpoints" / "best.pt", weights_only=False)
    state["provenance"]["data"] = str(tmp_path / "deleted-luna16")
    torch.save(state, gone / "checkpoints" / "best.pt")
    with pytest.raises(
        ExportError, match=r"deleted-luna16.*is gone; it holds the 3 validation scans"
    ):
        export_checkpoint(gone, tmp_path / "repo", "m")
    assert not (tmp_path / "repo").exists()  # checked before anything is written
    result = CliRunner().invoke(
        export,
        [
            str(gone),
            "--repository",
            str(tmp_path / "repo"),
            "--name",
            "m",
            "--kind",
            "cpu",
            "--operating-point-from-run",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert load_card(tmp_path / "repo" / "m").operating_point == _point(
        threshold=0.77, source="medssl-train"
    )
    assert json.loads(result.output)["operating_point"]["threshold"] == 0.77
    bad = CliRunner().invoke(
        export,
        [
            str(gone),
            "--repository",
            str(tmp_path / "r2"),
            "--name",
            "m",
            "--op-rule",
            "sensitivity",
        ],
    )
    assert bad.exit_code == 2 and "--op-rule sensitivity needs --op-target" in bad.output
    with pytest.raises(ExportError, match="'sensitivity' must be in"):
        ExportOptions(op_rule="sensitivity", op_target=2.0)


def test_export_chooses_the_operating_point_on_other_scans_when_given_them(run, tmp_path):
    # --op-data: scans of the deployment geometry instead of the run's validation split
    from medssl.cli.export import export
    from medssl.cli.main import cli
    from medssl.errors import ExportError
    from medssl.export import ExportOptions, export_checkpoint
    from medssl.models.triton_config import ServingOptions

    other = tmp_path / "whole-chests"
    made = CliRunner().invoke(
        cli,
        [
            "synth",
            "chest",
            "--cases",
            "2",
            "--matrix",
            "96",
            "--slices",
            "48",
            "--seed",
            "40",
            str(other),
        ],
    )
    assert made.exit_code == 0, made.output
    with pytest.raises(ExportError, match="operating-point data: .*no subset"):
        export_checkpoint(run, tmp_path / "r0", "m", ExportOptions(op_data=tmp_path))
    assert not (tmp_path / "r0").exists()  # checked before anything is written
    with pytest.raises(ExportError, match="op_data .* needs operating_point='validation'"):
        ExportOptions(op_data=other, operating_point="run")
    result = export_checkpoint(
        run,
        tmp_path / "repo",
        "m",
        ExportOptions(max_batch_size=2, serving=ServingOptions(kind="cpu"), op_data=other),
    )
    point = load_card(result.model_dir).operating_point
    assert (
        point.n_scans == 2
        and f"every scan of {other}" in point.source
        and "split.json" not in point.source
    )
    bad = CliRunner().invoke(
        export,
        [
            str(run),
            "--repository",
            str(tmp_path / "r2"),
            "--name",
            "m",
            "--op-data",
            str(other),
            "--no-operating-point",
        ],
    )
    assert bad.exit_code == 2 and "--op-data" in bad.output


# -- scoring: the Acceptance "Card" check ------------------------------------------------------


@pytest.fixture(scope="module")
def dicom_archive(tmp_path_factory) -> Path:
    from medssl.cli.main import cli

    root = tmp_path_factory.mktemp("op-archive") / "chest"
    made = CliRunner().invoke(
        cli,
        [
            "synth",
            "chest",
            "--cases",
            "3",
            "--format",
            "dicom",
            "--matrix",
            "96",
            "--slices",
            "48",
            "--seed",
            "21",
            str(root),
        ],
    )
    assert made.exit_code == 0, made.output
    return root


def _sr_probabilities(path: Path) -> list[float]:
    report = hd.sr.MeasurementReport.from_sequence([hd.sr.srread(path)])
    groups = report.get_planar_roi_measurement_groups(graphic_type=hd.sr.GraphicTypeValues3D.POINT)
    certainty = hd.sr.CodedConcept("111012", "DCM", "Certainty of Finding")
    return sorted(g.get_measurements(name=certainty)[0].value / 100 for g in groups)


def _score(archive: Path, repository: Path, out: Path, *extra: str):
    from medssl.cli.score import score

    return CliRunner().invoke(
        score,
        [
            str(archive),
            "--repository",
            str(repository),
            "--model",
            "nodules",
            "--out",
            str(out),
            "--workers",
            "0",
            "--write-dicom",
            *extra,
        ],
    )


def _check_run(out: Path, threshold: float, source: str) -> None:
    """Every candidate in findings.parquet with ``passed``; each SR holds exactly the passed
    ones."""
    series = pq.read_table(out / "series.parquet").to_pylist()
    findings = pq.read_table(out / "findings.parquet").to_pylist()
    assert len(series) == 3 and all(s["status"] == "ok" for s in series)
    assert all(
        s["report_threshold"] == threshold and s["threshold_source"] == source for s in series
    )
    assert all(f["passed"] == (f["probability"] >= threshold) for f in findings)
    assert any(not f["passed"] for f in findings), (
        "no candidate below the threshold: the test shows nothing"
    )
    for s in series:
        mine = [f for f in findings if f["key"] == s["key"]]
        assert len(mine) == s["n_findings"]  # every candidate is kept
        kept = sorted(f["probability"] for f in mine if f["passed"])
        np.testing.assert_allclose(_sr_probabilities(Path(s["dicom_outputs"])), kept, atol=1e-3)


def test_score_write_dicom_reports_only_findings_at_or_above_the_card_s_operating_point(
    exported, dicom_archive, tmp_path, caplog
):
    threshold = exported.card.operating_point.threshold
    with caplog.at_level(logging.WARNING, logger="medssl.models.card"):
        result = _score(dicom_archive, exported.repository, tmp_path / "card")
    assert result.exit_code == 0, result.output
    assert "no operating point" not in caplog.text
    _check_run(tmp_path / "card", threshold, "operating_point")
    # --sr-threshold overrides it
    result = _score(
        dicom_archive, exported.repository, tmp_path / "override", "--sr-threshold", "0.9"
    )
    assert result.exit_code == 0, result.output
    _check_run(tmp_path / "override", 0.9, "override")


def test_an_old_card_without_operating_point_still_scores_from_0_5_with_one_warning(
    exported, dicom_archive, tmp_path, caplog
):
    repository = tmp_path / "repository"
    shutil.copytree(exported.model_dir, repository / "nodules")
    for path in (repository / "nodules").rglob(CARD_FILE):
        data = json.loads(path.read_text())
        del data["operating_point"]
        path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="medssl.models.card"):
        result = _score(dicom_archive, repository, tmp_path / "old")
    assert result.exit_code == 0, result.output
    warnings = [r.getMessage() for r in caplog.records if "no operating point" in r.getMessage()]
    assert len(warnings) == 1 and "model nodules v1" in warnings[0] and ">= 0.5" in warnings[0]
    _check_run(tmp_path / "old", 0.5, "legacy_default")


def test_the_uid_content_key_uses_the_threshold_in_effect(exported, dicom_archive, tmp_path):
    """An SR at the card's threshold equals one with that threshold set, and differs from one at
    another threshold (the settings that feed the UIDs hold the threshold in effect)."""
    import pydicom

    from medssl.finding import Finding
    from medssl.io.dicom_series import load_dicom_series
    from medssl.scoring.manifest import build_manifest
    from medssl.scoring.series import DicomOutput, Prepared, _write_sr

    item = build_manifest(dicom_archive).items[0]
    found = [
        Finding(
            centre_lps=(0.0, 0.0, 0.0),
            diameter_mm=6.0,
            probability=0.8,
            centre_voxel=(10.0, 40.0, 40.0),
        ),
        Finding(
            centre_lps=(5.0, 0.0, 0.0),
            diameter_mm=6.0,
            probability=0.3,
            centre_voxel=(10.0, 40.0, 45.0),
        ),
    ]
    prepared = Prepared(item, None, headers=load_dicom_series(list(item.paths)).headers)

    def uid(card: ModelCard, folder: str, **output) -> str:
        [written] = _write_sr(prepared, found, card, DicomOutput(tmp_path / folder, **output))
        return str(pydicom.dcmread(written.path).SOPInstanceUID)

    at_07 = dataclasses.replace(exported.card, operating_point=_point(threshold=0.7))
    at_02 = dataclasses.replace(exported.card, operating_point=_point(threshold=0.2))
    at_025 = dataclasses.replace(exported.card, operating_point=_point(threshold=0.25))
    assert uid(at_07, "a") == uid(at_02, "b", min_probability=0.7)
    assert uid(at_02, "c") != uid(at_025, "d")  # the same two findings, another threshold


# -- end of training: calibration and the operating point on validation -----------------------


def test_end_of_training_writes_the_validation_operating_point_and_the_test_report_at_it(tmp_path):
    torch = pytest.importorskip("torch")
    from medssl.config import config_from_dict
    from medssl.metrics import froc_at_thresholds, read_predictions, write_predictions
    from medssl.metrics.calibration import Calibration
    from medssl.synth.datasets import write_chest_dataset
    from medssl.training.cache import VolumeCache
    from medssl.training.detection.config import DetectionExperiment
    from medssl.training.detection.eval import TorchDetectionRunner, detection_params, predict
    from medssl.training.detection.operating import write_operating_point
    from medssl.training.detection.scans import split_luna16
    from medssl.training.networks.detector import FPNDetector

    write_chest_dataset(
        tmp_path / "luna16", cases=4, matrix=96, n_slices=48, seed=31
    )  # subsets 0..3
    state = torch.load(SHIPPED_WEIGHTS, weights_only=False)
    cfg = config_from_dict(DetectionExperiment, state["config"])
    net = FPNDetector(cfg.model, cfg.anchors)
    net.load_state_dict(state["model"])
    split = split_luna16(tmp_path / "luna16", 1, 0, (3,), 2, 0)
    cache = VolumeCache(
        tmp_path / "cache", cfg.data.spacing_mm, detection_params(cfg).normalisation
    )
    run = tmp_path / "run"
    (run / "test").mkdir(parents=True)
    test_volumes = {u: cache.get(u, split.source(u).load) for u in split.test}
    write_predictions(
        run / "test" / "submission.csv",
        predict(TorchDetectionRunner(net, cfg.window), test_volumes, detection_params(cfg)),
    )
    report: dict = {"cpm": 0.5}
    point = write_operating_point(net, split, cache, cfg, torch.device("cpu"), run, report)

    assert point is not None and point.n_scans == 2 and point.rule is OperatingRule.FP_PER_SCAN
    assert (
        OperatingPoint.from_json(
            json.loads((run / "validation" / "operating_point.json").read_text())
        )
        == point
    )
    calibration = json.loads((run / "validation" / "calibration.json").read_text())
    assert calibration["n_true_positives"] > 0, "the shipped weights find validation nodules"
    assert calibration["calibration"]["method"] == "platt" and "ece_calibrated" in calibration
    assert (run / "validation" / "reliability.png").stat().st_size > 0
    # the point holds for the calibrated validation marks
    marks = read_predictions(run / "validation" / "submission.csv")
    nodules = [f for u in split.validation for f in split.nodules(u)]
    excluded = [f for u in split.validation for f in split.luna.excluded(u)]
    sens, fps = froc_at_thresholds(nodules, excluded, split.validation, marks, [point.threshold])
    assert (sens[0], fps[0]) == pytest.approx(
        (point.validation_sensitivity, point.validation_fp_per_scan)
    )
    assert point.threshold in {m.probability for m in marks} and fps[0] <= 1.0
    # the test report, in memory and on disk, at the validation threshold (calibrated test marks)
    at = report["at_validation_operating_point"]
    assert (
        json.loads((run / "test" / "cpm.json").read_text())["at_validation_operating_point"] == at
    )
    fitted = Calibration.from_json(calibration["calibration"])
    test_marks = [
        Finding(
            series_uid=m.series_uid,
            centre_lps=m.centre_lps,
            probability=float(fitted.apply(m.probability)),
        )
        for m in read_predictions(run / "test" / "submission.csv")
    ]
    test_nodules = [f for u in split.test for f in split.nodules(u)]
    test_excluded = [f for u in split.test for f in split.luna.excluded(u)]
    sens, fps = froc_at_thresholds(
        test_nodules, test_excluded, split.test, test_marks, [point.threshold]
    )
    assert (at["sensitivity"], at["fp_per_scan"]) == pytest.approx((sens[0], fps[0]))
    assert at["marks_per_scan"] == sum(m.probability >= point.threshold for m in test_marks) / len(
        split.test
    )


def test_sr_threshold_needs_write_dicom_and_a_probability(tmp_path):
    from medssl.cli.score import score

    alone = CliRunner().invoke(
        score, [str(tmp_path), "--out", str(tmp_path / "o"), "--sr-threshold", "0.7"]
    )
    assert alone.exit_code == 2 and "use it with --write-dicom" in alone.output
    wrong = CliRunner().invoke(
        score,
        [str(tmp_path), "--out", str(tmp_path / "o"), "--write-dicom", "--sr-threshold", "1.5"],
    )
    assert wrong.exit_code == 2 and "1.5" in wrong.output


def test_the_card_carries_the_lung_mask_setting_of_the_training_config(
    tmp_path, detector_checkpoint
):
    """A detector evaluated with eval.lung_mask scores with it too: the card's decoding carries
    it to the pipeline; an older card (no key) runs without."""
    torch = pytest.importorskip("torch")
    from medssl.export import ExportOptions, export_checkpoint

    state = torch.load(detector_checkpoint, weights_only=False)
    state["config"]["eval"]["lung_mask"] = True
    torch.save(state, tmp_path / "masked.pt")
    card = export_checkpoint(
        tmp_path / "masked.pt",
        tmp_path / "repo",
        "m",
        ExportOptions(max_batch_size=1, operating_point="none"),
    ).card
    assert card.decoding.lung_mask and card.detection_params().lung_mask
    data = card.to_json()
    assert ModelCard.from_json(data) == card
    del data["decoding"]["lung_mask"], data["decoding"]["lung_margin_mm"]
    assert not ModelCard.from_json(data).detection_params().lung_mask


def test_series_table_reports_lung_mask_skips_and_the_no_lung_warning(
    exported, dicom_archive, tmp_path
):
    """A card that restricts detection to the lungs: series.parquet says how many windows the
    mask skipped and how long it took, and a volume without lungs is scored whole with the
    pipeline's warning in the ``warning`` column (not silently)."""
    from medssl.io import write_volume
    from medssl.volume import Volume

    repository = tmp_path / "repository"
    shutil.copytree(exported.model_dir, repository / "nodules")
    for path in (repository / "nodules").rglob(CARD_FILE):
        data = json.loads(path.read_text())
        data["decoding"]["lung_mask"] = True
        path.write_text(json.dumps(data))
    result = _score(dicom_archive, repository, tmp_path / "chest")
    assert result.exit_code == 0, result.output
    chest = pq.read_table(tmp_path / "chest" / "series.parquet").to_pylist()
    assert len(chest) == 3 and all(s["status"] == "ok" and s["warning"] is None for s in chest)
    assert all(s["lung_mask_s"] > 0 and 0 <= s["n_windows_skipped"] < s["n_windows"] for s in chest)
    water = np.zeros((40, 64, 64), dtype=np.float32)  # soft tissue only: no lung anywhere
    write_volume(Volume(water, np.diag([2.0, 1.5, 1.5, 1.0])), tmp_path / "water" / "water.nii.gz")
    from medssl.cli.score import score

    (tmp_path / "water.txt").write_text(f"{tmp_path / 'water' / 'water.nii.gz'}\n")
    result = CliRunner().invoke(
        score,
        [
            str(tmp_path / "water.txt"),
            "--repository",
            str(repository),
            "--model",
            "nodules",
            "--out",
            str(tmp_path / "out"),
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    (row,) = pq.read_table(tmp_path / "out" / "series.parquet").to_pylist()
    assert row["status"] == "ok" and row["n_windows_skipped"] == 0 and row["n_windows"] > 0
    assert "lung" in row["warning"]
