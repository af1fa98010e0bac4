"""Does the exported graph compute what the checkpoint computes?

The same inputs go through the PyTorch module and the exported runtime and every output is
compared. Errors are measured relative to each output's scale, its largest magnitude over
all inputs: an output passes when ``max |exported - torch| <= atol + rtol * max |torch|``.

Why not element by element (``numpy.allclose``)? A box coordinate's rounding error grows
with its anchor's size (``z = a + dz * size``), not with the coordinate itself, so a box near
the patch origin would fail an elementwise test for float32 re-association alone (a 30-step
model: 2.5e-4 voxels on a coordinate of 3.4). A genuine export bug shifts outputs by a
sizeable fraction of their range and fails either way.

Reported figures, per output and overall:

* ``max_abs``: ``max |exported - torch|``;
* ``max_rel``: ``max_abs / max |torch|`` (the scale-relative error the tolerance bounds).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from medssl.errors import ParityError

__all__ = ["TOLERANCES", "ParityReport", "Tolerance", "compare", "torch_outputs"]


@dataclass(frozen=True)
class Tolerance:
    """Tolerances of one precision: ``max error <= atol + rtol * output scale``."""

    rtol: float
    atol: float


#: fp32: what float32 re-association in another runtime costs (onnxruntime fuses conv +
#: batch norm and reorders sums). fp16: half precision weights and activations (10-bit
#: mantissa, ~5e-4 relative per op, accumulated over a few dozen layers).
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(rtol=1e-4, atol=1e-5),
    "fp16": Tolerance(rtol=2e-2, atol=2e-3),
}


@dataclass(frozen=True)
class ParityReport:
    """The measured disagreement between PyTorch and an exported runtime.

    Attributes:
        runtime: e.g. ``"onnxruntime (CPUExecutionProvider)"`` or ``"tensorrt"``.
        precision: ``fp32`` or ``fp16``.
        tolerance: the tolerance applied.
        max_abs, max_rel: over all outputs and inputs (definitions in the module docstring).
        per_output: ``{name: {"max_abs": .., "max_rel": .., "scale": max |torch|}}``.
        inputs: what was compared (e.g. ``["random normal (2, 1, 32, 32, 32)", ...]``).
        passed: every output within tolerance.
    """

    runtime: str
    precision: str
    tolerance: Tolerance
    max_abs: float
    max_rel: float
    per_output: Mapping[str, Mapping[str, float]]
    inputs: Sequence[str]
    passed: bool

    def to_json(self) -> dict:
        data = asdict(self)
        data["per_output"] = {k: dict(v) for k, v in self.per_output.items()}
        data["inputs"] = list(self.inputs)
        return data

    def summary(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"{self.runtime} vs PyTorch ({self.precision}): max abs error {self.max_abs:.3g}, "
            f"max rel error {self.max_rel:.3g} (tolerance rtol {self.tolerance.rtol:g}, "
            f"atol {self.tolerance.atol:g}): {verdict}"
        )


@torch.no_grad()
def torch_outputs(module: torch.nn.Module, patches: np.ndarray) -> list[np.ndarray]:
    """The module's outputs on ``patches`` (CPU, eval mode, float32) as numpy arrays."""
    out = module.eval()(torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32)))
    return [t.float().numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]


def compare(
    module: torch.nn.Module,
    exported: Callable[[np.ndarray], Sequence[np.ndarray]],
    inputs: Mapping[str, np.ndarray],
    output_names: Sequence[str],
    runtime: str,
    precision: str,
    raise_on_failure: bool = True,
) -> ParityReport:
    """Run ``inputs`` through both and measure the error.

    Args:
        module: the PyTorch model (the graph that was exported).
        exported: the exported runtime, ``patches -> outputs`` in ``output_names`` order.
        inputs: description → patches ``(B, ...)`` float32.
        output_names: the outputs' names, for the report.
        runtime: what ``exported`` is, for the report.
        precision: ``fp32`` or ``fp16``: picks the tolerance.
        raise_on_failure: raise :class:`ParityError` when an output is out of tolerance.

    Raises:
        ParityError: out of tolerance (the report is attached as ``.report``).
    """
    tol = TOLERANCES[precision]
    max_err = dict.fromkeys(output_names, 0.0)
    scale = dict.fromkeys(output_names, 0.0)
    for patches in inputs.values():
        expected = torch_outputs(module, patches)
        got = exported(patches)
        for name, want, have in zip(output_names, expected, got, strict=True):
            if want.shape != have.shape:
                raise ParityError(
                    f"{runtime}: output {name!r} has shape {have.shape}, PyTorch {want.shape}", None
                )
            err = np.abs(have.astype(np.float64) - want)
            max_err[name] = max(
                max_err[name], float(np.nan_to_num(err, nan=np.inf).max(initial=0.0))
            )
            scale[name] = max(scale[name], float(np.abs(want).max(initial=0.0)))
    per_output = {
        name: {
            "max_abs": max_err[name],
            "max_rel": max_err[name] / max(scale[name], tol.atol),
            "scale": scale[name],
        }
        for name in output_names
    }
    passed = all(max_err[n] <= tol.atol + tol.rtol * scale[n] for n in output_names)
    report = ParityReport(
        runtime=runtime,
        precision=precision,
        tolerance=tol,
        max_abs=max(s["max_abs"] for s in per_output.values()),
        max_rel=max(s["max_rel"] for s in per_output.values()),
        per_output=per_output,
        inputs=list(inputs),
        passed=passed,
    )
    if not passed and raise_on_failure:
        raise ParityError(f"parity check failed: {report.summary()}", report)
    return report
