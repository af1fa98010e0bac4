"""benchmarks/detector_quality.py: which inference switches make rows, the --variant option,
and one scan scored end to end with the shipped model through the scoring pipeline."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from benchmarks.detector_quality import (
    ROOT,
    Variant,
    _false_marks,
    _resumed,
    _uncalibrated,
    false_marks_per_scan,
    inference_ablations,
    parse_variant,
    prepare_data,
    score_variant,
    sensitivity_by_group,
    size_group,
)
from medssl.finding import Finding
from medssl.metrics.calibration import Calibration
from medssl.pipeline.detect import DetectionParams

SHIPPED = ROOT / "model_repository" / "focalmix-nodules"


def test_inference_rows_switch_the_cards_own_settings() -> None:
    plain = DetectionParams()
    assert inference_ablations(plain) == {"lung mask on": {"lung_mask": True}}
    fitted = replace(plain, lung_mask=True, calibration=Calibration(method="platt", a=0.5, b=-1.0))
    assert inference_ablations(fitted) == {"lung mask off": {"lung_mask": False}}


def test_uncalibrated_scores_are_recovered_exactly() -> None:
    raw = np.linspace(0.01, 0.99, 25)
    calibration = Calibration(method="platt", a=0.5, b=-1.0)
    np.testing.assert_allclose(
        _uncalibrated(calibration.apply(raw), calibration.a, calibration.b), raw, rtol=1e-9
    )


def test_variant_needs_a_model_folder(tmp_path: Path) -> None:
    assert parse_variant(f"no hard negatives={SHIPPED}") == ("no hard negatives", SHIPPED)
    with pytest.raises(argparse.ArgumentTypeError, match="no medssl.json"):
        parse_variant(f"x={tmp_path}")
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=PATH"):
        parse_variant(str(SHIPPED))


def test_generated_test_set_is_checked_against_how_it_was_made(tmp_path: Path) -> None:
    data = tmp_path / "heldout"
    made = prepare_data(data, cases=1, matrix=64)
    assert made["family"] == "heldout"
    assert json.loads((data / "benchmark_data.json").read_text()) == made
    with pytest.raises(SystemExit, match="was generated with"):
        prepare_data(data, cases=2, matrix=64)


def test_one_scan_scored_through_the_scoring_pipeline(tmp_path: Path) -> None:
    data = tmp_path / "heldout"
    prepare_data(data, cases=1, matrix=64)
    row = score_variant(
        Variant("shipped", SHIPPED, {}),
        data,
        threads=1,
        batch_size=2,
        n_bootstrap=20,
        reliability=tmp_path / "r.png",
    )
    assert row["n_scans"] == 1 and row["n_nodules"] >= 1
    assert 0 <= row["cpm"] <= 1 and 0 <= row["ece"] <= 1
    assert row["windows_per_scan"] >= 1 and row["seconds_per_scan"] > 0
    assert (
        0 <= row["marks_per_scan"] <= 100 and 0 < row["n_marks_labelled"] <= 100
    )  # the card: max_detections 100
    # the false marks are among the reported ones: no more than them, and no more than the labelled
    # false marks
    assert 0 <= row["false_marks_per_scan_max"] <= row["marks_per_scan_max"]
    assert row["false_marks_per_scan_median"] <= row["n_marks_labelled"] - row["n_true_marks"]
    assert (
        _false_marks(row)
        == f"{row['false_marks_per_scan_median']:g} ({row['false_marks_per_scan_max']})"
    )
    assert _false_marks({"name": "old row"}) == "—"
    assert {"kind", "location"} <= set(
        row["sensitivity_at_operating_point_by"]
    )  # from the data's truth.csv
    assert 0 <= row["sensitivity_at_operating_point"] <= 1
    assert (tmp_path / "r.png").is_file()


def test_resume_keeps_rows_of_the_same_test_set_and_refuses_another(tmp_path: Path) -> None:
    meta = {"data": "/d", "matrix": 512, "generator_family": "heldout", "smoke": False}
    results = tmp_path / "q.json"
    assert _resumed(results, meta) == ([], None)
    results.write_text(
        json.dumps({"meta": {**meta, "n_scans": 40}, "rows": [{"name": "shipped"}], "peer": None})
    )
    assert _resumed(results, meta) == ([{"name": "shipped"}], None)
    with pytest.raises(SystemExit, match="another test set"):
        _resumed(results, {**meta, "matrix": 128})


def test_sensitivity_by_group_counts_the_nodules_each_reported_mark_finds() -> None:
    uids = ["a", "b"]
    nodules = [
        Finding(series_uid="a", centre_lps=(0.0, 0.0, 0.0), diameter_mm=10.0),
        Finding(series_uid="a", centre_lps=(50.0, 0.0, 0.0), diameter_mm=10.0),
        Finding(series_uid="b", centre_lps=(0.0, 0.0, 0.0), diameter_mm=5.9),
    ]
    truth = [{"kind": "solid"}, {"kind": "ground-glass"}, {"kind": "solid"}]
    marks = [
        Finding(
            series_uid="a", centre_lps=(1.0, 0.0, 0.0), probability=0.9
        ),  # finds a's solid nodule
        Finding(
            series_uid="a", centre_lps=(50.0, 1.0, 0.0), probability=0.2
        ),  # a's ground-glass one, below the threshold
        Finding(series_uid="b", centre_lps=(90.0, 0.0, 0.0), probability=0.8),
    ]  # a false mark
    out = sensitivity_by_group(nodules, truth, [], uids, marks, threshold=0.5)
    assert out["all"] == {"all": [pytest.approx(1 / 3), 3]}
    assert out["kind"] == {"ground-glass": [0.0, 1], "solid": [0.5, 2]}
    assert out["size"] == {
        "< 6 mm": [0.0, 1],
        "8-15 mm": [0.5, 2],
    }  # Lung-RADS cut points; empty groups left out
    assert sensitivity_by_group(nodules, [], [], uids, marks, threshold=0.1) == {
        "all": {"all": [pytest.approx(2 / 3), 3]},
        "size": {"< 6 mm": [0.0, 1], "8-15 mm": [1.0, 2]},
    }


def test_size_groups_are_half_open_at_the_lung_rads_cut_points() -> None:
    assert [size_group(d) for d in (3.0, 5.99, 6.0, 7.9, 8.0, 14.9, 15.0, 30.0)] == [
        "< 6 mm",
        "< 6 mm",
        "6-8 mm",
        "6-8 mm",
        "8-15 mm",
        "8-15 mm",
        ">= 15 mm",
        ">= 15 mm",
    ]


def test_truth_columns_follow_the_annotations(tmp_path: Path) -> None:
    from medssl.datasets.luna16 import Luna16

    data = tmp_path / "heldout"
    prepare_data(data, cases=1, matrix=64)
    luna = Luna16(data)
    uid = luna.seriesuids[0]
    truth = luna.nodule_truth(uid)
    assert len(truth) == len(luna.annotations(uid)) >= 1
    assert {"kind", "location"} <= set(truth[0])
    (data / "truth.csv").write_text("seriesuid,label,kind,location\nother,1,solid,free\n")
    with pytest.raises(Exception, match="do not follow"):
        luna.nodule_truth()


def test_false_marks_count_only_reported_marks_that_hit_no_nodule() -> None:
    marks = [
        Finding(series_uid="a", centre_lps=(0.0, 0.0, 0.0), probability=0.9),
        Finding(series_uid="a", centre_lps=(9.0, 0.0, 0.0), probability=0.8),
        Finding(series_uid="a", centre_lps=(5.0, 0.0, 0.0), probability=0.7),
        Finding(series_uid="b", centre_lps=(0.0, 0.0, 0.0), probability=0.1),
        Finding(series_uid="b", centre_lps=(1.0, 0.0, 0.0), probability=0.6),
    ]
    passed = [True, True, True, False, True]
    labels = np.array(
        [1, 0, -1, 0, 0]
    )  # a true mark, a false one, one on an excluded finding; b: below, false
    assert false_marks_per_scan(marks, passed, labels, ["a", "b", "c"]) == [1, 1, 0]
