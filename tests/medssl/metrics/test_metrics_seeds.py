"""Statistics over training seeds (medssl.metrics.seeds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from medssl.metrics.seeds import gap_recovered, paired_difference, seed_interval


def test_seed_interval_is_the_student_t_interval():
    values = [0.61, 0.70, 0.66, 0.58, 0.73]
    got = seed_interval(values)
    lo, hi = stats.t.interval(0.95, 4, loc=np.mean(values), scale=stats.sem(values))
    assert (got.value, got.lo, got.hi, got.n) == pytest.approx((np.mean(values), lo, hi, 5))
    one = seed_interval([0.5])
    assert one.value == 0.5 and math.isnan(one.lo) and not one.excludes_zero
    with pytest.raises(ValueError, match="one score per seed"):
        seed_interval([])


def test_paired_difference_uses_only_common_seeds_and_removes_the_seed_effect():
    """Seed effects shared by both methods cancel: a constant +0.02 over a noisy baseline is
    significant paired, though the unpaired intervals overlap."""
    base = {0: 0.50, 1: 0.65, 2: 0.58, 3: 0.71, 4: 0.55, 9: 0.99}
    method = {s: v + 0.02 + 0.002 * (s % 2) for s, v in base.items() if s != 9}
    got = paired_difference(method, base)
    assert got.n == 5 and got.value == pytest.approx(0.0208)
    assert got.excludes_zero and got.lo > 0.019
    unpaired = seed_interval(list(method.values())), seed_interval([base[s] for s in method])
    assert unpaired[0].lo < unpaired[1].hi  # overlapping: unpaired would not decide
    with pytest.raises(ValueError, match="no seed in common"):
        paired_difference({0: 1.0}, {1: 1.0})


def test_gap_recovered_is_the_share_of_the_ceiling_gap_with_an_interval():
    few = {s: 0.60 + 0.01 * s for s in range(5)}
    method = {s: few[s] + 0.10 for s in range(5)}
    ceiling = [0.80, 0.81, 0.79, 0.80, 0.80]
    got = gap_recovered(method, few, ceiling)
    assert got.value == pytest.approx(0.10 / (0.80 - 0.62))
    assert got.lo < got.value < got.hi and got.lo > 0.4
    # a method at the ceiling recovers the whole gap; one at the baseline none of it
    assert gap_recovered(
        dict.fromkeys(range(5), 0.8), dict.fromkeys(range(5), 0.6), [0.8] * 3
    ).value == pytest.approx(1.0)
    assert gap_recovered(few, few, ceiling).value == pytest.approx(0.0)
    # no gap: nothing to recover
    assert math.isnan(gap_recovered(method, few, [0.55, 0.56]).value)
