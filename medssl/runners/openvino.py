"""``model.onnx`` in OpenVINO's own runtime: the fastest CPU path on x86-64.

OpenVINO reads the exported ONNX file directly (no conversion step, no second file in the
repository) and, unlike the ``onnxruntime-openvino`` wheel, installs beside ``onnxruntime``
without replacing it, so ``pip install medssl[serve]`` on Linux x86-64 has both and
:func:`medssl.runners.open_runner` picks this one for CPU inference (``runtime="auto"``).

Precision is pinned to fp32 (``INFERENCE_PRECISION_HINT``): on CPUs with bf16 units OpenVINO
would otherwise run in bf16 by default, and the model's outputs would leave the export's
fp32 parity tolerance. Needs the ``openvino`` package (the ``serve`` extra on Linux x86-64),
never torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medssl.errors import ModelRepositoryError, RunnerError
from medssl.models.card import ModelCard
from medssl.models.graph import graph_problems
from medssl.runners.onnx import OnnxFileRunner

__all__ = ["OPENVINO_CONFIG", "OpenVinoRunner", "openvino_available"]

#: Compile options: fp32 (no silent bf16 on CPUs that have it) and latency-oriented streams
#: (one request at a time, all cores on it), as the scorer and the gateway call the model.
OPENVINO_CONFIG: dict[str, str] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}

#: OpenVINO element types as the ONNX type strings :func:`medssl.models.graph.graph_problems` reads.
_TYPES = {
    "f32": "tensor(float)",
    "f16": "tensor(float16)",
    "i64": "tensor(int64)",
    "i32": "tensor(int32)",
    "u8": "tensor(uint8)",
    "boolean": "tensor(bool)",
}


def openvino_available() -> bool:
    """Whether the ``openvino`` runtime is importable here."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class _Port:
    """One model input/output as :func:`graph_problems` reads an onnxruntime node."""

    def __init__(self, port: Any) -> None:
        self.name = port.get_any_name()
        self.type = _TYPES.get(
            port.get_element_type().get_type_name(), port.get_element_type().get_type_name()
        )
        self.shape = [d.get_length() if d.is_static else "batch" for d in port.get_partial_shape()]


class _Graph:
    """A compiled OpenVINO model's inputs and outputs, shaped like an onnxruntime session's."""

    def __init__(self, compiled: Any) -> None:
        self._inputs = [_Port(p) for p in compiled.inputs]
        self._outputs = [_Port(p) for p in compiled.outputs]

    def get_inputs(self) -> list[_Port]:
        return self._inputs

    def get_outputs(self) -> list[_Port]:
        return self._outputs


class OpenVinoRunner(OnnxFileRunner):
    """``model.onnx`` compiled by OpenVINO for the CPU, checked against its model card at load.

    Args:
        model_path: the ONNX file.
        card: the model card; the graph's names, data types and non-batch dims must match.
        threads: inference threads; ``None``: OpenVINO's default (one per core).
        device: the OpenVINO device (``CPU``).

    Attributes:
        card: the card.
        model_path: the ONNX file.
        providers: ``("OpenVINO CPU fp32",)``: what runs the model, for logs and metrics.

    Raises:
        ModelRepositoryError: ``model_path`` does not exist.
        RunnerError: OpenVINO is not installed, cannot compile the file, or the graph
            disagrees with the card (every mismatch listed).
    """

    def __init__(
        self,
        model_path: str | Path,
        card: ModelCard,
        threads: int | None = None,
        device: str = "CPU",
    ) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise RunnerError(
                "the OpenVINO runtime is not installed: pip install openvino "
                "(part of medssl[serve] on Linux x86-64), or use runtime='onnxruntime'"
            ) from exc
        self.card = card
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ModelRepositoryError(self.model_path, "no such ONNX file; export the model first")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        config = dict(OPENVINO_CONFIG)
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        try:
            core = ov.Core()
            self._compiled = core.compile_model(
                core.read_model(str(self.model_path)), device, config
            )
        except Exception as exc:  # OpenVINO raises its own exception types
            raise RunnerError(
                f"{self.model_path}: OpenVINO cannot compile the model: {exc}"
            ) from exc
        self._request: Any = self._compiled.create_infer_request()
        self.providers: tuple[str, ...] = (f"OpenVINO {device} fp32",)
        problems = graph_problems(_Graph(self._compiled), card)
        if problems:
            raise RunnerError(
                f"{self.model_path} does not match the model card of {card.name!r} version "
                f"{card.version}: "
                + "; ".join(problems)
                + ". Re-export the model, or load the card written with it."
            )

    def _infer(self, batch: np.ndarray) -> Mapping[str, np.ndarray]:
        if self._request is None:
            raise RunnerError(f"{self.model_path}: the runner is closed; open a new one")
        try:
            results = self._request.infer({self.card.input.name: batch})
        except Exception as exc:  # OpenVINO raises its own exception types
            raise RunnerError(f"{self.model_path}: inference failed: {exc}") from exc
        return {
            name: np.array(results[self._compiled.output(name)]) for name in self.card.output_names
        }

    def close(self) -> None:
        """Drop the compiled model and its request."""
        self._request = None
        self._compiled = None
