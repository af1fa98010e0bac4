"""LUNA16 FROC/CPM evaluation: hand-made cases with hand-computed answers, and a cross-check.

Reading the expected values: by default (``cpm_definition="interpolated"``, the
LUNA16 paper) the CPM reads the FROC curve at exactly 1/8, 1/4, 1/2, 1, 2, 4, 8
FP/scan. With ``cpm_definition="grid"`` it reads it at the official
``linspace(0.125, 8, 10001)`` grid points nearest the seven rates:

    0.125, 0.2502125, 0.49985, 0.9999125, 2.0000375, 4.0002875, 8.0   (FP/scan)

so a step of the curve at exactly 0.5 or 1 FP/scan is reached by the exact
reading but *not yet* at 0.49985 or 0.9999125. ``np.interp`` on a vertical step
returns its top; past the curve's last FP/scan it returns the final sensitivity.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from medssl.cli.main import cli
from medssl.datasets.luna16 import write_findings
from medssl.errors import EvaluationInputError, MedsslError
from medssl.finding import Finding
from medssl.metrics import (
    CPM_FP_POINTS,
    FP_RATES,
    bootstrap_sensitivities,
    cpm_points,
    evaluate_luna16,
    evaluate_luna16_files,
    froc_curve,
    order_statistic_interval,
    plot_froc,
    read_predictions,
    write_predictions,
)

OFFICIAL_POINTS = (0.125, 0.2502125, 0.49985, 0.9999125, 2.0000375, 4.0002875, 8.0)


def nodule(uid: str, x: float, y: float, z: float, diameter: float) -> Finding:
    return Finding(series_uid=uid, centre_lps=(x, y, z), diameter_mm=diameter)


def mark(uid: str, x: float, y: float, z: float, probability: float) -> Finding:
    return Finding(series_uid=uid, centre_lps=(x, y, z), probability=probability)


def evaluate(annotations, predictions, uids, excluded=(), n_bootstrap=10, **kw):
    return evaluate_luna16(annotations, excluded, uids, predictions, n_bootstrap=n_bootstrap, **kw)


def test_cpm_reads_the_curve_at_the_exact_rates_or_at_the_official_grid_points():
    assert FP_RATES == (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    assert pytest.approx(OFFICIAL_POINTS, abs=1e-12) == CPM_FP_POINTS
    assert cpm_points() == cpm_points("interpolated") == FP_RATES
    assert cpm_points("grid") == CPM_FP_POINTS
    with pytest.raises(ValueError, match=r"cpm_definition must be one of .* got 'official'"):
        cpm_points("official")


# --- matching -------------------------------------------------------------------------------


def test_double_hit_scores_the_best_mark_and_ignores_the_other():
    # s1: N1 at the origin and N2 at x=100, both 10 mm (radius 5); s2..s4 are empty scans.
    # Marks on s1, in file order: A hits N1 (0.5), B hits N1 (0.9), C is far (0.6), D hits N2 (0.3).
    # N1 is scored 0.9 (best, not first); A is neither TP nor FP. Entries: TP .9, FP .6, TP .3;
    # 1 FP over 4 scans: curve (0,0) (0,.5) (.25,.5) (.25,1).
    # Sensitivities: .5 at 0.125; past the end (0.25) from 0.2502125 on: 1.
    # CPM = (.5 + 6 * 1) / 7 = 6.5 / 7.
    # (If A were an FP: 2 FPs -> steps at .25 and .5 -> CPM 5.5/7; if the first hit counted:
    #  TP .5 below FP .6 -> sensitivity 0 at 0.125.)
    annotations = [nodule("s1", 0, 0, 0, 10), nodule("s1", 100, 0, 0, 10)]
    predictions = [
        mark("s1", 1, 0, 0, 0.5),
        mark("s1", 0, 2, 0, 0.9),
        mark("s1", 50, 0, 0, 0.6),
        mark("s1", 101, 0, 0, 0.3),
    ]
    result = evaluate(annotations, predictions, ["s1", "s2", "s3", "s4"])
    assert result.sensitivities == pytest.approx((0.5, 1, 1, 1, 1, 1, 1))
    assert result.cpm == pytest.approx(6.5 / 7)
    assert (result.n_true_positives, result.n_false_positives) == (2, 1)
    assert (result.n_candidates, result.n_nodules, result.n_scans) == (4, 2, 4)
    assert result.froc_fps.max() == pytest.approx(0.25)


def test_one_mark_on_two_overlapping_nodules_hits_both():
    # Nodules at x=0 and x=6, 10 mm each; a mark at x=3 is 3 mm from both centres (< 5):
    # the official script counts it for each nodule ("CAD mark ... detected two nodules!").
    annotations = [nodule("s1", 0, 0, 0, 10), nodule("s1", 6, 0, 0, 10)]
    result = evaluate(annotations, [mark("s1", 3, 0, 0, 0.7)], ["s1"])
    assert result.n_true_positives == 2 and result.n_false_positives == 0
    assert result.cpm == pytest.approx(1.0)


def test_marks_on_excluded_findings_are_neither_hits_nor_false_positives():
    # N (6 mm, radius 3) at the origin; excluded E1 (4 mm) at x=30 and E2 (4 mm) at x=2.
    # M1 (x=31, .95) hits only E1: ignored.        M2 (y=1, .65) hits N.
    # M3 (x=36, .70) is 6 mm from E1: an FP.       M4 (x=1.5, .85) hits N and E2: a hit of N.
    # Entries: TP .85 (N's best), FP .70; 1 scan: curve (0,0) (0,1) (1,1) -> 1 everywhere.
    # (If M1 were an FP, TP .85 would rank below FP .95: CPM 3/7; if M4 were only "excluded",
    #  N would score .65 below the FP: sensitivity 0 up to 0.9999 FP/scan.)
    annotations = [nodule("s1", 0, 0, 0, 6)]
    excluded = [nodule("s1", 30, 0, 0, 4), nodule("s1", 2, 0, 0, 4)]
    predictions = [
        mark("s1", 31, 0, 0, 0.95),
        mark("s1", 0, 1, 0, 0.65),
        mark("s1", 36, 0, 0, 0.70),
        mark("s1", 1.5, 0, 0, 0.85),
    ]
    result = evaluate(annotations, predictions, ["s1"], excluded=excluded)
    assert result.cpm == pytest.approx(1.0)
    assert (result.n_true_positives, result.n_false_positives, result.n_candidates) == (1, 1, 4)


def test_a_negative_diameter_matches_as_10_mm_strictly_inside():
    # Nodule with diameter -1 -> 10 mm, radius 5: a mark at 4.9 mm hits (4.9^2 < 25), one at
    # exactly 5 mm does not (25 < 25 is false) and is an FP. Excluded finding with diameter -1
    # (as in LUNA16's annotations_excluded.csv): a mark 4 mm away is ignored.
    # Entries: TP .9, FP .8 on 1 scan -> CPM 1.
    annotations = [nodule("s1", 0, 0, 0, -1)]
    excluded = [nodule("s1", 50, 0, 0, -1)]
    predictions = [
        mark("s1", 4.9, 0, 0, 0.9),
        mark("s1", 0, 0, 5, 0.8),
        mark("s1", 54, 0, 0, 0.95),
    ]
    result = evaluate(annotations, predictions, ["s1"], excluded=excluded)
    assert (result.n_true_positives, result.n_false_positives) == (1, 1)
    assert result.cpm == pytest.approx(1.0)


# --- the per-scan cap ----------------------------------------------------------------------


def far_marks(uid: str, probabilities) -> list[Finding]:
    """Marks 20 mm apart along x from x=100: they hit nothing."""
    return [mark(uid, 100 + 20 * i, 0, 0, p) for i, p in enumerate(probabilities)]


def test_cap_keeps_marks_strictly_above_the_101st_score_ties_included():
    # s1: 98 far marks at .990 .. .893, then 7 marks at .5, one of them on s1's nodule: 105.
    # Sorted, the 101st score is .5, so only the 98 marks above .5 stay: the nodule is missed
    # (a plain top-100 would keep 2 of the .5 marks). s2 has 5 marks, under the cap: all stay,
    # one hits s2's nodule at .1.
    s1 = far_marks("s1", [0.99 - 0.001 * i for i in range(98)])
    s1 += [mark("s1", 60 + 20 * i, 50, 0, 0.5) for i in range(6)]  # far, tied at .5
    s1.append(mark("s1", 0, 0, 0, 0.5))  # on the nodule, tied at .5
    s2 = [*far_marks("s2", [0.4, 0.3, 0.2, 0.15]), mark("s2", 0, 0, 0, 0.1)]
    annotations = [nodule("s1", 0, 0, 0, 8), nodule("s2", 0, 0, 0, 8)]
    assert len(s1) == 105
    result = evaluate(annotations, s1 + s2, ["s1", "s2"])
    assert result.n_candidates == 98 + 5
    assert (result.n_true_positives, result.n_false_positives) == (1, 98 + 4)
    uncapped = evaluate(annotations, s1 + s2, ["s1", "s2"], max_marks_per_scan=0)
    assert uncapped.n_candidates == 110 and uncapped.n_true_positives == 2


def test_cap_keeps_exactly_100_of_105_distinct_scores():
    marks = far_marks("s1", [1.0 - 0.001 * i for i in range(105)])
    result = evaluate([], marks, ["s1"])
    assert result.n_candidates == 100 and result.n_false_positives == 100


# --- denominators and border cases --------------------------------------------------------


def test_a_scan_without_marks_counts_in_fp_per_scan_and_misses_its_nodules():
    # sA: nodule hit at .9 and an FP at .95; sB: one nodule, no marks. Marks on "ghost" (not in
    # seriesuids) are ignored. 2 scans, 2 nodules: curve (0,0) (.5,0) (.5,.5).
    # Exact rates: 0 at 1/8 and 1/4; at 1/2 the top of the vertical step, .5; then (past the
    # end) .5: CPM = 5 * .5 / 7. Grid: 0 at 0.125, 0.2502125, 0.49985 (below the step); from
    # 0.9999125 on .5: CPM = 4 * .5 / 7.
    # (With 1 scan the step would be at 1 FP/scan: CPM 2/7; without sB's nodule: CPM 5/7.)
    annotations = [nodule("sA", 0, 0, 0, 10), nodule("sB", 0, 0, 0, 10)]
    predictions = [
        mark("sA", 1, 1, 1, 0.9),
        mark("sA", 80, 0, 0, 0.95),
        mark("ghost", 0, 0, 0, 0.99),
    ]
    result = evaluate(annotations, predictions, ["sA", "sB"])
    assert result.sensitivities == pytest.approx((0, 0, 0.5, 0.5, 0.5, 0.5, 0.5))
    assert result.cpm == pytest.approx(2.5 / 7)
    assert (result.n_scans, result.n_nodules, result.n_candidates) == (2, 2, 2)
    grid = evaluate(annotations, predictions, ["sA", "sB"], cpm_definition="grid")
    assert grid.sensitivities == pytest.approx((0, 0, 0, 0.5, 0.5, 0.5, 0.5))
    assert grid.cpm == pytest.approx(2 / 7)


@pytest.mark.filterwarnings("error")
def test_a_system_without_false_positives_has_its_recall_at_every_rate():
    # 3 nodules on 2 scans, 2 hit, no FP: the official script sets FP/scan to 0 at every point,
    # so each rate reads the final sensitivity, 2/3. No warning (sklearn's NaN fpr is handled).
    annotations = [nodule("s1", 0, 0, 0, 8), nodule("s1", 50, 0, 0, 8), nodule("s2", 0, 0, 0, 8)]
    predictions = [mark("s1", 1, 0, 0, 0.9), mark("s2", 0, 1, 0, 0.3)]
    result = evaluate(annotations, predictions, ["s1", "s2"], n_bootstrap=50)
    assert result.sensitivities == pytest.approx((2 / 3,) * 7)
    assert result.cpm == pytest.approx(2 / 3)
    assert np.all(result.froc_fps == 0)
    assert all(0 <= lo <= hi <= 1 for lo, hi in [result.cpm_ci, *result.sensitivity_ci])


def test_a_perfect_system_scores_1_with_a_degenerate_interval():
    # Every nodule hit above every FP: sensitivity 1 from 0 FP/scan on, in every bootstrap sample.
    annotations = [nodule(f"s{i}", 0, 0, 0, 10) for i in range(5)]
    predictions = [mark(f"s{i}", 1, 0, 0, 0.9 + 0.01 * i) for i in range(5)]
    predictions += [mark(f"s{i}", 80, 0, 0, 0.1 * i) for i in range(5)]
    result = evaluate(annotations, predictions, [f"s{i}" for i in range(5)], n_bootstrap=30)
    assert result.cpm == 1.0 and result.cpm_ci == (1.0, 1.0)
    assert result.sensitivities == (1.0,) * 7


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize(
    "predictions",
    [[mark("s1", 80, 0, 0, 0.9), mark("s2", 0, 80, 0, 0.2)], []],
    ids=["only-false-positives", "no-marks-at-all"],
)
def test_a_system_that_finds_nothing_scores_0(predictions):
    annotations = [nodule("s1", 0, 0, 0, 10), nodule("s2", 0, 0, 0, 10)]
    result = evaluate(annotations, predictions, ["s1", "s2"])
    assert result.cpm == 0.0 and result.cpm_ci == (0.0, 0.0)
    assert result.n_true_positives == 0


@pytest.mark.filterwarnings("error")
def test_no_nodules_and_no_marks_is_all_zero_not_a_crash():
    result = evaluate([], [], ["s1", "s2"])
    assert result.cpm == 0.0 and result.n_nodules == 0 and result.n_candidates == 0


def test_froc_curve_scales_fpr_by_false_positives_per_scan_and_tpr_by_all_nodules():
    # Counted: TP .9, FP .8, TP .7, FP .6; one missed nodule (3 nodules); 2 scans.
    # FP/scan = fpr * 2 / 2, sensitivity = tpr * 2 / 3.
    fps, sens = froc_curve(
        np.array([1, 0, 1, 0, 1]),
        np.array([0.9, 0.8, 0.7, 0.6, -1]),
        np.array([False, False, False, False, True]),
        n_scans=2,
    )
    points = set(zip(fps.round(9), sens.round(9)))
    assert {(0.0, round(1 / 3, 9)), (0.5, round(2 / 3, 9)), (1.0, round(2 / 3, 9))} <= points
    assert fps.max() == 1.0 and sens.max() == pytest.approx(2 / 3)


# --- bootstrap -----------------------------------------------------------------------------


def one_scan_case():
    # N1 hit at .9, N2 hit at .3, FP at .6, 1 scan: curve (0,0) (0,.5) (1,.5) (1,1).
    # Exact rates: .5 up to 1/2, 1 from 1 FP/scan on (top of the step): CPM 5.5/7.
    # Grid: .5 up to 0.9999125, then (past the end) 1: CPM (4 * .5 + 3 * 1) / 7 = 5/7.
    annotations = [nodule("s1", 0, 0, 0, 10), nodule("s1", 100, 0, 0, 10)]
    predictions = [mark("s1", 0, 0, 1, 0.9), mark("s1", 100, 1, 0, 0.3), mark("s1", 50, 0, 0, 0.6)]
    return annotations, predictions


@pytest.mark.parametrize(
    "definition, sensitivities",
    [("interpolated", (0.5,) * 3 + (1.0,) * 4), ("grid", (0.5,) * 4 + (1.0,) * 3)],
)
def test_bootstrap_of_one_scan_reproduces_the_estimate(definition, sensitivities):
    # Every bootstrap sample draws the only scan: every interval collapses on the estimate,
    # read with the estimate's own CPM definition.
    annotations, predictions = one_scan_case()
    result = evaluate(annotations, predictions, ["s1"], n_bootstrap=25, cpm_definition=definition)
    assert result.sensitivities == pytest.approx(sensitivities)
    assert result.cpm == pytest.approx(np.mean(sensitivities))
    assert result.cpm_ci == pytest.approx((result.cpm, result.cpm))
    assert [lo for lo, _ in result.sensitivity_ci] == pytest.approx(result.sensitivities)
    assert [hi for _, hi in result.sensitivity_ci] == pytest.approx(result.sensitivities)


class ScriptedDraws:
    """Stands in for numpy's Generator: hands out the scan draws a test wrote down."""

    def __init__(self, n_scans: int, draws: list[list[int]]) -> None:
        self.n_scans, self.draws = n_scans, list(draws)

    def integers(self, low: int, high: int, size: int) -> np.ndarray:
        assert (low, high, size) == (0, self.n_scans, self.n_scans)  # n_scans scans, replaced
        return np.array(self.draws.pop(0))


def test_bootstrap_samples_scans_with_replacement_and_keeps_the_scan_divisor():
    # Scan 0: a nodule hit at .9. Scan 1: a missed nodule and an FP at .95. Scan 2: nothing.
    # [0,1,2]: TP .9, FP .95, 1 missed; 1 FP / 3 scans: step to .5 at 1/3 FP/scan:
    #          0 at 0.125 and 0.2502125, .5 from 0.49985 on -> CPM 5 * .5 / 7 = 2.5/7.
    # [1,1,1]: no nodule hit -> 0.
    # [0,0,2]: scan 0 twice: 2 of 2 nodules hit, no FP -> 1.
    # [0,1,1]: 1 of 3 nodules hit, 2 FP (at .95, above it) / 3 scans: step to 1/3 at 2/3 FP/scan:
    #          0 up to 0.49985, then 1/3 -> CPM 4 * (1/3) / 7 = 4/21.
    is_tp = np.array([1, 1, 0])
    probabilities = np.array([0.9, -np.inf, 0.95])
    missed = np.array([False, True, False])
    draws = [[0, 1, 2], [1, 1, 1], [0, 0, 2], [0, 1, 1]]
    (samples,) = bootstrap_sensitivities(
        is_tp,
        probabilities,
        missed,
        np.array([0, 1, 1]),
        3,
        n_bootstrap=4,
        rng=ScriptedDraws(3, draws),
    )
    assert samples.mean(axis=1) == pytest.approx([2.5 / 7, 0, 1, 4 / 21])


def test_interval_takes_the_official_order_statistics():
    # compute_mean_ci: sorted[floor(.025 * 1000)] = the 26th smallest, sorted[floor(.975 * 1000)].
    samples = np.random.default_rng(0).permutation(1000).astype(float)
    lower, upper = order_statistic_interval(samples, 0.95)
    assert (lower, upper) == (25.0, 975.0)


def test_bootstrap_is_seeded_and_brackets_a_spread():
    annotations, excluded, predictions, uids = random_case(3)
    kw = {"excluded": excluded, "n_bootstrap": 200}
    a = evaluate(annotations, predictions, uids, seed=0, **kw)
    b = evaluate(annotations, predictions, uids, seed=0, **kw)
    c = evaluate(annotations, predictions, uids, seed=1, **kw)
    assert a.to_json() == b.to_json()
    assert a.cpm_ci != c.cpm_ci
    lo, hi = a.cpm_ci
    assert 0 <= lo < hi <= 1 and lo <= a.cpm + 0.05 and a.cpm - 0.05 <= hi
    assert all(lo <= hi for lo, hi in a.sensitivity_ci)


# --- cross-check against thresholding --------------------------------------------------------


def random_case(seed: int, n_scans: int = 20):
    """Random nodules (some 'diameter -1'), excluded findings, marks near them and far away."""
    rng = np.random.default_rng(seed)
    uids = [f"1.2.826.{seed}.{i}" for i in range(n_scans)]
    annotations, excluded, predictions = [], [], []
    for uid in uids:
        for _ in range(rng.integers(0, 4)):
            centre = rng.uniform(-150, 150, 3)
            diameter = -1.0 if rng.random() < 0.1 else rng.uniform(3, 30)
            annotations.append(
                Finding(series_uid=uid, centre_lps=tuple(centre), diameter_mm=diameter)
            )
            radius = 5.0 if diameter < 0 else diameter / 2
            for _ in range(rng.integers(0, 3)):  # 0, 1 or 2 marks on it
                offset = rng.normal(size=3)
                offset *= rng.uniform(0, 1.3 * radius) / np.linalg.norm(offset)
                predictions.append(
                    Finding(
                        series_uid=uid, centre_lps=tuple(centre + offset), probability=rng.random()
                    )
                )
        for _ in range(rng.integers(0, 3)):
            centre = rng.uniform(-150, 150, 3)
            excluded.append(
                Finding(
                    series_uid=uid,
                    centre_lps=tuple(centre),
                    diameter_mm=-1.0 if rng.random() < 0.5 else 4.0,
                )
            )
            predictions.append(
                Finding(
                    series_uid=uid,
                    centre_lps=tuple(centre + rng.uniform(-3, 3, 3)),
                    probability=rng.random(),
                )
            )
        for _ in range(rng.integers(0, 7)):  # scattered marks: mostly false positives
            predictions.append(
                Finding(
                    series_uid=uid,
                    centre_lps=tuple(rng.uniform(-150, 150, 3)),
                    probability=rng.random(),
                )
            )
    return annotations, excluded, predictions, uids


def threshold_sensitivities(annotations, excluded, predictions, uids, points):
    """Sensitivity with at most floor(rate * n_scans) false positives, by brute force.

    For tie-free scores the FROC curve is a staircase (right for an FP, up for a nodule), so
    ``np.interp`` at a rate whose ``rate * n_scans`` is not an integer equals this count; at
    an integer ``k`` it reads the top of the vertical step at k FPs, which is this count too.
    """

    def inside(m: Finding, f: Finding) -> bool:
        r = 5.0 if f.diameter_mm < 0 else f.diameter_mm / 2
        return sum((a - b) ** 2 for a, b in zip(m.centre_lps, f.centre_lps)) < r * r

    best, false_positives = [], []
    for uid in uids:
        marks = [m for m in predictions if m.series_uid == uid]
        nodules = [f for f in annotations if f.series_uid == uid]
        others = [f for f in excluded if f.series_uid == uid]
        for n in nodules:
            best.append(max((m.probability for m in marks if inside(m, n)), default=None))
        false_positives += [
            m.probability for m in marks if not any(inside(m, f) for f in nodules + others)
        ]
    false_positives.sort(reverse=True)
    out = []
    for rate in points:
        k = math.floor(rate * len(uids))
        floor_score = false_positives[k] if k < len(false_positives) else -math.inf
        out.append(sum(1 for s in best if s is not None and s > floor_score) / len(best))
    return out, len(false_positives)


@pytest.mark.parametrize("definition", ["interpolated", "grid"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cpm_agrees_with_thresholding_on_random_cases(seed, definition):
    # 20 scans: 1/4 ... 8 FP/scan are whole FP counts (5, 10, ...), where the exact reading
    # sits on a vertical step; the grid points sit just beside them.
    annotations, excluded, predictions, uids = random_case(seed)
    points = FP_RATES if definition == "interpolated" else OFFICIAL_POINTS
    expected, n_fp = threshold_sensitivities(annotations, excluded, predictions, uids, points)
    # Rate 8 reads past the curve's end only when there are fewer than 8 * 20 FPs.
    assert n_fp < 8 * len(uids) and sum(expected) > 0
    result = evaluate_luna16(
        annotations, excluded, uids, predictions, n_bootstrap=1, cpm_definition=definition
    )
    assert result.sensitivities == pytest.approx(expected, abs=1e-12)
    assert result.cpm == pytest.approx(np.mean(expected), abs=1e-12)
    assert result.n_false_positives == n_fp


# --- files, CLI, plot ----------------------------------------------------------------------


def write_case(tmp_path, predictions=None):
    """The 'scan without marks' case as the official files."""
    annotations = [nodule("sA", 0, 0, 0, 10), nodule("sB", 0, 0, 0, 10)]
    write_findings(tmp_path / "annotations.csv", annotations)
    write_findings(tmp_path / "annotations_excluded.csv", [nodule("sA", 40, 0, 0, -1)])
    (tmp_path / "seriesuids.csv").write_text("sA\nsB\n")
    if predictions is None:
        predictions = [
            mark("sA", 1, 1, 1, 0.9),
            mark("sA", 80, 0, 0, 0.95),
            mark("sA", 41, 0, 0, 0.99),
        ]
        write_predictions(tmp_path / "submission.csv", predictions)
    else:
        (tmp_path / "submission.csv").write_text(predictions)
    return [
        str(tmp_path / n)
        for n in ("annotations.csv", "annotations_excluded.csv", "seriesuids.csv", "submission.csv")
    ]


def test_predictions_round_trip_exactly(tmp_path):
    predictions = [mark("1.2.3", -0.1, 1 / 3, 2e-7, 0.123456789012345), mark("4.5", 1, 2, 3, 1.0)]
    assert read_predictions(write_predictions(tmp_path / "p.csv", predictions)) == predictions


def test_cli_json_prints_the_result_and_out_writes_the_plot(tmp_path):
    files = write_case(tmp_path)
    out = tmp_path / "report"
    args = [
        "--annotations",
        files[0],
        "--excluded",
        files[1],
        "--seriesuids",
        files[2],
        "--predictions",
        files[3],
    ]
    result = CliRunner().invoke(
        cli, ["evaluate", "luna16", *args, "--json", "--bootstrap", "20", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # one JSON object, nothing else on stdout
    assert set(summary) == {
        "cpm_definition",
        "cpm_fp_points",
        "fp_rates",
        "sensitivities",
        "cpm",
        "cpm_ci",
        "sensitivity_ci",
        "n_scans",
        "n_nodules",
        "n_candidates",
        "n_true_positives",
        "n_false_positives",
    }
    # As test_a_scan_without_marks_...: the mark at .99 sits on the excluded finding.
    assert summary["cpm_definition"] == "interpolated"
    assert summary["cpm_fp_points"] == list(FP_RATES)
    assert summary["sensitivities"] == pytest.approx([0, 0, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert summary["cpm"] == pytest.approx(2.5 / 7)
    assert len(summary["cpm_ci"]) == 2 and len(summary["sensitivity_ci"]) == 7
    assert (summary["n_scans"], summary["n_nodules"], summary["n_candidates"]) == (2, 2, 3)
    assert (summary["n_true_positives"], summary["n_false_positives"]) == (1, 1)
    assert (out / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "froc.json").read_text()) == summary

    table = CliRunner().invoke(cli, ["evaluate", "luna16", *args, "--bootstrap", "5"])
    assert table.exit_code == 0, table.output
    assert "CPM" in table.stdout and "0.3571" in table.stdout and "0.125" in table.stdout

    grid = CliRunner().invoke(
        cli, ["evaluate", "luna16", *args, "--json", "--bootstrap", "5", "--cpm-definition", "grid"]
    )
    assert grid.exit_code == 0, grid.output
    grid_summary = json.loads(grid.stdout)
    assert grid_summary["cpm_definition"] == "grid"
    assert grid_summary["cpm_fp_points"] == pytest.approx(OFFICIAL_POINTS, abs=1e-12)
    assert grid_summary["cpm"] == pytest.approx(2 / 7)
    bad = CliRunner().invoke(cli, ["evaluate", "luna16", *args, "--cpm-definition", "nearest"])
    assert bad.exit_code == 2 and "nearest" in bad.output


@pytest.mark.parametrize(
    "content, problem",
    [
        (
            "seriesuid,coordX,coordY,coordZ,probability\nsA,1,1,1,high\n",
            "line 2: probability 'high'",
        ),
        ("seriesuid,coordX,coordY,coordZ\nsA,1,1,1\n", "missing columns ['probability']"),
        ("seriesuid,coordX,coordY,coordZ,probability\nsA,1,nan,1,0.5\n", "line 2: coordY 'nan'"),
    ],
)
def test_a_bad_submission_is_reported_with_its_file_and_line(tmp_path, content, problem):
    files = write_case(tmp_path, predictions=content)
    with pytest.raises(EvaluationInputError) as err:
        evaluate_luna16_files(*files, n_bootstrap=1)
    assert "submission.csv" in str(err.value) and problem in str(err.value)
    result = CliRunner().invoke(
        cli,
        [
            "evaluate",
            "luna16",
            "--annotations",
            files[0],
            "--excluded",
            files[1],
            "--seriesuids",
            files[2],
            "--predictions",
            files[3],
        ],
    )
    assert result.exit_code == 1
    assert "Error:" in result.stderr and "submission.csv" in result.stderr
    assert "Traceback" not in result.output


def test_bad_reference_files_name_the_file(tmp_path):
    files = write_case(tmp_path)
    (tmp_path / "annotations.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\nsA,0,0,0,big\n"
    )
    with pytest.raises(EvaluationInputError, match=r"annotations\.csv: .*not a number"):
        evaluate_luna16_files(*files)
    (tmp_path / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ\n")
    with pytest.raises(EvaluationInputError, match=r"annotations\.csv: missing columns"):
        evaluate_luna16_files(*files)
    write_case(tmp_path)
    with pytest.raises(EvaluationInputError, match=r"nowhere\.csv: no such file"):
        evaluate_luna16_files(files[0], str(tmp_path / "nowhere.csv"), files[2], files[3])
    (tmp_path / "seriesuids.csv").write_text("seriesuid\nsA\n")
    with pytest.raises(EvaluationInputError, match=r"seriesuids\.csv: line 1 is a header"):
        evaluate_luna16_files(*files)
    (tmp_path / "seriesuids.csv").write_text("sA\nsB\nsA\n")
    with pytest.raises(EvaluationInputError, match=r"seriesuids\.csv: seriesuid sA is listed"):
        evaluate_luna16_files(*files)
    assert issubclass(EvaluationInputError, MedsslError)


def test_plot_froc_draws_a_system_without_false_positives(tmp_path):
    # All FP/scan are 0: the plot must still draw on its log axis.
    result = evaluate([nodule("s1", 0, 0, 0, 10)], [mark("s1", 0, 0, 0, 0.9)], ["s1"])
    path = plot_froc(result, tmp_path / "sub" / "froc.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
