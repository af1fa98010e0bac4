"""A detector's operating point: the score threshold chosen on validation, and the rule that chose
it.

DICOM outputs (SR, SEG) hold the findings at or above the operating point; the Parquet
tables keep every candidate. The point is chosen on the validation scans' FROC (LUNA16
matching, :mod:`medssl.metrics.luna16`) by a rule the user states:

* ``fp_per_scan`` (default, target 1.0): the lowest candidate score whose validation
  false-positive rate is at most ``target`` per scan, i.e. the most sensitive threshold that
  keeps the FP rate within the target;
* ``sensitivity``: the highest candidate score whose validation sensitivity reaches
  ``target``, i.e. the fewest false positives that keep the sensitivity.

The threshold is always one of the validation marks' scores, and a finding is reported when
``probability >= threshold`` (ties at the threshold are all reported, as they are counted).
The probabilities are those scoring reports (calibrated ones, when the card's decoding
calibrates), so the threshold applies unchanged to ``findings.parquet``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

import numpy as np

from medssl.errors import MedsslError
from medssl.finding import Finding

__all__ = [
    "OperatingPoint",
    "OperatingPointError",
    "OperatingRule",
    "check_rule",
    "choose_operating_point",
    "choose_threshold",
]


class OperatingPointError(MedsslError):
    """No threshold meets the rule on these validation marks (the reason and what to do named)."""


class OperatingRule(str, Enum):
    """How the operating point is chosen on the validation FROC."""

    #: the lowest threshold whose validation false positives per scan are <= target
    FP_PER_SCAN = "fp_per_scan"
    #: the highest threshold whose validation sensitivity is >= target
    SENSITIVITY = "sensitivity"


def _rule(rule: str | OperatingRule) -> OperatingRule:
    try:
        return OperatingRule(rule)
    except ValueError:
        raise ValueError(
            f"rule must be one of {[r.value for r in OperatingRule]}, got {rule!r}"
        ) from None


def _check_target(rule: OperatingRule, target: float) -> float:
    target = float(target)
    if rule is OperatingRule.FP_PER_SCAN and not (math.isfinite(target) and target >= 0.0):
        raise ValueError(
            f"target of rule 'fp_per_scan' must be a finite FP rate >= 0 per scan, got {target}"
        )
    if rule is OperatingRule.SENSITIVITY and not 0.0 < target <= 1.0:
        raise ValueError(f"target of rule 'sensitivity' must be in (0, 1], got {target}")
    return target


def check_rule(rule: str | OperatingRule, target: float) -> tuple[OperatingRule, float]:
    """The rule and target, validated (as the other functions here take them).

    Raises:
        ValueError: an unknown rule, or a target out of the rule's range (both named).
    """
    rule = _rule(rule)
    return rule, _check_target(rule, target)


@dataclass(frozen=True)
class OperatingPoint:
    """A detector's reporting threshold and how it was chosen (the card's ``operating_point``).

    Attributes:
        threshold: findings with ``probability >= threshold`` are reported, in [0, 1].
        rule: the rule that chose it (:class:`OperatingRule`).
        target: the rule's target: FP per scan (``fp_per_scan``) or a sensitivity in (0, 1].
        validation_sensitivity: fraction of the validation nodules hit at this threshold.
        validation_fp_per_scan: false positives per validation scan at this threshold.
        n_scans: validation scans (the FP/scan divisor).
        n_nodules: annotated validation nodules (the sensitivity's denominator).
        source: what measured it (model, runner, data), for a reader of the card.

    Raises:
        ValueError: a value out of its range (the field named).
    """

    threshold: float
    rule: OperatingRule
    target: float
    validation_sensitivity: float
    validation_fp_per_scan: float
    n_scans: int
    n_nodules: int
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "rule", _rule(self.rule))
        object.__setattr__(self, "target", _check_target(self.rule, self.target))
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be a probability in [0, 1], got {self.threshold}")
        if not 0.0 <= float(self.validation_sensitivity) <= 1.0:
            raise ValueError(
                f"validation_sensitivity must be in [0, 1], got {self.validation_sensitivity}"
            )
        if not (math.isfinite(self.validation_fp_per_scan) and self.validation_fp_per_scan >= 0.0):
            raise ValueError(
                f"validation_fp_per_scan must be >= 0, got {self.validation_fp_per_scan}"
            )
        if int(self.n_scans) < 1 or int(self.n_nodules) < 0:
            raise ValueError(
                f"n_scans must be >= 1 and n_nodules >= 0, got {self.n_scans}, {self.n_nodules}"
            )
        if not isinstance(self.source, str):
            raise ValueError(f"source must be text, got {type(self.source).__name__}")

    def to_json(self) -> dict[str, Any]:
        """The card's ``operating_point`` object (plain JSON types)."""
        return {
            "threshold": float(self.threshold),
            "rule": self.rule.value,
            "target": float(self.target),
            "validation_sensitivity": float(self.validation_sensitivity),
            "validation_fp_per_scan": float(self.validation_fp_per_scan),
            "n_scans": int(self.n_scans),
            "n_nodules": int(self.n_nodules),
            "source": self.source,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OperatingPoint:
        """Parse :meth:`to_json`'s object.

        Raises:
            ValueError: not an object, unknown or missing keys (named), or a bad value.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"an operating point is a JSON object, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown keys {unknown} (known: {known})")
        missing = sorted(set(known) - {"source"} - set(data))
        if missing:
            raise ValueError(f"missing keys {missing}")
        return cls(
            threshold=float(data["threshold"]),
            rule=data["rule"],
            target=float(data["target"]),
            validation_sensitivity=float(data["validation_sensitivity"]),
            validation_fp_per_scan=float(data["validation_fp_per_scan"]),
            n_scans=int(data["n_scans"]),
            n_nodules=int(data["n_nodules"]),
            source=data.get("source", ""),
        )

    def describe(self) -> str:
        """One line for logs and reports."""
        goal = (
            f"<= {self.target:g} FP/scan"
            if self.rule is OperatingRule.FP_PER_SCAN
            else f"sensitivity >= {self.target:g}"
        )
        return (
            f"threshold {self.threshold:.4g} ({goal} on validation: sensitivity "
            f"{self.validation_sensitivity:.3f}, {self.validation_fp_per_scan:.3f} FP/scan, "
            f"{self.n_scans} scans, {self.n_nodules} nodules)"
        )


def choose_threshold(
    thresholds: np.ndarray,
    sensitivity: np.ndarray,
    fp_per_scan: np.ndarray,
    *,
    rule: str | OperatingRule = OperatingRule.FP_PER_SCAN,
    target: float = 1.0,
) -> int:
    """The index of the chosen threshold among candidates and their FROC values.

    Args:
        thresholds: ``(T,)`` candidate thresholds (the validation marks' distinct scores).
        sensitivity: ``(T,)`` sensitivity counting marks with ``score >= threshold``.
        fp_per_scan: ``(T,)`` false positives per scan, the same way.
        rule, target: see :class:`OperatingRule`. ``fp_per_scan``: the lowest threshold with
            ``fp_per_scan <= target`` (with no false positive at all, the lowest candidate);
            ``sensitivity``: the highest threshold with ``sensitivity >= target``.

    Raises:
        ValueError: a bad rule or target, or arrays of different lengths.
        OperatingPointError: no candidate, or no candidate meets the target (the best
            reachable value named): nothing is clamped.
    """
    rule = _rule(rule)
    target = _check_target(rule, target)
    t, sens, fps = (
        np.asarray(a, dtype=float).reshape(-1) for a in (thresholds, sensitivity, fp_per_scan)
    )
    if not len(t) == len(sens) == len(fps):
        raise ValueError(
            f"thresholds, sensitivity and fp_per_scan differ in length: {len(t)}, {len(sens)}, "
            f"{len(fps)}"
        )
    if len(t) == 0:
        raise OperatingPointError(
            "no candidate thresholds: the model marked nothing on the validation scans; "
            "check the model and the validation data before choosing an operating point"
        )
    if rule is OperatingRule.FP_PER_SCAN:
        ok = np.flatnonzero(fps <= target + 1e-12)
        if len(ok) == 0:
            raise OperatingPointError(
                f"no threshold keeps the validation FP rate at <= {target:g} per scan: "
                f"even the highest score ({t.max():.4g}) gives {fps[np.argmax(t)]:.3f} "
                "FP/scan; raise --op-target, or validate on more scans"
            )
        return int(ok[np.argmin(t[ok])])
    ok = np.flatnonzero(sens >= target - 1e-12)
    if len(ok) == 0:
        raise OperatingPointError(
            f"no threshold reaches a validation sensitivity of {target:g}: the most "
            f"the marks reach is {sens.max():.3f} (at threshold "
            f"{t[np.argmax(sens)]:.4g}); lower --op-target or use the fp_per_scan rule"
        )
    return int(ok[np.argmax(t[ok])])


def choose_operating_point(
    annotations: Sequence[Finding],
    excluded: Sequence[Finding],
    seriesuids: Sequence[str],
    predictions: Sequence[Finding],
    *,
    rule: str | OperatingRule = OperatingRule.FP_PER_SCAN,
    target: float = 1.0,
    source: str = "",
) -> OperatingPoint:
    """Choose the operating point on validation marks (LUNA16 matching).

    Args:
        annotations: the validation nodules, world LPS mm.
        excluded: findings that count neither way (LUNA16 ``annotations_excluded``).
        seriesuids: the validation scans (the FP/scan divisor); marks elsewhere are ignored.
        predictions: the model's marks on them, with the probabilities scoring reports.
        rule, target: see :class:`OperatingRule` and :func:`choose_threshold`; the candidate
            thresholds are the distinct scores of the marks on ``seriesuids``.
        source: recorded in the result (what model and data measured it).

    Raises:
        OperatingPointError: no marks on the validation scans, or the target is unreachable.
        ValueError: a bad rule or target.
    """
    from medssl.metrics import froc_at_thresholds

    rule = _rule(rule)
    target = _check_target(rule, target)
    wanted = set(seriesuids)
    candidates = np.unique([p.probability for p in predictions if p.series_uid in wanted])[::-1]
    if len(candidates) == 0:
        raise OperatingPointError(
            f"no predictions on the {len(wanted)} validation scans: the model marked "
            "nothing; check the model and the validation data"
        )
    sens, fps = froc_at_thresholds(annotations, excluded, seriesuids, predictions, candidates)
    k = choose_threshold(candidates, sens, fps, rule=rule, target=target)
    n_nodules = sum(1 for a in annotations if a.series_uid in wanted)
    return OperatingPoint(
        threshold=float(candidates[k]),
        rule=rule,
        target=target,
        validation_sensitivity=float(sens[k]),
        validation_fp_per_scan=float(fps[k]),
        n_scans=len(seriesuids),
        n_nodules=n_nodules,
        source=source,
    )
