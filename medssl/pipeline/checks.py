"""Validation of the pipeline's parameter classes: value predicates and the rule table runner.

:class:`~medssl.pipeline.detect.DetectionParams` and
:class:`~medssl.pipeline.segment.SegmentationParams` each hold a table ``field: (check, rule)``;
:func:`check_fields` runs it and names the field, what was expected and what was given.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "Rules",
    "check_fields",
    "is_int",
    "is_number",
    "is_probability",
    "is_triple",
    "positive_int",
    "positive_number",
]

#: ``field: (check(value, params), rule(params))``; the rule text names what is expected.
Rules = Mapping[str, tuple[Callable[[Any, Any], bool], Callable[[Any], str]]]


def is_int(value: Any) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real number (numpy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_probability(value: Any) -> bool:
    """A finite number in ``[0, 1]``."""
    return is_number(value) and 0 <= value <= 1


def positive_int(value: Any, _: Any = None) -> bool:
    """An integer >= 1 (usable as a rule check: the second argument is ignored)."""
    return is_int(value) and value >= 1


def positive_number(value: Any, _: Any = None) -> bool:
    """A finite number > 0 (usable as a rule check: the second argument is ignored)."""
    return is_number(value) and value > 0


def is_triple(value: Any, check: Callable[[Any], bool]) -> bool:
    """A tuple of three values that each pass ``check``."""
    return isinstance(value, tuple) and len(value) == 3 and all(check(v) for v in value)


def check_fields(params: Any, rules: Rules) -> None:
    """Run ``rules`` over ``params``'s fields in table order.

    Raises:
        ValueError: ``"<Class>.<field> must be <rule>, got <value>"`` for the first field
            that fails.
    """
    for name, (ok, rule) in rules.items():
        value = getattr(params, name)
        if not ok(value, params):
            raise ValueError(
                f"{type(params).__name__}.{name} must be {rule(params)}, got {value!r}"
            )
