"""The default runner: an exported ``model.onnx`` in embedded onnxruntime.

Needs ``onnxruntime`` (the ``serve`` extra; ``onnxruntime-gpu`` for CUDA/TensorRT), never torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from typing_extensions import Self

from medssl.errors import ModelRepositoryError, RunnerError
from medssl.models.card import ModelCard
from medssl.models.graph import graph_problems
from medssl.models.repository import find_model_version
from medssl.runners.base import BatchedRunner

__all__ = [
    "PROVIDER_OPTIONS",
    "PROVIDER_PREFERENCE",
    "OnnxFileRunner",
    "OnnxRunner",
    "find_onnx",
    "gpu_providers",
    "select_providers",
]

#: Execution providers tried by default, fastest first. OpenVINO comes with the
#: ``onnxruntime-openvino`` wheel (installed instead of ``onnxruntime``); on CPUs it runs 3D
#: convolutions 1.5-1.9x faster than the default CPU provider (benchmarks/export_speed.py).
PROVIDER_PREFERENCE = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    "CPUExecutionProvider",
)
#: Options given with a provider: OpenVINO on the CPU in fp32 (no silent bf16/fp16 downcast,
#: so its outputs stay within the export's fp32 parity tolerance).
PROVIDER_OPTIONS: dict[str, dict[str, str]] = {
    "OpenVINOExecutionProvider": {"device_type": "CPU", "precision": "FP32"},
}


def _ort() -> Any:
    """The onnxruntime module, or a clear error."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError(
            "OnnxRunner needs onnxruntime: pip install 'medssl[serve]' (or onnxruntime-gpu)"
        ) from exc
    return onnxruntime


def find_onnx(
    repository: str | Path, name: str, version: int | None = None
) -> tuple[Path, ModelCard]:
    """``<repository>/<name>/<version>/model.onnx`` and its card.

    Raises:
        ModelRepositoryError: no such model, version, ONNX file or card (what exists is listed).
    """
    found = find_model_version(repository, name, version)
    path = found.version_dir / "model.onnx"
    if not path.is_file():
        present = sorted(p.name for p in found.version_dir.iterdir())
        raise ModelRepositoryError(
            path, f"no model.onnx in this version folder (it holds {present or 'nothing'})"
        )
    return path, found.card


def gpu_providers() -> list[str]:
    """The GPU execution providers (TensorRT, CUDA) this onnxruntime offers; [] without one
    (or without onnxruntime)."""
    try:
        available = _ort().get_available_providers()
    except ImportError:
        return []
    return [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]


def select_providers(available: Sequence[str]) -> list[str]:
    """The providers of :data:`PROVIDER_PREFERENCE` found in ``available``, in that order.

    Raises:
        RunnerError: none of them is available.
    """
    chosen = [p for p in PROVIDER_PREFERENCE if p in available]
    if not chosen:
        raise RunnerError(
            f"onnxruntime offers none of {list(PROVIDER_PREFERENCE)} (it has {list(available)}); "
            "install onnxruntime, onnxruntime-gpu or onnxruntime-openvino"
        )
    return chosen


class OnnxFileRunner(BatchedRunner):
    """Base of the embedded runners of one ``model.onnx`` (onnxruntime, OpenVINO): the file, and
    opening it from a repository. Subclasses set :attr:`model_path` and :attr:`card`."""

    model_path: Path

    @classmethod
    def from_repository(
        cls, repository: str | Path, name: str, version: int | None = None, **kw: Any
    ) -> Self:
        """Open ``<repository>/<name>/<version>/model.onnx`` with its card.

        Args:
            repository: the Triton model repository folder.
            name: the model's folder name.
            version: a version folder number; ``None``: the newest.
            **kw: the runner's options (``threads``, and ``providers`` for onnxruntime).

        Raises:
            ModelRepositoryError: no such model, version, ONNX file or card (what exists is
                listed).
        """
        return cls(*find_onnx(repository, name, version), **kw)  # type: ignore[call-arg]

    @property
    def _source(self) -> str:
        return str(self.model_path)


class OnnxRunner(OnnxFileRunner):
    """``model.onnx`` in an onnxruntime session, checked against its model card at load.

    Args:
        model_path: the ONNX file.
        card: the model card; its input/output names, data types and non-batch dims must
            match the graph's.
        providers: onnxruntime execution providers in priority order; ``None``: the
            available ones of TensorRT, CUDA, OpenVINO, CPU (:func:`select_providers`).
        threads: intra-op threads; ``None``: onnxruntime's default (one per core).

    Attributes:
        card: the card.
        model_path: the ONNX file.
        providers: the providers the session actually uses, in priority order (a provider
            that failed to initialise, e.g. CUDA without its libraries, is absent).

    Raises:
        ModelRepositoryError: ``model_path`` does not exist.
        RunnerError: a requested provider is not available, the file is not a loadable
            ONNX model, or the graph disagrees with the card (every mismatch listed).
    """

    def __init__(
        self,
        model_path: str | Path,
        card: ModelCard,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        ort = _ort()
        self.card = card
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ModelRepositoryError(self.model_path, "no such ONNX file; export the model first")
        available = ort.get_available_providers()
        if providers is None:
            providers = select_providers(available)
        missing = [p for p in providers if p not in available]
        if missing:
            raise RunnerError(
                f"execution providers {missing} are not available in this onnxruntime "
                f"(available: {available}); pass providers=None to choose automatically"
            )
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(
                str(self.model_path),
                sess_options=options,
                providers=[(p, PROVIDER_OPTIONS.get(p, {})) for p in providers],
            )
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise RunnerError(
                f"{self.model_path}: onnxruntime cannot load the model: {exc}"
            ) from exc
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        problems = graph_problems(self._session, card)
        if problems:
            raise RunnerError(
                f"{self.model_path} does not match the model card of {card.name!r} version "
                f"{card.version}: "
                + "; ".join(problems)
                + ". Re-export the model, or load the card written with it."
            )

    def _infer(self, batch: np.ndarray) -> Mapping[str, np.ndarray]:
        if self._session is None:
            raise RunnerError(f"{self.model_path}: the runner is closed; open a new one")
        names = list(self.card.output_names)
        try:
            values = self._session.run(names, {self.card.input.name: batch})
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise RunnerError(f"{self.model_path}: inference failed: {exc}") from exc
        return dict(zip(names, values))

    def close(self) -> None:
        """Drop the session (its memory is freed when no call is in flight)."""
        self._session = None
