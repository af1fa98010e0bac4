"""What benchmarks and operating points need from the LUNA16 evaluation: a paired bootstrap of
ΔCPM over scans, the label of every candidate, and sensitivity / FP-per-scan at thresholds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medssl.errors import EvaluationInputError
from medssl.finding import Finding
from medssl.metrics import (
    FP_RATES,
    bootstrap_sensitivities,
    evaluate_luna16,
    froc_at_thresholds,
    label_candidates,
    order_statistic_interval,
    paired_bootstrap_cpm,
    paired_bootstrap_sensitivities,
)
from tests.medssl.metrics.test_metrics_luna16 import random_case

# --- paired bootstrap ----------------------------------------------------------------------


def graded_systems(n_scans: int = 40, seed: int = 0, constant: bool = True):
    """Scans of very different difficulty; system "b" hits a scan-dependent share of its 4
    nodules, system "a" hits one more nodule on every scan (``constant``), or 1 to all of
    the nodules b misses (not ``constant``).

    Both have 2 FPs per scan scored below every hit, so sensitivity is flat in FP/scan.
    With ``constant``: per-scan hits of a = hits of b + 1, so CPM(a) - CPM(b) =
    n_scans / n_nodules = 1/4 on every resample of the scans.
    """
    rng = np.random.default_rng(seed)
    uids = [f"7.{i}" for i in range(n_scans)]
    nodules, a, b = [], [], []
    for uid in uids:
        found_by_b = int(rng.integers(0, 4))  # 0..3 of 4
        found_by_a = found_by_b + (1 if constant else int(rng.integers(1, 5 - found_by_b)))
        for k in range(4):
            nodules.append(
                Finding(series_uid=uid, centre_lps=(100.0 * k, 0.0, 0.0), diameter_mm=10.0)
            )
            if k < found_by_b:
                b.append(Finding(series_uid=uid, centre_lps=(100.0 * k, 1.0, 0.0), probability=0.9))
            if k < found_by_a:
                a.append(Finding(series_uid=uid, centre_lps=(100.0 * k, 1.0, 0.0), probability=0.9))
        for j in range(2):
            for system in (a, b):
                system.append(
                    Finding(
                        series_uid=uid,
                        centre_lps=(50.0 + 100.0 * j, 80.0, 0.0),
                        probability=0.1 + 0.01 * j,
                    )
                )
    return nodules, uids, a, b


def evaluated(nodules, uids, predictions, **kw):
    return evaluate_luna16(nodules, [], uids, predictions, n_bootstrap=0, **kw)


def test_identical_systems_differ_by_exactly_zero():
    annotations, excluded, predictions, uids = random_case(1)
    a = evaluate_luna16(annotations, excluded, uids, predictions, n_bootstrap=0)
    b = evaluate_luna16(annotations, excluded, uids, list(reversed(predictions)), n_bootstrap=0)
    diff = paired_bootstrap_cpm(a, b, n_bootstrap=300)
    assert diff.delta == 0.0 and diff.ci == (0.0, 0.0)
    assert diff.p_value == 1.0 and diff.fraction_not_positive == 1.0
    assert (diff.n_scans, diff.n_bootstrap, diff.cpm_definition) == (20, 300, "interpolated")
    assert diff.to_json()["ci"] == [0.0, 0.0]


def test_a_system_better_on_every_scan_has_an_interval_above_zero():
    nodules, uids, a, b = graded_systems(constant=False)
    ra, rb = evaluated(nodules, uids, a), evaluated(nodules, uids, b)
    diff = paired_bootstrap_cpm(ra, rb, n_bootstrap=500, seed=3)
    assert diff.delta == pytest.approx(ra.cpm - rb.cpm) and diff.delta > 0.25
    assert (diff.cpm_a, diff.cpm_b) == (ra.cpm, rb.cpm)
    lo, hi = diff.ci
    assert 0 < lo < diff.delta < hi
    assert diff.fraction_not_positive == 0.0
    assert diff.p_value == pytest.approx(2 / 501)  # (1 + 0) / (B + 1), two-sided
    reverse = paired_bootstrap_cpm(rb, ra, n_bootstrap=500, seed=3)
    assert reverse.delta == -diff.delta and reverse.ci == pytest.approx((-hi, -lo))


def test_the_bootstrap_is_paired_the_interval_is_much_narrower_than_independent_draws():
    # a and b share each scan's difficulty: resampling the same scans for both cancels it,
    # resampling them independently does not.
    nodules, uids, a, b = graded_systems()
    ra, rb = evaluated(nodules, uids, a), evaluated(nodules, uids, b)
    paired = paired_bootstrap_cpm(ra, rb, n_bootstrap=400, seed=0)
    independent = []
    for result, seed in ((ra, 1), (rb, 2)):
        v = result.vectors
        (samples,) = bootstrap_sensitivities(
            v.is_tp,
            v.probabilities,
            v.missed,
            v.scan_index,
            v.n_scans,
            n_bootstrap=400,
            rng=np.random.default_rng(seed),
        )
        independent.append(samples.mean(axis=1))
    lo, hi = order_statistic_interval(independent[0] - independent[1], 0.95)
    assert hi - lo > 0.1  # about 0.25: the spread of scan difficulty
    assert paired.ci == pytest.approx((0.25, 0.25), abs=1e-12)


def test_the_paired_draws_are_the_single_system_draws_for_each_system():
    annotations, excluded, predictions, uids = random_case(2)
    a = evaluate_luna16(annotations, excluded, uids, predictions, n_bootstrap=0).vectors
    b = evaluate_luna16(annotations, excluded, uids, predictions[::2], n_bootstrap=0).vectors
    sens_a, sens_b = paired_bootstrap_sensitivities(
        a, b, n_bootstrap=20, rng=np.random.default_rng(5), points=FP_RATES
    )
    for vectors, paired in ((a, sens_a), (b, sens_b)):
        (alone,) = bootstrap_sensitivities(
            vectors.is_tp,
            vectors.probabilities,
            vectors.missed,
            vectors.scan_index,
            vectors.n_scans,
            n_bootstrap=20,
            rng=np.random.default_rng(5),
        )
        np.testing.assert_array_equal(paired, alone)


def test_the_paired_bootstrap_reads_the_results_cpm_definition():
    nodules, uids, a, b = graded_systems(n_scans=12)
    for definition in ("interpolated", "grid"):
        ra = evaluated(nodules, uids, a, cpm_definition=definition)
        rb = evaluated(nodules, uids, b, cpm_definition=definition)
        diff = paired_bootstrap_cpm(ra, rb, n_bootstrap=50)
        assert diff.cpm_definition == definition
        assert diff.delta == pytest.approx(ra.cpm - rb.cpm)


def test_a_paired_comparison_refuses_results_it_cannot_pair():
    nodules, uids, a, b = graded_systems(n_scans=6)
    ra = evaluated(nodules, uids, a)
    with pytest.raises(ValueError, match="same order; got the same scans in another order"):
        paired_bootstrap_cpm(ra, evaluated(nodules, uids[::-1], b))
    with pytest.raises(ValueError, match=r"only in a: \['7.5'\]"):
        paired_bootstrap_cpm(ra, evaluated(nodules, uids[:5], b))
    with pytest.raises(ValueError, match=r"a: 'interpolated', b: 'grid'"):
        paired_bootstrap_cpm(ra, evaluated(nodules, uids, b, cpm_definition="grid"))
    without_vectors = evaluated(nodules, uids, b)
    object.__setattr__(without_vectors, "vectors", None)
    with pytest.raises(ValueError, match="result b has no per-scan FROC vectors"):
        paired_bootstrap_cpm(ra, without_vectors)
    with pytest.raises(ValueError, match="n_bootstrap must be >= 1, got 0"):
        paired_bootstrap_cpm(ra, ra, n_bootstrap=0)
    with pytest.raises(ValueError, match=r"confidence must lie in \(0, 1\), got 95"):
        paired_bootstrap_cpm(ra, ra, confidence=95)


# --- candidate labels and thresholds ---------------------------------------------------------


def test_every_candidate_gets_its_luna16_label_in_input_order():
    # s1: nodule N (10 mm) at the origin, excluded E at x=40 (-1: 10 mm), and 102 far marks
    # whose lowest three (tied at .05) fall to the cap. s2 is not listed.
    nodule, excluded = (
        Finding(series_uid="s1", centre_lps=(0, 0, 0), diameter_mm=10.0),
        Finding(series_uid="s1", centre_lps=(40, 0, 0), diameter_mm=-1.0),
    )
    predictions = [
        Finding(
            series_uid="s1", centre_lps=(1, 0, 0), probability=0.5
        ),  # hits N, not its best mark: still 1
        Finding(series_uid="s1", centre_lps=(41, 0, 0), probability=0.99),  # only on E: -1
        Finding(series_uid="s2", centre_lps=(0, 0, 0), probability=0.9),  # unlisted series: -1
        Finding(series_uid="s1", centre_lps=(0, 1, 0), probability=0.8),  # N's best hit: 1
        Finding(series_uid="s1", centre_lps=(200, 0, 0), probability=0.7),  # far: 0
    ]
    predictions += [
        Finding(series_uid="s1", centre_lps=(300 + 20 * i, 0, 0), probability=0.6 - 0.005 * i)
        for i in range(95)
    ]
    predictions += [
        Finding(series_uid="s1", centre_lps=(300 + 20 * i, 50, 0), probability=0.05)
        for i in range(3)
    ]
    labels = label_candidates([nodule], [excluded], ["s1"], predictions)
    assert labels.dtype == np.int8 and labels.shape == (len(predictions),)
    assert labels[:5].tolist() == [1, -1, -1, 1, 0]
    assert (labels[5:100] == 0).all() and (labels[100:] == -1).all()  # 101st score .05: capped
    uncapped = label_candidates([nodule], [excluded], ["s1"], predictions, max_marks_per_scan=0)
    assert (uncapped[100:] == 0).all()
    result = evaluate_luna16([nodule], [excluded], ["s1"], predictions, n_bootstrap=0)
    assert result.n_false_positives == int((labels == 0).sum())
    with pytest.raises(EvaluationInputError, match="listed more than once"):
        label_candidates([nodule], [], ["s1", "s1"], predictions)


@pytest.mark.parametrize("seed", [0, 3])
def test_froc_at_thresholds_gives_the_points_of_the_froc_curve(seed):
    annotations, excluded, predictions, uids = random_case(seed)
    result = evaluate_luna16(annotations, excluded, uids, predictions, n_bootstrap=0)
    labels = label_candidates(annotations, excluded, uids, predictions)
    scores = np.array([p.probability for p in predictions])
    thresholds = np.unique(scores[labels >= 0])[::-1]
    sens, fps = froc_at_thresholds(annotations, excluded, uids, predictions, thresholds)
    assert sens.shape == fps.shape == thresholds.shape
    # FP/scan counts the marks labelled 0 at or above each threshold.
    counted = [np.sum((labels == 0) & (scores >= t)) / len(uids) for t in thresholds]
    np.testing.assert_array_equal(fps, counted)
    # Every vertex of the curve past the origin is one of these pairs, exactly ...
    pairs = set(zip(fps.tolist(), sens.tolist()))
    vertices = set(zip(result.froc_fps.tolist(), result.froc_sens.tolist())) - {(0.0, 0.0)}
    assert vertices <= pairs
    # ... and every pair lies on the curve (sklearn drops collinear vertices).
    curve = np.stack([result.froc_fps, result.froc_sens], axis=1)
    for x, y in zip(fps, sens):
        on = [
            abs((q[0] - p[0]) * (y - p[1]) - (q[1] - p[1]) * (x - p[0])) < 1e-12
            and min(p[0], q[0]) <= x <= max(p[0], q[0])
            and min(p[1], q[1]) <= y <= max(p[1], q[1])
            for p, q in itertools.pairwise(curve)
        ]
        assert any(on), (x, y)
    # A threshold above every score keeps nothing; sensitivity counts missed nodules too.
    top, *_ = froc_at_thresholds(annotations, excluded, uids, predictions, [2.0])
    assert top.tolist() == [0.0]
    low, _ = froc_at_thresholds(annotations, excluded, uids, predictions, [-1.0])
    assert low[0] == pytest.approx(result.n_true_positives / result.n_nodules)


def test_froc_at_thresholds_rejects_a_nan_threshold():
    annotations, excluded, predictions, uids = random_case(0)
    with pytest.raises(ValueError, match="without NaN"):
        froc_at_thresholds(annotations, excluded, uids, predictions, [0.5, float("nan")])
