"""Probability calibration: Platt / temperature fits, ECE and the reliability diagram."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit, logit

from medssl.metrics.calibration import (
    Calibration,
    expected_calibration_error,
    fit_calibration,
    reliability_bins,
    reliability_diagram,
)


def miscalibrated_sample(
    n: int, a: float, b: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Scores p ~ U(0.01, 0.99) of a model whose true P(y=1 | p) is sigmoid(a logit p + b)."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.01, 0.99, n)
    y = (rng.random(n) < expit(a * logit(p) + b)).astype(np.int64)
    return p, y


def ece_by_loop(p: np.ndarray, y: np.ndarray, n_bins: int) -> float:
    """The textbook ECE written independently: bins (k/M, (k+1)/M], 0 in the first."""
    total = 0.0
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        members = [i for i in range(len(p)) if (lo < p[i] <= hi) or (k == 0 and p[i] == 0.0)]
        if not members:
            continue
        acc = sum(y[i] for i in members) / len(members)
        conf = sum(p[i] for i in members) / len(members)
        total += len(members) / len(p) * abs(acc - conf)
    return total


def test_platt_fit_recovers_the_slope_and_offset_of_a_known_miscalibration_and_lowers_ece():
    p, y = miscalibrated_sample(40_000, 2.0, 0.5)
    fitted = fit_calibration(p, y, method="platt")
    assert fitted.method == "platt"
    assert fitted.a == pytest.approx(2.0, abs=0.08)
    assert fitted.b == pytest.approx(0.5, abs=0.05)
    before = expected_calibration_error(p, y)
    after = expected_calibration_error(fitted.apply(p), y)
    assert before > 0.05
    assert after < 0.02 and after < before / 4


def test_temperature_fit_recovers_the_temperature_and_keeps_b_zero():
    p, y = miscalibrated_sample(40_000, 0.5, 0.0, seed=1)
    fitted = fit_calibration(p, y, method="temperature")
    assert fitted.b == 0.0
    assert fitted.temperature == pytest.approx(2.0, rel=0.06)
    assert expected_calibration_error(fitted.apply(p), y) < expected_calibration_error(p, y) / 3


def test_a_perfectly_calibrated_sample_has_ece_near_zero_and_fits_near_identity():
    p, y = miscalibrated_sample(50_000, 1.0, 0.0, seed=2)
    assert expected_calibration_error(p, y) < 0.015
    fitted = fit_calibration(p, y)
    assert fitted.a == pytest.approx(1.0, abs=0.05) and fitted.b == pytest.approx(0.0, abs=0.05)


@pytest.mark.parametrize("n_bins", [1, 7, 10, 15])
def test_ece_matches_an_independent_loop_including_scores_on_bin_edges(n_bins):
    rng = np.random.default_rng(3)
    p = np.concatenate([rng.random(300), [0.0, 0.1, 0.2, 0.5, 1.0, 0.3, 0.7]])
    y = (rng.random(len(p)) < p**2).astype(int)
    assert expected_calibration_error(p, y, n_bins) == pytest.approx(
        ece_by_loop(p, y, n_bins), abs=1e-12
    )


def test_reliability_bins_put_scores_on_an_edge_in_the_lower_bin():
    counts, confidence, accuracy = reliability_bins(
        np.array([0.0, 0.1, 0.1000001, 1.0]), np.array([0, 1, 0, 1]), 10
    )
    assert counts.tolist() == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    assert accuracy[0] == 0.5 and np.isnan(confidence[5])


def test_calibration_is_monotone_elementwise_and_round_trips_through_json():
    cal = Calibration(method="platt", a=1.7, b=-0.4)
    p = np.linspace(0, 1, 101).reshape(101, 1)
    out = cal.apply(p)
    assert out.shape == p.shape
    assert np.all(np.diff(out.ravel()) > 0)
    assert Calibration.from_json(cal.to_json()) == cal
    assert Calibration.from_json({}) == Calibration()


def test_the_identity_leaves_scores_exactly_as_they_are():
    p = np.array([0.0, 1e-9, 0.25, 1.0])
    np.testing.assert_array_equal(Calibration().apply(p), p)


def test_fit_refuses_labels_of_one_class_and_names_the_problem():
    with pytest.raises(ValueError, match="both classes.*all 5 labels are 0"):
        fit_calibration(np.full(5, 0.3), np.zeros(5))


@pytest.mark.parametrize(
    "probabilities, labels, match",
    [
        ([0.2, 1.2], [0, 1], r"in \[0, 1\].*1.2"),
        ([0.2, np.nan], [0, 1], "finite"),
        ([0.2, 0.3], [0, -1], "0 or 1.*-1"),
        ([0.2, 0.3], [0, 1, 1], r"\(N,\)"),
        ([], [], "empty"),
    ],
)
def test_fit_and_ece_reject_bad_inputs_naming_them(probabilities, labels, match):
    with pytest.raises(ValueError, match=match):
        fit_calibration(np.asarray(probabilities, float), np.asarray(labels))
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(np.asarray(probabilities, float), np.asarray(labels))


def test_a_fit_that_would_invert_the_ranking_is_refused():
    p, y = miscalibrated_sample(2_000, -1.5, 0.0, seed=4)
    with pytest.raises(ValueError, match="a=.*<= 0"):
        fit_calibration(p, y)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "isotonic"}, "method"),
        ({"method": "platt", "a": 0.0}, "a must be > 0"),
        ({"method": "platt", "a": float("inf")}, "finite"),
        ({"method": "temperature", "a": 2.0, "b": 0.1}, "b = 0"),
        ({"method": "identity", "a": 2.0}, "identity"),
    ],
)
def test_invalid_calibrations_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Calibration(**kwargs)


def test_reliability_diagram_writes_a_png(tmp_path):
    p, y = miscalibrated_sample(2_000, 2.0, 0.5)
    out = reliability_diagram(p, y, tmp_path / "sub" / "reliability.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- in the detection pipeline --------------------------------------------------------------


def test_detections_report_the_calibrated_probability_in_the_raw_score_order():
    from medssl.pipeline import detect
    from tests.medssl.pipeline.test_pipeline_detect import BLOBS, BlobRunner, blob_volume, params

    volume, _ = blob_volume(BLOBS)
    extra = [((16.0, 16.0, 16.0), 6.0, 0.3), ((8.0, 8.0, 24.0), 5.0, 0.6)]
    cal = Calibration(method="platt", a=2.0, b=0.5)
    raw = detect(volume, BlobRunner(extra=extra), params(max_detections=50)).detections
    calibrated = detect(
        volume, BlobRunner(extra=extra), params(max_detections=50, calibration=cal)
    ).detections
    assert len(calibrated) == len(raw) > 2
    assert [d.centre_lps for d in calibrated] == [d.centre_lps for d in raw]  # same NMS, same order
    assert [d.score for d in calibrated] == [d.probability for d in raw]
    for d in calibrated:
        assert d.probability == pytest.approx(float(expit(2.0 * logit(d.score) + 0.5)))
    assert all(d.score == d.probability for d in raw)  # the identity by default


def test_the_score_threshold_stays_on_the_raw_score():
    from medssl.pipeline import detect
    from tests.medssl.pipeline.test_pipeline_detect import BLOBS, BlobRunner, blob_volume, params

    volume, _ = blob_volume(BLOBS)
    lift = Calibration(method="platt", a=1.0, b=4.0)  # raw 0.05 -> 0.74
    found = detect(
        volume, BlobRunner(junk_score=0.05), params(score_threshold=0.1, calibration=lift)
    ).detections
    assert len(found) == len(BLOBS)
    assert all(d.score >= 0.1 for d in found)
