"""The CPM by the LUNA16 paper's definition, held to an independent computation.

Setio et al. 2017 (and MONAI's ``compute_froc_score``): the CPM is the mean
sensitivity at exactly 1/8, 1/4, 1/2, 1, 2, 4 and 8 FP per scan, read off the
FROC curve by linear interpolation. The official script's printout reads the
curve at its 10001-point grid instead (0.2502125 for 1/4, 0.49985 for 1/2, ...),
which differs where the curve moves between a rate and its grid point.

The expected values here are computed in the test from the marks as built:
each mark's truth (which nodule it sits on, or none) is known by construction;
the FROC points are counted by hand at every distinct score; the sensitivity at a
rate is the straight line between the two curve points around it, and at a
vertical step the top (``np.interp``'s reading).
"""

from __future__ import annotations

import numpy as np
import pytest

from medssl.finding import Finding
from medssl.metrics import FP_RATES, evaluate_luna16

GRID_POINTS = (0.125, 0.2502125, 0.49985, 0.9999125, 2.0000375, 4.0002875, 8.0)


def froc_points(tp_scores, fp_scores, n_nodules, n_scans):
    """FROC points ``[(fp_per_scan, sensitivity)]`` counted at every distinct score, highest first.

    ``tp_scores``: the best score of each hit nodule; ``fp_scores``: the false positives'.
    """
    tp, fp = np.asarray(tp_scores), np.asarray(fp_scores)
    points = [(0.0, 0.0)]
    for t in sorted(set(tp_scores) | set(fp_scores), reverse=True):
        points.append((int((fp >= t).sum()) / n_scans, int((tp >= t).sum()) / n_nodules))
    return points


def read_at(points, rate):
    """Linear interpolation at ``rate``; on a vertical step the top; past the end the last value."""
    last = max(i for i, (x, _) in enumerate(points) if x <= rate)
    if last == len(points) - 1:
        return points[-1][1]
    (x0, y0), (x1, y1) = points[last], points[last + 1]
    return y0 + (y1 - y0) * (rate - x0) / (x1 - x0)


def stepped_case():
    """5000 scans, 5 nodules (scans 0-4, one never marked), 3000 false positives.

    In score order: nodule 0; 1251 FPs; nodule 1 (a vertical step at 0.2502 FP/scan, just
    above 1/4 but below the grid point 0.2502125); FPs up to 2499; one score shared by
    nodule 2 and two FPs (a diagonal from (0.4998, 0.4) to (0.5002, 0.6), across 1/2);
    FPs up to 3000; nodule 3 last (a step at 0.6). A mark on an excluded finding
    outscores everything and is ignored.
    """
    n_scans = 5000
    uids = [f"1.2.3.{i}" for i in range(n_scans)]
    nodules = [
        Finding(series_uid=uids[k], centre_lps=(0.0, 0.0, 0.0), diameter_mm=10.0) for k in range(5)
    ]
    excluded = [Finding(series_uid=uids[7], centre_lps=(-60.0, 0.0, 0.0), diameter_mm=-1.0)]
    predictions = [Finding(series_uid=uids[7], centre_lps=(-61.0, 0.0, 0.0), probability=0.999)]
    tp_scores, fp_scores = [], []
    n_fp = 0

    def false_positive(score):
        nonlocal n_fp
        # Spread over the scans (far from every finding) so no scan reaches the 100-mark cap.
        uid = uids[n_fp % n_scans]
        predictions.append(
            Finding(
                series_uid=uid,
                centre_lps=(100.0 + 20 * (n_fp // n_scans), 50.0, 0.0),
                probability=score,
            )
        )
        fp_scores.append(score)
        n_fp += 1

    def hit(k, score):
        predictions.append(
            Finding(series_uid=uids[k], centre_lps=(1.0, 0.0, 0.0), probability=score)
        )
        tp_scores.append(score)

    score = iter(np.linspace(0.98, 0.02, 4000))
    hit(0, 0.99)
    while n_fp < 1251:
        false_positive(next(score))
    hit(1, next(score))
    while n_fp < 2499:
        false_positive(next(score))
    tied = next(score)
    hit(2, tied)
    false_positive(tied)
    false_positive(tied)
    while n_fp < 3000:
        false_positive(next(score))
    hit(3, 0.01)
    return nodules, excluded, uids, predictions, tp_scores, fp_scores


def test_cpm_interpolates_at_exactly_the_seven_rates_across_jumps_near_a_quarter_and_a_half():
    nodules, excluded, uids, predictions, tp_scores, fp_scores = stepped_case()
    points = froc_points(tp_scores, fp_scores, len(nodules), len(uids))
    expected = [read_at(points, rate) for rate in FP_RATES]
    # By hand: 0.2 at 1/8 and at 1/4 (the step to 0.4 is at 0.2502); 0.5 at 1/2 (half-way up
    # the diagonal); 0.8 from 1 on (past the end at 0.6).
    assert expected == pytest.approx([0.2, 0.2, 0.5, 0.8, 0.8, 0.8, 0.8], abs=1e-9)

    result = evaluate_luna16(nodules, excluded, uids, predictions, n_bootstrap=0)
    assert result.sensitivities == pytest.approx(expected, abs=1e-12)
    assert result.cpm == pytest.approx(4.1 / 7, abs=1e-12)
    assert (result.n_true_positives, result.n_false_positives) == (4, 3000)


def test_the_grid_definition_reads_the_official_grid_points():
    # The same curve at the grid points: 0.4 at 0.2502125 (past the step at 0.2502) and
    # 0.425 at 0.49985 (an eighth of the way up the diagonal): the official script's numbers.
    nodules, excluded, uids, predictions, tp_scores, fp_scores = stepped_case()
    points = froc_points(tp_scores, fp_scores, len(nodules), len(uids))
    expected = [read_at(points, rate) for rate in GRID_POINTS]
    assert expected == pytest.approx([0.2, 0.4, 0.425, 0.8, 0.8, 0.8, 0.8], abs=1e-9)

    result = evaluate_luna16(
        nodules, excluded, uids, predictions, n_bootstrap=0, cpm_definition="grid"
    )
    assert result.sensitivities == pytest.approx(expected, abs=1e-12)
    assert result.cpm == pytest.approx(4.225 / 7, abs=1e-12)
    assert result.cpm_definition == "grid"
    with pytest.raises(ValueError, match=r"cpm_definition .*'nearest'"):
        evaluate_luna16(nodules, excluded, uids, predictions, cpm_definition="nearest")


def monai_cpm(tp_scores, fp_scores, n_nodules, n_scans):
    """MONAI's CPM on the same marks, read at the seven LUNA16 rates.

    MONAI's ``compute_froc_curve_data`` counts at every distinct score but the lowest (its
    CAMELYON inputs hold a floor score); a sentinel FP below every score restores the last
    point without being counted anywhere.
    """
    froc = pytest.importorskip("monai.metrics.froc")
    fp = np.array([*fp_scores, min([*tp_scores, *fp_scores]) - 1.0])
    fps, sens = froc.compute_froc_curve_data(fp, np.array(tp_scores), n_nodules, n_scans)
    return float(froc.compute_froc_score(fps, sens, eval_thresholds=FP_RATES))


def test_cpm_agrees_with_monai_compute_froc_score():
    nodules, excluded, uids, predictions, tp_scores, fp_scores = stepped_case()
    result = evaluate_luna16(nodules, excluded, uids, predictions, n_bootstrap=0)
    assert result.cpm == pytest.approx(
        monai_cpm(tp_scores, fp_scores, len(nodules), len(uids)), abs=1e-12
    )


@pytest.mark.parametrize("seed", range(4))
def test_cpm_agrees_with_the_hand_count_and_monai_on_random_tied_curves(seed):
    # Scores on a coarse grid (many ties between nodules and FPs: diagonal segments) and
    # 8 scans (rates land on whole FP counts: vertical steps at the rates).
    rng = np.random.default_rng(seed)
    n_scans = 8
    uids = [f"9.{seed}.{i}" for i in range(n_scans)]
    nodules, predictions, tp_scores, fp_scores = [], [], [], []
    for _i, uid in enumerate(uids):
        for k in range(rng.integers(1, 4)):
            nodules.append(
                Finding(series_uid=uid, centre_lps=(200.0 * k, 0.0, 0.0), diameter_mm=10.0)
            )
            if rng.random() < 0.8:
                score = float(rng.integers(1, 20)) / 20
                predictions.append(
                    Finding(series_uid=uid, centre_lps=(200.0 * k, 1.0, 0.0), probability=score)
                )
                tp_scores.append(score)
        for j in range(rng.integers(0, 12)):
            score = float(rng.integers(1, 20)) / 20
            predictions.append(
                Finding(
                    series_uid=uid, centre_lps=(100.0 + 200.0 * j, 80.0, 0.0), probability=score
                )
            )
            fp_scores.append(score)
    points = froc_points(tp_scores, fp_scores, len(nodules), n_scans)
    expected = [read_at(points, rate) for rate in FP_RATES]
    result = evaluate_luna16(nodules, [], uids, predictions, n_bootstrap=0)
    assert result.sensitivities == pytest.approx(expected, abs=1e-12)
    monai = monai_cpm(tp_scores, fp_scores, len(nodules), n_scans)
    assert result.cpm == pytest.approx(monai, abs=1e-12)
