"""What a scoring run is given: the model to open (:class:`RunnerSpec`), how to run
(:class:`ScoreOptions`), and what an engine is (:class:`Engine`).

Shared by the driver (:mod:`medssl.scoring.run`) and the engines (:mod:`medssl.scoring.local`,
:mod:`medssl.scoring.ray_engine`), which therefore never import the driver that calls them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from medssl.errors import MedsslError
from medssl.io.limits import DEFAULT_LIMITS, GeometryLimits
from medssl.models.card import ModelCard
from medssl.scoring.manifest import ScanItem
from medssl.scoring.result import SeriesResult
from medssl.scoring.series import DicomOutput
from medssl.scoring.shard import Shard

__all__ = ["Engine", "RunnerSpec", "ScoreOptions"]


@dataclass(frozen=True)
class RunnerSpec:
    """How to open the model, picklable so workers and Ray actors open their own runner.

    Attributes:
        repository: the model repository (the card is read from here).
        name: the model's name.
        version: a version, or None for the newest.
        triton_url: ``host:port`` of a Triton server; None runs onnxruntime in-process.
        protocol: ``http`` or ``grpc`` with ``triton_url``.
        threads: inference threads of the embedded runtime (None: its default).
        runtime: the embedded runtime, ``auto`` (OpenVINO on a CPU when installed, onnxruntime
            with a GPU), ``onnxruntime`` or ``openvino`` (:func:`medssl.runners.choose_runtime`).
    """

    repository: Path
    name: str
    version: int | None = None
    triton_url: str | None = None
    protocol: str = "http"
    threads: int | None = None
    runtime: str = "auto"

    def open(self) -> Any:
        """The runner (:func:`medssl.runners.open_runner`)."""
        from medssl.runners import open_runner

        extra = {"threads": self.threads} if self.triton_url is None and self.threads else {}
        return open_runner(
            self.repository,
            self.name,
            triton_url=self.triton_url,
            protocol=self.protocol,
            version=self.version,
            runtime=self.runtime,
            **extra,
        )

    def card(self) -> ModelCard:
        from medssl.models.repository import find_model_version

        return find_model_version(self.repository, self.name, self.version).card


@dataclass(frozen=True)
class ScoreOptions:
    """How to run.

    Attributes:
        engine: ``local`` (process pool + in-process model) or ``ray``.
        workers: read/preprocess workers (local: processes, 0 = in the main process; ray:
            CPU tasks in flight).
        batch_size: windows per model call.
        limit: score at most this many series (after selection and resume).
        ray_address: an existing Ray cluster (``auto``), or None for a local one.
        ray_num_gpus: GPUs per inference actor (ray engine).
        dicom: write a TID 1500 SR (detection) or DICOM SEG (segmentation) for each scored
            DICOM series (:class:`~medssl.scoring.series.DicomOutput`); None writes none.
        label_maps: segmentation label maps folder; :func:`score` sets ``OUT/labels``.
        limits: the plausible geometry of a series (:mod:`medssl.io.limits`); a series beyond
            them fails with the value and the limit before its pixels are read, which bounds
            the memory one series may take.
        ray_chunk: series per Ray dataset (ray engine): the manifest is fed to Ray in chunks
            of this many series, one block per series within a chunk, so planning time and
            the driver's object-store footprint stay bounded whatever the archive size.
        shard: score only this shard of the manifest (:mod:`medssl.scoring.shard`), so N
            machines share an archive; None scores all of it.
    """

    engine: str = "local"
    workers: int = max(1, (os.cpu_count() or 2) - 1)
    batch_size: int = 2
    limit: int | None = None
    ray_address: str | None = None
    ray_num_gpus: float = 0.0
    dicom: DicomOutput | None = None
    label_maps: Path | None = None
    limits: GeometryLimits = DEFAULT_LIMITS
    ray_chunk: int = 512
    shard: Shard | None = None

    def __post_init__(self) -> None:
        if self.engine not in ("local", "ray"):
            raise MedsslError(f"engine must be 'local' or 'ray', got {self.engine!r}")
        if self.workers < 0 or self.batch_size < 1 or self.ray_chunk < 1:
            raise MedsslError("workers must be >= 0, batch_size >= 1 and ray_chunk >= 1")


class Engine(Protocol):
    """Turns manifest rows into results, in any order, one per row."""

    def __call__(
        self, items: Sequence[ScanItem], spec: RunnerSpec, card: ModelCard, options: ScoreOptions
    ) -> Iterator[SeriesResult]: ...
