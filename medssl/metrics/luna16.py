"""LUNA16 evaluation: the FROC, CPM and bootstrap CIs of ``noduleCADEvaluationLUNA16.py``.

Our own code, following the official script's semantics (function names of
that script are cited where we follow it):

* Matching (``evaluateCAD``): a candidate hits a finding when its squared
  distance to the centre, in world mm (LPS/ITK ``coordX, coordY, coordZ``), is
  strictly below ``(diameter / 2) ** 2``; a diameter < 0 counts as 10 mm.
* A nodule is scored once, with the highest probability among the candidates
  that hit it; its other hits are neither TP nor FP. A candidate that hits two
  nodules is counted as a hit of both (the official script only prints "This is
  strange: CAD mark ... detected two nodules!").
* Nodules are checked before excluded findings, so a candidate that hits a
  nodule and an excluded finding is a hit; one that hits only excluded findings
  (``annotations_excluded.csv``) is ignored; every other candidate is a false
  positive.
* At most 100 marks per scan: when a scan has more, only marks scored strictly
  above the 101st highest score are kept (ties at that score all go).
* The scans are the lines of ``seriesuids.csv``; predictions and annotations of
  other series are ignored; a listed scan without predictions still counts in
  FP/scan and its nodules are missed.
* The CPM reads the FROC curve at exactly 1/8 ... 8 FP/scan by default (the
  LUNA16 paper's definition); ``cpm_definition="grid"`` reads it at the official
  script's 10001-point grid instead (see :mod:`medssl.metrics.froc`).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medssl.atomic import atomic_write
from medssl.datasets.luna16 import read_findings
from medssl.errors import DatasetLayoutError, EvaluationInputError
from medssl.finding import Finding
from medssl.metrics.froc import (
    FP_RATES,
    CpmDefinition,
    FrocVectors,
    bootstrap_sensitivities,
    cpm_points,
    froc_curve,
    order_statistic_interval,
    paired_bootstrap_sensitivities,
    sensitivities_at,
    threshold_froc,
)

__all__ = [
    "MAX_MARKS_PER_SCAN",
    "FrocResult",
    "PairedDifference",
    "evaluate_luna16",
    "evaluate_luna16_files",
    "froc_at_thresholds",
    "label_candidates",
    "paired_bootstrap_cpm",
    "plot_froc",
    "read_predictions",
    "read_seriesuids",
    "write_predictions",
]

PREDICTION_FIELDS = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
#: noduleCADEvaluationLUNA16.py, ``noduleCADEvaluation``: ``maxNumberOfCADMarks=100``.
MAX_MARKS_PER_SCAN = 100
#: A diameter below 0 (the excluded findings of LUNA16 have -1) matches as this, in mm.
DEFAULT_DIAMETER_MM = 10.0
CONFIDENCE = 0.95
#: FP/scan grid of the plotted CI band (log-spaced between 1/8 and 8).
BAND_FPS = np.geomspace(FP_RATES[0], FP_RATES[-1], num=241)


@dataclass(frozen=True, eq=False)
class FrocResult:
    """The LUNA16 evaluation of one CAD system.

    Attributes:
        fp_rates: the seven nominal operating points, FP/scan.
        sensitivities: sensitivity at each rate, read off the FROC curve at
            ``cpm_fp_points``.
        cpm: mean of ``sensitivities``.
        cpm_ci: bootstrap 95% interval of the CPM (same reading as ``cpm``).
        sensitivity_ci: bootstrap 95% interval of each sensitivity.
        froc_fps, froc_sens: ``(K,)`` the full FROC curve, FP/scan and sensitivity.
        n_scans: scans evaluated (lines of ``seriesuids.csv``).
        n_nodules: annotated nodules on those scans.
        n_candidates: marks on those scans after the per-scan cap.
        n_true_positives: nodules hit by at least one mark.
        n_false_positives: marks that hit neither a nodule nor an excluded finding.
        band_fps, band_lower, band_upper: ``(G,)`` the bootstrap interval along
            the curve, for plotting.
        cpm_definition: ``"interpolated"`` (exactly 1/8 ... 8 FP/scan, the LUNA16
            paper) or ``"grid"`` (the official script's grid points).
        cpm_fp_points: the seven FP/scan values the sensitivities were read at.
        seriesuids: the evaluated scans, in order (scan ``i`` of ``vectors``).
        vectors: the per-scan FROC vectors, for :func:`paired_bootstrap_cpm`;
            None when not kept.
    """

    fp_rates: tuple[float, ...]
    sensitivities: tuple[float, ...]
    cpm: float
    cpm_ci: tuple[float, float]
    sensitivity_ci: tuple[tuple[float, float], ...]
    froc_fps: np.ndarray
    froc_sens: np.ndarray
    n_scans: int
    n_nodules: int
    n_candidates: int
    n_true_positives: int
    n_false_positives: int
    band_fps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    band_lower: np.ndarray = field(default_factory=lambda: np.zeros(0))
    band_upper: np.ndarray = field(default_factory=lambda: np.zeros(0))
    cpm_definition: CpmDefinition = "interpolated"
    cpm_fp_points: tuple[float, ...] = FP_RATES
    seriesuids: tuple[str, ...] = ()
    vectors: FrocVectors | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types: the seven rates and sensitivities, CPM, intervals, counts, and
        the CPM definition with the FP/scan points it read."""
        return {
            "cpm_definition": self.cpm_definition,
            "cpm_fp_points": [float(r) for r in self.cpm_fp_points],
            "fp_rates": [float(r) for r in self.fp_rates],
            "sensitivities": [float(s) for s in self.sensitivities],
            "cpm": float(self.cpm),
            "cpm_ci": [float(v) for v in self.cpm_ci],
            "sensitivity_ci": [[float(lo), float(hi)] for lo, hi in self.sensitivity_ci],
            "n_scans": self.n_scans,
            "n_nodules": self.n_nodules,
            "n_candidates": self.n_candidates,
            "n_true_positives": self.n_true_positives,
            "n_false_positives": self.n_false_positives,
        }


@dataclass
class _FrocVectors:
    """The official script's FROC vectors (``FROCGTList``, ``FROCProbList``, ``excludeList``,
    ``FPDivisorList``) plus the counts of ``CADAnalysis.txt``."""

    is_tp: list[float] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    missed: list[bool] = field(default_factory=list)
    scan_index: list[int] = field(default_factory=list)
    n_candidates: int = 0
    n_true_positives: int = 0
    n_false_positives: int = 0

    def add(self, scan: int, is_tp: bool, probability: float, missed: bool = False) -> None:
        self.is_tp.append(1.0 if is_tp else 0.0)
        self.probabilities.append(probability)
        self.missed.append(missed)
        self.scan_index.append(scan)

    def frozen(self, n_scans: int) -> FrocVectors:
        return FrocVectors(
            np.asarray(self.is_tp, dtype=float),
            np.asarray(self.probabilities, dtype=float),
            np.asarray(self.missed, dtype=bool),
            np.asarray(self.scan_index, dtype=np.int64),
            n_scans,
        )


def evaluate_luna16(
    annotations: Sequence[Finding],
    excluded: Sequence[Finding],
    seriesuids: Sequence[str],
    predictions: Sequence[Finding],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    max_marks_per_scan: int = MAX_MARKS_PER_SCAN,
    cpm_definition: CpmDefinition = "interpolated",
) -> FrocResult:
    """Evaluate CAD marks against LUNA16 annotations (``noduleCADEvaluation``).

    Args:
        annotations: the nodules (``annotations.csv``), world mm (LPS).
        excluded: irrelevant findings (``annotations_excluded.csv``).
        seriesuids: the scans to evaluate (``seriesuids.csv``); its length is the
            FP/scan divisor. Findings and predictions of other series are ignored.
        predictions: the CAD marks.
        n_bootstrap: bootstrap samples over scans (official: 1000); 0 skips the
            bootstrap (every interval is NaN), for quick validation during training.
        seed: seed of the ``numpy.random.Generator`` that draws them.
        max_marks_per_scan: the per-scan cap (official: 100); < 1 keeps every mark.
        cpm_definition: where the sensitivities (and the CPM, and every bootstrap
            sample) read the FROC curve: ``"interpolated"`` (default), by linear
            interpolation at exactly 1/8, 1/4, 1/2, 1, 2, 4, 8 FP/scan, the LUNA16
            paper's definition (Setio et al. 2017) and MONAI's ``compute_froc_score``;
            ``"grid"``, at the point of the official script's
            ``linspace(0.125, 8, 10001)`` grid nearest each rate, what
            ``noduleCADEvaluationLUNA16.py`` prints.

    Returns:
        The FROC curve, the sensitivities at the seven rates, the CPM and their
        95% bootstrap intervals, with the per-scan FROC vectors (``vectors``) that
        :func:`paired_bootstrap_cpm` resamples.

    Raises:
        EvaluationInputError: no seriesuids, a repeated seriesuid, or a
            prediction with a non-finite coordinate or probability.
        ValueError: ``n_bootstrap`` < 0, or an unknown ``cpm_definition``.

    With no annotated nodule, or no nodule hit, every sensitivity and the CPM are 0.
    """
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    points = cpm_points(cpm_definition)
    uids = _checked_seriesuids(seriesuids)
    _check_predictions(predictions)
    found, _ = _match(annotations, excluded, uids, predictions, max_marks_per_scan)
    v = found.frozen(len(uids))
    fps, sens = froc_curve(v.is_tp, v.probabilities, v.missed, v.n_scans)
    at_points = sensitivities_at(fps, sens, points)
    if n_bootstrap:
        at_boot, on_band = bootstrap_sensitivities(
            v.is_tp,
            v.probabilities,
            v.missed,
            v.scan_index,
            v.n_scans,
            n_bootstrap=n_bootstrap,
            rng=np.random.default_rng(seed),
            points=(points, BAND_FPS),
        )
        cpm_lo, cpm_hi = order_statistic_interval(at_boot.mean(axis=1), CONFIDENCE)
        cpm_ci = (float(cpm_lo), float(cpm_hi))
        sens_lo, sens_hi = order_statistic_interval(at_boot, CONFIDENCE)
        band_lo, band_hi = order_statistic_interval(on_band, CONFIDENCE)
    else:
        cpm_ci = (np.nan, np.nan)
        sens_lo = sens_hi = np.full(len(points), np.nan)
        band_lo = band_hi = np.full(len(BAND_FPS), np.nan)
    return FrocResult(
        fp_rates=FP_RATES,
        sensitivities=tuple(float(s) for s in at_points),
        cpm=float(np.mean(at_points)),
        cpm_ci=cpm_ci,
        sensitivity_ci=tuple((float(lo), float(hi)) for lo, hi in zip(sens_lo, sens_hi)),
        froc_fps=fps,
        froc_sens=sens,
        n_scans=len(uids),
        n_nodules=v.n_nodules,
        n_candidates=found.n_candidates,
        n_true_positives=found.n_true_positives,
        n_false_positives=found.n_false_positives,
        band_fps=BAND_FPS.copy(),
        band_lower=band_lo,
        band_upper=band_hi,
        cpm_definition=cpm_definition,
        cpm_fp_points=points,
        seriesuids=tuple(uids),
        vectors=v,
    )


@dataclass(frozen=True)
class PairedDifference:
    """ΔCPM = CPM(a) − CPM(b) of two systems on the same scans, with a paired bootstrap.

    Attributes:
        delta: CPM(a) − CPM(b) of the point estimates.
        ci: ``(lo, hi)`` bootstrap interval of the difference (the order statistics of
            :func:`~medssl.metrics.froc.order_statistic_interval`).
        p_value: two-sided bootstrap p-value of "no difference":
            ``min(1, 2 * min(1 + #{Δ* <= 0}, 1 + #{Δ* >= 0}) / (B + 1))``
            (the usual ``(1 + count) / (B + 1)`` bootstrap p-value, Davison & Hinkley
            1997, ch. 4, doubled for two sides).
        fraction_not_positive: share of the bootstrap differences that are <= 0.
        cpm_a, cpm_b: the two CPMs.
        n_scans: scans resampled.
        n_bootstrap: bootstrap samples B.
        confidence: the interval's level.
        cpm_definition: the CPM reading of both systems.
    """

    delta: float
    ci: tuple[float, float]
    p_value: float
    fraction_not_positive: float
    cpm_a: float
    cpm_b: float
    n_scans: int
    n_bootstrap: int
    confidence: float
    cpm_definition: CpmDefinition

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types, one key per attribute."""
        return {
            "delta": self.delta,
            "ci": [self.ci[0], self.ci[1]],
            "p_value": self.p_value,
            "fraction_not_positive": self.fraction_not_positive,
            "cpm_a": self.cpm_a,
            "cpm_b": self.cpm_b,
            "n_scans": self.n_scans,
            "n_bootstrap": self.n_bootstrap,
            "confidence": self.confidence,
            "cpm_definition": self.cpm_definition,
        }


def paired_bootstrap_cpm(
    a: FrocResult,
    b: FrocResult,
    *,
    n_bootstrap: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedDifference:
    """Paired bootstrap over scans of ΔCPM = CPM(a) − CPM(b).

    Each sample draws ``n_scans`` scan indices with replacement, once, and
    recomputes both systems' FROC curves and CPMs on those same scans (as the
    official ``computeFROC_bootstrap`` does for one system), so the difficulty of
    a scan, shared by both systems, cancels in the difference. The CPM reading is
    the results' ``cpm_definition``.

    Args:
        a, b: results of :func:`evaluate_luna16` (which keeps the per-scan FROC
            vectors) on the same seriesuids in the same order, with the same
            ``cpm_definition``.
        n_bootstrap: number of samples, >= 1.
        seed: seed of the ``numpy.random.Generator`` that draws the scans.
        confidence: level of the interval, in (0, 1).

    Raises:
        ValueError: a result without FROC vectors, different scans or scan order,
            different CPM definitions, ``n_bootstrap`` < 1 or ``confidence``
            outside (0, 1).
    """
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    for name, result in (("a", a), ("b", b)):
        if result.vectors is None:
            raise ValueError(
                f"result {name} has no per-scan FROC vectors; compute it with evaluate_luna16, "
                "which keeps them"
            )
    if a.seriesuids != b.seriesuids:
        if set(a.seriesuids) == set(b.seriesuids):
            problem = "the same scans in another order"
        else:
            only_a = sorted(set(a.seriesuids) - set(b.seriesuids))[:3]
            only_b = sorted(set(b.seriesuids) - set(a.seriesuids))[:3]
            problem = f"scans only in a: {only_a}, only in b: {only_b}"
        raise ValueError(
            f"a paired comparison needs both systems evaluated on the same seriesuids in the "
            f"same order; got {problem}: evaluate both with one seriesuids list"
        )
    if a.cpm_definition != b.cpm_definition:
        raise ValueError(
            f"the results read the CPM differently (a: {a.cpm_definition!r}, b: "
            f"{b.cpm_definition!r}); evaluate both with one cpm_definition"
        )
    assert a.vectors is not None and b.vectors is not None
    points = cpm_points(a.cpm_definition)
    sens_a, sens_b = paired_bootstrap_sensitivities(
        a.vectors,
        b.vectors,
        n_bootstrap=n_bootstrap,
        rng=np.random.default_rng(seed),
        points=points,
    )
    deltas = sens_a.mean(axis=1) - sens_b.mean(axis=1)
    lo, hi = order_statistic_interval(deltas, confidence)
    not_positive = int(np.sum(deltas <= 0))
    not_negative = int(np.sum(deltas >= 0))
    p_value = min(1.0, 2.0 * (1 + min(not_positive, not_negative)) / (n_bootstrap + 1))
    return PairedDifference(
        delta=float(a.cpm - b.cpm),
        ci=(float(lo), float(hi)),
        p_value=float(p_value),
        fraction_not_positive=not_positive / n_bootstrap,
        cpm_a=float(a.cpm),
        cpm_b=float(b.cpm),
        n_scans=a.n_scans,
        n_bootstrap=n_bootstrap,
        confidence=confidence,
        cpm_definition=a.cpm_definition,
    )


def label_candidates(
    annotations: Sequence[Finding],
    excluded: Sequence[Finding],
    seriesuids: Sequence[str],
    predictions: Sequence[Finding],
    *,
    max_marks_per_scan: int = MAX_MARKS_PER_SCAN,
) -> np.ndarray:
    """The LUNA16 label of every mark, for calibration and operating points.

    The same matching as :func:`evaluate_luna16` (hit rule, excluded findings,
    per-scan cap).

    Args:
        annotations, excluded, seriesuids, predictions: as :func:`evaluate_luna16`.
        max_marks_per_scan: the per-scan cap (official: 100); < 1 keeps every mark.

    Returns:
        ``(len(predictions),)`` int8, in the order of ``predictions``: 1 the mark hits
        an annotated nodule (every hitting mark, not only the best), 0 a false
        positive, -1 ignored (hits only an excluded finding, is on a series not in
        ``seriesuids``, or fell to the per-scan cap).

    Raises:
        EvaluationInputError: as :func:`evaluate_luna16`.
    """
    uids = _checked_seriesuids(seriesuids)
    _check_predictions(predictions)
    _, labels = _match(annotations, excluded, uids, predictions, max_marks_per_scan)
    return labels


def froc_at_thresholds(
    annotations: Sequence[Finding],
    excluded: Sequence[Finding],
    seriesuids: Sequence[str],
    predictions: Sequence[Finding],
    thresholds: Sequence[float] | np.ndarray,
    *,
    max_marks_per_scan: int = MAX_MARKS_PER_SCAN,
) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity and FP/scan at each probability threshold (marks with ``p >= t`` kept).

    For each ``t``: sensitivity = nodules hit by at least one mark with ``p >= t`` /
    all annotated nodules of the listed scans; FP/scan = marks with ``p >= t``
    labelled 0 by :func:`label_candidates` / number of scans. The per-scan cap
    applies first, as in :func:`evaluate_luna16`, so at a threshold equal to the
    score of a point of ``FrocResult.froc_fps``/``froc_sens`` the pair is that point.

    Args:
        annotations, excluded, seriesuids, predictions: as :func:`evaluate_luna16`.
        thresholds: ``(T,)`` probabilities (any order, not NaN).
        max_marks_per_scan: the per-scan cap (official: 100); < 1 keeps every mark.

    Returns:
        ``(sensitivity, fp_per_scan)``, each ``(T,)`` float.

    Raises:
        EvaluationInputError: as :func:`evaluate_luna16`.
        ValueError: ``thresholds`` is not 1-D or holds NaN.
    """
    uids = _checked_seriesuids(seriesuids)
    _check_predictions(predictions)
    found, _ = _match(annotations, excluded, uids, predictions, max_marks_per_scan)
    return threshold_froc(found.frozen(len(uids)), np.asarray(thresholds, dtype=float))


def _match(
    annotations: Sequence[Finding],
    excluded: Sequence[Finding],
    seriesuids: Sequence[str],
    predictions: Sequence[Finding],
    max_marks: int,
) -> tuple[_FrocVectors, np.ndarray]:
    """Match every listed scan's marks to its findings (``evaluateCAD``), scan by scan.

    Returns:
        The FROC vectors, and the ``(len(predictions),)`` int8 label of each mark
        (1 hit, 0 false positive, -1 ignored; see :func:`label_candidates`).
    """
    wanted = set(seriesuids)
    marks: dict[str, list[int]] = {}
    for i, p in enumerate(predictions):
        if p.series_uid in wanted:  # marks on unlisted series are ignored, as officially
            marks.setdefault(p.series_uid, []).append(i)
    nodules = _by_series(annotations, wanted)
    irrelevant = _by_series(excluded, wanted)
    vectors = _FrocVectors()
    labels = np.full(len(predictions), -1, dtype=np.int8)
    for scan, uid in enumerate(seriesuids):
        indices = np.asarray(marks.get(uid, []), dtype=np.int64)
        scores = np.array([predictions[i].probability for i in indices], dtype=float)
        kept = indices[_cap_marks(scores, max_marks)]
        labels[kept] = _match_scan(
            scan,
            nodules.get(uid, []),
            irrelevant.get(uid, []),
            [predictions[i] for i in kept],
            vectors,
        )
    return vectors, labels


def _by_series(findings: Sequence[Finding], wanted: set[str]) -> dict[str, list[Finding]]:
    grouped: dict[str, list[Finding]] = {}
    for f in findings:
        if f.series_uid in wanted:
            grouped.setdefault(f.series_uid, []).append(f)
    return grouped


def _cap_marks(scores: np.ndarray, max_marks: int) -> np.ndarray:
    """``(C,)`` bool: which of a scan's marks the per-scan cap keeps.

    ``evaluateCAD``, ``maxNumberOfCADMarks``.

    With more marks than ``max_marks``, keep those scored strictly above the
    ``(max_marks + 1)``-th highest score; ties at that score all go, so fewer
    than ``max_marks`` may remain. ``max_marks`` < 1 keeps every mark.
    """
    if max_marks < 1 or len(scores) <= max_marks:
        return np.ones(len(scores), dtype=bool)
    threshold = np.sort(scores)[::-1][max_marks]
    return scores > threshold


def _hits(points: np.ndarray, findings: Sequence[Finding]) -> np.ndarray:
    """``(C, F)`` bool: mark c lies strictly inside finding f's sphere.

    Args:
        points: ``(C, 3)`` mark centres, LPS mm.
        findings: F findings; a diameter < 0 counts as :data:`DEFAULT_DIAMETER_MM`.
    """
    if not findings:
        return np.zeros((len(points), 0), dtype=bool)
    centres = np.array([f.centre_lps for f in findings], dtype=float)
    diameters = np.array([f.diameter_mm for f in findings], dtype=float)
    diameters = np.where(diameters < 0.0, DEFAULT_DIAMETER_MM, diameters)
    d = centres[None, :, :] - points[:, None, :]
    # Summed x, y, z in the official order: dist = dx**2 + dy**2 + dz**2 < (diameter / 2)**2.
    dist2 = d[..., 0] ** 2 + d[..., 1] ** 2 + d[..., 2] ** 2
    return dist2 < (diameters / 2.0) ** 2


def _match_scan(
    scan: int,
    nodules: Sequence[Finding],
    irrelevant: Sequence[Finding],
    marks: Sequence[Finding],
    vectors: _FrocVectors,
) -> np.ndarray:
    """Append one scan's entries to ``vectors``: one per nodule, one per false positive.

    Returns:
        ``(C,)`` int8 label of each mark: 1 hits a nodule, -1 hits only excluded
        findings, 0 a false positive.
    """
    points = np.array([m.centre_lps for m in marks], dtype=float).reshape(-1, 3)
    scores = np.array([m.probability for m in marks], dtype=float)
    on_nodule = _hits(points, nodules)
    for k in range(len(nodules)):
        hit_by = on_nodule[:, k]
        if hit_by.any():  # scored once, with its best hit
            vectors.add(scan, True, float(scores[hit_by].max()))
            vectors.n_true_positives += 1
        else:  # official: minProbValue, excludeList True: in the denominator only
            vectors.add(scan, True, -math.inf, missed=True)
    hit = on_nodule.any(axis=1)
    consumed = hit | _hits(points, irrelevant).any(axis=1)
    for score in scores[~consumed]:
        vectors.add(scan, False, float(score))
        vectors.n_false_positives += 1
    vectors.n_candidates += len(marks)
    return np.where(hit, 1, np.where(consumed, -1, 0)).astype(np.int8)


def _checked_seriesuids(seriesuids: Sequence[str], path: Path | None = None) -> list[str]:
    uids = list(seriesuids)
    if not uids:
        raise EvaluationInputError(path, "no seriesuids: nothing to evaluate")
    seen: set[str] = set()
    for uid in uids:
        if uid in seen:
            raise EvaluationInputError(
                path, f"seriesuid {uid} is listed more than once; list each scan once"
            )
        seen.add(uid)
    return uids


def _check_predictions(predictions: Sequence[Finding]) -> None:
    for i, p in enumerate(predictions):
        values = (*p.centre_lps, p.probability)
        if len(values) != 4 or not all(math.isfinite(v) for v in values):
            raise EvaluationInputError(
                None,
                f"prediction {i} ({p.series_uid}): centre {p.centre_lps} and probability "
                f"{p.probability} must be 3 + 1 finite numbers",
            )


def evaluate_luna16_files(
    annotations_csv: str | Path,
    excluded_csv: str | Path,
    seriesuids_csv: str | Path,
    predictions_csv: str | Path,
    **kw: Any,
) -> FrocResult:
    """:func:`evaluate_luna16` on the official files.

    Args:
        annotations_csv: ``annotations.csv`` (``seriesuid,coordX,coordY,coordZ,diameter_mm``).
        excluded_csv: ``annotations_excluded.csv``, same columns.
        seriesuids_csv: ``seriesuids.csv``, one seriesuid per line, no header.
        predictions_csv: the submission (``seriesuid,coordX,coordY,coordZ,probability``).
        **kw: passed to :func:`evaluate_luna16` (``n_bootstrap``, ``seed``,
            ``max_marks_per_scan``, ``cpm_definition``).

    Raises:
        EvaluationInputError: a file is missing, lacks a column or holds a bad value;
            the message names the file.
    """
    return evaluate_luna16(
        _read_findings_file(annotations_csv),
        _read_findings_file(excluded_csv),
        read_seriesuids(seriesuids_csv),
        read_predictions(predictions_csv),
        **kw,
    )


def _read_findings_file(path: str | Path) -> list[Finding]:
    path = Path(path)
    _require_file(path)
    try:
        return read_findings(path)
    except DatasetLayoutError as exc:
        raise EvaluationInputError(path, str(exc).removeprefix(f"{path}: ")) from None
    except (ValueError, TypeError) as exc:  # float('') or a short row (None)
        raise EvaluationInputError(
            path, f"a coordinate or diameter is not a number ({exc})"
        ) from None


def read_seriesuids(path: str | Path) -> list[str]:
    """The scans of ``seriesuids.csv``: the first field of each non-blank line.

    Raises:
        EvaluationInputError: missing file, no seriesuid, a header line, or a repeat.
    """
    path = Path(path)
    _require_file(path)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        uids = [row[0].strip() for row in csv.reader(fh) if row and row[0].strip()]
    if uids and uids[0] == "seriesuid":
        raise EvaluationInputError(
            path,
            "line 1 is a header ('seriesuid'); seriesuids.csv lists one seriesuid per "
            "line without a header (every line counts as a scan)",
        )
    return _checked_seriesuids(uids, path)


def read_predictions(path: str | Path) -> list[Finding]:
    """CAD marks from an official submission CSV: ``seriesuid,coordX,coordY,coordZ,probability``.

    Coordinates are world mm (LPS, the ITK frame of the ``.mhd`` files); other
    columns are ignored; a probability may be any finite score.

    Raises:
        EvaluationInputError: missing file, missing column, or a value that is
            not a finite number (the message names the line).
    """
    path = Path(path)
    _require_file(path)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in PREDICTION_FIELDS if c not in (reader.fieldnames or [])]
        if missing:
            raise EvaluationInputError(
                path, f"missing columns {missing}; expected header {','.join(PREDICTION_FIELDS)}"
            )
        return [_prediction(path, reader.line_num, row) for row in reader]


def _prediction(path: Path, line: int, row: dict[str, str]) -> Finding:
    values = []
    for column in PREDICTION_FIELDS[1:]:
        text = row[column]
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise EvaluationInputError(
                path, f"line {line}: {column} {text!r} is not a number"
            ) from None
        if not math.isfinite(value):
            raise EvaluationInputError(path, f"line {line}: {column} {text!r} is not finite")
        values.append(value)
    x, y, z, probability = values
    return Finding(centre_lps=(x, y, z), probability=probability, series_uid=row["seriesuid"])


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise EvaluationInputError(path, "no such file")


def write_predictions(path: str | Path, predictions: Sequence[Finding]) -> Path:
    """Write an official submission CSV (atomically); values round-trip exactly through
    :func:`read_predictions`."""
    path = Path(path)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(PREDICTION_FIELDS)
    for p in predictions:
        writer.writerow(
            [p.series_uid, *(repr(float(v)) for v in p.centre_lps), repr(float(p.probability))]
        )
    data = text.getvalue().encode("utf-8")
    atomic_write(path, lambda fh: fh.write(data))
    return path


def plot_froc(result: FrocResult, path: str | Path) -> Path:
    """Draw the FROC curve, its bootstrap 95% band and the seven CPM points to a PNG.

    The x axis is FP/scan on a log scale from 1/8 to 8 (as the official plot);
    the curve is drawn through its own vertices in that range, with its
    ``np.interp`` values at both ends.
    Needs matplotlib (Agg canvas; pyplot and the global backend are not touched).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    lo, hi = FP_RATES[0], FP_RATES[-1]
    fps, sens = result.froc_fps, result.froc_sens
    inside = (fps > lo) & (fps < hi)  # the curve's own vertices, clipped to the axis
    xs = np.concatenate([[lo], fps[inside], [hi]])
    ys = np.concatenate([[np.interp(lo, fps, sens)], sens[inside], [np.interp(hi, fps, sens)]])
    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if result.band_fps.size:
        ax.fill_between(
            result.band_fps,
            result.band_lower,
            result.band_upper,
            color="tab:blue",
            alpha=0.15,
            linewidth=0,
            label=f"bootstrap {CONFIDENCE:.0%} CI",
        )
    ax.plot(
        xs,
        ys,
        color="tab:blue",
        lw=2,
        label=f"CPM {result.cpm:.3f} [{result.cpm_ci[0]:.3f}, {result.cpm_ci[1]:.3f}]",
    )
    ax.plot(result.fp_rates, result.sensitivities, "o", color="tab:blue")
    ax.set_xscale("log", base=2)
    ax.set_xlim(lo, hi)
    ax.set_xticks(FP_RATES, ["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    ax.set_ylim(0, 1)
    ax.set_yticks(np.linspace(0, 1, 11))
    ax.grid(True, which="both", alpha=0.4)
    ax.set_xlabel("Average number of false positives per scan")
    ax.set_ylabel("Sensitivity")
    ax.set_title(f"FROC: {result.n_scans} scans, {result.n_nodules} nodules")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path
