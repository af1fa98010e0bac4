"""FROC analysis and the CPM score, as LUNA16's ``noduleCADEvaluationLUNA16.py`` computes them.

Pure numpy (plus ``sklearn.metrics.roc_curve``, which the official script uses):
nothing here knows about files, coordinates or seriesuids. The inputs are the
official script's "FROC vectors", one entry per counted item:

* ``is_tp``: 1 for an annotated nodule, 0 for a false-positive candidate
  (``FROCGTList``);
* ``probabilities``: the nodule's best hit, or the candidate's own score
  (``FROCProbList``);
* ``missed``: True for a nodule no candidate hit (``excludeList``); such an
  entry adds to the sensitivity denominator but not to the ROC;
* ``scan_index``: which scan (0..n_scans-1) the entry belongs to
  (``FPDivisorList``), for the bootstrap over scans.

Sensitivity is a fraction of annotated nodules; false positives are counted per
scan (FP/scan).

Two readings of the CPM (``cpm_definition``):

* ``"interpolated"`` (the default): the FROC curve read by linear interpolation
  (``np.interp``) at exactly 1/8, 1/4, 1/2, 1, 2, 4 and 8 FP/scan
  (:data:`FP_RATES`). This is the definition of the LUNA16 paper (Setio et al.
  2017, Med. Image Anal. 42:1-13, section "Evaluation": "the average sensitivity
  at seven predefined false positive rates: 1/8, 1/4, 1/2, 1, 2, 4, and 8 FPs per
  scan", after Niemeijer et al. 2011), and of MONAI's
  ``monai.metrics.froc.compute_froc_score``.
* ``"grid"``: what ``noduleCADEvaluationLUNA16.py`` prints: the curve resampled on
  ``linspace(1/8, 8, 10001)`` and read at the grid point nearest each rate
  (:data:`CPM_FP_POINTS`). It differs from the paper's reading where the curve
  has a step between a rate and its grid point (e.g. between 0.25 and 0.2502125).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "CPM_DEFINITIONS",
    "CPM_FP_POINTS",
    "FP_RATES",
    "CpmDefinition",
    "FrocVectors",
    "bootstrap_sensitivities",
    "cpm",
    "cpm_points",
    "froc_curve",
    "order_statistic_interval",
    "paired_bootstrap_sensitivities",
    "sensitivities_at",
    "threshold_froc",
]

#: How the CPM reads the FROC curve: at the exact rates, or at the official grid's points.
CpmDefinition = Literal["interpolated", "grid"]
CPM_DEFINITIONS: tuple[str, ...] = ("interpolated", "grid")

#: The seven FP/scan operating points of the CPM (Niemeijer et al. 2011; LUNA16).
FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

#: noduleCADEvaluationLUNA16.py, ``evaluateCAD``: ``fps_itp = np.linspace(FROC_minX, FROC_maxX,
#: num=10001)`` with ``sens_itp = np.interp(fps_itp, fps, sens)``; the CPM is read off this curve
#: at the grid point closest to each rate (the ``abs(fp - nxth) < 3e-4`` loop that the LUNA16 code
#: bases carry along with the script). 0.125 and 8 are grid points; the other five lie up to
#: 2.9e-4 FP/scan away from the nominal rate (e.g. 0.49985 for 0.5, 4.0002875 for 4).
_OFFICIAL_GRID = np.linspace(FP_RATES[0], FP_RATES[-1], num=10001)
CPM_FP_POINTS: tuple[float, ...] = tuple(
    float(_OFFICIAL_GRID[np.argmin(np.abs(_OFFICIAL_GRID - rate))]) for rate in FP_RATES
)


def cpm_points(cpm_definition: CpmDefinition = "interpolated") -> tuple[float, ...]:
    """The seven FP/scan values at which the CPM reads the FROC curve.

    Args:
        cpm_definition: ``"interpolated"`` (the LUNA16 paper, MONAI): exactly
            :data:`FP_RATES`; ``"grid"`` (``noduleCADEvaluationLUNA16.py``'s printout):
            the official grid's points nearest them, :data:`CPM_FP_POINTS`.

    Raises:
        ValueError: ``cpm_definition`` is neither.
    """
    if cpm_definition == "interpolated":
        return FP_RATES
    if cpm_definition == "grid":
        return CPM_FP_POINTS
    raise ValueError(
        f"cpm_definition must be one of {list(CPM_DEFINITIONS)}, got {cpm_definition!r}: "
        "'interpolated' reads the FROC at exactly 1/8 ... 8 FP/scan (LUNA16 paper), "
        "'grid' at the official script's 10001-point grid"
    )


@dataclass(frozen=True, eq=False)
class FrocVectors:
    """The FROC vectors of one system on ``n_scans`` scans (see the module docstring).

    Attributes:
        is_tp: ``(N,)`` float, 1 for a nodule entry, 0 for a false positive.
        probabilities: ``(N,)`` float, the nodule's best hit or the FP's score
            (``-inf`` for a missed nodule).
        missed: ``(N,)`` bool, True for a nodule no mark hit.
        scan_index: ``(N,)`` int64, the scan (0..n_scans-1) of each entry.
        n_scans: number of scans, with or without entries (the FP/scan divisor).
    """

    is_tp: np.ndarray
    probabilities: np.ndarray
    missed: np.ndarray
    scan_index: np.ndarray
    n_scans: int

    def __post_init__(self) -> None:
        arrays = {
            "is_tp": np.asarray(self.is_tp, dtype=float),
            "probabilities": np.asarray(self.probabilities, dtype=float),
            "missed": np.asarray(self.missed, dtype=bool),
            "scan_index": np.asarray(self.scan_index, dtype=np.int64),
        }
        shapes = {name: a.shape for name, a in arrays.items()}
        if len(set(shapes.values())) != 1 or len(shapes["is_tp"]) != 1:
            raise ValueError(f"FROC vectors must be 1-D of one length, got shapes {shapes}")
        if self.n_scans < 1:
            raise ValueError(f"n_scans must be >= 1, got {self.n_scans}")
        index = arrays["scan_index"]
        if index.size and (index.min() < 0 or index.max() >= self.n_scans):
            raise ValueError(
                f"scan_index must lie in [0, {self.n_scans - 1}], got "
                f"[{index.min()}, {index.max()}]"
            )
        for name, a in arrays.items():
            object.__setattr__(self, name, a)

    @property
    def n_nodules(self) -> int:
        """Annotated nodules, hit or missed."""
        return int(self.is_tp.sum())


def froc_curve(
    is_tp: np.ndarray, probabilities: np.ndarray, missed: np.ndarray, n_scans: int
) -> tuple[np.ndarray, np.ndarray]:
    """The FROC curve of one set of FROC vectors (noduleCADEvaluationLUNA16.py, ``computeFROC``).

    ``roc_curve`` runs on the entries that are not ``missed``; then
    ``fps = fpr * n_false_positives / n_scans`` and
    ``sens = tpr * n_detected / n_nodules``, where ``n_nodules`` counts missed
    nodules too.

    Args:
        is_tp: ``(N,)`` 1 for a nodule entry, 0 for a false positive.
        probabilities: ``(N,)`` scores; any finite values (only their order matters).
        missed: ``(N,)`` bool, True for nodules that no candidate hit.
        n_scans: the FP/scan divisor (all evaluated scans, with or without entries).

    Returns:
        ``(fps, sens)``, each ``(K,)``: FP/scan (non-decreasing, from 0) and
        sensitivity in [0, 1], one point per ROC threshold.

    Border cases, where the official script divides by zero (NaN) or crashes:

    * no counted entry at all (no candidates, or only missed nodules):
      ``([0.], [0.])``, a curve at sensitivity 0;
    * no detected nodule (no annotated nodules, or none hit): sensitivity 0
      everywhere, FP/scan as usual;
    * no false positive: FP/scan 0 at every point (as the official script), so
      the sensitivity at any rate > 0 is the final recall.

    FP/scan and sensitivity are computed from counts (``k / n_scans``,
    ``j / n_nodules``), so a curve point equals the rate it stands for exactly.
    """
    is_tp = np.asarray(is_tp, dtype=float)
    probabilities = np.asarray(probabilities, dtype=float)
    counted = ~np.asarray(missed, dtype=bool)
    labels = is_tp[counted]
    scores = probabilities[counted]
    n_nodules = float(is_tp.sum())
    n_detected = float(labels.sum())
    n_false_positives = float(labels.size - n_detected)
    if labels.size == 0:
        return np.zeros(1), np.zeros(1)
    from sklearn.metrics import roc_curve  # 3 s to import on a small machine; only needed here

    with warnings.catch_warnings():
        # One class only: sklearn warns and returns NaN for the other rate; handled below.
        warnings.simplefilter("ignore")
        fpr, tpr, _ = roc_curve(labels, scores)
    # fpr * n_false_positives is a count: rounded to it, k / n_scans is exactly the rate it
    # stands for (5 FPs on 20 scans is 0.25, not 0.25 + 1 ulp), so a step that lies exactly at
    # a CPM rate is read at its top, as np.interp does, and not by a rounding accident.
    if n_false_positives == 0:  # official: "this system has no false positives"
        fps = np.zeros(len(fpr))
    else:
        fps = np.rint(fpr * n_false_positives) / n_scans
    sens = np.zeros(len(tpr)) if n_detected == 0 else np.rint(tpr * n_detected) / n_nodules
    return fps, sens


def sensitivities_at(
    fps: np.ndarray,
    sens: np.ndarray,
    points: Sequence[float] | None = None,
    *,
    cpm_definition: CpmDefinition | None = None,
) -> np.ndarray:
    """Sensitivity ``(P,)`` of a FROC curve at FP/scan ``points``, by ``np.interp``.

    Linear interpolation between the curve's points. Where the curve has several
    points at one FP/scan (a vertical step), ``np.interp`` returns the last, highest
    one; beyond the curve's last FP/scan it returns the final sensitivity.

    Args:
        fps, sens: ``(K,)`` the curve (:func:`froc_curve`), FP/scan non-decreasing.
        points: the FP/scan values to read; by default the seven CPM points of
            ``cpm_definition``.
        cpm_definition: ``"interpolated"`` (default: exactly :data:`FP_RATES`) or
            ``"grid"`` (:data:`CPM_FP_POINTS`); see :func:`cpm_points`.

    Raises:
        ValueError: both ``points`` and ``cpm_definition`` given, or an unknown
            ``cpm_definition``.
    """
    if points is not None and cpm_definition is not None:
        raise ValueError(
            f"give points or cpm_definition ({cpm_definition!r}), not both: points are read "
            "as given, cpm_definition chooses the seven CPM points"
        )
    if points is None:
        points = cpm_points(cpm_definition or "interpolated")
    return np.interp(np.asarray(points, dtype=float), fps, sens)


def cpm(
    fps: np.ndarray, sens: np.ndarray, *, cpm_definition: CpmDefinition = "interpolated"
) -> float:
    """Competition performance metric: mean sensitivity at the seven CPM points.

    Args:
        fps, sens: ``(K,)`` the FROC curve, FP/scan and sensitivity.
        cpm_definition: ``"interpolated"`` (default; the LUNA16 paper: exactly 1/8 ... 8
            FP/scan) or ``"grid"`` (the official script's grid points); see :func:`cpm_points`.
    """
    return float(np.mean(sensitivities_at(fps, sens, cpm_definition=cpm_definition)))


def bootstrap_sensitivities(
    is_tp: np.ndarray,
    probabilities: np.ndarray,
    missed: np.ndarray,
    scan_index: np.ndarray,
    n_scans: int,
    *,
    n_bootstrap: int,
    rng: np.random.Generator,
    points: Sequence[np.ndarray | Sequence[float]] = (FP_RATES,),
) -> list[np.ndarray]:
    """Bootstrap over scans (noduleCADEvaluationLUNA16.py, ``computeFROC_bootstrap``).

    Each sample draws ``n_scans`` scan indices with replacement
    (``generateBootstrapSet``), gathers every entry of every drawn scan (twice
    if drawn twice), builds its FROC curve with ``n_scans`` as the FP/scan
    divisor (:func:`froc_curve`) and reads the sensitivity at each set of
    ``points`` by ``np.interp``.

    Args:
        is_tp, probabilities, missed: ``(N,)`` FROC vectors, as :func:`froc_curve`.
        scan_index: ``(N,)`` int, the scan (0..n_scans-1) of each entry.
        n_scans: number of scans, with or without entries.
        n_bootstrap: number of samples, >= 1.
        rng: the random source (seed it for reproducible intervals).
        points: one or more FP/scan grids to read each curve at; by default the
            exact CPM rates (pass ``(cpm_points(definition),)`` to match a CPM
            computed with another definition).

    Returns:
        One ``(n_bootstrap, len(grid))`` array of sensitivities per grid in ``points``.
    """
    vectors = FrocVectors(is_tp, probabilities, missed, scan_index, n_scans)
    (out,) = _bootstrap([vectors], n_bootstrap=n_bootstrap, rng=rng, points=points)
    return out


def paired_bootstrap_sensitivities(
    a: FrocVectors,
    b: FrocVectors,
    *,
    n_bootstrap: int,
    rng: np.random.Generator,
    points: Sequence[float] = FP_RATES,
) -> tuple[np.ndarray, np.ndarray]:
    """Paired bootstrap over scans: each sample draws one set of scan indices and
    builds the FROC curves of both systems on those same scans.

    As :func:`bootstrap_sensitivities` (same draws for the same ``rng``), for two
    systems evaluated on the same scans, so that scan-to-scan difficulty, shared by
    both, cancels in their difference.

    Args:
        a, b: the two systems' FROC vectors; the same ``n_scans``, and scan ``i`` of
            ``a`` must be scan ``i`` of ``b``.
        n_bootstrap: number of samples, >= 1.
        rng: the random source.
        points: FP/scan values to read each curve at.

    Returns:
        ``(sens_a, sens_b)``, each ``(n_bootstrap, len(points))``.

    Raises:
        ValueError: different ``n_scans``, or ``n_bootstrap`` < 1.
    """
    if a.n_scans != b.n_scans:
        raise ValueError(
            f"paired bootstrap needs the same scans for both systems, got {a.n_scans} and "
            f"{b.n_scans} scans"
        )
    ((sens_a,), (sens_b,)) = _bootstrap([a, b], n_bootstrap=n_bootstrap, rng=rng, points=(points,))
    return sens_a, sens_b


class _ScanGroups:
    """One system's FROC vectors grouped by scan, to resample scans quickly."""

    def __init__(self, vectors: FrocVectors) -> None:
        self.vectors = vectors
        self.order = np.argsort(vectors.scan_index, kind="stable")
        self.counts = np.bincount(vectors.scan_index, minlength=vectors.n_scans)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])

    def curve(self, drawn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The FROC curve of the drawn scans ``(n_scans,)`` (a scan drawn twice counts twice)."""
        v = self.vectors
        take = self.order[_gather(self.starts[drawn], self.counts[drawn])]
        return froc_curve(v.is_tp[take], v.probabilities[take], v.missed[take], v.n_scans)


def _bootstrap(
    systems: Sequence[FrocVectors],
    *,
    n_bootstrap: int,
    rng: np.random.Generator,
    points: Sequence[np.ndarray | Sequence[float]],
) -> list[list[np.ndarray]]:
    """Per system, per grid: ``(n_bootstrap, len(grid))`` sensitivities; every system is
    resampled on the same drawn scans in each sample."""
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    n_scans = systems[0].n_scans
    groups = [_ScanGroups(v) for v in systems]
    grids = [np.asarray(p, dtype=float) for p in points]
    out = [[np.empty((n_bootstrap, g.size)) for g in grids] for _ in systems]
    for b in range(n_bootstrap):
        drawn = rng.integers(0, n_scans, size=n_scans)
        for group, sinks in zip(groups, out):
            fps, sens = group.curve(drawn)
            for grid, sink in zip(grids, sinks):
                sink[b] = np.interp(grid, fps, sens)
    return out


def threshold_froc(vectors: FrocVectors, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity and FP/scan when every mark scored below a threshold is dropped.

    For each threshold ``t``: sensitivity = nodules whose best hit scores ``>= t`` /
    all nodules (missed ones included); FP/scan = false positives scored ``>= t`` /
    ``n_scans``. These are the counts :func:`froc_curve` makes at its thresholds, so
    at a threshold equal to a curve point's score the pair is that point.

    Args:
        vectors: one system's FROC vectors.
        thresholds: ``(T,)`` scores (any order; not NaN).

    Returns:
        ``(sensitivity, fp_per_scan)``, each ``(T,)``; sensitivity 0 without nodules.

    Raises:
        ValueError: ``thresholds`` is not 1-D or holds NaN.
    """
    t = np.asarray(thresholds, dtype=float)
    if t.ndim != 1 or np.isnan(t).any():
        raise ValueError(
            f"thresholds must be a 1-D array of scores without NaN, got {thresholds!r}"
        )
    counted = ~vectors.missed
    hit = vectors.probabilities[counted & (vectors.is_tp == 1)]
    false = vectors.probabilities[counted & (vectors.is_tp == 0)]
    hit_count = (hit[None, :] >= t[:, None]).sum(axis=1)
    fp_count = (false[None, :] >= t[:, None]).sum(axis=1)
    n_nodules = vectors.n_nodules
    sens = hit_count / n_nodules if n_nodules else np.zeros(t.size)
    return sens.astype(float), fp_count / vectors.n_scans


def _gather(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ranges ``[starts[i], starts[i] + counts[i])``, as one int array."""
    total = int(counts.sum())
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + np.arange(total) - offsets


def order_statistic_interval(
    samples: np.ndarray, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bound of each column of ``samples`` ``(B, ...)``.

    noduleCADEvaluationLUNA16.py, ``compute_mean_ci``: sort the B values, take
    ``vec[floor(pz * B)]`` and ``vec[floor((1 - pz) * B)]`` with
    ``pz = (1 - confidence) / 2`` (for B = 1000: the 26th and 976th smallest).

    Returns:
        ``(lower, upper)``, each of shape ``samples.shape[1:]``.
    """
    ordered = np.sort(np.asarray(samples, dtype=float), axis=0)
    n = ordered.shape[0]
    pz = (1.0 - confidence) / 2.0
    return ordered[math.floor(pz * n)], ordered[math.floor((1.0 - pz) * n)]
