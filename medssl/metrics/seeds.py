"""Statistics over training seeds: what a method's score is, and whether it beats another.

When seed-to-seed spread dominates (as it does for small-data training), the unit of evidence is
the seed: a run per seed, every method on the same split and the same seeds, so that methods can
be compared seed by seed (paired). These functions take one score per seed.

* :func:`seed_interval`: mean and Student's t confidence interval over seeds;
* :func:`paired_difference`: mean and t interval of the per-seed differences ``a − b``;
* :func:`gap_recovered`: the share of the gap between a few-label baseline and its all-label
  ceiling that a method closes, ``(method − few) / (ceiling − few)``, with a bootstrap interval
  (seeds resampled: the method and its paired baseline together, the ceiling on its own).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medssl.metrics.froc import order_statistic_interval

__all__ = ["Interval", "gap_recovered", "paired_difference", "seed_interval"]


@dataclass(frozen=True)
class Interval:
    """A point estimate and its confidence interval (NaN bounds when it cannot be computed,
    e.g. from a single seed); ``n``: the seeds it rests on."""

    value: float
    lo: float
    hi: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def to_json(self) -> dict[str, float | int | None]:
        def clean(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        return {"value": clean(self.value), "lo": clean(self.lo), "hi": clean(self.hi), "n": self.n}


def seed_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean over seeds ± Student's t half-width (``t_{n−1}`` quantile × SD / √n).

    Raises:
        ValueError: no values.
    """
    from scipy import stats

    if not values:
        raise ValueError("no values: need one score per seed")
    xs = [float(v) for v in values]
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return Interval(mean, math.nan, math.nan, 1)
    half = (
        float(stats.t.ppf(0.5 + confidence / 2, len(xs) - 1))
        * statistics.stdev(xs)
        / math.sqrt(len(xs))
    )
    return Interval(mean, mean - half, mean + half, len(xs))


def paired_difference(
    a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95
) -> Interval:
    """``a − b`` over the seeds both have: the mean per-seed difference and its t interval.

    Raises:
        ValueError: no seed in common.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"no seed in common (a: {sorted(a)}, b: {sorted(b)})")
    return seed_interval([a[s] - b[s] for s in seeds], confidence)


def gap_recovered(
    method: Mapping[int, float],
    few: Mapping[int, float],
    ceiling: Sequence[float],
    *,
    confidence: float = 0.95,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> Interval:
    """``(mean(method) − mean(few)) / (mean(ceiling) − mean(few))`` over the paired seeds, with a
    percentile bootstrap interval (pairs of (method, few) seeds and ceiling seeds resampled
    independently; resamples whose gap is not positive are dropped, and counted against the
    interval by leaving it NaN when they exceed 2.5 %).

    Args:
        method, few: score per seed of the method and of the supervised baseline on the same
            labeled cases.
        ceiling: scores of supervised training on every label (any seeds).

    Returns:
        NaN value when the ceiling is not above the baseline (there is no gap to recover).
    """
    seeds = sorted(set(method) & set(few))
    if not seeds or not ceiling:
        raise ValueError("need paired seeds of method and baseline, and at least one ceiling score")
    m = np.array([method[s] for s in seeds], dtype=float)
    f = np.array([few[s] for s in seeds], dtype=float)
    c = np.asarray(ceiling, dtype=float)
    gap = c.mean() - f.mean()
    if gap <= 0:
        return Interval(math.nan, math.nan, math.nan, len(seeds))
    value = float((m.mean() - f.mean()) / gap)
    if len(seeds) < 2 or len(c) < 2:
        return Interval(value, math.nan, math.nan, len(seeds))
    rng = np.random.default_rng(seed)
    pairs = rng.integers(0, len(seeds), size=(n_bootstrap, len(seeds)))
    tops = rng.integers(0, len(c), size=(n_bootstrap, len(c)))
    gaps = c[tops].mean(axis=1) - f[pairs].mean(axis=1)
    valid = gaps > 0
    if valid.mean() < 1 - (1 - confidence) / 2:
        return Interval(value, math.nan, math.nan, len(seeds))
    ratios = (m[pairs].mean(axis=1) - f[pairs].mean(axis=1))[valid] / gaps[valid]
    lo, hi = order_statistic_interval(ratios, confidence)
    return Interval(value, float(lo), float(hi), len(seeds))
