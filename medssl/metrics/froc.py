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
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

__all__ = [
    "CPM_FP_POINTS",
    "FP_RATES",
    "bootstrap_sensitivities",
    "cpm",
    "froc_curve",
    "order_statistic_interval",
    "sensitivities_at",
]

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
    if n_false_positives == 0:  # official: "this system has no false positives"
        fps = np.zeros(len(fpr))
    else:
        fps = fpr * n_false_positives / n_scans
    if n_detected == 0:
        sens = np.zeros(len(tpr))
    else:
        sens = tpr * n_detected / n_nodules
    return fps, sens


def sensitivities_at(
    fps: np.ndarray, sens: np.ndarray, points: Sequence[float] = CPM_FP_POINTS
) -> np.ndarray:
    """Sensitivity ``(P,)`` of a FROC curve at FP/scan ``points``, by ``np.interp`` (official).

    Where the curve has several points at one FP/scan (a vertical step),
    ``np.interp`` returns the last, highest one; beyond the curve's last FP/scan
    it returns the final sensitivity.
    """
    return np.interp(np.asarray(points, dtype=float), fps, sens)


def cpm(fps: np.ndarray, sens: np.ndarray) -> float:
    """Competition performance metric: mean sensitivity at the seven :data:`CPM_FP_POINTS`."""
    return float(np.mean(sensitivities_at(fps, sens)))


def bootstrap_sensitivities(
    is_tp: np.ndarray,
    probabilities: np.ndarray,
    missed: np.ndarray,
    scan_index: np.ndarray,
    n_scans: int,
    *,
    n_bootstrap: int,
    rng: np.random.Generator,
    points: Sequence[np.ndarray | Sequence[float]] = (CPM_FP_POINTS,),
) -> list[np.ndarray]:
    """Bootstrap over scans (noduleCADEvaluationLUNA16.py, ``computeFROC_bootstrap``).

    Each sample draws ``n_scans`` scan indices with replacement
    (``generateBootstrapSet``), gathers every entry of every drawn scan (twice
    if drawn twice), builds its FROC curve with ``n_scans`` as the FP/scan
    divisor (:func:`froc_curve`) and reads the sensitivity at each set of
    ``points``.

    Args:
        is_tp, probabilities, missed: ``(N,)`` FROC vectors, as :func:`froc_curve`.
        scan_index: ``(N,)`` int, the scan (0..n_scans-1) of each entry.
        n_scans: number of scans, with or without entries.
        n_bootstrap: number of samples, >= 1.
        rng: the random source (seed it for reproducible intervals).
        points: one or more FP/scan grids to read each curve at.

    Returns:
        One ``(n_bootstrap, len(grid))`` array of sensitivities per grid in ``points``.
    """
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    is_tp, probabilities = np.asarray(is_tp, dtype=float), np.asarray(probabilities, dtype=float)
    missed, scan_index = np.asarray(missed, dtype=bool), np.asarray(scan_index, dtype=np.int64)
    order = np.argsort(scan_index, kind="stable")
    counts = np.bincount(scan_index, minlength=n_scans)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    grids = [np.asarray(p, dtype=float) for p in points]
    out = [np.empty((n_bootstrap, g.size)) for g in grids]
    for b in range(n_bootstrap):
        drawn = rng.integers(0, n_scans, size=n_scans)
        take = order[_gather(starts[drawn], counts[drawn])]
        fps, sens = froc_curve(is_tp[take], probabilities[take], missed[take], n_scans)
        for grid, sink in zip(grids, out):
            sink[b] = np.interp(grid, fps, sens)
    return out


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
