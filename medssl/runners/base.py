"""What every model runner is, and the batching code they share.

A runner puts an exported model (see :mod:`medssl.models`) behind a plain numpy call:
``runner(patches) -> outputs`` with ``patches`` shaped ``(B, *card.input.shape)`` and one
array per ``card.outputs`` entry, in that order, each ``(B, *spec.shape)``. For a detector
that is ``(boxes (B, N, 4), scores (B, N))``, so every runner is a
:class:`medssl.pipeline.detect.DetectionRunner`.

:class:`BatchedRunner` holds the one implementation of input validation, splitting a batch
larger than ``card.max_batch_size`` into chunks and checking and joining what comes back;
a concrete runner only says how to run one chunk (:meth:`BatchedRunner._infer`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
from typing_extensions import Self

from medssl.errors import RunnerError
from medssl.models.card import ModelCard, TensorSpec

__all__ = ["NUMPY_DTYPES", "BatchedRunner", "ModelRunner", "check_outputs", "check_patches"]

#: numpy dtype of each Triton data type a card may name.
NUMPY_DTYPES: dict[str, type[np.generic]] = {
    "FP32": np.float32,
    "FP16": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}

_Runner = TypeVar("_Runner", bound="BatchedRunner")


@runtime_checkable
class ModelRunner(Protocol):
    """An exported model behind a numpy call.

    Attributes:
        card: the model card the runner was checked against.
    """

    card: ModelCard

    def __call__(self, patches: np.ndarray) -> tuple[np.ndarray, ...]:
        """Run ``patches`` ``(B, *card.input.shape)``; one array ``(B, *spec.shape)`` per
        ``card.outputs`` entry, in that order."""
        ...

    def close(self) -> None:
        """Release the session or connection; the runner is unusable afterwards."""
        ...


def check_patches(patches: Any, spec: TensorSpec) -> np.ndarray:
    """``patches`` as a C-contiguous ``(B, *spec.shape)`` array of the spec's dtype.

    Real numbers of another dtype (float64, ints) are cast; anything else is an error.

    Raises:
        ValueError: wrong shape (expected and received shapes named) or a dtype that is
            not a real number.
    """
    array = np.asarray(patches)
    expected = ("B", *spec.shape)
    if array.ndim != len(expected) or tuple(array.shape[1:]) != spec.shape:
        raise ValueError(
            f"input {spec.name!r} must have shape {_shape_text(expected)} (a batch of "
            f"preprocessed patches), got {tuple(array.shape)}"
        )
    dtype = np.dtype(NUMPY_DTYPES[spec.datatype])
    if array.dtype != dtype and array.dtype.kind not in "fiub":
        raise ValueError(
            f"input {spec.name!r} must be real numbers castable to {dtype}, got dtype {array.dtype}"
        )
    return np.ascontiguousarray(array, dtype=dtype)


def check_outputs(
    outputs: Mapping[str, np.ndarray], specs: tuple[TensorSpec, ...], batch: int, source: str
) -> tuple[np.ndarray, ...]:
    """The outputs named by ``specs``, in that order, each checked to be ``(batch, *spec.shape)``.

    Args:
        outputs: arrays by output name, as one model call returned them.
        specs: the card's outputs.
        batch: patches in the call.
        source: the model, for the message (``"model.onnx"``, ``"Triton 127.0.0.1:8000"``).

    Raises:
        RunnerError: an output is missing or has another shape (every problem listed).
    """
    problems = []
    for spec in specs:
        if spec.name not in outputs:
            problems.append(f"output {spec.name!r} missing (got {sorted(outputs)})")
            continue
        shape = tuple(np.shape(outputs[spec.name]))
        if shape != (batch, *spec.shape):
            problems.append(
                f"output {spec.name!r} has shape {shape}, the card says {(batch, *spec.shape)}"
            )
    if problems:
        raise RunnerError(
            f"{source} broke the model card's output contract: " + "; ".join(problems)
        )
    return tuple(np.asarray(outputs[spec.name]) for spec in specs)


class BatchedRunner(ABC):
    """Base of the runners: validation, chunking by ``card.max_batch_size``, context manager.

    Subclasses set :attr:`card` and implement :meth:`_infer` (one chunk) and :meth:`close`.
    """

    card: ModelCard

    def __call__(self, patches: np.ndarray) -> tuple[np.ndarray, ...]:
        """Run a batch of any size.

        Args:
            patches: ``(B, *card.input.shape)``, e.g. ``(B, 1, Z, Y, X)`` preprocessed CT
                windows; cast to the card's input dtype (float32).

        Returns:
            One array per ``card.outputs`` entry, in that order, each ``(B, *spec.shape)``;
            chunks of at most ``card.max_batch_size`` patches run one after another.

        Raises:
            ValueError: ``patches`` has the wrong shape or dtype.
            RunnerError: the model failed, or returned outputs that break the card.
        """
        batch = check_patches(patches, self.card.input)
        specs = self.card.outputs
        if len(batch) == 0:
            return tuple(np.empty((0, *s.shape), NUMPY_DTYPES[s.datatype]) for s in specs)
        step = self.card.max_batch_size
        chunks = []
        for start in range(0, len(batch), step):
            chunk = batch[start : start + step]
            chunks.append(check_outputs(self._infer(chunk), specs, len(chunk), self._source))
        if len(chunks) == 1:
            return chunks[0]
        return tuple(np.concatenate(parts) for parts in zip(*chunks))

    @property
    @abstractmethod
    def _source(self) -> str:
        """Where the model runs, for messages."""

    @abstractmethod
    def _infer(self, batch: np.ndarray) -> Mapping[str, np.ndarray]:
        """Run one chunk ``(b, *card.input.shape)``, ``b <= max_batch_size``; outputs by name."""

    @abstractmethod
    def close(self) -> None:
        """Release the session or connection."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _shape_text(shape: tuple[Any, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
