"""Probability calibration of detector scores: Platt and temperature scaling, ECE, reliability.

A detector's score ranks candidates but need not be a probability: a finding scored 0.9
may be a nodule far less than 90 % of the time. Calibration fits a monotone map on
validation candidates (each labelled 1 = true positive, 0 = false positive) so that the
reported probability matches the observed frequency.

Both methods share one form, applied to the logit of the raw score::

    p' = sigmoid(a * logit(p) + b)

* ``"platt"``: Platt scaling (Platt 1999, "Probabilistic outputs for support vector
  machines"; Guo et al. 2017, "On Calibration of Modern Neural Networks", sec. 4.1): ``a``
  and ``b`` both fitted by minimising the negative log-likelihood of the labels.
* ``"temperature"``: temperature scaling (Guo et al. 2017, sec. 4.1): one parameter,
  ``a = 1 / T``, ``b = 0``.

``a > 0`` always, so the map is strictly increasing: the ranking of candidates (NMS order,
FROC) does not change, only the numbers. Scores are clipped to ``[1e-6, 1 - 1e-6]``
before the logit (a score of exactly 0 or 1 has no finite logit), except by the identity,
which returns its input untouched.

The expected calibration error is Guo et al. 2017's eq. (3) over equal-width bins:
``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``, bin ``b`` holding the scores in
``(b / M, (b + 1) / M]`` (a score of 0 in the first bin).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize, special

__all__ = [
    "CALIBRATION_METHODS",
    "Calibration",
    "expected_calibration_error",
    "fit_calibration",
    "reliability_bins",
    "reliability_diagram",
]

#: Methods :func:`fit_calibration` fits; ``"identity"`` is the unfitted map (a=1, b=0).
CALIBRATION_METHODS = ("platt", "temperature")

#: Scores are clipped to ``[EPS, 1 - EPS]`` before the logit.
EPS = 1e-6


@dataclass(frozen=True)
class Calibration:
    """A fitted monotone map ``p' = sigmoid(a * logit(p) + b)`` of scores in ``[0, 1]``.

    Attributes:
        method: ``"platt"``, ``"temperature"`` (then ``b == 0`` and ``a = 1 / T``) or
            ``"identity"`` (``a == 1``, ``b == 0``; :meth:`apply` returns its input).
        a: slope on the logit, ``> 0`` (so the map is strictly increasing).
        b: offset on the logit.
    """

    method: str = "identity"
    a: float = 1.0
    b: float = 0.0

    def __post_init__(self) -> None:
        methods = ("identity", *CALIBRATION_METHODS)
        if self.method not in methods:
            raise ValueError(f"Calibration.method must be one of {methods}, got {self.method!r}")
        for name in ("a", "b"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ValueError(f"Calibration.{name} must be a finite number, got {value!r}")
        if not self.a > 0:
            raise ValueError(
                f"Calibration.a must be > 0 (a strictly increasing map keeps the ranking), "
                f"got {self.a!r}"
            )
        if self.method == "temperature" and self.b != 0:
            raise ValueError(f"temperature scaling has b = 0, got b={self.b!r}; use method='platt'")
        if self.method == "identity" and (self.a != 1 or self.b != 0):
            raise ValueError(
                f"the identity calibration has a=1, b=0, got a={self.a!r}, b={self.b!r}; "
                "name the method that fitted them"
            )

    @property
    def is_identity(self) -> bool:
        """True for the unfitted map, which leaves scores exactly as they are."""
        return self.method == "identity"

    @property
    def temperature(self) -> float:
        """``T = 1 / a`` (meaningful for temperature scaling)."""
        return 1.0 / self.a

    def apply(self, probabilities: np.ndarray | float) -> np.ndarray:
        """Calibrated probabilities, elementwise, same shape as the input (float64).

        Args:
            probabilities: raw scores in ``[0, 1]``, any shape.

        Raises:
            ValueError: a score outside ``[0, 1]`` or not finite.
        """
        p = _check_probabilities(probabilities, "probabilities", allow_empty=True)
        if self.is_identity:
            return p
        return special.expit(self.a * _logit(p) + self.b)

    def to_json(self) -> dict[str, Any]:
        """``{"method", "a", "b"}`` for a model card."""
        return {"method": self.method, "a": float(self.a), "b": float(self.b)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        """Inverse of :meth:`to_json`; missing keys take the identity's values.

        Raises:
            ValueError: an unknown key or an invalid value (named).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a calibration must be a mapping with method, a, b; got {data!r}")
        unknown = sorted(set(data) - {"method", "a", "b"})
        if unknown:
            raise ValueError(
                f"unknown Calibration keys {unknown}; expected some of ['a', 'b', 'method']"
            )
        return cls(**data)


def fit_calibration(
    probabilities: np.ndarray, labels: np.ndarray, *, method: str = "platt"
) -> Calibration:
    """Fit ``p' = sigmoid(a * logit(p) + b)`` to validation candidates by minimising the NLL.

    Args:
        probabilities: ``(N,)`` raw scores in ``[0, 1]`` (clipped to ``[1e-6, 1 - 1e-6]``).
        labels: ``(N,)`` 0/1 (1 = the candidate is a true nodule). Candidates that an
            evaluation ignores (LUNA16's excluded findings) must be left out by the caller.
        method: ``"platt"`` (``a`` and ``b``) or ``"temperature"`` (``a = 1/T``, ``b = 0``).

    Returns:
        The fitted :class:`Calibration`.

    Raises:
        ValueError: bad shapes or values, labels all of one class (nothing to fit), or a
            fit with ``a <= 0`` (the scores rank negatives above positives; a calibration
            that inverted the ranking would break NMS order and the FROC).
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {CALIBRATION_METHODS}, got {method!r}")
    p, y = _check_pair(probabilities, labels)
    if y.min() == y.max():
        raise ValueError(
            f"calibration needs both classes, but all {len(y)} labels are {int(y[0])}; "
            "fit on validation candidates that include true and false positives"
        )
    x = _logit(p)

    def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = (theta[0], theta[1]) if method == "platt" else (theta[0], 0.0)
        z = a * x + b
        loss = float(np.mean(np.logaddexp(0.0, z) - y * z))
        residual = special.expit(z) - y
        grad = [np.mean(residual * x), np.mean(residual)]
        return loss, np.asarray(grad if method == "platt" else grad[:1])

    start = np.array([1.0, 0.0] if method == "platt" else [1.0])
    result = optimize.minimize(nll, start, jac=True, method="BFGS", options={"gtol": 1e-9})
    if not np.all(np.isfinite(result.x)):
        raise ValueError(f"calibration fit diverged ({result.message}); check the labels")
    a = float(result.x[0])
    b = float(result.x[1]) if method == "platt" else 0.0
    if not a > 0:
        raise ValueError(
            f"calibration fit found slope a={a:.4g} <= 0: these scores rank false positives "
            "above true ones; check that labels match the candidates"
        )
    return Calibration(method=method, a=a, b=b)


def reliability_bins(
    probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equal-width bins over ``[0, 1]``: count, mean confidence and accuracy per bin.

    Bin ``b`` holds scores in ``(b / n_bins, (b + 1) / n_bins]``; a score of 0 is in bin 0.

    Args:
        probabilities: ``(N,)`` in ``[0, 1]``; labels: ``(N,)`` 0/1.
        n_bins: number of bins, ``>= 1``.

    Returns:
        ``(counts, confidence, accuracy)``, each ``(n_bins,)``; the means are NaN in empty bins.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    p, y = _check_pair(probabilities, labels)
    index = np.clip(np.ceil(p * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=p, minlength=n_bins) / counts
        accuracy = np.bincount(index, weights=y, minlength=n_bins) / counts
    return counts.astype(np.int64), confidence, accuracy


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 10
) -> float:
    """ECE = ``sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` over equal-width bins (Guo 2017, eq. 3).

    Args:
        probabilities: ``(N,)`` probabilities of the positive class, in ``[0, 1]``.
        labels: ``(N,)`` 0/1 outcomes.
        n_bins: equal-width bins over ``[0, 1]`` (see :func:`reliability_bins`).

    Returns:
        The ECE, in ``[0, 1]``.
    """
    counts, confidence, accuracy = reliability_bins(probabilities, labels, n_bins)
    filled = counts > 0
    gaps = np.abs(accuracy[filled] - confidence[filled])
    return float(np.sum(counts[filled] * gaps) / counts.sum())


def reliability_diagram(
    probabilities: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    n_bins: int = 10,
    *,
    title: str = "Reliability diagram",
) -> Path:
    """Draw the reliability diagram (accuracy per confidence bin, the diagonal, ECE) to a PNG.

    Bars: the observed fraction of positives per equal-width bin; the dashed diagonal is a
    perfectly calibrated model; the lower panel counts candidates per bin (log scale).
    Needs matplotlib (Agg canvas; pyplot and the global backend are not touched).

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts, confidence, accuracy = reliability_bins(probabilities, labels, n_bins)
    ece = expected_calibration_error(probabilities, labels, n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, 1.0 / n_bins
    filled = counts > 0
    path = Path(path)
    fig = Figure(figsize=(5.0, 6.0))
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(
        centres[filled],
        accuracy[filled],
        width=width,
        edgecolor="black",
        color="tab:blue",
        label="observed fraction of nodules",
    )
    top.plot(
        confidence[filled],
        confidence[filled],
        "o",
        color="tab:orange",
        label="mean probability in bin",
    )
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("Fraction of true nodules")
    top.set_title(f"{title}\nECE {ece:.3f} ({n_bins} bins, {int(counts.sum())} candidates)")
    top.legend(loc="upper left")
    top.grid(True, alpha=0.4)
    bottom.bar(centres, np.maximum(counts, 0), width=width, edgecolor="black", color="tab:gray")
    if counts.max() > 0:
        bottom.set_yscale("log")
    bottom.set_xlabel("Predicted probability")
    bottom.set_ylabel("Candidates")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _logit(p: np.ndarray) -> np.ndarray:
    return special.logit(np.clip(p, EPS, 1.0 - EPS))


def _check_probabilities(values: Any, name: str, *, allow_empty: bool) -> np.ndarray:
    p = np.asarray(values, dtype=np.float64)
    if not allow_empty and p.size == 0:
        raise ValueError(f"{name} is empty; need at least one candidate")
    if p.size and not (np.all(np.isfinite(p)) and p.min() >= 0.0 and p.max() <= 1.0):
        bad = p[~(np.isfinite(p) & (p >= 0) & (p <= 1))].ravel()[:3]
        raise ValueError(f"{name} must be finite and in [0, 1], got values such as {bad.tolist()}")
    return p


def _check_pair(probabilities: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(N,)`` float64 probabilities and ``(N,)`` float64 0/1 labels, or a ValueError."""
    p = _check_probabilities(probabilities, "probabilities", allow_empty=False)
    y = np.asarray(labels)
    if p.ndim != 1 or y.shape != p.shape:
        raise ValueError(f"probabilities and labels must both be (N,), got {p.shape} and {y.shape}")
    if y.dtype == bool:
        y = y.astype(np.float64)
    if not np.issubdtype(y.dtype, np.number) or not np.all((y == 0) | (y == 1)):
        bad = (
            np.unique(y[~((y == 0) | (y == 1))])[:3]
            if np.issubdtype(y.dtype, np.number)
            else y.dtype
        )
        raise ValueError(
            f"labels must be 0 or 1 (drop ignored candidates, label -1, first), got {bad!r}"
        )
    return p, y.astype(np.float64)
